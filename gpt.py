"""Stage 4 of 4: the full GPT.

multi_head_attn.py plus what turns attention into a GPT, in the lecture's order: (a) a
feed-forward layer, (b) blocks with residual connections, (c) layer norm, (d) a bigger
model with dropout; then (e) the training recipe of GPT-2 and GPT-3 and (f) sampling
with a key/value cache. Full validation loss on tiny Shakespeare: about 1.45 nats per
character on a GPU (multi_head_attn.py: 2.05); without one, on 2 CPU cores, about 1.53 in
5 minutes where bfloat16 is fast, else 1.67 in 3 to 5 minutes in float32. The rest is
multi_head_attn.py, line for line.

    python gpt.py                  train, report the loss, sample (--sample: only sample; --help)

Read it from the top. Everything below the line marked MACHINERY makes the lesson a
program you can rely on (command line, checkpoints, resume, errors); skip it at first.
"""
import math
import signal
import sys

if __name__ == "__main__":                                  # a Ctrl-C while PyTorch loads
    signal.signal(signal.SIGINT, signal.SIG_DFL)            # just ends the process

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

STAGE = "gpt"

# Hyperparameters. Each is also an option of the same name, e.g. --max_iters 500.
# NEW (d): three columns where they differ: (full, laptop, laptop-float32). The full
# configuration, 10.8 M parameters, is made for a GPU: on a 2-core CPU one of its steps takes
# about 10 s. Without a GPU, gpt.py trains a 0.8 M-parameter model for at most about 5
# minutes on 2 cores: the laptop column on CPUs that compute bfloat16 fast (AVX-512 BF16),
# else the laptop-float32 column: a third as many characters, in float32, at a higher rate.
HYPERPARAMETERS = dict(
    batch_size=(64, 32, 16),        # independent sequences trained on in parallel
    block_size=(256, 128, 128),     # context length: 256 characters are a few lines of verse
    max_iters=(2000, 2400, 1600),   # training steps; the best model is kept, so more is safe
    eval_interval=(250, 400, 200),  # steps between loss estimates
    eval_iters=(50, 25, 25),        # batches averaged in each estimate
    learning_rate=(1e-3, 3e-3, 4e-3),  # the peak, reached after warmup, then decayed
    dtype="auto",                   # bfloat16 where the hardware computes it fast, else float32
    n_embd=(384, 128, 128),         # width of the vectors that stand for characters and positions
    n_head=(6, 4, 4),               # heads of attention, each n_embd // n_head wide
    n_layer=(6, 4, 4),              # NEW (b): transformer blocks, one after the other
    dropout=(0.2, 0.0, 0.0),        # NEW (d): 10 M parameters memorise 1 M characters without it
    weight_decay=0.1,               # NEW (e): AdamW's pull of the weight matrices towards zero
    warmup_iters=100,               # NEW (e): steps of linear warmup while Adam's statistics settle
    min_lr=(1e-4, 3e-4, 4e-4),      # NEW (e): the learning rate that the cosine decay ends at
    grad_clip=1.0,                  # NEW (e): gradient norms above this are scaled down to it
)


# ---------------------------------------------------------------------------------------------
# The text and its characters

class CharTokenizer:
    """One token per character; the vocabulary is every character of the text (both splits)."""

    def __init__(self, chars):
        self.chars = chars                                  # sorted: token id -> character
        self.stoi = {ch: i for i, ch in enumerate(chars)}   # character -> token id
        self.vocab_size = len(chars)

    def encode(self, text):
        return [self.stoi[ch] for ch in text]               # "hi" -> [46, 47]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)          # [46, 47] -> "hi"


def load_text(path):
    """The text's tokenizer, and its token ids: the first 90% to train on, the rest to validate."""
    text = read_text(path)                                  # downloaded if missing, checked
    tokenizer = CharTokenizer("".join(sorted(set(text))))
    data = encode_corpus(tokenizer, text)                   # tokenizer.encode, but fast
    n = int(0.9 * len(data))
    return tokenizer, data[:n], data[n:]


# ---------------------------------------------------------------------------------------------
# Batches and the loss estimate

def get_batch(data, args, device, generator=None):
    """batch_size random windows of the text: x is block_size characters, y the same window
    moved one character on, so y[b, t] is the character that follows x[b, :t+1]."""
    starts = torch.randint(len(data) - args.block_size, (args.batch_size,), generator=generator)
    window = starts.numpy()[:, None] + np.arange(args.block_size + 1)  # (B, T+1) positions
    chunk = torch.from_numpy(data[window].astype(np.int64))  # copies the batch, not the text
    x, y = chunk[:, :-1], chunk[:, 1:]                      # (B, T) each
    return to_device(x, device), to_device(y, device)


@torch.no_grad()
def estimate_loss(model, splits, args, device):
    """Mean loss over eval_iters batches of each split: cheap, and a little noisy. The batches
    come from a generator of their own, the same ones at every evaluation: the estimates compare
    models on the same text, and the training run's own random numbers are left alone."""
    generator = torch.Generator().manual_seed(args.seed)
    model.eval()                                            # evaluation mode: no dropout
    out = {}
    for split, data in splits.items():
        losses = torch.zeros(args.eval_iters, device=device)  # no wait for each batch
        for k in range(args.eval_iters):
            x, y = get_batch(data, args, device, generator)
            with autocast(device, args.dtype):
                _, loss = model(x, y)
            losses[k] = loss
        out[split] = losses.mean().item()
    model.train()
    return out


# ---------------------------------------------------------------------------------------------
# The model: multi_head_attn.py's attention, its heads batched into one tensor, then the
# lecture's steps in its order, (a) to (d), each under its heading; (e) and (f) come after it.

class CausalSelfAttention(nn.Module):
    """multi_head_attn.py's MultiHeadAttention, rewritten to compute the same thing faster: one
    matrix product makes the queries, keys and values of all the heads, and the heads are a
    tensor dimension (nh) instead of a Python list (a test checks that both give the same
    output from the same weights). NEW (d): dropout. NEW (f): a key/value cache."""

    def __init__(self, n_embd, n_head, block_size, dropout):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)  # every head's query, key, value
        self.proj = nn.Linear(n_embd, n_embd)               # mixes what the heads found
        self.attn_dropout = nn.Dropout(dropout)             # NEW (d)
        self.resid_dropout = nn.Dropout(dropout)            # NEW (d)
        # True above the diagonal: the future (stage 3's tril, the other way round: the slice
        # the cache needs, and the mask the fused kernel takes). Not saved with the model
        # (persistent=False): it is made again from block_size whenever the model is.
        future = torch.ones(block_size, block_size, dtype=torch.bool).triu(diagonal=1)
        self.register_buffer("future", future, persistent=False)

    def forward(self, x, cache=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)               # (B, T, C) each
        # the width split into heads: (B, T, C) -> (B, T, nh, hs) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:                               # NEW (f): keep every key and value
            if "k" in cache:                                # earlier positions: from the cache
                k, v = torch.cat((cache["k"], k), dim=2), torch.cat((cache["v"], v), dim=2)
            cache["k"], cache["v"] = k, v                   # (B, nh, past + T, hs)
        past = k.shape[2] - T                               # positions before these T
        future = self.future[past:past + T, :past + T]      # (T, past + T)
        if use_fused_attention(q):                          # speed only: the same y (below)
            y = fused_attention(q, k, v, future, self.attn_dropout.p if self.training else 0.0)
        else:
            y = self.attn_dropout(self.attention_weights(q, k, future)) @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)              # heads side by side: (B, T, C)
        return self.resid_dropout(self.proj(y))

    def attention_weights(self, q, k, future):
        """multi_head_attn.py's Head.attention_weights for every head at once: (B, nh, T, hs)
        queries and (B, nh, past + T, hs) keys -> (B, nh, T, past + T), rows summing to 1."""
        scores = (q * k.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # q scaled first: speed only
        return F.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


# (a) feed-forward ------------------------------------------------------------------------------

class FeedForward(nn.Module):
    """NEW (a): after the positions have talked to each other (attention), each one thinks
    on its own: a two-layer network, 4 times wider inside, applied to every position."""

    def __init__(self, n_embd, dropout):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        # GELU, a smooth ReLU: GPT-2's (which computed its tanh approximation); the lecture: ReLU
        self.gelu = nn.GELU()
        self.proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)                  # NEW (d)

    def forward(self, x):
        return self.dropout(self.proj(self.gelu(self.fc(x))))  # (B, T, C) -> (B, T, 4C) -> same


