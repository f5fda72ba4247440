"""Stage 1 of 4: a bigram language model on characters.

The next character from the current one alone, looked up in a table: the baseline every later
stage must beat. Full validation loss on tiny Shakespeare: about 2.49 nats per character.

    python bigram.py               train, report the loss, sample (--sample: only sample; --help)

This file is its lesson, whole: its own tokenizer, batches, model and training loop, read from
the top. Each stage re-declares them and imports nothing from another, so that `diff` of two
consecutive stages shows what the later one adds. What makes a lesson a program you can rely on
(the command line, checkpoints in out/<stage>, resume, Ctrl-C, one-line errors) is harness.py,
written once for all four: with harness.py beside it, a stage runs alone. To take one
elsewhere, copy it with harness.py. The full validation loss scores every character of the
validation split once, at the end; the estimates during training are cheaper.
"""
import sys

# The few helpers the lesson calls, each explained where it is called. harness.py comes first,
# before PyTorch: then a Ctrl-C while PyTorch loads just ends the program.
from harness import TrainingRun, autocast, encode_corpus, read_text, run_command_line, to_device
import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

# Hyperparameters. Each is also an option of the same name, e.g. --max_iters 500
HYPERPARAMETERS = dict(
    batch_size=32,          # independent sequences trained on in parallel
    block_size=64,          # context length; a bigram reads only the last character, so here
                            # it sets only how many predictions each sequence gives (lecture: 8)
    max_iters=3000,         # training steps
    eval_interval=500,      # steps between loss estimates (the lecture's bigram: 300)
    eval_iters=100,         # batches averaged in each estimate (the lecture: 200)
    learning_rate=3e-2,     # a lookup table, no deep layers: a large step is safe (lecture: 1e-2)
)
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
# The model

class BigramLanguageModel(nn.Module):
    """Row i of a (vocab x vocab) table holds the logits of the character after character i."""

    def __init__(self, vocab_size):
        super().__init__()
        self.token_embedding_table = nn.Embedding(vocab_size, vocab_size)
        # Not the lecture's start, PyTorch's N(0, 1), whose first loss is about 4.7: small
        # weights are a near-uniform guess, so the first loss is about ln(vocab_size) = 4.17
        nn.init.normal_(self.token_embedding_table.weight, std=0.02)

    def forward(self, idx, targets=None):
        logits = self.token_embedding_table(idx)            # (B, T) -> (B, T, vocab_size)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())  # (B*T, vocab) vs (B*T,)
        return logits, loss


def make_model(vocab_size, args):
    """The model, from the hyperparameters."""
    return BigramLanguageModel(vocab_size)                  # a table needs only the vocabulary


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


@torch.no_grad()
def generate(model, idx, max_new_tokens, args, generator=None, on_token=None):
    """Extend idx, (B, T) token ids, by max_new_tokens tokens, each drawn from the model's odds
    for what follows the ones before it. on_token, if given, sees each new (B, 1) as it comes.
    (A function, where the lecture's is a method of the model: every stage's has its own.)"""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -args.block_size:])       # (B, T, vocab), T <= block_size
        next_id = sample_next(logits[:, -1, :], args, generator)  # (B, 1), from the last
        idx = torch.cat((idx, next_id), dim=1)              # (B, T+1)
        if on_token:
            on_token(next_id)
    return idx


# ---------------------------------------------------------------------------------------------
# Training

def train(args, device):
    """Train a model, estimating the loss every eval_interval steps; the best one is kept."""
    tokenizer, train_data, val_data = load_text(args.data)
    torch.manual_seed(args.seed)
    model = make_model(tokenizer.vocab_size, args).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    # What the lecture's loop did not do (harness.py): check the text, resume a stopped run,
    # save the best model and the state to resume from at each evaluation, watch for Ctrl-C
    run = TrainingRun(args, device, model, optimizer, tokenizer, train_data, val_data)
    for step in range(run.first_step, args.max_iters + 1):  # first_step: 0, unless resuming
        # an estimate every eval_interval steps, and after the last step (the lecture: before it)
        if step % args.eval_interval == 0 or step == args.max_iters:
            losses = estimate_loss(model, {"train": train_data, "val": val_data}, args, device)
            run.evaluated(step, losses)                     # print, log, save
        if step == args.max_iters or run.interrupted:       # interrupted: by a Ctrl-C
            break
        xb, yb = get_batch(train_data, args, device)
        with autocast(device, args.dtype):  # args.dtype: what "auto" became here; unless
            logits, loss = model(xb, yb)    # "float32", matrix products run in it
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.stepped(step + 1, loss)         # progress; a run whose loss is no longer a number stops
    return run.finish()                 # the best model's full loss and a sample; its metrics


def main(argv=None):
    """Read the command line, then train (calling train() above), or only sample from the saved
    model (--sample, calling generate()), or only score it on a text (--evaluate). harness.py
    does the rest: it reads this file's settings and names, and turns problems into one line."""
    return run_command_line(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
