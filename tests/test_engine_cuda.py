"""The whole engine on a GPU, as app.py builds it: resident, quantized and streamed variants of one model."""
from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
import torch
from tiny_model import GREEDY, make_tiny_model_dir

from engine.build import build_engine
from engine.config import DeviceSpec, RunConfig
from offload.quant_mode import QuantMode
from llama.sampling import Sampler

NEEDS_BITSANDBYTES = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                        reason="needs bitsandbytes")
pytestmark = [
    pytest.mark.cuda,
]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> RunConfig:
    model_dir = make_tiny_model_dir(tmp_path_factory.mktemp("cuda-engine"), ffn_dim=256)
    return RunConfig(model_dir=model_dir, device=DeviceSpec("cuda"), dtype="bfloat16", ctx=256, sampling=GREEDY)


def _first_logits_and_tokens(cfg: RunConfig) -> tuple[torch.Tensor, list[int]]:
    engine = build_engine(cfg)
    prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog", bos=True)
    with torch.inference_mode():
        logits = engine.model(torch.tensor([prompt], device=engine.device))[0, -1].float().cpu()
    tokens = engine.generator.generate(prompt, Sampler(GREEDY), 24, stop_ids=set()).token_ids
    if engine.offloaded is not None:
        engine.offloaded.close()  # streaming turns cuDNN attention off until detached: later tests expect it back
    return logits, tokens


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    "overrides, tolerance",
    [
        # Streaming is exact up to attention backends (tests/test_offload_cuda.py checks tokens bit for bit).
        ({"use_offload": True}, 0.01),
        ({"use_offload": True, "offload_exclusion": frozenset({"w1", "w2", "w3"})}, 0.01),
        ({"quant": QuantMode.INT8}, 0.03),
        ({"quant": QuantMode.INT4}, 0.2),
        # --use_8bit, resident: bitsandbytes' LLM.int8 (streamed --use_8bit is our own int8)
        pytest.param({"quant": QuantMode.BNB, "dtype": "float16"}, 0.03, marks=NEEDS_BITSANDBYTES,
                     id="use_8bit-resident"),
        ({"use_offload": True, "quant": QuantMode.INT8}, 0.03),  # --use_8bit --use_offload
        ({"use_offload": True, "quant": QuantMode.INT4}, 0.2),
    ],
)
def test_variants_match_the_resident_model(base, overrides, tolerance):
    ref_logits, ref_tokens = _first_logits_and_tokens(replace(base, dtype=overrides.get("dtype", base.dtype)))
    logits, tokens = _first_logits_and_tokens(replace(base, **overrides))
    assert _rel(logits, ref_logits) <= tolerance
    assert len(tokens) == 24 and len(ref_tokens) == 24
