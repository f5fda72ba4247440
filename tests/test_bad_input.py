"""Every bad input: one clear line on stderr, a non-zero exit, no traceback, nothing lost. The
checks are harness.py's, the same for every stage: they run on bigram.py, and on the stages
whose own settings they check."""
import http.server
import threading

import pytest
import torch

import harness
from conftest import assert_one_line_error, load_stage, make_text


@pytest.mark.parametrize("content, fragments", [
    (None, ["not found"]),
    (b"", ["is empty"]),
    (b"short", ["too short", "block_size + 1 = 17"]),
    (b"fine text\n\n" * 30 + b"\xff\xfe broken", ["not UTF-8", "0xff", "offset 330", "line 61"]),
])
def test_bad_data_files(bigram, run, tmp_path, content, fragments):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    code, out, err = run(bigram, "--data", path)
    if content is None:
        fragments = [f"cannot read data file {path}"]
    assert_one_line_error(code, err, *fragments)


def test_unreadable_data_file(bigram, run, tmp_path):
    code, _, err = run(bigram, "--data", tmp_path)                 # a folder, not a file
    assert_one_line_error(code, err, "cannot read data file")


@pytest.mark.parametrize("option, value, fragment", [
    ("--batch_size", "0", "--batch_size must be at least 1"),
    ("--block_size", "-3", "--block_size must be at least 1"),
    ("--max_iters", "0", "--max_iters must be at least 1"),
    ("--eval_interval", "0", "--eval_interval must be at least 1"),
    ("--eval_iters", "0", "--eval_iters must be at least 1"),
    ("--learning_rate", "-0.001", "--learning_rate must be positive"),
    ("--learning_rate", "nan", "--learning_rate must be positive"),
    ("--num_samples", "0", "--num_samples must be at least 1"),
    ("--max_new_tokens", "-1", "--max_new_tokens cannot be negative"),
    ("--dtype", "float8", "--dtype must be auto, float32, bfloat16 or float16"),
    ("--temperature", "-0.5", "--temperature cannot be negative"),
    ("--top_k", "-1", "--top_k cannot be negative"),
    ("--top_p", "0", "--top_p must be in (0, 1]"),
    ("--top_p", "1.5", "--top_p must be in (0, 1]"),
    ("--seed", "-1", "--seed cannot be negative"),
    ("--seed", str(2 ** 64), "--seed must be below 2**63"),
])
def test_impossible_settings(bigram, run, corpus, option, value, fragment):
    code, _, err = run(bigram, "--data", corpus, option, value)
    assert_one_line_error(code, err, fragment)


@pytest.mark.parametrize("stage_name, option, value, fragment", [
    ("single_attention", "--n_embd", "0", "--n_embd must be at least 1"),
    ("multi_head_attn", "--n_head", "3", "--n_head (3) must divide --n_embd (16)"),
    ("gpt", "--n_layer", "0", "--n_layer must be at least 1"),
    ("gpt", "--dropout", "1", "--dropout must be in [0, 1)"),
    ("gpt", "--weight_decay", "-1", "--weight_decay cannot be negative"),
])
def test_impossible_model_settings(run, corpus, stage_name, option, value, fragment):
    code, _, err = run(load_stage(stage_name), "--data", corpus, option, value)
    assert_one_line_error(code, err, fragment)


def test_unknown_option_and_bad_number_are_one_line_usage_errors(bigram, run, corpus):
    code, _, err = run(bigram, "--data", corpus, "--max_iter", "5")        # no abbreviations
    assert code == 2 and err.count("\n") == 1 and "unrecognized arguments: --max_iter" in err
    code, _, err = run(bigram, "--data", corpus, "--max_iters", "many")
    assert code == 2 and err.count("\n") == 1 and "invalid int value: 'many'" in err
    code, _, err = run(bigram, "--data", corpus, "--n_layer", "2")         # gpt.py's, not bigram.py's
    assert code == 2 and "unrecognized arguments: --n_layer" in err


