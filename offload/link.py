"""Measuring the host-to-device link: the figure every streaming speed is reported against."""
from __future__ import annotations

import statistics

import torch

from offload.host import page_aligned_empty, pin_buffer, tensor_nbytes

LINK_PROBE_BYTES = 256 * 2**20


def measure_link_gbps(src: torch.Tensor, device: torch.device, repeats: int = 5) -> float:
    """Host-to-device bandwidth copying `src` (uint8, CPU), median of timed copies, in GB/s."""
    dst = torch.empty_like(src, device=device)
    dst.copy_(src, non_blocking=True)  # warm-up
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return tensor_nbytes(src) / statistics.median(times) / 1e9


def probe_link_gbps(device: torch.device, pin: bool, nbytes: int = LINK_PROBE_BYTES, repeats: int = 5) -> float:
    """The link's bandwidth from (pinned, if `pin` and possible) host memory, with a probe buffer."""
    probe = page_aligned_empty(nbytes)
    pinned = pin and pin_buffer(probe) == 0
    try:
        return measure_link_gbps(probe, device, repeats)
    finally:
        if pinned:
            torch.cuda.cudart().cudaHostUnregister(probe.data_ptr())
