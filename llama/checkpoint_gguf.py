"""GGUF checkpoints (llama.cpp's format), read with the `gguf` package, memory-mapped.

A GGUF is one file (or `-00001-of-0000N.gguf` splits) holding metadata and tensors. Hyperparameters come
from `{arch}.*` keys (architectures `llama`, which Mistral files also use, and `qwen2`). Tensor names map
to ours block by block (`blk.3.attn_q.weight` -> `layers.3.attention.wq.weight`).

q/k rows: llama.cpp's converter permutes a Hugging Face `llama` checkpoint's q/k rows back into Meta's
interleaved RoPE pairs (its rope is "normal"), so `llama` files already hold our layout; `qwen2` files keep
HF's half-split rows (llama.cpp runs them with "neox" rope), so their q/k rows (and biases) are permuted
with hf_to_meta_rows. A row permutation moves whole rows, so it applies to quantized rows unchanged.

A tensor comes out as a GGUFTensor: its ggml type, its logical shape in our [out, in] order and its raw
bytes (a view of the file map: [rows, bytes per row] for block-quantized types). What becomes of it (a float
tensor, or one of our quantized formats) is decided by the caller.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llama.checkpoint_hf import hf_to_meta_rows, rope_heads
from llama.checkpoint_kind import GGUF_SUFFIX as SUFFIX
from llama.config import Llama3RopeScaling, ModelArgs
from llama.errors import UserError

ARCHS = ("llama", "qwen2")
_SPLIT = re.compile(r"(.*)-(\d{5})-of-(\d{5})\.gguf")
_TOP_LEVEL = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
_IN_BLOCK = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_SKIPPED = ("rope_freqs.weight",)  # Llama 3.1's RoPE factors: checked against the metadata, not a weight


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF under its canonical name. raw: float [out, in] / [n] for F32/F16/BF16 (BF16 as
    torch.bfloat16), uint8 [out, bytes per row] for block-quantized types; a view of the file map unless
    its rows were permuted. shape: the logical shape, [out, in] or [n]."""

    name: str
    ggml_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    raw: torch.Tensor
    file: Path

    @property
    def type_name(self) -> str:
        return self.ggml_type.name


def gguf_files(path: Path | str) -> list[Path]:
    """The file(s) of one GGUF model: the file given (and its sibling splits), or the one model in a directory."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob(f"*{SUFFIX}"))
        firsts = [f for f in found if not _SPLIT.fullmatch(f.name) or _SPLIT.fullmatch(f.name).group(2) == "00001"]
        if len(firsts) != 1:
            raise UserError(f"{path}: {len(firsts) or 'no'} GGUF models in this directory; give the file")
        path = firsts[0]
    if not path.is_file():
        raise UserError(f"{path}: no such GGUF file")
    m = _SPLIT.fullmatch(path.name)
    if m is None:
        return [path]
    count = int(m.group(3))
    files = [path.with_name(f"{m.group(1)}-{i:05d}-of-{count:05d}{SUFFIX}") for i in range(1, count + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{path}: split file {missing[0]} is missing")
    return files


def open_gguf(path: Path) -> Any:
    """A gguf.GGUFReader over path (memory-mapped), or a UserError naming the file."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise UserError(f"{path}: not a valid GGUF file ({e})") from None


