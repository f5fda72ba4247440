"""harness.py, the machinery: training's outputs, checkpoints, resume, Ctrl-C, the earlier run,
sampling, --evaluate, --help, presets, the lines for a notebook. It is the same for every stage,
so it is tested on bigram.py, the fastest; gpt.py's own paths on gpt.py."""
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import harness
from conftest import (ROOT, SCRATCH, STAGES, cpu_autocast_on, ctrl_c_during_step, load_stage, losses_of, name,
                      read_log, snapshot, tiny_args, weights)


def test_training_lowers_the_loss_and_writes_its_outputs(bigram, corpus, run, tmp_path):
    code, out, err = run(bigram, "--data", corpus, "--max_iters", "40")
    assert code == 0, err
    out_dir = tmp_path / "out" / "bigram"
    log = read_log(out_dir / "log.csv")
    assert [row["step"] for row in log] == [0, 10, 20, 30, 40]
    assert log[-1]["train_loss"] < log[0]["train_loss"] - 0.5
    metrics = run.metrics(bigram)
    for key in ("stage", "params", "iters", "train_loss", "val_loss", "val_bpc", "tokens_per_sec", "seconds",
                "device", "hardware", "batch_size", "block_size", "learning_rate", "seed", "dtype", "interrupted",
                "warning", "torch", "world_size"):
        assert key in metrics
    assert metrics["stage"] == "bigram" and metrics["iters"] == 40 and not metrics["interrupted"]
    assert metrics["val_bpc"] == pytest.approx(metrics["val_loss"] / math.log(2))
    best = min(log, key=lambda row: row["val_loss"])              # the best estimate is the one kept
    assert metrics["best_step"] == best["step"] and metrics["train_loss"] == pytest.approx(best["train_loss"])
    assert "full val loss" in out and "bits per character" in out
    assert sorted(p.name for p in out_dir.iterdir()) == ["ckpt.pt", "last.pt", "log.csv", "metrics.json"]


def test_the_tests_use_a_scratch_folder_not_the_repository_s_out(stage):
    assert Path(tiny_args(stage).out_dir).resolve().is_relative_to(SCRATCH["folder"].resolve())


def test_full_loss_scores_every_character_once():
    stage = load_stage("multi_head_attn")
    args = tiny_args(stage)
    model = stage.make_model(10, args)
    data = np.random.default_rng(0).integers(0, 10, 101).astype(np.uint8)   # 100 targets, block 16
    nats, count = harness.full_loss(model, data, args, torch.device("cpu"))
    assert count == 100
    total = 0.0                                                    # the same sum, window by window
    for start in range(0, 100, args.block_size):
        chunk = torch.from_numpy(data[start:min(start + args.block_size, 100) + 1].astype(np.int64))[None]
        logits, _ = model(chunk[:, :-1])
        total += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
    assert nats == pytest.approx(total / 100, rel=1e-5)


def test_checkpoint_round_trip_gives_the_same_sample_and_loss(bigram, corpus, run, tmp_path):
    assert run(bigram, "--data", corpus)[0] == 0
    out_dir = tmp_path / "out" / "bigram"
    code, out, err = run(bigram, "--sample", "--max_new_tokens", "30", tiny=False, out_dir=out_dir)
    assert code == 0, err
    assert out.rstrip("\n") == run.metrics(bigram)["sample"].rstrip("\n")
    text = corpus.read_text(encoding="utf-8")
    val = tmp_path / "val.txt"
    val.write_text(text[int(0.9 * len(text)):], encoding="utf-8")
    code, out, err = run(bigram, "--evaluate", val, tiny=False, out_dir=out_dir)
    assert code == 0, err
    assert f"loss {run.metrics(bigram)['val_loss']:.4f} nats" in out
    assert "perplexity" in out and f"{len(val.read_text()) - 1:,} characters scored" in out


