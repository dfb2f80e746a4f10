"""QuantizedLinear modules and the quantize_linears pass: outputs, state round trips, rebinding, devices."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from offload.errors import FormatError
from offload.kernels.decode_block import int8_rounded_activations
from offload.kernels.int4_gemv_cuda import int4_gemv_library
from offload.quant_mode import QuantMode
from offload.kernels import (
    Int4CudaWeight,
    Int4Linear,
    Int4Weight,
    Int8Linear,
    Int8Weight,
    QuantizedLinear,
    cpu_extension,
    prepare_linears_for_cuda,
    quantize_linears,
    quantized_linear_from_tensors,
)

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 6e-3}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


class Block(nn.Module):
    """Two levels of nesting, biased and unbiased linears, and a non-linear submodule."""

    def __init__(self, dim: int = 128, hidden: int = 256) -> None:
        super().__init__()
        self.attention = nn.ModuleDict({"wq": nn.Linear(dim, dim, bias=True), "wo": nn.Linear(dim, dim, bias=False)})
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention["wo"](self.attention["wq"](self.norm(x)))
        return h + self.w2(F.silu(self.w1(h)))


def make_layer(cls: type[QuantizedLinear], linear: nn.Linear) -> QuantizedLinear:
    return cls.from_linear(linear) if cls is Int8Linear else cls.from_linear(linear, group_size=64)


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantized_linear_matches_reference(cls: type[QuantizedLinear], dtype: torch.dtype) -> None:
    linear = nn.Linear(192, 67, bias=True)
    layer = make_layer(cls, linear)
    x = torch.randn(2, 3, 192).to(dtype)
    w = layer.weight_format().dequantize()
    ext = cpu_extension()
    rounds = cls is Int4Linear and ext is not None and ext.int4_rounds_activations(192, 64, 6)
    xr = int8_rounded_activations(x.float().flatten(0, 1)).view(2, 3, 192) if rounds else x.float()  # vnni's x
    ref = F.linear(xr, w, linear.bias.detach())
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 3, 67)
    assert rel_err(y, ref) < TOL[dtype]
    # and close to the unquantized layer: the per-format quality bounds
    assert rel_err(y, linear(x.float()).detach()) < (0.02 if cls is Int8Linear else 0.15)


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_state_round_trip(cls: type[QuantizedLinear]) -> None:
    layer = make_layer(cls, nn.Linear(128, 40, bias=True))
    x = torch.randn(3, 128)
    state = {n: t.clone() for n, t in layer.state_dict().items()}
    assert set(state) == set(layer.weight_format().tensors()) | {"bias"}
    rebuilt = quantized_linear_from_tensors(state)
    assert type(rebuilt) is cls
    assert torch.equal(rebuilt(x), layer(x))
    fmt = layer.weight_format()
    assert torch.equal(type(fmt).from_tensors(fmt.tensors()).dequantize(), fmt.dequantize())
    with pytest.raises(FormatError, match="matches no known format"):
        quantized_linear_from_tensors({"weight": torch.zeros(2, 2)})


def test_forward_uses_whatever_tensors_are_bound() -> None:
    """The engine rebinds buffers to views of its slots: forward must read the bound tensors."""
    layer = Int8Linear.from_linear(nn.Linear(64, 16, bias=False))
    x = torch.randn(2, 64)
    before = layer(x)
    pool = torch.empty(layer.qweight.numel() + 4 * 16, dtype=torch.uint8)
    qview = pool[: layer.qweight.numel()].view(torch.int8).view(16, 64)
    sview = pool[layer.qweight.numel():].view(torch.float32)
    qview.copy_(layer.qweight)
    sview.copy_(layer.scale)
    layer.qweight, layer.scale = qview, sview
    assert torch.equal(layer(x), before)
    sview.mul_(2)  # the slot's contents change: so does the output
    assert torch.allclose(layer(x), 2 * before)


def test_quantize_linears_swaps_named_layers_in_place() -> None:
    block = Block()
    x = torch.randn(2, 5, 128)
    ref = block(x).detach()
    out = quantize_linears(block, QuantMode.INT8, names=["attention.wq", "w2"], progress=False)
    assert out is block
    assert isinstance(block.attention["wq"], Int8Linear) and isinstance(block.w2, Int8Linear)
    assert type(block.attention["wo"]) is nn.Linear and type(block.w1) is nn.Linear
    assert block.attention["wq"].bias is not None and block.w2.bias is None
    assert rel_err(block(x), ref) < 0.02
    quantize_linears(block, QuantMode.INT4, progress=False)  # the rest; already-quantized layers are not Linears
    assert isinstance(block.w1, Int4Linear) and isinstance(block.attention["wo"], Int4Linear)
    assert isinstance(block.w2, Int8Linear)
    assert rel_err(block(x), ref) < 0.15


def test_quantize_linears_rejects_unknown_names_and_modes() -> None:
    with pytest.raises(KeyError, match="no nn.Linear named feed_forward.w9"):
        quantize_linears(Block(), QuantMode.INT8, names=["feed_forward.w9"], progress=False)
    with pytest.raises(ValueError, match="'int3' is not a valid QuantMode"):
        QuantMode("int3")


def test_quantize_linears_on_meta_gives_real_shapes() -> None:
    """The VRAM planner quantizes a meta copy of a block to learn its byte sizes."""
    block = Block().to("meta")
    quantize_linears(block, QuantMode.INT4, progress=False)
    assert block.w1.packed.shape == (256, 64) and block.w1.scales.shape == (256, 1)
    assert block.w2.packed.shape == (128, 128) and block.w2.scales.shape == (128, 2)
    assert block.w1.packed.device.type == "meta"


def test_bnb_mode_wraps_bitsandbytes_int8() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    block = Block().half()
    x = torch.randn(3, 128, dtype=torch.float16)
    ref = block(x).detach()
    quantize_linears(block, QuantMode.BNB, names=["w1", "w2"], progress=False)
    assert isinstance(block.w1, bnb.nn.Linear8bitLt) and block.w1.weight.dtype == torch.int8
    assert rel_err(block(x).detach(), ref) < 0.02
    quantize_linears(block, QuantMode.INT8, progress=False)  # the plain linears only: not bitsandbytes' subclass
    assert isinstance(block.w1, bnb.nn.Linear8bitLt) and isinstance(block.attention["wq"], Int8Linear)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_layers_match_cpu(dtype: torch.dtype) -> None:
    block = Block(dim=128, hidden=256)
    quantize_linears(block, QuantMode.INT4, names=["w1", "w2"], progress=False, group_size=64)
    quantize_linears(block, QuantMode.INT8, progress=False)
    x = torch.randn(2, 7, 128)
    ref = block(x).detach()
    block = block.to(device="cuda", dtype=dtype)  # before preparing: tinygemm's pairs stay bfloat16
    prepare_linears_for_cuda(block)
    # our one-token kernel takes the plain layout where it builds; else tinygemm's layout
    plain = int4_gemv_library() is not None
    assert isinstance(block.w1.weight_format(), Int4Weight if plain else Int4CudaWeight)
    assert isinstance(block.attention["wq"].weight_format(), Int8Weight)
    y = block(x.to(device="cuda", dtype=dtype))
    assert y.dtype == dtype
    assert rel_err(y.cpu(), ref) < 2e-2
    # streamed: the prepared tensors moved to pinned host memory and back give the same output
    for m in (block.w1, block.w2):
        for n in m.format_names:
            setattr(m, n, getattr(m, n).cpu().pin_memory().to("cuda", non_blocking=True))
    assert torch.equal(block(x.to(device="cuda", dtype=dtype)), y)


@pytest.mark.cuda
def test_cuda_bnb_resident_layers() -> None:
    """bitsandbytes layers made on the GPU (the resident loader's path; made in host RAM they fail there)."""
    bnb = pytest.importorskip("bitsandbytes")
    block = Block().half()
    x = torch.randn(3, 128, dtype=torch.float16)
    ref = block(x).detach()
    block = block.cuda()
    quantize_linears(block, QuantMode.BNB, progress=False)
    assert isinstance(block.w1, bnb.nn.Linear8bitLt) and block.w1.weight.device.type == "cuda"
    assert block.w1.weight.dtype == torch.int8
    assert rel_err(block(x.cuda()).detach().cpu(), ref) < 0.02


def test_int4_prepare_is_a_no_op_for_unsupported_shapes() -> None:
    layer = Int4Linear.from_linear(nn.Linear(120, 67), group_size=40)  # tinygemm cannot take it
    layer.prepare_for_cuda("cpu")
    assert isinstance(layer.weight_format(), Int4Weight)
