"""Faults from outside: a full disk, a read-only folder, a killed run's leftovers, divergence,
two runs in one folder, checkpoints that load but are wrong. Each ends in one line, never a
traceback, and never costs a good checkpoint."""
import errno
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ATTENTION_STAGES, ENDS, STAGES, load_stage, tiny_args
from test_bad_input import assert_one_line_error

gpt = load_stage("gpt")


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@ENDS
def test_a_full_disk_is_one_line_naming_the_folder_and_the_earlier_checkpoint_survives(stage, corpus, run,
                                                                                        tmp_path, monkeypatch):
    out_dir = tmp_path / "out" / stage.STAGE
    assert run(stage, "--data", corpus, "--max_iters", "10")[0] == 0
    kept = (out_dir / "ckpt.pt").read_bytes()
    real_fdopen, opened = os.fdopen, [0]

    class FullDisk:                                                # a file that fills the disk half way
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fdopen(fd, *args, **kwargs):
        opened[0] += 1                                             # the lock, then a checkpoint
        f = real_fdopen(fd, *args, **kwargs)
        return FullDisk(f) if opened[0] >= 2 else f

    monkeypatch.setattr(stage.os, "fdopen", fdopen)
    code, _, err = run(stage, "--data", corpus, "--resume", "--max_iters", "30", tiny=False, out_dir=out_dir)
    monkeypatch.undo()
    assert_one_line_error(code, err, f"cannot write to {out_dir}", "No space left on device")
    assert (out_dir / "ckpt.pt").read_bytes() == kept
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".tmp-")]


@ENDS
def test_a_read_only_out_dir_is_found_before_training(stage, corpus, run, tmp_path, monkeypatch):
    out_dir = tmp_path / "out" / stage.STAGE
    assert run(stage, "--data", corpus, "--max_iters", "10")[0] == 0
    before = snapshot(out_dir)
    real_open, steps = os.open, []

    def read_only(path, *args, **kwargs):                          # what chmod a-w does, even for root
        if str(path).startswith(str(out_dir)) and args and args[0] & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(stage.os, "open", read_only)
    monkeypatch.setattr(stage, "get_batch", lambda *a, **k: steps.append(1))
    code, _, err = run(stage, "--data", corpus, "--resume", "--max_iters", "1500", tiny=False, out_dir=out_dir)
    monkeypatch.undo()
    assert_one_line_error(code, err, f"cannot write to {out_dir}", "Permission denied")
    assert steps == [] and snapshot(out_dir) == before


@ENDS
def test_leftovers_of_a_killed_run_are_tidied_and_nothing_else(stage, corpus, run, tmp_path):
    out_dir = tmp_path / "out" / stage.STAGE
    out_dir.mkdir(parents=True)
    (out_dir / ".tmp-abc123").write_bytes(b"half a checkpoint")    # what atomic_write leaves at kill -9
    (out_dir / "run.lock").write_text("999999999\n")               # the killed run's lock
    (out_dir / "notes.txt").write_text("mine")
    (out_dir / ".tmpfile").write_text("not ours either")
    assert run(stage, "--data", corpus)[0] == 0
    assert sorted(p.name for p in out_dir.iterdir()) == [".tmpfile", "ckpt.pt", "last.pt", "log.csv",
                                                          "metrics.json", "notes.txt"]


@ENDS
def test_a_second_run_into_a_folder_in_use_is_refused(stage, corpus, run, tmp_path):
    out_dir = tmp_path / "out" / stage.STAGE
    assert run(stage, "--data", corpus)[0] == 0
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out_dir / "run.lock").write_text(f"{other.pid}\n")         # a live run holds the folder
        before = snapshot(out_dir)
        for argv in (["--data", corpus], ["--data", corpus, "--resume"]):
            code, _, err = run(stage, *argv)
            assert_one_line_error(code, err, f"{out_dir} is in use by another run (process {other.pid})")
        assert snapshot(out_dir) == before
        code, _, err = run(stage, "--sample", tiny=False, out_dir=out_dir)   # reading needs no lock
        assert code == 0, err
    finally:
        other.kill()
        other.wait()
    code, out, err = run(stage, "--data", corpus)                  # its process ended: taken over
    assert code == 0, err
    assert not (out_dir / "run.lock").exists()


