"""Rebuild the README's results: run the four stages, collect their figures, draw the loss curves.

    python tools/report.py              all four stages with their defaults (6 to 8 minutes
                                        on 2 AVX-512 BF16 cores, in float32 or bfloat16), then
                                        rewrite the results of README.md (a GPU's and a CPU's
                                        rows) and docs/results.md (every machine's, with
                                        samples), and docs/loss_curves.png
    python tools/report.py --quick      a smoke pass in seconds: tiny runs, written under
                                        out/report-quick/, README.md untouched
    python tools/report.py --render     only redraw README.md and the figure from docs/results.json

Each machine (device and hardware) and precision keeps its own rows in docs/results.json: a
run on a GPU, or in float32 where the CPU's rows are bfloat16, adds rows of its own and leaves
the others as they were. Options it does not know go to every script, and the command that
made each row is shown with it.
"""
import argparse
import csv
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["bigram", "single_attention", "multi_head_attn", "gpt"]
ADDS = {
    "bigram": "a table: next character from the current one",
    "single_attention": "embeddings + one causal self-attention head",
    "multi_head_attn": "several heads side by side",
    "gpt": "feed-forward, residual blocks, layer norm, dropout, the GPT-2/3 recipe",
}
QUICK = ["--max_iters", "40", "--eval_interval", "20", "--eval_iters", "4", "--batch_size", "8",
         "--block_size", "32", "--max_new_tokens", "120"]
QUICK_MODEL = {"bigram": [], "single_attention": ["--n_embd", "32"], "multi_head_attn": ["--n_embd", "32"],
               "gpt": ["--n_embd", "32", "--n_layer", "2", "--n_head", "4"]}
# published validation losses on tiny Shakespeare, drawn for comparison
REFERENCES = [  # value, label, colour, label above or below the line
    (2.45, "bigram floor (about 2.45)", "0.5", "bottom"),
    (2.40, "lecture: one head, 2.4", "tab:orange", "top"),
    (2.28, "lecture: four heads, 2.28", "tab:green", "top"),
    (1.88, "nanoGPT, CPU recipe: 1.88", "tab:purple", "bottom"),
    (1.48, "lecture: gpt.py, 1.48", "tab:red", "bottom"),
    (1.4697, "nanoGPT, GPU: 1.4697", "tab:brown", "top"),
]
BEGIN, END = "<!-- results:begin (tools/report.py writes this part) -->", "<!-- results:end -->"


def run_stage(stage, argv, log_path):
    """Run one stage's script as a learner would, its output kept in log_path; the seconds
    from start to exit, PyTorch's import included."""
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        done = subprocess.run([sys.executable, f"{stage}.py", *argv], cwd=ROOT, stdout=log,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"report: {stage}.py failed (exit {done.returncode}); its output is in {log_path}")
    return time.perf_counter() - start


def collect(stage, out_dir):
    metrics = json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))
    with open(out_dir / "log.csv", newline="", encoding="utf-8") as f:
        metrics["log"] = [[float(v) for v in row] for row in list(csv.reader(f))[1:]]
    return metrics


def machine_key(runs):
    """Rows are kept per machine, precision and command: a bfloat16 run never replaces a float32
    one, nor a run on other text or at other settings one at the defaults."""
    first = runs[0]
    key = f"{first['device']}: {first['hardware']}, {precision(runs)}" + (", compiled" if first.get("compile") else "")
    changed = first.get("report_options", [])                     # beyond --dtype, which the key names
    return key + (f", {' '.join(changed)}" if changed else "")


def precision(runs):
    """The runs' precision, or each that they took: on a GPU of compute capability 7.x, float16
    for gpt.py and float32 for the stages without its gradient scaler."""
    return " and ".join(dict.fromkeys(m["dtype"] for m in runs))


def report_options(argv):
    """The options given to this report that change what the scripts compute, --dtype aside
    (--stages only chooses which run)."""
    options, skipping = [], False
    skip = {"--out", "--results", "--readme", "--details", "--figure", "--render", "--stages"}
    for part in argv:
        if part.startswith("--"):                                 # an option, or its values after it
            skipping = part.split("=")[0] in skip
        if not skipping:
            options.append(part)
    return [part for i, part in enumerate(options) if part != "--dtype" and (not i or options[i - 1] != "--dtype")]


