"""gpt.py under torchrun: two CPU processes (gloo) train one model. Two launches serve every
check: a run stopped by Ctrl-C, and its resumption to the end. The other stages train in one
process, and say so."""
import os
import signal
import subprocess
import sys

import pytest
import torch

import harness
from conftest import ROOT, TINY, TINY_MODEL, assert_one_line_error, load_stage, make_text

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
OPTIONS = TINY + TINY_MODEL["gpt"] + ["--device", "cpu", "--max_iters", "200", "--eval_interval", "100"]


def torchrun(*argv):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "gpt.py", *map(str, argv)]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    corpus, out_dir = folder / "tiny.txt", folder / "out"
    corpus.write_text(make_text(), encoding="utf-8")
    stopped = torchrun("--data", corpus, "--out_dir", out_dir, *OPTIONS)
    seen = []
    for line in stopped.stdout:                                    # Ctrl-C, as a terminal sends it:
        seen.append(line)                                          # to torchrun and every process
        if line.startswith("step 100:"):
            os.killpg(stopped.pid, signal.SIGINT)
            break
    out, err = stopped.communicate(timeout=120)
    files = sorted(p.name for p in out_dir.iterdir())
    last = torch.load(out_dir / "last.pt", weights_only=True)
    resumed = torchrun("--data", corpus, "--out_dir", out_dir, "--resume", *OPTIONS)
    resumed_out, resumed_err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, resumed_err
    return dict(corpus=corpus, out_dir=out_dir, stopped="".join(seen) + out, stopped_files=files,
                stopped_step=last["step"], resumed=resumed_out)


def test_ctrl_c_stops_every_process_at_one_step_and_rank_0_saves_once(two_processes):
    step = two_processes["stopped_step"]
    assert 100 < step < 200 and f"interrupted at step {step}" in two_processes["stopped"]
    assert two_processes["stopped"].count("step 0:") == 1               # rank 0 alone prints
    assert two_processes["stopped_files"] == ["ckpt.pt", "last.pt", "log.csv"]   # and writes, once


