"""What the attention stages add: causality, attention weights, heads, and gpt.py's parts."""
import argparse
import math
import sys

import numpy as np
import pytest
import torch

from conftest import ctrl_c_during_step, load_stage, tiny_args


def tiny_model(stage, seed=0, **overrides):
    args = tiny_args(stage)
    for name, value in overrides.items():
        setattr(args, name, value)
    torch.manual_seed(seed)
    return stage.make_model(20, args).eval(), args


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


@pytest.mark.parametrize("name", ["single_attention", "multi_head_attn"])
def test_attention_weights_are_causal_and_sum_to_one(name):
    stage = load_stage(name)
    torch.manual_seed(0)
    head = stage.Head(n_embd=16, head_size=8, block_size=12)
    x = torch.randn(2, 10, 16)
    weights = head.attention_weights(x)
    assert weights.shape == (2, 10, 10)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 10))
    assert torch.all(weights.triu(diagonal=1) == 0)
    assert torch.all(weights[:, torch.ones(10, 10).tril() == 1] > 0)         # the past is all seen
    assert head(x).shape == (2, 10, 8)                             # (B, T, hs)


def test_multi_head_layer_shape_and_one_head_equals_a_head():
    stage = load_stage("multi_head_attn")
    torch.manual_seed(0)
    layer = stage.MultiHeadAttention(n_embd=16, n_head=4, block_size=12)
    x = torch.randn(2, 10, 16)
    assert layer(x).shape == (2, 10, 16)
    # the heads are independent: head i's output is exactly columns i*4..i*4+3 before the projection
    joined = torch.cat([head(x) for head in layer.heads], dim=-1)
    assert torch.allclose(layer(x), layer.proj(joined))
    one = stage.MultiHeadAttention(n_embd=16, n_head=1, block_size=12)
    single = load_stage("single_attention").Head(16, 16, 12)
    single.load_state_dict(one.heads[0].state_dict())
    assert torch.allclose(one(x), one.proj(single(x)), atol=1e-6)


