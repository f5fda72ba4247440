"""The machinery of the four stages, written once: everything that is not the lesson.

Each stage (bigram.py, single_attention.py, multi_head_attn.py, gpt.py) is its lesson; this file
makes it a program you can rely on: the command line, devices and precision, the corpus and its
download, checkpoints, resume, Ctrl-C, one run per folder, torchrun, metrics, --sample,
--evaluate, and every problem told in one line. It imports no stage: a stage hands itself to
run_command_line(), and only the names it defines are used (HYPERPARAMETERS, SETTINGS,
CharTokenizer, make_model, train, generate, and gpt.py's PRESETS; float16 only for a train()
that calls run.scaler, as gpt.py's does). In a notebook, after `python gpt.py`:
`trained = harness.load(gpt)`, then `trained.sample("ROMEO:")` (the README).
"""
import argparse
import contextlib
import csv
import errno
import hashlib
import http.client
import io
import json
import math
import os
import platform
import re
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# A script beside this file is starting (python bigram.py) and imports it first: a Ctrl-C while
# PyTorch loads, for seconds, just ends the process; then Ctrl-C is Python's again. A notebook's
# import is left alone.
_script = os.path.abspath(getattr(sys.modules.get("__main__"), "__file__", None) or "/")
_starting = os.path.dirname(_script) == os.path.dirname(os.path.abspath(__file__))
if _starting:
    _before = signal.signal(signal.SIGINT, signal.SIG_DFL)

import numpy as np  # noqa: E402  (after the Ctrl-C line above)
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

if _starting:
    signal.signal(signal.SIGINT, _before)

try:
    import fcntl                                            # the lock: Linux, macOS
except ImportError:                                         # Windows
    fcntl, msvcrt = None, __import__("msvcrt")

DATA_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/"
            "input.txt")
DATA_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
RUN_FILES = ("ckpt.pt", "last.pt", "log.csv", "metrics.json")   # what a run writes to out_dir
LOG_FIELDS = ("step", "train_loss", "val_loss", "train_seconds")   # a row of log.csv
RESUME_MAY_CHANGE = ("max_iters", "eval_interval", "eval_iters", "dtype")
SCALER = dict(growth_factor=2.0, backoff_factor=0.5, growth_interval=2000)   # PyTorch's, ours
TEMP_PREFIX = ".tmp-"                               # a file being written, not yet renamed
LOCKS = {}                                          # out_dir: its lock's file, the folders made
WATCHING = []                                       # not empty: attention weights are recorded


class CLIError(Exception):
    """A problem with the input, the settings or the machine: told in one line."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):                       # one line, not the whole usage text
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


# ---- the command line ----

def run_command_line(stage, argv=None):
    """Train (the default), --sample or --evaluate. The exit code is 0; 1 for a problem, told
    in one line on stderr; 2 for a mistyped option; 130 after a Ctrl-C."""
    args = parse_args(stage, argv)
    tf32, stdout = torch.backends.cuda.matmul.allow_tf32, sys.stdout   # put back at the end
    handler, errors = set_ctrl_c(signal.default_int_handler), getattr(sys.stdout, "errors", None)
    if errors:                                              # a terminal that cannot show one of
        sys.stdout.reconfigure(errors="backslashreplace")   # the text's characters shows its code
    try:
        args.own_errors = False                             # the same device, settings and data
        device = pick_device(args.device)
        args.own_errors = True                              # joining: each its own
        device = join_processes(device)
        args.own_errors = False
        configure(stage, args, device)
        if args.evaluate is not None:
            evaluate(stage, args, device)
        elif args.sample:
            sample_text(stage, *saved_model(stage, args, device), args, device, sys.stdout)
        else:
            stage.train(args, device)
        leave_together()
    except CLIError as e:
        return fail(args, str(e))
    except (MemoryError, RuntimeError) as e:                # RuntimeError: only the allocators'
        if not isinstance(e, MemoryError) and not re.search("alloc|out of memory|overflow", str(e)):
            raise
        args.own_errors = True                              # this process's own, whenever it came
        return fail(args, "out of memory: try a smaller --batch_size, --block_size or model")
    except OSError as e:                                    # a file that vanished or is locked...
        args.own_errors = True
        return fail(args, f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
    except KeyboardInterrupt:
        return fail(args, "interrupted", code=130)
    finally:
        set_ctrl_c(handler)
        torch.backends.cuda.matmul.allow_tf32, sys.stdout = tf32, stdout
        if errors:
            sys.stdout.reconfigure(errors=errors)
        unlock(args.out_dir)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 130 if getattr(args, "interrupted", False) else 0


def fail(args, message, code=1):
    """One line on stderr. Under torchrun rank 0 speaks for all while they check the same settings
    and data; while they join, once training has started, and for its own memory or files, each
    process speaks for itself."""
    if rank() == 0 or (args.own_errors and code != 130):
        who = f"rank {rank()}: " if rank() > 0 else ""
        print(f"{args.prog}: {'error: ' * (code == 1)}{who}{message}", file=sys.stderr)
    return code


def parse_args(stage, argv=None):
    """The stage's HYPERPARAMETERS and SETTINGS, each an option of its name, and the machinery's
    options. Those left out are None until configure() settles them."""
    name, presets = Path(stage.__file__).stem, getattr(stage, "PRESETS", {})
    parser = ArgumentParser(prog=f"{name}.py", description=stage.__doc__.split("\n\n")[0],
                            allow_abbrev=False)
    notes, add = setting_notes(stage), parser.add_argument
    for key, default in {**stage.HYPERPARAMETERS, **stage.SETTINGS}.items():
        shown = ", ".join([f"full {default}"] + [f"{p} {o[key]}" for p, o in presets.items()
                                                 if key in o])
        if isinstance(default, bool):
            add(f"--{key}", action="store_true", default=None, help=notes[key])
        else:
            add(f"--{key}", type=type(default), help=f"{notes[key]} "
                f"({shown if ',' in shown else default})")
    if presets:
        add("--preset", choices=["full", *presets], help="the full configuration (default on a "
            "CUDA GPU), or a preset's overrides, above (default elsewhere)")
    add("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
        help="where to run (auto: cuda, then mps, then cpu)")
    add("--out_dir", default=f"out/{name}", help="where ckpt.pt (the best model), last.pt (the "
        "latest state, for --resume), log.csv and metrics.json go")
    only = parser.add_mutually_exclusive_group().add_argument   # train, resume, sample or evaluate
    only("--resume", action="store_true", help="continue from out_dir/last.pt, with its settings")
    add("--max_eval_chars", type=int, default=1_000_000, help="cap on the characters that the "
        "full validation loss scores")
    only("--sample", action="store_true", help="only sample from out_dir/ckpt.pt")
    add("--prompt", help="text to continue (default a newline)")
    add("--max_new_tokens", type=int, default=500, help="characters to generate")
    add("--num_samples", type=int, default=1, help="how many samples")
    add("--sample_every", type=int, default=0, help="print a short sample at each evaluation on a "
        "multiple of this many steps (0: never)")
    only("--evaluate", metavar="PATH", help="only report the saved model's loss on a text file")
    add("--skip_unknown", action="store_true", help="with --evaluate, leave out characters the "
        "model never saw instead of refusing the text")
    args = parser.parse_args(argv)
    args.stage, args.prog, args.own_errors = stage, f"{name}.py", True   # joining: each its own
    args.preset = getattr(args, "preset", None)
    args.given = {key for key in (*stage.HYPERPARAMETERS, *stage.SETTINGS, "preset")
                  if getattr(args, key) is not None}        # what the command line set
    args.prompt_given = args.prompt is not None
    args.prompt = "\n" if args.prompt is None else args.prompt
    return args


def setting_notes(stage):
    """The comment beside each setting at the top of the stage's file, for --help: all of it (a
    comment may go on over the lines below), without the lesson's NEW markers."""
    notes, key = {}, None
    source = Path(stage.__file__).read_text(encoding="utf-8")
    for block in re.findall(r"^(?:HYPERPARAMETERS|SETTINGS) = dict\(.*?$(.*?)^\)", source,
                            flags=re.M | re.S):
        for line in block.splitlines():
            setting, more = re.match(r"\s*(\w+)=.*?#\s*(.*)", line), re.match(r"\s*#\s*(.*)", line)
            if setting:
                key, notes[setting[1]] = setting[1], setting[2]
            elif more and key:
                notes[key] += " " + more[1]
    return {key: re.sub(r"^NEW( \([^)]*\))?:\s*", "", note.strip()) for key, note in notes.items()}


