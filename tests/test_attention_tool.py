"""tools/attention.py and harness.load(...).attention: the weights of tiny trained models."""
import base64
import json
import re

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
    for page in ([], ["--html", str(tmp_path / "page.html")]):        # the picture, or the page
        capsys.readouterr()
        code = attention.main(argv + page)
        assert_one_line_error(code, capsys.readouterr().err, "attention: error:", fragment[problem])
        assert not (tmp_path / "page.html").exists()


def test_every_attention_stage_is_offered():
    assert attention.STAGES == tuple(ATTENTION_STAGES)


# ---- the page to explore (--html), and what a real browser makes of it ----

def page_data(html):
    """The data inside the page, and its weights decoded as the page's script decodes them."""
    data = json.loads(html.split("const DATA = ", 1)[1].split(";\n", 1)[0])
    T = len(data["prompt"])
    raw = torch.frombuffer(bytearray(base64.b64decode(data["weights"])), dtype=torch.uint8)
    return data, raw.view(data["layers"], data["heads"], T, T).float() / 255


def test_the_page_holds_the_model_s_weights_and_asks_for_nothing_outside_it(attention_stage, run, corpus,
                                                                            tmp_path):
    stage, out_dir = attention_stage, tmp_path / "out" / name(attention_stage)
    corpus.write_text(corpus.read_text() + '\nROMEO:\nthe <b>"</b>&\n')
    assert run(stage, "--data", corpus)[0] == 0
    output = tmp_path / "page.html"
    prompt = 'ROMEO:\nthe <b>"'                                       # markup in the prompt: text, not tags
    assert attention.main(["--stage", name(stage), "--prompt", prompt, "--out_dir", str(out_dir),
                           "--html", str(output)]) == 0
    html = output.read_text(encoding="utf-8")
    assert not re.search(r"\b(src|href)\s*=|https?://|<link|@import", html)   # no network, no file beside it
    data, weights = page_data(html)
    assert data["prompt"] == prompt and data["stage"] == name(stage) and data["step"] == 20
    layers = harness.load(stage, out_dir).attention(prompt)
    assert weights.shape == (len(layers), layers[0].shape[0], len(prompt), len(prompt))
    assert torch.allclose(weights, torch.stack(layers), atol=0.5 / 255 + 1e-6)
    assert "</script>" not in html.split("const DATA = ", 1)[1].split(";\n", 1)[0]


@pytest.mark.skipif(attention.chromium() is None, reason="no Chromium here (apt-get install chromium; "
                    ".ci/run installs it)")
def test_a_real_browser_draws_a_panel_per_head_and_a_click_moves_the_highlight(tmp_path, run, corpus):
    gpt = load_stage("gpt")
    assert run(gpt, "--data", corpus)[0] == 0
    output = tmp_path / "page.html"
    assert attention.main(["--stage", "gpt", "--prompt", PROMPT, "--out_dir", str(tmp_path / "out" / "gpt"),
                           "--html", str(output)]) == 0
    _, weights = page_data(output.read_text(encoding="utf-8"))
    shown = {}
    for t in (4, 8):                                               # a real click on character t, in the page
        dom = attention.render(output, f"click={t}&enlarge=2,1")
        assert 'data-ready="yes"' in dom, dom[-500:]               # the script ran to its end
        panels = re.findall(r'<div class="panel" data-layer="(\d)" data-head="(\d)"', dom)
        assert panels == [(str(l), str(h)) for l in (1, 2) for h in (1, 2)]   # one per head, layer by layer
        assert re.findall(r'class="char selected"[^>]*data-char="(\d+)"', dom) == [str(t)]
        strip = dom.split('data-layer="1" data-head="1"', 1)[1].split('class="strip"', 1)[1].split("</div>", 1)[0]
        shown[t] = [float(w) for w in re.findall(r'data-weight="([\d.]+)"', strip)]
        assert shown[t] == pytest.approx(weights[0, 0, t].tolist(), abs=1e-3)   # what it takes, up to t
        assert all(w == 0 for w in shown[t][t + 1:])               # nothing from the future
        assert 'id="large"' in dom and 'id="large" hidden' not in dom and "layer 2, head 1" in dom
    assert shown[4] != shown[8]
