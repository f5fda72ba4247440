"""Faults from outside: a full disk, a read-only folder, a killed run's leftovers, divergence,
two runs in one folder, checkpoints that load but are wrong. Each ends in one line, never a
traceback, and never costs a good checkpoint. The machinery is harness.py's, the same for
every stage: these run on bigram.py, and on gpt.py where it has more to check."""
import errno
import math
import multiprocessing
import os
import subprocess
import sys
import time

import pytest
import torch

import harness
from conftest import (ATTENTION_STAGES, ROOT, assert_one_line_error, ctrl_c_during_step, load_stage, snapshot,
                      tiny_args)


def test_a_full_disk_is_one_line_naming_the_folder_and_the_earlier_checkpoint_survives(bigram, corpus, run,
                                                                                        tmp_path, monkeypatch):
    out_dir = tmp_path / "out" / "bigram"
    assert run(bigram, "--data", corpus, "--max_iters", "10")[0] == 0
    kept = (out_dir / "ckpt.pt").read_bytes()
    real_fdopen = os.fdopen

    class FullDisk:                                                # a file that fills the disk half way
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, attribute):
            return getattr(self.f, attribute)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(harness.os, "fdopen", lambda fd, *a, **k: FullDisk(real_fdopen(fd, *a, **k)))
    code, _, err = run(bigram, "--data", corpus, "--resume", "--max_iters", "30", tiny=False, out_dir=out_dir)
    monkeypatch.undo()
    assert_one_line_error(code, err, f"cannot write to {out_dir}", "No space left on device")
    assert (out_dir / "ckpt.pt").read_bytes() == kept
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".tmp-")]


def test_a_read_only_out_dir_is_found_before_training(bigram, corpus, run, tmp_path, monkeypatch):
    out_dir = tmp_path / "out" / "bigram"
    assert run(bigram, "--data", corpus, "--max_iters", "10")[0] == 0
    before = snapshot(out_dir)
    real_open, steps = os.open, []

    def read_only(path, *args, **kwargs):                          # what chmod a-w does, even for root
        if str(path).startswith(str(out_dir)) and args and args[0] & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(harness.os, "open", read_only)
    monkeypatch.setattr(bigram, "get_batch", lambda *a, **k: steps.append(1))
    code, _, err = run(bigram, "--data", corpus, "--resume", "--max_iters", "1500", tiny=False, out_dir=out_dir)
    monkeypatch.undo()
    assert_one_line_error(code, err, f"cannot write to {out_dir}", "Permission denied")
    assert steps == [] and snapshot(out_dir) == before


def test_leftovers_of_a_killed_run_are_tidied_and_nothing_else(bigram, corpus, run, tmp_path):
    out_dir = tmp_path / "out" / "bigram"
    out_dir.mkdir(parents=True)
    (out_dir / ".tmp-abc123").write_bytes(b"half a checkpoint")    # what atomic_write leaves at kill -9
    (out_dir / "run.lock").write_text("999999999\n")               # a killed run's lock file: not held
    (out_dir / "notes.txt").write_text("mine")
    (out_dir / ".tmpfile").write_text("not ours either")
    assert run(bigram, "--data", corpus)[0] == 0
    assert sorted(p.name for p in out_dir.iterdir()) == [".tmpfile", "ckpt.pt", "last.pt", "log.csv",
                                                          "metrics.json", "notes.txt"]