def saved_settings(stage):
    """A checkpoint's config: the hyperparameters, the seed, the precision, the preset."""
    return (*stage.HYPERPARAMETERS, "seed", "dtype", "preset")


def configure(stage, args, device):
    """Settle every setting: the command line's, else a resumed run's, else a preset's (gpt.py
    without a CUDA GPU), else those at the top of the file; check them; pick the precision."""
    training = not (args.sample or args.evaluate is not None)
    if not args.out_dir:
        raise CLIError("--out_dir cannot be empty")
    if training and rank() == 0:                            # before anything is read from out_dir
        lock(args.out_dir)
    if training and world_size() > 1:                       # the others wait for rank 0's lock
        wait_for_the_others()
    last = os.path.join(args.out_dir, "last.pt")
    args.resuming = load_checkpoint(stage, last, resume=True) if args.resume and training else None
    overrides, presets = {}, getattr(stage, "PRESETS", {})
    if args.resuming:
        overrides = args.resuming["config"]                 # its precision too, unless given
        for key in sorted(args.given & set(overrides) - set(RESUME_MAY_CHANGE)):
            if getattr(args, key) != overrides[key]:
                raise CLIError(f"--{key} {getattr(args, key)} differs from the resumed run's "
                               f"{overrides[key]}: a resumed run keeps its settings but for "
                               f"{', '.join(RESUME_MAY_CHANGE)}")
    elif presets:
        if args.preset is None:                             # by the hardware
            dtype = pick_dtype(args.dtype or stage.SETTINGS["dtype"], device, stage, training)
            args.preset = "full" if device.type == "cuda" else \
                "laptop" if dtype == "bfloat16" else "laptop-float32"
            if training and args.preset != "full":
                applied = ", ".join(f"{k} {v}" for k, v in presets[args.preset].items()
                                    if k not in args.given)
                print(f"no CUDA GPU: preset {args.preset}, in {dtype} (--preset full: the full "
                      f"configuration): {applied}")
        overrides = presets.get(args.preset, {})
    for key, value in {**stage.SETTINGS, **stage.HYPERPARAMETERS, **overrides}.items():
        if key not in args.given:
            setattr(args, key, value)
    if training:                                            # else the checkpoint's: saved_model()
        check_settings(stage, vars(args))
    for key, lowest in (("num_samples", 1), ("max_eval_chars", 1), ("max_new_tokens", 0),
                        ("sample_every", 0)):
        at_least(key, getattr(args, key), lowest)
    if training:                                            # --sample, --evaluate: the checkpoint's
        check_memory(stage, args, device)                   # model, made as it was trained
    args.planned_iters = args.resuming["planned_iters"] if args.resuming else args.max_iters
    args.dtype = pick_dtype(args.dtype, device, stage, training)
    if device.type == "cuda":                               # TF32 matrix products: speed only
        torch.backends.cuda.matmul.allow_tf32 = True


def check_settings(stage, values):
    """Refuse impossible settings, from the command line or from a checkpoint's config."""
    for key, default in {**stage.HYPERPARAMETERS, **stage.SETTINGS}.items():
        if key not in values and key in stage.SETTINGS:
            continue                                        # a checkpoint keeps only some settings
        value, kind = values.get(key), type(default)
        if type(value) is not kind and not (kind is float and type(value) is int):
            raise CLIError(f"--{key} must be {kind.__name__}, not {value!r}")
        if kind is int:
            at_least(key, value, 0 if key in ("warmup_iters", "top_k", "seed") else 1)
            if key != "seed" and value >= 2 ** 31:          # far past any computer's memory
                raise CLIError(f"--{key} must be below 2**31, not {value}")
        if key == "seed" and value >= 2 ** 63:
            raise CLIError(f"--seed must be below 2**63, not {value}")
        if key == "learning_rate" and not 0 < value < 1e30:   # beyond that, float32 overflows
            raise CLIError(f"--learning_rate must be positive, and below 1e30, not {value}")
        if kind is float and not 0 <= value < 1e30:
            raise CLIError(f"--{key} cannot be negative, or 1e30 or more, not {value}")
    if not values.get("dropout", 0) < 1:
        raise CLIError(f"--dropout must be in [0, 1), not {values['dropout']}")
    if not 0 < values.get("top_p", 1) <= 1:
        raise CLIError(f"--top_p must be in (0, 1], not {values['top_p']}")
    if "n_head" in values and values["n_embd"] % values["n_head"]:
        raise CLIError(f"--n_head ({values['n_head']}) must divide --n_embd ({values['n_embd']})")
    if values["dtype"] not in ("auto", "float32", "bfloat16", "float16"):
        raise CLIError(f"--dtype must be auto, float32, bfloat16 or float16, not "
                       f"{values['dtype']}")
    if values.get("preset") not in (None, "full", *getattr(stage, "PRESETS", {})):
        raise CLIError(f"--preset {values['preset']} is not one of this script's")


def at_least(key, value, lowest):
    if value < lowest:
        raise CLIError(f"--{key} cannot be negative, not {value}" if lowest == 0 else
                       f"--{key} must be at least {lowest}, not {value}")


def check_memory(stage, args, device):
    """Training settings that cannot fit in memory are refused before anything is made (a system
    set to overcommit grants any allocation, then ends the process that fills it). A lower bound:
    the batch, and the model made on the meta device (shapes only): its buffers (attention
    masks) and parameters, made here first for a GPU too; on a CPU also the gradients, AdamW's
    two moments and one layer's activations, for each of torchrun's processes on it."""
    memory = physical_memory()
    if memory is None:
        return
    try:
        with torch.device("meta"):
            model = stage.make_model(1, args)
    except (RuntimeError, ValueError, OverflowError) as e:   # a size PyTorch cannot even count
        raise CLIError(f"out of memory: these settings make a model too large to count "
                       f"({str(e).splitlines()[0]}); try a smaller one")
    on_cpu, B, T = device.type == "cpu", args.batch_size, args.block_size
    need = 2 * 8 * B * (T + 1) + 4 * args.eval_iters        # the batch; the estimates' losses
    need += sum(b.numel() * b.element_size() for b in model.buffers())
    need += sum(p.numel() for p in model.parameters()) * (16 if on_cpu else 4)   # float32
    need += 4 * B * T * getattr(args, "n_embd", 0) if on_cpu else 0
    need *= int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if on_cpu and "RANK" in os.environ else 1
    if need > memory:                                       # rounded apart: never "24 of 24"
        need, memory = math.ceil(need / 2 ** 30 * 10) / 10, math.floor(memory / 2 ** 30 * 10) / 10
        raise CLIError(f"out of memory: these settings need at least {need:,.1f} GiB, and this "
                       f"computer has {memory:,.1f} GiB; try a smaller --batch_size, "
                       f"--block_size or model")


