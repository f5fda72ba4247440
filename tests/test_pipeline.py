"""What every stage shares: the tokenizer, batches, training, checkpoints, sampling, resume."""
import argparse
import csv
import math
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ENDS, SCRATCH, ctrl_c_during_step, tiny_args


def read_log(path):
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def losses_of(path):
    """log.csv without the times: (step, train loss, val loss) per evaluation."""
    return [(row["step"], row["train_loss"], row["val_loss"]) for row in read_log(path / "log.csv")]


def test_the_tests_lock_a_scratch_folder_not_the_repository_s_out(stage):
    """configure() locks out_dir for training: the tests' settings must not claim out/<stage>,
    where a learner's run may be going (and where parallel test workers met)."""
    assert Path(tiny_args(stage).out_dir).resolve().is_relative_to(SCRATCH["folder"].resolve())


def test_encode_decode_round_trip_and_the_fast_path_agrees(stage):
    text = "Hello, wörld! ünïcode ✓\n"
    tokenizer = stage.CharTokenizer("".join(sorted(set(text))))
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and tokenizer.chars == "".join(sorted(set(text)))
    assert tokenizer.stoi["H"] == ids[0] and tokenizer.chars[ids[0]] == "H"
    fast = stage.encode_corpus(tokenizer, text)
    assert fast.tolist() == ids and fast.dtype == np.uint8        # the smallest type that holds them


@ENDS
def test_large_vocabulary_uses_wider_ids(stage):
    text = "".join(chr(0x4E00 + i) for i in range(300))
    tokenizer = stage.CharTokenizer(text)
    assert stage.encode_corpus(tokenizer, text).dtype == np.uint16
    assert tokenizer.decode(stage.encode_corpus(tokenizer, text)) == text


@ENDS
def test_unknown_characters_are_named_or_skipped(stage):
    tokenizer = stage.CharTokenizer("abc")
    with pytest.raises(stage.CLIError, match="'xz'"):
        stage.encode_corpus(tokenizer, "axbz")
    assert tokenizer.decode(stage.encode_corpus(tokenizer, "axbz", skip_unknown=True)) == "ab"


def test_targets_are_inputs_shifted_by_one(stage):
    data = np.arange(100, dtype=np.uint8)                          # the text 0, 1, 2, ...: easy to check
    x, y = stage.get_batch(data, argparse.Namespace(batch_size=8, block_size=10), torch.device("cpu"))
    assert x.shape == y.shape == (8, 10)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert int(y.max()) <= 99


def test_initial_loss_is_near_ln_vocab(stage):
    args = tiny_args(stage)
    torch.manual_seed(0)
    model = stage.make_model(65, args)
    _, loss = model(torch.randint(65, (8, args.block_size)), torch.randint(65, (8, args.block_size)))
    assert abs(loss.item() - math.log(65)) < 0.3


def test_full_loss_scores_every_character_once(stage):
    args = tiny_args(stage)
    model = stage.make_model(10, args)
    data = np.random.default_rng(0).integers(0, 10, 101).astype(np.uint8)   # 100 targets, block 16
    nats, count = stage.full_loss(model, data, args, torch.device("cpu"))
    assert count == 100
    total = 0.0                                                    # the same sum, window by window
    for start in range(0, 100, args.block_size):
        chunk = torch.from_numpy(data[start:min(start + args.block_size, 100) + 1].astype(np.int64))[None]
        logits, _ = model(chunk[:, :-1])
        total += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
    assert nats == pytest.approx(total / 100, rel=1e-5)


def test_training_lowers_the_loss_and_writes_its_outputs(stage, corpus, run, tmp_path):
    code, out, err = run(stage, "--data", corpus, "--max_iters", "40")
    assert code == 0, err
    out_dir = tmp_path / "out" / stage.STAGE
    log = read_log(out_dir / "log.csv")
    assert [row["step"] for row in log] == [0, 10, 20, 30, 40]
    assert log[-1]["train_loss"] < log[0]["train_loss"] - 0.5
    metrics = run.metrics(stage)
    for key in ("stage", "params", "iters", "train_loss", "val_loss", "val_bpc", "tokens_per_sec", "seconds",
                "device", "batch_size", "block_size", "learning_rate", "interrupted", "warning"):
        assert key in metrics
    assert metrics["stage"] == stage.STAGE and metrics["iters"] == 40 and not metrics["interrupted"]
    assert metrics["val_bpc"] == pytest.approx(metrics["val_loss"] / math.log(2))
    best = min(log, key=lambda row: row["val_loss"])              # the best estimate is the one kept
    assert metrics["best_step"] == best["step"] and metrics["train_loss"] == pytest.approx(best["train_loss"])
    assert "full val loss" in out and "bits per character" in out
    assert sorted(p.name for p in out_dir.iterdir()) == ["ckpt.pt", "last.pt", "log.csv", "metrics.json"]


