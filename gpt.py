"""Stage 4 of 4: the full GPT.

multi_head_attn.py + what turns attention into a GPT: a feed-forward layer, blocks
stacked deep with residual connections and layer norm, dropout, GPT-2's
initialisation and optimiser settings, a key/value cache for fast sampling, and a
configuration sized for the hardware. The rest is multi_head_attn.py, line for line.

Run it with no arguments to train, evaluate, save and sample; --help lists every option.
"""
import argparse
import contextlib
import csv
import hashlib
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
import urllib.request

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F
from tqdm import tqdm

STAGE = "gpt"

# ---------------------------------------------------------------------------
# Hyperparameters. Each one is also a command-line option of the same name:
#     python this_script.py --max_iters 500
# These are the full configuration (10.8 M parameters), made for a GPU; without
# one, the laptop preset below replaces them (see fill_defaults).
batch_size = 64        # independent sequences trained on in parallel
block_size = 256       # context length: 256 characters, a few lines of verse
max_iters = 5000       # training steps; the best checkpoint is kept, so overshooting is safe
eval_interval = 250    # steps between loss estimates
eval_iters = 50        # batches averaged in each estimate: 800 k characters, 7x the val split
learning_rate = 1e-3   # peak learning rate, reached after warmup, then decayed
n_embd = 384           # width of the vectors that stand for characters and positions
n_head = 6             # heads of attention, each n_embd // n_head wide
dtype = "auto"         # bfloat16 where the hardware computes it fast, else float32
n_layer = 6            # NEW: transformer blocks stacked
dropout = 0.2          # NEW: a 10 M-parameter model memorises 1 M characters without it
weight_decay = 0.1     # NEW: AdamW's pull of the weight matrices towards zero
warmup_iters = 100     # NEW: steps of linear warmup, while Adam's statistics settle
min_lr = 1e-4          # NEW: the learning rate that the cosine decay ends at
grad_clip = 1.0        # NEW: gradient norms above this are scaled down to it (0: no clipping)

# On a 2-core CPU the configuration above takes about 10 s a step. Without a GPU,
# these values replace it: a model sized to train in about 5 minutes there.
LAPTOP_PRESET = dict(batch_size=32, block_size=128, max_iters=3200, eval_interval=400, eval_iters=25,
                     learning_rate=2e-3, n_embd=128, n_head=4, n_layer=4, dropout=0.0, warmup_iters=100,
                     min_lr=2e-4)

HYPERPARAMETERS = {  # name: (type, what it means), for --help
    "batch_size": (int, "sequences per training step"),
    "block_size": (int, "context length in characters"),
    "max_iters": (int, "training steps"),
    "eval_interval": (int, "steps between train/val loss estimates"),
    "eval_iters": (int, "batches averaged per loss estimate"),
    "learning_rate": (float, "AdamW learning rate"),
    "n_embd": (int, "embedding width"),
    "n_head": (int, "attention heads (must divide n_embd)"),
    "dtype": (str, "auto, float32 or bfloat16 (mixed precision)"),
    "n_layer": (int, "transformer blocks"),
    "dropout": (float, "dropout probability, 0 <= p < 1"),
    "weight_decay": (float, "AdamW weight decay of the weight matrices"),
    "warmup_iters": (int, "learning-rate warmup steps"),
    "min_lr": (float, "learning rate at the end of the cosine decay"),
    "grad_clip": (float, "gradient-norm clipping threshold (0: none)"),
}

DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATA_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_DATA = "input.txt"
RESUME_MAY_CHANGE = ("max_iters", "eval_interval", "eval_iters", "dtype")   # --resume with a longer run


class CLIError(Exception):
    """A problem with the user's input: main() prints it as one line and exits with 1."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a mistyped option is one line (exit 2), not the whole usage text."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


# ---------------------------------------------------------------------------
# Device and precision

def pick_device(name):
    """'auto' prefers a CUDA GPU, then Apple's MPS, then the CPU."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: PyTorch sees no CUDA GPU on this machine (try --device cpu)")
    if name == "mps" and not has_mps:
        raise CLIError("--device mps: PyTorch sees no Apple MPS device on this machine (try --device cpu)")
    return torch.device(name)


def pick_dtype(name, device):
    """Mixed precision: matrix products in bfloat16 where the hardware has it, weights stay float32."""
    if name == "auto":
        cpu_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        fast = cpu_bf16 if device.type == "cpu" else device.type == "cuda" and torch.cuda.is_bf16_supported()
        name = "bfloat16" if fast else "float32"
    return name