HOLD = """import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0); os.write(fd, f"{os.getpid()}\\n".encode())
print("held", flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(harness.fcntl is None, reason="no fcntl: Windows")
def test_a_second_run_into_a_folder_in_use_is_refused_and_a_killed_run_s_lock_is_gone(bigram, corpus, run,
                                                                                      tmp_path):
    out_dir = tmp_path / "out" / "bigram"
    assert run(bigram, "--data", corpus)[0] == 0
    other = subprocess.Popen([sys.executable, "-c", HOLD, str(out_dir / "run.lock")], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert other.stdout.readline() == "held\n"                 # a live run holds the folder
        before = snapshot(out_dir)
        for argv in (["--data", corpus], ["--data", corpus, "--resume"]):
            code, _, err = run(bigram, *argv)
            assert_one_line_error(code, err, f"{out_dir} is in use by another run (process {other.pid})")
        assert snapshot(out_dir) == before
        code, _, err = run(bigram, "--sample", tiny=False, out_dir=out_dir)   # reading needs no lock
        assert code == 0, err
    finally:
        other.kill()                                               # kill -9: the system lets go of its lock
        other.wait()
    code, out, err = run(bigram, "--data", corpus)
    assert code == 0, err
    assert not (out_dir / "run.lock").exists()


def claim(out_dir, results):
    """In a forked process: take out_dir's lock, hold it a moment, say how it went."""
    try:
        harness.lock(out_dir)
        results.put("locked")
        time.sleep(1)
    except harness.CLIError as e:
        results.put(str(e))


@pytest.mark.skipif(harness.fcntl is None or not hasattr(os, "fork"), reason="no fcntl or fork: Windows")
def test_runs_that_start_together_into_one_folder_leave_exactly_one_training(tmp_path):
    """Defect: two runs finding the same stale lock broke each other, and the survivor trained
    with no lock at all. With the system's lock, one trains and the others are refused."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run.lock").write_text("999999999\n")       # a killed run's, as the old code saw
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    runs = [context.Process(target=claim, args=(str(tmp_path / "out"), results)) for _ in range(3)]
    for process in runs:
        process.start()
    said = sorted(results.get(timeout=30) for _ in runs)
    for process in runs:
        process.join(timeout=30)
    assert said[-1] == "locked" and all("is in use by another run" in line for line in said[:-1]), said


@pytest.mark.parametrize("stage_name", ["bigram", "gpt"])
def test_divergence_stops_with_one_line_and_never_saves_a_non_finite_model(stage_name, corpus, run, tmp_path):
    stage = load_stage(stage_name)
    out_dir = tmp_path / "out" / stage_name
    code, out, err = run(stage, "--data", corpus, "--learning_rate", "1e3", "--max_iters", "40",
                         "--eval_interval", "1")
    assert_one_line_error(code, err, "training diverged at step", "the learning rate (1000.0) is too high",
                          "the last good state is")
    step = int(err.split("diverged at step ")[1].split()[0])
    assert f"{out_dir / 'last.pt'} (step {step - 1})" in err
    assert not (out_dir / "metrics.json").exists()
    for path in ("ckpt.pt", "last.pt"):                            # what was saved is finite: loadable
        harness.load_checkpoint(stage, str(out_dir / path), resume=path == "last.pt")


def test_an_untrained_best_model_is_reported_as_such(bigram, corpus, run, monkeypatch):
    real, calls = bigram.estimate_loss, []

    def worse_and_worse(*args):                                    # every later estimate is worse
        calls.append(1)
        return {split: loss + len(calls) - 1 for split, loss in real(*args).items()}

    monkeypatch.setattr(bigram, "estimate_loss", worse_and_worse)
    code, out, err = run(bigram, "--data", corpus)
    assert code == 0, err
    metrics = run.metrics(bigram)
    assert metrics["best_step"] == 0 and "untrained model" in metrics["warning"]
    assert "warning: no evaluation after step 0 beat the untrained model" in out


SCALER_DAMAGE = {"a scale beyond float32": dict(scale=1e300), "a scale that never backs off": dict(backoff_factor=2.0),
                 "a growth interval of 2000.0": dict(growth_interval=2000.0), "a tracker below 0": dict(_growth_tracker=-1),
                 "a scale float32 rounds to 0": dict(scale=1e-300), "a scale no step leaves": dict(scale=3.0)}


def damage(checkpoint, how):
    if how == "moments of another shape":
        state = checkpoint["optimizer"]["state"]
        state[next(iter(state))]["exp_avg"] = torch.zeros(3)      # once a segfault in fused AdamW
    elif how == "no betas":
        del checkpoint["optimizer"]["param_groups"][0]["betas"]
    elif how == "no second moment":
        state = checkpoint["optimizer"]["state"]
        del state[next(iter(state))]["exp_avg_sq"]
    elif how == "a rate that is no number":
        checkpoint["optimizer"]["param_groups"][0]["lr"] = "oops"
    elif how == "amsgrad":
        checkpoint["optimizer"]["param_groups"][0]["amsgrad"] = True
    elif how == "maximize":
        checkpoint["optimizer"]["param_groups"][0]["maximize"] = "yes"
    elif how == "a step of two numbers":
        state = checkpoint["optimizer"]["state"]
        state[next(iter(state))]["step"] = torch.tensor([1.0, 2.0])
    elif how == "no step":
        state = checkpoint["optimizer"]["state"]
        del state[next(iter(state))]["step"]
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
        key = next(iter(checkpoint["model"]))
        checkpoint["model"][key] = checkpoint["model"][key].to_sparse()
    elif how == "a weight of another shape":
        key = next(iter(checkpoint["model"]))
        checkpoint["model"][key] = torch.zeros(3)
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
    elif how == "a scaler of another kind":
        checkpoint["scaler"] = [65536.0]
    elif how == "a scale that is no number":
        checkpoint["scaler"] = dict(scale="big", growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                                    _growth_tracker=0)
    elif how == "a scale of 0":
        checkpoint["scaler"] = dict(scale=0.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                                    _growth_tracker=0)
    elif how == "skipped steps not counted":
        checkpoint["skipped"] = "3"
    elif how == "skipped steps below 0":
        checkpoint["skipped"] = -7
    elif how in SCALER_DAMAGE:                                     # review findings: each once got through
        checkpoint["scaler"] = dict(dict(scale=65536.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                                         _growth_tracker=0), **SCALER_DAMAGE[how])
    return checkpoint


RESUME_ONLY = ["no optimizer", "shuffled log", "moments of another shape", "no betas", "no step", "no best",
               "a log of tensors", "no second moment", "a rate that is no number", "amsgrad", "maximize",
               "a step of two numbers", "a scaler of another kind", "a scale that is no number", "a scale of 0",
               "skipped steps not counted", "skipped steps below 0", *SCALER_DAMAGE]   # what only last.pt holds
BOTH = ["no config", "n_head 0", "vocab not text", "nan weights", "an unknown setting",
        "a setting that is not named", "a weight without a name", "a sparse weight", "a weight of another shape"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished gpt.py run, trained once: each test damages a copy of it."""
    return {}


