"""A Llama block's int4 decode pass in four GEMV launches (engine/int4_block_step.py): installed where
the engine places int4 blocks on a GPU, it gives the logits the block's own code gives, to int8-rounding of x,
and the app's greedy tokens with graphs on and off."""
from __future__ import annotations

import io

import pytest
import torch
from cli_runner import run_app
from tiny_model import GREEDY, make_tiny_model_dir

from engine.build import build_engine
from engine.config import DeviceSpec, RunConfig
from llama.kv_cache import KVCache
from engine import int4_block_step as block_step_module
from engine.int4_block_step import int4_block_step
from llama import fused_ops
from llama.decode_graphs import DecodeSteps
from offload.quant_mode import QuantMode

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CTX = 256


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("int4_step"), ctx=CTX, ffn_dim=256)


def _engine(model_dir, **kw):
    cfg = RunConfig(model_dir=model_dir, device=DeviceSpec("cuda"), ctx=CTX, sampling=GREEDY, dtype="bfloat16",
                    quant=QuantMode.INT4, **kw)
    return build_engine(cfg, log=io.StringIO())


def _logits(model, tokens: list[int]) -> torch.Tensor:
    """Logits of each token fed one at a time through the model's forward (batch 1)."""
    cache = KVCache(model.args, CTX, torch.bfloat16, device="cuda")
    rows = [model(torch.tensor([[t]], device="cuda"), pos, cache)[0, -1].float() for pos, t in enumerate(tokens)]
    return torch.stack(rows)


def test_the_route_serves_resident_int4_blocks_and_keeps_their_logits(model_dir, monkeypatch):
    engine = _engine(model_dir)
    model = engine.model
    assert all(block.fast_path is int4_block_step for block in model.layers)
    calls = []
    real = block_step_module.int4_gemv
    monkeypatch.setattr(block_step_module, "int4_gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    tokens = torch.randint(3, 400, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        fast = _logits(model, tokens)
        assert len(calls) == 4 * len(model.layers) * len(tokens)  # every block of every step took the route
        for block in model.layers:
            block.fast_path = None
        plain = _logits(model, tokens)
    rel = (fast - plain).norm(dim=-1) / plain.norm(dim=-1)
    assert float(rel.max()) < 0.03  # x rounded to int8 per 32 inputs in every matmul, 2 blocks deep
    assert float((fast.argmax(-1) == plain.argmax(-1)).float().mean()) >= 0.9


def test_the_app_gives_the_same_greedy_tokens_with_graphs_on_and_off(model_dir):
    args = [str(model_dir), "--prompt", "the quick brown", "--max_new_tokens", "40", "--temperature", "0",
            "--quant", "int4", "--dtype", "bfloat16", "--ctx", str(CTX)]
    on, off = run_app(*args), run_app(*args, "--no_graphs")
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    assert on.stdout == off.stdout and len(on.stdout.strip()) > 0


def _step_logits(model, tokens: list[int]) -> torch.Tensor:
    """Logits of each token through decode steps (a BatchStep each: what graphs capture), uncaptured."""
    cache = KVCache(model.args, CTX, torch.bfloat16, device="cuda")
    steps = DecodeSteps(model, cache, capture=False)
    return torch.stack([steps.decode(t, pos).logits[0, -1].float().clone() for pos, t in enumerate(tokens)])


def test_a_decode_step_rotates_and_stores_in_wqkvs_launch(model_dir, monkeypatch):
    """In a step, RoPE and the cache write ride in wqkv's epilogue (rope_store is not launched), and the
    logits are the ones the model's own step (RoPE with the cache write, then attention) gives."""
    engine = _engine(model_dir)
    model = engine.model
    ropes, stores = [], []
    real = block_step_module.int4_gemv
    monkeypatch.setattr(block_step_module, "int4_gemv",
                        lambda *a, **k: ropes.append(k.get("rope") is not None) or real(*a, **k))
    real_store = fused_ops.rope_store
    monkeypatch.setattr(fused_ops, "rope_store", lambda *a, **k: stores.append(1) or real_store(*a, **k))
    tokens = torch.randint(3, 400, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        fast = _step_logits(model, tokens)
        assert sum(ropes) == len(model.layers) * len(tokens) and not stores
        for block in model.layers:
            block.fast_path = None
        plain = _step_logits(model, tokens)
        assert len(stores) == len(model.layers) * len(tokens)  # the model's own step: rope_store each block
    rel = (fast - plain).norm(dim=-1) / plain.norm(dim=-1)
    assert float(rel.max()) < 0.03
    assert float((fast.argmax(-1) == plain.argmax(-1)).float().mean()) >= 0.9
