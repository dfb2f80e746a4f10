"""--quant int4 on widths that are not multiples of 128: groups of 64 or 32 per matrix, recorded, said once."""
from __future__ import annotations

import torch
from cli_runner import CPU_GREEDY, run_app
from tiny_model import make_tiny_model_dir

from llama.loader import load_model
from offload.kernels.int4_format import int4_group_size, quantize_int4
from offload.kernels.linear import Int4Linear, quantize_linears
from offload.quant_mode import QuantMode


def test_group_size_per_width():
    assert [int4_group_size(k) for k in (4096, 576, 160, 64, 11008, 1344)] == [128, 64, 32, 64, 128, 64]


def test_a_576_wide_matrix_quantizes_with_groups_of_64():
    w = torch.randn(32, 576, generator=torch.Generator().manual_seed(0))
    q = quantize_int4(w)
    assert q.group_size == 64 and q.scales.shape == (32, 9)
    assert float((q.dequantize() - w).norm() / w.norm()) < 0.15


def test_quant_int4_runs_saves_and_reloads_a_192_wide_model(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path, dim=192, ffn_dim=160)
    model = quantize_linears(load_model(model_dir).layers, QuantMode.INT4, progress=False)
    groups = {(m.in_features, m.weight_format().group_size) for m in model.modules() if isinstance(m, Int4Linear)}
    assert groups == {(192, 64), (160, 32)}

    r = run_app(str(model_dir), "--quant", "int4", "--prompt", "hello", "--max_new_tokens", "4", *CPU_GREEDY)
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if line.startswith("note: int4")]
    assert sorted(notes) == [
        "note: int4: 160 inputs are not a multiple of 128; such matrices use groups of 32",
        "note: int4: 192 inputs are not a multiple of 128; such matrices use groups of 64",
    ]
    saved = tmp_path / "saved"
    assert run_app(str(model_dir), "--quant", "int4", "--save_quantized", str(saved), *CPU_GREEDY).returncode == 0
    again = run_app(str(saved), "--prompt", "hello", "--max_new_tokens", "4", *CPU_GREEDY)
    assert again.returncode == 0 and again.stdout == r.stdout, again.stderr
