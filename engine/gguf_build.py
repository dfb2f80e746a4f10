"""Loading an opened GGUF into a ready model: resident (CPU or GPU) or streamed, in the formats it arrived in.

Both paths build the model on the meta device, swap in the quantized linears the file's types call for
(engine/gguf_model.py), then fill it from the file one tensor at a time through the placement path
(engine/llama_offload.py): resident with the plan that keeps everything on the device, streamed with the
budget's plan, which stores quantized blocks as they come (8 or 4 bits in pinned RAM and over the link).
"""
from __future__ import annotations

import sys
import time
from dataclasses import replace
from typing import TextIO

import torch
from tqdm import tqdm

from engine.gguf_model import GGUFModel, iter_gguf_weights, linear_modes, quantized_shell, weight_bytes
from llama.loader import empty_model
from llama.model import Transformer
from engine.llama_offload import llama_layout, offload_transformer, resident_transformer
from engine.read_ahead import read_ahead
from offload.block_buffers import BlockBuffers
from offload.placement import OffloadedModel
from offload.split_run import SplitOffloadedModel
from offload.policy import OffloadConfig


def load_gguf_resident(model: GGUFModel, quant: str | None, dtype: torch.dtype, device: torch.device,
                       log: TextIO | None = None) -> Transformer:
    """The whole model on `device`: floats in dtype, quantized linears in their formats."""
    log = log or sys.stderr
    modes = linear_modes(model, quant, log)
    net = empty_model(model.args)
    quantized_shell(model, modes, net)
    start = time.perf_counter()
    with tqdm(total=weight_bytes(model), unit="B", unit_scale=True, desc=f"reading {model.path.name}",
              file=log) as bar:
        weights = read_ahead(iter_gguf_weights(model, modes, dtype, bar.update))  # converting overlaps placing
        resident_transformer(net, weights, OffloadConfig(dtype=dtype, device=device, verbose=False))
    print(f"read {weight_bytes(model) / 1e9:.2f} GB from {model.path.name} in {time.perf_counter() - start:.1f} s",
          file=log)
    return net


def load_gguf_offloaded(model: GGUFModel, quant: str | None, config: OffloadConfig,
                        log: TextIO | None = None) -> tuple[Transformer, OffloadedModel | SplitOffloadedModel]:
    """Blocks streamed from pinned RAM as the plan says; quantized ones in their own formats."""
    log = log or sys.stderr
    modes = linear_modes(model, quant, log)
    net = empty_model(model.args)
    quantized_shell(model, modes, net)
    # The weights arrive already in their formats, written where the host store keeps them: the offload
    # engine only places (and pins) them. Converting runs in a thread, overlapping with that.
    homes = BlockBuffers(llama_layout(net), config.dtype)
    weights = read_ahead(iter_gguf_weights(model, modes, config.dtype, home=homes.home))
    offloaded = offload_transformer(net, weights, replace(config, quant=None))
    print(f"{offloaded.store.nbytes / 1e9:.2f} GB of blocks in host RAM ({model.path.name})", file=log)
    return net, offloaded
