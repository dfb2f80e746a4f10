"""GPTQ / AWQ checkpoints loaded into our int4 format (group 32/64/128 or one per row), resident or streamed.

Each block linear's packed tensors are converted by offload/kernels/gptq_convert.py; act-order layers
become PermutedInt4Linear. q/k rows are in HF's half-split order in the file: the converted weight's rows
(outputs) are permuted to ours, which moves whole rows of packed bytes, scales and zeros.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TextIO

import torch
from torch import nn

from engine.llama_offload import offload_transformer, resident_transformer
from llama.checkpoint_gptq import GPTQConfig, PackedLayer, iter_gptq_tensors
from llama.checkpoint_hf import hf_to_meta_rows, rope_heads
from llama.config import ModelArgs
from llama.errors import UserError
from llama.loader import empty_model
from llama.model import Transformer
from offload.kernels.gptq_convert import awq_to_int4, gptq_to_int4
from offload.kernels.int4_format import Int4Weight
from offload.kernels.linear import Int4Linear
from offload.kernels.permuted_linear import PermutedInt4Linear
from offload.placement import OffloadedModel
from offload.split_run import SplitOffloadedModel
from offload.policy import OffloadConfig


def block_linears(args: ModelArgs) -> set[str]:
    """Canonical names of the block linears (what GPTQ and AWQ quantize)."""
    return {n.removesuffix(".weight") for n, s in args.weight_shapes().items()
            if n.startswith("layers.") and n.endswith(".weight") and len(s) == 2}


def convert_layer(layer: PackedLayer, config: GPTQConfig, args: ModelArgs) -> Int4Linear:
    """Our layer for one file layer, q/k rows in our order; UserError naming the file if the tensors disagree."""
    t = layer.tensors
    try:
        if config.method == "awq":
            weight, perm = awq_to_int4(t["qweight"], t["qzeros"], t["scales"]), None
        else:
            weight, perm = gptq_to_int4(t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"), config.zero_offset)
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"{layer.file}: {layer.module}: cannot read its {config.method} tensors ({e})") from None
    bias = t.get("bias")
    heads = rope_heads(f"{layer.module}.weight", args)
    if heads is not None:
        weight = Int4Weight(**{n: hf_to_meta_rows(x, heads, args.head_dim) for n, x in weight.tensors().items()})
        bias = None if bias is None else hf_to_meta_rows(bias, heads, args.head_dim)
    bias = None if bias is None else bias.float()
    return Int4Linear(weight, bias) if perm is None else PermutedInt4Linear(weight, perm, bias)


def iter_gptq_layers(model_dir: Path, args: ModelArgs, config: GPTQConfig,
                     dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor | Int4Linear]]:
    """(canonical name, float tensor in dtype) for plain tensors, (module name, layer) for the quantized ones."""
    linears = block_linears(args)
    for item in iter_gptq_tensors(model_dir, linears):
        if isinstance(item, PackedLayer):
            yield item.module, convert_layer(item, config, args)
            continue
        name, t, _ = item
        heads = rope_heads(name, args)
        if heads is not None and t.shape[0] == heads * args.head_dim:
            t = hf_to_meta_rows(t, heads, args.head_dim)
        yield name, t.to(dtype)


def _announce(config: GPTQConfig, log: TextIO | None) -> None:
    group = "one per row" if config.group_size < 0 else f"group {config.group_size}"
    print(f"{config.method.upper()} 4-bit ({group}{', act-order' if config.desc_act else ''}) read into our int4",
          file=log or sys.stderr)


def load_gptq_resident(model_dir: Path, args: ModelArgs, config: GPTQConfig, dtype: torch.dtype,
                       device: torch.device, log: TextIO | None = None) -> Transformer:
    """The whole model on `device` in our int4 (act-order layers with their permutation)."""
    _announce(config, log)
    net = empty_model(args)
    weights = shell_weights(model_dir, net, args, config, dtype)
    return resident_transformer(net, weights, OffloadConfig(dtype=dtype, device=device, verbose=False))


def load_gptq_offloaded(model_dir: Path, args: ModelArgs, config: GPTQConfig, offload: OffloadConfig,
                        log: TextIO | None = None) -> tuple[Transformer, OffloadedModel | SplitOffloadedModel]:
    """Blocks streamed in 4 bits from pinned RAM as the plan says."""
    _announce(config, log)
    net = empty_model(args)
    weights = shell_weights(model_dir, net, args, config, offload.dtype)
    offloaded = offload_transformer(net, weights, replace(offload, quant=None))
    print(f"{offloaded.store.nbytes / 1e9:.2f} GB of blocks in host RAM ({model_dir.name})", file=log or sys.stderr)
    return net, offloaded


def shell_weights(model_dir: Path, net: Transformer, args: ModelArgs, config: GPTQConfig,
                  dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Swap int4 shells of the converted layers' shapes into the meta-built `net`, and yield its tensors as each
    layer is converted: (canonical name, tensor), a layer's under `{module}.{field}`; a field whose shape is not
    the shell's is a UserError naming the directory."""
    shells = int4_shells(net, args, config)  # now, before the placement path reads the model's layout

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        for name, item in iter_gptq_layers(model_dir, args, config, dtype):
            if not isinstance(item, nn.Module):
                yield name, item
                continue
            tensors = item.state_dict()
            if "perm" in shells[name] and "perm" not in tensors:  # an act-order file's layer in plain order
                tensors["perm"] = torch.arange(item.in_features)
            for field, t in tensors.items():
                expected = shells[name].get(field)
                if expected is None or expected.shape != t.shape:
                    raise UserError(f"{model_dir}: {name}.{field} has shape {tuple(t.shape)}, not the "
                                    f"{tuple(expected.shape) if expected is not None else 'absent'} its "
                                    f"quantization_config implies")
                yield f"{name}.{field}", t

    return weights()


def int4_shells(net: Transformer, args: ModelArgs, config: GPTQConfig) -> dict[str, dict[str, torch.Tensor]]:
    """Swap each block linear of `net` (on the meta device) for the int4 layer its conversion will give:
    act-order files give PermutedInt4Linear. Returns each module's meta tensors by field."""
    shells = {}
    for module in sorted(block_linears(args)):
        base = net.get_submodule(module)
        n_out, n_in = base.out_features, base.in_features
        group = n_in if config.group_size < 0 else min(config.group_size, n_in)
        scales = torch.empty(n_out, n_in // group, dtype=torch.float16, device="meta")
        weight = Int4Weight(torch.empty(n_out, n_in // 2, dtype=torch.uint8, device="meta"), scales,
                            torch.empty_like(scales))
        perm = torch.empty(n_in, dtype=torch.long, device="meta")
        layer = PermutedInt4Linear(weight, perm, base.bias) if config.desc_act else Int4Linear(weight, base.bias)
        parent, _, child = module.rpartition(".")
        setattr(net.get_submodule(parent), child, layer)
        shells[module] = dict(layer.state_dict())
    return shells
