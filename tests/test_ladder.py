"""tools/ladder.py, tiny: six rungs built from gpt.py's parts, one table, one figure."""
import json

import pytest
import torch

import ladder  # tools/, on the path from conftest
from conftest import ROOT, load_stage, tiny_args

TINY_BUDGET = ["--max_iters", "4", "--eval_interval", "2", "--eval_iters", "1", "--block_size", "16",
               "--batch_size", "4"]


def test_the_ladder_climbs_and_writes_its_table_and_figure(tmp_path, corpus):
    gpt = load_stage("gpt")
    pieces = (gpt.make_model, gpt.make_optimizer, gpt.get_lr)
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{ladder.BEGIN}\nold\n{ladder.END}\n\nThe rest.\n")
    argv = ["--data", str(corpus), "--out_dir", str(tmp_path / "runs"), "--results", str(tmp_path / "l.json"),
            "--readme", str(readme), "--figure", str(tmp_path / "ladder.png"), *TINY_BUDGET]
    assert ladder.main(argv) == 0
    results = json.loads((tmp_path / "l.json").read_text())
    assert [r["rung"] for r in results] == [1, 2, 3, 4, 5, 6]
    assert all(r["iters"] == 4 and r["batch_size"] == 4 and r["block_size"] == 16 for r in results)
    params = [r["params"] for r in results]
    assert params[1] < params[2] < params[3] < params[4]           # 1 layer, 4, their norms, wider
    assert params[5] < params[4]                                   # weight tying shares a matrix
    text = readme.read_text()
    assert "old" not in text and text.endswith("The rest.\n") and "| 6. + training recipe |" in text
    assert "2.28" in text and "2.06" in text                       # the lecture's figures beside ours
    assert (tmp_path / "ladder.png").read_bytes()[:4] == b"\x89PNG"
    assert (gpt.make_model, gpt.make_optimizer, gpt.get_lr) == pieces   # gpt.py as it was
    assert ladder.main(["--render", *argv]) == 0 and readme.read_text() == text
    rungs = [json.loads((tmp_path / "runs" / f"rung{n}" / "metrics.json").read_text()) for n in range(1, 7)]
    last = [torch.load(tmp_path / "runs" / f"rung{n}" / "last.pt", weights_only=True) for n in range(1, 7)]
    assert {r["seed"] for r in rungs} == {1337} and [r["dropout"] for r in rungs[1:]] == [0, 0, 0, 0.1, 0.1]
    assert [r["n_layer"] for r in rungs[1:]] == [1, 4, 4, 4, 4] and [r["n_embd"] for r in rungs] == [128] * 4 + [192] * 2
    for r, state in zip(rungs[1:5], last[1:5]):                    # rungs 2-5: the lecture's optimizer
        assert (r["grad_clip"], r["weight_decay"]) == (0, 0.01)
        assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [1e-3]   # one group, a constant rate
    assert (rungs[5]["grad_clip"], rungs[5]["weight_decay"]) == (1.0, 0.1)
    assert [g["weight_decay"] for g in last[5]["optimizer"]["param_groups"]] == [0.1, 0.0]   # gpt.py's groups


def test_each_rung_adds_what_it_says():
    gpt = load_stage("gpt")
    args = tiny_args(gpt, "--n_layer", "2")
    x = torch.randn(2, 8, args.n_embd)
    models = [pieces[0](20, args) for *_, pieces in ladder.RUNGS[1:5]]
    for model in models[:2]:                                       # weights of zero: what is left is
        for p in model.blocks[0].parameters():                     # the residual stream, or nothing
            torch.nn.init.zeros_(p)
    assert torch.equal(models[0].blocks[0](x), torch.zeros_like(x))   # rung 2: no residual connection
    assert torch.equal(models[1].blocks[0](x), x)                     # rung 3: one
    assert [type(m.ln_f) for m in models] == [torch.nn.Identity] * 2 + [torch.nn.LayerNorm] * 2
    assert all(isinstance(b, gpt.Block) for m in models[2:] for b in m.blocks)   # rungs 4-5: gpt.py's blocks
    assert not any(isinstance(m, torch.nn.LayerNorm) for model in models[:2] for m in model.modules())


def test_a_readme_it_cannot_write_is_refused_before_the_climb(tmp_path):
    argv = ["--out_dir", str(tmp_path / "runs"), "--results", str(tmp_path / "l.json"), *TINY_BUDGET]
    with pytest.raises(SystemExit, match="^ladder: cannot read .*nothing.md"):
        ladder.main(argv + ["--readme", str(tmp_path / "nothing.md")])
    (tmp_path / "plain.md").write_text("no markers\n")
    with pytest.raises(SystemExit, match="has no ladder markers"):
        ladder.main(argv + ["--readme", str(tmp_path / "plain.md")])
    with pytest.raises(SystemExit, match="^ladder: cannot read .*l.json"):
        ladder.main(["--render", *argv, "--readme", str(ROOT / "README.md")])
    assert not (tmp_path / "runs").exists()                        # nothing trained
