"""Streamed blocks at run time: device slots, and module hooks that bind a block's tensors to its slot.

A block's forward pre-hook acquires its slot from the schedule and points the block's streamed
parameters and buffers at views of that slot (dictionary assignments, no copies); its forward hook
releases the slot. The model itself is untouched: it runs its normal forward.

The host must run ahead of the GPU so that copies are queued before the link goes idle. cuDNN's
attention blocks the host until the GPU catches up (1.5 ms a call measured on an H100 while streaming,
77 us when resident), so while streaming is attached scaled_dot_product_attention uses its other
CUDA backends (flash, memory-efficient). The switch is process-wide, so it is counted: the user's setting
comes back when the last streaming model detaches or is garbage-collected, whatever the order.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from offload.host import HostStore, TensorEntry, merge_runs
from offload.scheduler import CudaTransfer, RingSchedule, SequentialSchedule, SyncTransfer


def set_tensor(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Point the parameter or buffer `name` (dotted, relative to root) at `tensor`, keeping its kind (a
    Parameter given is used as it is: a tied weight stays one object)."""
    path, _, leaf = name.rpartition(".")
    module = root.get_submodule(path)
    if leaf in module._parameters:
        param = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)
        module._parameters[leaf] = param
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:
        raise KeyError(f"{type(root).__name__} has no parameter or buffer {name!r}")


def is_parameter(root: nn.Module, name: str) -> bool:
    """Whether `name` (dotted, relative to root) is a parameter (else a buffer: a format's own tensors)."""
    path, _, leaf = name.rpartition(".")
    return leaf in root.get_submodule(path)._parameters


class _CudnnAttentionOff:
    """Process-wide count of streaming models that need cuDNN attention off; the first saves the setting."""

    holders = 0
    saved = True

    @classmethod
    def hold(cls) -> None:
        if cls.holders == 0:
            cls.saved = torch.backends.cuda.cudnn_sdp_enabled()
            torch.backends.cuda.enable_cudnn_sdp(False)
        cls.holders += 1

    @classmethod
    def drop(cls) -> None:
        cls.holders -= 1
        if cls.holders == 0:
            torch.backends.cuda.enable_cudnn_sdp(cls.saved)


@dataclass(frozen=True)
class _Binding:
    table: dict[str, torch.Tensor | None]  # the module's _parameters or _buffers
    key: str
    value: torch.Tensor


def _binding(root: nn.Module, name: str, tensor: torch.Tensor) -> _Binding:
    path, _, leaf = name.rpartition(".")
    module = root.get_submodule(path)
    if leaf in module._parameters:
        return _Binding(module._parameters, leaf, nn.Parameter(tensor, requires_grad=False))
    return _Binding(module._buffers, leaf, tensor)


class StreamedBlocks:
    """Streams the listed tensors of some blocks from a HostStore through a ring of device slots.

    streamed: block index -> names of that block's tensors (entries of the store) that stream.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        store: HostStore,
        streamed: Mapping[int, Sequence[str]],
        n_slots: int,
        device: torch.device,
        sequential: bool = False,
    ) -> None:
        self.store = store
        self.device = device
        order = sorted(streamed)
        # Per block: the home byte ranges to copy and where each lands in a slot (ranges packed in order).
        runs: dict[int, list[tuple[int, int, int]]] = {}  # block -> (home offset, slot offset, nbytes)
        slot_offsets: dict[int, dict[str, int]] = {}
        for b in order:
            entries = [store.entries(b)[n] for n in streamed[b]]
            runs[b], slot_offsets[b] = _pack(entries)
        self.slot_bytes = max(sum(n for _, _, n in r) for r in runs.values())
        self.n_slots = 1 if sequential else min(n_slots, len(order))
        self.slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=device) for _ in range(self.n_slots)]
        # Copy pairs and bindings per (block, slot), made once: the hot path only assigns and copies.
        self._copies = {
            (b, s): [
                (self.slots[s][dst : dst + n], store.buffer(b)[src : src + n]) for src, dst, n in runs[b]
            ]
            for b in order
            for s in range(self.n_slots)
        }
        self._bindings = {
            (b, s): [
                _binding(blocks[b], name, store.entries(b)[name].view(self.slots[s], slot_offsets[b][name]))
                for name in streamed[b]
            ]
            for b in order
            for s in range(self.n_slots)
        }
        self.bytes_per_pass = sum(sum(n for _, _, n in runs[b]) for b in order)
        if device.type == "cuda":
            self.transfer: CudaTransfer | SyncTransfer = CudaTransfer(self._copy, self.n_slots, device)
        else:
            self.transfer = SyncTransfer(self._copy)
        self.schedule: RingSchedule | SequentialSchedule = (
            SequentialSchedule(self.transfer) if sequential else RingSchedule(order, self.n_slots, self.transfer)
        )
        self._blocks = blocks
        self._streamed = streamed
        # detach() drops the hold; a model never detached drops it when it is collected
        self._cudnn_hold = weakref.finalize(self, _CudnnAttentionOff.drop) if device.type == "cuda" else None
        if self._cudnn_hold is not None:
            _CudnnAttentionOff.hold()
        self._hooks: list[RemovableHandle] = []
        for b in order:
            self._hooks.append(blocks[b].register_forward_pre_hook(self._pre_hook(b)))
            self._hooks.append(blocks[b].register_forward_hook(self._post_hook(b)))

    def _copy(self, block: int, slot: int) -> None:
        for dst, src in self._copies[(block, slot)]:
            dst.copy_(src, non_blocking=True)

    def _pre_hook(self, block: int) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            slot = self.schedule.acquire(block)
            for b in self._bindings[(block, slot)]:
                b.table[b.key] = b.value

        return hook

    def _post_hook(self, block: int) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.schedule.release(block)

        return hook

    def detach(self) -> None:
        """Remove the hooks, wait for copies in flight, point streamed tensors back at their home buffers."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self._cudnn_hold is not None:
            self._cudnn_hold()  # runs once: a second detach, or the collection after it, does nothing
        for b, names in self._streamed.items():
            for name in names:
                set_tensor(self._blocks[b], name, self.store.view(b, name))
        self._copies.clear()
        self._bindings.clear()
        self.slots.clear()


def _pack(entries: Sequence[TensorEntry]) -> tuple[list[tuple[int, int, int]], dict[str, int]]:
    """Copy ranges (home offset, slot offset, nbytes) for the entries, and each entry's slot offset."""
    runs: list[tuple[int, int, int]] = []
    dst = 0
    for src, n in merge_runs(entries):
        runs.append((src, dst, n))
        dst += n
    offsets = {}
    for e in entries:
        src, slot_start, _ = next(r for r in runs if r[0] <= e.offset < r[0] + r[2])
        offsets[e.name] = slot_start + e.offset - src
    return runs, offsets
