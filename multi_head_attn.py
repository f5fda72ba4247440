"""Stage 3 of 4: multi-head attention.

single_attention.py with several narrow heads of attention side by side instead
of one wide one, their outputs joined and projected back to the model's width.
The rest is single_attention.py, line for line.

Run it with no arguments to train, evaluate, save and sample; --help lists every option.
"""
import argparse
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

STAGE = "multi_head_attn"

# ---------------------------------------------------------------------------
# Hyperparameters. Each one is also a command-line option of the same name:
#     python this_script.py --max_iters 500
batch_size = 64        # independent sequences trained on in parallel
block_size = 64        # context length: now attention really reads it, up to 64 characters back
max_iters = 4000       # training steps: attention learns more slowly than a lookup table
eval_interval = 500    # steps between loss estimates
eval_iters = 100       # batches averaged in each estimate
learning_rate = 1e-3   # attention is less forgiving than a table: a smaller step
n_embd = 128           # width of the vectors that stand for characters and positions
n_head = 4             # NEW: heads of attention, each n_embd // n_head wide
dtype = "auto"         # bfloat16 where the hardware computes it fast, else float32

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

class Head(nn.Module):
    """One head of causal self-attention. Each position asks a question (its query),
    every position advertises what it has (its key), and the better a key matches the
    query, the more of that position's value flows into the answer. Like a job description
    (query) read against resumes (keys): a good match is hired and brings its skills (value)."""

    def __init__(self, n_embd, head_size, block_size):
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)       # what a position offers
        self.query = nn.Linear(n_embd, head_size, bias=False)     # what a position looks for
        self.value = nn.Linear(n_embd, head_size, bias=False)     # what it passes on when chosen
        # lower-triangular ones: position t may look at positions 0..t, never at the future.
        # A buffer, not a parameter: saved with the model, never trained.
        self.register_buffer("tril", torch.tril(torch.ones(block_size, block_size)))

    def attention_weights(self, x):
        """(B, T, C) -> (B, T, T): row t says how much position t takes from each position."""
        T = x.shape[1]
        q, k = self.query(x), self.key(x)                          # (B, T, hs) each
        # dot product = how well query t matches key s; dividing by sqrt(hs) keeps the
        # scores' variance near 1, so softmax starts soft instead of picking one position
        scores = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5      # (B, T, hs) @ (B, hs, T) -> (B, T, T)
        scores = scores.masked_fill(self.tril[:T, :T] == 0, float("-inf"))   # the future gets weight 0
        return F.softmax(scores, dim=-1)                           # (B, T, T), each row sums to 1

    def forward(self, x):
        weights = self.attention_weights(x)                        # (B, T, T)
        return weights @ self.value(x)                             # (B, T, T) @ (B, T, hs) -> (B, T, hs)


class MultiHeadAttention(nn.Module):
    """NEW: n_head heads side by side, each n_embd // n_head wide, for the cost of one wide
    head. One head takes one mix of the past; several can each follow something else
    (the last vowel, the start of the word, the speaker's name), and a projection joins them."""

    def __init__(self, n_embd, n_head, block_size):
        super().__init__()
        self.heads = nn.ModuleList([Head(n_embd, n_embd // n_head, block_size) for _ in range(n_head)])
        self.proj = nn.Linear(n_embd, n_embd)                      # mixes what the heads found

    def forward(self, x):
        out = torch.cat([head(x) for head in self.heads], dim=-1)  # n_head x (B, T, hs) -> (B, T, C)
        return self.proj(out)                                      # (B, T, C)


class MultiHeadLanguageModel(nn.Module):
    """Embed characters and positions, mix them with attention, read out logits."""

    def __init__(self, vocab_size, n_embd, n_head, block_size):
        super().__init__()
        self.token_embedding_table = nn.Embedding(vocab_size, n_embd)      # which character
        self.position_embedding_table = nn.Embedding(block_size, n_embd)   # where it stands
        self.attention = MultiHeadAttention(n_embd, n_head, block_size)
        self.lm_head = nn.Linear(n_embd, vocab_size)

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        tok_emb = self.token_embedding_table(idx)                  # (B, T) -> (B, T, C)
        pos_emb = self.position_embedding_table(torch.arange(T, device=idx.device))   # (T, C)
        x = tok_emb + pos_emb                                      # (B, T, C): the same positions in every sequence
        x = self.attention(x)                                      # (B, T, C): each position now knows its past
        logits = self.lm_head(x)                                   # (B, T, vocab_size)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())   # (B*T, vocab) against (B*T,)
        return logits, loss


def make_model(vocab_size, args):
    return MultiHeadLanguageModel(vocab_size, args.n_embd, args.n_head, args.block_size)


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


@torch.no_grad()
def generate(model, idx, max_new_tokens, args, device, generator):
    """Yield new tokens one at a time, (B, 1) each; each is appended to the context of the next."""
    model.eval()
    for _ in range(max_new_tokens):
        with autocast(device, args.dtype):
            logits, _ = model(idx[:, -args.block_size:])           # (B, T, vocab): only the last position is used
        next_id = sample_next(logits[:, -1, :], args.temperature, args.top_k, args.top_p, generator)
        idx = torch.cat((idx, next_id), dim=1)                     # (B, T+1)
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
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
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
            with autocast(device, args.dtype):
                _, loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
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
        group.add_argument(f"--{name}", type=kind, default=None, help=f"{meaning} (default {globals()[name]})")
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
    """Hyperparameters not given on the command line take the values at the top of the file."""
    for name in HYPERPARAMETERS:
        if getattr(args, name) is None:
            setattr(args, name, globals()[name])


def check_args(args):
    """Refuse impossible settings before anything runs or is written."""
    for name in ("batch_size", "block_size", "max_iters", "eval_interval", "eval_iters", "num_samples",
                 "max_eval_chars", "n_embd", "n_head"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name} must be at least 1, not {getattr(args, name)}")
    for name in ("max_new_tokens", "sample_every"):
        if getattr(args, name) < 0:
            raise CLIError(f"--{name} cannot be negative, not {getattr(args, name)}")
    if args.n_embd % args.n_head:
        raise CLIError(f"--n_head ({args.n_head}) must divide --n_embd ({args.n_embd})")
    if not args.learning_rate > 0:
        raise CLIError(f"--learning_rate must be positive, not {args.learning_rate}")
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
