"""Speed of every stage, measured against this machine's own matrix-multiply peak.

    python tools/bench.py                        each stage at its defaults, gpt.py also at
                                                 nanoGPT's CPU recipe; then sampling speed
    python tools/bench.py --config "n_layer=4 n_embd=128 block_size=64 batch_size=12"
                                                 gpt.py at another configuration as well
    python tools/bench.py --corpus               loading a 10 MB and a 100 MB corpus
    python tools/bench.py --heads                gpt.py's step with its batched heads, and with
                                                 stage 3's list of heads instead

Training is timed by running each script for real (a subprocess, its own training loop,
its own tokens/s, which leave out evaluations and saving), so the figures are what a user
gets. Each configuration runs --repeats times, interleaved with the others, and keeps its
best: on a shared machine one slow minute does not decide a row. Each row's GFLOP/s are
compared with the matrix-multiply peak of the precision that row used, measured in the
same run: once before each round of the rows, the best kept, as for the rows, so that a
slow minute cannot flatter a fraction (float16's, where a row took it, once after them).
With --dtype float16 the stages without a gradient scaler train in float32. A table goes to
the terminal and everything to out/bench.json.
"""
import argparse
import contextlib
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from report import STAGES

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import harness  # noqa: E402  (after the path is set)

NANOGPT_CPU = "n_layer=4 n_head=4 n_embd=128 block_size=64 batch_size=12 dropout=0.0"   # nanoGPT's README
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def matmul_peak(device, dtype, tries=3):
    """GFLOP/s of a large square matrix product, the best of a few one-second tries:
    the most this machine does in `dtype`. On CUDA the float32 peak is TF32's, as the
    scripts train with TF32 matrix products there."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = device.type == "cuda"
    try:
        return max(matmul_speed(device, dtype) for _ in range(tries))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def matmul_speed(device, dtype, seconds=1.0):
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        sync(device) if count % 8 == 0 else None
    sync(device)
    return 2 * n ** 3 * count / (time.perf_counter() - start) / 1e9


def sync(device):
    if device.type in ("cuda", "mps"):
        getattr(torch, device.type).synchronize()


def load(stage):
    return __import__(stage)


def resolved_args(stage, argv, device):
    """A stage's settled arguments, as its command line makes them (--sample: nothing is locked)."""
    module = load(stage)
    args = harness.parse_args(module, argv + ["--sample"])
    harness.configure(module, args, device)
    return module, args


def flops_per_token(model, block_size):
    """6N for the weight matrices (forward and backward), plus attention's scores and
    weighted sums, 12 * T * (width of all heads), as in the PaLM paper's appendix."""
    matrices = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    heads = 0
    for m in model.modules():
        if type(m).__name__ == "Head":
            heads += m.key.out_features
        elif type(m).__name__ == "CausalSelfAttention":
            heads += m.qkv.out_features // 3
    return 6 * matrices + 12 * block_size * heads


def config_argv(config):
    return [part for item in config.split() for part in ("--" + item.split("=")[0], item.split("=")[1])]


# A script's own peak memory. On Linux, wait4's ru_maxrss will not do: a child started from
# this process (PyTorch loaded, its matrices made) is credited with this process's memory when
# it replaces itself with the script. So the script is run by a few lines that write its own
# high-water mark (VmHWM, which starts afresh with the script) to a file as it exits. Processes
# the script starts itself (--compile's workers) are not counted; the bench starts none such.
HAS_PROC = Path("/proc/self/status").exists()
OWN_PEAK = """import atexit, runpy, sys
def report(path=sys.argv.pop(1)):
    with open("/proc/self/status") as status, open(path, "w") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
atexit.register(report)
sys.argv.pop(0)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def reporting_peak(command, report):
    """`command` (Python, its options, then a script and the script's own), changed to write the
    script's peak memory to the file `report`; unchanged where there is no /proc."""
    script = next(i for i, part in enumerate(command) if part.endswith(".py"))
    return command[:script] + ["-c", OWN_PEAK, str(report)] + command[script:] if HAS_PROC else command


def peak_mb(report, usage):
    if HAS_PROC:
        if not Path(report).exists():
            sys.exit(f"bench: the script wrote no peak memory to {report}")
        return int(Path(report).read_text()) / 2 ** 10              # kB
    return usage.ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)   # macOS: bytes


