"""The speculation workloads (tools/speculation_workloads.py) that the bench and tools/measure_acceptance share."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from engine.config import BUNDLED_MODEL
from llama.tokenizer import load_tokenizer
from tools.measure_acceptance import parse_shape
from tools.speculation_workloads import continuation_prompts, edit_prompts

HELDOUT = Path(__file__).resolve().parent.parent / "data" / "heldout_stdlib.txt"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(BUNDLED_MODEL)


def test_continuation_prompts_are_evenly_spread_windows_after_bos(tokenizer):
    text = HELDOUT.read_text(encoding="utf-8")
    ids = tokenizer.encode(text)
    prompts = continuation_prompts(text, tokenizer, 3, 100)
    step = (len(ids) - 100) // 3
    assert [p[0] for p in prompts] == [tokenizer.bos_id] * 3
    assert [p[1:] for p in prompts] == [ids[i * step : i * step + 100] for i in range(3)]


def test_an_edit_prompt_holds_a_function_then_asks_for_it_renamed(tokenizer):
    text = "x = 1\n\ndef short(a):\n    return a\n\ndef long_enough(a, b):\n" + "    a += b\n" * 60 + "\nz = 2\n"
    (prompt,) = edit_prompts(text, tokenizer, 1)
    decoded = tokenizer.decode(prompt)
    assert prompt[0] == tokenizer.bos_id
    assert decoded.startswith("def long_enough(a, b):\n    a += b\n")  # the short one is under 400 characters
    assert decoded.endswith("# The same, renamed:\ndef long_enough_v2(a, b):\n")
    assert decoded.count("a += b") == 60


def test_shapes_are_depth_x_width():
    assert (parse_shape("12x16").depth, parse_shape("12x16").width) == (12, 16)
    for bad in ("12", "0x4", "ax2"):
        with pytest.raises(argparse.ArgumentTypeError, match="--shape"):
            parse_shape(bad)
