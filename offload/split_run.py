"""A model split across devices at run time (the plan from offload/split.py).

Each device's streamed blocks go through its own StreamedBlocks (its copy stream, its ring, slots in its
memory) from the one shared pinned HostStore. The hidden state, with the per-forward tensors the blocks take
(the RoPE rotation, a mask), moves to the next device once per range: a forward pre-hook on the range's first
block moves the block's tensor inputs there (a peer copy where the GPUs allow one). The model runs its own
forward, untouched; each block's KV cache must be on its block's device:

    off = apply_split_offload(layout, footprint, weights, OffloadConfig(devices=(cuda0, cuda1), ...))
    cache = KVCache(args, ctx, dtype, off.block_devices)   # logits come from the last device
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from offload.host import HostStore
from offload.layout import ModelLayout
from offload.link import probe_link_gbps
from offload.placement import fill_model, resolve_device
from offload.policy import Footprint, OffloadConfig, default_budget
from offload.split import Card, SplitPlan, plan_split
from offload.streaming import StreamedBlocks


class SplitOffloadedModel:
    """A model whose blocks are split across devices; holds what must outlive the load."""

    def __init__(self, layout: ModelLayout, store: HostStore, plan: SplitPlan, config: OffloadConfig) -> None:
        self.layout = layout
        self.store = store
        self.plan = plan
        self.config = config
        self.device = plan.cards[0].card.device  # where the token embedding's rows arrive
        self.block_devices = plan.block_devices
        self.streams: list[StreamedBlocks] = []
        for c in plan.cards:
            streamed = {b: list(store.entries(b)) for b in c.blocks if b in store.blocks}
            if streamed:
                self.streams.append(StreamedBlocks(layout.blocks, store, streamed, c.plan.n_slots, c.card.device,
                                                   config.sequential))
        self._hooks = [layout.blocks[c.first].register_forward_pre_hook(inputs_to(c.card.device))
                       for c in plan.cards[1:]]

    @property
    def streamed_bytes(self) -> int:
        """Bytes that cross the links per forward pass, all devices together."""
        return sum(s.bytes_per_pass for s in self.streams)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for s in reversed(self.streams):  # the last to attach restores the attention setting the first found
            s.detach()
        self.streams.clear()
        self.store.close()


def inputs_to(device: torch.device) -> Callable[[nn.Module, tuple], tuple]:
    """A forward pre-hook that moves a module's tensor arguments (tuples of them too) to `device`."""
    def hook(module: nn.Module, args: tuple) -> tuple:
        return tuple(moved(a, device) for a in args)

    return hook


def moved(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in it (nested in tuples) on `device`; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, tuple):
        return tuple(moved(v, device) for v in value)
    return value


def split_devices(config: OffloadConfig) -> tuple[torch.device, ...]:
    """config.devices, each with its index (NoGpu for a CUDA one on a machine without CUDA)."""
    return tuple(resolve_device(d) for d in config.devices)


def apply_split_offload(
    layout: ModelLayout,
    footprint: Footprint,
    weights: Iterable[tuple[str, torch.Tensor]],
    config: OffloadConfig,
    release: Callable[[str], None] | None = None,
) -> SplitOffloadedModel:
    """apply_offload over config.devices: each device's link measured, the split planned within their budgets
    (a device listed n times gets 1/n of its free memory by default), the plan printed, then every weight
    placed on its block's device or in the shared host store."""
    devices = split_devices(config)
    links = {d: probe_link_gbps(d, config.pin) for d in set(devices) if d.type == "cuda"}
    given = config.device_budgets is not None
    if config.device_budgets is not None:
        budgets: tuple[int | None, ...] = config.device_budgets
    else:
        budgets = tuple(default_budget(d) // devices.count(d) if d.type == "cuda" else None for d in devices)
    cards = [Card(d, b, links.get(d)) for d, b in zip(devices, budgets)]
    plan = plan_split(footprint, cards, config.n_slots, config.exclusions, given, config.split)
    if config.verbose:
        print(plan.describe(), file=sys.stderr)
    store = fill_model(layout, plan, weights, config, plan.block_devices, release)
    return SplitOffloadedModel(layout, store, plan, config)