def test_generating_past_the_context_length(attention_stage):
    model, args = tiny_model(attention_stage, temperature=1.0, top_k=None, top_p=1.0)
    idx = torch.zeros((1, 1), dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    seen = []
    out = attention_stage.generate(model, idx, 3 * args.block_size, args, torch.device("cpu"), generator,
                                   on_token=seen.append)
    assert out.shape == (1, 1 + 3 * args.block_size) and all(t.shape == (1, 1) for t in seen)
    assert torch.equal(torch.cat(seen, dim=1), out[:, 1:])


# ---- gpt.py ----

gpt = load_stage("gpt")


def test_fused_attention_equals_the_explicit_one(monkeypatch):
    torch.manual_seed(0)
    layer = gpt.CausalSelfAttention(n_embd=16, n_head=4, block_size=12, dropout=0.0).eval()
    x = torch.randn(2, 10, 16)
    monkeypatch.setattr(gpt, "use_fused_attention", lambda x: True)
    fused = layer(x)
    monkeypatch.setattr(gpt, "use_fused_attention", lambda x: False)
    assert torch.allclose(fused, layer(x), atol=1e-6)
    # and it is multi_head_attn.py's layer, with its weights laid out side by side
    mha = load_stage("multi_head_attn").MultiHeadAttention(16, 4, 12)
    q, k, v = layer.qkv.weight.split(16, dim=0)                    # (C, C) each, rows = heads side by side
    for i, head in enumerate(mha.heads):
        rows = slice(4 * i, 4 * i + 4)
        head.query.weight.data, head.key.weight.data, head.value.weight.data = q[rows], k[rows], v[rows]
    mha.proj.load_state_dict(layer.proj.state_dict())
    assert torch.allclose(fused, mha(x), atol=1e-6)


def test_block_keeps_the_shape_and_its_residual_path():
    torch.manual_seed(0)
    block = gpt.Block(n_embd=16, n_head=2, block_size=12, dropout=0.0)
    x = torch.randn(2, 10, 16)
    assert block(x).shape == x.shape
    for layer in (block.attention.proj, block.feed_forward.proj):  # sub-layers that write nothing
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    assert torch.equal(block(x), x)                                # leave the stream as it was


def test_full_configuration_parameter_count_and_weight_tying():
    args = gpt.parse_args(["--preset", "full", "--sample"])
    gpt.configure(args, torch.device("cpu"))
    assert (args.n_layer, args.n_head, args.n_embd, args.block_size, args.batch_size, args.dropout) == \
        (6, 6, 384, 256, 64, 0.2)
    model = gpt.make_model(65, args)
    assert model.lm_head.weight is model.token_embedding_table.weight
    n_params = sum(p.numel() for p in model.parameters())
    # per block: qkv 3C^2, proj C^2 + C, feed-forward 8C^2 + 5C, two layer norms 4C
    per_block = 12 * 384 * 384 + 10 * 384
    assert n_params == 65 * 384 + 256 * 384 + 6 * per_block + 2 * 384 == 10_763_904


@pytest.mark.parametrize("bf16, dtype, preset", [(True, None, "laptop"), (False, None, "laptop-float32"),
                                                 (True, "float32", "laptop-float32")])
def test_without_a_gpu_the_preset_follows_the_precision(bf16, dtype, preset, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    argv = ["--n_layer", "3", "--out_dir", str(tmp_path / "out")] + (["--dtype", dtype] if dtype else [])
    args = gpt.parse_args(argv)
    gpt.configure(args, torch.device("cpu"))
    gpt.unlock(args.out_dir)
    column = gpt.PRESETS.index(preset)
    assert f"the {preset} preset, at most about 5 minutes" in capsys.readouterr().out      # said, and recorded
    assert (args.preset, args.n_layer, args.max_iters) == (preset, 3, gpt.HYPERPARAMETERS["max_iters"][column])


def test_a_gpu_takes_the_full_configuration(no_tf32):                 # configure() turns TF32 on
    args = gpt.parse_args(["--sample"])
    gpt.configure(args, torch.device("cuda"))
    assert (args.n_embd, args.preset) == (gpt.HYPERPARAMETERS["n_embd"][0], "full") == (384, "full")


def test_learning_rate_schedule():
    args = argparse.Namespace(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, planned_iters=1100)
    assert gpt.get_lr(0, args) == pytest.approx(1e-5)              # warmup starts small
    assert gpt.get_lr(49, args) == pytest.approx(5e-4)
    assert gpt.get_lr(99, args) == pytest.approx(1e-3)             # the peak
    assert gpt.get_lr(600, args) == pytest.approx(5.5e-4)          # half way down the cosine
    assert gpt.get_lr(1100, args) == pytest.approx(1e-4)           # the floor
    assert gpt.get_lr(5000, args) == pytest.approx(1e-4)


def test_resuming_with_more_steps_runs_the_extra_ones_at_min_lr(run, corpus, tmp_path, monkeypatch):
    """The schedule keeps the length the run was started with: no jump back up from min_lr."""
    assert run(gpt, "--data", corpus)[0] == 0                      # 20 steps, its cosine ends at min_lr
    rates, real = [], gpt.get_lr
    monkeypatch.setattr(gpt, "get_lr", lambda step, args: rates.append((step, real(step, args))) or rates[-1][1])
    code, _, err = run(gpt, "--data", corpus, "--resume", "--max_iters", "30", tiny=False,
                       out_dir=tmp_path / "out" / "gpt")
    assert code == 0, err
    min_lr = gpt.HYPERPARAMETERS["min_lr"][gpt.PRESETS.index("laptop")]
    assert sorted({step for step, _ in rates}) == list(range(20, 30))   # (once per group of weights)
    assert all(lr == pytest.approx(min_lr) for _, lr in rates)


def test_weight_decay_only_on_matrices():
    model, args = tiny_model(gpt)
    optimizer = gpt.make_optimizer(model, args, torch.device("cpu"))
    decayed, plain = optimizer.param_groups
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert decayed["weight_decay"] == args.weight_decay and plain["weight_decay"] == 0


@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (1.0, None), (0.8, 5)])
def test_key_value_cache_gives_the_same_tokens(temperature, top_k):
    model, args = tiny_model(gpt, temperature=temperature, top_k=top_k, top_p=0.9)
    prompt = torch.randint(20, (2, 5))
    runs = []
    for use_cache in (True, False):
        generator = torch.Generator().manual_seed(3)
        runs.append(gpt.generate(model, prompt, 3 * args.block_size, args, torch.device("cpu"), generator,
                                 use_cache=use_cache))
    assert runs[0].shape == (2, 5 + 3 * args.block_size)
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("dtype, kernel, off", [("bfloat16", True, True), ("float32", True, False),
                                                 ("bfloat16", False, False)])
