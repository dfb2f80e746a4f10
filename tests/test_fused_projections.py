"""q/k/v and gate/up stacked into one matmul each (engine/fused_projections.py, offload/kernels/stacked.py):
the same logits and greedy tokens as the separate projections, for plain, int8 and int4 layers."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import greedy
from fixtures import random_state, tiny_args
from torch import nn

from engine.fused_projections import fuse_projections
from llama.model import Transformer
from offload.kernels.int4_format import quantize_int4
from offload.kernels.linear import Int4Linear, Int8Linear, quantize_linears
from offload.kernels.permuted_linear import PermutedInt4Linear
from offload.kernels.stacked import stack_linears
from offload.quant_mode import QuantMode

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]


def _model(arch: str, quant: QuantMode | None = None) -> Transformer:
    args = tiny_args(arch, ffn_dim=256)  # 256-wide FFN: int4's groups divide every layer
    model = Transformer(args)
    model.load_state_dict(random_state(args, seed=11), strict=False)
    if quant is not None:
        quantize_linears(model.layers, quant, progress=False)
    return model.eval()


@pytest.mark.parametrize("quant", [None, QuantMode.INT8, QuantMode.INT4])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_fused_model_gives_the_same_logits_and_greedy_tokens(arch, quant):
    model = _model(arch, quant)
    fused = copy.deepcopy(model)
    assert fuse_projections(fused) == 2 * model.args.n_layers
    block = fused.layers[0]
    assert not hasattr(block.attention, "wq") and not hasattr(block.feed_forward, "w1")
    assert type(block.attention.wqkv) is type(model.layers[0].attention.wq)
    expected, expected_logits = greedy(model, PROMPT, 16)
    tokens, logits = greedy(fused, PROMPT, 16)
    assert tokens == expected
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)


def test_stacked_bias_and_rows_are_in_order():
    gen = torch.Generator().manual_seed(0)
    layers = [nn.Linear(8, n, bias=True) for n in (4, 2, 2)]
    x = torch.randn(3, 8, generator=gen)
    stacked = stack_linears(layers)
    torch.testing.assert_close(stacked(x), torch.cat([m(x) for m in layers], dim=-1))


def test_layers_that_cannot_be_stacked_are_left_alone():
    gen = torch.Generator().manual_seed(0)
    plain, wide = nn.Linear(8, 4), nn.Linear(16, 4)
    int8 = Int8Linear.from_linear(nn.Linear(8, 4))
    int4 = Int4Linear.from_linear(nn.Linear(64, 8), group_size=32)
    other_groups = Int4Linear.from_linear(nn.Linear(64, 8), group_size=16)
    permuted = PermutedInt4Linear(quantize_int4(torch.randn(8, 64, generator=gen), 32), torch.randperm(64), None)
    assert stack_linears([plain, int8]) is None  # two kinds
    assert stack_linears([plain, wide]) is None  # two input widths
    assert stack_linears([plain, nn.Linear(8, 4, bias=False)]) is None  # a bias on one only
    assert stack_linears([int4, other_groups]) is None  # two group sizes
    assert stack_linears([permuted, permuted]) is None  # GPTQ's column order is a state of its own
    assert isinstance(stack_linears([int4, int4]), Int4Linear)