def test_same_seed_same_run_other_seed_other_run(stage, corpus, run, tmp_path):
    results = []
    for seed, name in ((1, "a"), (1, "b"), (2, "c")):
        code, out, err = run(stage, "--data", corpus, "--seed", seed, out_dir=tmp_path / name)
        assert code == 0, err
        results.append((losses_of(tmp_path / name), run.metrics(stage, tmp_path / name)["sample"]))
    assert results[0] == results[1]
    assert results[0][0] != results[2][0] and results[0][1] != results[2][1]


def test_checkpoint_round_trip_gives_the_same_sample_and_loss(stage, corpus, run, tmp_path):
    assert run(stage, "--data", corpus)[0] == 0
    out_dir = tmp_path / "out" / stage.STAGE
    code, out, err = run(stage, "--sample", "--max_new_tokens", "30", tiny=False, out_dir=out_dir)
    assert code == 0, err
    assert out.rstrip("\n") == run.metrics(stage)["sample"].rstrip("\n")
    text = corpus.read_text(encoding="utf-8")
    val = tmp_path / "val.txt"
    val.write_text(text[int(0.9 * len(text)):], encoding="utf-8")
    code, out, err = run(stage, "--evaluate", val, tiny=False, out_dir=out_dir)
    assert code == 0, err
    assert f"loss {run.metrics(stage)['val_loss']:.4f} nats" in out
    assert "perplexity" in out and f"{len(val.read_text()) - 1:,} characters scored" in out


def test_sampling_options(stage, corpus, run, tmp_path):
    assert run(stage, "--data", corpus)[0] == 0
    out_dir = tmp_path / "out" / stage.STAGE
    greedy = [run(stage, "--sample", "--temperature", "0", "--seed", s, "--prompt", "ROMEO:", tiny=False,
                  out_dir=out_dir)[1] for s in (1, 2)]
    assert greedy[0] == greedy[1] and greedy[0].startswith("ROMEO:")   # greedy ignores the seed
    code, out, _ = run(stage, "--sample", "--top_k", "1", "--num_samples", "2", "--max_new_tokens", "5",
                       tiny=False, out_dir=out_dir)
    first, second = out.split("-" * 40)
    assert code == 0 and first.strip() == second.strip()           # top_k 1 is greedy too
    code, out, _ = run(stage, "--sample", "--top_k", "1000", "--top_p", "0.5", "--max_new_tokens", "5",
                       tiny=False, out_dir=out_dir)
    assert code == 0 and len(out) == len("\n") + 5 + 1


@ENDS
def test_top_k_and_top_p_keep_the_smallest_likely_set(stage):
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    nucleus = argparse.Namespace(temperature=1.0, top_k=None, top_p=0.7)
    assert {stage.sample_next(logits, nucleus, generator).item() for _ in range(200)} == {0, 1}
    two = argparse.Namespace(temperature=1.0, top_k=2, top_p=1.0)
    assert {stage.sample_next(logits, two, generator).item() for _ in range(200)} == {0, 1}
    halves = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))           # the first alone makes up 0.5
    exactly = argparse.Namespace(temperature=1.0, top_k=None, top_p=0.5)
    assert {stage.sample_next(halves, exactly, generator).item() for _ in range(50)} == {0}


@ENDS
def test_a_temperature_too_small_for_float32_is_greedy(stage):
    """CUDA flushes float32 numbers below 1.2e-38 to zero, so that dividing by such a temperature
    gave 0/0 = nan and a device-side assertion; flushing denormals on the CPU shows the same."""
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    before = torch.set_flush_denormal(True)
    try:
        picks = [stage.sample_next(logits, argparse.Namespace(temperature=t, top_k=None, top_p=1.0), None)
                 for t in (1e-45, 1e-39)]
    finally:
        torch.set_flush_denormal(False)
    assert before and [p.item() for p in picks] == [1, 1]


