"""On a CUDA machine only (skipped elsewhere): the GPU paths of the scripts."""
import pytest
import torch

from conftest import load_stage

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def test_every_stage_trains_and_samples_on_cuda(stage, run, corpus, tmp_path):
    code, out, err = run(stage, "--data", corpus, "--device", "cuda", "--dtype", "auto")
    assert code == 0, err
    metrics = run.metrics(stage)
    assert metrics["device"] == "cuda"
    code, out, err = run(stage, "--sample", "--device", "cuda", "--max_new_tokens", "20", tiny=False,
                         out_dir=tmp_path / "out" / stage.STAGE)
    assert code == 0, err


def test_cuda_attention_and_cache_agree():
    gpt = load_stage("gpt")
    torch.manual_seed(0)
    layer = gpt.CausalSelfAttention(n_embd=64, n_head=4, block_size=32, dropout=0.0).cuda().eval()
    x = torch.randn(2, 32, 64, device="cuda")
    layer.fused = True
    fused = layer(x)
    layer.fused = False
    assert torch.allclose(fused, layer(x), atol=1e-4)
    args = gpt.parse_args(["--n_embd", "32", "--n_head", "2", "--n_layer", "2", "--block_size", "16",
                           "--dtype", "float32", "--temperature", "0"])
    gpt.fill_defaults(args, torch.device("cuda"))
    model = gpt.make_model(20, args).cuda()
    prompt = torch.randint(20, (1, 3), device="cuda")
    runs = [torch.cat(list(gpt.generate(model, prompt, 40, args, torch.device("cuda"),
                                        torch.Generator(device="cuda").manual_seed(0), use_cache=c)), dim=1)
            for c in (True, False)]
    assert torch.equal(runs[0], runs[1])