def physical_memory():
    """Bytes of memory, or None where the system does not say (Windows, or -1 for unknown)."""
    with contextlib.suppress(AttributeError, ValueError, OSError):
        page, pages = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_PHYS_PAGES")
        return page * pages if page > 0 and pages > 0 else None


# ---- devices and precision ----

def pick_device(name):
    """'auto' prefers a CUDA GPU, then Apple's MPS, then the CPU."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: PyTorch sees no CUDA GPU on this machine (try --device cpu)")
    if name == "mps" and not has_mps:
        raise CLIError("--device mps: PyTorch sees no Apple MPS device here (try --device cpu)")
    return torch.device(name)


def pick_dtype(name, device, stage, training=True):
    """'auto': bfloat16 where the hardware computes it natively: CPUs with AVX-512 BF16 (AMX
    too), CUDA GPUs of compute capability 8.0 on (A100, H100, RTX 30 series and later). Those of
    7.x (V100, T4, RTX 20) have tensor cores for float16 alone: float16 for a stage whose loop
    scales its gradients (gpt.py), else float32. float32 elsewhere: older GPUs, other CPUs,
    Apple's MPS. A precision this device or this PyTorch cannot train in is refused."""
    if name == "auto" and device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        name = "bfloat16" if capability >= (8, 0) else \
            "float16" if capability >= (7, 0) and scales_gradients(stage) else "float32"
    elif name == "auto":                                    # the CPU, or MPS: float32
        check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)     # none in 2.1 to 2.4
        native = check() if check else "avx512_bf16" in cpu_info().get("flags", "").split()
        name = "bfloat16" if native and device.type == "cpu" else "float32"
    if name != "float32" and device.type == "mps":          # its autocast: none before 2.5
        raise CLIError(f"--dtype {name}: on Apple's MPS this repository trains in float32 only")
    if name == "float16" and training and not scales_gradients(stage):
        raise CLIError(f"--dtype float16 needs a gradient scaler in the training loop, and "
                       f"{Path(stage.__file__).name} has none (gpt.py has): use float32")
    if name == "float16" and device.type == "cpu" and not hasattr(torch.amp, "GradScaler"):
        raise CLIError(f"--dtype float16 on the CPU needs PyTorch 2.3 or later (this is "
                       f"{torch.__version__}): use float32, or a CUDA GPU")
    if name == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise CLIError("--dtype bfloat16: this GPU cannot compute in it; use float16 or float32")
    return name


def scales_gradients(stage):
    """Whether the stage's training loop calls run.scaler, which float16 needs (gpt.py's does)."""
    return "scaler" in stage.train.__code__.co_names


def autocast(device, dtype_name):
    """Matrix products in bfloat16 or float16 inside this block if dtype_name says so; weights
    stay float32. In float32 it does nothing (torch.autocast turned off would refuse "mps" on
    PyTorch 2.1 to 2.4)."""
    if dtype_name == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype_name))


def grad_scaler(device, dtype_name):
    """float16's gradient scaler; in another precision one that is off: its scale() and unscale_()
    change nothing, its step() is the optimizer's. (Before PyTorch 2.3: CUDA's alone.)"""
    on = dtype_name == "float16"
    return torch.amp.GradScaler(device.type, enabled=on) if hasattr(torch.amp, "GradScaler") \
        else torch.cuda.amp.GradScaler(enabled=on)


def to_device(batch, device):
    """batch.to(device); on a CUDA GPU from pinned memory, so that the copy overlaps the compute."""
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def hardware_name(device):
    """The GPU's name, or the CPU's with its threads and its widest vector instructions, which
    decide its speed here (bfloat16 is fast only from AVX-512 BF16 on)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = cpu_info()
    name = info.get("model name", platform.processor() or platform.machine())
    if device.type == "mps":
        return f"Apple MPS ({name})"
    flags = info.get("flags", "").split()
    isa = [label for flag, label in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"),
                                     ("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags]
    return f"{name}, {torch.get_num_threads()} threads" + (f", {isa[0]}" if isa else "")


def cpu_info():
    """Linux's /proc/cpuinfo as {field: value}; {} elsewhere."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            fields = (line.partition(":") for line in f)
            return {key.strip(): value.strip() for key, _, value in fields}
    return {}


# ---- more than one process: torchrun and DistributedDataParallel (gpt.py) ----

def join_processes(device):
    """Under torchrun (it sets RANK, LOCAL_RANK and WORLD_SIZE), join the other processes to
    train one model: NCCL between CUDA GPUs, one each, gloo between CPU processes. Only rank 0
    prints and writes. Returns this process's device."""
    if "RANK" not in os.environ:
        return device
    if device.type == "mps":
        raise CLIError("torchrun: Apple's MPS has no distributed backend here: use --device cpu")
    if device.type == "cuda":
        if int(os.environ["LOCAL_RANK"]) >= torch.cuda.device_count():
            raise CLIError(f"torchrun: {torch.cuda.device_count()} CUDA GPUs here, too few for one "
                           f"process each: ask for fewer with --nproc_per_node")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    available = getattr(torch.distributed, "is_backend_available", lambda name: True)   # 2.3 on
    if not (torch.distributed.is_available() and available(backend)):
        raise CLIError(f"torchrun: this PyTorch has no {backend} backend (--device {device.type})")
    try:
        torch.distributed.init_process_group(backend)
    except (ValueError, RuntimeError) as e:                 # a torchrun setting missing or wrong
        raise CLIError(f"torchrun: cannot join the other processes: {str(e).splitlines()[0]}")
    if rank() > 0:
        sys.stdout = open(os.devnull, "w")
    return device


def rank():
    return int(os.environ.get("RANK", 0))


def world_size():
    ready = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_world_size() if ready else 1


def together(collective, *args, **kwargs):
    """A collective of torchrun's processes; one broken by a process that failed is one line."""
    try:
        return collective(*args, **kwargs)
    except RuntimeError:                                    # DistBackendError is one
        raise CLIError("torchrun: another process ended with an error")


def wait_for_the_others():
    """A barrier. NCCL's is told this process's GPU: left to guess, it warns."""
    nccl = torch.distributed.get_backend() == "nccl"
    together(torch.distributed.barrier, device_ids=[torch.cuda.current_device()] if nccl else None)


def leave_together():
    """Under gloo the others wait while rank 0 scores and samples: one that left first sometimes
    aborted ("terminate called without an active exception"), and torchrun failed the run (one
    launch in ten, PyTorch 2.13). Not seen under NCCL, whose barrier gives up after 10 minutes."""
    if world_size() > 1 and torch.distributed.get_backend() == "gloo":
        wait_for_the_others()


# ---- speed only: used by gpt.py, whose lesson marks each call ----