@pytest.mark.parametrize("name", ["bigram", "gpt"])
def test_divergence_stops_with_one_line_and_never_saves_a_non_finite_model(name, corpus, run, tmp_path):
    stage = load_stage(name)
    out_dir = tmp_path / "out" / name
    code, out, err = run(stage, "--data", corpus, "--learning_rate", "1e3", "--max_iters", "40",
                         "--eval_interval", "1")
    assert_one_line_error(code, err, "training diverged at step", "the learning rate (1000.0) is too high",
                          "the last good state is")
    step = int(err.split("diverged at step ")[1].split()[0])
    assert f"{out_dir / 'last.pt'} (step {step - 1})" in err
    assert not (out_dir / "metrics.json").exists()
    for path in ("ckpt.pt", "last.pt"):                            # what was saved is finite: loadable
        stage.load_checkpoint(str(out_dir / path), for_resume=path == "last.pt")


def test_an_untrained_best_model_is_reported_as_such(corpus, run, tmp_path, monkeypatch):
    real, calls = gpt.estimate_loss, []

    def worse_and_worse(*args):                                    # every later estimate is worse
        calls.append(1)
        return {split: loss + len(calls) - 1 for split, loss in real(*args).items()}

    monkeypatch.setattr(gpt, "estimate_loss", worse_and_worse)
    code, out, err = run(gpt, "--data", corpus)
    assert code == 0, err
    metrics = run.metrics(gpt)
    assert metrics["best_step"] == 0 and "untrained model" in metrics["warning"]
    assert "warning: no evaluation after step 0 beat the untrained model" in out


def damage(checkpoint, how):
    if how == "moments of another shape":
        state = checkpoint["optimizer"]["state"]
        state[next(iter(state))]["exp_avg"] = torch.zeros(3)      # once a segfault in fused AdamW
    elif how == "no betas":
        del checkpoint["optimizer"]["param_groups"][0]["betas"]
    elif how == "an unknown setting":
        checkpoint["config"]["out_dir"] = "/somewhere/else"
    elif how == "a setting that is not named":
        checkpoint["config"][3] = 1
    elif how == "no best":
        checkpoint["best"] = {}
    elif how == "a log of tensors":
        checkpoint["log"][0]["val_loss"] = torch.tensor(1.0)
    elif how == "a weight without a name":
        checkpoint["model"][7] = torch.zeros(1)
    elif how == "a sparse weight":
        name = next(iter(checkpoint["model"]))
        checkpoint["model"][name] = checkpoint["model"][name].to_sparse()
    elif how == "no val_loss":
        del checkpoint["val_loss"]
    elif how == "no config":
        del checkpoint["config"]
    elif how == "n_head 0":
        checkpoint["config"]["n_head"] = 0
    elif how == "vocab not text":
        checkpoint["vocab"] = list(checkpoint["vocab"])
    elif how == "no optimizer":
        del checkpoint["optimizer"]
    elif how == "nan weights":
        next(iter(checkpoint["model"].values())).fill_(math.nan)
    elif how == "shuffled log":
        checkpoint["log"] = [[0, 1.0]]
    return checkpoint


RESUME_ONLY = ["no optimizer", "shuffled log", "moments of another shape", "no betas", "no best",
               "a log of tensors"]                                 # what only last.pt holds
BOTH = ["no config", "n_head 0", "vocab not text", "nan weights", "an unknown setting",
        "a setting that is not named", "a weight without a name", "a sparse weight"]