def autocast(device, dtype_name):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype_name == "bfloat16")


def hardware_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads" if device.type == "cpu" else f"Apple MPS ({name})"


# ---------------------------------------------------------------------------
# Data: the text, its characters, and token ids

def atomic_write(path, write):
    """Write through a temporary file, then rename it over `path`: a run killed
    mid-write leaves the old file whole, never a broken one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)                                       # mkstemp's files are private
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def download_corpus(path):
    print(f"{path} not found: downloading tiny Shakespeare from {DATA_URL}")
    try:
        with urllib.request.urlopen(DATA_URL, timeout=30) as response:
            payload = response.read()
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise CLIError(f"cannot download {DATA_URL} ({reason}): fetch it yourself into {path}, "
                       f"or train on your own text with --data PATH")
    if hashlib.sha256(payload).hexdigest() != DATA_SHA256:
        raise CLIError(f"the file downloaded from {DATA_URL} is not tiny Shakespeare (sha256 mismatch); "
                       f"nothing was written")
    atomic_write(path, lambda f: f.write(payload))


def read_text(path):
    """The file's text, checked to be UTF-8 (read the same way on every OS)."""
    if not os.path.exists(path) and path == DEFAULT_DATA:
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


def codepoint_chunks(text, chunk=1 << 22):
    """The text as arrays of Unicode code points, a few million characters at a time,
    so that a large corpus never needs four bytes per character all at once."""
    for start in range(0, len(text), chunk):
        yield np.frombuffer(text[start:start + chunk].encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


class CharTokenizer:
    """One token per character; the vocabulary is every character of the training text."""

    def __init__(self, chars):
        self.chars = chars                                      # str, sorted: token id -> character
        self.vocab_size = len(chars)
        # token ids in the smallest integer type that holds them: 1 byte per character for text
        self.id_dtype = np.uint8 if len(chars) <= 256 else np.uint16 if len(chars) <= 65536 else np.int32
        self.lookup = np.full(0x110000, -1, dtype=np.int32)     # code point -> token id, -1 if unknown
        self.lookup[[ord(c) for c in chars]] = np.arange(len(chars))

    @classmethod
    def from_text(cls, text):
        seen = np.zeros(0x110000, dtype=bool)
        for points in codepoint_chunks(text):
            seen[points] = True
        return cls("".join(map(chr, np.flatnonzero(seen))))

    def encode(self, text, skip_unknown=False):
        """str -> array of token ids. Unknown characters are an error that names them,
        or, with skip_unknown, are left out (count them as len(text) - len(ids))."""
        pieces = []
        for points in codepoint_chunks(text):
            ids = self.lookup[points]
            if (ids < 0).any():
                if not skip_unknown:
                    unknown = "".join(sorted(set(map(chr, points[ids < 0]))))
                    raise CLIError(f"characters not in the model's vocabulary: {unknown!r}")
                ids = ids[ids >= 0]
            pieces.append(ids.astype(self.id_dtype))
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=self.id_dtype)

    def decode(self, ids):
        """Token ids -> str."""
        return "".join(self.chars[i] for i in ids)


def get_batch(data, batch_size, block_size, device):
    """Random windows of the text: x is block_size characters, y the same window
    moved one character on, so y[b, t] is the character that follows x[b, :t+1]."""
    starts = torch.randint(len(data) - block_size, (batch_size,))
    window = starts.numpy()[:, None] + np.arange(block_size + 1)   # (B, T+1) positions in the text
    chunk = torch.from_numpy(data[window].astype(np.int64))        # copies the batch, never the corpus
    x, y = chunk[:, :-1], chunk[:, 1:]                             # (B, T) each
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


@torch.no_grad()
def estimate_loss(model, splits, args, device):
    """Mean loss over eval_iters random batches of each split: cheap and a little noisy."""
    model.eval()                                                   # eval mode: no dropout
    out = {}
    for name, data in splits.items():
        losses = torch.zeros(args.eval_iters, device=device)      # on the device: no wait per batch
        for k in range(args.eval_iters):
            x, y = get_batch(data, args.batch_size, args.block_size, device)
            with autocast(device, args.dtype):
                _, loss = model(x, y)
            losses[k] = loss
        out[name] = losses.mean().item()
    model.train()
    return out


