"""GGUF models on a GPU: Q4_0 and Q8_0 blocks resident and streamed in their own formats (4 and 8 bits)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from fixtures import random_state, tiny_args
from gguf_writer import sentencepiece_metadata, write_gguf
from tiny_model import GREEDY
from tiny_tokenizer import train_tiny_sentencepiece

from engine.build import build_engine
from engine.config import DeviceSpec, RunConfig
from offload.kernels.linear import QuantizedLinear

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module", params=["Q4_0", "Q8_0", "Q4_1"])
def gguf_file(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"gguf-cuda-{request.param}")
    args = tiny_args(vocab_size=400, ffn_dim=256, max_seq_len=256)
    tokenizer = sentencepiece_metadata(train_tiny_sentencepiece(root))
    return write_gguf(root / "model.gguf", args, random_state(args, seed=5), tokenizer, {"linear": request.param})


def _logits(cfg: RunConfig) -> tuple[torch.Tensor, object]:
    engine = build_engine(cfg)
    prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog", bos=True)
    with torch.inference_mode():
        logits = engine.model(torch.tensor([prompt], device=engine.device))[0].float().cpu()
    return logits, engine


@pytest.mark.parametrize("overrides", [{}, {"use_offload": True, "offload_exclusion": frozenset()}],
                         ids=["resident", "streamed"])
def test_gpu_runs_match_the_cpu_reference(gguf_file, overrides):
    cpu = RunConfig(model_dir=gguf_file, device=DeviceSpec("cpu"), dtype="float32", ctx=256, sampling=GREEDY)
    reference, _ = _logits(cpu)
    logits, engine = _logits(replace(cpu, device=DeviceSpec("cuda"), dtype="bfloat16", **overrides))
    assert float((logits - reference).norm() / reference.norm()) < 0.02  # bf16 compute, same quantized values
    wq = engine.model.layers[0].attention.wq
    assert isinstance(wq, QuantizedLinear)