def test_the_resumed_run_equals_one_process_that_sees_both_batches_as_one(two_processes, gpt):
    """Each process draws batches from its own seed, seed + rank; averaging their gradients is
    what one process does with both batches side by side."""
    args = harness.parse_args(gpt, OPTIONS + ["--sample"])
    harness.configure(gpt, args, torch.device("cpu"))
    tokenizer, train_data, _ = gpt.load_text(str(two_processes["corpus"]))
    torch.manual_seed(args.seed)
    model = gpt.make_model(tokenizer.vocab_size, args)
    optimizer = gpt.make_optimizer(model, args, torch.device("cpu"))
    draws = [torch.Generator().manual_seed(args.seed + rank) for rank in (0, 1)]
    for step in range(args.max_iters):
        for group in optimizer.param_groups:
            group["lr"] = gpt.get_lr(step, args)
        batches = [gpt.get_batch(train_data, args, torch.device("cpu"), draw) for draw in draws]
        _, loss = model(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
    saved = torch.load(two_processes["out_dir"] / "last.pt", weights_only=True)
    assert saved["step"] == 200 and saved["world_size"] == 2 and len(saved["rng"]) == 2
    for key, value in model.state_dict().items():
        assert torch.allclose(saved["model"][key], value, atol=1e-5), key


def test_the_checkpoints_are_single_process_ones(two_processes, gpt, run, tmp_path):
    out_dir = two_processes["out_dir"]
    assert sorted(p.name for p in out_dir.iterdir()) == ["ckpt.pt", "last.pt", "log.csv", "metrics.json"]
    assert run.metrics(gpt, out_dir)["world_size"] == 2
    code, out, err = run(gpt, "--sample", "--max_new_tokens", "10", tiny=False, out_dir=out_dir)
    assert code == 0 and len(out) == len("\n") + 10 + 1, err
    code, _, err = run(gpt, "--data", two_processes["corpus"], "--resume", "--max_iters", "300", tiny=False,
                       out_dir=out_dir)                            # one process: refused, in one line
    assert code == 1 and err.count("\n") == 1 and "was trained by 2 processes" in err


def test_rank_0_speaks_for_all_while_they_check_the_same_things_and_each_speaks_once_training(
        gpt, run, corpus, monkeypatch, capsys):
    """Defect: a failure on any rank but 0 was silent, since only rank 0 printed."""
    args = harness.parse_args(gpt, ["--sample"])
    monkeypatch.setenv("RANK", "1")
    args.own_errors = False                                        # checking the same settings
    assert harness.fail(args, "the same mistake on every process") == 1
    assert capsys.readouterr() == ("", "")
    args.own_errors = True                                         # training: its own trouble
    assert harness.fail(args, "out of memory") == 1
    assert capsys.readouterr().err == "gpt.py: error: rank 1: out of memory\n"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    code, _, err = run(gpt, "--data", corpus, "--device", "cpu")   # WORLD_SIZE and the rest missing
    assert code == 1 and err.startswith("gpt.py: error: torchrun: cannot join the other processes: ")
    assert err.count("\n") == 1
    monkeypatch.setattr(torch.distributed, "is_backend_available", lambda backend: False)
    code, _, err = run(gpt, "--data", corpus, "--device", "cpu")
    assert code == 1 and err == "gpt.py: error: torchrun: this PyTorch has no gloo backend (--device cpu)\n"
    assert not torch.distributed.is_initialized()


def pretend_two_processes(monkeypatch, collective=lambda *args, **kwargs: None):
    monkeypatch.setattr(harness, "world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: "gloo")
    for name in ("barrier", "all_reduce", "all_gather_object"):
        monkeypatch.setattr(torch.distributed, name, collective)


def test_a_collective_broken_by_another_process_is_one_line(gpt, run, corpus, monkeypatch):
    """Defect: a failing all_reduce or all_gather_object gave rank 0 a gloo traceback."""
    def broken(*args, **kwargs):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    pretend_two_processes(monkeypatch, broken)
    monkeypatch.setattr(harness, "wait_for_the_others", lambda: None)   # joined: past the lock's barrier
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda model, device_ids: model)
    code, _, err = run(gpt, "--data", corpus)
    assert_one_line_error(code, err, "torchrun: another process ended with an error")


def test_the_smaller_stages_train_in_one_process_and_say_so_once_under_torchrun(run, corpus, monkeypatch,
                                                                                 tmp_path):
    pretend_two_processes(monkeypatch)
    bigram = load_stage("bigram")
    code, _, err = run(bigram, "--data", corpus)
    assert_one_line_error(code, err, "torchrun: bigram.py trains in one process (its training loop does not call "
                                     "run.for_training)")
    assert not (tmp_path / "out" / "bigram").exists()              # refused before anything is saved
    monkeypatch.setenv("RANK", "1")                                # the same for every process: said once
    monkeypatch.setattr(harness, "join_processes", lambda device: device)
    code, _, err = run(bigram, "--data", corpus)
    assert code == 1 and err == ""


def test_a_process_s_own_trouble_before_training_is_told_by_that_process(gpt, run, corpus, monkeypatch):
    """Review finding: rank 1 out of memory while it made its model said nothing, and rank 0 got a
    traceback from the broken collective."""
    pretend_two_processes(monkeypatch)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(harness, "join_processes", lambda device: device)

    real, calls = gpt.make_model, []

    def no_memory(*args):                                          # the shapes fit; the memory does not
        calls.append(1)
        if len(calls) == 1:                                        # check_memory's, on the meta device
            return real(*args)
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB")
    monkeypatch.setattr(gpt, "make_model", no_memory)
    code, _, err = run(gpt, "--data", corpus)
    assert code == 1 and err == "gpt.py: error: rank 1: out of memory: try a smaller --batch_size, " \
                                "--block_size or model\n"
    monkeypatch.undo()
    pretend_two_processes(monkeypatch, lambda *args, **kwargs: None)
    monkeypatch.setattr(harness, "wait_for_the_others", lambda: None)

    def broken(model, device_ids):                                 # the others' DDP meets the failure
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", broken)
    code, _, err = run(gpt, "--data", corpus)
    assert_one_line_error(code, err, "torchrun: another process ended with an error")


def test_the_processes_leave_together(gpt, run, corpus, monkeypatch):
    """The others wait at a barrier while rank 0 scores and samples: one that left first
    sometimes aborted, and torchrun failed the run. Only a process that succeeded waits."""
    left = []
    monkeypatch.setattr(harness, "leave_together", lambda: left.append("left"))
    assert run(gpt, "--data", corpus)[0] == 0 and left == ["left"]
    assert run(gpt, "--data", corpus, "--max_iters", "-1")[0] != 0 and left == ["left"]
    monkeypatch.undo()
    waited, backend = [], ["gloo"]
    monkeypatch.setattr(harness, "world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: backend[0])
    monkeypatch.setattr(torch.distributed, "barrier", lambda device_ids: waited.append(device_ids))
    harness.leave_together()
    assert waited == [None]
    backend[0] = "nccl"                                             # not seen to abort; its barrier
    harness.leave_together()                                        # would give up after 10 minutes
    assert waited == [None]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    harness.wait_for_the_others()                                   # NCCL's barrier is told the GPU:
    assert waited == [None, [3]]                                    # left to guess, it warns


def test_rank_0_refused_at_the_lock_is_one_line_and_the_others_keep_quiet(gpt, run, corpus, tmp_path, monkeypatch):
    """Rank 0 takes out_dir's lock while the others wait at a barrier. When it is refused it
    says so; the barrier then breaks under the others, which is one line too, left unsaid."""
    out_dir = tmp_path / "out"
    harness.lock(str(out_dir))                                     # another run holds the folder
    try:
        code, _, err = run(gpt, "--data", corpus, out_dir=out_dir)
        assert_one_line_error(code, err, f"{out_dir} is in use by another run")

        def broken(*args, **kwargs):
            raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")
        pretend_two_processes(monkeypatch, broken)
        monkeypatch.setenv("RANK", "1")                            # rank 1 takes no lock, waits
        monkeypatch.setattr(harness, "join_processes", lambda device: device)   # joined already
        code, out, err = run(gpt, "--data", corpus, out_dir=out_dir)
        assert code == 1 and err == ""
    finally:
        harness.unlock(str(out_dir))