def fmt_time(seconds):
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def summary_keys(results):
    """The README's two tables: the first GPU's rows, and a CPU's in float32 (what most laptops
    train in; without such rows, the first CPU's). docs/results.md holds every machine's."""
    gpu = [key for key, runs in results.items() if runs[0]["device"] == "cuda"]
    cpu = [key for key, runs in results.items() if runs[0]["device"] != "cuda"]
    return gpu[:1] + ([key for key in cpu if results[key][0]["dtype"] == "float32"] or cpu)[:1]


def render_markdown(results, keys=None, samples=None):
    """A results section: a table per machine and precision, in keys (default all), the caption
    once, and the samples of those in samples (default the same)."""
    keys = list(results) if keys is None else keys
    lines = [BEGIN, ""]
    for key in keys:
        runs, first = results[key], results[key][0]
        commands = [m.get("report_command", "python tools/report.py") for m in runs]
        made_by = f"`{commands[0]}`" if len(set(commands)) == 1 else "the commands below the table"
        how = "each script with its defaults" if not first.get("report_options") else "each script run by"
        lines += [f"**{first['hardware']}** ({first['device']}, {precision(runs)}, PyTorch {first['torch']}), "
                  f"{how}, {made_by}:", "",
                  "| script | adds | parameters | steps | characters seen | time | tokens/s | "
                  "val loss (nats) | bits/char |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for m in runs:
            seen = m["iters"] * m["batch_size"] * m["block_size"]
            mixed = f" ({m['dtype']})" if " and " in precision(runs) else ""     # which took which
            lines.append(f"| `{m['stage']}.py`{mixed} | {ADDS[m['stage']]} | {m['params']:,} | {m['iters']:,} | "
                         f"{seen / 1e6:.1f} M | {fmt_time(m['seconds'])} | {m['tokens_per_sec']:,.0f} | "
                         f"**{m['val_loss']:.3f}** | {m['val_bpc']:.3f} |")
        if len(set(commands)) > 1:
            lines += [""] + [f"- `{m['stage']}.py`: `{command}`" for m, command in zip(runs, commands)]
        lines.append("")
    scored = {f"{m['val_chars']:,}" for key in keys for m in results[key]}
    lines += [f"Val loss is the full validation loss ({' and '.join(sorted(scored))} characters, each scored "
              "once) of the checkpoint with the best estimated validation loss; time is the whole run, "
              "start to exit.", ""]
    for key in keys if samples is None else samples:
        first = results[key][0]
        lines += [f"Samples on {first['hardware']} ({precision(results[key])}), the first lines after a newline "
                  "prompt:", ""]
        for m in results[key]:
            sample = [line for line in m["sample"].strip("\n").splitlines() if line.strip()][:3]
            lines += [f"`{m['stage']}.py`:", "```", *sample, "```"]
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def has_markers(text, begin, end):
    return 0 <= text.find(begin) < text.find(end)


def between_markers(text, begin, end, new):
    """text with its part from begin to end, both included, replaced by new (which holds them)."""
    head, rest = text.split(begin, 1)
    return head + new + rest.split(end, 1)[1]


def update_readme(readme, section):
    """Rewrite the results section of a markdown file (made if missing)."""
    text = readme.read_text(encoding="utf-8") if readme.exists() else f"{BEGIN}\n{END}\n"
    if not has_markers(text, BEGIN, END):
        sys.exit(f"report: {readme} has no results markers ({BEGIN} ... {END})")
    readme.write_text(between_markers(text, BEGIN, END, section), encoding="utf-8")


def pyplot():
    """matplotlib's pyplot, drawing into files only (matplotlib: requirements-dev.txt)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=110):
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def draw(results, path):
    """Validation loss of every stage in results against training time and against steps."""
    fig, axes = pyplot().subplots(1, 2, figsize=(12, 4.8), sharey=True)
    colors = dict(zip(STAGES, ["tab:gray", "tab:orange", "tab:green", "tab:red"]))
    styles = itertools.cycle(["-", "--", ":", "-."])               # one per machine and precision
    for (key, runs), style in zip(results.items(), styles):
        for m in runs:
            steps = [row[0] for row in m["log"]]
            seconds = [max(row[3], 0.1) for row in m["log"]]
            val = [row[2] for row in m["log"]]
            label = f"{m['stage']}.py ({m['device']}, {m['dtype']})"
            axes[0].plot(seconds, val, style, color=colors[m["stage"]], label=label)
            axes[1].plot(steps, val, style, color=colors[m["stage"]], label=label)
    for ax in axes:
        for value, label, color, where in REFERENCES:
            ax.axhline(value, color=color, lw=0.8, ls=(0, (4, 4)))
            if ax is axes[0]:                                      # labelled once, at the left
                ax.annotate(label, (0.01, value), xycoords=("axes fraction", "data"), fontsize=7, color=color,
                            va=where, xytext=(0, 2 if where == "bottom" else -2), textcoords="offset points")
        ax.set_ylim(1.3, 4.3)
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("training time (s, log scale)")
    axes[1].set_xlabel("training step")
    axes[0].set_ylabel("validation loss (nats per character, estimate)")
    axes[1].legend(fontsize=8, loc="upper right")
    fig.suptitle("tiny Shakespeare: validation loss of the four stages")
    save_figure(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny runs, written under out/report-quick/")
    parser.add_argument("--render", action="store_true", help="only redraw from the results file")
    parser.add_argument("--data", default=None, help="passed on to each script (default: its own, input.txt)")
    parser.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    parser.add_argument("--out", type=Path, default=None, help="where the runs and, with --quick, "
                        "everything else go (default out/report, or out/report-quick)")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results.json")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--details", type=Path, default=ROOT / "docs" / "results.md",
                        help="where every machine's rows and samples go")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "loss_curves.png")
    args, extra = parser.parse_known_args(argv)                    # anything else goes to every script
    report_argv = list(sys.argv[1:] if argv is None else argv)     # as typed, for the rows' command
    out = (args.out or ROOT / "out" / ("report-quick" if args.quick else "report")).resolve()
    args.data = args.data and os.path.abspath(args.data)          # the scripts run in the repository
    if args.quick:                                                 # a smoke pass never touches the README
        args.results, args.readme, args.figure = out / "results.json", out / "README.md", out / "loss_curves.png"
        args.details = out / "results.md"

    results = json.loads(args.results.read_text(encoding="utf-8")) if args.results.exists() else {}
    if not args.render:
        runs = []
        for stage in args.stages:
            out_dir = out / stage
            argv = ["--out_dir", str(out_dir)] + (["--data", args.data] if args.data else [])
            if args.quick:
                argv += QUICK + QUICK_MODEL[stage]
            out_dir.mkdir(parents=True, exist_ok=True)
            print(f"report: running {stage}.py {' '.join(argv + extra)}", flush=True)
            seconds = run_stage(stage, argv + extra, out / f"{stage}.log")
            runs.append(collect(stage, out_dir))
            runs[-1]["seconds"] = seconds or runs[-1]["seconds"]
            runs[-1]["report_command"] = shlex.join(["python", "tools/report.py", *report_argv])
            runs[-1]["report_options"] = report_options(report_argv)
            print(f"report: {stage}.py: full val loss {runs[-1]['val_loss']:.4f} in "
                  f"{fmt_time(runs[-1]['seconds'])}", flush=True)
        kept = {m["stage"]: m for m in results.get(machine_key(runs), [])}   # stages not rerun stay
        kept.update({m["stage"]: m for m in runs})
        results[machine_key(runs)] = [kept[stage] for stage in STAGES if stage in kept]
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=1), encoding="utf-8")
    if not results:
        sys.exit(f"report: no results in {args.results}: run without --render first")
    keys = summary_keys(results)
    update_readme(args.readme, render_markdown(results, keys, samples=keys[:1]))
    update_readme(args.details, render_markdown(results))
    draw({key: results[key] for key in keys}, args.figure)       # the README's rows, beside the figure
    print(f"report: wrote {args.readme}, {args.details}, {args.figure} and {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