def time_training(stage, argv, data, device, steps):
    """Run the script for `steps` steps; its tokens/s, and the process's peak memory."""
    with tempfile.TemporaryDirectory() as out_dir:
        command = [sys.executable, f"{stage}.py", "--data", str(data), "--out_dir", out_dir, "--device",
                   device.type, "--max_iters", str(steps), "--eval_interval", str(steps), "--eval_iters", "1",
                   "--max_eval_chars", "1000", "--max_new_tokens", "0", *argv]
        report = Path(out_dir) / "peak_kb"
        with tempfile.TemporaryFile() as errors:                    # a file: a pipe could fill and block
            process = subprocess.Popen(reporting_peak(command, report), cwd=ROOT, stdout=subprocess.DEVNULL,
                                       stderr=errors)
            _, status, usage = os.wait4(process.pid, 0)
            if status != 0:
                errors.seek(0)
                sys.exit(f"bench: {' '.join(command)} failed:\n{errors.read().decode()[-2000:]}")
        metrics = json.loads((Path(out_dir) / "metrics.json").read_text())
        metrics["peak_rss_mb"] = peak_mb(report, usage)
    return metrics


def time_generation(module, args, device, new_tokens, vocab_size, use_cache=None):
    torch.manual_seed(0)
    model = module.make_model(vocab_size, args).to(device)
    idx = torch.zeros((1, 1), dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    kwargs = {} if use_cache is None else {"use_cache": use_cache}
    sync(device)
    start = time.perf_counter()
    module.generate(model, idx, new_tokens, args, generator, **kwargs)
    sync(device)
    return new_tokens / (time.perf_counter() - start)


def bench_training(device, configs, steps, data, vocab_size, repeats):
    peaks, best = {}, {}
    for repeat in range(repeats):                                  # interleaved: A B C, A B C, ...
        for name in ("float32", "bfloat16"):                       # the peaks each round too:
            peaks[name] = max(peaks.get(name, 0.0), matmul_peak(device, DTYPES[name]))   # drift moves them
        for stage, label, argv in configs:
            metrics = time_training(stage, argv, data, device, steps)
            if (stage, label) not in best or metrics["tokens_per_sec"] > best[stage, label]["tokens_per_sec"]:
                best[stage, label] = metrics
    for name in {m["dtype"] for m in best.values()} - set(peaks):  # float16: once, where a run took it
        peaks[name] = matmul_peak(device, DTYPES[name])
    print("matrix-multiply peak: " + ", ".join(f"{name} {peak:.0f} GFLOP/s" for name, peak in peaks.items()))
    rows = []
    for stage, label, argv in configs:
        module, args = resolved_args(stage, argv, device)
        flops = flops_per_token(module.make_model(vocab_size, args), args.block_size)
        metrics = best[stage, label]
        tokens, gflops = metrics["tokens_per_sec"], flops * metrics["tokens_per_sec"] / 1e9
        rows.append(dict(stage=stage, config=label, dtype=metrics["dtype"], params=metrics["params"],
                         ms_per_step=1000 * args.batch_size * args.block_size / tokens, tokens_per_sec=tokens,
                         flops_per_token=flops, gflops=gflops, of_peak=gflops / peaks[metrics["dtype"]],
                         peak_rss_mb=metrics["peak_rss_mb"], peak_gpu_mb=metrics.get("peak_gpu_mb")))
        r = rows[-1]
        memory = f"{r['peak_rss_mb']:6.0f} MB" + (f", GPU {r['peak_gpu_mb']:,.0f} MB" if r["peak_gpu_mb"] else "")
        print(f"{stage + '.py ' + label:44} {r['dtype']:9} {r['ms_per_step']:8.1f} ms/step "
              f"{tokens:10,.0f} tok/s {gflops:7.1f} GFLOP/s  {r['of_peak']:5.2f} of the {r['dtype']} peak  "
              f"{memory}", flush=True)
    return dict(peaks_gflops=peaks, repeats=repeats, training=rows)


def bench_sampling(device, new_tokens, vocab_size, precision=()):
    """New tokens per second from a freshly initialised model (speed does not depend on its weights).
    gpt.py's full configuration also runs without the key/value cache, and with the cache but
    without one_vector_kernels (oneDNN kept on for the one-vector products), to show what each buys."""
    rows = []
    for stage in STAGES:
        module, args = resolved_args(stage, list(precision), device)
        rows.append(dict(stage=stage, config="defaults", cache=None,
                         tokens_per_sec=time_generation(module, args, device, new_tokens, vocab_size)))
    module, args = resolved_args("gpt", ["--preset", "full", *precision], device)   # context 256
    for label, use_cache in (("without the cache", False), ("with the cache", True)):
        rows.append(dict(stage="gpt", config="full (context 256)", cache=label,
                         tokens_per_sec=time_generation(module, args, device, new_tokens, vocab_size,
                                                        use_cache)))
    kernels = module.one_vector_kernels
    module.one_vector_kernels = lambda device, dtype_name: contextlib.nullcontext()
    try:
        rows.append(dict(stage="gpt", config="full (context 256)", cache="with the cache, oneDNN on",
                         tokens_per_sec=time_generation(module, args, device, new_tokens, vocab_size,
                                                        True)))
    finally:
        module.one_vector_kernels = kernels
    for r in rows:
        print(f"sampling, {r['stage']}.py {r['config']}{' ' + r['cache'] if r['cache'] else ''}: "
              f"{r['tokens_per_sec']:,.0f} new tokens/s")
    speed = {r["cache"]: r["tokens_per_sec"] for r in rows[-3:]}
    print(f"key/value cache speed-up at context 256: {speed['with the cache'] / speed['without the cache']:.1f}x "
          f"({speed['with the cache, oneDNN on'] / speed['without the cache']:.1f}x with oneDNN kept on)")
    return rows


class ListOfHeads(nn.Module):
    """gpt.py's MultiHeadAttention (stage 3's list of heads, with dropout) where its Block builds
    the batched CausalSelfAttention: what the list of heads would cost. No cache: training only."""

    def __init__(self, n_embd, n_head, block_size, dropout):
        super().__init__()
        self.heads = load("gpt").MultiHeadAttention(n_embd, n_head, block_size, dropout)

    def forward(self, x, cache=None):
        return self.heads(x)


def step_ms(module, args, device, attention, steps):
    """Milliseconds per training step of gpt.py's model built with `attention` in every Block."""
    batched, module.CausalSelfAttention = module.CausalSelfAttention, attention
    try:
        torch.manual_seed(0)
        model = module.make_model(65, args).to(device)
    finally:
        module.CausalSelfAttention = batched
    optimizer = module.make_optimizer(model, args, device)
    x = torch.randint(65, (args.batch_size, args.block_size), device=device)
    for step in range(steps + 2):                              # two to warm up
        if step == 2:
            sync(device)
            start = time.perf_counter()
        with harness.autocast(device, args.dtype):
            _, loss = model(x, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    return 1000 * (time.perf_counter() - start) / steps


def bench_heads(device, presets, steps, repeats, dtype=None):
    """A training step of gpt.py with its batched heads, (g), and with the list of heads of
    MultiHeadAttention: interleaved, the best of `repeats` each."""
    rows = []
    for preset in presets:                                     # each in the precision it is for
        precision = ["--dtype", dtype or ("float32" if preset == "laptop-float32" else "auto")]
        module, args = resolved_args("gpt", ["--preset", preset, *precision], device)
        best = {"batched": math.inf, "list": math.inf}
        for _ in range(repeats):
            for label, attention in (("batched", module.CausalSelfAttention), ("list", ListOfHeads)):
                best[label] = min(best[label], step_ms(module, args, device, attention, steps))
        rows.append(dict(preset=preset, dtype=args.dtype, batched_ms=best["batched"], list_ms=best["list"],
                         ratio=best["list"] / best["batched"]))
        print(f"heads, gpt.py {preset} ({args.dtype}): batched {best['batched']:.1f} ms/step, "
              f"list of heads {best['list']:.1f} ms/step, {rows[-1]['ratio']:.2f}x", flush=True)
    return rows


def load_seconds(path):
    """Seconds to read, check and encode a corpus with the scripts' own functions."""
    start = time.perf_counter()
    load("bigram").load_text(str(path))
    return time.perf_counter() - start


def bench_corpus(source):
    """Load time, launch-to-first-step time and peak memory of bigram.py on a 10 MB and a 100 MB text."""
    text = Path(source).read_bytes()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for megabytes in (10, 100):
            path = Path(folder) / f"corpus_{megabytes}mb.txt"
            with open(path, "wb") as f:
                for _ in range(megabytes * 10 ** 6 // len(text) + 1):
                    f.write(text)
            command = [sys.executable, "-u", "bigram.py", "--data", str(path), "--out_dir", str(Path(folder) / "out"),
                       "--max_iters", "1", "--eval_iters", "1", "--max_new_tokens", "0"]
            start, report = time.perf_counter(), Path(folder) / f"peak_kb_{megabytes}"
            process = subprocess.Popen(reporting_peak(command, report), cwd=ROOT, stdout=subprocess.PIPE, text=True)
            first_step = None
            for line in process.stdout:
                if line.startswith("step 0:") and first_step is None:
                    first_step = time.perf_counter() - start
            _, status, usage = os.wait4(process.pid, 0)
            if status != 0 or first_step is None:
                sys.exit(f"bench: {' '.join(command)} failed (exit status {status})")
            rows.append(dict(megabytes=path.stat().st_size / 1e6, launch_to_first_step_s=first_step,
                             whole_run_s=time.perf_counter() - start, peak_rss_mb=peak_mb(report, usage),
                             load_s=load_seconds(path)))
            r = rows[-1]
            print(f"corpus of {r['megabytes']:.0f} MB: read and encoded in {r['load_s']:.2f} s; training starts "
                  f"{first_step:.1f} s after launch; whole run {r['whole_run_s']:.1f} s; peak memory "
                  f"{r['peak_rss_mb']:.0f} MB", flush=True)
    print(f"load time, 100 MB over 10 MB: {rows[1]['load_s'] / rows[0]['load_s']:.1f}x")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", default=[],
                        help='another gpt.py configuration, e.g. "n_layer=4 n_embd=128" (repeatable)')
    parser.add_argument("--steps", type=int, default=None, help="training steps timed per configuration "
                        "(default 200; with --heads, 20)")
    parser.add_argument("--new_tokens", type=int, default=1000, help="tokens generated per sampling test")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--corpus", action="store_true", help="only the large-corpus loading test")
    parser.add_argument("--heads", action="store_true", help="only gpt.py's training step with its "
                        "batched heads against stage 3's list of heads")
    parser.add_argument("--data", default=str(ROOT / "input.txt"),
                        help="text to train on (default input.txt, which python bigram.py downloads)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration, interleaved; "
                        "the best counts")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="the precision of every run (default: each script's own choice, auto)")
    parser.add_argument("--json", type=Path, default=ROOT / "out" / "bench.json")
    args = parser.parse_args(argv)
    if not args.heads and not Path(args.data).exists():
        sys.exit(f"bench: no {args.data}: run python bigram.py once (it downloads it), or pass --data")
    device = harness.pick_device(args.device)
    hardware = harness.hardware_name(device)
    print(f"{hardware}; PyTorch {torch.__version__}; Python {platform.python_version()}")
    report = dict(hardware=hardware, device=device.type, torch=torch.__version__)
    if args.corpus:
        report["corpus"] = bench_corpus(args.data)
    elif args.heads:
        presets = ["full"] if device.type == "cuda" else ["laptop", "laptop-float32"]
        report["heads"] = bench_heads(device, presets, args.steps or 20, args.repeats, args.dtype)
    else:
        precision = ["--dtype", args.dtype] if args.dtype else []
        trains_in = {stage: ["--dtype", "float32"] if args.dtype == "float16" and not   # no scaler:
                     harness.scales_gradients(load(stage)) else precision for stage in STAGES}   # float32
        configs = [(stage, "defaults", trains_in[stage]) for stage in STAGES]
        configs += [("gpt", config, config_argv(config) + precision) for config in [NANOGPT_CPU] + args.config]
        vocab_size = load("bigram").load_text(args.data)[0].vocab_size
        report.update(bench_training(device, configs, args.steps or 200, args.data, vocab_size, args.repeats))
        report["sampling"] = bench_sampling(device, args.new_tokens, vocab_size, precision)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(f"bench: wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
