"""The shape of the repository: each stage is its lesson and only that, the machinery is written
once in harness.py, and consecutive stages differ by their step alone."""
import ast
import difflib
import inspect
import re

import pytest

import harness
from conftest import ROOT, STAGES, load_stage

# the lesson's shared parts: identical from stage to stage, but where a stage changes them
SHARED = ["CharTokenizer", "load_text", "get_batch", "estimate_loss", "generate", "train", "main", "Head",
          "MultiHeadAttention"]
CHANGED_BY_GPT = {"generate", "train"}                             # (e), (f), (g) and torchrun
PAIRS = list(zip(STAGES, STAGES[1:]))
# changed lines allowed between consecutive scripts, counted as `diff a.py b.py | grep -c '^[<>]'`
BUDGET = {("bigram", "single_attention"): 70, ("single_attention", "multi_head_attn"): 35,
          ("multi_head_attn", "gpt"): 229}                       # 9 of them float16's scaler
MOST_LINES = {"bigram": 220, "single_attention": 260, "multi_head_attn": 280, "gpt": 450, "harness": 1240}
MODEL_BY_LINE = {"bigram": 120, "single_attention": 120, "multi_head_attn": 120, "gpt": 135}   # after the settings
MODEL_CLASS = {"bigram": "BigramLanguageModel", "single_attention": "SingleHeadLanguageModel",
               "multi_head_attn": "MultiHeadLanguageModel", "gpt": "GPT"}
TAG = re.compile(r"NEW( \([^)]*\))?:? ?")                         # NEW, NEW (stage 2), NEW (a): ...


def source(name):
    return (ROOT / f"{name}.py").read_text(encoding="utf-8")


def imported(name):
    """The top-level names of every module a file imports."""
    names = set()
    for node in ast.walk(ast.parse(source(name))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    return names


def changed_lines(old, new):
    """The lines of old that diff removes, and those of new that it adds."""
    a, b = old.splitlines(), new.splitlines()
    opcodes = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    return ([line for tag, i1, i2, _, _ in opcodes if tag != "equal" for line in a[i1:i2]],
            [line for tag, _, _, j1, j2 in opcodes if tag != "equal" for line in b[j1:j2]])


def test_harness_imports_no_stage_and_each_stage_no_other():
    assert not imported("harness") & set(STAGES)
    names = {node.id for node in ast.walk(ast.parse(source("harness"))) if isinstance(node, ast.Name)}
    assert not names & set(STAGES)                                 # nor uses one by its module's name
    for name in STAGES:
        assert not imported(name) & (set(STAGES) - {name}), name
        assert "harness" in imported(name)


def test_each_stage_ends_with_its_own_entry_point():
    for name in STAGES:
        text = source(name).rstrip("\n").splitlines()
        assert text[-2:] == ['if __name__ == "__main__":', "    sys.exit(main())"], name
        assert "def main(argv=None):" in source(name)


def test_the_lesson_comes_first_and_each_file_stays_within_its_size():
    for name, most in MOST_LINES.items():
        lines = source(name).splitlines()
        assert len(lines) <= most, (name, len(lines))
        if name == "harness":
            continue
        stage = load_stage(name)
        assert "try:" not in inspect.getsource(stage.train)        # the loop reads like the lecture's
        first_class = min(i for i, line in enumerate(lines) if re.match(r"class \w+\(nn\.Module\)", line))
        assert first_class < MODEL_BY_LINE[name], (name, first_class)   # the model, within about 100 lines


def test_no_line_is_wider_than_100_characters():
    for name in (*STAGES, "harness"):
        wide = [i + 1 for i, line in enumerate(source(name).splitlines()) if len(line) > 100]
        assert not wide, f"{name}.py, lines {wide}"


@pytest.mark.parametrize("before, after", PAIRS)
def test_the_lesson_s_shared_parts_are_identical(before, after):
    a, b = load_stage(before), load_stage(after)
    for name in SHARED:
        if not hasattr(a, name) or (after == "gpt" and name in CHANGED_BY_GPT):
            continue
        old, new = inspect.getsource(getattr(a, name)), inspect.getsource(getattr(b, name))
        if after == "gpt" and name in ("Head", "MultiHeadAttention"):   # (d) adds dropout, nothing else
            removed, added = changed_lines(old, new)             # each changed line: for dropout
            assert all("dropout" in line for line in added) and len(removed) <= len(added), (name, added)
            continue
        assert old == new, name


@pytest.mark.parametrize("before, after", PAIRS)
def test_diff_shows_one_step_and_no_tag_moves_on_a_line_that_does_not_change(before, after):
    removed, added = changed_lines(source(before), source(after))
    assert len(removed) + len(added) <= BUDGET[(before, after)], len(removed) + len(added)
    moved = {TAG.sub("", line) for line in removed} & {TAG.sub("", line) for line in added}
    assert not moved, moved                                        # the same line, only its tag changed


def test_no_stage_keeps_another_stage_s_names():
    for name in STAGES:
        text = source(name)
        assert f"class {MODEL_CLASS[name]}(" in text
        for other, model in MODEL_CLASS.items():
            if other != name:
                assert f"class {model}(" not in text, (name, model)


def test_every_setting_has_its_reason_for_help():
    for name in STAGES:
        stage = load_stage(name)
        notes = harness.setting_notes(stage)
        assert set(notes) == set(stage.HYPERPARAMETERS) | set(stage.SETTINGS) and all(notes.values()), name