@pytest.mark.parametrize("how", RESUME_ONLY + BOTH + ["no val_loss"])
def test_checkpoints_that_load_but_are_wrong_are_refused_in_one_line(how, corpus, run, tmp_path):
    out_dir = tmp_path / "out" / "gpt"
    assert run(gpt, "--data", corpus)[0] == 0
    if how == "no val_loss":                                       # ckpt.pt alone, read at the end
        torch.save(damage(torch.load(out_dir / "ckpt.pt", weights_only=True), how), out_dir / "ckpt.pt")
        code, _, err = run(gpt, "--data", corpus, "--resume", out_dir=out_dir)   # done: straight to the end
        assert_one_line_error(code, err, f"{out_dir / 'ckpt.pt'} is damaged")
        return
    resume_only = how in RESUME_ONLY
    for name in ("last.pt",) if resume_only else ("ckpt.pt", "last.pt"):
        torch.save(damage(torch.load(out_dir / name, weights_only=True), how), out_dir / name)
    code, _, err = run(gpt, "--data", corpus, "--resume", out_dir=out_dir)
    assert_one_line_error(code, err, f"{out_dir / 'last.pt'} is damaged")
    for action in [] if resume_only else [["--sample"], ["--evaluate", corpus]]:
        code, _, err = run(gpt, *action, tiny=False, out_dir=out_dir)
        assert_one_line_error(code, err, f"{out_dir / 'ckpt.pt'} is damaged")


@ENDS
def test_a_text_without_newlines_asks_for_a_prompt(stage, run, tmp_path):
    text = tmp_path / "one_line.txt"
    text.write_text("to be or not to be " * 40, encoding="utf-8")
    code, _, err = run(stage, "--data", text)
    assert_one_line_error(code, err, "the default prompt, a newline, is not among the characters", "--prompt")
    code, _, err = run(stage, "--data", text, "--prompt", "to be")
    assert code == 0, err


def test_a_run_that_fails_never_pushes_out_a_finished_one(corpus, run, tmp_path):
    bigram, out_dir = load_stage("bigram"), tmp_path / "out" / "bigram"
    assert run(bigram, "--data", corpus)[0] == 0
    finished = snapshot(out_dir)
    for _ in range(2):                                             # twice: the second moves the first
        code, _, err = run(bigram, "--data", corpus, "--learning_rate", "1e20")
        assert "diverged" in err
    assert snapshot(out_dir / "previous") == finished
    assert sorted(p.name for p in (out_dir / "previous-unfinished").iterdir()) == ["ckpt.pt", "last.pt",
                                                                                   "log.csv"]


def test_a_resumed_run_keeps_its_seed_and_its_preset(corpus, run, tmp_path, monkeypatch):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert run(gpt, "--data", corpus, "--seed", "7", out_dir=whole)[0] == 0
    from conftest import ctrl_c_during_step
    ctrl_c_during_step(gpt, monkeypatch, 13)
    assert run(gpt, "--data", corpus, "--seed", "7", out_dir=broken)[0] == 130
    monkeypatch.undo()
    assert run(gpt, "--data", corpus, "--resume", out_dir=broken)[0] == 0      # no --seed: the run's
    assert run.metrics(gpt, broken)["val_loss"] == run.metrics(gpt, whole)["val_loss"]
    for option in (["--seed", "9"], ["--preset", "full"]):
        code, _, err = run(gpt, "--data", corpus, "--resume", *option, tiny=False, out_dir=broken)
        assert_one_line_error(code, err, f"{option[0]} {option[1]} differs from the resumed run's")


@ENDS
def test_a_ctrl_c_before_the_second_evaluation_warns_of_nothing(stage, corpus, run, monkeypatch):
    from conftest import ctrl_c_during_step
    ctrl_c_during_step(stage, monkeypatch, 3)
    code, out, _ = run(stage, "--data", corpus)
    assert code == 130 and "warning" not in out and run.metrics(stage)["warning"] is None


@ENDS
def test_resuming_below_the_saved_step_is_refused(stage, corpus, run, tmp_path):
    assert run(stage, "--data", corpus)[0] == 0
    code, _, err = run(stage, "--data", corpus, "--resume", "--max_iters", "10", tiny=False,
                       out_dir=tmp_path / "out" / stage.STAGE)
    assert_one_line_error(code, err, "the run to resume is at step 20, past --max_iters 10")


