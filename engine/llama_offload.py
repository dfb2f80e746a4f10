"""The one place that knows both Llama's names and offload's units: a Transformer described as a ModelLayout,
and every load of one (streamed or resident) through offload's placement path.

offload/ sees a sequence of blocks with named tensors; this adapter names the submodules explicitly
(`model.layers`, each block's `attention.wq` ... `feed_forward.w3`, `tok_embeddings`, `norm`, `output`)
and gives the planner the Llama arithmetic it needs (head and KV-cache bytes, activation bytes per token).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from engine.fused_projections import fuse_block
from engine.int4_block_step import int4_block_step
from engine.llama_units import BLOCK_LINEARS
from llama.checkpoint import iter_checkpoint, read_model_args
from llama.checkpoint_files import Weight
from llama.config import ModelArgs
from llama.model import Transformer, TransformerBlock
from llama.loader import empty_model
from offload.host import tensor_nbytes
from offload.layout import ModelLayout, Part
from offload.placement import OffloadedModel, apply_offload, block_unit_bytes, place_model, resolve_device
from offload.policy import WORKSPACE_BYTES, Footprint, OffloadConfig, resident_plan
from offload.split_run import SplitOffloadedModel, apply_split_offload, split_devices

_PATH_UNITS = {path: unit for unit, path in BLOCK_LINEARS.items()}
BLOCK_PREFIX = "layers."


def unit_of(tensor_name: str) -> str | None:
    """The unit a block-relative tensor name belongs to (`attention.wq.weight` -> `wq`), or None (norms)."""
    return _PATH_UNITS.get(tensor_name.rpartition(".")[0])


def block_tensor(name: str) -> tuple[int, str] | None:
    """`layers.3.attention.wq.weight` -> (3, `attention.wq.weight`); None for a top-level tensor."""
    if not name.startswith(BLOCK_PREFIX):
        return None
    index, _, inner = name[len(BLOCK_PREFIX):].partition(".")
    return int(index), inner


def llama_layout(model: Transformer) -> ModelLayout:
    embedding = (("tok_embeddings.weight", Part.EMBEDDING),)
    if model.args.tie_embeddings:
        top_level = {"tok_embeddings.weight": (*embedding, ("output.weight", Part.HEAD))}
    else:
        top_level = {"tok_embeddings.weight": embedding, "output.weight": (("output.weight", Part.HEAD),)}
    top_level["norm.weight"] = (("norm.weight", Part.FIXED),)
    return ModelLayout(model, model.layers, tuple(BLOCK_LINEARS), unit_of, block_tensor, top_level, "tok_embeddings")


def activation_bytes(args: ModelArgs, tokens: int, dtype: torch.dtype, batch: int = 1) -> int:
    """Peak transient GPU bytes of one forward of `tokens` positions (last-position logits only)."""
    return batch * tokens * _activation_bytes_per_token(args, dtype) + batch * args.vocab_size * (
        dtype.itemsize + 4) + WORKSPACE_BYTES


def _activation_bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
    elem = dtype.itemsize
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    return 4 * args.dim * elem + 3 * q * 4 + 2 * kv * 4 + 3 * args.ffn_dim * elem  # RoPE works in float32


def llama_footprint(model: Transformer, config: OffloadConfig) -> Footprint:
    """GPU bytes of each part of the model in the configured dtype and format (from shapes, no data)."""
    args = model.args
    unit_bytes, other = block_unit_bytes(llama_layout(model), config)
    elem = config.dtype.itemsize
    rope = tensor_nbytes(model.rope_cos) + tensor_nbytes(model.rope_sin)
    return Footprint(
        n_blocks=args.n_layers,
        unit_bytes=unit_bytes,
        block_other_bytes=other,
        head_bytes=args.vocab_size * args.dim * elem,
        fixed_bytes=args.dim * elem + rope,
        kv_cache_bytes=args.kv_cache_bytes(config.max_seq_len, config.dtype, config.batch * config.kv_sequences),
        activation_bytes=activation_bytes(args, config.prefill_chunk, config.dtype, config.batch),
        prefill_tokens=config.prefill_chunk,
        activation_bytes_per_token=config.batch * _activation_bytes_per_token(args, config.dtype),
    )


def offload_transformer(
    model: Transformer, weights: Iterator[tuple[str, torch.Tensor]], config: OffloadConfig,
    release: Callable[[str], None] | None = None,
) -> OffloadedModel | SplitOffloadedModel:
    """Fill a meta-built Transformer from (canonical name, tensor) pairs through offload's placement path (its
    blocks split across config.devices when two or more are listed)."""
    place = apply_split_offload if len(config.devices) > 1 else apply_offload
    return place(llama_layout(model), llama_footprint(model, config), weights, config, release)


def resident_transformer(
    model: Transformer, weights: Iterator[tuple[str, torch.Tensor]], config: OffloadConfig,
    release: Callable[[str], None] | None = None, fuse: bool = False,
) -> Transformer:
    """Fill a meta-built Transformer through the same placement path with the plan that keeps everything on
    config.device (embedding and head too), in eval mode. fuse: stack q/k/v and gate/up as each block lands
    (resident CUDA runs: 4 matmuls a block instead of 7)."""
    layout = llama_layout(model)
    plan = resident_plan(layout.units, len(layout.blocks))
    place_model(layout, plan, weights, config, release, finish_block=_finish_resident_block if fuse else None)
    return model.eval()


def _finish_resident_block(block: TransformerBlock) -> None:
    """Stack the block's projections, and give it the int4 route (engine/int4_block_step.py: it checks at each pass
    whether the block's weights and the pass are ones it takes)."""
    fuse_block(block)
    block.fast_path = int4_block_step


def build_offloaded_model(
    model_dir: str | Path, config: OffloadConfig
) -> tuple[Transformer, OffloadedModel | SplitOffloadedModel]:
    """Read a checkpoint directory into a streaming model: (the model, its offload state)."""
    for device in split_devices(config) if len(config.devices) > 1 else (config.device,):
        resolve_device(device)  # fail before reading anything
    model_dir = Path(model_dir)
    args = read_model_args(model_dir)
    model = empty_model(args)
    weights, release = checkpoint_weights(model_dir, args)
    return model, offload_transformer(model, weights, config, release)


def build_resident_model(model_dir: str | Path, args: ModelArgs, config: OffloadConfig,
                         fuse: bool = False) -> Transformer:
    """Read a checkpoint directory into a model entirely on config.device (quantized as config.quant says)."""
    model = empty_model(args)
    weights, release = checkpoint_weights(Path(model_dir), args)
    return resident_transformer(model, weights, config, release, fuse)


def checkpoint_weights(
    model_dir: Path, args: ModelArgs
) -> tuple[Iterator[tuple[str, torch.Tensor]], Callable[[str], None]]:
    """The checkpoint's (canonical name, tensor) pairs, and the release that drops a placed tensor's file pages."""
    read: dict[str, Weight] = {}

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        for w in iter_checkpoint(model_dir, args):
            read[w.name] = w
            yield w.name, w.tensor

    return weights(), lambda name: read.pop(name).release()
