"""tools/report.py on tiny runs made here: never the real corpus, never a long run."""
import json

import report  # tools/, on the path from conftest
from conftest import ROOT, STAGES, TINY, load_stage


def test_report_rewrites_the_results_and_keeps_other_machines(tmp_path, corpus, monkeypatch):
    def in_process(stage, argv, log_path):                         # the scripts' own main(), not a subprocess
        assert load_stage(stage).main(argv) == 0

    monkeypatch.setattr(report, "run_stage", in_process)
    readme, results, figure = tmp_path / "README.md", tmp_path / "results.json", tmp_path / "curves.png"
    readme.write_text(f"# Title\n\n{report.BEGIN}\nstale numbers\n{report.END}\n\nThe rest.\n")
    gpu = {"stage": "gpt", "device": "cuda", "hardware": "Some GPU", "torch": "2.x", "dtype": "bfloat16", "params": 10_763_904,
           "iters": 5000, "batch_size": 64, "block_size": 256, "seconds": 80.0, "tokens_per_sec": 9e5,
           "val_loss": 1.47, "val_bpc": 2.12, "val_chars": 111_539, "sample": "ROMEO:\nhi\n", "log": [[0, 4.2, 4.2, 0.0]]}
    results.write_text(json.dumps({"cuda: Some GPU, bfloat16": [gpu]}))
    details = tmp_path / "results.md"
    argv = ["--data", str(corpus), "--out", str(tmp_path / "runs"), "--results", str(results),
            "--readme", str(readme), "--details", str(details), "--figure", str(figure), *TINY]
    assert report.main(argv) == 0

    saved = json.loads(results.read_text())
    assert list(saved)[0] == "cuda: Some GPU, bfloat16" and len(saved) == 2
    cpu_runs = saved[list(saved)[1]]
    assert [m["stage"] for m in cpu_runs] == STAGES
    text = readme.read_text()
    assert text.startswith("# Title\n") and text.endswith("\nThe rest.\n") and "stale numbers" not in text
    for m in cpu_runs:
        assert f"| `{m['stage']}.py` |" in text and f"**{m['val_loss']:.3f}**" in text
    assert "**Some GPU** (cuda, bfloat16" in text and "**1.470**" in text
    assert text.count("Val loss is the full validation loss") == 1           # the caption, once
    assert "Samples on Some GPU" in text and "Samples on" not in text.split("Samples on Some GPU")[1]
    assert report.render_markdown(saved) in details.read_text()             # every machine, with samples
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert report.main(["--render", "--results", str(results), "--readme", str(readme),
                        "--details", str(details), "--figure", str(figure)]) == 0
    assert readme.read_text() == text                              # rendering again changes nothing


def test_readme_results_are_the_recorded_ones():
    results = json.loads((ROOT / "docs" / "results.json").read_text())
    keys = report.summary_keys(results)
    assert [results[key][0]["device"] for key in keys] == ["cuda", "cpu"]
    assert report.render_markdown(results, keys, keys[:1]) in (ROOT / "README.md").read_text()
    assert report.render_markdown(results) in (ROOT / "docs" / "results.md").read_text()


def test_precisions_and_commands_of_one_machine_are_kept_apart():
    row = {"stage": "gpt", "device": "cpu", "hardware": "Some CPU", "torch": "2.x", "params": 1, "iters": 1,
           "batch_size": 1, "block_size": 1, "seconds": 1.0, "tokens_per_sec": 1.0, "val_loss": 1.5,
           "val_bpc": 2.2, "val_chars": 10, "sample": "hi\n"}
    float32, bfloat16 = dict(row, dtype="float32"), dict(row, dtype="bfloat16", val_loss=1.4)
    assert report.machine_key([float32]) != report.machine_key([bfloat16])
    text = report.render_markdown({report.machine_key([r]): [r] for r in (float32, bfloat16)})
    assert "(cpu, float32," in text and "(cpu, bfloat16," in text and "**1.500**" in text and "**1.400**" in text
    mixed = [dict(float32, report_command="python tools/report.py"),
             dict(float32, stage="bigram", report_command="python tools/report.py --max_iters 9")]
    text = report.render_markdown({"cpu": mixed})
    assert "the commands below the table" in text and "- `bigram.py`: `python tools/report.py --max_iters 9`" in text
    older_gpu = [dict(float32, stage="bigram"), dict(float32, dtype="float16")]   # auto on a T4
    key = report.machine_key(older_gpu)                            # its own rows, not float32's
    assert key.endswith(", float32 and float16") and key != report.machine_key([float32])
    text = report.render_markdown({report.machine_key(older_gpu): older_gpu})
    assert "(cpu, float32 and float16," in text and "| `gpt.py` (float16) |" in text and "| `bigram.py` (float32) |" in text


def test_rows_made_with_other_options_say_so_and_keep_apart(tmp_path, corpus, monkeypatch):
    """Review finding: report.py --data other.txt would have replaced this machine's rows, labelled
    as run with the defaults."""
    monkeypatch.setattr(report, "run_stage", lambda stage, argv, log_path: load_stage(stage).main(argv))
    paths = ["--out", str(tmp_path / "runs"), "--results", str(tmp_path / "r.json"), "--readme",
             str(tmp_path / "README.md"), "--details", str(tmp_path / "d.md"), "--figure", str(tmp_path / "f.png")]
    for extra in ([], ["--learning_rate", "0.02"]):
        assert report.main(paths + ["--stages", "bigram", "--data", str(corpus), *TINY] + extra) == 0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert len(saved) == 2                                         # two commands, two sets of rows
    key = [key for key in saved if "0.02" in key][0]
    assert saved[key][0]["report_command"].startswith(f"python tools/report.py {' '.join(paths)}")
    assert f"--data {corpus}" in key and "each script with its defaults" not in report.render_markdown(saved)
    assert report.report_options(["--stages", "gpt", "bigram", "--out", "x", "--learning_rate", "0.02"]) == \
        ["--learning_rate", "0.02"]                                # --stages: which run, not how