def test_one_thing_at_a_time_and_an_empty_path_is_still_a_path(bigram, run, corpus, tmp_path):
    """Review finding: --evaluate "" trained a new run, setting the earlier one aside."""
    assert run(bigram, "--data", corpus)[0] == 0
    out_dir = tmp_path / "out" / "bigram"
    code, _, err = run(bigram, "--evaluate", "", tiny=False, out_dir=out_dir)
    assert_one_line_error(code, err, "cannot read data file")
    assert not (out_dir / "previous-1").exists()
    for both in (["--sample", "--resume"], ["--sample", "--evaluate", str(corpus)]):
        code, _, err = run(bigram, *both, tiny=False, out_dir=out_dir)
        assert code == 2 and "not allowed with argument" in err and err.count("\n") == 1
    code, _, err = run(bigram, "--data", corpus, "--out_dir", "")
    assert_one_line_error(code, err, "--out_dir cannot be empty")


def test_bad_prompt_is_refused_before_training(bigram, run, corpus, tmp_path):
    for prompt, fragment in (("€", "not in the model's vocabulary"), ("", "at least one character"),
                             ("\udcff", "not in the model's vocabulary")):   # a byte that was not UTF-8
        code, _, err = run(bigram, "--data", corpus, "--prompt", prompt)
        assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "out").exists()                         # nothing trained, nothing written


def test_extreme_sampling_settings_still_sample(bigram, run, corpus, tmp_path):
    assert run(bigram, "--data", corpus)[0] == 0
    code, out, err = run(bigram, "--sample", "--temperature", "1e-45", "--max_new_tokens", "5", tiny=False,
                         out_dir=tmp_path / "out" / "bigram")
    assert code == 0, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_device(bigram, run, corpus):
    code, _, err = run(bigram, "--data", corpus, "--device", "cuda")
    assert_one_line_error(code, err, "--device cuda", "no CUDA GPU")


def test_prompt_with_unknown_characters(bigram, run, corpus, tmp_path):
    assert run(bigram, "--data", corpus)[0] == 0
    code, _, err = run(bigram, "--sample", "--prompt", "Zebra€", tiny=False, out_dir=tmp_path / "out" / "bigram")
    assert_one_line_error(code, err, "not in the model's vocabulary", "'Zb€'")


def test_sample_or_evaluate_without_checkpoint(bigram, run, tmp_path, corpus):
    for action in (["--sample"], ["--evaluate", str(corpus)]):
        code, _, err = run(bigram, *action, tiny=False, out_dir=tmp_path / "nothing")
        assert_one_line_error(code, err, "no checkpoint at", "train first")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign"])
def test_damaged_or_foreign_checkpoint(bigram, run, tmp_path, corpus, damage):
    out_dir = tmp_path / "out" / "bigram"
    assert run(bigram, "--data", corpus)[0] == 0
    path = out_dir / "ckpt.pt"
    if damage == "garbage":
        path.write_bytes(b"this is not a checkpoint")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:500])
    else:
        torch.save({"state_dict": {}}, path)
    code, _, err = run(bigram, "--sample", tiny=False, out_dir=out_dir)
    assert_one_line_error(code, err, str(path))


def test_checkpoint_of_another_stage(bigram, gpt, run, tmp_path, corpus):
    assert run(bigram, "--data", corpus, out_dir=tmp_path / "shared")[0] == 0
    code, _, err = run(gpt, "--sample", tiny=False, out_dir=tmp_path / "shared")
    assert_one_line_error(code, err, "written by bigram.py, not gpt.py")
    code, _, err = run(gpt, "--data", corpus, "--resume", out_dir=tmp_path / "shared")
    assert_one_line_error(code, err, "written by bigram.py, not gpt.py")


