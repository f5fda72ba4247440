"""The step from multi_head_attn.py to gpt.py, one idea at a time, each measured.

    python tools/ladder.py               six rungs on the CPU in float32 (about 8 minutes on
                                         2 cores with AVX-512), then rewrite README.md's ladder table,
                                         docs/ladder.json and docs/ladder.png
    python tools/ladder.py --max_iters 5 --out_dir /tmp/ladder --readme /tmp/README.md \
        --results /tmp/ladder.json --figure /tmp/ladder.png
                                         the same, tiny, leaving the repository's files alone

Every rung trains with one budget: the same steps, batch, context, seed and precision, so
that they compare. Each is built from gpt.py's own classes (CausalSelfAttention, FeedForward,
Block, GPT) and trained by gpt.py's own main(); a rung swaps pieces in here, never by flags
in gpt.py. The rungs follow the lecture: multi_head_attn.py; a feed-forward layer after the
attention; blocks with residual connections; layer norm; a bigger model with dropout; and
then GPT-2's and GPT-3's training recipe (initialisation, weight tying, AdamW's groups,
warmup and cosine decay, clipping), which the lecture does not use. Options it does not know
(--max_iters, --device, --dtype, ...) go to every rung, so they must be ones that
multi_head_attn.py knows too. The rungs' checkpoints, in --out_dir, hold models that gpt.py
itself does not build: gpt.py --sample refuses them.
"""
import argparse
import contextlib
import io
import json
import os
import shlex
import sys
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import gpt  # noqa: E402  (after the path is set)
import multi_head_attn  # noqa: E402
from report import between_markers, has_markers, pyplot, save_figure  # noqa: E402  (tools/)

BUDGET = ["--block_size", "64", "--batch_size", "32", "--max_iters", "600", "--eval_interval", "200",
          "--eval_iters", "25", "--dtype", "float32", "--max_new_tokens", "0", "--device", "cpu"]
SMALL = ["--n_embd", "128", "--n_head", "4"]
LARGE = ["--n_embd", "192", "--n_head", "6", "--dropout", "0.1"]
PLAIN = ["--learning_rate", "1e-3", "--grad_clip", "0", "--weight_decay", "0.01"]   # the lecture's AdamW
BEGIN, END = "<!-- ladder:begin (tools/ladder.py writes this part) -->", "<!-- ladder:end -->"


class Rung(nn.Module):
    """Embeddings, a stack of layers made of gpt.py's parts, a read-out: the lecture's model at
    each of its steps. PyTorch's default initialisation, no weight tying: that is the recipe's."""

    def __init__(self, vocab_size, args, layer, final_norm):
        super().__init__()
        self.token_embedding_table = nn.Embedding(vocab_size, args.n_embd)
        self.position_embedding_table = nn.Embedding(args.block_size, args.n_embd)
        self.dropout = nn.Dropout(args.dropout)
        self.blocks = nn.ModuleList([layer(args) for _ in range(args.n_layer)])
        self.ln_f = nn.LayerNorm(args.n_embd) if final_norm else nn.Identity()
        self.lm_head = nn.Linear(args.n_embd, vocab_size)

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        x = self.dropout(self.token_embedding_table(idx) + self.position_embedding_table(torch.arange(T, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


class FeedForwardAfterAttention(nn.Module):
    """Attention, then a feed-forward layer: no residual connection, no layer norm."""

    def __init__(self, args):
        super().__init__()
        self.attention = gpt.CausalSelfAttention(args.n_embd, args.n_head, args.block_size, args.dropout)
        self.feed_forward = gpt.FeedForward(args.n_embd, args.dropout)

    def forward(self, x):
        return self.feed_forward(self.attention(x))


class ResidualBlock(FeedForwardAfterAttention):
    """The same, each part added to a residual stream: gpt.py's Block without its layer norms."""

    def forward(self, x):
        x = x + self.attention(x)
        return x + self.feed_forward(x)


def plain_optimizer(model, args, device):                           # as stages 1-3 train
    return torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)


def constant_lr(step, args):
    return args.learning_rate


def block_with_norms(args):
    return gpt.Block(args.n_embd, args.n_head, args.block_size, args.dropout)


# name, what it adds, the lecture's validation loss (None: not in the lecture), the script,
# its options, and the pieces swapped into gpt.py: make_model, make_optimizer, get_lr
RUNGS = [
    ("multi_head_attn.py", "4 heads of attention, joined by a projection", 2.28, multi_head_attn, SMALL, None),
    ("+ feed-forward", "a feed-forward layer after the attention (gpt.py's: two layers, 4x wide, GELU; "
     "the lecture's at this step: one layer, ReLU)", 2.24, gpt, SMALL + ["--n_layer", "1"] + PLAIN,
     (lambda v, a: Rung(v, a, FeedForwardAfterAttention, False), plain_optimizer, constant_lr)),
    ("+ residual blocks", "4 blocks (the lecture's: 3), each part added to a residual stream", 2.08, gpt,
     SMALL + ["--n_layer", "4"] + PLAIN, (lambda v, a: Rung(v, a, ResidualBlock, False), plain_optimizer, constant_lr)),
    ("+ layer norm", "pre-norm in every block, one more at the end", 2.06, gpt, SMALL + ["--n_layer", "4"] + PLAIN,
     (lambda v, a: Rung(v, a, block_with_norms, True), plain_optimizer, constant_lr)),
    ("+ width and dropout", "width 192 and 6 heads, dropout 0.1", 1.48, gpt, LARGE + ["--n_layer", "4"] + PLAIN,
     (lambda v, a: Rung(v, a, block_with_norms, True), plain_optimizer, constant_lr)),
    ("+ training recipe", "GPT-2 initialisation, weight tying, AdamW groups (decay 0.1 on matrices only, "
     "beta2 0.99), clipping, warmup and cosine decay from a 3x higher peak rate", None, gpt,
     LARGE + ["--n_layer", "4", "--learning_rate", "3e-3", "--min_lr", "3e-4", "--grad_clip", "1.0",
              "--weight_decay", "0.1"], None),                # gpt.py's own rate, its laptop column's
]


@contextlib.contextmanager
def swapped(pieces):
    """gpt.py's make_model, make_optimizer and get_lr replaced for one rung, then put back."""
    names = ("make_model", "make_optimizer", "get_lr")
    before = [getattr(gpt, name) for name in names]
    if pieces:
        for name, piece in zip(names, pieces):
            setattr(gpt, name, piece)
    try:
        yield
    finally:
        for name, piece in zip(names, before):
            setattr(gpt, name, piece)


def climb(args, overrides):
    results, command = [], shlex.join(["python", "tools/ladder.py", *overrides])
    for number, (name, adds, lecture, script, options, pieces) in enumerate(RUNGS, start=1):
        out_dir = args.out_dir / f"rung{number}"
        argv = BUDGET + options + ["--out_dir", str(out_dir), "--seed", str(args.seed)] + overrides
        argv += ["--preset", "laptop-float32"] if script is gpt else []
        argv += ["--data", args.data] if args.data else []
        print(f"ladder: rung {number}, {name}", flush=True)
        with swapped(pieces), contextlib.redirect_stdout(io.StringIO()) as out:
            code = script.main(argv)
        if code != 0:
            sys.exit(f"ladder: rung {number} ({name}) failed:\n{out.getvalue()[-2000:]}")
        metrics = json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))
        results.append(dict(rung=number, name=name, adds=adds, lecture=lecture, params=metrics["params"],
                            iters=metrics["iters"], train_seconds=metrics["train_seconds"],
                            seconds=metrics["seconds"], val_loss=metrics["val_loss"], dtype=metrics["dtype"],
                            hardware=metrics["hardware"], torch=metrics["torch"], device=metrics["device"],
                            batch_size=metrics["batch_size"], block_size=metrics["block_size"],
                            command=command))
        print(f"ladder: rung {number}: full val loss {metrics['val_loss']:.4f} in {metrics['seconds']:.0f} s",
              flush=True)
    return results