@pytest.mark.parametrize("how", RESUME_ONLY + BOTH + ["no val_loss"])
def test_checkpoints_that_load_but_are_wrong_are_refused_in_one_line(gpt, how, corpus, run, tmp_path, finished):
    out_dir = tmp_path / "out" / "gpt"
    if not finished:
        assert run(gpt, "--data", corpus, out_dir=tmp_path / "finished")[0] == 0
        finished.update(snapshot(tmp_path / "finished"))          # on the same text as every test's
    out_dir.mkdir(parents=True)
    for name, data in finished.items():
        (out_dir / name).write_bytes(data)
    if how == "no val_loss":                                       # ckpt.pt alone, read at the end
        torch.save(damage(torch.load(out_dir / "ckpt.pt", weights_only=True), how), out_dir / "ckpt.pt")
        code, _, err = run(gpt, "--data", corpus, "--resume", out_dir=out_dir)   # done: straight to the end
        assert_one_line_error(code, err, f"{out_dir / 'ckpt.pt'} is damaged")
        return
    resume_only = how in RESUME_ONLY
    for file in ("last.pt",) if resume_only else ("ckpt.pt", "last.pt"):
        torch.save(damage(torch.load(out_dir / file, weights_only=True), how), out_dir / file)
    code, _, err = run(gpt, "--data", corpus, "--resume", out_dir=out_dir)
    assert_one_line_error(code, err, f"{out_dir / 'last.pt'} is damaged")
    for action in [] if resume_only else [["--sample"], ["--evaluate", corpus]]:
        code, _, err = run(gpt, *action, tiny=False, out_dir=out_dir)
        assert_one_line_error(code, err, f"{out_dir / 'ckpt.pt'} is damaged")


