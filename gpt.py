"""Stage 4 of 4: the full GPT.

multi_head_attn.py with the lecture's (a) feed-forward, (b) residual blocks, (c) layer norm and
(d) a bigger model with dropout, then (e) GPT-2's recipe, (f) a key/value cache and (g) batched
heads. About 1.45 on a GPU; on 2 CPU cores, LAPTOP below: 1.53 (bfloat16), 1.67 (float32).

    python gpt.py                  train, report the loss, sample (--sample: only sample; --help)

This file is its lesson, whole: its own tokenizer, batches, model and training loop, read from
the top. Each stage re-declares them and imports nothing from another, so that `diff` of two
consecutive stages shows what the later one adds. What makes a lesson a program you can rely on
(the command line, checkpoints in out/<stage>, resume, Ctrl-C, one-line errors) is harness.py,
written once for all four: with harness.py beside it, a stage runs alone. To take one
elsewhere, copy it with harness.py. The full validation loss scores every character of the
validation split once, at the end; the estimates during training are cheaper.
"""
import math
import sys

# The few helpers the lesson calls, each explained where it is called. harness.py comes first,
# before PyTorch: then a Ctrl-C while PyTorch loads just ends the program.
from harness import TrainingRun, autocast, encode_corpus, read_text, run_command_line, to_device
from harness import fused_attention, has_fused_adamw, one_vector_kernels, use_fused_attention
import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

# Hyperparameters. Each is also an option of the same name, e.g. --max_iters 500
# (d): the full configuration, the lecture's, made for a GPU: 10.8 M parameters
HYPERPARAMETERS = dict(
    batch_size=64,          # independent sequences trained on in parallel (lecture: 32, later 64)
    block_size=256,         # context length: 256 characters are a few lines of verse
    max_iters=2000,         # training steps; the best model is kept (the lecture: 5000)
    eval_interval=250,      # steps between loss estimates (the lecture: 500)
    eval_iters=50,          # batches averaged in each estimate (the lecture: 200)
    learning_rate=1e-3,     # the peak, after warmup (e); the lecture: 3e-4 throughout
    n_embd=384,             # NEW (stage 2): character and position vectors' width
    n_head=6,               # NEW (stage 3): heads of attention, each n_embd // n_head wide
    n_layer=6,              # NEW (b): transformer blocks, one after the other
    dropout=0.2,            # NEW (d): 10 M parameters memorise 1 M characters without it
    weight_decay=0.1,       # NEW (e): on the matrices only (stages 1-3: AdamW's 0.01, on all)
    warmup_iters=100,       # NEW (e): steps of linear warmup while Adam's statistics settle
    min_lr=1e-4,            # NEW (e): the learning rate that the cosine decay ends at
    grad_clip=1.0,          # NEW (e): gradient norms above this are scaled down to it
)
# No CUDA GPU (a step of the above: 10 s on 2 cores)? gpt.py picks LAPTOP where bfloat16 is fast
# (AVX-512 BF16, AMX), else LAPTOP_FLOAT32, and says so. No dropout: 0.8 M parameters don't overfit
LAPTOP = dict(batch_size=32, block_size=128, max_iters=2400, eval_interval=400, eval_iters=25,
              learning_rate=3e-3, n_embd=128, n_head=4, n_layer=4, dropout=0.0, min_lr=3e-4)
LAPTOP_FLOAT32 = dict(LAPTOP, batch_size=16, max_iters=1600, eval_interval=200,
                      learning_rate=4e-3, min_lr=4e-4)