def metadata(reader: Any) -> dict[str, Any]:
    """Every metadata value of a reader by key (arrays as lists, strings decoded)."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def read_gguf_args(meta: dict[str, Any], source: Path, tensor_names: set[str]) -> ModelArgs:
    """ModelArgs from the metadata of the first file; tensor_names says whether there is an output head,
    q/k/v biases and RoPE factors."""
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise UserError(f"{source}: GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHS)})")

    def field(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise UserError(f"{source}: GGUF metadata has no '{arch}.{key}'")
        return value

    n_heads, dim = int(field("attention.head_count")), int(field("embedding_length"))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or ())
    window = meta.get(f"{arch}.attention.sliding_window")
    return ModelArgs(
        dim=dim,
        n_layers=int(field("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(field("attention.head_count_kv", n_heads)),
        head_dim=int(field("attention.key_length", field("rope.dimension_count", dim // n_heads))),
        vocab_size=int(vocab) if vocab else -1,  # -1: the embedding's rows (set by the caller)
        ffn_dim=int(field("feed_forward_length")),
        norm_eps=_f32(field("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32(field("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(meta, arch, source, "rope_freqs.weight" in tensor_names),
        max_seq_len=int(field("context_length", 4096)),
        tie_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        sliding_window=int(window) if window else None,
        arch=arch,
    )


def _f32(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(f"{x:.7g}")


def _rope_scaling(meta: dict[str, Any], arch: str, source: Path, has_factors: bool) -> Llama3RopeScaling | None:
    """Llama 3.1 files carry their RoPE stretch as a rope_freqs tensor; we use Llama 3.1's published
    constants (factor 8 unless the metadata says otherwise) and check them against it in iter_gguf_tensors."""
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind not in ("none", "llama3") and not has_factors:
        raise UserError(f"{source}: rope scaling type {kind!r} is not supported (supported: none, llama3)")
    if not has_factors and kind == "none":
        return None
    return Llama3RopeScaling(
        factor=float(meta.get(f"{arch}.rope.scaling.factor", 8.0)),
        original_max_position_embeddings=int(meta.get(f"{arch}.rope.scaling.original_context_length", 8192)),
    )


def canonical_gguf_name(name: str) -> str | None:
    """GGUF tensor name -> canonical name, or None for a tensor that is not one of ours."""
    module, _, leaf = name.rpartition(".")
    if module in _TOP_LEVEL:
        return f"{_TOP_LEVEL[module]}.{leaf}"
    m = _BLOCK.fullmatch(name)
    if m and m.group(2) in _IN_BLOCK:
        return f"layers.{m.group(1)}.{_IN_BLOCK[m.group(2)]}.{m.group(3)}"
    return None


def iter_gguf_tensors(readers: list[tuple[Path, Any]], args: ModelArgs) -> Iterator[GGUFTensor]:
    """Every model tensor of the files, renamed, q/k rows in our layout; UserError for a tensor that is not ours."""
    for path, reader in readers:
        for t in reader.tensors:
            if t.name in _SKIPPED:
                _check_rope_factors(t, args, path)
                continue
            name = canonical_gguf_name(t.name)
            if name is None:
                raise UserError(f"{path}: unexpected tensor {t.name!r}")
            yield _tensor(name, t, path, args)


def _tensor(name: str, t: Any, path: Path, args: ModelArgs) -> GGUFTensor:
    import gguf

    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml lists the innermost dimension first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the map is read-only; nothing writes to it
        raw = torch.from_numpy(t.data)
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:
        raw = raw.view(torch.bfloat16)
    elif t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        raw = raw.reshape(shape[0] if len(shape) == 2 else 1, -1)  # (rows, bytes per row)
    raw = raw.reshape(shape) if raw.is_floating_point() else raw
    heads = rope_heads(name, args)
    if args.arch == "qwen2" and heads is not None and shape[0] == heads * args.head_dim:
        raw = hf_to_meta_rows(raw, heads, args.head_dim)
    return GGUFTensor(name, t.tensor_type, shape, raw, path)


def _check_rope_factors(t: Any, args: ModelArgs, path: Path) -> None:
    """The file's RoPE divisors must be the ones our Llama 3.1 scaling computes (else we would run it wrong)."""
    from llama.model import rope_frequencies

    if args.rope_scaling is None:
        raise UserError(f"{path}: rope_freqs tensor without rope scaling")
    plain = rope_frequencies(replace(args, rope_scaling=None))
    ours = plain / rope_frequencies(args)
    theirs = torch.from_numpy(np.asarray(t.data, dtype=np.float32).copy()).flatten()
    if theirs.shape != ours.shape or not torch.allclose(ours, theirs, rtol=1e-3):
        raise UserError(f"{path}: rope_freqs are not Llama 3.1's scaling (factor {args.rope_scaling.factor}); "
                        f"this RoPE variant is not supported")
