"""The precision on each device, and float16's gradient scaler: every branch, on the CPU."""
import contextlib
import math
import re

import pytest
import torch

import harness
from conftest import (assert_one_line_error, cpu_autocast_on, ctrl_c_during_step, load_stage, losses_of, snapshot,
                      weights)

GPUS = {"GTX 1080": (6, 1), "P100": (6, 0), "T4": (7, 5), "V100": (7, 0), "A100": (8, 0), "H100": (9, 0)}
cpu_float16 = pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"),
                                 reason="PyTorch before 2.3: no float16 on the CPU")


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("stage_name", ["bigram", "gpt"])
def test_auto_on_each_cuda_gpu(gpu, stage_name, monkeypatch):
    """Defect this guards against: 'auto' took bfloat16 wherever torch.cuda.is_bf16_supported(),
    which counts emulation: a T4 or a V100 trained in an emulated bfloat16."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: GPUS[gpu])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)   # as 2.13 says on a T4
    native, tensor_cores = GPUS[gpu] >= (8, 0), GPUS[gpu] >= (7, 0)           # float16's: from the V100 on
    expected = "bfloat16" if native else "float16" if tensor_cores and stage_name == "gpt" else "float32"
    assert harness.pick_dtype("auto", torch.device("cuda"), load_stage(stage_name)) == expected


@pytest.mark.parametrize("flags, expected", [("avx2 avx512f avx512_bf16 amx_tile amx_bf16", "bfloat16"),
                                             ("avx2 avx512f avx512_bf16", "bfloat16"), ("avx2 avx512f", "float32"),
                                             ("avx2", "float32")])
@pytest.mark.parametrize("torch_tells", [True, False])
def test_auto_on_a_cpu_follows_its_bfloat16_instructions(flags, expected, torch_tells, monkeypatch, gpt):
    """AMX or AVX-512 BF16: bfloat16; AVX2 or plain AVX-512: float32, told by PyTorch's check, or
    where it has none (PyTorch 2.1 to 2.4) by the CPU's flags."""
    if torch_tells:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: "avx512_bf16" in flags, raising=False)
    else:
        monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.setattr(harness, "cpu_info", lambda: {"flags": flags})
    assert harness.pick_dtype("auto", torch.device("cpu"), gpt) == expected


@pytest.mark.parametrize("old_torch", [True, False])
def test_mps_trains_in_float32_on_every_pytorch(old_torch, monkeypatch, gpt):
    """On PyTorch 2.1 to 2.4 torch.autocast("mps", enabled=False) raises before it reads
    `enabled`: float32 on MPS must not call it at all."""
    called = []

    def autocast(device_type, *args, **kwargs):
        called.append(device_type)
        if device_type == "mps" and old_torch:
            raise RuntimeError("User specified an unsupported autocast device_type 'mps'")
        return contextlib.nullcontext()

    monkeypatch.setattr(torch, "autocast", autocast)
    mps = torch.device("mps")
    assert harness.pick_dtype("auto", mps, gpt) == "float32"
    with harness.autocast(mps, "float32"):
        pass
    with harness.autocast(torch.device("cpu"), "bfloat16"):        # the same helper, where it is on
        pass
    assert called == ["cpu"]
    for dtype in ("bfloat16", "float16"):
        with pytest.raises(harness.CLIError, match="on Apple's MPS this repository trains in float32 only"):
            harness.pick_dtype(dtype, mps, gpt)


@pytest.mark.filterwarnings("ignore")                              # CUDA's scaler, called where there is none
def test_float16_needs_a_loop_that_scales_and_a_pytorch_that_can(run, corpus, monkeypatch, tmp_path):
    bigram, gpt = load_stage("bigram"), load_stage("gpt")
    code, _, err = run(bigram, "--data", corpus, "--dtype", "float16")
    assert_one_line_error(code, err, "--dtype float16 needs a gradient scaler", "bigram.py has none")
    assert not (tmp_path / "out").exists()
    monkeypatch.delattr(torch.amp, "GradScaler", raising=False)   # PyTorch before 2.3
    code, _, err = run(gpt, "--data", corpus, "--dtype", "float16")
    assert_one_line_error(code, err, "--dtype float16 on the CPU needs PyTorch 2.3 or later")
    scaler = harness.grad_scaler(torch.device("cuda"), "float16")  # CUDA's own, there
    assert isinstance(scaler, torch.cuda.amp.GradScaler)


