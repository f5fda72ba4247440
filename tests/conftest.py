"""Shared fixtures: the four stage scripts, tiny settings for each, and a tiny corpus."""
import importlib
import json
import math
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench import CORPUS  # noqa: E402  (after the path is set)
from report import STAGES  # noqa: E402

ATTENTION_STAGES = STAGES[1:]
REAL_CORPUS = [p for p in CORPUS if p.exists()]

# small enough that a whole run takes a fraction of a second
TINY = ["--batch_size", "4", "--block_size", "16", "--max_iters", "20", "--eval_interval", "10",
        "--eval_iters", "2", "--max_new_tokens", "30", "--learning_rate", "1e-2", "--dtype", "float32"]
TINY_MODEL = {
    "bigram": [],
    "single_attention": ["--n_embd", "16"],
    "multi_head_attn": ["--n_embd", "16", "--n_head", "2"],
    "gpt": ["--n_embd", "16", "--n_head", "2", "--n_layer", "2", "--dropout", "0.0", "--warmup_iters", "2",
            "--preset", "laptop"],
}


def load_stage(name):
    return importlib.import_module(name)


@pytest.fixture(params=STAGES)
def stage(request):
    return load_stage(request.param)


@pytest.fixture(params=ATTENTION_STAGES)
def attention_stage(request):
    return load_stage(request.param)


def make_text(n_lines=300):
    """A small corpus with structure a model can learn: names, a fixed rhythm, punctuation."""
    names = ["ROMEO", "JULIET", "NURSE", "FRIAR"]
    words = "the a of and to my thy love night day star light".split()
    lines = []
    for i in range(n_lines):
        name = names[i % len(names)]
        line = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(6))
        lines.append(f"{name}:\n{line.capitalize()}.\n")
    return "\n".join(lines)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text(make_text(), encoding="utf-8")
    return path


class Runner:
    """Calls a stage's main(argv) in-process and returns (exit code, stdout, stderr)."""

    def __init__(self, capsys, tmp_path):
        self.capsys, self.tmp_path = capsys, tmp_path

    def __call__(self, module, *argv, tiny=True, out_dir=None):
        args = [str(a) for a in argv]
        if tiny:
            args = TINY + TINY_MODEL[module.STAGE] + args
        if "--out_dir" not in args:
            args += ["--out_dir", str(out_dir or self.tmp_path / "out" / module.STAGE)]
        self.capsys.readouterr()
        try:
            code = module.main(args)
        except SystemExit as e:  # argparse's own errors
            code = e.code
        out, err = self.capsys.readouterr()
        return code, out, err

    def metrics(self, module, out_dir=None):
        path = Path(out_dir or self.tmp_path / "out" / module.STAGE) / "metrics.json"
        return json.loads(path.read_text())


@pytest.fixture
def run(capsys, tmp_path):
    return Runner(capsys, tmp_path)


def ln(n):
    return math.log(n)
