"""The shape of the four scripts: the lesson on top, one fold, the same machinery below it,
and consecutive stages that differ by their step alone."""
import difflib
import inspect

import pytest

from conftest import ROOT, STAGES, load_stage

FOLD = "# " + "=" * 93 + "\n# MACHINERY."
# the lesson's shared parts: identical from stage to stage (gpt.py changes the last two)
SHARED = ["CharTokenizer", "load_text", "get_batch", "estimate_loss", "sample_next", "generate", "train"]
CHANGED_BY_GPT = {"generate", "train"}
PAIRS = list(zip(STAGES, STAGES[1:]))
# changed lines allowed between consecutive scripts: no more than before the lesson-first layout
BUDGET = {("bigram", "single_attention"): 76, ("single_attention", "multi_head_attn"): 43,
          ("multi_head_attn", "gpt"): 319}


def source(name):
    return (ROOT / f"{name}.py").read_text(encoding="utf-8")


def lesson_and_machinery(name):
    text = source(name)
    assert text.count(FOLD) == 1, f"{name}.py needs exactly one fold line"
    lesson, machinery = text.split(FOLD)
    return lesson, machinery


def test_every_stage_has_one_fold_and_the_same_machinery_below_it():
    machinery = {name: lesson_and_machinery(name)[1] for name in STAGES}
    for name in STAGES[1:]:
        assert machinery[name] == machinery["bigram"], f"{name}.py's machinery differs from bigram.py's"


def test_the_lesson_comes_first():
    for name in STAGES:
        lesson = lesson_and_machinery(name)[0]
        assert "def train(" in lesson and "class CLIError" not in lesson and "globals()" not in lesson
        assert "try:" not in lesson.split("def train(")[1]         # the loop reads like the lecture's
    bigram = lesson_and_machinery("bigram")[0].splitlines()
    assert len(bigram) <= 200 and bigram.index("class BigramLanguageModel(nn.Module):") < 120
    assert len(lesson_and_machinery("gpt")[0].splitlines()) <= 400


def test_no_line_is_wider_than_100_characters():
    for name in STAGES:
        wide = [i + 1 for i, line in enumerate(source(name).splitlines()) if len(line) > 100]
        assert not wide, f"{name}.py, lines {wide}"


@pytest.mark.parametrize("before, after", PAIRS)
def test_the_lesson_s_shared_parts_are_identical(before, after):
    a, b = load_stage(before), load_stage(after)
    for name in SHARED if after != "gpt" else sorted(set(SHARED) - CHANGED_BY_GPT):
        assert inspect.getsource(getattr(a, name)) == inspect.getsource(getattr(b, name)), name


@pytest.mark.parametrize("before, after", PAIRS)
def test_diff_shows_one_step(before, after):
    """Counted as `diff before.py after.py | grep -c '^[<>]'` counts them."""
    a, b = source(before).splitlines(), source(after).splitlines()
    opcodes = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    changed = sum(i2 - i1 + j2 - j1 for tag, i1, i2, j1, j2 in opcodes if tag != "equal")
    assert changed <= BUDGET[(before, after)], changed


def test_no_stage_keeps_another_stage_s_names():
    own = {"bigram": "BigramLanguageModel", "single_attention": "SingleHeadLanguageModel",
           "multi_head_attn": "MultiHeadLanguageModel", "gpt": "class GPT("}
    for name in STAGES:
        text = source(name)
        assert f'STAGE = "{name}"' in text and own[name] in text
        for other, marker in own.items():
            if other != name:
                assert marker not in text, (name, marker)


def test_every_hyperparameter_has_its_reason_for_help():
    for name in STAGES:
        stage = load_stage(name)
        notes = stage.hyperparameter_notes()
        assert set(notes) == set(stage.HYPERPARAMETERS) and all(notes.values()), name