def test_a_text_without_newlines_asks_for_a_prompt(bigram, run, tmp_path):
    text = tmp_path / "one_line.txt"
    text.write_text("to be or not to be " * 40, encoding="utf-8")
    code, _, err = run(bigram, "--data", text)
    assert_one_line_error(code, err, "the default prompt, a newline, is not among the characters", "--prompt")
    code, _, err = run(bigram, "--data", text, "--prompt", "to be")
    assert code == 0, err


def test_a_resumed_run_keeps_its_seed_and_its_preset(gpt, corpus, run, tmp_path, monkeypatch):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert run(gpt, "--data", corpus, "--seed", "7", out_dir=whole)[0] == 0
    ctrl_c_during_step(gpt, monkeypatch, 13)
    assert run(gpt, "--data", corpus, "--seed", "7", out_dir=broken)[0] == 130
    monkeypatch.undo()
    assert run(gpt, "--data", corpus, "--resume", out_dir=broken)[0] == 0      # no --seed: the run's
    assert run.metrics(gpt, broken)["val_loss"] == run.metrics(gpt, whole)["val_loss"]
    for option in (["--seed", "9"], ["--preset", "full"]):
        code, _, err = run(gpt, "--data", corpus, "--resume", *option, tiny=False, out_dir=broken)
        assert_one_line_error(code, err, f"{option[0]} {option[1]} differs from the resumed run's")


def test_a_ctrl_c_before_the_second_evaluation_warns_of_nothing(bigram, corpus, run, monkeypatch):
    ctrl_c_during_step(bigram, monkeypatch, 3)
    code, out, _ = run(bigram, "--data", corpus)
    assert code == 130 and "warning" not in out and run.metrics(bigram)["warning"] is None


def test_resuming_below_the_saved_step_is_refused(bigram, corpus, run, tmp_path):
    assert run(bigram, "--data", corpus)[0] == 0
    code, _, err = run(bigram, "--data", corpus, "--resume", "--max_iters", "10", tiny=False,
                       out_dir=tmp_path / "out" / "bigram")
    assert_one_line_error(code, err, "the run to resume is at step 20, past --max_iters 10")


@pytest.mark.parametrize("option, value, fragment", [
    ("--learning_rate", "1e39", "--learning_rate must be positive, and below 1e30"),
    ("--learning_rate", "inf", "--learning_rate must be positive, and below 1e30"),
    ("--block_size", "10000000", "out of memory"),                 # a (T, T) mask of 10^14 entries
])
def test_sizes_and_rates_too_large_for_the_machine_are_one_line(gpt, option, value, fragment, corpus, run):
    code, _, err = run(gpt, "--data", corpus, option, value)
    assert_one_line_error(code, err, fragment)


def memory_need(stage, args, on_cpu=True):
    """What check_memory() must count, worked out here by hand, in bytes."""
    B, T = args.batch_size, args.block_size
    model = stage.make_model(1, args)
    need = 2 * 8 * B * (T + 1) + 4 * args.eval_iters               # int64 ids and targets; estimates
    need += sum(b.numel() * b.element_size() for b in model.buffers())   # the attention masks
    need += (16 if on_cpu else 4) * sum(p.numel() for p in model.parameters())   # + gradients, 2 moments
    if on_cpu and hasattr(args, "n_embd"):
        need += 4 * B * T * args.n_embd                            # one layer's activations
    return need