def test_evaluate_takes_the_batch_size_it_is_given(bigram, corpus, run, tmp_path, monkeypatch):
    """Defect: --evaluate took the checkpoint's batch size, so its memory could not be lowered."""
    assert run(bigram, "--data", corpus, "--batch_size", "8")[0] == 0
    seen, real = [], harness.full_loss
    monkeypatch.setattr(harness, "full_loss", lambda model, data, args, device:
                        seen.append(args.batch_size) or real(model, data, args, device))
    outputs = [run(bigram, "--evaluate", corpus, *given, tiny=False, out_dir=tmp_path / "out" / "bigram")
               for given in ([], ["--batch_size", "2"])]
    assert seen == [8, 2] and outputs[0][1] == outputs[1][1]       # the same loss either way
    single = load_stage("single_attention")
    assert run(single, "--data", corpus)[0] == 0
    code, _, err = run(single, "--evaluate", corpus, "--n_embd", "32", tiny=False,
                       out_dir=tmp_path / "out" / "single_attention")
    assert code == 1 and err.count("\n") == 1
    assert "--n_embd 32: the saved model was trained with --n_embd 16; leave it out" in err
    gpt = load_stage("gpt")                                        # a change no weight's shape shows,
    assert run(gpt, "--data", corpus)[0] == 0                      # or one that would crash the model
    for given in (["--n_head", "1"], ["--n_head", "64"], ["--n_head", "3"]):
        code, _, err = run(gpt, "--sample", *given, tiny=False, out_dir=tmp_path / "out" / "gpt")
        assert code == 1 and err.count("\n") == 1 and f"{' '.join(given)}: the saved model was trained" in err


def test_sampling_options(bigram, corpus, run, tmp_path):
    assert run(bigram, "--data", corpus)[0] == 0
    out_dir = tmp_path / "out" / "bigram"
    greedy = [run(bigram, "--sample", "--temperature", "0", "--seed", s, "--prompt", "ROMEO:", tiny=False,
                  out_dir=out_dir)[1] for s in (1, 2)]
    assert greedy[0] == greedy[1] and greedy[0].startswith("ROMEO:")   # greedy ignores the seed
    code, out, _ = run(bigram, "--sample", "--top_k", "1", "--num_samples", "2", "--max_new_tokens", "5",
                       tiny=False, out_dir=out_dir)
    first, second = out.split("-" * 40)
    assert code == 0 and first.strip() == second.strip()           # top_k 1 is greedy too
    code, out, _ = run(bigram, "--sample", "--top_k", "1000", "--top_p", "0.5", "--max_new_tokens", "5",
                       tiny=False, out_dir=out_dir)
    assert code == 0 and len(out) == len("\n") + 5 + 1
    samples = [run(bigram, "--sample", "--seed", s, "--max_new_tokens", "40", tiny=False, out_dir=out_dir)[1]
               for s in (1, 1, 2)]
    assert samples[0] == samples[1] != samples[2]                  # the same seed, the same sample


def test_sampling_leaves_the_model_as_it_found_it(bigram, gpt):
    for stage in (bigram, gpt):
        args = tiny_args(stage, "--dtype", "bfloat16")
        model, tokenizer = stage.make_model(20, args), stage.CharTokenizer("".join(map(chr, range(65, 85))))
        args.prompt, args.prompt_given = "A", True
        for mode in (True, False):
            model.train(mode)
            inside = []
            real = stage.generate
            stage.generate = lambda *a: inside.append(model.training) or real(*a)
            try:
                harness.sample_text(stage, model, tokenizer, args, torch.device("cpu"), max_new_tokens=5)
            finally:
                stage.generate = real
            assert model.training == mode and inside == [False]    # eval mode inside, the caller's after
            assert not cpu_autocast_on()                           # no bfloat16 left on


def test_samples_during_training_leave_the_run_unchanged_and_show_one_sample(bigram, corpus, run, tmp_path):
    """Defect: --sample_every made num_samples samples and showed one."""
    assert run(bigram, "--data", corpus, out_dir=tmp_path / "quiet")[0] == 0
    calls, real = [], bigram.generate
    bigram.generate = lambda *a, **k: calls.append(a[2]) or real(*a, **k)
    try:
        code, out, err = run(bigram, "--data", corpus, "--sample_every", "10", "--prompt", "ROMEO",
                             "--num_samples", "2", out_dir=tmp_path / "chatty")
    finally:
        bigram.generate = real
    assert code == 0, err
    assert calls == [200, 200, 200, 30, 30]                        # steps 0, 10, 20; then the two at the end
    assert out.count("\nROMEO") >= 4
    assert losses_of(tmp_path / "quiet") == losses_of(tmp_path / "chatty")


