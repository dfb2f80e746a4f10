"""The bundled pair: models/pytiny with its shipped draft, greedy, equals plain greedy token for token."""
from __future__ import annotations

from pathlib import Path

import pytest
from speculative_testing import force_shape, speculating, start_at_once
from test_console import GREEDY_FLAGS, _app
from tiny_model import GREEDY

from engine.build import build_engine
from engine.config import BUNDLED_MODEL, DeviceSpec, RunConfig
from llama.sampling import Sampler
from llama.speculative.planner import TreeShape

DRAFT = BUNDLED_MODEL.parent / "pytiny-draft"
HELDOUT = Path(__file__).resolve().parent.parent / "data" / "heldout_stdlib.txt"


@pytest.fixture(scope="module")
def prompts():
    engine = build_engine(RunConfig(device=DeviceSpec("cpu"), dtype="float32", ctx=1024, sampling=GREEDY))
    ids = engine.tokenizer.encode(HELDOUT.read_text(encoding="utf-8"))
    windows = [[engine.tokenizer.bos_id] + ids[start : start + 160] for start in (1000, 40_000)]
    plain = []
    for prompt in windows:
        engine.generator.reset()
        plain.append(engine.generator.generate(prompt, Sampler(GREEDY), 40, stop_ids=set()).token_ids)
    return windows, plain


@pytest.mark.parametrize("source", [{"draft": DRAFT}, {"lookup": True}, {"draft": DRAFT, "lookup": True}],
                         ids=["draft", "lookup", "both"])
def test_bundled_greedy_with_its_draft_equals_plain(prompts, source, monkeypatch):
    start_at_once(monkeypatch)  # the planner's own choice runs too, in replies too short to repay its start
    windows, plain = prompts
    engine = build_engine(RunConfig(device=DeviceSpec("cpu"), dtype="float32", ctx=1024, sampling=GREEDY))
    speculating(engine, **source)
    for shape in (TreeShape(4, 1), TreeShape(4, 4), None):  # None: the planner chooses
        force_shape(engine, shape)
        for prompt, want in zip(windows, plain):
            engine.generator.reset()
            assert engine.generator.generate(prompt, Sampler(GREEDY), 40, stop_ids=set()).token_ids == want


def test_app_runs_the_bundled_pair_offline():
    args = [*GREEDY_FLAGS, "--prompt", "def parse(text):", "--max_new_tokens", "32"]
    plain, spec = _app(*args), _app(*args, "--draft", str(DRAFT))
    assert plain.returncode == spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout and "tok/pass" in spec.stderr