@torch.no_grad()
def exact_loss(model, data, args, device):
    """Mean loss over every character of `data` after the first, read in contiguous
    windows of block_size characters: the exact figure, in float32. Returns (nats, count)."""
    model.eval()
    n = len(data) - 1                                              # characters that have one before them
    starts = np.arange(0, n, args.block_size)
    tail = n % args.block_size                                     # the last window may be shorter

    def window_loss(group, size):
        chunk = torch.from_numpy(data[group[:, None] + np.arange(size + 1)].astype(np.int64)).to(device)
        logits, _ = model(chunk[:, :-1])                           # (B, size, vocab)
        return F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum").item()

    full = starts[:-1] if tail else starts
    total = sum(window_loss(full[i:i + args.batch_size], args.block_size)
                for i in range(0, len(full), args.batch_size))
    if tail:
        total += window_loss(starts[-1:], tail)
    model.train()
    return total / n, n


# ---------------------------------------------------------------------------
# Model

class CausalSelfAttention(nn.Module):
    """multi_head_attn.py's MultiHeadAttention, with every head computed at once: one
    matrix product makes the queries, keys and values of all heads, and the heads are
    a tensor dimension (nh) instead of a Python list. NEW: dropout on the attention
    weights and on the output, and a key/value cache for sampling."""

    # True: PyTorch's fused attention kernel; False: the products written out below (a test
    # checks that both agree). None picks: the fused kernel, but for training on a CPU, where
    # the written-out products' backward pass in bfloat16 is much faster (profiled on
    # PyTorch 2.13: a training step at the laptop preset takes half the time)
    fused = None

    def __init__(self, n_embd, n_head, block_size, dropout):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)       # queries, keys, values of all heads
        self.proj = nn.Linear(n_embd, n_embd)                      # mixes what the heads found
        self.dropout = dropout
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        future = torch.ones(block_size, block_size, dtype=torch.bool).triu(diagonal=1)
        self.register_buffer("future", future, persistent=False)  # True above the diagonal

    def forward(self, x, cache=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)                      # (B, T, C) each
        # split the width into heads: (B, T, C) -> (B, T, nh, hs) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:                                      # sampling: keep every key and value
            if "k" in cache:                                       # the past was computed in earlier steps
                k, v = torch.cat((cache["k"], k), dim=2), torch.cat((cache["v"], v), dim=2)
            cache["k"], cache["v"] = k, v                          # (B, nh, T_past + T, hs)
        causal = T > 1                                             # one new query may see every key before it
        if self.fused or (self.fused is None and (x.device.type != "cpu" or not torch.is_grad_enabled())):
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=causal)
        else:                                                      # as in multi_head_attn.py's Head
            scores = (q * k.shape[-1] ** -0.5) @ k.transpose(-2, -1)   # (B, nh, T, T); scaling q is cheaper
            if causal:
                scores = scores.masked_fill(self.future[:T, :T], float("-inf"))
            y = self.attn_dropout(F.softmax(scores, dim=-1)) @ v   # (B, nh, T, T) @ (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)                     # heads side by side again: (B, T, C)
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    """NEW: after the positions have talked, each one thinks on its own: a two-layer
    network, 4 times wider inside, applied to every position separately."""

    def __init__(self, n_embd, dropout):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU()
        self.proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.proj(self.gelu(self.fc(x))))     # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """NEW: a transformer block: communication (attention), then computation (feed-forward).
    Each is added to a residual stream (x + f(x)) that carries the input through
    untouched, so gradients reach the first block however deep the stack; each reads
    a layer-normalised copy of the stream (pre-norm, as in GPT-2)."""

    def __init__(self, n_embd, n_head, block_size, dropout):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attention = CausalSelfAttention(n_embd, n_head, block_size, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        self.feed_forward = FeedForward(n_embd, dropout)

    def forward(self, x, cache=None):
        x = x + self.attention(self.ln1(x), cache)                 # (B, T, C)
        x = x + self.feed_forward(self.ln2(x))                     # (B, T, C)
        return x


class GPT(nn.Module):
    """Embed characters and positions, n_layer blocks, a final layer norm, read out logits."""

    def __init__(self, vocab_size, n_embd, n_head, block_size, n_layer, dropout):
        super().__init__()
        self.token_embedding_table = nn.Embedding(vocab_size, n_embd)      # which character
        self.position_embedding_table = nn.Embedding(block_size, n_embd)   # where it stands
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(n_embd, n_head, block_size, dropout) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        # NEW: weight tying (GPT-2): reading a character in and writing it out share one matrix
        self.lm_head.weight = self.token_embedding_table.weight
        # NEW: GPT-2's initialisation: small normal weights, zero biases; the layers that write
        # into the residual stream are scaled by 1/sqrt(2 n_layer), so that the stream's
        # variance does not grow with depth
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets=None, caches=None):
        T = idx.shape[1]
        past = caches[0]["k"].shape[2] if caches and "k" in caches[0] else 0   # positions already cached
        tok_emb = self.token_embedding_table(idx)                  # (B, T) -> (B, T, C)
        pos_emb = self.position_embedding_table(torch.arange(past, past + T, device=idx.device))   # (T, C)
        x = self.dropout(tok_emb + pos_emb)                        # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches else None)            # (B, T, C)
        logits = self.lm_head(self.ln_f(x))                        # (B, T, vocab_size)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())   # (B*T, vocab) against (B*T,)
        return logits, loss


def make_model(vocab_size, args):
    return GPT(vocab_size, args.n_embd, args.n_head, args.block_size, args.n_layer, args.dropout)


def make_optimizer(model, args, device):
    """NEW: AdamW with weight decay on the weight matrices only (not on biases or layer
    norms), beta2 = 0.99 for a small-batch run, and the fused kernel where there is one."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": args.weight_decay}, {"params": others, "weight_decay": 0.0}]
    try:                                                           # CUDA; CPUs from PyTorch 2.4
        return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.99), fused=True)
    except (RuntimeError, TypeError, ValueError):                  # this build or device has none
        return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.99))