def use_fused_attention(q):
    """PyTorch's fused attention kernel, or the products written out? Both compute the same (a
    test checks it). The fused kernel is faster on a GPU, and on a CPU but when training in
    bfloat16 (PyTorch 2.13, laptop preset: half the time a step written out; in float32, the
    fused kernel's was 4% less). Never while attention weights are recorded: it forms none."""
    return not WATCHING and (q.device.type != "cpu" or not torch.is_grad_enabled()
                             or q.dtype != torch.bfloat16)


def fused_attention(q, k, v, future, dropout):
    """softmax(q k^T / sqrt(hs)) v in one kernel. future is True where a query may not look; the
    kernel's attn_mask the other way round, True where it may. With nothing cached the mask is
    the plain causal one, which the fastest kernels know without being given a mask."""
    T, seen = future.shape
    if T == seen:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T > 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=~future, dropout_p=dropout)


HAS_ONE_VECTOR_KERNEL = torch.__version__ >= (2, 6)     # PyTorch's own bf16 matrix-vector kernel


@contextlib.contextmanager
def one_vector_kernels(device, dtype_name):
    """A cached sampling step multiplies every weight matrix by one vector. On a CPU in bfloat16
    PyTorch hands that to oneDNN, which is slow at it; its own kernel (from 2.6) is about twice
    as fast. So oneDNN is off for such a step, and on again before anything else runs."""
    before = torch.backends.mkldnn.enabled
    if device.type == "cpu" and dtype_name == "bfloat16" and HAS_ONE_VECTOR_KERNEL:
        torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def has_fused_adamw(device):
    """AdamW's fused kernel: on CUDA, and on CPUs from PyTorch 2.4."""
    return device.type == "cuda" or (device.type == "cpu" and torch.__version__ >= (2, 4))


# ---- the text ----

def read_text(path):
    """The file's text, checked to be UTF-8; input.txt, the default, is downloaded if missing."""
    if not os.path.exists(path) and path == "input.txt":
        download_corpus(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CLIError(f"cannot read data file {path}: {e.strerror}")
    if not raw:
        raise CLIError(f"data file {path} is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise CLIError(f"{path} is not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} "
                       f"(line {line}) cannot be decoded")


def download_corpus(path):
    print(f"{path} not found: downloading tiny Shakespeare from {DATA_URL}")
    try:
        with urllib.request.urlopen(DATA_URL, timeout=30) as response:
            payload = response.read()
    except (OSError, ValueError, http.client.HTTPException) as e:   # IncompleteRead: cut short
        raise CLIError(f"cannot download {DATA_URL} ({getattr(e, 'reason', None) or e!r}): fetch "
                       f"it yourself into {path}, or train on your own text with --data PATH")
    if hashlib.sha256(payload).hexdigest() != DATA_SHA256:
        raise CLIError(f"the file downloaded from {DATA_URL} is not tiny Shakespeare (sha256 "
                       f"mismatch); nothing was written")
    atomic_write(path, payload)


def encode_corpus(tokenizer, text, skip_unknown=False):
    """tokenizer.encode(text) as a numpy array, made fast for big texts: a table from code point
    to token id, a few million characters at a time, in the smallest integer type that holds
    the ids. Unknown characters are an error that names them, or with skip_unknown left out."""
    lookup = np.full(0x110000, -1, dtype=np.int32)          # code point -> token id, or -1
    lookup[[ord(ch) for ch in tokenizer.chars]] = np.arange(tokenizer.vocab_size)
    size = tokenizer.vocab_size
    id_type = np.uint8 if size <= 256 else np.uint16 if size <= 65536 else np.int32
    pieces, chunk = [], 1 << 22
    for start in range(0, len(text), chunk):
        points = np.frombuffer(text[start:start + chunk].encode("utf-32-le", "surrogatepass"),
                               dtype=np.uint32)
        ids = lookup[points]
        if (ids < 0).any():
            if not skip_unknown:
                unknown = "".join(sorted(set(map(chr, points[ids < 0]))))
                raise CLIError(f"characters not in the model's vocabulary: {unknown!r}")
            ids = ids[ids >= 0]
        pieces.append(ids.astype(id_type))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=id_type)


def encode_prompt(tokenizer, args):
    unknown = "".join(sorted(set(args.prompt) - set(tokenizer.chars)))
    if unknown and not args.prompt_given:
        raise CLIError(f"the default prompt, a newline, is not among the characters of the text: "
                       f"give one with --prompt, e.g. --prompt {tokenizer.chars[-1]!r}")
    if unknown:
        raise CLIError(f"characters not in the model's vocabulary: {unknown!r}")
    if not args.prompt:
        raise CLIError("--prompt must have at least one character")
    return tokenizer.encode(args.prompt)


# ---- files: atomic writes, one run per folder, the earlier run set aside ----

def atomic_write(path, data):
    """Write bytes to a temporary file, then rename it over path: a run killed while writing
    leaves the old file whole. A failure (a full disk, a read-only folder) names the folder."""
    folder, tmp = os.path.dirname(os.path.abspath(path)), None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)                                # mkstemp's files are private
        os.replace(tmp, path)
    except OSError as e:
        raise CLIError(f"cannot write to {folder}: {e.strerror or e}")
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


def lock(out_dir):
    """Claim out_dir for one training run by a lock on out_dir/run.lock, which the operating
    system lets go of when the process ends, however it ends; a second run is refused. Then what
    a killed run left is tidied: its temporary files, and a move aside it began, put back. A
    folder that cannot be written is found here, before any training."""
    path, folder, made, fd = os.path.join(out_dir, "run.lock"), os.path.abspath(out_dir), [], None
    while not os.path.isdir(folder):                        # the folders made here: unlock()
        made.insert(0, folder)                              # removes them if they stay empty
        folder = os.path.dirname(folder)
    held = False
    try:
        os.makedirs(out_dir, exist_ok=True)
        while not held:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB) if fcntl else \
                    msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            except OSError as e:                            # held: by whom, if it can tell
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES, errno.EDEADLK):
                    raise
                holder = os.read(fd, 20).decode(errors="replace").strip() if fcntl else ""
                fd = os.close(fd)
                raise CLIError(f"{out_dir} is in use by another run" + (f" (process {holder})"
                               if holder.isdigit() else "") + ": wait, or use another --out_dir")
            with contextlib.suppress(FileNotFoundError):
                held = not fcntl or os.path.samestat(os.fstat(fd), os.stat(path))
            if not held:                                    # the run before removed it: again
                fd = os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        LOCKS[os.path.abspath(out_dir)], fd = (fd, made), None
        for name in os.listdir(out_dir):
            left = os.path.join(out_dir, name)
            if name.startswith(TEMP_PREFIX) and os.path.isfile(left):
                os.unlink(left)
            elif name.startswith(".previous-") and os.path.isdir(left):   # a move aside, cut short
                for moved in os.listdir(left):
                    os.replace(os.path.join(left, moved), os.path.join(out_dir, moved))
                os.rmdir(left)
    except OSError as e:
        raise CLIError(f"cannot write to {out_dir}: {e.strerror or e}")
    finally:
        if os.path.abspath(out_dir) not in LOCKS:           # refused, or failed: let go
            unlock(out_dir, fd if held else None, made)
            if fd is not None and not held:
                os.close(fd)


