"""tools/ladder.py, tiny: six rungs built from gpt.py's parts, one table, one figure."""
import json

import ladder  # tools/, on the path from conftest
from conftest import load_stage

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
