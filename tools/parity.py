"""The same run on the CPU and on another device: the first steps' losses side by side.

    python tools/parity.py                   the CPU in float32 against the GPU (CUDA, else MPS)
                                             in float32, 20 steps of gpt.py's laptop preset
    python tools/parity.py --device cuda --dtype bfloat16 --steps 50
    python tools/parity.py --device cpu --dtype float16    the CPU against itself in float16:
                                             runs anywhere (PyTorch 2.3 on)

Both runs start from the same weights (made on the CPU from the seed) and draw the same
batches (also the CPU's), so that their losses differ only by the devices' arithmetic (and in
float16 by the steps its gradient scaler skips, marked). Dropout is off: each device draws its
own random numbers for it. Each run is the stage's own main(),
with every setting as the command line gives it (on CUDA, TF32 for float32 products, as
`python gpt.py` does); the tool records the loss of each training step. It prints the table
and exits 1 if a difference is above --tolerance.
"""
import argparse
import contextlib
import io
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import harness  # noqa: E402  (after the path is set)

# float32 against float32 differs by the order of the sums, and by TF32 on CUDA (10 bits of
# mantissa stored, as float16); bfloat16 stores 7. The losses' differences grow over the steps.
TOLERANCE = {"float32": 0.01, "float16": 0.02, "bfloat16": 0.05}


def step_losses(stage, argv):
    """The loss of each training step of stage.main(argv), and whether float16's gradient scaler
    skipped it (its scale went down)."""
    losses, scales, real = [], [], harness.TrainingRun.stepped

    def stepped(run, step, loss):
        scales.append(run.scaler.get_scale())                     # after this step's update
        losses.append((loss.item(), scales[-1] < (scales[-2] if len(scales) > 1 else run.scale)))
        real(run, step, loss)

    harness.TrainingRun.stepped = stepped
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out, \
                contextlib.redirect_stderr(io.StringIO()) as err:
            code = stage.main(argv)
    finally:
        harness.TrainingRun.stepped = real
    if code != 0:
        sys.exit(f"parity: {' '.join(argv[-4:])}: {(err.getvalue().strip() or out.getvalue()).splitlines()[-1]}")
    return losses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", default="gpt", choices=["bigram", "single_attention", "multi_head_attn", "gpt"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="the device to check against the CPU (auto: cuda, else mps)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="its precision (the CPU's: float32)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tolerance", type=float, help="the largest difference in nats that passes "
                        f"(default by --dtype: {', '.join(f'{k} {v}' for k, v in TOLERANCE.items())})")
    args, overrides = parser.parse_known_args(argv)               # e.g. --seed, --data, --n_layer
    if args.device == "auto":
        has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        args.device = "cuda" if torch.cuda.is_available() else "mps" if has_mps else None
    if args.device is None:
        sys.exit("parity: no CUDA GPU or Apple MPS here; try --device cpu --dtype float16")
    if args.steps < 1:
        sys.exit(f"parity: --steps must be at least 1, not {args.steps}")
    tolerance = TOLERANCE[args.dtype] if args.tolerance is None else args.tolerance
    stage = __import__(args.stage)
    common = ["--max_iters", str(args.steps), "--eval_interval", str(args.steps), "--eval_iters", "1",
              "--max_new_tokens", "0"] + (["--dropout", "0"] if "dropout" in stage.HYPERPARAMETERS else [])
    common += ["--preset", "laptop"] if getattr(stage, "PRESETS", None) else []
    here = Path.cwd()
    with tempfile.TemporaryDirectory() as folder:
        if not any(a.split("=")[0] == "--data" for a in overrides):   # input.txt: the repository's
            os.chdir(ROOT)
        try:
            runs = [(device, dtype, step_losses(stage, common + overrides + [
                        "--out_dir", str(Path(folder) / f"run{i}"), "--device", device, "--dtype", dtype]))
                    for i, (device, dtype) in enumerate((("cpu", "float32"), (args.device, args.dtype)))]
        finally:
            os.chdir(here)
    (a, a_dtype, first), (b, b_dtype, second) = runs
    names = [f"{a} {a_dtype}", f"{b} {b_dtype}"]
    print(f"{args.stage}.py, {' '.join(common + overrides)}")
    print(f"{'step':>5}  {names[0]:>14}  {names[1]:>14}  {'difference':>10}")
    differences = [abs(x - y) for (x, _), (y, _) in zip(first, second)]
    for step, ((x, a_skipped), (y, b_skipped), d) in enumerate(zip(first, second, differences), start=1):
        skipped = " (skipped)" if a_skipped or b_skipped else ""
        print(f"{step:>5}  {x:>14.5f}  {y:>14.5f}  {d:>10.5f}{skipped}")
    worst = max(differences, key=lambda d: math.inf if math.isnan(d) else d)   # not a number: worst
    same = worst <= tolerance
    print(f"largest difference {worst:.5f} nats at step {differences.index(worst) + 1}; tolerance "
          f"{tolerance}: {'within it' if same else 'ABOVE IT'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