# ---- Ctrl-C and resume ----

def weights(path):
    return torch.load(path, weights_only=True)["model"]


# learning rates at which each stage's validation loss falls to a best at step 20, then rises
RISING_LR = {"bigram": "3", "single_attention": "0.1", "multi_head_attn": "0.1", "gpt": "0.3"}


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    """Each stage's run that never stopped, made once for all the places it is stopped at."""
    return {"folder": tmp_path_factory.mktemp("unbroken")}


@pytest.mark.parametrize("stop", [7, 20, 22, 26])
def test_resume_after_ctrl_c_at_any_step_ends_as_an_unbroken_run(stage, corpus, run, tmp_path, monkeypatch,
                                                                   stop, unbroken):
    """Defect this guards against: an interrupted run's extra evaluation became the best model,
    so the resumed run kept another step than the run that never stopped. This run's validation
    loss rises as well as falls, and Ctrl-C comes between evaluations as well as at one."""
    whole, broken = unbroken["folder"] / stage.STAGE, tmp_path / "broken"
    RISING = ["--learning_rate", RISING_LR[stage.STAGE], "--max_iters", "30", "--eval_interval", "10"]
    if not whole.exists():
        assert run(stage, "--data", corpus, *RISING, out_dir=whole)[0] == 0
    val = [row[2] for row in losses_of(whole)]
    assert any(b > a for a, b in zip(val, val[1:])) and min(val) != val[-1]   # it rises: a real test
    ctrl_c_during_step(stage, monkeypatch, stop)
    code, out, err = run(stage, "--data", corpus, *RISING, out_dir=broken)
    monkeypatch.undo()
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


@ENDS
def test_a_second_ctrl_c_quits_at_once_and_damages_nothing(stage, corpus, run, tmp_path, monkeypatch):
    out_dir = tmp_path / "out" / stage.STAGE
    ctrl_c_during_step(stage, monkeypatch, 12, presses=2)          # the second while the first still waits
    code, out, err = run(stage, "--data", corpus, "--max_iters", "30", "--eval_interval", "1")
    assert code == 130 and err.strip() == f"{stage.STAGE}.py: interrupted"
    assert sorted(p.name for p in out_dir.iterdir()) == ["ckpt.pt", "last.pt", "log.csv"]   # no temp files
    assert stage.load_checkpoint(str(out_dir / "last.pt"), for_resume=True)["step"] == 11


@ENDS
def test_ctrl_c_while_starting_up_is_one_line_and_writes_nothing(stage, corpus, run, tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt                                    # what the default handler raises
    monkeypatch.setattr(stage, "read_text", interrupted)
    code, out, err = run(stage, "--data", corpus)
    assert code == 130 and err.strip() == f"{stage.STAGE}.py: interrupted"
    assert not (tmp_path / "out").exists()


@ENDS
def test_resume_keeps_the_run_s_settings(stage, corpus, run, tmp_path):
    out_dir = tmp_path / "out" / stage.STAGE
    assert run(stage, "--data", corpus, "--max_iters", "20")[0] == 0
    code, out, err = run(stage, "--data", corpus, "--resume", "--max_iters", "30", tiny=False, out_dir=out_dir)
    assert code == 0, err                                          # the tiny settings: from the checkpoint
    assert "resuming from" in out and run.metrics(stage)["iters"] == 30 and run.metrics(stage)["block_size"] == 16
    code, _, err = run(stage, "--data", corpus, "--resume", "--batch_size", "8", tiny=False, out_dir=out_dir)
    assert code == 1 and err.count("\n") == 1
    assert "--batch_size 8 differs from" in err and "keeps its settings but for max_iters" in err


def test_best_checkpoint_is_never_replaced_by_a_worse_one(stage, corpus, run, tmp_path):
    assert run(stage, "--data", corpus, "--learning_rate", "3", "--max_iters", "40", "--eval_interval", "5")[0] == 0
    log = read_log(tmp_path / "out" / stage.STAGE / "log.csv")
    checkpoint = torch.load(tmp_path / "out" / stage.STAGE / "ckpt.pt", weights_only=True)
    best = min(log, key=lambda row: row["val_loss"])
    assert checkpoint["step"] == best["step"] and checkpoint["val_loss"] == best["val_loss"]


def test_import_has_no_side_effects(tmp_path):
    import subprocess
    from conftest import ROOT, STAGES
    code = "; ".join(f"import {name}" for name in STAGES) + "; import signal; " \
        "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler"
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); {code}"],
                   cwd=tmp_path, check=True, timeout=60)
    assert list(tmp_path.iterdir()) == []                          # nothing downloaded or written