@pytest.mark.parametrize("option, value, fragment", [
    ("--learning_rate", "1e39", "--learning_rate must be positive, and below 1e30"),
    ("--learning_rate", "inf", "--learning_rate must be positive, and below 1e30"),
    ("--block_size", "10000000", "out of memory"),                 # a (T, T) mask of 10^14 entries
])
def test_sizes_and_rates_too_large_for_the_machine_are_one_line(option, value, fragment, corpus, run):
    code, _, err = run(gpt, "--data", corpus, option, value)
    assert_one_line_error(code, err, fragment)


def memory_parts(stage, args):
    """What check_memory() must count, worked out here by hand: the bytes of each part."""
    B, T = args.batch_size, args.block_size
    model = stage.make_model(1, args)
    parts = {"a batch of": 2 * 8 * B * (T + 1),                      # int64 ids and their positions
             "the model's": 16 * sum(p.numel() for p in model.parameters())}  # + gradients, 2 moments
    if stage.STAGE != "bigram":
        C = args.n_embd
        if stage.STAGE == "gpt":
            per_pair = args.n_layer                                  # a bool mask per block
        else:
            per_pair = 4 * getattr(args, "n_head", 1)                # float32 trils: one, or one per head
        parts["the attention masks of"] = per_pair * T * T
        parts["one layer's activations at"] = 4 * B * T * C
    return parts


@pytest.mark.parametrize("name, settings, part", [
    ("bigram", ["--batch_size", "4096"], "a batch of"),
    *[(name, settings, part) for name in ATTENTION_STAGES for settings, part in [
        (["--batch_size", "1", "--block_size", "512"], "the attention masks of"),
        (["--batch_size", "4096"], "one layer's activations at"),
        (["--n_embd", "512"], "the model's")]],
])
def test_what_cannot_fit_in_memory_is_refused_before_anything_is_made(name, settings, part, corpus, run,
                                                                      monkeypatch):
    """Not left to the allocator: where the system overcommits, it would grant the memory and
    the process filling it would be ended (as a pytest worker was, on a 128 GiB machine). Each
    part is counted to the byte: a computer one byte smaller than it needs is refused."""
    stage, made = load_stage(name), []
    parts = memory_parts(stage, tiny_args(stage, *settings))
    need = parts[part]
    assert need == max(parts.values())                               # the part these settings test
    monkeypatch.setattr(stage, "physical_memory", lambda: need)
    stage.check_memory(tiny_args(stage, *settings), torch.device("cpu"))   # just fits
    monkeypatch.setattr(stage, "physical_memory", lambda: need - 1)
    real = stage.make_model
    monkeypatch.setattr(stage, "make_model", lambda *args: made.append(real(*args)) or made[-1])
    code, _, err = run(stage, "--data", corpus, *settings)
    assert_one_line_error(code, err, f"out of memory: {part} ", " alone would take ")
    assert all(p.is_meta for model in made for p in model.parameters())   # sizes only, no model made


@pytest.mark.parametrize("name", ATTENTION_STAGES)
def test_for_a_gpu_the_computer_holds_the_model_while_it_is_made(name, monkeypatch):
    """Made on the CPU, then moved: the weights alone, no gradients, moments or activations."""
    stage = load_stage(name)
    args = tiny_args(stage, "--n_embd", "512", "--batch_size", "1000")     # activations: 31 MiB
    weights = 4 * sum(p.numel() for p in stage.make_model(1, args).parameters())
    for device in ("cuda", "mps"):
        monkeypatch.setattr(stage, "physical_memory", lambda: weights)
        stage.check_memory(args, torch.device(device))
        monkeypatch.setattr(stage, "physical_memory", lambda: weights - 1)
        with pytest.raises(stage.CLIError, match=r"the model's [\d,]+ parameters alone would take"):
            stage.check_memory(args, torch.device(device))


