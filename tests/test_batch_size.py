"""How many KV cache slots an engine gets: --max_batch, else what half the free memory holds (capped), and one
outside the server; a cache of many slots that cannot fit is refused naming both flags."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures import tiny_args

from engine.batch_size import DEFAULT_BATCH_CAP, batch_slots, default_max_batch
from engine.config import RunConfig
from engine.memory_check import check_kv_cache_fits, free_bytes
from llama.errors import UserError

CPU = torch.device("cpu")


def test_default_takes_half_the_room_at_most_the_cap_at_least_one():
    assert default_max_batch(slot_bytes=100, room=1000) == 5
    assert default_max_batch(slot_bytes=100, room=10**9) == DEFAULT_BATCH_CAP
    assert default_max_batch(slot_bytes=100, room=50) == 1


def test_slots_come_from_the_flag_or_the_mode():
    args, model = tiny_args(), Path("m")
    assert batch_slots(RunConfig(model_dir=model), args, 256, torch.float32, CPU) == 1  # the console
    assert batch_slots(RunConfig(model_dir=model, serve="8000", max_batch=3), args, 256, torch.float32, CPU) == 3
    served = batch_slots(RunConfig(model_dir=model, serve="8000"), args, 256, torch.float32, CPU)
    assert served == DEFAULT_BATCH_CAP  # a tiny model's slots are small beside the free RAM


def test_a_context_too_long_for_one_slot_per_sequence_names_max_batch():
    args = tiny_args()
    per_slot = args.kv_cache_bytes(1, torch.float32)  # bytes per position
    ctx = free_bytes(CPU) // per_slot // 64  # one slot takes 1/64 of the free RAM, 256 slots four times all of it
    check_kv_cache_fits(args, ctx, torch.float32, CPU, slots=1)
    with pytest.raises(UserError, match=r"--ctx .*256 sequences \(--max_batch\).*smaller --ctx or --max_batch"):
        check_kv_cache_fits(args, ctx, torch.float32, CPU, slots=256)
