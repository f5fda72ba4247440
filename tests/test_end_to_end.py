"""The command line as a learner uses it: real processes, and the real corpus where present."""
import os
import signal
import subprocess
import sys

import pytest

from conftest import REAL_CORPUS, ROOT, TINY, TINY_MODEL, load_stage


def test_command_line_end_to_end(tmp_path, corpus, run):
    """python gpt.py as a learner types it (tiny), and then --sample from what it saved."""
    out_dir = tmp_path / "out"
    train = [sys.executable, "gpt.py", "--data", str(corpus), "--out_dir", str(out_dir), *TINY, *TINY_MODEL["gpt"],
             "--device", "cpu"]
    done = subprocess.run(train, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "full val loss" in done.stdout and "Traceback" not in done.stderr
    code, out, err = run(load_stage("gpt"), "--sample", "--prompt", "JULIET:", "--max_new_tokens", "40",
                         tiny=False, out_dir=out_dir)
    assert code == 0, err
    assert out.startswith("JULIET:") and len(out) == len("JULIET:") + 40 + 1


@pytest.mark.skipif(not REAL_CORPUS, reason="tiny Shakespeare is not here")
def test_real_corpus(run, tmp_path):
    bigram = load_stage("bigram")
    code, out, err = run(bigram, "--data", REAL_CORPUS[0], "--max_iters", "300", "--eval_interval", "100",
                         tiny=False)
    assert code == 0, err
    assert "1,115,394 characters, 65 distinct" in out
    metrics = run.metrics(bigram)
    assert metrics["val_chars"] == 111_539                         # the whole validation split, scored once
    assert 2.45 < metrics["val_loss"] < 2.65                       # near the bigram floor after 300 steps


def test_ctrl_c_while_pytorch_loads_ends_the_process_without_a_traceback(tmp_path):
    """The first seconds of every run are spent importing PyTorch, before main() can catch
    anything. A stand-in for numpy, imported right after the script's first lines, says when
    that moment has come and waits there, so that the Ctrl-C lands inside the imports."""
    (tmp_path / "numpy.py").write_text("import sys, time\nprint('importing', flush=True)\ntime.sleep(60)\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    process = subprocess.Popen([sys.executable, "gpt.py", "--sample"], cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline() == "importing\n"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGINT and err == ""      # killed by the signal: exit status 130