@pytest.mark.parametrize("name", STAGES)
def test_torchrun_s_processes_on_one_computer_are_counted_together(name, monkeypatch):
    """On a CPU each of torchrun's processes keeps a whole model, batch and activations of its
    own; for GPUs the computer holds each model only while it is made, so one is counted."""
    stage = load_stage(name)
    args = tiny_args(stage, "--batch_size", "4096")
    parts = memory_parts(stage, args)
    part, need = max(parts.items(), key=lambda item: item[1])
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    monkeypatch.setattr(stage, "physical_memory", lambda: need)
    stage.check_memory(args, torch.device("cpu"))                    # left over: not under torchrun
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(stage, "physical_memory", lambda: 3 * need)
    stage.check_memory(args, torch.device("cpu"))
    monkeypatch.setattr(stage, "physical_memory", lambda: 3 * need - 1)
    with pytest.raises(stage.CLIError, match=rf"out of memory: {part} .* alone would take [\d.]+ GiB "
                       rf"in each of torchrun's 3 processes on this computer, [\d.]+ GiB in all, and "
                       rf"this computer has [\d.]+ GiB; try smaller settings or fewer processes$"):
        stage.check_memory(args, torch.device("cpu"))
    weights = 4 * sum(p.numel() for p in stage.make_model(1, args).parameters())
    one = max(parts["a batch of"], parts.get("the attention masks of", 0), weights)   # a GPU's count
    monkeypatch.setattr(stage, "physical_memory", lambda: one)
    stage.check_memory(args, torch.device("cuda"))


@ENDS
def test_what_fits_or_cannot_be_known_trains(stage, corpus, run, monkeypatch, tmp_path):
    physical_memory = stage.physical_memory
    monkeypatch.setattr(stage, "physical_memory", lambda: 2 ** 18)   # the tiny settings fit
    assert run(stage, "--data", corpus)[0] == 0
    monkeypatch.setattr(stage, "physical_memory", lambda: None)      # Windows: nothing to check
    assert run(stage, "--data", corpus, "--batch_size", "64", "--block_size", "64")[0] == 0
    for value in (-1, 0):                                            # sysconf's "unknown"
        monkeypatch.setattr(stage.os, "sysconf", lambda name, value=value: value)
        assert physical_memory() is None
    monkeypatch.undo()                                               # sampling and evaluating make
    monkeypatch.setattr(stage, "physical_memory", lambda: 2 ** 18)   # the checkpoint's model: these
    out_dir = tmp_path / "out" / stage.STAGE                         # settings are not checked
    for only in (["--sample"], ["--evaluate", str(corpus)]):
        assert run(stage, *only, "--batch_size", "100000", tiny=False, out_dir=out_dir)[0] == 0


@ENDS
def test_what_the_allocator_refuses_is_one_line(stage, corpus, run, monkeypatch):
    def refuse(*args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB")
    monkeypatch.setattr(stage, "make_model", refuse)
    code, _, err = run(stage, "--data", corpus)
    assert_one_line_error(code, err, "out of memory: try a smaller --batch_size, --block_size or model")


@ENDS
@pytest.mark.parametrize("where", ["lock", "set_aside"])
def test_a_disk_that_fills_while_claiming_or_moving_is_one_line(where, stage, corpus, run, tmp_path,
                                                                monkeypatch):
    out_dir = tmp_path / "out" / stage.STAGE
    if where == "set_aside":
        assert run(stage, "--data", corpus)[0] == 0

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(stage.os, "link" if where == "lock" else "replace", full)
    code, _, err = run(stage, "--data", corpus)
    monkeypatch.undo()
    assert_one_line_error(code, err, f"cannot write to {out_dir}", "No space left on device")
    if where == "lock":                                            # nothing left behind, not even the folder
        assert not (tmp_path / "out").exists()


def test_a_terminal_that_cannot_show_a_character_gets_its_code(run, tmp_path, monkeypatch):
    import io
    bigram, text = load_stage("bigram"), tmp_path / "greek.txt"
    text.write_text("αβγ δε\n" * 300, encoding="utf-8")
    assert run(bigram, "--data", text)[0] == 0
    ascii_out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", ascii_out)
    assert bigram.main(["--sample", "--out_dir", str(tmp_path / "out" / "bigram"), "--max_new_tokens", "50",
                        "--prompt", "α"]) == 0
    ascii_out.flush()
    assert b"\\u03b1" in ascii_out.buffer.getvalue()             # the prompt, as \u03b1
    assert ascii_out.errors == "strict"                            # and put back as it was
