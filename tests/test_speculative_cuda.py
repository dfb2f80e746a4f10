"""Greedy speculation equals plain greedy on the GPU, token for token: resident, streamed (with and without
exclusions), quantized, LLM.int8; with the target's own weights as the draft (long accepted paths) and with
lookup; on the bundled model and on a random tiny one, whose logits are full of near-ties (a tree's nodes get
their one-token steps' bits, llama/tree_rows.py, so near-ties fall the same way)."""
from __future__ import annotations

from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from speculative_testing import speculating
from tiny_model import GREEDY, make_tiny_model_dir

from engine.config import DeviceSpec, RunConfig
from llama.sampling import Sampler
from llama.speculative.planner import TreeShape
from offload.quant_mode import QuantMode

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MODES = [
    {},
    {"dtype": "float16"},
    {"use_offload": True},
    {"use_offload": True, "offload_exclusion": frozenset({"w1", "w2", "w3"})},
    {"quant": QuantMode.INT8},
    {"quant": QuantMode.INT4},
    pytest.param({"quant": QuantMode.BNB, "dtype": "float16"},  # --use_8bit, resident
                 marks=pytest.mark.skipif(find_spec("bitsandbytes") is None, reason="needs bitsandbytes")),
    {"use_offload": True, "quant": QuantMode.INT8},  # --quant int8 --use_offload
    {"use_offload": True, "quant": QuantMode.INT4},
]
PROMPT = "import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n"
BUNDLED = Path(__file__).resolve().parent.parent / "models" / "pytiny"


@pytest.fixture(scope="module", params=["bundled", "random"])
def base(request, tmp_path_factory) -> RunConfig:
    model_dir = BUNDLED if request.param == "bundled" else make_tiny_model_dir(tmp_path_factory.mktemp("m"), ffn_dim=256)
    return RunConfig(model_dir=model_dir, device=DeviceSpec("cuda"), dtype="bfloat16", ctx=256, sampling=GREEDY)


def _tokens(engine) -> list[int]:
    engine.generator.reset()
    prompt = engine.tokenizer.encode(PROMPT, bos=True)
    return engine.generator.generate(prompt, Sampler(GREEDY), 48, stop_ids=set()).token_ids


def mode_id(mode: dict) -> str:
    """The same id in every process (pytest-xdist compares them): a frozenset's names sorted."""
    shown = lambda v: "+".join(sorted(v)) if isinstance(v, frozenset) else getattr(v, "value", v)  # noqa: E731
    return ",".join(f"{k}={shown(v)}" for k, v in mode.items()) or "resident"


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
@pytest.mark.parametrize("source", ["draft", "lookup"])
def test_greedy_speculation_equals_plain_greedy(base, closing_engines, mode, source):
    cfg = replace(base, **mode)
    want = _tokens(closing_engines(cfg))
    draft = {"draft": cfg.model_dir} if source == "draft" else {"lookup": True}
    for shape in (TreeShape(4, 1), TreeShape(4, 4), None):  # None: the planner's own choice
        engine = speculating(closing_engines(cfg), shape, **draft)
        assert _tokens(engine) == want, shape