def render(results):
    first = results[0]
    lines = [BEGIN, "", f"**{first['hardware']}** ({first['device']}, {first['dtype']}, PyTorch {first['torch']}): "
             f"every rung {first['iters']:,} steps of {first['batch_size']} x {first['block_size']} characters, "
             f"`{first.get('command', 'python tools/ladder.py')}`:", "",
             "| rung | what it adds | parameters | time | full val loss | the lecture's |",
             "|---|---|---:|---:|---:|---:|"]
    for r in results:
        lecture = f"{r['lecture']:.2f}" + (" (GPU, 5000 steps)" if r["rung"] == 5 else "") if r["lecture"] else ""
        lines.append(f"| {r['rung']}. {r['name']} | {r['adds']} | {r['params']:,} | {r['seconds']:.0f} s | "
                     f"**{r['val_loss']:.3f}** | {lecture} |")
    total = sum(r["seconds"] for r in results)
    lines += ["", f"All six: {total / 60:.1f} minutes.", "", END]
    return "\n".join(lines)


def draw(results, path):
    fig, ax = pyplot().subplots(figsize=(8, 3.6))
    names = [f"{r['rung']}. {r['name']}" for r in results]
    ax.barh(names, [r["val_loss"] for r in results], color="tab:blue", label="ours (full val loss)")
    for y, r in enumerate(results):
        ax.annotate(f"{r['val_loss']:.3f}", (r["val_loss"], y), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=8)
        if r["lecture"]:
            ax.plot(r["lecture"], y, "D", color="tab:red", label="the lecture" if y == 0 else None)
    ax.invert_yaxis()
    ax.set_xlim(1.3, max(r["val_loss"] for r in results) + 0.25)
    ax.set_xlabel("validation loss (nats per character)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"multi_head_attn.py to gpt.py, one idea at a time ({results[0]['iters']} steps each)", fontsize=10)
    save_figure(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="passed on to every rung (default: input.txt)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--out_dir", type=Path, default=ROOT / "out" / "ladder")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "ladder.json")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "ladder.png")
    parser.add_argument("--render", action="store_true", help="only redraw from the results file")
    args, overrides = parser.parse_known_args(argv)               # e.g. --max_iters, --device, --dtype
    for name in ("out_dir", "results", "readme", "figure"):       # the rungs run in the repository,
        setattr(args, name, getattr(args, name).resolve())        # where input.txt is or downloads to
    args.data = args.data and os.path.abspath(args.data)
    try:                                                          # what could fail after the climb
        text = args.readme.read_text(encoding="utf-8")            # fails before it
        results = json.loads(args.results.read_text(encoding="utf-8")) if args.render else None
    except (OSError, ValueError) as e:
        sys.exit(f"ladder: cannot read {getattr(e, 'filename', None) or args.results}: {getattr(e, 'strerror', e)}")
    if not has_markers(text, BEGIN, END):
        sys.exit(f"ladder: {args.readme} has no ladder markers ({BEGIN} ... {END})")
    if not args.render:
        here = os.getcwd()
        os.chdir(ROOT)
        try:
            results = climb(args, overrides)
        finally:
            os.chdir(here)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=1), encoding="utf-8")
    args.readme.write_text(between_markers(text, BEGIN, END, render(results)), encoding="utf-8")
    draw(results, args.figure)
    print(f"ladder: wrote {args.readme}, {args.figure} and {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
