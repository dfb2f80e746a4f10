"""GGUF's Q8_0 / Q4_0 / Q4_1 blocks in our int8 / int4 formats: the same values as gguf's own dequantizer,
multiplied by our kernels (CPU here, CUDA in test_gguf_cuda.py) within their tolerances."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from offload.kernels import cpu_extension
from offload.kernels.decode_block import int8_rounded_activations
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
    ext = cpu_extension()
    rounds = kind != "Q8_0" and ext is not None and ext.int4_rounds_activations(256, 32, 3)
    xr = int8_rounded_activations(x) if rounds else x  # the avx512_vnni path's int8 rounding of x
    torch.testing.assert_close(matmul(x, ours), xr @ reference.T, atol=1e-4, rtol=1e-4)


def test_wrong_sized_data_is_refused():
    raw = torch.from_numpy(gguf.quants.quantize(_weight(), gguf.GGMLQuantizationType.Q4_0))
    with pytest.raises(ValueError, match=r"Q4_0 data \(48, 144\) does not hold a \[48, 512\] weight"):
        CONVERTERS["Q4_0"](raw, 48, 512)


def _random_blocks(rows: int, groups: int, kind: str, seed: int) -> torch.Tensor:
    """uint8 [rows, groups * block bytes] of random blocks whose fp16 fields are finite (zeros, signed zeros and
    subnormals among them); for odd seeds a view whose rows are further apart than their bytes."""
    from offload.kernels.gguf_blocks import BLOCK_BYTES

    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows, groups, BLOCK_BYTES[kind]), dtype=np.uint8)
    n_fields = 2 if kind == "Q4_1" else 1
    halves = rng.standard_normal((rows, groups, n_fields)).astype(np.float16)
    halves[rng.random(halves.shape) < 0.1] = 0.0
    halves[rng.random(halves.shape) < 0.05] = -0.0
    halves[rng.random(halves.shape) < 0.05] = np.float16(3e-7)  # subnormal
    data[..., : 2 * n_fields] = halves.view(np.uint8).reshape(rows, groups, 2 * n_fields)
    raw = torch.from_numpy(data.reshape(rows, -1))
    if seed % 2 == 0:
        return raw
    wide = torch.zeros(rows, raw.shape[1] + 6, dtype=torch.uint8)
    wide[:, : raw.shape[1]] = raw
    return wide[:, : raw.shape[1]]  # (rows, bytes), row stride bytes + 6


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("kind", sorted(CONVERTERS))
@pytest.mark.parametrize("seed", [0, 1])
def test_compiled_converter_equals_the_torch_twin_bit_for_bit(kind, seed):
    from offload.kernels.cpu_ext import cpu_extension
    from offload.kernels.gguf_blocks import REFERENCES

    if cpu_extension() is None:
        pytest.skip("the CPU extension cannot be built here")
    rows, groups = 70, 12
    raw = _random_blocks(rows, groups, kind, seed)
    ours, reference = CONVERTERS[kind](raw, rows, groups * 32), REFERENCES[kind](raw, rows, groups * 32)
    assert type(ours) is type(reference)
    for name, t in reference.tensors().items():
        got = ours.tensors()[name]
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(_bits(got), _bits(t)), f"{kind} {name} differs"


@pytest.mark.parametrize("kind", sorted(CONVERTERS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("compiled", [True, False])
def test_converting_into_given_tensors_rounds_as_to_does(kind, dtype, compiled, monkeypatch):
    # What streaming stores: the blocks converted, then every float cast to the run's dtype.
    from offload.kernels import gguf_blocks
    from offload.kernels.gguf_blocks import REFERENCES

    if not compiled:
        monkeypatch.setattr(gguf_blocks, "cpu_extension", lambda: None)
    elif gguf_blocks.cpu_extension() is None:
        pytest.skip("the CPU extension cannot be built here")
    rows, groups = 40, 6
    raw = _random_blocks(rows, groups, kind, seed=3)
    reference = REFERENCES[kind](raw, rows, groups * 32)
    into = type(reference).from_tensors({n: torch.full_like(t, 77, dtype=dtype if t.is_floating_point() else t.dtype)
                                         for n, t in reference.tensors().items()})
    ours = CONVERTERS[kind](raw, rows, groups * 32, into=into)
    assert ours is into
    for name, t in reference.tensors().items():
        expected = t.to(dtype) if t.is_floating_point() else t
        assert torch.equal(_bits(ours.tensors()[name]), _bits(expected)), f"{kind} {name} {dtype}"
