"""tools/bench.py's arithmetic (the timing itself is a benchmark, not a test)."""
import os
import subprocess
import sys

import bench  # tools/, on the path from conftest
import pytest
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


def test_the_peak_is_measured_each_round_and_its_best_kept(monkeypatch, capsys):
    """Drift moves the peak as it moves the rows: a peak measured once, in a slow minute, would
    flatter every fraction. So it is measured before each round, and the best counts."""
    peaks = iter([100.0, 10.0, 300.0, 20.0, 200.0, 30.0])         # float32, bfloat16; three rounds
    monkeypatch.setattr(bench, "matmul_peak", lambda device, dtype: next(peaks))
    speeds = iter([1000.0, 3000.0, 2000.0])
    monkeypatch.setattr(bench, "time_training", lambda *args: dict(
        tokens_per_sec=next(speeds), dtype="float32", params=1, peak_rss_mb=1.0))
    config = [("gpt", "nanoGPT", bench.config_argv(bench.NANOGPT_CPU))]
    report = bench.bench_training(torch.device("cpu"), config, 1, None, 65, repeats=3)
    assert report["peaks_gflops"] == {"float32": 300.0, "bfloat16": 30.0}
    row, = report["training"]
    assert row["tokens_per_sec"] == 3000.0
    assert row["of_peak"] == row["flops_per_token"] * 3000.0 / 1e9 / 300.0
    assert "float32 300 GFLOP/s" in capsys.readouterr().out



def test_a_float16_run_gets_a_float16_peak(monkeypatch):
    """Review finding: gpt.py takes float16 on a V100 or T4, and the table had no peak for it."""
    monkeypatch.setattr(bench, "matmul_peak", lambda device, dtype: {torch.float16: 500.0}.get(dtype, 100.0))
    monkeypatch.setattr(bench, "time_training", lambda *args: dict(
        tokens_per_sec=1000.0, dtype="float16", params=1, peak_rss_mb=1.0))
    config = [("gpt", "nanoGPT", bench.config_argv(bench.NANOGPT_CPU))]
    row, = bench.bench_training(torch.device("cpu"), config, 1, None, 65, repeats=1)["training"]
    assert row["of_peak"] == row["flops_per_token"] * 1000.0 / 1e9 / 500.0


@pytest.mark.skipif(not bench.HAS_PROC, reason="no /proc: the bench keeps wait4's ru_maxrss there")
def test_a_script_s_peak_memory_is_its_own_not_the_bench_s(tmp_path):
    """On Linux a child is credited with the memory of the process that started it: here, the
    bench's, with PyTorch loaded and large matrices made. The peak must be the script's own."""
    held = torch.ones(2 ** 28 // 4)                                   # 256 MiB more in this process
    script = tmp_path / "fill.py"
    script.write_text("import sys\ndata = b'x' * (48 * 2 ** 20)\nsys.exit(3)\n")   # its exit status kept
    report = tmp_path / "peak_kb"
    command = bench.reporting_peak([sys.executable, str(script)], report)
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3
    assert 48 < bench.peak_mb(report, usage) < 48 + 100                # Python itself: about 10 MiB
    assert held.sum() > 0
