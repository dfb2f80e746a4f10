"""Greedy speculation equals plain greedy on the GPU: resident, streamed (with and without exclusions),
quantized, LLM.int8; with the target's own weights as the draft (long accepted paths) and with lookup."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from speculative_testing import speculating
from tiny_model import GREEDY, make_tiny_model_dir

from engine.build import build_engine
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
    {"quant": QuantMode.BNB, "dtype": "float16"},  # --use_8bit, resident
    {"use_offload": True, "quant": QuantMode.INT8},  # --use_8bit --use_offload
    {"use_offload": True, "quant": QuantMode.INT4},
]
PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> RunConfig:
    model_dir = make_tiny_model_dir(tmp_path_factory.mktemp("cuda-spec"), ffn_dim=256)
    return RunConfig(model_dir=model_dir, device=DeviceSpec("cuda"), dtype="bfloat16", ctx=256, sampling=GREEDY)


def _tokens(engine) -> list[int]:
    engine.generator.reset()
    prompt = engine.tokenizer.encode(PROMPT, bos=True)
    return engine.generator.generate(prompt, Sampler(GREEDY), 48, stop_ids=set()).token_ids


@pytest.mark.parametrize("mode", MODES, ids=lambda m: ",".join(f"{k}={getattr(v, 'value', v)}" for k, v in m.items()) or "resident")
@pytest.mark.parametrize("source", ["draft", "lookup"])
def test_greedy_speculation_equals_plain_greedy(base, mode, source):
    cfg = replace(base, **mode)
    want = _tokens(build_engine(cfg))
    draft = {"draft": cfg.model_dir} if source == "draft" else {"lookup": True}
    for shape in (TreeShape(4, 1), TreeShape(4, 4), None):  # None: the planner's own choice
        assert _tokens(speculating(build_engine(cfg), shape, **draft)) == want