# (b) blocks with residual connections, (c) layer norm ----------------------------------------

class Block(nn.Module):
    """NEW (b): a transformer block: communication (attention), then computation (feed-forward).
    Each adds what it computes to a residual stream, x + f(x), that carries the input through
    untouched, so that gradients reach the first block however deep the stack.
    NEW (c): each reads a layer-normalised copy of the stream. This is GPT-2's pre-norm; the
    original transformer normalised after each addition instead."""

    def __init__(self, n_embd, n_head, block_size, dropout):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)                     # NEW (c)
        self.attention = CausalSelfAttention(n_embd, n_head, block_size, dropout)
        self.ln2 = nn.LayerNorm(n_embd)                     # NEW (c)
        self.feed_forward = FeedForward(n_embd, dropout)

    def forward(self, x, cache=None):
        x = x + self.attention(self.ln1(x), cache)          # (B, T, C)
        x = x + self.feed_forward(self.ln2(x))              # (B, T, C)
        return x


# (d) scale-up and dropout: the full column of the hyperparameters, and each Dropout marked (d)

class GPT(nn.Module):
    """Embed characters and positions, n_layer blocks, a final layer norm, read out logits."""

    def __init__(self, vocab_size, n_embd, n_head, block_size, n_layer, dropout):
        super().__init__()
        self.token_embedding_table = nn.Embedding(vocab_size, n_embd)  # which character
        self.position_embedding_table = nn.Embedding(block_size, n_embd)  # where it stands
        self.dropout = nn.Dropout(dropout)                  # NEW (d)
        blocks = [Block(n_embd, n_head, block_size, dropout) for _ in range(n_layer)]
        self.blocks = nn.ModuleList(blocks)                 # NEW (b): n_layer of them
        self.ln_f = nn.LayerNorm(n_embd)                    # NEW (c): one more, at the end
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)  # NEW (e): no bias, as GPT-2
        # NEW (e): weight tying (GPT-2): reading a character in and writing one out share a matrix
        self.lm_head.weight = self.token_embedding_table.weight
        # NEW (e): GPT-2's initialisation: small normal weights, zero biases; the layers that
        # write into the residual stream (both are called proj) are scaled by 1/sqrt(2 n_layer),
        # so that what all the blocks add to the stream stays the same size however many
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets=None, caches=None):
        T = idx.shape[1]
        past = caches[0]["k"].shape[2] if caches and "k" in caches[0] else 0  # NEW (f): cached
        tok_emb = self.token_embedding_table(idx)           # (B, T) -> (B, T, C)
        pos_emb = self.position_embedding_table(torch.arange(past, past + T, device=idx.device))
        x = self.dropout(tok_emb + pos_emb)                 # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches else None)     # (B, T, C)
        logits = self.lm_head(self.ln_f(x))                 # (B, T, vocab_size)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())  # (B*T, vocab) vs (B*T,)
        return logits, loss


def make_model(vocab_size, args):
    """The model, from the hyperparameters."""
    return GPT(vocab_size, args.n_embd, args.n_head, args.block_size, args.n_layer, args.dropout)


# ---------------------------------------------------------------------------------------------
# NEW (e): the training recipe of GPT-2 and GPT-3, as nanoGPT uses it (the initialisation and
# weight tying are in the model above; clipping is in the training loop)

def make_optimizer(model, args, device):
    """AdamW. Weight decay (0.1, GPT-3's) pulls the matrices towards zero, the embeddings and so
    the tied lm_head included; biases and layer norms are left out of it, as nanoGPT does.
    beta2 = 0.99 is nanoGPT's choice for its small shakespeare_char run (GPT-3: 0.95)."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": args.weight_decay},
              {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.99),
                             fused=has_fused_adamw(device))  # fused: speed only (below)


def get_lr(step, args):
    """Linear warmup to learning_rate, then a cosine decay to min_lr at the run's planned end
    (args.planned_iters: a resumed run given more steps runs the extra ones at min_lr). The
    small stages did well with one fixed rate; a deep model does not: large first steps, while
    Adam's statistics are still noise, can throw it off, and small last steps let it settle."""
    if step < args.warmup_iters:
        return args.learning_rate * (step + 1) / args.warmup_iters
    progress = min(1.0, (step - args.warmup_iters) / max(1, args.planned_iters - args.warmup_iters))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))     # from 1 down to 0
    return args.min_lr + cosine * (args.learning_rate - args.min_lr)


# ---------------------------------------------------------------------------------------------
# Generation