@pytest.mark.parametrize("stage_name, settings", [
    ("bigram", ["--batch_size", "4096"]),
    *[(stage_name, settings) for stage_name in ATTENTION_STAGES for settings in [
        ["--batch_size", "1", "--block_size", "512"], ["--batch_size", "4096"], ["--n_embd", "512"]]],
])
def test_what_cannot_fit_in_memory_is_refused_before_anything_is_made(stage_name, settings, corpus, run,
                                                                      monkeypatch):
    """Not left to the allocator: where the system overcommits, it would grant the memory and
    the process filling it would be ended (as a pytest worker was, on a 128 GiB machine). The
    need is counted to the byte: a computer one byte smaller is refused."""
    stage, made = load_stage(stage_name), []
    need = memory_need(stage, tiny_args(stage, *settings))
    monkeypatch.setattr(harness, "physical_memory", lambda: need)
    harness.check_memory(stage, tiny_args(stage, *settings), torch.device("cpu"))   # just fits
    monkeypatch.setattr(harness, "physical_memory", lambda: need - 1)
    real = stage.make_model
    monkeypatch.setattr(stage, "make_model", lambda *args: made.append(real(*args)) or made[-1])
    code, _, err = run(stage, "--data", corpus, *settings)
    assert_one_line_error(code, err, "out of memory: these settings need at least ", " GiB, and this computer")
    assert all(p.is_meta for model in made for p in model.parameters())   # sizes only, no model made


def test_for_a_gpu_and_for_torchrun_the_count_changes(monkeypatch):
    """For a GPU the computer holds the weights alone, while the model is made; on a CPU each of
    torchrun's processes keeps a whole model, batch and activations of its own."""
    stage = load_stage("multi_head_attn")
    args = tiny_args(stage, "--n_embd", "512", "--batch_size", "1000")
    for device, on_cpu, copies in (("cuda", False, 1), ("cpu", True, 1), ("cpu", True, 3)):
        need = memory_need(stage, args, on_cpu) * copies
        if copies > 1:
            monkeypatch.setenv("RANK", "0")
            monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
        monkeypatch.setattr(harness, "physical_memory", lambda: need)
        harness.check_memory(stage, args, torch.device(device))
        monkeypatch.setattr(harness, "physical_memory", lambda: need - 1)
        with pytest.raises(harness.CLIError, match="out of memory"):
            harness.check_memory(stage, args, torch.device(device))
    monkeypatch.delenv("RANK")                                     # a stray LOCAL_WORLD_SIZE: one copy
    monkeypatch.setattr(harness, "physical_memory", lambda: memory_need(stage, args))
    harness.check_memory(stage, args, torch.device("cpu"))


def test_what_fits_or_cannot_be_known_trains(bigram, corpus, run, monkeypatch, tmp_path):
    physical_memory = harness.physical_memory
    monkeypatch.setattr(harness, "physical_memory", lambda: 2 ** 18)   # the tiny settings fit
    assert run(bigram, "--data", corpus)[0] == 0
    monkeypatch.setattr(harness, "physical_memory", lambda: None)      # Windows: nothing to check
    assert run(bigram, "--data", corpus, "--batch_size", "64", "--block_size", "64")[0] == 0
    for value in (-1, 0):                                            # sysconf's "unknown"
        monkeypatch.setattr(harness.os, "sysconf", lambda key, value=value: value)
        assert physical_memory() is None
    monkeypatch.undo()                                               # sampling and evaluating make
    monkeypatch.setattr(harness, "physical_memory", lambda: 2 ** 18)   # the checkpoint's model: these
    out_dir = tmp_path / "out" / "bigram"                            # settings are not checked
    for only in (["--sample"], ["--evaluate", str(corpus)]):
        assert run(bigram, *only, "--batch_size", "100000", tiny=False, out_dir=out_dir)[0] == 0


def test_what_the_allocator_refuses_is_one_line(bigram, corpus, run, monkeypatch):
    real, calls = bigram.make_model, []

    def refuse(*args):                                             # the shapes are counted; then
        calls.append(1)                                            # the memory is refused
        if len(calls) == 1:
            return real(*args)
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB")
    monkeypatch.setattr(bigram, "make_model", refuse)
    code, _, err = run(bigram, "--data", corpus)
    assert_one_line_error(code, err, "out of memory: try a smaller --batch_size, --block_size or model")
    for size, said in ((["--n_embd", str(2 ** 30)], "out of memory: these settings need at least"),
                       (["--n_embd", str(10 ** 12)], "--n_embd must be below 2**31"),
                       (["--eval_iters", str(10 ** 23)], "--eval_iters must be below 2**31")):
        code, _, err = run(load_stage("single_attention"), "--data", corpus, *size)   # none a traceback
        assert_one_line_error(code, err, said)