def unlock(out_dir, fd=None, made=()):
    """Let go of out_dir's lock, which this process holds, and remove the folders lock() made if
    they are still empty."""
    fd, made = LOCKS.pop(os.path.abspath(out_dir), (fd, made))
    path = os.path.join(out_dir, "run.lock")
    if fd is not None:
        if fcntl:                                           # removed while still held: a run
            with contextlib.suppress(OSError):              # that opened it before sees it gone
                os.unlink(path)
        os.close(fd)
        if not fcntl:                                       # Windows removes no open file
            with contextlib.suppress(OSError):
                os.unlink(path)
    for folder in reversed(made):                           # a run that saved nothing leaves
        with contextlib.suppress(OSError):                  # no empty folder behind
            os.rmdir(folder)


def set_aside(out_dir):
    """At a new run's first save, an earlier run's files in out_dir move, all together, to a new
    folder out_dir/previous-N, N one more than any before: no run is ever deleted. A crash half
    way is undone by lock()."""
    names = [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]
    if not names:
        return
    taken = [int(m[1]) for m in map(re.compile(r"previous-(\d+)").fullmatch, os.listdir(out_dir))
             if m]
    target = os.path.join(out_dir, f"previous-{max(taken, default=0) + 1}")
    try:
        staging = tempfile.mkdtemp(dir=out_dir, prefix=".previous-")
        os.chmod(staging, 0o755)                            # mkdtemp's folders are private
        for name in names:
            os.replace(os.path.join(out_dir, name), os.path.join(staging, name))
        os.rename(staging, target)
    except OSError as e:
        raise CLIError(f"cannot write to {out_dir}: {e.strerror or e}")
    print(f"the earlier run's files in {out_dir} are now in {target}")


# ---- checkpoints ----

def checkpoint_bytes(stage, **fields):
    buffer = io.BytesIO()                                   # in memory first: a full disk is an
    torch.save(dict(stage=Path(stage.__file__).stem, **fields), buffer)   # error of atomic_write
    return buffer.getvalue()


def load_checkpoint(stage, path, resume=False):
    """A checkpoint of this stage, checked: the stage, its fields, its settings, its vocabulary,
    finite weights (their names and shapes: by a strict load_state_dict where they are loaded).
    Opened with weights_only=True: tensors and plain values only, so that it never runs code."""
    name = Path(stage.__file__).stem
    if not os.path.exists(path):
        raise CLIError(f"{'nothing to resume: ' * resume}no checkpoint at {path}; train first "
                       f"(python {name}.py), or pass --out_dir")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise CLIError(f"{path} is damaged or is not a PyTorch checkpoint")
    if not isinstance(checkpoint, dict) or "stage" not in checkpoint:
        raise CLIError(f"{path} is not a checkpoint of this repository")
    if checkpoint["stage"] != name:
        raise CLIError(f"{path} was written by {checkpoint['stage']}.py, not {name}.py: use that "
                       f"script, or another --out_dir")
    fields = dict(model=dict, config=dict, vocab=str, step=int)
    fields.update(dict(optimizer=dict, rng=list, world_size=int, log=list, best=dict,
                       planned_iters=int, seconds=float) if resume else dict(val_loss=float))
    for field, kind in fields.items():
        if not isinstance(checkpoint.get(field), kind):
            raise CLIError(f"{path} is damaged: its {field} is missing or not a {kind.__name__}")
    skipped = checkpoint.get("skipped", 0)                 # these two: none in an earlier last.pt
    if resume and not (is_scaler_state(checkpoint.get("scaler", {}))
                       and type(skipped) is int and skipped >= 0):
        raise CLIError(f"{path} is damaged: its gradient scaler's state is not one")
    config, chars, number = checkpoint["config"], checkpoint["vocab"], (int, float)
    try:
        if sorted(config, key=str) != sorted(saved_settings(stage)):
            raise CLIError("its settings are not this script's")
        check_settings(stage, config)
    except CLIError as e:
        raise CLIError(f"{path} is damaged: {str(e).lstrip('-')}")
    if not chars or list(chars) != sorted(set(chars)):
        raise CLIError(f"{path} is damaged: its vocabulary is not a sorted set of characters")
    if not all(isinstance(key, str) and torch.is_tensor(t) and t.layout == torch.strided and
               t.is_floating_point() and t.isfinite().all()
               for key, t in checkpoint["model"].items()):
        raise CLIError(f"{path} is damaged: its weights are not all named, finite numbers")
    log, best = checkpoint.get("log", []), checkpoint.get("best", dict(step=0, val_loss=0))
    if not (all(isinstance(row, dict) and tuple(row) == LOG_FIELDS and
                all(type(v) in number for v in row.values()) for row in log)
            and best.keys() == {"step", "val_loss"} and type(best["val_loss"]) in number
            and (best["step"] is None or type(best["step"]) is int)):
        raise CLIError(f"{path} is damaged: its log of evaluations is not one")
    return checkpoint


def is_scaler_state(state):
    """Whether state is float16's gradient scaler's as saved ({} in other precisions): PyTorch's
    factors, a power of two from 1 (a step skipped at 1 stops the run), a count of clean steps."""
    return state == {} or isinstance(state, dict) and all(
        type(state.get(k)) is type(v) and state[k] == v for k, v in SCALER.items()) and \
        type(state.get("scale")) is float and 1 <= state["scale"] < 2.0 ** 128 and \
        math.frexp(state["scale"])[0] == 0.5 and type(state.get("_growth_tracker")) is int and \
        0 <= state["_growth_tracker"] < SCALER["growth_interval"]


def saved_model(stage, args, device):
    """The model of out_dir/ckpt.pt (the best of its run), on device, and its tokenizer. Its
    hyperparameters replace those in args, but for --batch_size, which may differ, to score in
    less memory; another given one that differs is refused: it would make another model."""
    path = os.path.join(args.out_dir, "ckpt.pt")
    checkpoint = load_checkpoint(stage, path)
    for key, value in checkpoint["config"].items():
        if key in stage.HYPERPARAMETERS and key in args.given and getattr(args, key) != value \
                and key != "batch_size":
            raise CLIError(f"--{key} {getattr(args, key)}: the saved model was trained with "
                           f"--{key} {value}; leave it out, or train another")
        if key in stage.HYPERPARAMETERS and key not in args.given:
            setattr(args, key, value)
    check_settings(stage, vars(args))
    tokenizer = stage.CharTokenizer(checkpoint["vocab"])
    model = stage.make_model(tokenizer.vocab_size, args)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError:
        raise CLIError(f"{path} is damaged: its weights do not fit its own model")
    args.saved_step, args.saved_val_loss = checkpoint["step"], checkpoint["val_loss"]
    args.preset = checkpoint["config"]["preset"]            # as trained (the precision: here)
    return model.to(device), tokenizer


def load_optimizer_state(optimizer, state):
    """optimizer.load_state_dict, made strict: PyTorch's takes moments of the wrong shape and
    groups without their settings, and fails later, in a step (fused AdamW once crashed)."""
    fresh = [dict(group) for group in optimizer.state_dict()["param_groups"]]
    optimizer.load_state_dict(state)
    for group, before in zip(optimizer.param_groups, fresh):
        same = [k for k in ("betas", "eps", "weight_decay", "amsgrad", "maximize") if k in before]
        betas = list(group.get("betas") or ())              # a tuple, or as a list
        if type(group.get("lr")) not in (int, float) or betas != list(before.get("betas", betas)) \
                or any(group.get(k) != before[k] for k in same if k != "betas"):
            raise ValueError("a group of parameters with other settings")
        for p in group["params"]:
            moments = optimizer.state.get(p)
            step = moments and moments.get("step")
            if moments and not (torch.is_tensor(step) and step.dim() == 0 and step >= 0 and all(
                    torch.is_tensor(moments.get(k)) and moments[k].shape == p.shape
                    for k in ("exp_avg", "exp_avg_sq"))):
                raise ValueError("moments that do not fit")


def rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type in ("cuda", "mps"):                      # dropout draws on the device
        state[device.type] = getattr(torch, device.type).get_rng_state()
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type != "cpu" and device.type in state:
        getattr(torch, device.type).set_rng_state(state[device.type])


def set_ctrl_c(handler):
    """Install a handler for Ctrl-C and return the one before; off the main thread, where Python
    allows none, change nothing."""
    with contextlib.suppress(ValueError):
        return signal.signal(signal.SIGINT, handler)


# ---- training: what the loop of each stage's train() calls on ----

def resume(args, model, optimizer, scaler, tokenizer, device):
    """Put last.pt's state into the model, the optimizer, float16's gradient scaler and the
    random-number generators. Returns what the run had done: (step, log, best, training
    seconds, steps the scaler skipped)."""
    saved, path = args.resuming, os.path.join(args.out_dir, "last.pt")
    if saved["vocab"] != tokenizer.chars:
        raise CLIError(f"the run to resume was trained on other characters than {args.data}")
    if saved["world_size"] != world_size():
        raise CLIError(f"{path} was trained by {saved['world_size']} processes: resume it with as "
                       f"many (torchrun --nproc_per_node), or start a new run")
    if saved["step"] > args.max_iters:
        raise CLIError(f"the run to resume is at step {saved['step']}, past --max_iters "
                       f"{args.max_iters}")
    best = load_checkpoint(args.stage, os.path.join(args.out_dir, "ckpt.pt"))
    if saved["best"]["step"] is not None and (best["step"], best["val_loss"]) != \
            (saved["best"]["step"], saved["best"]["val_loss"]):
        raise CLIError(f"{os.path.join(args.out_dir, 'ckpt.pt')} is not the best model of the run "
                       f"to resume (its step {best['step']}, not {saved['best']['step']}): start a "
                       f"new run")
    try:
        model.load_state_dict(saved["model"])
        load_optimizer_state(optimizer, saved["optimizer"])
        if saved.get("scaler"):                             # else saved in another precision:
            scaler.load_state_dict(saved["scaler"])         # float16 starts a new scale
        set_rng_state(saved["rng"][rank()], device)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError):
        raise CLIError(f"{path} is damaged: its model, optimizer or scaler does not fit")
    print(f"resuming from {path} at step {saved['step']}")
    return saved["step"], saved["log"], saved["best"], saved["seconds"], saved.get("skipped", 0)


class CtrlC:
    """Ctrl-C during training sets a flag, which the loop reads between steps; a second one quits
    at once. Under torchrun the processes agree on it when they look at their losses, so that
    all stop at the same step (torchrun passes on its own second Ctrl-C)."""

    def __init__(self, world, say):
        self.world, self.say, self.pressed, self.agreed = world, say, False, False
        set_ctrl_c(self.handler)

    def handler(self, signum, frame):
        if self.pressed and self.world == 1:
            raise KeyboardInterrupt
        if not self.pressed:
            self.say("Ctrl-C: stopping after this step (press it again to quit at once)")
        self.pressed = True