def get_lr(step, args):
    """NEW: linear warmup to learning_rate, then a cosine decay to min_lr at max_iters. The
    small stages did well with one fixed rate; a deep model does not: large first steps,
    while Adam's statistics are still noise, can throw it off for good, and small last
    steps let it settle into a better minimum."""
    if step < args.warmup_iters:
        return args.learning_rate * (step + 1) / args.warmup_iters
    progress = min(1.0, (step - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters))
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.learning_rate - args.min_lr)


def compile_model(model, args, device):
    """NEW: --compile: torch.compile fuses the model's small operations into larger kernels.
    Where it cannot work (no compiler, an old PyTorch), say so and carry on without it."""
    if not args.compile:
        return model
    rng = rng_state(device)                                        # the warm-up's dropout must not
    try:                                                           # change the run (or its resume)
        compiled = torch.compile(model)
        x = torch.zeros((args.batch_size, args.block_size), dtype=torch.long, device=device)
        with autocast(device, args.dtype):
            compiled(x, x)[1].backward()                           # compile now, so that a failure shows here
        model.zero_grad(set_to_none=True)
        return compiled
    except Exception as e:
        print(f"--compile: torch.compile does not work here ({type(e).__name__}); running without it")
        return model
    finally:
        set_rng_state(rng, device)


# ---------------------------------------------------------------------------
# Sampling