@ENDS
def test_main_leaves_the_caller_s_handler_and_flags_as_they_were(stage, corpus, run):
    handler, tf32 = signal.getsignal(signal.SIGINT), torch.backends.cuda.matmul.allow_tf32
    assert run(stage, "--data", corpus)[0] == 0
    assert signal.getsignal(signal.SIGINT) is handler and torch.backends.cuda.matmul.allow_tf32 == tf32


def test_samples_during_training_leave_the_run_unchanged(stage, corpus, run, tmp_path):
    assert run(stage, "--data", corpus, out_dir=tmp_path / "quiet")[0] == 0
    code, out, err = run(stage, "--data", corpus, "--sample_every", "10", "--prompt", "ROMEO",
                         out_dir=tmp_path / "chatty")
    assert code == 0, err
    assert out.count("\nROMEO") >= 3                               # at steps 0, 10, 20, and the final one
    assert losses_of(tmp_path / "quiet") == losses_of(tmp_path / "chatty")


@ENDS
def test_full_evaluation_can_be_capped_and_says_so(stage, corpus, run, tmp_path):
    code, out, err = run(stage, "--data", corpus, "--max_eval_chars", "100")
    assert code == 0, err
    assert "(100 characters, the first 100 of " in out and run.metrics(stage)["val_chars"] == 100
    code, out, err = run(stage, "--evaluate", corpus, "--max_eval_chars", "50", tiny=False,
                         out_dir=tmp_path / "out" / stage.STAGE)
    assert code == 0, err
    assert "50 characters scored (the first 50 of " in out


@ENDS
def test_a_new_run_moves_the_earlier_run_aside_all_together_at_its_first_save(stage, corpus, run, tmp_path,
                                                                              monkeypatch):
    out_dir = tmp_path / "out" / stage.STAGE
    assert run(stage, "--data", corpus)[0] == 0
    first = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    # a new run stopped while it starts, before it saves anything: the earlier run is untouched
    monkeypatch.setattr(stage, "estimate_loss", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert run(stage, "--data", corpus, "--seed", "7")[0] == 130
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == first
    code, out, err = run(stage, "--data", corpus, "--seed", "7")
    assert code == 0, err
    assert "earlier run's files" in out
    assert {p.name: p.read_bytes() for p in (out_dir / "previous").iterdir()} == first
    assert (out_dir / "ckpt.pt").read_bytes() != first["ckpt.pt"]


@ENDS
def test_a_crash_while_moving_aside_is_undone_and_resume_finds_the_earlier_run(stage, corpus, run, tmp_path,
                                                                              monkeypatch):
    out_dir = tmp_path / "out" / stage.STAGE
    assert run(stage, "--data", corpus, "--max_iters", "20")[0] == 0
    first = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    real_replace, moves = os.replace, [0]

    def crash_after_two_moves(src, dst):                           # a kill -9 half way through the move
        moves[0] += 1
        if moves[0] == 3:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(stage.os, "replace", crash_after_two_moves)
    assert run(stage, "--data", corpus, "--seed", "7")[0] == 130
    monkeypatch.undo()
    code, out, err = run(stage, "--data", corpus, "--resume", "--max_iters", "30", tiny=False, out_dir=out_dir)
    assert code == 0, err
    assert "at step 20" in out and not [p for p in out_dir.iterdir() if p.name.startswith(".")]
    assert (out_dir / "previous").exists() is False and len(first) == 4


@ENDS
def test_nothing_to_resume_says_so(stage, corpus, run, tmp_path):
    code, _, err = run(stage, "--data", corpus, "--resume", out_dir=tmp_path / "empty")
    assert code == 1 and err.count("\n") == 1 and "nothing to resume" in err