@pytest.mark.parametrize("where", ["lock", "set_aside"])
def test_a_disk_that_fills_while_claiming_or_moving_is_one_line(bigram, where, corpus, run, tmp_path,
                                                                monkeypatch):
    out_dir = tmp_path / "out" / "bigram"
    if where == "set_aside":
        assert run(bigram, "--data", corpus)[0] == 0

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(harness.os, "write" if where == "lock" else "replace", full)
    code, _, err = run(bigram, "--data", corpus)
    monkeypatch.undo()
    assert_one_line_error(code, err, f"cannot write to {out_dir}", "No space left on device")
    if where == "lock":                                            # nothing left behind, not even the folder
        assert not (tmp_path / "out").exists()


def test_a_terminal_that_cannot_show_a_character_gets_its_code(bigram, run, tmp_path, monkeypatch):
    import io
    text = tmp_path / "greek.txt"
    text.write_text("αβγ δε\n" * 300, encoding="utf-8")
    assert run(bigram, "--data", text)[0] == 0
    ascii_out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", ascii_out)
    assert bigram.main(["--sample", "--out_dir", str(tmp_path / "out" / "bigram"), "--max_new_tokens", "50",
                        "--prompt", "α"]) == 0
    ascii_out.flush()
    assert b"\\u03b1" in ascii_out.buffer.getvalue()             # the prompt, as \u03b1
    assert ascii_out.errors == "strict"                            # and put back as it was


@pytest.mark.skipif(harness.fcntl is None, reason="no fcntl: Windows")
def test_a_lock_is_let_go_of_when_its_process_dies(tmp_path):
    """kill -9 of the run that holds the folder: the operating system releases its lock."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out_dir / "run.lock")], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(harness.CLIError, match="in use by another run"):
        harness.lock(str(out_dir))
    holder.kill()
    holder.wait()
    time.sleep(0.05)
    harness.lock(str(out_dir))                                     # taken at once: nothing to tidy by hand
    harness.unlock(str(out_dir))
    assert list(out_dir.iterdir()) == []


def test_a_lock_the_filesystem_cannot_take_is_not_called_another_run(bigram, corpus, run, tmp_path, monkeypatch):
    """Review finding: every error of flock read as "in use by another run" (a filesystem that
    has no locks, ENOLCK, refused every run with a false reason)."""
    if harness.fcntl is None:
        pytest.skip("no fcntl: Windows")

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(harness.fcntl, "flock", no_locks)
    code, _, err = run(bigram, "--data", corpus)
    assert_one_line_error(code, err, f"cannot write to {tmp_path / 'out' / 'bigram'}", os.strerror(errno.ENOLCK))
    assert [p.name for p in (tmp_path / "out" / "bigram").iterdir()] == ["run.lock"]   # not held: not removed


def test_resume_takes_only_the_run_s_own_best_model(bigram, corpus, run, tmp_path):
    """Review finding: without ckpt.pt a finished run's resume failed at the end, and another
    run's ckpt.pt of the same shape was taken for the run's own best model."""
    mine, other = tmp_path / "mine", tmp_path / "other"
    assert run(bigram, "--data", corpus, "--max_iters", "20", out_dir=mine)[0] == 0
    assert run(bigram, "--data", corpus, "--max_iters", "20", "--seed", "5", out_dir=other)[0] == 0
    (mine / "ckpt.pt").write_bytes((other / "ckpt.pt").read_bytes())
    torch.save(dict(torch.load(other / "ckpt.pt", weights_only=True), step=10), other / "ckpt.pt")
    for folder in (mine, other):
        code, _, err = run(bigram, "--data", corpus, "--resume", "--max_iters", "30", tiny=False, out_dir=folder)
        assert_one_line_error(code, err, f"{folder / 'ckpt.pt'} is not the best model of the run to resume")
    (mine / "ckpt.pt").unlink()
    code, _, err = run(bigram, "--data", corpus, "--resume", "--max_iters", "30", tiny=False, out_dir=mine)
    assert_one_line_error(code, err, f"no checkpoint at {mine / 'ckpt.pt'}")