def sample_next(logits, temperature, top_k, top_p, generator):
    """Choose the next token from the last position's logits, (B, vocab) -> (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)                  # greedy: always the likeliest
    logits = logits.float()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature   # below 1 sharpens, above 1 flattens
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))   # keep only the k likeliest
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs > top_p             # the likelier ones already make up top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)


# PyTorch's own kernel for a bfloat16 matrix times one vector arrived in version 2.6
HAS_ONE_VECTOR_KERNEL = torch.__version__ >= (2, 6)


@contextlib.contextmanager
def one_vector_kernels(device, dtype_name):
    """NEW: a cached step multiplies every weight matrix by one vector, a job that is all
    reading weights and almost no arithmetic. On a CPU in bfloat16, PyTorch hands matrix
    products to oneDNN, which is built for big ones and slow at a one-vector product;
    PyTorch's own kernel for it (from version 2.6) is faster. So oneDNN is off during a
    cached step only, and on again before anything else runs (tools/bench.py measures
    sampling both ways)."""
    before = torch.backends.mkldnn.enabled
    if device.type == "cpu" and dtype_name == "bfloat16" and HAS_ONE_VECTOR_KERNEL:
        torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


@torch.no_grad()
def generate(model, idx, max_new_tokens, args, device, generator, use_cache=True):
    """Yield new tokens one at a time, (B, 1) each; each is appended to the context of the next.

    NEW: the key/value cache. Without it, every new character runs the model over the
    whole context again, although the keys and values of the earlier positions come
    out the same each time. With it, each block keeps them, and a step computes only the
    newest position: one position of work instead of up to block_size. When the context
    is full, the window jumps: it keeps its last half and the cache is rebuilt from it
    (sliding by one character would shift every position and void the cache).
    use_cache=False computes the same tokens the slow way, to check against (bit for bit in
    float32; in bfloat16 the two ways round differently, so long samples may part)."""
    model.eval()
    start = max(0, idx.shape[1] - args.block_size)                 # the context is idx[:, start:]
    caches = None
    # One autocast for the whole loop: it keeps the bfloat16 copies of the weights between
    # steps instead of casting all of them again for every new character.
    with autocast(device, args.dtype):
        for _ in range(max_new_tokens):
            if idx.shape[1] - start > args.block_size:             # full: keep the last half
                start, caches = idx.shape[1] - max(1, args.block_size // 2), None
            if not use_cache:
                logits, _ = model(idx[:, start:])                  # (B, T, vocab), all of the context again
            elif caches is None:
                caches = [{} for _ in model.blocks]
                logits, _ = model(idx[:, start:], caches=caches)  # fill the caches with the context
            else:
                with one_vector_kernels(device, args.dtype):
                    logits, _ = model(idx[:, -1:], caches=caches)  # (B, 1, vocab): the newest position only
            next_id = sample_next(logits[:, -1, :], args.temperature, args.top_k, args.top_p, generator)
            idx = torch.cat((idx, next_id), dim=1)                 # (B, T+1)
            yield next_id
    model.train()


def encode_prompt(tokenizer, prompt):
    ids = tokenizer.encode(prompt)                                 # unknown characters: an error naming them
    if len(ids) == 0:
        raise CLIError("--prompt must have at least one character")
    return ids.astype(np.int64)


def sample_text(model, tokenizer, args, device, max_new_tokens, stream=None):
    """Generate num_samples texts after the prompt, written to `stream` as they grow."""
    prompt = encode_prompt(tokenizer, args.prompt)
    generator = torch.Generator(device=device).manual_seed(args.seed)   # same seed, same text
    texts = []
    for i in range(args.num_samples):
        if stream and i:
            stream.write("\n" + "-" * 40 + "\n")
        text = args.prompt
        if stream:
            stream.write(text)
        idx = torch.tensor(prompt, device=device)[None, :]         # (1, T)
        for next_id in generate(model, idx, max_new_tokens, args, device, generator):
            piece = tokenizer.decode(next_id[0].tolist())
            text += piece
            if stream:
                stream.write(piece)
                stream.flush()
        texts.append(text)
    if stream:
        stream.write("\n")
    return texts


# ---------------------------------------------------------------------------
# Checkpoints

def rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path, **fields):
    atomic_write(path, lambda f: torch.save(dict(stage=STAGE, **fields), f))


def load_checkpoint(path):
    """A checkpoint of this stage, loaded with weights_only=True: tensors and plain
    values only, so opening a checkpoint can never run code."""
    if not os.path.exists(path):
        raise CLIError(f"no checkpoint at {path}: train first (python {STAGE}.py), or pass --out_dir")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise CLIError(f"{path} is damaged or is not a PyTorch checkpoint")
    if not isinstance(checkpoint, dict) or "stage" not in checkpoint or "model" not in checkpoint:
        raise CLIError(f"{path} is not a checkpoint of this repository")
    if checkpoint["stage"] != STAGE:
        raise CLIError(f"{path} was written by {checkpoint['stage']}.py, not {STAGE}.py: "
                       f"use that script, or another --out_dir")
    return checkpoint


def restore_model(checkpoint, args, device):
    """Rebuild the model of a checkpoint; its hyperparameters replace those of args
    (but for dtype: precision belongs to the machine, not to the model)."""
    for name, value in checkpoint["config"].items():
        if name != "dtype":
            setattr(args, name, value)
    tokenizer = CharTokenizer(checkpoint["vocab"])
    model = make_model(tokenizer.vocab_size, args)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError:
        raise CLIError("the checkpoint's weights do not fit its model: it is damaged")
    return model.to(device), tokenizer


# ---------------------------------------------------------------------------
# Training

def train(args, device):
    started = time.time()
    best_path, last_path = os.path.join(args.out_dir, "ckpt.pt"), os.path.join(args.out_dir, "last.pt")
    resume = load_checkpoint(last_path) if args.resume else None
    if resume is not None:                                         # the run's own settings, checked again
        for name, value in resume["config"].items():
            if name in args.given and getattr(args, name) != value and name not in RESUME_MAY_CHANGE:
                raise CLIError(f"--{name} {getattr(args, name)} differs from {last_path}'s {value}: a resumed "
                               f"run keeps its settings but for {', '.join(RESUME_MAY_CHANGE)}")
            if name not in args.given and name != "dtype":       # precision belongs to this machine
                setattr(args, name, value)
        check_args(args)
    text = read_text(args.data)
    tokenizer = CharTokenizer.from_text(text)
    data = tokenizer.encode(text)
    del text
    n = int(0.9 * len(data))                                       # first 90% to train on, last 10% to validate
    splits = {"train": data[:n], "val": data[n:]}
    for name, split in splits.items():
        if len(split) < args.block_size + 1:
            raise CLIError(f"{args.data} is too short: its {name} split has {len(split)} characters, "
                           f"fewer than block_size + 1 = {args.block_size + 1}")
    encode_prompt(tokenizer, args.prompt)                          # a bad prompt fails now, not after training

    if resume is not None and resume["vocab"] != tokenizer.chars:
        raise CLIError(f"{last_path} was trained on text with other characters than {args.data}")
    torch.manual_seed(args.seed)
    model = make_model(tokenizer.vocab_size, args).to(device)
    optimizer = make_optimizer(model, args, device)
    step, best_val, log, seconds_before = 0, float("inf"), [], 0.0
    if resume is not None:
        try:
            model.load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
        except (RuntimeError, ValueError):
            raise CLIError(f"{last_path} holds a model of another shape than the options given now")
        step, best_val, log, seconds_before = resume["step"], resume["best_val_loss"], resume["log"], resume["seconds"]
        log = [row for row in log if row[0] < step]                # the resumed run logs this step again
        set_rng_state(resume["rng"], device)
        print(f"resuming from {last_path} at step {step}")

    n_params = sum(p.numel() for p in model.parameters())
    config = {name: getattr(args, name) for name in HYPERPARAMETERS}
    print(f"{STAGE}: {n_params:,} parameters; {len(data):,} characters, {tokenizer.vocab_size} distinct; "
          f"device {device} ({hardware_name(device)}), {args.dtype}")

    def save(path, rng, best_val_loss):
        save_checkpoint(path, model=model.state_dict(), optimizer=optimizer.state_dict(), config=config,
                        vocab=tokenizer.chars, step=step, best_val_loss=best_val_loss, log=log, rng=rng,
                        seconds=log[-1][3])                        # saved right after this step's log row

    def training_seconds():                                        # evaluations and saving excluded
        return seconds_before + time.time() - loop_started - overhead

    if resume is None and os.path.exists(best_path):               # a new run: keep the last run's model
        os.replace(best_path, os.path.join(args.out_dir, "previous.pt"))
        print(f"{best_path}, the model of an earlier run, is now {os.path.join(args.out_dir, 'previous.pt')}")
    bar = tqdm(total=args.max_iters, initial=step, desc=STAGE, dynamic_ncols=True, disable=None)
    stop_at, first_step, overhead, interrupted = args.max_iters, step, 0.0, False
    step_model = compile_model(model, args, device)
    loop_started = time.time()
    while True:
        rng, rng_step = rng_state(device), step                    # what resuming at this step restores
        try:
            if step % args.eval_interval == 0 or step == stop_at:
                t0, elapsed = time.time(), training_seconds()
                losses = estimate_loss(model, splits, args, device)
                if log and log[-1][0] == step:                     # evaluated again after a Ctrl-C
                    log.pop()
                log.append([step, losses["train"], losses["val"], round(elapsed, 3)])
                bar.write(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                if losses["val"] < best_val:                       # only a better model replaces ckpt.pt
                    save(best_path, rng, losses["val"])
                    best_val = losses["val"]
                save(last_path, rng, best_val)
                atomic_write(os.path.join(args.out_dir, "log.csv"), lambda f: write_log(f, log))
                if args.sample_every and step % args.sample_every == 0:
                    bar.write(sample_text(model, tokenizer, args, device, 200)[0])
                overhead += time.time() - t0
            if step >= stop_at:
                break
            x, y = get_batch(splits["train"], args.batch_size, args.block_size, device)
            for group in optimizer.param_groups:                   # NEW: warmup, then cosine decay
                group["lr"] = get_lr(step, args)
            with autocast(device, args.dtype):
                _, loss = step_model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:                                 # NEW: deep models meet rare huge gradients;
                # clipping their norm keeps one bad batch from wrecking what was learned
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            step += 1
            bar.update(1)
            if step % 10 == 0:                                     # .item() waits for the GPU: not every step
                bar.set_postfix(loss=f"{loss.item():.4f}")
        except KeyboardInterrupt:
            if interrupted:                                        # a second Ctrl-C: give up at once
                raise
            bar.write(f"interrupted at step {step}: evaluating and saving what was trained so far")
            stop_at, interrupted = step, True
            if step == rng_step:                                   # step unfinished: undo its random draws
                set_rng_state(rng, device)
    bar.close()
    train_seconds = max(time.time() - loop_started - overhead, 1e-9)          # this run's share

    # The exact figure, for the best checkpoint: the one that sampling uses.
    best = load_checkpoint(best_path)
    model.load_state_dict(best["model"])
    val_loss, scored = exact_loss(model, splits["val"][:args.max_eval_chars + 1], args, device)
    capped = f", the first {scored:,} of {len(splits['val']) - 1:,}" if len(splits["val"]) - 1 > scored else ""
    print(f"best model (step {best['step']}): exact val loss {val_loss:.4f} nats = "
          f"{val_loss / math.log(2):.4f} bits per character ({scored:,} characters{capped})")
    print(f"saved {best_path}")
    samples = sample_text(model, tokenizer, args, device, args.max_new_tokens, sys.stdout)
    best_row = next((row for row in log if row[0] == best["step"]), None)
    metrics = dict(stage=STAGE, params=n_params, iters=step, best_step=best["step"],
                   train_loss=best_row[1] if best_row else None, val_loss=val_loss,
                   val_bpc=val_loss / math.log(2), val_chars=scored, val_loss_estimate=best["best_val_loss"],
                   tokens_per_sec=(step - first_step) * args.batch_size * args.block_size / train_seconds,
                   train_seconds=log[-1][3], seconds=time.time() - started, device=device.type,
                   hardware=hardware_name(device), torch=torch.__version__, sample=samples[0] if samples else "",
                   **config)
    atomic_write(os.path.join(args.out_dir, "metrics.json"),
                 lambda f: f.write(json.dumps(metrics, indent=2).encode("utf-8")))
    return metrics


def write_log(f, log):
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["step", "train_loss", "val_loss", "train_seconds"])
    writer.writerows(log)
    f.write(text.getvalue().encode("utf-8"))


def sample(args, device):
    """Generate from the saved model: out_dir/ckpt.pt, the best one of its run."""
    model, tokenizer = restore_model(load_checkpoint(os.path.join(args.out_dir, "ckpt.pt")), args, device)
    sample_text(model, tokenizer, args, device, args.max_new_tokens, sys.stdout)


def evaluate(args, device):
    """Exact loss of the saved model over the whole of any UTF-8 text file."""
    model, tokenizer = restore_model(load_checkpoint(os.path.join(args.out_dir, "ckpt.pt")), args, device)
    text = read_text(args.evaluate)
    data = tokenizer.encode(text, skip_unknown=args.skip_unknown)
    if len(data) < 2:
        raise CLIError(f"{args.evaluate} has fewer than 2 characters the model knows: nothing to score")
    nats, scored = exact_loss(model, data[:args.max_eval_chars + 1], args, device)
    skipped = f"; {len(text) - len(data):,} unknown characters left out" if args.skip_unknown else ""
    capped = f" (the first {scored:,} of {len(data) - 1:,}: --max_eval_chars)" if len(data) - 1 > scored else ""
    print(f"{args.evaluate}: {scored:,} characters scored{capped}{skipped}")
    print(f"loss {nats:.4f} nats, {nats / math.log(2):.4f} bits per character, perplexity {math.exp(nats):.3f}")
    return nats, scored


# ---------------------------------------------------------------------------
# Command line

def parse_args(argv):
    parser = ArgumentParser(prog=f"{STAGE}.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    group = parser.add_argument_group("hyperparameters (defaults at the top of the file)")
    for name, (kind, meaning) in HYPERPARAMETERS.items():
        laptop = f", laptop preset {LAPTOP_PRESET[name]}" if name in LAPTOP_PRESET else ""
        group.add_argument(f"--{name}", type=kind, default=None, help=f"{meaning} (default {globals()[name]}{laptop})")
    group = parser.add_argument_group("run")
    group.add_argument("--data", default=DEFAULT_DATA, help="UTF-8 text to train on (default input.txt, "
                       "tiny Shakespeare, downloaded if missing)")
    group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                       help="where to run (auto: cuda, then mps, then cpu)")
    group.add_argument("--seed", type=int, default=1337, help="random seed: same seed, same run")
    group.add_argument("--out_dir", default=f"out/{STAGE}",
                       help="where ckpt.pt (best), last.pt, metrics.json and log.csv go")
    group.add_argument("--resume", action="store_true", help="continue training from out_dir/last.pt")
    group.add_argument("--max_eval_chars", type=int, default=1_000_000,
                       help="cap on the characters scored by the exact evaluation")
    group.add_argument("--preset", default="auto", choices=["auto", "laptop", "full"],
                       help="auto: the full configuration on a CUDA GPU, the laptop one elsewhere")
    group.add_argument("--compile", action="store_true", help="torch.compile the model (faster on a GPU)")
    group = parser.add_argument_group("sampling")
    group.add_argument("--sample", action="store_true", help="only sample from out_dir/ckpt.pt, no training")
    group.add_argument("--prompt", default="\n", help="text to continue (default a newline)")
    group.add_argument("--max_new_tokens", type=int, default=500, help="characters to generate")
    group.add_argument("--temperature", type=float, default=1.0, help="0 is greedy; below 1 is more cautious")
    group.add_argument("--top_k", type=int, default=None, help="sample only among the k likeliest characters")
    group.add_argument("--top_p", type=float, default=1.0, help="sample only among the likeliest characters "
                       "that together have this probability")
    group.add_argument("--num_samples", type=int, default=1, help="how many samples")
    group.add_argument("--sample_every", type=int, default=0, help="print a short sample at evaluations "
                       "every this many steps (0: never)")
    group = parser.add_argument_group("evaluation")
    group.add_argument("--evaluate", metavar="PATH", help="only report the saved model's exact loss on a text file")
    group.add_argument("--skip_unknown", action="store_true",
                       help="with --evaluate, leave out characters the model never saw instead of failing")
    args = parser.parse_args(argv)
    args.given = {name for name in HYPERPARAMETERS if getattr(args, name) is not None}
    return args


def fill_defaults(args, device):
    """Hyperparameters not given on the command line take the values at the top of the file,
    or NEW: those of the laptop preset where there is no CUDA GPU."""
    preset = args.preset if args.preset != "auto" else "full" if device.type == "cuda" else "laptop"
    values = {**{name: globals()[name] for name in HYPERPARAMETERS}, **(LAPTOP_PRESET if preset == "laptop" else {})}
    if args.preset == "auto" and preset == "laptop" and not (args.sample or args.evaluate):
        print(f"no CUDA GPU: training the laptop preset (about 5 minutes on 2 CPU cores); the full "
              f"configuration takes about 10 s a step here, ask for it with --preset full")
    for name in HYPERPARAMETERS:
        if getattr(args, name) is None:
            setattr(args, name, values[name])
    if device.type == "cuda":                                      # NEW: TF32 matrix products on Ampere and later
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def check_args(args):
    """Refuse impossible settings before anything runs or is written."""
    for name in ("batch_size", "block_size", "max_iters", "eval_interval", "eval_iters", "num_samples",
                 "max_eval_chars", "n_embd", "n_head", "n_layer"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name} must be at least 1, not {getattr(args, name)}")
    for name in ("max_new_tokens", "sample_every"):
        if getattr(args, name) < 0:
            raise CLIError(f"--{name} cannot be negative, not {getattr(args, name)}")
    if args.n_embd % args.n_head:
        raise CLIError(f"--n_head ({args.n_head}) must divide --n_embd ({args.n_embd})")
    if not args.learning_rate > 0:
        raise CLIError(f"--learning_rate must be positive, not {args.learning_rate}")
    if not 0 <= args.dropout < 1:
        raise CLIError(f"--dropout must be in [0, 1), not {args.dropout}")
    for name in ("weight_decay", "warmup_iters", "min_lr", "grad_clip"):
        if not getattr(args, name) >= 0:
            raise CLIError(f"--{name} cannot be negative, not {getattr(args, name)}")
    if args.dtype not in ("auto", "float32", "bfloat16"):
        raise CLIError(f"--dtype must be auto, float32 or bfloat16, not {args.dtype}")
    if not args.temperature >= 0:
        raise CLIError(f"--temperature cannot be negative, not {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise CLIError(f"--top_k must be at least 1, not {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise CLIError(f"--top_p must be in (0, 1], not {args.top_p}")


def main(argv=None):
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        fill_defaults(args, device)
        check_args(args)
        args.dtype = pick_dtype(args.dtype, device)
        if args.evaluate:
            evaluate(args, device)
        elif args.sample:
            sample(args, device)
        else:
            train(args, device)
    except CLIError as e:
        print(f"{STAGE}.py: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:                                           # a disk full, a folder not writable...
        print(f"{STAGE}.py: error: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{STAGE}.py: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
