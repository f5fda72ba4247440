"""The side-by-side promise: consecutive stages share their scaffolding line for line."""
import difflib
import inspect

import pytest

from conftest import ROOT, STAGES, load_stage

SHARED = ["CLIError", "pick_device", "pick_dtype", "autocast", "hardware_name", "atomic_write", "download_corpus",
          "read_text", "codepoint_chunks", "CharTokenizer", "get_batch", "estimate_loss", "exact_loss",
          "sample_next", "sample_text", "rng_state", "set_rng_state", "save_checkpoint", "load_checkpoint",
          "restore_model", "write_log", "sample", "evaluate", "main"]
# what gpt.py changes in the scaffolding, because a bigger model needs it (and says so in comments)
CHANGED_BY_GPT = {"generate", "train", "parse_args", "fill_defaults"}
# check_args also checks each stage's new hyperparameters
PAIRS = list(zip(STAGES, STAGES[1:]))
# changed lines (diff's < and > lines) allowed between consecutive scripts
BUDGET = {("bigram", "single_attention"): 80, ("single_attention", "multi_head_attn"): 45}


@pytest.mark.parametrize("before, after", PAIRS)
def test_shared_code_is_identical(before, after):
    a, b = load_stage(before), load_stage(after)
    names = SHARED + ([] if after == "gpt" else sorted(CHANGED_BY_GPT))
    for name in names:
        assert inspect.getsource(getattr(a, name)) == inspect.getsource(getattr(b, name)), name


@pytest.mark.parametrize("before, after", PAIRS)
def test_diff_shows_one_step(before, after):
    a = (ROOT / f"{before}.py").read_text().splitlines()
    b = (ROOT / f"{after}.py").read_text().splitlines()
    changed = [line for line in difflib.unified_diff(a, b, n=0, lineterm="")
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert len(changed) <= BUDGET.get((before, after), 400), len(changed)


def test_no_stage_keeps_another_stage_s_names():
    own = {"bigram": "BigramLanguageModel", "single_attention": "SingleHeadLanguageModel",
           "multi_head_attn": "MultiHeadLanguageModel", "gpt": "class GPT("}
    for name in STAGES:
        text = (ROOT / f"{name}.py").read_text()
        assert f'STAGE = "{name}"' in text and own[name] in text
        for other, marker in own.items():
            if other != name:
                assert marker not in text, (name, marker)