class TrainingRun:
    """What a stage's training loop calls on: first_step, evaluated(), stepped(), interrupted and
    finish(), and gpt.py's for_training() and scaler. It checks the text and the prompt, resumes,
    keeps the progress bar, the log and the best model (rank 0 writes), and stops a run whose
    loss is no longer a number. Resume is exact: the estimates draw batches from a generator of
    their own, so the run's random numbers depend on its steps alone, and last.pt holds them all.
    Only scheduled evaluations choose the best model; a Ctrl-C saves last.pt between two steps. So
    a resumed run ends with the files of a run that never stopped."""

    def __init__(self, args, device, model, optimizer, tokenizer, train_data, val_data):
        self.args, self.device, self.model, self.optimizer = args, device, model, optimizer
        self.tokenizer, self.val_data, self.started = tokenizer, val_data, time.time()
        self.world, self.wrapped = world_size(), False
        for split, data in (("train", train_data), ("val", val_data)):
            if len(data) < args.block_size + 1:
                raise CLIError(f"{args.data} is too short: its {split} split has {len(data)} "
                               f"characters, fewer than block_size + 1 = {args.block_size + 1}")
        encode_prompt(tokenizer, args)                      # a bad prompt fails now, not at the end
        self.paths = {name: os.path.join(args.out_dir, name) for name in RUN_FILES}
        self.scaler = grad_scaler(device, args.dtype)      # gpt.py's loop calls it
        self.first_step, self.log, self.best, self.seconds_before, self.skipped = 0, [], \
            dict(step=None, val_loss=math.inf), 0.0, 0
        if args.resuming:
            self.first_step, self.log, self.best, self.seconds_before, self.skipped = \
                resume(args, model, optimizer, self.scaler, tokenizer, device)
        elif self.world > 1:                                # each process draws its own batches
            torch.manual_seed(args.seed + rank())
        self.moved_aside = bool(args.resuming)              # a resumed run's files are its own
        self.step, self.saved_step = self.first_step, self.first_step if args.resuming else None
        self.n_params = sum(p.numel() for p in model.parameters())
        name = args.prog[:-3]
        print(f"{name}: {self.n_params:,} parameters; {len(train_data) + len(val_data):,} "
              f"characters, {tokenizer.vocab_size} distinct; {device} ({hardware_name(device)}), "
              f"{args.dtype}" + " with a gradient scaler" * self.scaler.is_enabled()
              + (f"; preset {args.preset}" if args.preset else ""))
        self.bar = tqdm(total=args.max_iters, initial=self.first_step, desc=name,
                        disable=None if rank() == 0 else True, dynamic_ncols=True)
        self.ctrl_c = CtrlC(self.world, self.bar.write)
        self.pending, self.scales, self.scale = [], [], self.scaler.get_scale()
        self.train_seconds, self.mark = 0.0, time.time()
        args.own_errors = True                              # from here on, each process's own

    @property
    def interrupted(self):
        return self.ctrl_c.pressed if self.world == 1 else self.ctrl_c.agreed

    def for_training(self, model):
        """gpt.py: the model the loop calls; under torchrun, wrapped in PyTorch's
        DistributedDataParallel, which averages the processes' gradients in each backward."""
        self.wrapped = True
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return together(torch.nn.parallel.DistributedDataParallel, model, device_ids=ids)

    def stepped(self, step, loss):
        """After each step: progress, and every 10 steps a look at the losses (one wait for the
        GPU, not one a step)."""
        self.step = step
        self.pending.append(loss.detach())
        if self.scaler.is_enabled():        # the scale after the step; get_scale() would wait
            self.scales.append(self.scaler._get_scale_async().clone())   # for the GPU
        self.bar.update(1)
        if len(self.pending) == 10 or step % self.args.eval_interval == 0:
            self.check_pending()
        now = time.time()
        self.train_seconds, self.mark = self.train_seconds + now - self.mark, now

    def check_pending(self):
        """The losses since the last look. Under torchrun the processes agree here on their mean
        losses and on whether any was told to stop, so that all stop at the same step. In float16
        the scaler skips a step whose numbers overflow, halving its scale; at a scale of 1 or less
        they overflow at their own size, or are not numbers: the run diverged."""
        values = torch.stack(self.pending).float() if self.pending else torch.zeros(0)
        if self.world > 1:
            shared = torch.cat([values.to(self.device),
                                torch.ones(1, device=self.device) * self.ctrl_c.pressed])
            together(torch.distributed.all_reduce, shared)
            values, self.ctrl_c.agreed = shared[:-1] / self.world, bool(shared[-1] > 0)
        losses, self.pending = values.tolist(), []
        scales, self.scales = torch.stack(self.scales).tolist() if self.scales else [], []
        for i, value in enumerate(losses):
            step = self.step - len(losses) + i + 1
            if not scales and not math.isfinite(value):
                self.diverged(step, f"training loss {value}")
            if scales and scales[i] < self.scale:           # float16: a step skipped
                self.skipped += 1
                if self.scale <= 1:                         # the scale that step used
                    self.diverged(step, f"float16 overflowed even at a loss scale of "
                                  f"{self.scale:g}; training loss {value}")
            self.scale = scales[i] if scales else self.scale
        if losses:
            self.bar.set_postfix(loss=f"{losses[-1]:.4f}")

    def diverged(self, step, what):
        saved = f"the last good state is {self.paths['last.pt']} (step {self.saved_step})" \
            if self.saved_step is not None else "nothing was saved"
        raise CLIError(f"training diverged at step {step} ({what}), most likely because the "
                       f"learning rate ({self.args.learning_rate}) is too high; {saved}")

    def evaluated(self, step, losses):
        """After the estimate at a scheduled step: print and log it, save the model as ckpt.pt
        if it is the best so far, and save last.pt, the state to resume from."""
        self.check_pending()
        if self.world > 1 and not self.wrapped:             # the same for all: rank 0 says it
            self.args.own_errors = False
            raise CLIError(f"torchrun: {self.args.prog} trains in one process (its training loop "
                           f"does not call run.for_training)")
        if self.log and self.log[-1]["step"] == step:       # a resumed run's first step: done
            self.mark = time.time()
            return
        if not (math.isfinite(losses["train"]) and math.isfinite(losses["val"])):
            self.diverged(step, f"loss estimates {losses['train']}, {losses['val']}")
        if not torch.stack([p.isfinite().all() for p in self.model.parameters()]).all():
            self.diverged(step, "a weight is no longer a finite number")
        self.bar.write(f"step {step}: train loss {losses['train']:.4f}, "
                       f"val loss {losses['val']:.4f}")
        elapsed = round(self.seconds_before + self.train_seconds, 3)
        self.log.append(dict(zip(LOG_FIELDS, (step, losses["train"], losses["val"], elapsed))))
        if losses["val"] < self.best["val_loss"]:           # only a better model replaces it
            self.best = dict(step=step, val_loss=losses["val"])
            self.save("ckpt.pt", model=self.model.state_dict(), val_loss=losses["val"])
        self.save_last()
        self.save("log.csv")
        if self.args.sample_every and step % self.args.sample_every == 0 and rank() == 0:
            self.bar.write(sample_text(self.args.stage, self.model, self.tokenizer, self.args,
                                       self.device, max_new_tokens=200, num_samples=1)[0])
        self.mark = time.time()                             # evaluating and saving: not training

    def save(self, name, **fields):
        """Rank 0 writes out_dir/name: log.csv, or a checkpoint of fields with the run's settings,
        vocabulary and step. At its first save, an earlier run's files are set aside."""
        if rank() > 0:
            return
        if not self.moved_aside:
            set_aside(self.args.out_dir)
            self.moved_aside = True
        if name == "log.csv":
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=LOG_FIELDS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.log)
            return atomic_write(self.paths[name], text.getvalue().encode("utf-8"))
        atomic_write(self.paths[name], checkpoint_bytes(
            self.args.stage, config=self.config(), vocab=self.tokenizer.chars, step=self.step
            if name == "last.pt" else self.best["step"], **fields))

    def config(self):
        return {key: getattr(self.args, key) for key in saved_settings(self.args.stage)}

    def save_last(self):
        rng = [rng_state(self.device)]                      # every process's random numbers
        if self.world > 1:
            rng = [None] * self.world
            together(torch.distributed.all_gather_object, rng, rng_state(self.device))
        self.save("last.pt", model=self.model.state_dict(), log=self.log, best=self.best,
                  optimizer=self.optimizer.state_dict(), rng=rng, world_size=self.world,
                  planned_iters=self.args.planned_iters, scaler=self.scaler.state_dict(),
                  skipped=self.skipped, seconds=float(self.seconds_before + self.train_seconds))
        self.saved_step = self.step

    def finish(self):
        """After the loop: where a Ctrl-C stopped it, save last.pt; then score the best model on
        the whole validation split, print a sample of it and write metrics.json."""
        self.check_pending()
        self.bar.close()
        self.ctrl_c.pressed = True                          # from here on, Ctrl-C quits at once
        args = self.args
        if self.step < args.max_iters:
            args.interrupted = True                         # the exit code is 130
            if self.step != self.saved_step:
                self.save_last()
            print(f"interrupted at step {self.step}: saved {self.paths['last.pt']}; "
                  f"python {args.prog} --resume --out_dir {args.out_dir} carries on")
        if rank() > 0 or (self.world > 1 and self.step < args.max_iters):
            return None                                     # torchrun ends its processes soon
        return final_report(self)


def final_report(run):
    """The best model's full validation loss, a sample of it, and metrics.json."""
    args, device, model, paths = run.args, run.device, run.model, run.paths
    best = load_checkpoint(args.stage, paths["ckpt.pt"])
    try:
        model.load_state_dict(best["model"])
    except RuntimeError:
        raise CLIError(f"{paths['ckpt.pt']} is not this run's model: it was replaced")
    data = run.val_data[:args.max_eval_chars + 1]
    val_loss, scored = full_loss(model, data, args, device)
    capped = f", the first {scored:,} of {len(run.val_data) - 1:,}" \
        if len(run.val_data) > len(data) else ""
    print(f"best model (step {best['step']}): full val loss {val_loss:.4f} nats = "
          f"{val_loss / math.log(2):.4f} bits per character ({scored:,} characters{capped})")
    warning = None
    if best["step"] == 0 and any(row["step"] > 0 for row in run.log):
        warning = (f"no evaluation after step 0 beat the untrained model: the learning rate "
                   f"({args.learning_rate}) may be too high")
        print(f"warning: {warning}")
    if run.scaler.is_enabled():
        print(f"float16: the gradient scaler skipped {run.skipped} of {run.step} steps (those "
              f"whose gradients overflowed)")
    print(f"saved {paths['ckpt.pt']}")
    samples = sample_text(args.stage, model, run.tokenizer, args, device, sys.stdout)
    row = next((row for row in run.log if row["step"] == best["step"]), {})
    tokens = (run.step - run.first_step) * args.batch_size * args.block_size * run.world
    metrics = dict(
        stage=best["stage"], params=run.n_params, iters=run.step,
        interrupted=run.step < args.max_iters, best_step=best["step"],
        train_loss=row.get("train_loss"), val_loss=val_loss, val_bpc=val_loss / math.log(2),
        val_chars=scored, val_loss_estimate=best["val_loss"], warning=warning,
        tokens_per_sec=tokens / max(run.train_seconds, 1e-9),
        train_seconds=run.seconds_before + run.train_seconds, seconds=time.time() - run.started,
        device=device.type, hardware=hardware_name(device), torch=torch.__version__,
        peak_gpu_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
        else None, world_size=run.world, skipped_steps=run.skipped, sample=samples[0],
        **run.config())
    atomic_write(paths["metrics.json"], json.dumps(metrics, indent=2).encode("utf-8"))
    return metrics


