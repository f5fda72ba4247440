"""The scaffolding every stage shares: data, batches, training, checkpoints, sampling."""
import csv
import math
import sys

import numpy as np
import pytest
import torch

from conftest import TINY, TINY_MODEL, make_text


def tiny_args(stage, corpus, *extra):
    args = stage.parse_args(TINY + TINY_MODEL[stage.STAGE] + ["--data", str(corpus), *extra])
    stage.fill_defaults(args, torch.device("cpu"))
    return args


def read_log(path):
    with open(path, newline="") as f:
        return [[float(v) for v in row] for row in list(csv.reader(f))[1:]]


def test_encode_decode_round_trip(stage):
    text = "Hello, wörld! ünïcode ✓\n"
    tokenizer = stage.CharTokenizer.from_text(text)
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert ids.dtype == np.uint8                                   # the smallest type that holds the vocabulary
    assert tokenizer.chars == "".join(sorted(set(text)))


def test_large_vocabulary_uses_wider_ids(stage):
    text = "".join(chr(0x4E00 + i) for i in range(300))
    tokenizer = stage.CharTokenizer.from_text(text)
    assert tokenizer.encode(text).dtype == np.uint16
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_unknown_characters_are_named_or_skipped(stage):
    tokenizer = stage.CharTokenizer.from_text("abc")
    with pytest.raises(stage.CLIError, match="'xz'"):
        tokenizer.encode("axbz")
    assert tokenizer.decode(tokenizer.encode("axbz", skip_unknown=True)) == "ab"


def test_targets_are_inputs_shifted_by_one(stage):
    data = np.arange(100, dtype=np.uint8)                          # the text 0, 1, 2, ...: easy to check
    x, y = stage.get_batch(data, 8, 10, torch.device("cpu"))
    assert x.shape == y.shape == (8, 10)
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y[:, -1], x[:, -1] + 1)
    assert int(y.max()) <= 99


def test_initial_loss_is_near_ln_vocab(stage, corpus):
    args = tiny_args(stage, corpus)
    torch.manual_seed(0)
    model = stage.make_model(65, args)
    x = torch.randint(65, (8, args.block_size))
    _, loss = model(x, torch.randint(65, (8, args.block_size)))
    assert abs(loss.item() - math.log(65)) < 0.3


def test_exact_loss_scores_every_character_once(stage, corpus):
    args = tiny_args(stage, corpus)
    model = stage.make_model(10, args)
    data = np.random.default_rng(0).integers(0, 10, 101).astype(np.uint8)   # 100 targets, block 16: a short tail
    nats, count = stage.exact_loss(model, data, args, torch.device("cpu"))
    assert count == 100
    # the same sum, window by window, by hand
    total = 0.0
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
    assert [row[0] for row in log] == [0, 10, 20, 30, 40]
    assert log[-1][1] < log[0][1] - 0.5                            # train loss fell
    metrics = run.metrics(stage)
    for key in ("stage", "params", "iters", "train_loss", "val_loss", "val_bpc", "tokens_per_sec", "seconds",
                "device", "batch_size", "block_size", "learning_rate"):
        assert key in metrics
    assert metrics["stage"] == stage.STAGE and metrics["iters"] == 40
    assert metrics["val_bpc"] == pytest.approx(metrics["val_loss"] / math.log(2))
    best = min(log, key=lambda row: row[2])                        # the best estimate is the one kept
    assert metrics["best_step"] == best[0]
    assert "exact val loss" in out and "bits per character" in out
    assert sorted(p.name for p in out_dir.iterdir()) == ["ckpt.pt", "last.pt", "log.csv", "metrics.json"]


def test_same_seed_same_run_other_seed_other_run(stage, corpus, run, tmp_path):
    results = []
    for seed, name in ((1, "a"), (1, "b"), (2, "c")):
        code, out, err = run(stage, "--data", corpus, "--seed", seed, out_dir=tmp_path / name)
        assert code == 0, err
        results.append(([row[:3] for row in read_log(tmp_path / name / "log.csv")], run.metrics(stage, tmp_path / name)["sample"]))
    assert results[0] == results[1]
    assert results[0][0] != results[2][0] and results[0][1] != results[2][1]


