"""Each stage's own lesson: its tokenizer, batches, model and generation. The machinery,
harness.py, is tested in test_harness.py, test_faults.py and test_bad_input.py."""
import argparse
import math

import numpy as np
import pytest
import torch

import harness
from conftest import load_stage, name, tiny_args


def tiny_model(stage, seed=0, **overrides):
    args = tiny_args(stage)
    for key, value in overrides.items():
        setattr(args, key, value)
    torch.manual_seed(seed)
    return stage.make_model(20, args).eval(), args


def test_encode_decode_round_trip_and_the_fast_path_agrees(stage):
    text = "Hello, wörld! ünïcode ✓\n"
    tokenizer = stage.CharTokenizer("".join(sorted(set(text))))
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and tokenizer.chars == "".join(sorted(set(text)))
    assert tokenizer.stoi["H"] == ids[0] and tokenizer.chars[ids[0]] == "H"
    fast = harness.encode_corpus(tokenizer, text)
    assert fast.tolist() == ids and fast.dtype == np.uint8        # the smallest type that holds them


def test_load_text_splits_the_text_nine_to_one(stage, corpus):
    tokenizer, train_data, val_data = stage.load_text(str(corpus))
    text = corpus.read_text(encoding="utf-8")
    assert len(train_data) == int(0.9 * len(text)) and len(train_data) + len(val_data) == len(text)
    assert tokenizer.decode(np.concatenate([train_data, val_data]).tolist()) == text


def test_targets_are_inputs_shifted_by_one(stage):
    data = np.arange(100, dtype=np.uint8)                          # the text 0, 1, 2, ...: easy to check
    x, y = stage.get_batch(data, argparse.Namespace(batch_size=8, block_size=10), torch.device("cpu"))
    assert x.shape == y.shape == (8, 10) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert int(y.max()) <= 99


def test_initial_loss_is_near_ln_vocab(stage):
    model, args = tiny_model(stage)
    _, loss = model(torch.randint(65, (8, args.block_size)) % 20, torch.randint(20, (8, args.block_size)))
    assert abs(loss.item() - math.log(20)) < 0.3


def test_logits_have_one_row_per_position(stage):
    model, args = tiny_model(stage)
    logits, loss = model(torch.randint(20, (3, args.block_size)))
    assert logits.shape == (3, args.block_size, 20) and loss is None


def test_one_batch_is_learned_by_heart(stage):
    """The model can fit what it sees: on one batch, its loss falls far. A bigram can only learn
    a next character that follows from the current one; attention can learn any, by position."""
    model, args = tiny_model(stage)
    model.train()
    torch.manual_seed(1)
    x = torch.randint(20, (4, args.block_size))
    y = (7 * x + 3) % 20 if name(stage) == "bigram" else torch.randint(20, x.shape)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    losses = []
    for _ in range(150):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


def test_the_estimate_draws_the_same_batches_each_time_and_leaves_the_run_s_random_numbers(stage, corpus):
    tokenizer, train_data, val_data = stage.load_text(str(corpus))
    args = tiny_args(stage)
    model = stage.make_model(tokenizer.vocab_size, args)
    state = torch.get_rng_state()
    first = stage.estimate_loss(model, {"train": train_data, "val": val_data}, args, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)
    assert stage.estimate_loss(model, {"train": train_data, "val": val_data}, args, torch.device("cpu")) == first
    assert model.training                                          # put back in training mode


def test_generate_extends_the_prompt_past_the_context_length(stage):
    model, args = tiny_model(stage)
    idx = torch.zeros((1, 1), dtype=torch.long)
    seen = []
    out = stage.generate(model, idx, 3 * args.block_size, args, torch.Generator().manual_seed(0),
                         on_token=seen.append)
    assert out.shape == (1, 1 + 3 * args.block_size) and all(t.shape == (1, 1) for t in seen)
    assert torch.equal(torch.cat(seen, dim=1), out[:, 1:]) and out[0, 0] == 0
    again = stage.generate(model, idx, 3 * args.block_size, args, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)                                 # the same generator, the same text