@torch.no_grad()
def full_loss(model, data, args, device):
    """The loss over every character of data after the first, each scored once, in float32:
    (nats, characters scored). The text is read in consecutive windows of block_size, so a
    character is predicted from the 1 to block_size characters before it in its window,
    (block_size + 1) / 2 on average: as in training, where the windows fall at random."""
    was_training = model.training
    model.eval()
    n = len(data) - 1                                       # characters with one before them
    starts = np.arange(0, n, args.block_size)
    tail = n % args.block_size                              # the last window may be shorter

    def window_loss(group, size):
        chunk = data[group[:, None] + np.arange(size + 1)].astype(np.int64)
        chunk = torch.from_numpy(chunk).to(device)          # (B, size + 1)
        logits, _ = model(chunk[:, :-1])                    # (B, size, vocab)
        targets = chunk[:, 1:].flatten()
        return F.cross_entropy(logits.flatten(0, 1).float(), targets, reduction="sum").item()

    full = starts[:-1] if tail else starts
    total = sum(window_loss(full[i:i + args.batch_size], args.block_size)
                for i in range(0, len(full), args.batch_size))
    if tail:
        total += window_loss(starts[-1:], tail)
    model.train(was_training)
    return total / n, n


# ---- sampling and evaluating a saved model ----

def sample_text(stage, model, tokenizer, args, device, stream=None, max_new_tokens=None,
                num_samples=None):
    """Texts after the prompt from the stage's own generate(), in evaluation mode (no dropout)
    and the run's precision, each also written to stream as it grows. The same seed gives the
    same texts."""
    prompt = torch.tensor(encode_prompt(tokenizer, args), device=device)[None, :]   # (1, T)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def on_token(ids):                                      # each character as it comes
        stream.write(tokenizer.decode(ids[0].tolist()))
        stream.flush()

    texts, was_training = [], model.training
    model.eval()
    try:
        for i in range(args.num_samples if num_samples is None else num_samples):
            if stream:
                stream.write(("\n" + "-" * 40 + "\n" if i else "") + args.prompt)
            with autocast(device, args.dtype):              # as in training
                new = args.max_new_tokens if max_new_tokens is None else max_new_tokens
                idx = stage.generate(model, prompt, new, args, generator,
                                     on_token if stream else None)
            texts.append(tokenizer.decode(idx[0].tolist()))
    finally:
        model.train(was_training)                           # as the caller left it
    if stream:
        stream.write("\n")
        stream.flush()
    return texts


def evaluate(stage, args, device):
    """--evaluate PATH: the saved model's full loss over any UTF-8 text file."""
    model, tokenizer = saved_model(stage, args, device)
    text = read_text(args.evaluate)
    data = encode_corpus(tokenizer, text, skip_unknown=args.skip_unknown)
    if len(data) < 2:
        raise CLIError(f"{args.evaluate} has fewer than 2 characters the model knows: nothing to "
                       f"score")
    nats, scored = full_loss(model, data[:args.max_eval_chars + 1], args, device)
    skipped = f"; {len(text) - len(data):,} unknown characters left out" * args.skip_unknown
    capped = f" (the first {scored:,} of {len(data) - 1:,}: --max_eval_chars)" \
        if len(data) - 1 > scored else ""
    print(f"{args.evaluate}: {scored:,} characters scored{capped}{skipped}")
    print(f"loss {nats:.4f} nats, {nats / math.log(2):.4f} bits per character, "
          f"perplexity {math.exp(nats):.3f}")
    return nats, scored


# ---- in a notebook: a trained stage in a few lines ----

def load(stage, out_dir=None, device="cpu"):
    """A stage's trained model, from out_dir/ckpt.pt (default out/<stage>), to sample from and to
    look into. A problem raises CLIError, with the line that the command line would print."""
    if device not in ("auto", "cpu", "cuda", "mps"):
        raise CLIError(f"device must be auto, cpu, cuda or mps, not {device!r}")
    args = parse_args(stage, ["--sample", "--device", device] +
                      ([f"--out_dir={out_dir}"] if out_dir is not None else []))
    device = pick_device(args.device)
    configure(stage, args, device)
    return Trained(stage, *saved_model(stage, args, device), args, device)


class Trained:
    """What load() gives: the model, its tokenizer and its settings (args)."""

    def __init__(self, stage, model, tokenizer, args, device):
        self.stage, self.model, self.tokenizer, self.args, self.device = \
            stage, model.eval(), tokenizer, args, device

    def sample(self, prompt="\n", max_new_tokens=500, seed=1337):
        """The prompt and max_new_tokens characters drawn after it, as --sample draws them."""
        for key, value in (("max_new_tokens", max_new_tokens), ("seed", seed)):
            if type(value) is not int or not 0 <= value < 2 ** 63:
                raise CLIError(f"{key} must be a whole number from 0 to 2**63 - 1, not {value!r}")
        self.args.prompt, self.args.prompt_given, self.args.seed = prompt, True, seed
        return sample_text(self.stage, self.model, self.tokenizer, self.args, self.device,
                           max_new_tokens=max_new_tokens, num_samples=1)[0]

    def attention(self, prompt):
        """Every head's attention weights as the model reads the prompt once: one (heads, T, T)
        tensor per layer; row t says how much of each character's value character t takes
        (rows sum to 1; the future, above the diagonal, is 0)."""
        self.args.prompt, self.args.prompt_given = prompt, True
        ids = encode_prompt(self.tokenizer, self.args)
        if len(ids) > self.args.block_size:
            raise CLIError(f"the prompt has {len(ids)} characters, more than the model's context "
                           f"of {self.args.block_size}")
        return attention_weights(self.model, torch.tensor(ids, device=self.device)[None, :])


def attention_weights(model, idx):
    """What every module with an attention_weights method (a Head, or gpt.py's batched heads)
    returns while the model reads idx, (1, T), the heads of one layer together."""
    layers, owners = {}, [(name, m) for name, m in model.named_modules()
                          if hasattr(type(m), "attention_weights")]
    if not owners:
        raise CLIError("this model has no attention")

    def watch(name, module):
        def watched(*inputs):
            weights = type(module).attention_weights(module, *inputs)
            layers.setdefault(re.sub(r"\.heads\.\d+$", "", name), []).append(weights[0])
            return weights
        return watched

    for name, module in owners:
        module.attention_weights = watch(name, module)      # this module's only, until deleted
    WATCHING.append(True)
    try:
        with torch.no_grad():
            model(idx)
    finally:
        WATCHING.pop()
        for _, module in owners:
            del module.attention_weights
    return [torch.cat([w if w.dim() == 3 else w[None] for w in heads]).float()
            for heads in layers.values()]
