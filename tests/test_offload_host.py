"""Home buffers: layout, copy ranges, and host memory use while filling from a reader."""
from __future__ import annotations

import gc

import psutil
import pytest
import torch

from engine.llama_offload import offload_transformer
from llama.config import ModelArgs
from llama.model import Transformer
from offload import host
from offload.host import ALIGN, FillMethod, HostStore, lay_out, merge_runs
from offload.policy import OffloadConfig


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "attention.wq.weight": torch.randn(33, 7, generator=g).half(),
        "attention.wq.qweight": torch.randint(-127, 127, (5, 3), generator=g, dtype=torch.int8),
        "feed_forward.w1.scales": torch.randn(13, generator=g),
        "feed_forward.w1.packed": torch.randint(0, 255, (9, 2), generator=g, dtype=torch.uint8),
    }


def test_layout_is_aligned_and_views_round_trip() -> None:
    tensors = mixed_tensors()
    store = HostStore(pin=False)
    store.add_block(3, tensors)
    entries = store.entries(3)
    assert all(e.offset % ALIGN == 0 for e in entries.values())
    assert list(entries) == list(tensors)  # packed in the given order
    for name, t in tensors.items():
        v = store.view(3, name)
        assert v.dtype == t.dtype and v.shape == t.shape and torch.equal(v, t)
        assert v.data_ptr() - store.buffer(3).data_ptr() == entries[name].offset  # a view, not a copy
    assert store.blocks == [3] and not store.pinned
    store.close()
    assert store.blocks == []


@pytest.mark.parametrize("fill", [FillMethod(threads=4), FillMethod(pin_after_fill=True, threads=3)])
def test_threaded_fill_gives_the_same_bytes(fill: FillMethod, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "COPY_CHUNK", 20)  # cut even these tiny tensors into many pieces
    tensors = mixed_tensors() | {"feed_forward.w2.weight": torch.randn(37, 11)}
    plain, threaded = HostStore(pin=False), HostStore(pin=False, fill=fill)
    plain.add_block(0, tensors)
    threaded.add_block(0, tensors)
    assert plain.entries(0) == threaded.entries(0)
    for name, t in tensors.items():
        assert torch.equal(threaded.view(0, name), t)
    plain.close()
    threaded.close()


def test_contiguous_units_merge_into_one_copy() -> None:
    shapes = {f"{m}.weight": (64, 48) for m in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                                                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}
    entries, size = lay_out((n, torch.empty(s, dtype=torch.float16)) for n, s in shapes.items())
    assert merge_runs(entries.values()) == [(0, size)]
    attention = [e for n, e in entries.items() if n.startswith("attention")]
    ffn = [e for n, e in entries.items() if n.startswith("feed_forward")]
    assert len(merge_runs(attention)) == 1 and len(merge_runs(ffn)) == 1
    assert len(merge_runs([entries["attention.wq.weight"], entries["attention.wo.weight"]])) == 2


def test_a_block_buffer_filled_in_place_is_kept_without_a_copy() -> None:
    tensors = mixed_tensors()
    entries, size = lay_out(tensors.items())
    buffer = host.block_buffer(size)
    for name, t in tensors.items():
        entries[name].view(buffer).copy_(t)
    in_place = {name: entries[name].view(buffer) for name in tensors}
    store = HostStore(pin=False)
    store.add_block(0, in_place)
    assert store.buffer(0).data_ptr() == buffer.data_ptr() and store.entries(0) == entries
    reordered = dict(reversed(list(in_place.items())))  # another layout than the buffer's: copied
    store.add_block(1, reordered)
    assert store.buffer(1).data_ptr() != buffer.data_ptr()
    plain = dict(tensors)  # views of no block buffer: copied
    store.add_block(2, plain)
    for b, source in ((0, tensors), (1, reordered), (2, plain)):
        assert all(torch.equal(store.view(b, n), t) for n, t in source.items())
    store.close()


def test_filling_from_a_reader_keeps_one_copy_in_ram() -> None:
    # About 110 MB of fp32 weights, made one tensor at a time by the "reader": the host store should be
    # the only copy that stays (RSS growth < 1.15x the weights). On the CPU device the slots, which
    # would be GPU memory, are host memory too: they are not counted.
    args = ModelArgs(dim=512, n_layers=8, n_heads=8, vocab_size=1000, ffn_dim=1536, max_seq_len=64)
    shapes = args.weight_shapes()
    total = sum(torch.Size(s).numel() for s in shapes.values()) * 4

    def reader():
        g = torch.Generator().manual_seed(0)
        for name, shape in shapes.items():
            yield name, torch.randn(shape, generator=g)

    with torch.device("meta"):
        model = Transformer(args)
    gc.collect()
    before = psutil.Process().memory_info().rss
    offloaded = offload_transformer(
        model, reader(), OffloadConfig(dtype=torch.float32, device=torch.device("cpu"), exclusions=frozenset(), verbose=False)
    )
    gc.collect()
    assert offloaded.streaming is not None
    slots = offloaded.streaming.n_slots * offloaded.streaming.slot_bytes
    grown = psutil.Process().memory_info().rss - before - slots
    assert offloaded.store.nbytes > 0.9 * total
    assert grown < 1.15 * total, (grown / total)