def test_checkpoint_round_trip_gives_the_same_sample(stage, corpus, run, tmp_path):
    assert run(stage, "--data", corpus)[0] == 0
    trained_sample = run.metrics(stage)["sample"]
    code, out, err = run(stage, "--sample", "--max_new_tokens", "30", "--dtype", "float32", tiny=False,
                         out_dir=tmp_path / "out" / stage.STAGE)
    assert code == 0, err
    assert out.rstrip("\n") == trained_sample.rstrip("\n")
    # and the saved model scores the validation split exactly as the training run did
    text = corpus.read_text(encoding="utf-8")
    val = tmp_path / "val.txt"
    val.write_text(text[int(0.9 * len(text)):], encoding="utf-8")
    code, out, err = run(stage, "--evaluate", val, tiny=False, out_dir=tmp_path / "out" / stage.STAGE)
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


def test_top_p_keeps_the_smallest_likely_set(stage):
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    picks = {stage.sample_next(logits, 1.0, None, 0.7, generator).item() for _ in range(200)}
    assert picks == {0, 1}                                         # 0.5 + 0.3 reach 0.7; the rest never
    picks = {stage.sample_next(logits, 1.0, 2, 1.0, generator).item() for _ in range(200)}
    assert picks == {0, 1}


class Interrupt:
    """Raises KeyboardInterrupt, as a Ctrl-C would, at the n-th call of a wrapped function."""

    def __init__(self, function, n, only_from=None):
        self.function, self.n, self.only_from, self.calls = function, n, only_from, 0

    def __call__(self, *args, **kwargs):
        if self.only_from is None or sys._getframe(1).f_code.co_name == self.only_from:
            self.calls += 1
            if self.calls == self.n:
                raise KeyboardInterrupt
        return self.function(*args, **kwargs)


def steps_and_losses(path):
    return [row[:3] for row in read_log(path / "log.csv")]


@pytest.mark.parametrize("where", ["mid-step", "after the step", "while saving", "final evaluation"])
def test_interrupt_keeps_the_work_and_resume_matches_an_unbroken_run(stage, corpus, run, tmp_path, monkeypatch,
                                                                      where):
    assert run(stage, "--data", corpus, "--max_iters", "30", out_dir=tmp_path / "whole")[0] == 0
    if where == "mid-step":                                        # a training batch, not an estimate's
        monkeypatch.setattr(stage, "get_batch", Interrupt(stage.get_batch, 18, only_from="train"))
    elif where == "after the step":                                # just after step += 1
        monkeypatch.setattr(stage, "tqdm", lambda *a, **k: type("Bar", (), {
            "update": Interrupt(lambda n: None, 17), "write": print, "close": lambda self: None,
            "set_postfix": lambda self, **k: None})())
    elif where == "while saving":                                  # the first save of ckpt.pt
        monkeypatch.setattr(stage, "save_checkpoint", Interrupt(stage.save_checkpoint, 1))
    else:                                                          # the estimate at the last step
        monkeypatch.setattr(stage, "estimate_loss", Interrupt(stage.estimate_loss, 4))
    code, out, err = run(stage, "--data", corpus, "--max_iters", "30", out_dir=tmp_path / "broken")
    monkeypatch.undo()
    assert code == 0, err
    assert "interrupted at step" in out
    metrics = run.metrics(stage, tmp_path / "broken")
    assert (tmp_path / "broken" / "ckpt.pt").exists() and metrics["sample"]
    steps = [row[0] for row in read_log(tmp_path / "broken" / "log.csv")]
    assert len(steps) == len(set(steps))                           # each step logged once
    if where != "final evaluation":
        assert metrics["iters"] == {"mid-step": 17, "after the step": 17, "while saving": 0}[where]
        code, out, err = run(stage, "--data", corpus, "--max_iters", "30", "--resume", out_dir=tmp_path / "broken")
        assert code == 0, err
    assert steps_and_losses(tmp_path / "broken") == steps_and_losses(tmp_path / "whole")
    assert run.metrics(stage, tmp_path / "broken")["val_loss"] == run.metrics(stage, tmp_path / "whole")["val_loss"]