def test_full_evaluation_can_be_capped_and_says_so(bigram, corpus, run, tmp_path):
    code, out, err = run(bigram, "--data", corpus, "--max_eval_chars", "100")
    assert code == 0, err
    assert "(100 characters, the first 100 of " in out and run.metrics(bigram)["val_chars"] == 100
    code, out, err = run(bigram, "--evaluate", corpus, "--max_eval_chars", "50", tiny=False,
                         out_dir=tmp_path / "out" / "bigram")
    assert code == 0, err
    assert "50 characters scored (the first 50 of " in out


def test_help_shows_every_setting_s_whole_comment_without_lesson_markers(capsys):
    """Defect: --help cut comments that ran over several lines, and showed markers like NEW (b)."""
    for stage_name in STAGES:
        stage = load_stage(stage_name)
        with pytest.raises(SystemExit):
            stage.main(["--help"])
        text = " ".join(capsys.readouterr().out.split())           # argparse wraps the lines
        assert not re.search(r"\bNEW\b", text)                     # (MAX_NEW_TOKENS is no marker)
        notes = harness.setting_notes(stage)
        assert set(notes) == set(stage.HYPERPARAMETERS) | set(stage.SETTINGS) and all(notes.values())
        for note in notes.values():
            assert " ".join(note.replace("%", "%%").split()) in text.replace("%", "%%"), note
    assert harness.setting_notes(load_stage("bigram"))["block_size"] == "context length; a bigram reads only the " \
        "last character, so here it sets only how many predictions each sequence gives (lecture: 8)"


# ---- Ctrl-C and resume ----

def rising_at_the_end(monkeypatch):
    """The estimate at step 30 made worse by 1: the validation loss falls to its best at step 20,
    then rises, whatever this machine's numerics (a learning rate chosen to make it rise did so on
    one PyTorch and one thread count, not on others)."""
    real = harness.TrainingRun.evaluated
    monkeypatch.setattr(harness.TrainingRun, "evaluated",
                        lambda run, step, losses: real(run, step, dict(losses, val=losses["val"] + (step == 30))))


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    """Each stage's run that never stopped, made once for all the places it is stopped at."""
    return {"folder": tmp_path_factory.mktemp("unbroken")}


@pytest.mark.parametrize("stage_name, stop, extra", [
    ("bigram", 7, []), ("bigram", 20, []), ("bigram", 22, []), ("bigram", 26, []),
    ("gpt", 13, ["--dropout", "0.1"]), ("gpt", 20, ["--dropout", "0.1"])])
def test_resume_after_ctrl_c_at_any_step_ends_as_an_unbroken_run(stage_name, stop, extra, corpus, run, tmp_path,
                                                                   monkeypatch, unbroken):
    """Defect this guards against: an interrupted run's extra evaluation became the best model,
    so the resumed run kept another step than the run that never stopped. This run's validation
    loss rises as well as falls, and Ctrl-C comes between evaluations as well as at one. gpt.py
    adds dropout's random numbers and the learning-rate schedule."""
    stage = load_stage(stage_name)
    whole, broken = unbroken["folder"] / stage_name, tmp_path / "broken"
    rising = ["--max_iters", "30", "--eval_interval", "10", *extra]
    rising_at_the_end(monkeypatch)
    if not whole.exists():
        assert run(stage, "--data", corpus, *rising, out_dir=whole)[0] == 0
    val = [row[2] for row in losses_of(whole)]
    assert any(b > a for a, b in zip(val, val[1:])) and min(val) != val[-1]   # it rises: a real test
    ctrl_c_during_step(stage, monkeypatch, stop)
    code, out, err = run(stage, "--data", corpus, *rising, out_dir=broken)
    monkeypatch.undo()
    rising_at_the_end(monkeypatch)
    assert code == 130 and err == "", err                          # stopped cleanly: no error line
    assert f"interrupted at step {stop}" in out and run.metrics(stage, broken)["interrupted"]
    assert [row[0] for row in losses_of(broken)] == [s for s in (0, 10, 20) if s <= stop]   # scheduled only
    assert torch.load(broken / "last.pt", weights_only=True)["step"] == stop
    code, out, err = run(stage, "--data", corpus, "--resume", "--max_new_tokens", "30", tiny=False, out_dir=broken)
    assert code == 0, err
    assert f"resuming from {broken / 'last.pt'} at step {stop}" in out
    assert losses_of(broken) == losses_of(whole)
    same = ("best_step", "train_loss", "val_loss", "val_loss_estimate", "iters", "interrupted", "sample")
    assert {k: run.metrics(stage, broken)[k] for k in same} == {k: run.metrics(stage, whole)[k] for k in same}
    for a, b in ((weights(broken / "ckpt.pt"), weights(whole / "ckpt.pt")),
                 (weights(broken / "last.pt"), weights(whole / "last.pt"))):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_ctrl_c_quits_at_once_and_damages_nothing(bigram, corpus, run, tmp_path, monkeypatch):
    out_dir = tmp_path / "out" / "bigram"
    ctrl_c_during_step(bigram, monkeypatch, 12, presses=2)         # the second while the first still waits
    code, out, err = run(bigram, "--data", corpus, "--max_iters", "30", "--eval_interval", "1")
    assert code == 130 and err.strip() == "bigram.py: interrupted"
    assert sorted(p.name for p in out_dir.iterdir()) == ["ckpt.pt", "last.pt", "log.csv"]   # no temp files
    assert harness.load_checkpoint(bigram, str(out_dir / "last.pt"), resume=True)["step"] == 11