def test_failures_never_touch_a_good_checkpoint(bigram, run, tmp_path, corpus):
    out_dir = tmp_path / "out" / "bigram"
    assert run(bigram, "--data", corpus)[0] == 0
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    other = tmp_path / "other.txt"
    other.write_text("entirely different characters: 0123456789 " * 50, encoding="utf-8")
    failures = [("--data", tmp_path / "missing.txt"), ("--data", corpus, "--num_samples", "0"),
                ("--data", other, "--resume"), ("--sample", "--prompt", "€")]
    for argv in failures:
        assert run(bigram, *argv)[0] != 0
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before


def test_evaluate_names_unknown_characters_or_skips_them(bigram, run, tmp_path, corpus):
    assert run(bigram, "--data", corpus)[0] == 0
    out_dir = tmp_path / "out" / "bigram"
    other = tmp_path / "other.txt"
    other.write_text("ROMEO: the night! the day?\n" * 3, encoding="utf-8")
    code, _, err = run(bigram, "--evaluate", other, tiny=False, out_dir=out_dir)
    assert_one_line_error(code, err, "not in the model's vocabulary", "'!?'")
    code, out, err = run(bigram, "--evaluate", other, "--skip_unknown", tiny=False, out_dir=out_dir)
    assert code == 0, err
    assert "6 unknown characters left out" in out and "bits per character" in out


# ---- the download of the default corpus, against local sources only ----

class CutShort(http.server.BaseHTTPRequestHandler):
    """Promises 100,000 bytes and sends 15, then closes: a download cut short."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.write(b"First Citizen:\n")

    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path):
    """A loopback HTTP server that serves one file, and one that cuts its answer short."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "input.txt").write_text(make_text(), encoding="utf-8")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) for handler in (Quiet, CutShort)]
    for server in servers:
        threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()   # quick to stop
    whole, short = (f"http://127.0.0.1:{server.server_address[1]}/input.txt" for server in servers)
    yield whole, root / "input.txt", short
    for server in servers:
        server.shutdown()
        server.server_close()


def sha256(path):
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("source", ["http", "file"])
def test_download_when_the_default_corpus_is_missing(bigram, run, tmp_path, served, monkeypatch, source):
    url, file, _ = served
    monkeypatch.setattr(harness, "DATA_URL", url if source == "http" else file.as_uri())
    monkeypatch.setattr(harness, "DATA_SHA256", sha256(file))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, out, err = run(bigram, out_dir=work / "out")
    assert code == 0, err
    assert "downloading tiny Shakespeare" in out
    assert (work / "input.txt").read_bytes() == file.read_bytes()
    assert sorted(p.name for p in work.iterdir()) == ["input.txt", "out"]   # no temporary files left


@pytest.mark.parametrize("problem", ["checksum", "unreachable", "missing", "cut short"])
def test_failed_download_leaves_nothing_behind(bigram, run, tmp_path, served, monkeypatch, problem):
    """Defect: a download cut short raised http.client.IncompleteRead's traceback."""
    url, file, short = served
    monkeypatch.setattr(harness, "DATA_SHA256", "0" * 64 if problem == "checksum" else sha256(file))
    url = {"unreachable": "http://127.0.0.1:9/input.txt",          # the discard port: nobody listens
           "missing": url.replace("input.txt", "nowhere.txt"), "cut short": short}.get(problem, url)
    monkeypatch.setattr(harness, "DATA_URL", url)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, out, err = run(bigram, out_dir=work / "out")
    if problem == "checksum":
        assert_one_line_error(code, err, "sha256 mismatch", "nothing was written")
    else:
        assert_one_line_error(code, err, f"cannot download {url}", "--data PATH")
    if problem == "cut short":
        assert "IncompleteRead" in err
    assert list(work.iterdir()) == []


def test_unwritable_out_dir(bigram, run, corpus, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, _, err = run(bigram, "--data", corpus, out_dir=blocker / "out")
    assert_one_line_error(code, err, str(blocker / "out"))