PRESETS = {"laptop": LAPTOP, "laptop-float32": LAPTOP_FLOAT32}
# The other settings the lesson reads, options too, e.g. --seed 7
SETTINGS = dict(
    seed=1337,              # the same seed gives the same run and the same sample
    data="input.txt",       # the text to train on (tiny Shakespeare, downloaded if missing)
    dtype="auto",           # bfloat16 where the hardware computes it fast, else float32; on a
                            # V100, T4 or RTX 20, float16 if the loop has a gradient scaler (gpt.py)
    temperature=1.0,        # sampling: 0 is greedy; below 1 more cautious, above 1 wilder
    top_k=0,                # sampling: only among the k likeliest characters (0: all)
    top_p=1.0,              # sampling: only among the likeliest that together make up top_p
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
    text = read_text(path)              # the file as a str, checked to be UTF-8 (harness.py)
    tokenizer = CharTokenizer("".join(sorted(set(text))))
    # tokenizer.encode(text), made fast for large texts (harness.py): a numpy array of token
    # ids, one byte each while there are at most 256 distinct characters
    data = encode_corpus(tokenizer, text)
    n = int(0.9 * len(data))
    return tokenizer, data[:n], data[n:]


# ---------------------------------------------------------------------------------------------
# Batches and the loss estimate

def get_batch(data, args, device, generator=None):
    """batch_size random windows of the text: x is block_size characters, y the same window
    moved one character on, so y[b, t] is the character that follows x[b, :t+1]. (numpy takes
    all the windows at once, where the lecture stacks them one by one: the same batch.)"""
    starts = torch.randint(len(data) - args.block_size, (args.batch_size,), generator=generator)
    window = starts.numpy()[:, None] + np.arange(args.block_size + 1)  # (B, T+1) positions
    chunk = torch.from_numpy(data[window].astype(np.int64))  # copies the batch, not the text
    x, y = chunk[:, :-1], chunk[:, 1:]                      # (B, T) each
    return to_device(x, device), to_device(y, device)       # x.to(device) (harness.py)


@torch.no_grad()
def estimate_loss(model, splits, args, device):
    """Mean loss over eval_iters batches of each split: cheap, and a little noisy. The batches
    come from a generator of their own, the same ones at every evaluation (the lecture draws new
    ones): the estimates compare models on the same text, and the run's random numbers are left
    alone, which keeps a resumed run exact."""
    generator = torch.Generator().manual_seed(args.seed)
    model.eval()                                            # evaluation mode: no dropout
    out = {}
    for split, data in splits.items():
        losses = torch.zeros(args.eval_iters, device=device)  # no wait for each batch
        for k in range(args.eval_iters):
            x, y = get_batch(data, args, device, generator)
            with autocast(device, args.dtype):              # see train()
                _, loss = model(x, y)
            losses[k] = loss
        out[split] = losses.mean().item()
    model.train()
    return out


# ---------------------------------------------------------------------------------------------
# The model: stage 3's attention, with dropout (d), kept to read (what runs is (g)); then (a)-(d)

class Head(nn.Module):
    """NEW (stage 2): one head of causal self-attention. Each position asks a question (a query);
    those so far hold up labels (keys); it takes their values, weighted by how well they match."""

    def __init__(self, n_embd, head_size, block_size, dropout):
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)  # what a position offers
        self.query = nn.Linear(n_embd, head_size, bias=False)  # what a position looks for
        self.value = nn.Linear(n_embd, head_size, bias=False)  # what it passes on
        # ones on and below the diagonal: position t sees 0..t, never the future (a buffer: saved)
        self.register_buffer("tril", torch.tril(torch.ones(block_size, block_size)))
        self.dropout = nn.Dropout(dropout)                  # NEW (d)

    def attention_weights(self, x):
        """(B, T, C) -> (B, T, T): row t is how much position t takes from each position."""
        T = x.shape[1]
        q, k = self.query(x), self.key(x)                   # (B, T, hs) each
        # dot product = how well query t matches key s; dividing by sqrt(hs) keeps the
        # scores' variance near 1, so that softmax starts soft instead of peaked
        scores = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5  # (B, T, hs) @ (B, hs, T)
        scores = scores.masked_fill(self.tril[:T, :T] == 0, float("-inf"))  # no future
        return F.softmax(scores, dim=-1)                    # (B, T, T), rows sum to 1

    def forward(self, x):
        weights = self.dropout(self.attention_weights(x))   # (B, T, T); NEW (d): dropout
        return weights @ self.value(x)                      # (B, T, T) @ (B, T, hs)


