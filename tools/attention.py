"""Pictures of what attention learned: every head's attention weights for a prompt.

    python tools/attention.py --stage gpt              its default prompt: "ROMEO:", a new line, "What light"
    python tools/attention.py --stage single_attention --prompt "First Citizen:"
    python tools/attention.py --stage gpt --prompt $'KING:\\nMy lord'     (bash's $'...' makes \\n a new line)
    python tools/attention.py --stage gpt --html attention.html        a page to explore, one file
                                                    (--screenshot PNG: a picture of it, with Chromium)

It loads the stage's trained checkpoint (out/<stage>/ckpt.pt, or --out_dir) and draws one
panel per head, one row per layer for gpt.py, into docs/attention_<stage>.png (or --output).
In a panel, row t is the query at the prompt's t-th character and column s a key: the colour
is how much of position s's value position t takes. Each row sums to 1; the future, to the
right of the diagonal, is masked out and left empty. The weights are the model's own, as
harness.load(stage).attention(prompt) gives them in a notebook: each attention_weights
method is watched while the model reads the prompt once.
"""
import argparse
import base64
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from report import STAGES as ALL_STAGES, pyplot, save_figure

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import harness  # noqa: E402  (after the path is set)

STAGES = tuple(ALL_STAGES[1:])                                     # bigram.py has no attention


def shown(ch):
    """A character as a tick label: newline and space made visible."""
    return {"\n": "\u23ce", " ": "\u2423", "\t": "\u21e5"}.get(ch, ch)


def draw(layers, prompt, title, path):
    import matplotlib
    plt = pyplot()
    rows, cols, T = len(layers), layers[0].shape[0], len(prompt)
    size = max(1.6, 0.16 * T + 0.6)
    width = max(size * cols + 0.8, 6.0)                           # room for the title
    fig, axes = plt.subplots(rows, cols, figsize=(width, size * rows + 0.9), squeeze=False)
    future = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)
    colours = matplotlib.colormaps["viridis"].with_extremes(bad="white")   # the future: empty
    labels = [shown(ch) for ch in prompt]
    for layer, weights in enumerate(layers):
        for head in range(cols):
            ax = axes[layer][head]
            picture = weights[head].float().masked_fill(future, math.nan).cpu().numpy()
            ax.imshow(picture, cmap=colours, vmin=0.0, vmax=1.0)
            ax.set_xticks(range(T), labels, fontsize=6, family="monospace")
            ax.set_yticks(range(T), labels, fontsize=6, family="monospace")
            ax.tick_params(length=0, pad=1)
            name = f"head {head + 1}" if rows == 1 else f"layer {layer + 1}, head {head + 1}"
            ax.set_title(name, fontsize=8)
    fig.supxlabel("key: the character attended to", fontsize=9)
    fig.supylabel("query: the character attending", fontsize=9)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path, dpi=120)


def page(trained, prompt, layers):
    """The explorable page: tools/attention.html with the weights inside it, as bytes (0 to 255
    for 0 to 1, base64), so that a long prompt stays small; no request leaves the file."""
    weights = torch.stack(layers).clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()   # (L, H, T, T)
    data = dict(stage=trained.args.prog[:-3], prompt=prompt, layers=weights.shape[0], heads=weights.shape[1],
                checkpoint=str(Path(trained.args.out_dir) / "ckpt.pt"), step=trained.args.saved_step,
                val_loss=trained.args.saved_val_loss, weights=base64.b64encode(weights.tobytes()).decode())
    script = json.dumps(data).replace("<", "\\u003c")                 # no "</script>" can end it early
    return (Path(__file__).with_name("attention.html")).read_text(encoding="utf-8").replace("/*DATA*/null", script)


BROWSERS = ("chromium", "chromium-browser", "google-chrome")        # Debian's package: chromium


def chromium():
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def render(path, fragment="", screenshot=None, size="1400,1000"):
    """Open the page in headless Chromium, its script run: the DOM it ends with, or a PNG."""
    browser = chromium()
    if browser is None:
        raise RuntimeError("no Chromium here: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:                  # and no network, no extras
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   f"--user-data-dir={profile}", "--virtual-time-budget=3000", f"--window-size={size}",
                   f"--screenshot={screenshot}" if screenshot else "--dump-dom",
                   Path(path).resolve().as_uri() + (f"#{fragment}" if fragment else "")]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, HOME=profile))
    if done.returncode != 0:
        raise RuntimeError(f"chromium failed: {done.stderr[-500:]}")
    return done.stdout


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", required=True, choices=ALL_STAGES)
    parser.add_argument("--prompt", default="ROMEO:\nWhat light", help="the text whose attention is drawn")
    parser.add_argument("--out_dir", default=None, help="where the stage's ckpt.pt is (default out/<stage>)")
    parser.add_argument("--output", type=Path, default=None, help="the PNG (default docs/attention_<stage>.png)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--html", type=Path, default=None, help="write the page to explore here, instead "
                        "of the PNG")
    parser.add_argument("--screenshot", type=Path, default=None, help="with --html, a PNG of the page too "
                        "(headless Chromium)")
    args = parser.parse_args(argv)
    if args.stage == "bigram":
        print("attention: error: bigram.py has no attention to draw: its table looks at one character",
              file=sys.stderr)
        return 1
    if args.screenshot and not args.html:
        print("attention: error: --screenshot is of the page: give --html too", file=sys.stderr)
        return 1
    try:
        if not args.html:
            import matplotlib  # noqa: F401  (a dev dependency: requirements-dev.txt)
    except ImportError:
        print("attention: error: drawing needs matplotlib: pip install -r requirements-dev.txt", file=sys.stderr)
        return 1
    try:                                                           # the lines a notebook would use
        trained = harness.load(__import__(args.stage), args.out_dir, args.device)
        layers = trained.attention(args.prompt)
    except harness.CLIError as e:
        print(f"attention: error: {e}", file=sys.stderr)
        return 1
    if args.html:
        args.html.parent.mkdir(parents=True, exist_ok=True)
        args.html.write_text(page(trained, args.prompt, layers), encoding="utf-8")
        print(f"attention: wrote {args.html} ({args.html.stat().st_size:,} bytes)")
        if args.screenshot:
            try:
                render(args.html, "click=9", screenshot=args.screenshot.resolve())
            except RuntimeError as e:
                print(f"attention: error: {e}", file=sys.stderr)
                return 1
            print(f"attention: wrote {args.screenshot}")
        return 0
    output = args.output or ROOT / "docs" / f"attention_{args.stage}.png"
    draw(layers, args.prompt, f"{args.stage}.py: attention weights for {args.prompt!r}", output)
    print(f"attention: wrote {output} ({len(layers)} layer(s) x {layers[0].shape[0]} head(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
