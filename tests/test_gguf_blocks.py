"""GGUF's Q8_0 / Q4_0 / Q4_1 blocks in our int8 / int4 formats: the same values as gguf's own dequantizer,
multiplied by our kernels (CPU here, CUDA in test_gguf_cuda.py) within their tolerances."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from offload.kernels.gguf_blocks import CONVERTERS
from offload.kernels.matmul import int4_matmul, int8_matmul

gguf = pytest.importorskip("gguf")


def _weight(n: int = 48, k: int = 256, seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) / 16
    w[3, 32:64] = 0.25  # a constant block: Q4_1 writes d = 0 there
    return w


@pytest.mark.parametrize("kind", sorted(CONVERTERS))
def test_blocks_convert_to_ggufs_own_values(kind):
    qtype = gguf.GGMLQuantizationType[kind]
    raw = gguf.quants.quantize(_weight(), qtype)
    reference = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    ours = CONVERTERS[kind](torch.from_numpy(raw), 48, 256)
    assert ours.group_size == 32 and ours.in_features == 256 and ours.out_features == 48
    torch.testing.assert_close(ours.dequantize(), reference, atol=1e-7, rtol=1e-6)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    matmul = int8_matmul if kind == "Q8_0" else int4_matmul
    torch.testing.assert_close(matmul(x, ours), x @ reference.T, atol=1e-4, rtol=1e-4)


def test_wrong_sized_data_is_refused():
    raw = torch.from_numpy(gguf.quants.quantize(_weight(), gguf.GGMLQuantizationType.Q4_0))
    with pytest.raises(ValueError, match=r"Q4_0 data \(48, 144\) does not hold a \[48, 512\] weight"):
        CONVERTERS["Q4_0"](raw, 48, 512)
