"""tools/attention.py and harness.load(...).attention: the weights of tiny trained models."""
import pytest
import torch

import attention  # tools/, on the path from conftest
import harness
from conftest import ATTENTION_STAGES, assert_one_line_error, load_stage, name

PROMPT = "ROMEO:\nthe"


@pytest.fixture
def trained(attention_stage, run, corpus, tmp_path):
    assert run(attention_stage, "--data", corpus)[0] == 0
    return attention_stage, tmp_path / "out" / name(attention_stage)


def weights_by_hand(stage, model, ids):
    """The same weights, computed here from the model's parts: (layers, heads, T, T)."""
    x = torch.tensor(ids)[None, :]
    T = x.shape[1]
    with torch.no_grad():
        h = model.token_embedding_table(x) + model.position_embedding_table(torch.arange(T))
        if name(stage) == "single_attention":
            return [model.attention.attention_weights(h)]
        if name(stage) == "multi_head_attn":
            return [torch.cat([head.attention_weights(h) for head in model.attention.heads])]
        layers = []
        for block in model.blocks:
            q, k, _ = block.attention.qkv(block.ln1(h)).split(h.shape[-1], dim=2)
            q, k = (t.view(1, T, block.attention.n_head, -1).transpose(1, 2) for t in (q, k))
            scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
            layers.append(torch.softmax(scores.masked_fill(torch.ones(T, T).triu(1).bool(), -torch.inf), -1)[0])
            h = block(h)
        return layers


def test_the_weights_drawn_are_the_model_s_causal_and_rows_sum_to_one(trained, tmp_path, capsys):
    stage, out_dir = trained
    output = tmp_path / "picture.png"
    assert attention.main(["--stage", name(stage), "--prompt", PROMPT, "--out_dir", str(out_dir),
                           "--output", str(output)]) == 0
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "attention: wrote" in capsys.readouterr().out
    loaded = harness.load(stage, out_dir)
    layers = loaded.attention(PROMPT)
    heads = {"single_attention": 1, "multi_head_attn": 2, "gpt": 2}[name(stage)]
    assert len(layers) == (2 if name(stage) == "gpt" else 1)
    for drawn, by_hand in zip(layers, weights_by_hand(stage, loaded.model, loaded.tokenizer.encode(PROMPT))):
        T = len(PROMPT)
        assert drawn.shape == (heads, T, T)
        assert torch.allclose(drawn.sum(-1), torch.ones(heads, T), atol=1e-5)
        assert torch.all(drawn.triu(diagonal=1) == 0)              # no weight on the future
        assert torch.allclose(drawn, by_hand, atol=1e-5)
    watched = loaded.model.blocks[0].attention if name(stage) == "gpt" else loaded.model.attention
    assert not harness.WATCHING and "attention_weights" not in vars(watched)   # all put back
    assert loaded.sample("ROMEO:", 10, seed=1) == loaded.sample("ROMEO:", 10, seed=1)


@pytest.mark.parametrize("problem", ["bigram", "no checkpoint", "unknown characters", "too long"])
def test_bad_requests_are_one_line(problem, run, corpus, tmp_path, capsys):
    gpt = load_stage("gpt")
    assert run(gpt, "--data", corpus)[0] == 0
    out_dir = tmp_path / "out" / "gpt"
    argv = {"bigram": ["--stage", "bigram"],
            "no checkpoint": ["--stage", "gpt", "--out_dir", str(tmp_path / "nothing")],
            "unknown characters": ["--stage", "gpt", "--out_dir", str(out_dir), "--prompt", "Zebra€"],
            "too long": ["--stage", "gpt", "--out_dir", str(out_dir), "--prompt", "the " * 10]}[problem]
    fragment = {"bigram": "bigram.py has no attention", "no checkpoint": "no checkpoint at",
                "unknown characters": "not in the model's vocabulary", "too long": "more than the model's context of 16"}
    capsys.readouterr()
    code = attention.main(argv)
    assert_one_line_error(code, capsys.readouterr().err, "attention: error:", fragment[problem])


def test_every_attention_stage_is_offered():
    assert attention.STAGES == tuple(ATTENTION_STAGES)
