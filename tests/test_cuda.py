"""On a CUDA machine only (skipped elsewhere): the GPU paths of the scripts."""
import re

import pytest
import torch

import harness
from conftest import load_stage, tiny_args

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
CUDA = torch.device("cuda")


def test_every_stage_trains_resumes_and_samples_on_cuda(stage, run, corpus, tmp_path, no_tf32):
    code, out, err = run(stage, "--data", corpus, "--device", "cuda", "--dtype", "auto", "--max_iters", "10")
    assert code == 0, err
    metrics = run.metrics(stage)
    capability = torch.cuda.get_device_capability()
    expected = "bfloat16" if capability >= (8, 0) else "float16" if capability >= (7, 0) and \
        stage.__name__ == "gpt" else "float32"
    assert metrics["device"] == "cuda" and metrics["dtype"] == expected
    code, out, err = run(stage, "--data", corpus, "--device", "cuda", "--resume", "--max_iters", "20",
                         tiny=False, out_dir=tmp_path / "out" / stage.__name__)
    assert code == 0, err
    code, out, err = run(stage, "--sample", "--device", "cuda", "--max_new_tokens", "20", tiny=False,
                         out_dir=tmp_path / "out" / stage.__name__)
    assert code == 0, err
    assert not torch.backends.cuda.matmul.allow_tf32               # the command line put TF32 back


def test_fused_and_written_out_attention_agree_on_cuda(monkeypatch, no_tf32):
    gpt = load_stage("gpt")
    torch.manual_seed(0)
    layer = gpt.CausalSelfAttention(n_embd=64, n_head=4, block_size=32, dropout=0.0).cuda().eval()
    x = torch.randn(2, 32, 64, device="cuda")
    monkeypatch.setattr(gpt, "use_fused_attention", lambda q: True)
    fused = layer(x)
    monkeypatch.setattr(gpt, "use_fused_attention", lambda q: False)
    assert torch.allclose(fused, layer(x), atol=1e-5)


def test_cache_gives_the_same_tokens_on_cuda(no_tf32):
    gpt = load_stage("gpt")
    args = tiny_args(gpt, "--temperature", "0", device="cuda")
    model = gpt.make_model(20, args).cuda()
    prompt = torch.randint(20, (1, 3), device="cuda")
    runs = [gpt.generate(model, prompt, 40, args, torch.Generator(device="cuda").manual_seed(0),
                         use_cache=use_cache) for use_cache in (True, False)]
    assert torch.equal(runs[0], runs[1])


def test_a_temperature_too_small_for_float32_samples_on_cuda(run, corpus, tmp_path):
    """CUDA flushes float32 numbers below 1.2e-38 to zero: 1e-45 once made 0/0 = nan there."""
    gpt = load_stage("gpt")
    assert run(gpt, "--data", corpus, "--device", "cuda")[0] == 0
    code, _, err = run(gpt, "--sample", "--device", "cuda", "--temperature", "1e-45", "--max_new_tokens", "5",
                       tiny=False, out_dir=tmp_path / "out" / "gpt")
    assert code == 0, err


def test_the_attention_weights_of_a_trained_model_on_cuda(run, corpus, tmp_path, no_tf32):
    gpt = load_stage("gpt")
    assert run(gpt, "--data", corpus, "--device", "cuda")[0] == 0
    layers = harness.load(gpt, tmp_path / "out" / "gpt", device="cuda").attention("ROMEO:")
    assert len(layers) == 2 and layers[0].is_cuda


def test_float16_trains_and_resumes_on_cuda(run, corpus, tmp_path):
    gpt = load_stage("gpt")
    out_dir = tmp_path / "out" / "gpt"
    code, out, err = run(gpt, "--data", corpus, "--device", "cuda", "--dtype", "float16", "--max_iters", "10")
    assert code == 0 and "float16 with a gradient scaler" in out, err
    code, out, err = run(gpt, "--data", corpus, "--device", "cuda", "--resume", "--max_iters", "20", tiny=False,
                         out_dir=out_dir)
    assert code == 0 and re.search(r"float16: the gradient scaler skipped \d+ of 20 steps", out), err
    last = torch.load(out_dir / "last.pt", weights_only=True)
    assert run.metrics(gpt)["dtype"] == "float16" and last["scaler"]["scale"] > 0


def test_the_cpu_and_the_gpu_agree_on_the_first_steps(corpus, capsys):
    import parity
    assert parity.main(["--device", "cuda", "--steps", "20", "--data", str(corpus)]) == 0, capsys.readouterr().out
