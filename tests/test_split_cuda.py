"""A split over two "GPUs" that are one ([cuda:0, cuda:0]): two rings, two copy streams, the input-moving hooks
and a KV cache per layer's device give exactly the one-device streamed model's greedy tokens and logits, in
fp16 and int4, through the model object and through the engine as --gpus 0,0 --gpu_split builds it. (Two real
GPUs: bench/multi_gpu_bench.py.)"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
from conftest import greedy
from fixtures import random_state, tiny_args
from offload_testing import PROMPT, offloaded
from tiny_model import GREEDY, make_tiny_model_dir

from engine.build import build_engine
from engine.config import DeviceSpec, RunConfig
from llama.sampling import Sampler
from offload.policy import OffloadConfig
from offload.quant_mode import QuantMode
from offload.split_run import SplitOffloadedModel

pytestmark = [pytest.mark.cuda]

STEPS = 48
CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def closing() -> Iterator[list]:
    models: list = []
    yield models
    for m in models:
        m.close()


def gpu_config(**kw: object) -> OffloadConfig:
    return OffloadConfig(**{"dtype": torch.float16, "device": CUDA0, "verbose": False, "max_seq_len": 128,
                            "exclusions": frozenset(), **kw})


@pytest.mark.parametrize("quant", [None, QuantMode.INT4], ids=["fp16", "int4"])
@pytest.mark.parametrize("split", [(2, 4), (5, 1), None])
def test_split_on_one_gpu_matches_one_device(quant: QuantMode | None, split: tuple[int, int] | None,
                                             closing: list) -> None:
    args = tiny_args(n_layers=6, dim=128, n_heads=4, ffn_dim=256)
    state = random_state(args, seed=8)
    one_model, one = offloaded(args, state, gpu_config(quant=quant))
    closing.append(one)
    ref = greedy(one_model, PROMPT, STEPS, "cuda", torch.float16)
    model, off = offloaded(args, state, gpu_config(quant=quant, devices=(CUDA0, CUDA0), split=split))
    closing.append(off)
    assert isinstance(off, SplitOffloadedModel) and len(off.streams) == 2 and off.store.pinned
    assert off.streams[0].transfer.stream != off.streams[1].transfer.stream  # a copy stream per device
    tokens, logits = greedy(model, PROMPT, STEPS, "cuda", torch.float16, cache_devices=off.block_devices)
    assert tokens == ref[0] and torch.equal(logits, ref[1])


@pytest.mark.parametrize("quant", [None, QuantMode.INT4], ids=["fp16", "int4"])
def test_engine_with_gpus_0_0_replies_as_one_gpu(tmp_path, quant: QuantMode | None) -> None:
    model_dir = make_tiny_model_dir(tmp_path, ffn_dim=256)
    base = RunConfig(model_dir=model_dir, device=DeviceSpec("auto"), dtype="float16", ctx=256, sampling=GREEDY,
                     use_offload=True, offload_exclusion=frozenset(), quant=quant)
    replies = []
    # Exclusions without budgets are taken literally: every block streams, on one device and on both.
    for cfg in (base, replace(base, gpus=(0, 0))):
        engine = build_engine(cfg)
        prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog", bos=True)
        replies.append(engine.generator.generate(prompt, Sampler(GREEDY), 24, stop_ids=set()).token_ids)
        if cfg.gpus:
            assert isinstance(engine.offloaded, SplitOffloadedModel)
            assert [k.device for k in engine.kv.keys] == list(engine.offloaded.block_devices)
        engine.offloaded.close()
    assert replies[0] == replies[1]
