"""tools/bench.py's arithmetic (the timing itself is a benchmark, not a test)."""
import bench  # tools/, on the path from conftest
import torch


def test_flops_per_token_counts_weight_matrices_and_attention():
    module, args = bench.resolved_args("gpt", ["--preset", "full"], torch.device("cpu"))
    model = module.make_model(65, args)
    C, L, T = 384, 6, 256
    matrices = L * 12 * C * C + 65 * C                             # the blocks, and the (tied) output layer
    assert bench.flops_per_token(model, T) == 6 * matrices + 12 * T * L * C
    module, args = bench.resolved_args("multi_head_attn", [], torch.device("cpu"))
    model = module.make_model(65, args)
    C = args.n_embd
    assert bench.flops_per_token(model, 64) == 6 * (3 * C * C + C * C + 65 * C) + 12 * 64 * C


def test_config_strings_become_options():
    assert bench.config_argv("n_layer=4 block_size=64") == ["--n_layer", "4", "--block_size", "64"]


def test_sampling_rows_cover_the_cache_and_restore_the_kernels(capsys):
    gpt = bench.load("gpt")
    kernels = gpt.one_vector_kernels
    rows = bench.bench_sampling(torch.device("cpu"), 2, 65)
    assert [r["stage"] for r in rows] == bench.STAGES + ["gpt", "gpt", "gpt"]
    assert [r["cache"] for r in rows[-3:]] == ["without the cache", "with the cache", "with the cache, oneDNN on"]
    assert all(r["tokens_per_sec"] > 0 for r in rows)
    assert gpt.one_vector_kernels is kernels
    assert "key/value cache speed-up at context 256" in capsys.readouterr().out