def test_same_seed_same_run_other_seed_other_run(stage, corpus, run, tmp_path):
    results = []
    for seed, folder in ((1, "a"), (1, "b"), (2, "c")):
        code, out, err = run(stage, "--data", corpus, "--seed", seed, out_dir=tmp_path / folder)
        assert code == 0, err
        metrics = run.metrics(stage, tmp_path / folder)
        results.append(((tmp_path / folder / "log.csv").read_text().splitlines(), metrics["sample"]))
    strip_times = [([line.rsplit(",", 1)[0] for line in log], sample) for log, sample in results]
    assert strip_times[0] == strip_times[1]
    assert strip_times[0][0] != strip_times[2][0] and strip_times[0][1] != strip_times[2][1]


# ---- sampling: the same in every stage (tests/test_scaffolding.py checks it) ----

def test_top_k_and_top_p_keep_the_smallest_likely_set(bigram):
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    nucleus = argparse.Namespace(temperature=1.0, top_k=0, top_p=0.7)
    assert {bigram.sample_next(logits, nucleus, generator).item() for _ in range(200)} == {0, 1}
    two = argparse.Namespace(temperature=1.0, top_k=2, top_p=1.0)
    assert {bigram.sample_next(logits, two, generator).item() for _ in range(200)} == {0, 1}
    halves = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))           # the first alone makes up 0.5
    exactly = argparse.Namespace(temperature=1.0, top_k=0, top_p=0.5)
    assert {bigram.sample_next(halves, exactly, generator).item() for _ in range(50)} == {0}
    plain = argparse.Namespace(temperature=1.0, top_k=0, top_p=1.0)   # the defaults: every character
    assert {bigram.sample_next(logits, plain, generator).item() for _ in range(400)} == {0, 1, 2, 3}


def test_a_temperature_too_small_for_float32_is_greedy(bigram):
    """CUDA flushes float32 numbers below 1.2e-38 to zero, so that dividing by such a temperature
    gave 0/0 = nan and a device-side assertion; flushing denormals on the CPU shows the same."""
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    before = torch.set_flush_denormal(True)
    try:
        picks = [bigram.sample_next(logits, argparse.Namespace(temperature=t, top_k=0, top_p=1.0), None)
                 for t in (1e-45, 1e-39)]
    finally:
        torch.set_flush_denormal(False)
    assert before and [p.item() for p in picks] == [1, 1]


# ---- attention: stages 2 to 4 ----

def test_changing_the_future_changes_no_past_logit(attention_stage):
    model, args = tiny_model(attention_stage)
    x = torch.randint(20, (3, args.block_size))
    for t in (0, 5, args.block_size - 2):
        changed = x.clone()
        changed[:, t + 1:] = torch.randint(20, changed[:, t + 1:].shape)
        before, _ = model(x)
        after, _ = model(changed)
        assert torch.allclose(before[:, :t + 1], after[:, :t + 1], atol=1e-6)
        assert not torch.allclose(before[:, t + 1:], after[:, t + 1:])


def test_attention_weights_are_causal_and_sum_to_one(attention_stage):
    torch.manual_seed(0)
    extra = {"dropout": 0.0} if name(attention_stage) == "gpt" else {}
    head = attention_stage.Head(n_embd=16, head_size=8, block_size=12, **extra)
    x = torch.randn(2, 10, 16)
    weights = head.attention_weights(x)
    assert weights.shape == (2, 10, 10)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 10))
    assert torch.all(weights.triu(diagonal=1) == 0)
    assert torch.all(weights[:, torch.ones(10, 10).tril() == 1] > 0)         # the past is all seen
    assert head(x).shape == (2, 10, 8)                             # (B, T, hs)


@pytest.mark.parametrize("stage_name", ["multi_head_attn", "gpt"])
def test_multi_head_layer_shape_and_one_head_equals_a_head(stage_name):
    stage = load_stage(stage_name)
    extra = {"dropout": 0.0} if stage_name == "gpt" else {}
    torch.manual_seed(0)
    layer = stage.MultiHeadAttention(n_embd=16, n_head=4, block_size=12, **extra)
    x = torch.randn(2, 10, 16)
    assert layer(x).shape == (2, 10, 16)
    # the heads are independent: head i's output is exactly columns i*4..i*4+3 before the projection
    joined = torch.cat([head(x) for head in layer.heads], dim=-1)
    assert torch.allclose(layer(x), layer.proj(joined))
    one = stage.MultiHeadAttention(n_embd=16, n_head=1, block_size=12, **extra)
    single = stage.Head(16, 16, 12, **extra)
    single.load_state_dict(one.heads[0].state_dict())
    assert torch.allclose(one(x), one.proj(single(x)), atol=1e-6)