def test_onednn_is_off_for_cached_bfloat16_steps_only(dtype, kernel, off, monkeypatch):
    model, args = tiny_model(gpt, dtype=dtype, temperature=0.0)
    monkeypatch.setattr(gpt, "HAS_ONE_VECTOR_KERNEL", kernel)     # False: PyTorch before 2.6
    seen = []                                                      # (positions in the call, oneDNN on)
    model.register_forward_hook(lambda module, inputs, output: seen.append(
        (inputs[0].shape[1], torch.backends.mkldnn.enabled)))
    outside = []
    gpt.generate(model, torch.zeros((1, 3), dtype=torch.long), 2 * args.block_size, args, torch.device("cpu"),
                 None, on_token=lambda ids: outside.append(torch.backends.mkldnn.enabled))
    assert all(outside) and torch.backends.mkldnn.enabled         # the caller never sees it off
    assert {on for positions, on in seen if positions > 1} == {True}   # filling the cache: big products
    assert {on for positions, on in seen if positions == 1} == {not off}


def test_a_cached_bfloat16_step_computes_the_same_logits():
    model, args = tiny_model(gpt)
    x = torch.randint(20, (2, args.block_size))
    caches = [{} for _ in model.blocks]
    with torch.no_grad(), gpt.autocast(torch.device("cpu"), "bfloat16"):
        whole, _ = model(x)                                        # every position at once, oneDNN on
        model(x[:, :-1], caches=caches)
        with gpt.one_vector_kernels(torch.device("cpu"), "bfloat16"):
            step, _ = model(x[:, -1:], caches=caches)              # the last position alone
    assert torch.allclose(step[:, 0].float(), whole[:, -1].float(), atol=0.05)
    assert not torch.allclose(step[:, 0].float(), whole[:, -2].float(), atol=0.05)


def test_a_cached_step_of_several_positions_sees_the_right_past(monkeypatch):
    """Cached positions come before the new ones: the causal mask must be shifted by them. The
    fused kernel's is_causal would align it top-left instead; the written-out one would not fit."""
    model, args = tiny_model(gpt)
    x = torch.randint(20, (2, args.block_size))
    for fused in (True, False):
        monkeypatch.setattr(gpt, "use_fused_attention", lambda x: fused)
        with torch.no_grad():
            whole, _ = model(x)
            caches = [{} for _ in model.blocks]
            model(x[:, :5], caches=caches)
            part, _ = model(x[:, 5:9], caches=caches)              # four new positions, five cached
        assert torch.allclose(part, whole[:, 5:9], atol=1e-5), fused


@pytest.mark.parametrize("name", ["bigram", "gpt"])
def test_generate_leaves_the_caller_as_it_found_it(name):
    stage = load_stage(name)
    model, args = tiny_model(stage, dtype="bfloat16", temperature=1.0, top_k=None, top_p=1.0)
    for mode in (True, False):
        model.train(mode)
        inside = []
        stage.generate(model, torch.zeros((1, 1), dtype=torch.long), 5, args, torch.device("cpu"), None,
                       on_token=lambda ids: inside.append(model.training))
        assert model.training == mode and inside == [False] * 5   # eval mode inside, the caller's after
        assert not torch.is_autocast_enabled("cpu")                # no bfloat16 left on
        x = torch.randn(4, 4)
        assert (x @ x).dtype == torch.float32

    def stop_early(ids):
        raise KeyboardInterrupt
    model.train()
    with pytest.raises(KeyboardInterrupt):
        stage.generate(model, torch.zeros((1, 1), dtype=torch.long), 5, args, torch.device("cpu"), None,
                       on_token=stop_early)
    assert model.training and not torch.is_autocast_enabled("cpu")


def test_gpu_options_on_a_cpu_fall_back_cleanly(run, corpus, monkeypatch):
    def no_compiler(model):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(torch, "compile", no_compiler)
    code, out, err = run(gpt, "--data", corpus, "--compile", "--dtype", "bfloat16", "--device", "cpu")
    assert code == 0, err
    assert "torch.compile does not work here" in out
    assert run.metrics(gpt)["dtype"] == "bfloat16"


def test_resume_with_compile_and_dropout_matches_an_unbroken_run(run, corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda model: model)    # the warm-up runs, without a compiler
    options = ["--data", corpus, "--max_iters", "30", "--compile", "--dropout", "0.1"]
    assert run(gpt, *options, out_dir=tmp_path / "whole")[0] == 0
    ctrl_c_during_step(gpt, monkeypatch, 18)
    assert run(gpt, *options, out_dir=tmp_path / "broken")[0] == 130
    monkeypatch.undo()
    monkeypatch.setattr(torch, "compile", lambda model: model)
    assert run(gpt, *options, "--resume", out_dir=tmp_path / "broken")[0] == 0
    assert run.metrics(gpt, tmp_path / "broken")["val_loss"] == run.metrics(gpt, tmp_path / "whole")["val_loss"]


def test_context_of_one_character(run, corpus):
    code, out, err = run(gpt, "--data", corpus, "--block_size", "1")
    assert code == 0, err