def test_ctrl_c_while_starting_up_is_one_line_and_writes_nothing(bigram, corpus, run, tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt                                    # what the default handler raises
    monkeypatch.setattr(bigram, "read_text", interrupted)
    code, out, err = run(bigram, "--data", corpus)
    assert code == 130 and err.strip() == "bigram.py: interrupted"
    assert not (tmp_path / "out").exists()


def test_resume_keeps_the_run_s_settings(bigram, corpus, run, tmp_path):
    out_dir = tmp_path / "out" / "bigram"
    assert run(bigram, "--data", corpus, "--max_iters", "20")[0] == 0
    code, out, err = run(bigram, "--data", corpus, "--resume", "--max_iters", "30", tiny=False, out_dir=out_dir)
    assert code == 0, err                                          # the tiny settings: from the checkpoint
    assert "resuming from" in out and run.metrics(bigram)["iters"] == 30 and run.metrics(bigram)["block_size"] == 16
    code, _, err = run(bigram, "--data", corpus, "--resume", "--batch_size", "8", tiny=False, out_dir=out_dir)
    assert code == 1 and err.count("\n") == 1
    assert "--batch_size 8 differs from" in err and "keeps its settings but for max_iters" in err


def test_resuming_with_more_steps_runs_the_extra_ones_at_min_lr(gpt, run, corpus, tmp_path, monkeypatch):
    """The schedule keeps the length the run was started with: no jump back up from min_lr."""
    assert run(gpt, "--data", corpus)[0] == 0                      # 20 steps, its cosine ends at min_lr
    rates, real = [], gpt.get_lr
    monkeypatch.setattr(gpt, "get_lr", lambda step, args: rates.append((step, real(step, args))) or rates[-1][1])
    code, _, err = run(gpt, "--data", corpus, "--resume", "--max_iters", "30", tiny=False,
                       out_dir=tmp_path / "out" / "gpt")
    assert code == 0, err
    assert sorted({step for step, _ in rates}) == list(range(20, 30))   # (once per group of weights)
    assert all(lr == pytest.approx(gpt.LAPTOP["min_lr"]) for _, lr in rates)


def test_best_checkpoint_is_never_replaced_by_a_worse_one(bigram, corpus, run, tmp_path):
    assert run(bigram, "--data", corpus, "--learning_rate", "3", "--max_iters", "40", "--eval_interval", "5")[0] == 0
    log = read_log(tmp_path / "out" / "bigram" / "log.csv")
    checkpoint = torch.load(tmp_path / "out" / "bigram" / "ckpt.pt", weights_only=True)
    best = min(log, key=lambda row: row["val_loss"])
    assert checkpoint["step"] == best["step"] and checkpoint["val_loss"] == best["val_loss"]


def test_import_has_no_side_effects_and_leaves_a_script_its_ctrl_c(tmp_path):
    """Importing the stages writes nothing and downloads nothing. A learner's own script beside
    harness.py keeps its Ctrl-C handler (review finding: it lost KeyboardInterrupt for good): the
    harness lets Ctrl-C end a starting script only while PyTorch loads."""
    (tmp_path / "harness.py").write_text((ROOT / "harness.py").read_text())
    (tmp_path / "explore.py").write_text(
        "import signal, sys\n"
        "def mine(signum, frame): pass\n"
        "signal.signal(signal.SIGINT, mine)\n"
        f"sys.path.append({str(ROOT)!r})\n"
        "import harness, " + ", ".join(STAGES) + "\n"
        "print(signal.getsignal(signal.SIGINT) is mine, harness.__file__.startswith(sys.path[0]))\n")
    done = subprocess.run([sys.executable, "explore.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert done.stdout == "True True\n", done.stderr              # its own handler, as it left it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["explore.py", "harness.py"]   # nothing written


def test_main_leaves_the_caller_s_handler_and_flags_as_they_were(bigram, corpus, run):
    handler, tf32 = signal.getsignal(signal.SIGINT), torch.backends.cuda.matmul.allow_tf32
    assert run(bigram, "--data", corpus)[0] == 0
    assert signal.getsignal(signal.SIGINT) is handler and torch.backends.cuda.matmul.allow_tf32 == tf32


def test_nothing_to_resume_says_so(bigram, corpus, run, tmp_path):
    code, _, err = run(bigram, "--data", corpus, "--resume", out_dir=tmp_path / "empty")
    assert code == 1 and err.count("\n") == 1 and "nothing to resume" in err


# ---- the earlier run, set aside ----

def test_a_new_run_sets_the_earlier_run_aside_all_together_at_its_first_save(bigram, corpus, run, tmp_path,
                                                                              monkeypatch):
    out_dir = tmp_path / "out" / "bigram"
    assert run(bigram, "--data", corpus)[0] == 0
    first = snapshot(out_dir)
    # a new run stopped while it starts, before it saves anything: the earlier run is untouched
    monkeypatch.setattr(bigram, "estimate_loss", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert run(bigram, "--data", corpus, "--seed", "7")[0] == 130
    monkeypatch.undo()
    assert snapshot(out_dir) == first
    code, out, err = run(bigram, "--data", corpus, "--seed", "7")
    assert code == 0, err
    assert f"the earlier run's files in {out_dir} are now in {out_dir / 'previous-1'}" in out
    assert snapshot(out_dir / "previous-1") == first and (out_dir / "ckpt.pt").read_bytes() != first["ckpt.pt"]
    assert (out_dir / "previous-1").stat().st_mode & 0o777 == 0o755   # as readable as the files in it


def test_no_earlier_run_is_ever_deleted_by_a_later_one(bigram, corpus, run, tmp_path, monkeypatch):
    """Defect: run A finished; run B was stopped by Ctrl-C; run C started: A's model was deleted,
    and previous/ held B. Now every earlier run keeps a folder of its own."""
    out_dir = tmp_path / "out" / "bigram"
    assert run(bigram, "--data", corpus)[0] == 0                   # A
    a = snapshot(out_dir)
    ctrl_c_during_step(bigram, monkeypatch, 15)
    assert run(bigram, "--data", corpus, "--seed", "2")[0] == 130  # B, interrupted
    monkeypatch.undo()
    b = snapshot(out_dir)
    code, _, err = run(bigram, "--data", corpus, "--learning_rate", "1e20")   # C: diverges
    assert "diverged" in err
    c = snapshot(out_dir)
    assert run(bigram, "--data", corpus, "--seed", "3")[0] == 0    # D
    assert [snapshot(out_dir / f"previous-{n}") for n in (1, 2, 3)] == [a, b, c]
    assert sorted(b) == ["ckpt.pt", "last.pt", "log.csv", "metrics.json"] and sorted(c) == ["ckpt.pt", "last.pt",
                                                                                            "log.csv"]


def test_a_crash_while_setting_aside_is_undone_and_resume_finds_the_earlier_run(bigram, corpus, run, tmp_path,
                                                                              monkeypatch):
    out_dir = tmp_path / "out" / "bigram"
    assert run(bigram, "--data", corpus, "--max_iters", "20")[0] == 0
    first = snapshot(out_dir)
    real_replace, moves = os.replace, [0]

    def crash_after_two_moves(src, dst):                           # a kill -9 half way through the move
        moves[0] += 1
        if moves[0] == 3:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(harness.os, "replace", crash_after_two_moves)
    assert run(bigram, "--data", corpus, "--seed", "7")[0] == 130
    monkeypatch.undo()
    assert [p.name for p in out_dir.iterdir() if p.name.startswith(".previous-")]   # half done
    code, out, err = run(bigram, "--data", corpus, "--resume", "--max_iters", "30", tiny=False, out_dir=out_dir)
    assert code == 0, err
    assert "at step 20" in out and not [p for p in out_dir.iterdir() if p.name.startswith(".")]
    assert not (out_dir / "previous-1").exists() and len(first) == 4


# ---- gpt.py's presets ----

@pytest.mark.parametrize("bf16, dtype, preset", [(True, None, "laptop"), (False, None, "laptop-float32"),
                                                 (True, "float32", "laptop-float32")])
def test_without_a_gpu_the_preset_follows_the_precision_and_says_what_it_applies(gpt, bf16, dtype, preset,
                                                                                 capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16, raising=False)
    argv = ["--n_layer", "3", "--out_dir", str(tmp_path / "out")] + (["--dtype", dtype] if dtype else [])
    args = harness.parse_args(gpt, argv)
    harness.configure(gpt, args, torch.device("cpu"))
    harness.unlock(args.out_dir)
    said = capsys.readouterr().out
    assert f"no CUDA GPU: preset {preset}, in " in said
    assert f"full configuration): batch_size {gpt.PRESETS[preset]['batch_size']}, " in said
    assert "n_layer" not in said                                   # the command line's, not the preset's
    assert (args.preset, args.n_layer, args.max_iters) == (preset, 3, gpt.PRESETS[preset]["max_iters"])


def test_a_gpu_takes_the_full_configuration(gpt, no_tf32, monkeypatch):   # configure() turns TF32 on
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))   # an A100
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    args = harness.parse_args(gpt, ["--sample"])
    harness.configure(gpt, args, torch.device("cuda"))
    assert (args.n_embd, args.preset) == (gpt.HYPERPARAMETERS["n_embd"], "full") == (384, "full")


def test_context_of_one_character(gpt, run, corpus):
    code, out, err = run(gpt, "--data", corpus, "--block_size", "1")
    assert code == 0, err


# ---- in a notebook ----

def test_the_readme_s_lines_for_a_notebook_run_as_written(corpus, run, tmp_path, monkeypatch):
    """After python gpt.py (here tiny, into out/gpt of a scratch folder): load, sample, attention."""
    gpt = load_stage("gpt")
    monkeypatch.chdir(tmp_path)
    corpus.write_text(corpus.read_text() + "\nROMEO:\nWhat light through yonder window breaks?\n")
    assert run(gpt, "--data", corpus, "--block_size", "32", out_dir="out/gpt")[0] == 0
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert "harness.load(gpt)" in block
    printed = []
    namespace = {"print": printed.append}
    exec(compile(block, "README.md", "exec"), namespace)
    assert printed and printed[0].startswith("ROMEO:")
    layers = namespace["weights"]
    assert len(layers) == 2 and layers[0].shape[0] == 2           # two layers of two heads, tiny
    T = layers[0].shape[-1]
    assert torch.allclose(layers[0].sum(-1), torch.ones(2, T), atol=1e-5)


def test_the_notebook_lines_take_what_they_say(corpus, run, tmp_path):
    bigram = load_stage("bigram")
    assert run(bigram, "--data", corpus)[0] == 0
    trained = harness.load(bigram, tmp_path / "out" / "bigram")
    assert trained.sample("ROMEO", 0) == "ROMEO" and len(trained.sample("ROMEO", 7)) == 12
    with pytest.raises(harness.CLIError, match="device must be auto, cpu, cuda or mps, not 'gpu'"):
        harness.load(bigram, tmp_path / "out" / "bigram", device="gpu")
    with pytest.raises(harness.CLIError, match="this model has no attention"):
        trained.attention("ROMEO")
    for wrong in (dict(max_new_tokens=5.5), dict(max_new_tokens=-3), dict(seed=2 ** 64)):
        with pytest.raises(harness.CLIError, match="must be a whole number from 0 to 2"):
            trained.sample("ROMEO", **{"max_new_tokens": 5, **wrong})
    with pytest.raises(harness.CLIError, match="no checkpoint at -x"):
        harness.load(bigram, "-x")                                 # a folder's name, not an option
    assert trained.args.preset is None and trained.args.saved_step == 20
