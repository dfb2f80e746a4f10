"""Tiny GGUF files written with gguf's own writer, from a canonical state dict and a tokenizer, for tests.

`llama` files hold q/k rows in our (Meta) layout, as llama.cpp's converter writes them; `qwen2` files hold
Hugging Face's layout, so the writer permutes those rows back (meta_to_hf_rows).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from llama.checkpoint_hf import meta_to_hf_rows, rope_heads
from llama.config import ModelArgs

NAMES = {
    "tok_embeddings": "token_embd", "norm": "output_norm", "output": "output",
    "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
    "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
    "attention_norm": "attn_norm", "ffn_norm": "ffn_norm",
}


# Byte offsets of each K-quant block's fp16 scales (d, and dmin where there is one), from ggml's block structs.
KQUANT_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_kquant(shape: tuple[int, int], kind: str, seed: int) -> np.ndarray:
    """Random K-quant blocks (gguf cannot quantize to these) with small finite scales: uint8 [rows, bytes]."""
    import gguf

    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    data = np.random.default_rng(seed).integers(0, 256, size=(shape[0], shape[1] // block, nbytes), dtype=np.uint8)
    for offset, value in zip(KQUANT_SCALES[kind], (2e-3, 1e-3)):
        data[..., offset : offset + 2] = np.array([value], dtype=np.float16).view(np.uint8)
    return data.reshape(shape[0], -1)


def gguf_name(name: str) -> str:
    module, _, leaf = name.rpartition(".")
    if module in NAMES:
        return f"{NAMES[module]}.{leaf}"
    _, i, rest = module.split(".", 2)
    return f"blk.{i}.{NAMES[rest]}.{leaf}"


def sentencepiece_metadata(model_file: Path) -> dict:
    """tokenizer.ggml.* of a SentencePiece model, as llama.cpp's converter writes them."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    n = sp.vocab_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    return {"model": "llama", "tokens": [sp.id_to_piece(i) for i in range(n)],
            "scores": [sp.get_score(i) for i in range(n)], "token_type": types,
            "bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "unknown_token_id": sp.unk_id()}


def byte_level_metadata(tokenizer_json: Path, eos: str, pre: str = "qwen2") -> dict:
    """tokenizer.ggml.* of a byte-level BPE tokenizer.json (special added tokens as controls)."""
    data = json.loads(tokenizer_json.read_text())
    vocab = dict(data["model"]["vocab"])
    for t in data["added_tokens"]:
        vocab[t["content"]] = t["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {t["content"] for t in data["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "merges": merges,
            "token_type": [3 if t in specials else 1 for t in tokens], "eos_token_id": vocab[eos],
            "add_bos_token": False}


def write_gguf(path: Path, args: ModelArgs, state: dict[str, torch.Tensor], tokenizer: dict,
               types: dict[str, str] | None = None, chat_template: str | None = None) -> Path:
    """A GGUF of `state` (canonical names, Meta layout). types: ggml type name per canonical name or
    per kind ("linear" for block linears, "other"); default F32."""
    import gguf

    types = types or {}
    w = gguf.GGUFWriter(path, args.arch)
    a = args.arch
    w.add_uint32(f"{a}.context_length", args.max_seq_len)
    w.add_uint32(f"{a}.embedding_length", args.dim)
    w.add_uint32(f"{a}.block_count", args.n_layers)
    w.add_uint32(f"{a}.feed_forward_length", args.ffn_dim)
    w.add_uint32(f"{a}.attention.head_count", args.n_heads)
    w.add_uint32(f"{a}.attention.head_count_kv", args.n_kv_heads)
    w.add_uint32(f"{a}.rope.dimension_count", args.head_dim)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", args.norm_eps)
    w.add_float32(f"{a}.rope.freq_base", args.rope_theta)
    if args.sliding_window:
        w.add_uint32(f"{a}.attention.sliding_window", args.sliding_window)
    for key, value in tokenizer.items():
        full = f"tokenizer.ggml.{key}"
        if isinstance(value, list):
            w.add_array(full, value)
        elif isinstance(value, bool):
            w.add_bool(full, value)
        elif isinstance(value, str):
            w.add_string(full, value)
        else:
            w.add_uint32(full, value)
    if args.rope_scaling is not None:  # Llama 3.1 files: the divisors of each RoPE frequency, as a tensor
        from dataclasses import replace

        from llama.model import rope_frequencies

        factors = rope_frequencies(replace(args, rope_scaling=None)) / rope_frequencies(args)
        w.add_float32(f"{a}.rope.scaling.factor", args.rope_scaling.factor)
        w.add_tensor("rope_freqs.weight", factors.numpy())
    if chat_template is not None:
        w.add_string("tokenizer.chat_template", chat_template)
    for name, t in state.items():
        if args.tie_embeddings and name == "output.weight":
            continue
        heads = rope_heads(name, args)
        if a == "qwen2" and heads is not None:
            t = meta_to_hf_rows(t, heads, args.head_dim)
        is_linear = name.startswith("layers.") and t.dim() == 2
        kind = types.get(name) or types.get("linear" if is_linear else "other") or "F32"
        qtype = gguf.GGMLQuantizationType[kind]
        data = t.float().numpy() if kind != "F16" else t.half().numpy()
        if kind in KQUANT_SCALES:
            data = random_kquant(tuple(t.shape), kind, seed=len(name))
        elif kind not in ("F32", "F16"):
            data = gguf.quants.quantize(t.float().numpy(), qtype)
        raw_dtype = None if kind in ("F32", "F16") else qtype
        w.add_tensor(gguf_name(name), np.ascontiguousarray(data), raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def dequantized_state(path: Path, args: ModelArgs) -> dict[str, torch.Tensor]:
    """The file's weights after gguf's own dequantization, canonical names and layout (the reference)."""
    import gguf

    from llama.checkpoint_gguf import canonical_gguf_name
    from llama.checkpoint_hf import hf_to_meta_rows

    state = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)).reshape(shape)
        name = canonical_gguf_name(t.name)
        heads = rope_heads(name, args)
        if args.arch == "qwen2" and heads is not None:
            w = hf_to_meta_rows(w, heads, args.head_dim)
        state[name] = w
    return state