# ---- gpt.py's own parts ----

def batched_from_heads(gpt, layer):
    """(g)'s CausalSelfAttention with the weights of a MultiHeadAttention, heads side by side."""
    n_head, C = len(layer.heads), layer.proj.in_features
    batched = gpt.CausalSelfAttention(C, n_head, layer.heads[0].tril.shape[0], dropout=0.0).eval()
    rows = [torch.cat([getattr(head, part).weight for head in layer.heads]) for part in ("query", "key", "value")]
    batched.qkv.weight.data = torch.cat(rows)                      # (3C, C): q, k, v of every head
    batched.proj.load_state_dict(layer.proj.state_dict())
    return batched


def test_the_batched_heads_compute_what_multi_head_attention_computes(gpt, monkeypatch):
    torch.manual_seed(0)
    layer = gpt.MultiHeadAttention(n_embd=16, n_head=4, block_size=12, dropout=0.0).eval()
    batched, x = batched_from_heads(gpt, layer), torch.randn(2, 10, 16)
    for fused in (True, False):                                    # the fused kernel and the written-out one
        monkeypatch.setattr(gpt, "use_fused_attention", lambda q: fused)
        assert torch.allclose(batched(x), layer(x), atol=1e-6), fused
    weights = batched.attention_weights(*[t.view(2, 10, 4, 4).transpose(1, 2) for t in
                                          batched.qkv(x).split(16, dim=2)[:2]], batched.future[:10, :10])
    assert torch.allclose(weights, torch.stack([head.attention_weights(x) for head in layer.heads], 1), atol=1e-6)


def test_block_keeps_the_shape_and_its_residual_path(gpt):
    torch.manual_seed(0)
    block = gpt.Block(n_embd=16, n_head=2, block_size=12, dropout=0.0)
    x = torch.randn(2, 10, 16)
    assert block(x).shape == x.shape
    for layer in (block.attention.proj, block.feed_forward.proj):  # sub-layers that write nothing
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    assert torch.equal(block(x), x)                                # leave the stream as it was


def test_full_configuration_parameter_count_and_weight_tying(gpt):
    args = harness.parse_args(gpt, ["--preset", "full", "--sample"])
    harness.configure(gpt, args, torch.device("cpu"))
    assert (args.n_layer, args.n_head, args.n_embd, args.block_size, args.batch_size, args.dropout) == \
        (6, 6, 384, 256, 64, 0.2)
    model = gpt.make_model(65, args)
    assert model.lm_head.weight is model.token_embedding_table.weight
    n_params = sum(p.numel() for p in model.parameters())
    # per block: qkv 3C^2, proj C^2 + C, feed-forward 8C^2 + 5C, two layer norms 4C
    per_block = 12 * 384 * 384 + 10 * 384
    assert n_params == 65 * 384 + 256 * 384 + 6 * per_block + 2 * 384 == 10_763_904


def test_learning_rate_schedule(gpt):
    args = argparse.Namespace(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, planned_iters=1100)
    assert gpt.get_lr(0, args) == pytest.approx(1e-5)              # warmup starts small
    assert gpt.get_lr(49, args) == pytest.approx(5e-4)
    assert gpt.get_lr(99, args) == pytest.approx(1e-3)             # the peak
    assert gpt.get_lr(600, args) == pytest.approx(5.5e-4)          # half way down the cosine
    assert gpt.get_lr(1100, args) == pytest.approx(1e-4)           # the floor
    assert gpt.get_lr(5000, args) == pytest.approx(1e-4)