def sample_next(logits, args, generator):
    """Draw the next token from the last position's logits: (B, vocab) -> (B, 1)."""
    if args.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)          # greedy: always the likeliest
    # dividing by the temperature: below 1 sharpens the odds, above 1 flattens them. A
    # temperature too small to divide by in float32 is as good as greedy.
    logits = logits.float()
    temperature = max(args.temperature, torch.finfo(torch.float32).tiny)
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if args.top_k is not None:                              # only the k likeliest
        kth = torch.topk(logits, min(args.top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if args.top_p < 1.0:                                    # the likeliest that make up top_p
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= args.top_p  # the likelier ones already do
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)


# (f) sampling with a key/value cache -----------------------------------------------------------

@torch.no_grad()
def generate(model, idx, max_new_tokens, args, device, generator, on_token=None, use_cache=True):
    """Extend idx, (B, T) token ids, by max_new_tokens tokens, each drawn after the ones before it.
    on_token, if given, sees each new (B, 1) as it comes, to print a sample as it grows.

    NEW (f): the key/value cache. Without it, each new character runs the model over the whole
    context again, though the keys and values of the earlier positions come out the same each
    time. With it, each block keeps them, and a step computes the query, key and value of the
    newest position only (its attention still reads every cached key and value). When the
    context is full, the window jumps: it keeps its last half, and the cache is filled again
    from it. Stages 1-3 slide the window by one character instead, so that every character sees
    block_size before it; sliding would move every cached position, so here a character sees
    between block_size / 2 and block_size. use_cache=False computes the same the slow way."""
    was_training = model.training
    model.eval()
    start, caches = max(0, idx.shape[1] - args.block_size), None  # the context is idx[:, start:]
    try:
        with autocast(device, args.dtype):
            for _ in range(max_new_tokens):
                if idx.shape[1] - start > args.block_size:  # full: keep the last half
                    start, caches = idx.shape[1] - max(1, args.block_size // 2), None
                if not use_cache:
                    logits, _ = model(idx[:, start:])       # the whole context, again
                elif caches is None:
                    caches = [{} for _ in model.blocks]
                    logits, _ = model(idx[:, start:], caches=caches)  # fill the caches
                else:
                    with one_vector_kernels(device, args.dtype):  # speed only (below)
                        logits, _ = model(idx[:, -1:], caches=caches)  # the newest position only
                next_id = sample_next(logits[:, -1, :], args, generator)  # (B, 1), from the last
                idx = torch.cat((idx, next_id), dim=1)      # (B, T+1)
                if on_token:
                    on_token(next_id)
    finally:
        model.train(was_training)                           # as the caller left it
    return idx


# ---------------------------------------------------------------------------------------------
# Training

def train(args, device):
    """Train a model, estimating the loss every eval_interval steps; the best one is kept."""
    tokenizer, train_data, val_data = load_text(args.data)
    torch.manual_seed(args.seed)
    model = make_model(tokenizer.vocab_size, args).to(device)
    optimizer = make_optimizer(model, args, device)         # NEW (e)
    # the machinery below the fold: checks, out_dir, resume, saving, the log, Ctrl-C
    run = TrainingRun(args, device, model, optimizer, tokenizer, train_data, val_data)
    training_model = run.for_training(model)        # model, or --compile's or torchrun's version
    for step in range(run.first_step, args.max_iters + 1):
        if step % args.eval_interval == 0 or step == args.max_iters:
            losses = estimate_loss(model, {"train": train_data, "val": val_data}, args, device)
            run.evaluated(step, losses)                     # print, log, save
        if step == args.max_iters or run.interrupted:
            break
        for group in optimizer.param_groups:                # NEW (e): warmup, then decay
            group["lr"] = get_lr(step, args)
        xb, yb = get_batch(train_data, args, device)
        with autocast(device, args.dtype):
            logits, loss = training_model(xb, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:                              # NEW (e): a rare huge gradient
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)  # is scaled down
        optimizer.step()
        run.stepped(step + 1, loss)
    return run.finish()


# =============================================================================================
# MACHINERY. Everything below makes the lesson above a program you can rely on: the command
# line, devices and precision, the download, checkpoints, resume, Ctrl-C, metrics and one-line
# errors. A first reading can stop here. It is the same, line for line, in all four scripts.
# =============================================================================================
import argparse  # noqa: E402  (the machinery's own imports, kept out of the lesson)
import contextlib  # noqa: E402
import csv  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

from tqdm import tqdm  # noqa: E402

DATA_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/"
            "input.txt")
DATA_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_DATA = "input.txt"
RESUME_MAY_CHANGE = ("max_iters", "eval_interval", "eval_iters", "dtype")
RUN_FILES = ("ckpt.pt", "last.pt", "log.csv", "metrics.json")   # what a run writes to out_dir
LOG_FIELDS = ("step", "train_loss", "val_loss", "train_seconds")   # a row of log.csv
TEMP_PREFIX = ".tmp-"                               # a file being written, not yet renamed
MADE_HERE = {}                                      # out_dir: the folders made to lock it
PRESETS = ("full", "laptop", "laptop-float32")     # gpt.py's columns; the others have one
HAS_PRESETS = any(isinstance(value, tuple) for value in HYPERPARAMETERS.values())
SETTINGS = (*HYPERPARAMETERS, "preset", "seed")     # what a checkpoint's config holds


class CLIError(Exception):
    """A problem with the input, the settings or the machine: main() prints it as one line."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):                       # one line, not the whole usage text
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def main(argv=None):
    """Train (the default), --sample or --evaluate. The exit code is 0, or 1 for a problem
    (one line on stderr), 2 for a mistyped option, 130 after a Ctrl-C."""
    args = parse_args(argv)
    tf32, stdout = torch.backends.cuda.matmul.allow_tf32, sys.stdout   # main() puts them back
    handler, errors = set_ctrl_c(signal.default_int_handler), getattr(sys.stdout, "errors", None)
    if errors:                                              # a terminal that cannot show one of
        sys.stdout.reconfigure(errors="backslashreplace")   # the text's characters shows its code
    try:
        device = join_processes(pick_device(args.device))
        configure(args, device)
        if args.evaluate:
            evaluate(args, device)
        elif args.sample:
            sample(args, device)
        else:
            train(args, device)
        leave_together()
    except CLIError as e:
        return fail(str(e))
    except (MemoryError, RuntimeError) as e:                # RuntimeError: only the allocators'
        if not isinstance(e, MemoryError) and not re.search("alloc|out of memory", str(e)):
            raise
        return fail("out of memory: try a smaller --batch_size, --block_size or model")
    except OSError as e:                            # a file that vanished or is locked...
        return fail(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
    except KeyboardInterrupt:
        return fail("interrupted", code=130)
    finally:
        set_ctrl_c(handler)
        torch.backends.cuda.matmul.allow_tf32, sys.stdout = tf32, stdout
        if errors:
            sys.stdout.reconfigure(errors=errors)
        unlock(args.out_dir)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 130 if getattr(args, "interrupted", False) else 0


def fail(message, code=1):
    if rank() == 0:                                         # under torchrun, the others keep quiet
        print(f"{STAGE}.py: {'error: ' * (code == 1)}{message}", file=sys.stderr)
    return code


# ---- options ----

def parse_args(argv):
    parser = ArgumentParser(prog=f"{STAGE}.py", description=__doc__.split("\n\n")[0],
                            allow_abbrev=False)
    group = parser.add_argument_group("hyperparameters (their defaults are at the top of the file)")
    notes = hyperparameter_notes()
    for name, default in HYPERPARAMETERS.items():
        columns = default if isinstance(default, tuple) else (default,)
        shown = ", ".join(f"{p} {v}" for p, v in zip(PRESETS, columns)) if len(columns) > 1 \
            else default
        group.add_argument(f"--{name}", type=type(columns[0]), help=f"{notes[name]} ({shown})")
    add = parser.add_argument_group("run").add_argument
    add("--data", default=DEFAULT_DATA, help="UTF-8 text to train on (default input.txt, tiny "
        "Shakespeare, downloaded if missing)")
    add("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
        help="where to run (auto: cuda, then mps, then cpu)")
    add("--seed", type=int, default=None, help="random seed: same seed, same run (default 1337)")
    add("--out_dir", default=f"out/{STAGE}", help="where ckpt.pt (the best model), last.pt (the "
        "latest state, for --resume), log.csv and metrics.json go")
    add("--resume", action="store_true", help="continue from out_dir/last.pt, with its settings; "
        "a longer --max_iters runs the extra steps at the final learning rate")
    add("--max_eval_chars", type=int, default=1_000_000,
        help="cap on the characters that the full validation loss scores")
    if HAS_PRESETS:
        add("--preset", default=None, choices=PRESETS, help="which column of hyperparameters "
            "(default: full on a CUDA GPU, else laptop where bfloat16 is fast, else "
            "laptop-float32)")
    add("--compile", action="store_true", help="torch.compile the training steps (faster on a GPU "
        "in long runs; compiling takes a while)")
    add = parser.add_argument_group("sampling").add_argument
    add("--sample", action="store_true", help="only sample from out_dir/ckpt.pt")
    add("--prompt", default=None, help="text to continue (default a newline)")
    add("--max_new_tokens", type=int, default=500, help="characters to generate")
    add("--temperature", type=float, default=1.0, help="0 is greedy; below 1 more cautious")
    add("--top_k", type=int, default=None, help="draw among the k likeliest characters only")
    add("--top_p", type=float, default=1.0, help="draw only among the likeliest characters that "
        "together have this probability")
    add("--num_samples", type=int, default=1, help="how many samples")
    add("--sample_every", type=int, default=0, help="print a short sample at each evaluation on a "
        "multiple of this many steps (0: never)")
    add = parser.add_argument_group("evaluation").add_argument
    add("--evaluate", metavar="PATH", help="only report the saved model's loss on a text file")
    add("--skip_unknown", action="store_true", help="with --evaluate, leave out characters the "
        "model never saw instead of refusing the text")
    args = parser.parse_args(argv)
    args.preset = getattr(args, "preset", None)
    args.given = {name for name in SETTINGS if getattr(args, name) is not None}
    args.prompt_given = args.prompt is not None
    args.prompt = "\n" if args.prompt is None else args.prompt
    return args


def hyperparameter_notes():
    """The comment beside each hyperparameter at the top of this file, for --help."""
    with open(__file__, encoding="utf-8") as f:
        block = f.read().split("HYPERPARAMETERS = dict(", 1)[1].split("\n)", 1)[0]
    return dict(re.findall(r"^    (\w+)=.*?#\s*(.+)$", block, flags=re.M))


def configure(args, device):
    """Settle the hyperparameters: the command line's, else a resumed run's, else those at the
    top of the file (for gpt.py, the preset's column); check them; pick the precision."""
    training = not (args.sample or args.evaluate)
    if training and rank() == 0:                            # before anything is read from out_dir
        lock(args.out_dir)
    if training and world_size() > 1:                       # the others wait for rank 0's lock
        wait_for_the_others()
    last = os.path.join(args.out_dir, "last.pt")
    args.resuming = load_checkpoint(last, for_resume=True) if args.resume and training else None
    if args.resuming:
        saved = args.resuming["config"]
        for name in sorted(args.given - set(RESUME_MAY_CHANGE)):
            if getattr(args, name) != saved[name]:
                raise CLIError(f"--{name} {getattr(args, name)} differs from the resumed run's "
                               f"{saved[name]}: a resumed run keeps its settings but for "
                               f"{', '.join(RESUME_MAY_CHANGE)}")
        for name, value in saved.items():                   # its precision too, unless given
            if name not in args.given:
                setattr(args, name, value)
    elif HAS_PRESETS and args.preset is None:               # gpt.py: a column, by the hardware
        fast = pick_dtype(args.dtype or HYPERPARAMETERS["dtype"], device) == "bfloat16"
        args.preset = "full" if device.type == "cuda" else "laptop" if fast else "laptop-float32"
        if training and args.preset != "full":
            print(f"no CUDA GPU: the {args.preset} preset, at most about 5 minutes on 2 CPU cores "
                  f"in {'bfloat16' if fast else 'float32'} (--preset full for the GPU's)")
    args.seed = 1337 if args.seed is None else args.seed
    for name, default in HYPERPARAMETERS.items():
        if getattr(args, name) is None:
            is_column = isinstance(default, tuple)
            setattr(args, name, default[PRESETS.index(args.preset)] if is_column else default)
    check_hyperparameters(vars(args))
    check_run_options(args)
    if training:                                            # --sample, --evaluate: the checkpoint's
        check_memory(args, device)                          # model, made as it was trained
    args.planned_iters = args.resuming["planned_iters"] if args.resuming else args.max_iters
    args.dtype = pick_dtype(args.dtype, device)
    if device.type == "cuda":                               # TF32 matrix products: speed only
        torch.backends.cuda.matmul.allow_tf32 = True


def check_hyperparameters(values):
    """Refuse impossible hyperparameters, from the command line or from a checkpoint."""
    for name, default in HYPERPARAMETERS.items():
        value, kind = values.get(name), type(default[0] if isinstance(default, tuple) else default)
        if not isinstance(value, kind) and not (kind is float and type(value) is int):
            raise CLIError(f"--{name} must be {kind.__name__}, not {value!r}")
        if kind is int:
            at_least(name, value, 0 if name == "warmup_iters" else 1)
    if not 0 < values["learning_rate"] < 1e30:               # beyond that, float32 overflows
        raise CLIError(f"--learning_rate must be positive, and below 1e30, not "
                       f"{values['learning_rate']}")
    for name in ("weight_decay", "min_lr", "grad_clip"):
        if name in values and not 0 <= values[name] < 1e30:
            raise CLIError(f"--{name} cannot be negative, or 1e30 or more, not {values[name]}")
    if "dropout" in values and not 0 <= values["dropout"] < 1:
        raise CLIError(f"--dropout must be in [0, 1), not {values['dropout']}")
    if "n_head" in values and values["n_embd"] % values["n_head"]:
        raise CLIError(f"--n_head ({values['n_head']}) must divide --n_embd ({values['n_embd']})")
    if values["dtype"] not in ("auto", "float32", "bfloat16"):
        raise CLIError(f"--dtype must be auto, float32 or bfloat16, not {values['dtype']}")


def at_least(name, value, lowest):
    if value < lowest:
        raise CLIError(f"--{name} cannot be negative, not {value}" if lowest == 0 else
                       f"--{name} must be at least {lowest}, not {value}")


def check_run_options(args):
    for name, lowest in (("num_samples", 1), ("max_eval_chars", 1), ("max_new_tokens", 0),
                         ("sample_every", 0), ("top_k", 1)):
        if getattr(args, name) is not None:
            at_least(name, getattr(args, name), lowest)
    if not args.temperature >= 0:
        raise CLIError(f"--temperature cannot be negative, not {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise CLIError(f"--top_p must be in (0, 1], not {args.top_p}")


def check_memory(args, device):
    """Training settings that cannot fit in this computer's memory are refused before anything
    is made. Left to the allocator, they are refused too, but not everywhere: some systems
    (Linux set to always overcommit, for one) grant any allocation and end the process that
    fills it. Each part counted must fit alone: a lower bound. The model is made first in the
    computer's memory, also for a GPU; on a CPU, training keeps its gradients, AdamW's two
    moments and the activations there too, in each of torchrun's processes on this computer."""
    memory = physical_memory()
    if memory is None:
        return
    B, T, on_cpu = args.batch_size, args.block_size, device.type == "cpu"
    torchrun = on_cpu and "RANK" in os.environ              # its processes on this computer
    here = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if torchrun else 1
    with torch.device("meta"):                              # shapes only: nothing is allocated
        model = make_model(1, args)
    params = sum(p.numel() for p in model.parameters())     # float32, 4 bytes each
    masks = sum(b.numel() * b.element_size() for b in model.buffers())
    kept = " (with their gradients and AdamW's moments)" if on_cpu else ""
    needs = {f"a batch of --batch_size {B} x --block_size {T}": 2 * 8 * B * (T + 1),  # int64
             f"the attention masks of --block_size {T}": masks,
             f"the model's {params:,} parameters{kept}": 4 * params * (4 if on_cpu else 1)}
    if on_cpu and hasattr(args, "n_embd"):
        C = args.n_embd
        needs[f"one layer's activations at --batch_size {B}, --block_size {T} and --n_embd {C}"] \
            = 4 * B * T * C
    what, need = max(needs.items(), key=lambda item: item[1])
    if need * here > memory:                                # rounded apart, never equal
        gib, has = math.ceil(need / 2 ** 30 * 10) / 10, math.floor(memory / 2 ** 30 * 10) / 10
        each, fewer = "", ""
        if here > 1:                                        # each process keeps its own
            each = (f" in each of torchrun's {here} processes on this computer, "
                    f"{gib * here:,.1f} GiB in all")
            fewer = " or fewer processes"
        raise CLIError(f"out of memory: {what} alone would take {gib:,.1f} GiB{each}, and this "
                       f"computer has {has:,.1f} GiB; try smaller settings{fewer}")


def physical_memory():
    """Bytes of memory, or None where the system does not say (Windows, or -1 for unknown)."""
    try:
        page, pages = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
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


def pick_dtype(name, device):
    """Mixed precision: bfloat16 matrix products where the hardware has them fast, else float32."""
    if name == "auto":
        if device.type == "cpu":
            fast = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        else:
            fast = device.type == "cuda" and torch.cuda.is_bf16_supported()
        name = "bfloat16" if fast else "float32"
    return name


def autocast(device, dtype_name):
    """Matrix products in bfloat16 inside this block if dtype_name says so; weights stay float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype_name == "bfloat16")


def to_device(batch, device):
    if device.type == "cuda":                       # pinned memory: the copy overlaps the compute
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def hardware_name(device):
    """The GPU's name, or the CPU's with its threads and its widest vector instructions, which
    decide its speed here (bfloat16 is fast only from AVX-512 BF16 on)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = {}
    with contextlib.suppress(OSError):                      # Linux; elsewhere, what platform knows
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            fields = [line.partition(":") for line in f]
        info = {key.strip(): value.strip() for key, _, value in fields}
    name = info.get("model name", platform.processor() or platform.machine())
    if device.type == "mps":
        return f"Apple MPS ({name})"
    flags = info.get("flags", "").split()
    isa = [label for flag, label in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"),
                                     ("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags]
    return f"{name}, {torch.get_num_threads()} threads" + (f", {isa[0]}" if isa else "")


# ---- more than one process: torchrun and DistributedDataParallel ----

def join_processes(device):
    """Under torchrun (it sets RANK, LOCAL_RANK and WORLD_SIZE), join the other processes to
    train one model: each on batches of its own, their gradients averaged by PyTorch's
    DistributedDataParallel; NCCL between CUDA GPUs, one each, gloo between CPU processes.
    Only rank 0 prints and writes. Returns this process's device."""
    if "RANK" not in os.environ:
        return device
    if device.type == "mps":
        raise CLIError("torchrun: Apple's MPS has no distributed backend here: use --device cpu")
    if device.type == "cuda":
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise CLIError(f"torchrun: {torch.cuda.device_count()} CUDA GPUs here, too few for one "
                           f"process each: ask for fewer with --nproc_per_node")
        device = torch.device("cuda", local)
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


def wait_for_the_others():
    """A torchrun barrier. One broken because another process failed is one line here too (that
    process says why, if it is rank 0, the one that prints). NCCL's is told this process's GPU:
    left to guess, it warns."""
    nccl = torch.distributed.get_backend() == "nccl"
    try:
        torch.distributed.barrier(device_ids=[torch.cuda.current_device()] if nccl else None)
    except RuntimeError:
        raise CLIError("torchrun: another process ended with an error")


def leave_together():
    """Under torchrun with gloo, the processes end together: the others wait while rank 0
    scores the best model and samples (gloo waits up to 30 minutes). One that left while rank 0
    was still at it sometimes aborted ("terminate called without an active exception"), and
    torchrun failed the whole run: one launch in ten, PyTorch 2.13. NCCL processes leave as
    before: the abort was not seen there, and NCCL's barrier gives up after 10 minutes."""
    if world_size() > 1 and torch.distributed.get_backend() == "gloo":
        wait_for_the_others()


# ---- speed only: used by gpt.py, whose lesson marks each call ----

def use_fused_attention(q):
    """PyTorch's fused attention kernel, or the products written out? Both compute the same (a
    test checks it). The fused kernel is faster on a GPU, and on a CPU but for one case: to
    train in bfloat16 there, the written-out products are (profiled on PyTorch 2.13: a training
    step of the laptop preset took half the time; in float32, the fused kernel's was 4% less)."""
    return q.device.type != "cpu" or not torch.is_grad_enabled() or q.dtype != torch.bfloat16


def fused_attention(q, k, v, future, dropout):
    """softmax(q k^T / sqrt(hs)) v, the future masked out, in one fused kernel. With nothing
    cached the mask is the plain causal one, which the fastest kernels know without a mask."""
    T, seen = future.shape
    if T == seen:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T > 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=~future, dropout_p=dropout)


HAS_ONE_VECTOR_KERNEL = torch.__version__ >= (2, 6)     # PyTorch's own bf16 matrix-vector kernel


@contextlib.contextmanager
def one_vector_kernels(device, dtype_name):
    """A cached sampling step multiplies every weight matrix by one vector: all reading, almost
    no arithmetic. On a CPU in bfloat16, PyTorch hands matrix products to oneDNN, which is
    made for big ones and slow at this; PyTorch's own kernel (from version 2.6) is about twice
    as fast. So oneDNN is off for such a step only, and on again before anything else runs."""
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
    """The file's text, checked to be UTF-8; tiny Shakespeare is downloaded if it is missing."""
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


def download_corpus(path):
    print(f"{path} not found: downloading tiny Shakespeare from {DATA_URL}")
    try:
        with urllib.request.urlopen(DATA_URL, timeout=30) as response:
            payload = response.read()
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot download {DATA_URL} ({getattr(e, 'reason', e)}): fetch it "
                       f"yourself into {path}, or train on your own text with --data PATH")
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
        part = text[start:start + chunk].encode("utf-32-le", "surrogatepass")
        points = np.frombuffer(part, dtype=np.uint32)
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


# ---- files: atomic writes, one run per folder, checkpoints ----

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
    """Claim out_dir for one training run: out_dir/run.lock holds its process id. Another run
    into the folder is refused; a lock left by a process that has ended is taken over. Then
    what an ended run left half done is tidied: its temporary files are removed, and the files
    it was moving aside (see set_aside) go back where they were. A folder that cannot be
    written is found here, before any training."""
    path, mine = os.path.join(out_dir, "run.lock"), None
    try:
        missing, folder = [], os.path.abspath(out_dir)
        while not os.path.isdir(folder):                    # the folders this run makes, which
            missing.insert(0, folder)                       # unlock() removes if still empty
            folder = os.path.dirname(folder)
        os.makedirs(out_dir, exist_ok=True)
        MADE_HERE[os.path.abspath(out_dir)] = missing
        fd, mine = tempfile.mkstemp(dir=out_dir, prefix=TEMP_PREFIX)
        with os.fdopen(fd, "w") as f:                       # a whole lock file, linked into place:
            f.write(f"{os.getpid()}\n")                     # nobody ever sees it empty
        while True:
            try:
                os.link(mine, path)
                break
            except FileExistsError:
                holder = lock_holder(path)
                if holder not in (None, os.getpid()) and process_alive(holder):
                    raise CLIError(f"{out_dir} is in use by another run (process {holder}): wait, "
                                   f"or use another --out_dir (if no run is going, delete {path})")
                os.unlink(path)                             # its process has ended
        for name in os.listdir(out_dir):
            left = os.path.join(out_dir, name)
            if name.startswith(TEMP_PREFIX) and left != mine:
                os.unlink(left)
            elif name.startswith(".previous-"):
                for moved in os.listdir(left):
                    if not os.path.exists(os.path.join(out_dir, moved)):
                        os.replace(os.path.join(left, moved), os.path.join(out_dir, moved))
                shutil.rmtree(left)
    except OSError as e:
        raise CLIError(f"cannot write to {out_dir}: {e.strerror or e}")
    finally:
        if mine and os.path.exists(mine):
            os.unlink(mine)


def lock_holder(path):
    try:
        with open(path, encoding="utf-8") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def process_alive(pid):
    if os.name == "nt":                                     # no safe check there: assume it runs
        return True
    try:
        os.kill(pid, 0)                                     # signal 0 only asks if it exists
    except ProcessLookupError:
        return False
    except PermissionError:                                 # it exists, under another user
        pass
    return True


def unlock(out_dir):
    path = os.path.join(out_dir, "run.lock")
    if lock_holder(path) == os.getpid():
        os.unlink(path)
    for folder in reversed(MADE_HERE.pop(os.path.abspath(out_dir), [])):
        with contextlib.suppress(OSError):                  # a run that failed before saving
            os.rmdir(folder)                                # anything leaves no empty folder


def set_aside(out_dir):
    """At a new run's first save, an earlier run's files in out_dir move all together to
    out_dir/previous/ if it finished (it wrote metrics.json), else to previous-unfinished/,
    replacing what was there: a run that was killed or diverged never pushes out a finished
    one. A crash half way is undone by lock()."""
    names = [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]
    if not names:
        return
    target = os.path.join(out_dir, "previous" if "metrics.json" in names else "previous-unfinished")
    try:
        staging = tempfile.mkdtemp(dir=out_dir, prefix=".previous-")
        for name in names:
            os.replace(os.path.join(out_dir, name), os.path.join(staging, name))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    except OSError as e:
        raise CLIError(f"cannot write to {out_dir}: {e.strerror or e}")
    print(f"the earlier run's files in {out_dir} are now in {target}")


def save_checkpoint(path, **fields):
    buffer = io.BytesIO()                           # in memory first: a full disk is then an
    torch.save(dict(stage=STAGE, **fields), buffer)     # OSError of atomic_write, named there
    atomic_write(path, buffer.getvalue())


def load_checkpoint(path, for_resume=False):
    """A checkpoint of this stage, checked field by field. It is loaded with weights_only=True
    (tensors and plain values only), so that opening one never runs code."""
    if not os.path.exists(path):
        what = "nothing to resume: " if for_resume else ""
        raise CLIError(f"{what}no checkpoint at {path}; train first (python {STAGE}.py), or pass "
                       f"--out_dir")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise CLIError(f"{path} is damaged or is not a PyTorch checkpoint")
    if not isinstance(checkpoint, dict) or "stage" not in checkpoint:
        raise CLIError(f"{path} is not a checkpoint of this repository")
    if checkpoint["stage"] != STAGE:
        raise CLIError(f"{path} was written by {checkpoint['stage']}.py, not {STAGE}.py: use that "
                       f"script, or another --out_dir")
    fields = dict(model=dict, config=dict, vocab=str, step=int)
    if for_resume:
        fields.update(optimizer=dict, rng=list, world_size=int, log=list, best=dict,
                      planned_iters=int, seconds=float)
    else:
        fields.update(val_loss=float)
    for name, kind in fields.items():
        if not isinstance(checkpoint.get(name), kind):
            raise CLIError(f"{path} is damaged: its {name} is missing or not a {kind.__name__}")
    config, chars, weights = checkpoint["config"], checkpoint["vocab"], checkpoint["model"]
    try:
        if sorted(config, key=str) != sorted(SETTINGS):
            raise CLIError("its settings are not this script's")
        check_hyperparameters(config)
        if config["preset"] not in (None, *PRESETS) or not isinstance(config["seed"], int):
            raise CLIError("its preset or seed is not one")
    except CLIError as e:
        raise CLIError(f"{path} is damaged: {str(e).lstrip('-')}")
    if not chars or list(chars) != sorted(set(chars)):
        raise CLIError(f"{path} is damaged: its vocabulary is not a sorted set of characters")
    if not all(isinstance(name, str) and torch.is_tensor(t) and t.layout == torch.strided
               and t.is_floating_point() and t.isfinite().all() for name, t in weights.items()):
        raise CLIError(f"{path} is damaged: its weights are not all finite numbers")
    if for_resume:
        rows, best = checkpoint["log"], checkpoint["best"]
        numbers = [v for row in rows if isinstance(row, dict) and tuple(row) == LOG_FIELDS
                   for v in row.values()] + [best.get("val_loss")]
        step = best.get("step", "none")
        if len(numbers) != 4 * len(rows) + 1 or not all(type(v) in (int, float) for v in numbers) \
                or best.keys() != {"step", "val_loss"} or not (step is None or type(step) is int):
            raise CLIError(f"{path} is damaged: its log of evaluations is not one")
    return checkpoint


def check_optimizer_state(state, optimizer):
    """A saved AdamW state, checked against the optimizer it is for: PyTorch's load_state_dict
    takes wrong shapes or missing entries without a word, and fails later, in a step."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    groups, fresh = state.get("param_groups"), optimizer.state_dict()["param_groups"]
    moments = state.get("state")
    if not (isinstance(groups, list) and len(groups) == len(fresh) and isinstance(moments, dict)):
        raise ValueError("no optimizer state")
    for group, expected in zip(groups, fresh):
        if not (isinstance(group, dict) and group.get("params") == expected["params"]
                and all(type(group.get(k)) in (int, float) for k in ("lr", "eps", "weight_decay"))
                and isinstance(group.get("betas"), (tuple, list)) and len(group["betas"]) == 2):
            raise ValueError("a group of parameters that does not fit")
    for i, moment in moments.items():
        if not (type(i) is int and 0 <= i < len(params) and isinstance(moment, dict)
                and "step" in moment and all(torch.is_tensor(moment.get(k)) and
                                             moment[k].shape == params[i].shape
                                             for k in ("exp_avg", "exp_avg_sq"))):
            raise ValueError("moments that do not fit")


def restore_model(checkpoint, args, device):
    """The model of a checkpoint, on device; its hyperparameters replace those in args (but
    for dtype and seed: precision belongs to the machine, and a sample has a seed of its own)."""
    for name, value in checkpoint["config"].items():
        if name not in ("dtype", "seed"):
            setattr(args, name, value)
    tokenizer = CharTokenizer(checkpoint["vocab"])
    model = make_model(tokenizer.vocab_size, args)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError:
        raise CLIError("the checkpoint's weights do not fit its own model: it is damaged")
    return model.to(device), tokenizer


def rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type in ("cuda", "mps"):                  # dropout draws on the device
        state[device.type] = getattr(torch, device.type).get_rng_state()
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type != "cpu" and device.type in state:
        getattr(torch, device.type).set_rng_state(state[device.type])


def set_ctrl_c(handler):
    """Install a handler for Ctrl-C and return the one before; off the main thread, where
    Python allows none, change nothing."""
    try:
        return signal.signal(signal.SIGINT, handler)
    except ValueError:
        return None


# ---- training, around the loop of train() ----

class TrainingRun:
    """What the training loop of train() calls on. It checks the data and the prompt, claims
    out_dir, resumes a run, logs and saves at each evaluation, watches for Ctrl-C and for a
    loss that is no longer a number, and ends with the full validation loss, a sample and
    metrics.json.

    Resume is exact. The evaluations draw their batches from a generator of their own, so the
    training's random numbers depend on the steps alone, and last.pt, saved between two steps,
    holds all of them. Only the scheduled evaluations choose the best model; a Ctrl-C saves
    last.pt where it stopped. So a resumed run ends with the files of a run that never stopped.
    Under torchrun every process runs this too; they agree on when to stop, rank 0 writes."""

    def __init__(self, args, device, model, optimizer, tokenizer, train_data, val_data):
        self.args, self.device, self.model, self.optimizer = args, device, model, optimizer
        self.tokenizer, self.val_data, self.started = tokenizer, val_data, time.time()
        self.rank, self.world = rank(), world_size()
        for split, data in (("train", train_data), ("val", val_data)):
            if len(data) < args.block_size + 1:
                raise CLIError(f"{args.data} is too short: its {split} split has {len(data)} "
                               f"characters, fewer than block_size + 1 = {args.block_size + 1}")
        encode_prompt(tokenizer, args)                      # a bad prompt fails now, not at the end
        self.paths = {name: os.path.join(args.out_dir, name) for name in RUN_FILES}
        self.log, self.best = [], dict(step=None, val_loss=math.inf)
        self.first_step, self.seconds_before, saved = 0, 0.0, args.resuming
        if saved:
            if saved["vocab"] != tokenizer.chars:
                raise CLIError(f"the run to resume was trained on other characters than "
                               f"{args.data}")
            if saved["world_size"] != self.world:
                raise CLIError(f"{self.paths['last.pt']} was trained by {saved['world_size']} "
                               f"processes: resume it with as many (torchrun --nproc_per_node), "
                               f"or start a new run")
            if saved["step"] > args.max_iters:
                raise CLIError(f"the run to resume is at step {saved['step']}, past --max_iters "
                               f"{args.max_iters}")
            try:
                model.load_state_dict(saved["model"])
                check_optimizer_state(saved["optimizer"], optimizer)
                optimizer.load_state_dict(saved["optimizer"])
                set_rng_state(saved["rng"][self.rank], device)
            except (RuntimeError, ValueError, KeyError, TypeError, IndexError):
                raise CLIError(f"{self.paths['last.pt']} is damaged: its model or optimizer "
                               f"does not fit")
            self.first_step, self.log, self.best = saved["step"], saved["log"], saved["best"]
            self.seconds_before = saved["seconds"]
        elif self.world > 1:                                # each process draws its own batches
            torch.manual_seed(args.seed + self.rank)
        self.moved_aside = bool(saved)                      # a resumed run's files are its own
        self.step, self.saved_step = self.first_step, self.first_step if saved else None
        self.n_params = sum(p.numel() for p in model.parameters())
        print(f"{STAGE}: {self.n_params:,} parameters; {len(train_data) + len(val_data):,} "
              f"characters, {tokenizer.vocab_size} distinct; {device} ({hardware_name(device)}), "
              f"{args.dtype}" + (f"; preset {args.preset}" if args.preset else ""))
        if saved:
            print(f"resuming from {self.paths['last.pt']} at step {self.first_step}")
        self.bar = tqdm(total=args.max_iters, initial=self.first_step, desc=STAGE,
                        disable=None if self.rank == 0 else True, dynamic_ncols=True)
        self.pending, self.train_seconds = [], 0.0
        self.stop_requested = self.agreed_stop = False
        self.mark = time.time()
        set_ctrl_c(self.on_ctrl_c)

    def for_training(self, model):
        """The model as the training loop calls it: with --compile, torch.compile's version;
        under torchrun, wrapped in DistributedDataParallel, which averages the gradients."""
        args, device = self.args, self.device
        if args.compile:
            rng = rng_state(device)                         # the warm-up's dropout must not
            try:                                            # change the run or its resume
                compiled = torch.compile(model)
                x = torch.zeros((args.batch_size, args.block_size), dtype=torch.long, device=device)
                with autocast(device, args.dtype):
                    compiled(x, x)[1].backward()            # compile now: a failure shows here
                model.zero_grad(set_to_none=True)
                model = compiled
            except Exception as e:
                print(f"--compile: torch.compile does not work here ({type(e).__name__}); "
                      f"running without it")
            finally:
                set_rng_state(rng, device)
        if self.world > 1:
            ids = [device.index] if device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.mark = time.time()                             # compiling is not training time
        return model

    def on_ctrl_c(self, signum, frame):
        if self.stop_requested and self.world == 1:         # the second Ctrl-C: quit at once
            raise KeyboardInterrupt                         # (torchrun passes its own one on)
        if not self.stop_requested:
            self.bar.write("Ctrl-C: stopping after this step (press it again to quit at once)")
        self.stop_requested = True

    @property
    def interrupted(self):                                  # under torchrun: all stop, or none
        return self.stop_requested if self.world == 1 else self.agreed_stop

    def stepped(self, step, loss):
        """After each training step: progress, and every 10 steps a look at the losses (one
        wait for the GPU, not one every step)."""
        self.step = step
        self.pending.append(loss.detach())
        self.bar.update(1)
        if len(self.pending) == 10 or step % self.args.eval_interval == 0:
            self.check_pending()
        now = time.time()
        self.train_seconds, self.mark = self.train_seconds + now - self.mark, now

    def check_pending(self):
        """The losses since the last look. Under torchrun the processes agree here, on their
        mean losses and on whether any was told to stop, so that all stop at the same step."""
        values = torch.stack(self.pending).float() if self.pending else torch.zeros(0)
        if self.world > 1:
            shared = torch.cat([values.to(self.device), torch.ones(1, device=self.device)
                                * self.stop_requested])
            torch.distributed.all_reduce(shared)
            values, self.agreed_stop = shared[:-1] / self.world, bool(shared[-1] > 0)
        losses, self.pending = values.tolist(), []
        for i, value in enumerate(losses):
            if not math.isfinite(value):
                self.diverged(self.step - len(losses) + i + 1, f"training loss {value}")
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
        if not self.moved_aside and self.rank == 0:
            set_aside(self.args.out_dir)
            self.moved_aside = True
        if losses["val"] < self.best["val_loss"]:           # only a better model replaces it
            self.best = dict(step=step, val_loss=losses["val"])
            if self.rank == 0:
                save_checkpoint(self.paths["ckpt.pt"], model=self.model.state_dict(),
                                config=self.config(), vocab=self.tokenizer.chars, step=step,
                                val_loss=losses["val"])
        self.save_last()
        if self.rank > 0:
            self.mark = time.time()
            return
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=LOG_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.log)
        atomic_write(self.paths["log.csv"], text.getvalue().encode("utf-8"))
        if self.args.sample_every and step % self.args.sample_every == 0:
            self.bar.write(sample_text(self.model, self.tokenizer, self.args, self.device, 200)[0])
        self.mark = time.time()                             # evaluating and saving: not training

    def config(self):
        return {name: getattr(self.args, name) for name in SETTINGS}

    def save_last(self):
        rng = [rng_state(self.device)]                      # every process's random numbers
        if self.world > 1:
            rng = [None] * self.world
            torch.distributed.all_gather_object(rng, rng_state(self.device))
        if self.rank == 0:
            save_checkpoint(self.paths["last.pt"], model=self.model.state_dict(),
                            config=self.config(), vocab=self.tokenizer.chars, step=self.step,
                            log=self.log, best=self.best, optimizer=self.optimizer.state_dict(),
                            rng=rng, world_size=self.world, planned_iters=self.args.planned_iters,
                            seconds=float(self.seconds_before + self.train_seconds))
        self.saved_step = self.step

    def finish(self):
        """After the loop: where a Ctrl-C stopped it, save last.pt; then score the best model on
        the whole validation split, print a sample of it and write metrics.json."""
        self.check_pending()
        self.bar.close()
        self.stop_requested = True                          # from here on, Ctrl-C quits at once
        args, device, model = self.args, self.device, self.model
        if self.step < args.max_iters:
            args.interrupted = True                         # main() exits with 130
            if self.step != self.saved_step:
                self.save_last()
            print(f"interrupted at step {self.step}: saved {self.paths['last.pt']}; "
                  f"python {STAGE}.py --resume --out_dir {args.out_dir} carries on")
        if self.rank > 0 or (self.world > 1 and self.step < args.max_iters):
            return None                                     # torchrun ends its processes soon
        best = load_checkpoint(self.paths["ckpt.pt"])
        try:
            model.load_state_dict(best["model"])
        except RuntimeError:
            raise CLIError(f"{self.paths['ckpt.pt']} is not this run's model: it was replaced")
        data = self.val_data[:args.max_eval_chars + 1]
        val_loss, scored = full_loss(model, data, args, device)
        capped = f", the first {scored:,} of {len(self.val_data) - 1:,}" \
            if len(self.val_data) > len(data) else ""
        print(f"best model (step {best['step']}): full val loss {val_loss:.4f} nats = "
              f"{val_loss / math.log(2):.4f} bits per character ({scored:,} characters{capped})")
        warning = None
        if best["step"] == 0 and any(row["step"] > 0 for row in self.log):
            warning = (f"no evaluation after step 0 beat the untrained model: the learning rate "
                       f"({args.learning_rate}) may be too high")
            print(f"warning: {warning}")
        print(f"saved {self.paths['ckpt.pt']}")
        samples = sample_text(model, self.tokenizer, args, device, args.max_new_tokens, sys.stdout)
        row = next((row for row in self.log if row["step"] == best["step"]), {})
        tokens = (self.step - self.first_step) * args.batch_size * args.block_size * self.world
        metrics = dict(
            stage=STAGE, params=self.n_params, iters=self.step,
            interrupted=self.step < args.max_iters,
            best_step=best["step"], train_loss=row.get("train_loss"), val_loss=val_loss,
            val_bpc=val_loss / math.log(2), val_chars=scored, val_loss_estimate=best["val_loss"],
            warning=warning, tokens_per_sec=tokens / max(self.train_seconds, 1e-9),
            train_seconds=self.seconds_before + self.train_seconds,
            seconds=time.time() - self.started, device=device.type, hardware=hardware_name(device),
            peak_gpu_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else None,
            torch=torch.__version__, compile=args.compile, world_size=self.world, sample=samples[0],
            **self.config())
        atomic_write(self.paths["metrics.json"], json.dumps(metrics, indent=2).encode("utf-8"))
        return metrics


@torch.no_grad()
def full_loss(model, data, args, device):
    """The loss over every character of data after the first, each scored once, in float32:
    (nats, characters scored). The text is read in consecutive windows of block_size, so a
    character is predicted from the 0 to block_size - 1 characters before it in its window,
    block_size / 2 on average: as in training, where the windows fall at random."""
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

def sample_text(model, tokenizer, args, device, max_new_tokens, stream=None):
    """num_samples texts after the prompt, each also written to stream as it grows."""
    prompt = torch.tensor(encode_prompt(tokenizer, args), device=device)[None, :]   # (1, T)
    generator = torch.Generator(device=device).manual_seed(args.seed)   # same seed, same text

    def on_token(ids):                                      # each character as it comes
        stream.write(tokenizer.decode(ids[0].tolist()))
        stream.flush()

    texts = []
    for i in range(args.num_samples):
        if stream:
            stream.write(("\n" + "-" * 40 + "\n" if i else "") + args.prompt)
        idx = generate(model, prompt, max_new_tokens, args, device, generator,
                       on_token if stream else None)
        texts.append(tokenizer.decode(idx[0].tolist()))
    if stream:
        stream.write("\n")
        stream.flush()
    return texts


def saved_model(args, device):
    """The model of out_dir/ckpt.pt (the best of its run), and its tokenizer."""
    return restore_model(load_checkpoint(os.path.join(args.out_dir, "ckpt.pt")), args, device)


def sample(args, device):
    """--sample: text from the saved model."""
    model, tokenizer = saved_model(args, device)
    sample_text(model, tokenizer, args, device, args.max_new_tokens, sys.stdout)


def evaluate(args, device):
    """--evaluate PATH: the saved model's full loss over any UTF-8 text file."""
    model, tokenizer = saved_model(args, device)
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


if __name__ == "__main__":
    sys.exit(main())