class MultiHeadAttention(nn.Module):
    """NEW (stage 3): n_head heads side by side, each n_embd // n_head wide, each free to follow
    something else (the last vowel, the start of the word, the speaker). A projection mixes what
    they found (the lecture brings it in with the residual blocks, gpt.py's (b))."""

    def __init__(self, n_embd, n_head, block_size, dropout):
        super().__init__()
        head_size = n_embd // n_head
        self.heads = nn.ModuleList([Head(n_embd, head_size, block_size, dropout)  # NEW (d)
                                    for _ in range(n_head)])
        self.proj = nn.Linear(n_embd, n_embd)               # mixes what the heads found
        self.dropout = nn.Dropout(dropout)                  # NEW (d)

    def forward(self, x):
        out = torch.cat([head(x) for head in self.heads], dim=-1)  # nh x (B, T, hs) -> (B, T, C)
        return self.dropout(self.proj(out))                 # (B, T, C); NEW (d): dropout


# (a) feed-forward ----------------------------------------------------------------------------
class FeedForward(nn.Module):
    """NEW (a): after the positions have talked (attention), each thinks on its own: two layers,
    4 times wider inside. The lecture's is one layer at first, two like these from (b) on."""

    def __init__(self, n_embd, dropout):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU()                               # GPT-2's smooth ReLU; the lecture: ReLU
        self.proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)                  # NEW (d)

    def forward(self, x):
        return self.dropout(self.proj(self.gelu(self.fc(x))))  # (B, T, C) -> (B, T, 4C) -> same


# (b) blocks with residual connections, (c) layer norm ----------------------------------------
class Block(nn.Module):
    """NEW (b): communication (attention), then computation (feed-forward), each added to a
    residual stream, x + f(x), that carries the input through, so that gradients reach the first
    block however deep the stack. NEW (c): each reads a layer-normalised copy: GPT-2's pre-norm."""

    def __init__(self, n_embd, n_head, block_size, dropout):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)                     # NEW (c)
        # what runs: (g), below: MultiHeadAttention's computation with its heads batched, faster
        self.attention = CausalSelfAttention(n_embd, n_head, block_size, dropout)
        self.ln2 = nn.LayerNorm(n_embd)                     # NEW (c)
        self.feed_forward = FeedForward(n_embd, dropout)

    def forward(self, x, cache=None):
        x = x + self.attention(self.ln1(x), cache)          # (B, T, C); the cache: (f)
        x = x + self.feed_forward(self.ln2(x))              # (B, T, C)
        return x


# (d) the whole model, scaled up at the top, with dropout in every part ----------------------
class GPT(nn.Module):
    """Embed characters and positions, n_layer blocks, a final layer norm, read out logits."""

    def __init__(self, vocab_size, n_embd, n_head, block_size, n_layer, dropout):
        super().__init__()
        self.token_embedding_table = nn.Embedding(vocab_size, n_embd)  # which character
        self.position_embedding_table = nn.Embedding(block_size, n_embd)  # where it stands
        self.dropout = nn.Dropout(dropout)                  # NEW (d): as nanoGPT, not the lecture
        self.blocks = nn.ModuleList([Block(n_embd, n_head, block_size, dropout)  # NEW (b); a list,
                                     for _ in range(n_layer)])  # not nn.Sequential: caches (f)
        self.ln_f = nn.LayerNorm(n_embd)                    # NEW (c): one more, at the end
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)  # NEW (e), as GPT-2: no bias, and
        self.lm_head.weight = self.token_embedding_table.weight  # reading in and out: one matrix
        # NEW (e): GPT-2's start: N(0, 0.02) weights, zero biases (the lecture's gpt.py added these
        # after the video), and for the layers that write into the stream (proj) 1/sqrt(2 n_layer)
        # of that, so that what all the blocks add to it stays the same size however many
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets=None, caches=None):
        T = idx.shape[1]
        past = caches[0]["k"].shape[2] if caches and caches[0] else 0  # NEW (f): positions cached
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