def test_weight_decay_only_on_matrices(gpt):
    model, args = tiny_model(gpt)
    optimizer = gpt.make_optimizer(model, args, torch.device("cpu"))
    decayed, plain = optimizer.param_groups
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert decayed["weight_decay"] == args.weight_decay and plain["weight_decay"] == 0


@pytest.mark.parametrize("temperature, top_k", [(0.0, 0), (1.0, 0), (0.8, 5)])
def test_key_value_cache_gives_the_same_tokens(gpt, temperature, top_k):
    model, args = tiny_model(gpt, temperature=temperature, top_k=top_k, top_p=0.9)
    prompt = torch.randint(20, (2, 5))
    runs = []
    for use_cache in (True, False):
        generator = torch.Generator().manual_seed(3)
        runs.append(gpt.generate(model, prompt, 3 * args.block_size, args, generator, use_cache=use_cache))
    assert runs[0].shape == (2, 5 + 3 * args.block_size)
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("dtype, kernel, off", [("bfloat16", True, True), ("float32", True, False),
                                                 ("bfloat16", False, False)])
def test_onednn_is_off_for_cached_bfloat16_steps_only(gpt, dtype, kernel, off, monkeypatch):
    model, args = tiny_model(gpt, dtype=dtype, temperature=0.0)
    monkeypatch.setattr(harness, "HAS_ONE_VECTOR_KERNEL", kernel)  # False: PyTorch before 2.6
    seen = []                                                      # (positions in the call, oneDNN on)
    model.register_forward_hook(lambda module, inputs, output: seen.append(
        (inputs[0].shape[1], torch.backends.mkldnn.enabled)))
    outside = []
    gpt.generate(model, torch.zeros((1, 3), dtype=torch.long), 2 * args.block_size, args, None,
                 on_token=lambda ids: outside.append(torch.backends.mkldnn.enabled))
    assert all(outside) and torch.backends.mkldnn.enabled         # the caller never sees it off
    assert {on for positions, on in seen if positions > 1} == {True}   # filling the cache: big products
    assert {on for positions, on in seen if positions == 1} == {not off}


def test_a_cached_bfloat16_step_computes_the_same_logits(gpt):
    model, args = tiny_model(gpt)
    x = torch.randint(20, (2, args.block_size))
    caches = [{} for _ in model.blocks]
    with torch.no_grad(), harness.autocast(torch.device("cpu"), "bfloat16"):
        whole, _ = model(x)                                        # every position at once, oneDNN on
        model(x[:, :-1], caches=caches)
        with harness.one_vector_kernels(torch.device("cpu"), "bfloat16"):
            step, _ = model(x[:, -1:], caches=caches)              # the last position alone
    assert torch.allclose(step[:, 0].float(), whole[:, -1].float(), atol=0.05)
    assert not torch.allclose(step[:, 0].float(), whole[:, -2].float(), atol=0.05)


def test_a_cached_step_of_several_positions_sees_the_right_past(gpt, monkeypatch):
    """Cached positions come before the new ones: the causal mask must be shifted by them. The
    fused kernel's is_causal would align it top-left instead; the written-out one would not fit."""
    model, args = tiny_model(gpt)
    x = torch.randint(20, (2, args.block_size))
    for fused in (True, False):
        monkeypatch.setattr(gpt, "use_fused_attention", lambda q: fused)
        with torch.no_grad():
            whole, _ = model(x)
            caches = [{} for _ in model.blocks]
            model(x[:, :5], caches=caches)
            part, _ = model(x[:, 5:9], caches=caches)              # four new positions, five cached
        assert torch.allclose(part, whole[:, 5:9], atol=1e-5), fused


def test_the_fused_kernel_is_used_but_for_bfloat16_training_on_a_cpu():
    q = torch.zeros(1, 1, 2, 2)
    assert harness.use_fused_attention(q)                          # float32: fused
    assert not harness.use_fused_attention(q.bfloat16())           # bfloat16 training: written out
    with torch.no_grad():
        assert harness.use_fused_attention(q.bfloat16())           # sampling: fused
    harness.WATCHING.append(True)                                  # attention weights recorded: never
    try:
        assert not harness.use_fused_attention(q)
    finally:
        harness.WATCHING.pop()
