"""Shared fixtures: the four stage scripts, tiny settings for each, a tiny corpus, and main(argv)."""
import csv
import importlib
import json
import math
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import harness  # noqa: E402  (after the path is set)
from report import STAGES  # noqa: E402

ATTENTION_STAGES = STAGES[1:]
# tiny Shakespeare, where it is: downloaded by a first run, or this workplace's shared copy
REAL_CORPUS = [p for p in (ROOT / "input.txt", ROOT.parent / "shared" / "data" / "input.txt") if p.exists()]

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


def name(stage):
    return stage.__name__


if "PYTEST_XDIST_WORKER_COUNT" in os.environ:                    # pytest.ini's workers share the cores
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

SCRATCH = {}                                                       # folder: made once per session


@pytest.fixture(scope="session", autouse=True)
def scratch(tmp_path_factory):
    SCRATCH["folder"] = tmp_path_factory.mktemp("scratch")


def tiny_args(stage, *extra, device="cpu"):
    """A stage's settled arguments for the tiny settings, as its command line makes them, for
    sampling (nothing locked, nothing written)."""
    argv = TINY + TINY_MODEL[name(stage)] + [str(a) for a in extra] + ["--sample"]
    argv += ["--out_dir", str(SCRATCH["folder"] / name(stage))]
    args = harness.parse_args(stage, argv)
    harness.configure(stage, args, torch.device(device))
    return args


@pytest.fixture(params=STAGES)
def stage(request):
    return load_stage(request.param)


@pytest.fixture(params=ATTENTION_STAGES)
def attention_stage(request):
    return load_stage(request.param)


@pytest.fixture
def bigram():
    """The stage the machinery's own tests run on: harness.py is the same for every stage."""
    return load_stage("bigram")


@pytest.fixture
def gpt():
    return load_stage("gpt")


@pytest.fixture
def no_tf32():
    """float32 matrix products on CUDA in full float32, as they were afterwards. Not monkeypatch:
    torch.backends.cuda.matmul keeps the setting behind __setattr__, which pytest 9.2 cannot undo."""
    matmul = torch.backends.cuda.matmul
    before, matmul.allow_tf32 = matmul.allow_tf32, False
    yield
    matmul.allow_tf32 = before


def make_text(n_lines=300):
    """A small corpus with structure a model can learn: names, a fixed rhythm, punctuation."""
    names = ["ROMEO", "JULIET", "NURSE", "FRIAR"]
    words = "the a of and to my thy love night day star light".split()
    lines = []
    for i in range(n_lines):
        speaker = names[i % len(names)]
        line = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(6))
        lines.append(f"{speaker}:\n{line.capitalize()}.\n")
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
            args = TINY + TINY_MODEL[name(module)] + args
        if "--out_dir" not in args:
            args += ["--out_dir", str(out_dir or self.tmp_path / "out" / name(module))]
        if "--device" not in args:                                 # the CPU, also where there is a GPU:
            args += ["--device", "cpu"]                            # its kernels are deterministic
        self.capsys.readouterr()
        try:
            code = module.main(args)
        except SystemExit as e:  # argparse's own errors
            code = e.code
        out, err = self.capsys.readouterr()
        return code, out, err

    def metrics(self, module, out_dir=None):
        path = Path(out_dir or self.tmp_path / "out" / name(module)) / "metrics.json"
        return json.loads(path.read_text())


@pytest.fixture
def run(capsys, tmp_path):
    return Runner(capsys, tmp_path)


def ln(n):
    return math.log(n)


def read_log(path):
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def losses_of(path):
    """log.csv without the times: (step, train loss, val loss) per evaluation."""
    return [(row["step"], row["train_loss"], row["val_loss"]) for row in read_log(path / "log.csv")]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def cpu_autocast_on():
    """Whether autocast is on for the CPU here (PyTorch 2.4 on asks by device; before, by name)."""
    return torch.is_autocast_enabled("cpu") if torch.__version__ >= (2, 4) else torch.is_autocast_cpu_enabled()


def snapshot(folder):
    """A folder's files and their bytes, to check that nothing in it changed."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def assert_one_line_error(code, err, *fragments):
    assert code not in (0, None)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def ctrl_c_during_step(stage, monkeypatch, step, presses=1):
    """Press Ctrl-C (a real SIGINT to this process) while the training step that ends at `step`
    is running: its batch is drawn, then the signal arrives."""
    real, count = stage.get_batch, [0]

    def get_batch(*args, **kwargs):
        if sys._getframe(1).f_code.co_name == "train":             # a training batch, not an estimate's
            count[0] += 1
            for _ in range(presses if count[0] == step else 0):
                os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(stage, "get_batch", get_batch)