def test_bfloat16_is_refused_on_a_gpu_that_cannot_compute_it(gpt, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(harness.CLIError, match="this GPU cannot compute in it"):
        harness.pick_dtype("bfloat16", torch.device("cuda"), gpt)


def larger_first_scale(monkeypatch, scale=2.0 ** 30):
    """A first scale so large that the first steps' gradients overflow float16: the scaler skips
    them, halving it each time, as it does for a real overflow."""
    monkeypatch.setattr(harness, "grad_scaler", lambda device, dtype: torch.amp.GradScaler(
        device.type, init_scale=scale, enabled=dtype == "float16"))


FLOAT16 = ["--dtype", "float16", "--max_iters", "30"]


@cpu_float16
def test_float16_trains_on_the_cpu_and_counts_the_steps_it_skips(gpt, run, corpus, tmp_path, monkeypatch):
    larger_first_scale(monkeypatch)
    real, inside = harness.full_loss, []
    monkeypatch.setattr(harness, "full_loss", lambda *a: inside.append(cpu_autocast_on()) or real(*a))
    code, out, err = run(gpt, "--data", corpus, *FLOAT16)
    assert code == 0, err
    assert "cpu (" in out and "float16 with a gradient scaler" in out
    metrics, out_dir = run.metrics(gpt), tmp_path / "out" / "gpt"
    skipped = int(re.search(r"float16: the gradient scaler skipped (\d+) of 30 steps", out)[1])
    assert metrics["skipped_steps"] == skipped and 5 <= skipped < 30
    last = torch.load(out_dir / "last.pt", weights_only=True)
    assert last["skipped"] == skipped and last["scaler"]["scale"] == 2.0 ** 30 / 2 ** skipped
    assert metrics["dtype"] == last["config"]["dtype"] == "float16"
    steps = [int(line.split()[1].rstrip(":")) for line in out.splitlines() if line.startswith("step ")]
    val = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if line.startswith("step ")]
    assert steps == [0, 10, 20, 30] and val[-1] < val[0] - 0.3 and math.isfinite(metrics["val_loss"])
    assert inside == [False]                                       # the full loss: in float32


