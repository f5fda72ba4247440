"""Pictures of what attention learned: every head's attention weights for a prompt.

    python tools/attention.py --stage gpt              its default prompt: "ROMEO:", a new line, "What light"
    python tools/attention.py --stage single_attention --prompt "First Citizen:"
    python tools/attention.py --stage gpt --prompt $'KING:\\nMy lord'     (bash's $'...' makes \\n a new line)

It loads the stage's trained checkpoint (out/<stage>/ckpt.pt, or --out_dir) and draws one
panel per head, one row per layer for gpt.py, into docs/attention_<stage>.png (or --output).
In a panel, row t is the query at the prompt's t-th character and column s a key: the colour
is how much of position s's value position t takes. Each row sums to 1; the future, to the
right of the diagonal, is masked out and left empty. The weights are the model's own, as
harness.load(stage).attention(prompt) gives them in a notebook: each attention_weights
method is watched while the model reads the prompt once.
"""
import argparse
import math
import sys
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", required=True, choices=ALL_STAGES)
    parser.add_argument("--prompt", default="ROMEO:\nWhat light", help="the text whose attention is drawn")
    parser.add_argument("--out_dir", default=None, help="where the stage's ckpt.pt is (default out/<stage>)")
    parser.add_argument("--output", type=Path, default=None, help="the PNG (default docs/attention_<stage>.png)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"])
    args = parser.parse_args(argv)
    if args.stage == "bigram":
        print("attention: error: bigram.py has no attention to draw: its table looks at one character",
              file=sys.stderr)
        return 1
    try:
        import matplotlib  # noqa: F401  (a dev dependency: requirements-dev.txt)
    except ImportError:
        print("attention: error: drawing needs matplotlib: pip install -r requirements-dev.txt", file=sys.stderr)
        return 1
    try:                                                           # the lines a notebook would use
        layers = harness.load(__import__(args.stage), args.out_dir, args.device).attention(args.prompt)
    except harness.CLIError as e:
        print(f"attention: error: {e}", file=sys.stderr)
        return 1
    output = args.output or ROOT / "docs" / f"attention_{args.stage}.png"
    draw(layers, args.prompt, f"{args.stage}.py: attention weights for {args.prompt!r}", output)
    print(f"attention: wrote {output} ({len(layers)} layer(s) x {layers[0].shape[0]} head(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
