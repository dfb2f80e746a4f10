"""--save_quantized of a GGUF or GPTQ/AWQ checkpoint: what was read, written as our quantized directory.

The model is read on the CPU exactly as a run reads it (Q8_0 as int8 with groups of 32, Q4_0/Q4_1 and
GPTQ/AWQ as int4, K-quants as --quant or their default), then saved by save_quantized, so the directory
loads without the conversion step. A GGUF's tokenizer and chat template are written beside it as
tokenizer.json and tokenizer_config.json. Not saved: a file whose linears end up in two formats (give
--quant to choose one) and GPTQ act-order layers (their input permutation is not part of our format).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import TextIO

import torch
from torch import nn

from engine.config import RunConfig
from engine.gguf_build import load_gguf_resident
from engine.gguf_model import FLOAT_TYPES, GGUFModel, open_gguf_model
from engine.gptq_model import load_gptq_resident
from engine.quantized_checkpoint import SAVED_FORMATS, check_output_dir, save_quantized
from llama.checkpoint_kind import is_gguf
from llama.checkpoint_gptq import read_gptq_config
from llama.checkpoint_hf import read_hf_args
from llama.errors import UserError
from llama.gguf_tokenizer import GGUFTokenizer
from offload.kernels.linear import QuantizedLinear
from offload.kernels.permuted_linear import PermutedInt4Linear

CPU = torch.device("cpu")


def save_converted(cfg: RunConfig, log: TextIO | None = None) -> Path:
    from engine.choices import pick_dtype

    log = log or sys.stderr
    out_dir, model_dir = Path(cfg.save_quantized), Path(cfg.model_dir)
    check_output_dir(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        if is_gguf(model_dir):
            gguf = open_gguf_model(model_dir)
            args = gguf.args
            dtype = _float_dtype(gguf) if cfg.dtype == "auto" else pick_dtype(cfg.dtype, CPU, args)
            model = load_gguf_resident(gguf, cfg.quant.value if cfg.quant else None, dtype, CPU, log)
            tokenizer_source = cfg.tokenizer or write_gguf_tokenizer(gguf, Path(tmp))
        else:
            args = read_hf_args(model_dir)
            dtype = torch.float16 if cfg.dtype == "auto" else pick_dtype(cfg.dtype, CPU, args)
            model = load_gptq_resident(model_dir, args, read_gptq_config(model_dir), dtype, CPU, log)
            tokenizer_source = cfg.tokenizer or model_dir
        layers = [m for m in model.layers.modules() if isinstance(m, QuantizedLinear)]
        if any(isinstance(m, PermutedInt4Linear) for m in layers):
            raise UserError(f"--save_quantized: {model_dir} uses GPTQ act-order, which our saved format cannot "
                            "hold yet; run it directly")
        modes = {name for name, fmt in SAVED_FORMATS.items() if any(m.format_type is fmt for m in layers)}
        if len(modes) != 1 or any(type(m) is nn.Linear for m in model.layers.modules()):
            found = ", ".join(sorted(modes) + ["float"] * any(type(m) is nn.Linear for m in model.layers.modules()))
            raise UserError(f"--save_quantized: {model_dir} reads as a mix of formats ({found}); give --quant int8 "
                            "or --quant int4 to store every block linear in one")
        save_quantized(model, args, tokenizer_source, out_dir, modes.pop(), log)
    return out_dir


def write_gguf_tokenizer(gguf: GGUFModel, folder: Path) -> Path:
    """tokenizer.json and tokenizer_config.json (BOS/EOS, chat template) of a GGUF's metadata, in folder."""
    tok = GGUFTokenizer(gguf.meta, gguf.path)
    (folder / "tokenizer.json").write_text(tok.backend_json())
    config = {"bos_token": tok.bos_token if tok.bos_id is not None else None, "eos_token": tok.eos_token}
    if gguf.chat_template:
        config["chat_template"] = gguf.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return folder


def _float_dtype(gguf: GGUFModel) -> torch.dtype:
    """The embedding's own float dtype (float16 when the file quantizes it)."""
    return FLOAT_TYPES.get(gguf.tensors["tok_embeddings.weight"].type_name, torch.float16)