@cpu_float16
def test_a_float16_run_resumed_ends_as_an_unbroken_one(gpt, run, corpus, tmp_path, monkeypatch):
    """Stopped between evaluations while the scaler is still skipping steps: the resumed run must
    take the scale and the count from last.pt, or it skips them again."""
    stop = 7
    larger_first_scale(monkeypatch)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    extra = ["--dropout", "0.1"]
    assert run(gpt, "--data", corpus, *FLOAT16, *extra, out_dir=whole)[0] == 0
    ctrl_c_during_step(gpt, monkeypatch, stop)
    code, out, _ = run(gpt, "--data", corpus, *FLOAT16, *extra, out_dir=broken)
    assert code == 130 and f"interrupted at step {stop}" in out
    monkeypatch.undo()
    larger_first_scale(monkeypatch)                                # a fresh scaler would start here
    code, out, err = run(gpt, "--data", corpus, "--resume", "--max_new_tokens", "30", tiny=False, out_dir=broken)
    assert code == 0, err
    assert losses_of(broken) == losses_of(whole)
    same = ("best_step", "val_loss", "skipped_steps", "sample")
    assert {k: run.metrics(gpt, broken)[k] for k in same} == {k: run.metrics(gpt, whole)[k] for k in same}
    a, b = (torch.load(d / "last.pt", weights_only=True)["scaler"] for d in (broken, whole))
    assert a == b and a["scale"] < 2.0 ** 30                       # it did skip
    a, b = weights(broken / "last.pt"), weights(whole / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def poison(gpt, monkeypatch, steps):
    """The loss of these training steps (counted from 1) is not a number, as after an overflow in
    the forward pass; the estimates' are left alone."""
    real, count = gpt.GPT.forward, [0]

    def forward(self, idx, targets=None, caches=None):
        logits, loss = real(self, idx, targets, caches)
        if self.training and torch.is_grad_enabled():
            count[0] += 1
            if count[0] in steps:
                loss = loss * math.nan
        return logits, loss

    monkeypatch.setattr(gpt.GPT, "forward", forward)


@cpu_float16
def test_in_float16_a_step_that_is_not_a_number_is_skipped_not_fatal(gpt, run, corpus, monkeypatch):
    poison(gpt, monkeypatch, {5})
    code, out, err = run(gpt, "--data", corpus, *FLOAT16)
    assert code == 0, err
    assert run.metrics(gpt)["skipped_steps"] == 1 and "skipped 1 of 30 steps" in out
    poison(gpt, monkeypatch, {5})
    code, out, err = run(gpt, "--data", corpus, "--dtype", "float32")   # float32 has no scaler to skip it
    assert_one_line_error(code, err, "training diverged at step 5 (training loss nan)")


@cpu_float16
def test_in_float16_a_run_that_skips_every_step_has_diverged(gpt, run, corpus, tmp_path, monkeypatch):
    """The scale halves at each skipped step: from 2**16 to 1 after 16. A step that overflows even
    at scale 1 has numbers beyond float16 at their own size, and the run stops, its last good
    state kept."""
    poison(gpt, monkeypatch, set(range(12, 100)))
    out_dir = tmp_path / "out" / "gpt"
    code, _, err = run(gpt, "--data", corpus, *FLOAT16, "--eval_interval", "10")
    assert_one_line_error(code, err, "training diverged at step 28 (float16 overflowed even at a loss scale of 1; "
                                     "training loss nan)", "(step 20)")
    assert torch.load(out_dir / "last.pt", weights_only=True)["step"] == 20


@cpu_float16
def test_a_float32_run_resumed_in_float16_starts_a_new_scale(gpt, run, corpus, tmp_path):
    out_dir = tmp_path / "out" / "gpt"
    assert run(gpt, "--data", corpus, "--max_iters", "10")[0] == 0
    before = snapshot(out_dir)
    code, out, err = run(gpt, "--data", corpus, "--resume", "--max_iters", "20", "--dtype", "float16",
                         tiny=False, out_dir=out_dir)
    assert code == 0, err
    assert "float16 with a gradient scaler" in out and before.keys() <= snapshot(out_dir).keys()
    last = torch.load(out_dir / "last.pt", weights_only=True)
    assert last["config"]["dtype"] == "float16" and last["scaler"]["scale"] == 2.0 ** 16


PARITY_TINY = ["--n_layer", "1", "--n_embd", "16", "--n_head", "2", "--block_size", "16", "--batch_size", "4"]


def test_the_parity_tool_sets_two_runs_side_by_side(corpus, capsys):
    """tools/parity.py: the CPU in float32 against a device; here the CPU itself in bfloat16."""
    import parity
    argv = ["--device", "cpu", "--dtype", "bfloat16", "--steps", "3", "--data", str(corpus), *PARITY_TINY]
    assert parity.main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[0].isdigit()]
    assert [int(row[0]) for row in rows] == [1, 2, 3]
    assert all(abs(abs(float(a) - float(b)) - float(d)) < 2e-5 for _, a, b, d in rows)
    assert "cpu float32" in out and "cpu bfloat16" in out and "tolerance 0.05: within it" in out
    assert parity.main(argv + ["--tolerance", "0"]) == 1           # bfloat16 rounds: a little apart
    assert "ABOVE IT" in capsys.readouterr().out


@cpu_float16
def test_the_parity_tool_fails_a_loss_that_is_not_a_number(gpt, corpus, capsys, monkeypatch):
    """Review finding: max() passed over a NaN difference, and the tool said "within it"."""
    import parity
    poison(gpt, monkeypatch, {4 + 3})                              # the float16 run's third step
    argv = ["--device", "cpu", "--dtype", "float16", "--steps", "4", "--data", str(corpus), *PARITY_TINY]
    assert parity.main(argv) == 1
    out = capsys.readouterr().out
    assert "nan (skipped)" in out and "largest difference nan nats at step 3" in out and "ABOVE IT" in out


@cpu_float16
def test_a_stage_without_a_scaler_still_samples_in_float16(bigram, run, corpus):
    """Review finding: the refusal, about the training loop's scaler, also refused --sample."""
    assert run(bigram, "--data", corpus)[0] == 0
    code, out, err = run(bigram, "--sample", "--dtype", "float16", "--max_new_tokens", "20", tiny=False)
    assert code == 0 and len(out) > 20, err