# NEW (e): GPT-2's and GPT-3's training recipe, as nanoGPT has it (init and tying: above) -----
def make_optimizer(model, args, device):
    """AdamW with weight decay (GPT-3's 0.1) on the matrices, both embeddings too, but not on the
    biases and layer norms, as in nanoGPT, whose shakespeare_char takes beta2 0.99 (GPT-3: 0.95)."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": args.weight_decay},
              {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.99),
                             fused=has_fused_adamw(device))  # one kernel for all: speed only


def get_lr(step, args):
    """Warmup, then a cosine decay to min_lr at args.planned_iters: the run's max_iters as it
    began, which a resumed run keeps, so that more steps run at min_lr (harness.py). The lecture
    keeps 3e-4 (1.48 after 5000 steps); nanoGPT's schedule peaks 3x higher (here 1.45 in 2000)."""
    if step < args.warmup_iters:
        return args.learning_rate * (step + 1) / args.warmup_iters
    progress = min(1.0, (step - args.warmup_iters) / max(1, args.planned_iters - args.warmup_iters))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))     # from 1 down to 0
    return args.min_lr + cosine * (args.learning_rate - args.min_lr)


# ---------------------------------------------------------------------------------------------
# Generation

def sample_next(logits, args, generator):
    """Draw the next token from the last position's logits: (B, vocab) -> (B, 1). The lecture
    draws from the softmax as it is, and so do the defaults; the sampling controls are here from
    the first stage on, to let you try a sample more cautious or wilder with any model."""
    if args.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)          # greedy: always the likeliest
    # dividing by the temperature: below 1 sharpens the odds, above 1 flattens them. A
    # temperature too small to divide by in float32 is as good as greedy.
    logits = logits.float()
    temperature = max(args.temperature, torch.finfo(torch.float32).tiny)
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if args.top_k:                                          # only the k likeliest
        kth = torch.topk(logits, min(args.top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if args.top_p < 1.0:                                    # the likeliest that make up top_p
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= args.top_p  # the likelier ones already do
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)


# (f) sampling with a key/value cache ---------------------------------------------------------
@torch.no_grad()
def generate(model, idx, max_new_tokens, args, generator=None, on_token=None, use_cache=True):
    """Extend idx, (B, T) token ids, by max_new_tokens tokens, each drawn from the model's odds
    for what follows the ones before it. on_token, if given, sees each new (B, 1) as it comes.
    (A function, where the lecture's is a method of the model: every stage's has its own.)

    NEW (f): with the cache each block keeps the keys and values of the earlier positions, which
    come out the same each time, and a step computes the newest position's alone. The window
    does not slide as in stages 1 to 3 (it would move every cached position): when full, it jumps
    to its last half and the cache fills again. use_cache=False computes the same, slowly."""
    start, caches = max(0, idx.shape[1] - args.block_size), None  # the context: idx[:, start:]
    for _ in range(max_new_tokens):
        if idx.shape[1] - start > args.block_size:          # full: keep the last half
            start, caches = idx.shape[1] - max(1, args.block_size // 2), None
        if not use_cache:
            logits, _ = model(idx[:, start:])               # the whole context, again
        elif caches is None:
            caches = [{} for _ in model.blocks]
            logits, _ = model(idx[:, start:], caches=caches)  # fill the caches
        else:
            with one_vector_kernels(idx.device, args.dtype):  # speed only: PyTorch's own
                logits, _ = model(idx[:, -1:], caches=caches)  # kernel; the newest position only
        next_id = sample_next(logits[:, -1, :], args, generator)  # (B, 1), from the last
        idx = torch.cat((idx, next_id), dim=1)              # (B, T+1)
        if on_token:
            on_token(next_id)
    return idx


# (g) the heads batched into one tensor: what the model runs ----------------------------------
class CausalSelfAttention(nn.Module):
    """NEW (g): MultiHeadAttention, faster: the heads a dimension (nh) of one product, not a list
    (a test checks both compute the same). It keeps (f)'s cache, and calls a fused kernel."""

    def __init__(self, n_embd, n_head, block_size, dropout):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)  # every head's query, key, value
        self.proj = nn.Linear(n_embd, n_embd)               # mixes what the heads found
        self.attn_dropout, self.resid_dropout = nn.Dropout(dropout), nn.Dropout(dropout)
        # True where a query may not look: Head's tril, the other way round (and not saved)
        future = torch.ones(block_size, block_size, dtype=torch.bool).triu(diagonal=1)
        self.register_buffer("future", future, persistent=False)

    def forward(self, x, cache=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)               # (B, T, C) each
        # the width split into heads: (B, T, C) -> (B, T, nh, hs) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:                               # (f): keep every key and value
            if "k" in cache:                                # earlier positions: from the cache
                k, v = torch.cat((cache["k"], k), dim=2), torch.cat((cache["v"], v), dim=2)
            cache["k"], cache["v"] = k, v                   # (B, nh, past + T, hs)
        past = k.shape[2] - T                               # positions before these T
        future = self.future[past:past + T, :past + T]      # (T, past + T)
        if use_fused_attention(q):          # the same y, by F.scaled_dot_product_attention's kernel
            y = fused_attention(q, k, v, future, self.attn_dropout.p if self.training else 0.0)
        else:
            y = self.attn_dropout(self.attention_weights(q, k, future)) @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)              # heads side by side: (B, T, C)
        return self.resid_dropout(self.proj(y))

    def attention_weights(self, q, k, future):
        """Head.attention_weights for every head at once: (B, nh, T, past + T), rows sum to 1."""
        scores = (q * k.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # q scaled: fewer numbers
        return F.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


# ---------------------------------------------------------------------------------------------
# Training

def train(args, device):
    """Train a model, estimating the loss every eval_interval steps; the best one is kept."""
    tokenizer, train_data, val_data = load_text(args.data)
    torch.manual_seed(args.seed)
    model = make_model(tokenizer.vocab_size, args).to(device)
    optimizer = make_optimizer(model, args, device)         # NEW (e)
    # What the lecture's loop did not do (harness.py): check the text, resume a stopped run,
    # save the best model and the state to resume from at each evaluation, watch for Ctrl-C
    run = TrainingRun(args, device, model, optimizer, tokenizer, train_data, val_data)
    training_model = run.for_training(model)  # under torchrun: wrapped to average the gradients
    for step in range(run.first_step, args.max_iters + 1):  # first_step: 0, unless resuming
        # an estimate every eval_interval steps, and after the last step (the lecture: before it)
        if step % args.eval_interval == 0 or step == args.max_iters:
            losses = estimate_loss(model, {"train": train_data, "val": val_data}, args, device)
            run.evaluated(step, losses)                     # print, log, save
        if step == args.max_iters or run.interrupted:       # interrupted: by a Ctrl-C
            break
        for group in optimizer.param_groups:                # NEW (e): warmup, then decay
            group["lr"] = get_lr(step, args)
        xb, yb = get_batch(train_data, args, device)
        with autocast(device, args.dtype):  # args.dtype: what "auto" became here; unless
            logits, loss = training_model(xb, yb)  # "float32", matrix products run in it
        optimizer.zero_grad(set_to_none=True)
        # NEW, not in the lecture: run.scaler, PyTorch's GradScaler (harness.py), is on in float16
        # only: small gradients would round to 0 there, so the loss is scaled up before backward()
        # and the gradients down before the step. Off, these are loss.backward(), optimizer.step()
        run.scaler.scale(loss).backward()
        if args.grad_clip > 0:                              # NEW (e): a rare huge gradient
            run.scaler.unscale_(optimizer)                  # (float16: first unscaled, in place)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)  # is scaled down
        run.scaler.step(optimizer)                          # float16: no step if any is inf or NaN
        run.scaler.update()                                 # float16: after a skip, half the scale
        run.stepped(step + 1, loss)         # progress; a run whose loss is no longer a number stops
    return run.finish()                 # the best model's full loss and a sample; its metrics


def main(argv=None):
    """Read the command line, then train (calling train() above), or only sample from the saved
    model (--sample, calling generate()), or only score it on a text (--evaluate). harness.py
    does the rest: it reads this file's settings and names, and turns problems into one line."""
    return run_command_line(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