def test_resume_keeps_the_run_s_settings(stage, corpus, run, tmp_path):
    assert run(stage, "--data", corpus, "--max_iters", "20")[0] == 0
    # without the tiny settings on the command line: they come from the checkpoint
    code, out, err = run(stage, "--data", corpus, "--resume", "--max_iters", "30", tiny=False,
                         out_dir=tmp_path / "out" / stage.STAGE)
    assert code == 0, err
    assert "resuming from" in out and run.metrics(stage)["iters"] == 30
    assert run.metrics(stage)["block_size"] == 16
    code, _, err = run(stage, "--data", corpus, "--resume", "--batch_size", "8", tiny=False,
                       out_dir=tmp_path / "out" / stage.STAGE)
    assert code == 1 and err.count("\n") == 1
    assert "--batch_size 8 differs from" in err and "keeps its settings but for max_iters" in err


def test_best_checkpoint_is_never_replaced_by_a_worse_one(stage, corpus, run, tmp_path):
    # a learning rate this large makes the loss jump around: later estimates are often worse
    assert run(stage, "--data", corpus, "--learning_rate", "3", "--max_iters", "40", "--eval_interval", "5")[0] == 0
    log = read_log(tmp_path / "out" / stage.STAGE / "log.csv")
    checkpoint = torch.load(tmp_path / "out" / stage.STAGE / "ckpt.pt", weights_only=True)
    assert checkpoint["step"] == min(log, key=lambda row: row[2])[0]
    assert checkpoint["best_val_loss"] == min(row[2] for row in log)


def test_import_has_no_side_effects(tmp_path):
    import subprocess
    import sys
    from conftest import ROOT, STAGES
    code = "; ".join(f"import {name}" for name in STAGES)
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); {code}"],
                   cwd=tmp_path, check=True, timeout=60)
    assert list(tmp_path.iterdir()) == []                          # nothing downloaded or written


def test_samples_during_training_leave_the_run_unchanged(stage, corpus, run, tmp_path):
    assert run(stage, "--data", corpus, out_dir=tmp_path / "quiet")[0] == 0
    code, out, err = run(stage, "--data", corpus, "--sample_every", "10", "--prompt", "ROMEO", out_dir=tmp_path / "chatty")
    assert code == 0, err
    assert out.count("\nROMEO") >= 3                               # at steps 0, 10, 20, and the final sample
    # sampling has its own random generator: the training run itself is the same
    assert [row[:3] for row in read_log(tmp_path / "quiet" / "log.csv")] == \
        [row[:3] for row in read_log(tmp_path / "chatty" / "log.csv")]


def test_exact_evaluation_can_be_capped_and_says_so(stage, corpus, run, tmp_path):
    code, out, err = run(stage, "--data", corpus, "--max_eval_chars", "100")
    assert code == 0, err
    assert "(100 characters, the first 100 of " in out and run.metrics(stage)["val_chars"] == 100
    code, out, err = run(stage, "--evaluate", corpus, "--max_eval_chars", "50", tiny=False,
                         out_dir=tmp_path / "out" / stage.STAGE)
    assert code == 0, err
    assert "50 characters scored (the first 50 of " in out


def test_a_new_run_keeps_the_earlier_run_s_model(stage, corpus, run, tmp_path):
    out_dir = tmp_path / "out" / stage.STAGE
    assert run(stage, "--data", corpus)[0] == 0
    first = (out_dir / "ckpt.pt").read_bytes()
    code, out, err = run(stage, "--data", corpus, "--seed", "7")
    assert code == 0, err
    assert "the model of an earlier run, is now" in out
    assert (out_dir / "previous.pt").read_bytes() == first and (out_dir / "ckpt.pt").read_bytes() != first
