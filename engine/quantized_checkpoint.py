"""--save_quantized: a quantized model written once as a self-contained HF directory, and loaded back as is.

The directory is an ordinary HF checkpoint (config.json + safetensors) whose block linears hold their
format's tensors instead of `.weight` (`model.layers.0.self_attn.q_proj.qweight` / `.scale` for int8,
`.packed` / `.scales` / `.zeros` for int4), with `"quantization": {"format": ..., "group_size": ...}`
in config.json and the tokenizer files beside them. Loading builds the model on the meta device and each
block linear from its saved tensors (the format is recognised by their names and checked against
config.json), then places the model as every resident load is placed: nothing is re-quantized or
dequantized, so loading costs what reading the bytes costs.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from engine.choices import pick_dtype, resolve_tokenizer
from engine.config import RunConfig
from engine.llama_offload import build_resident_model, resident_transformer
from engine.offload_messages import flag_messages
from llama.checkpoint import iter_weights, read_model_args
from llama.checkpoint_files import Weight, read_json
from llama.checkpoint_hf import CONFIG, hf_name, iter_hf_weights
from llama.checkpoint_writer import write_hf_checkpoint
from llama.config import ModelArgs
from llama.errors import UserError, first_named
from llama.loader import empty_model
from llama.model import Transformer
from offload.kernels.int4_format import Int4Weight, int4_group_size
from offload.kernels.int8_format import Int8Weight
from offload.quant_mode import QuantMode
from offload.kernels.linear import QuantizedLinear, quantized_linear_from_tensors
from offload.policy import OffloadConfig

CPU_HEAD = "cpu_head"  # in the quantization record: "int8" when the CPU's head reads an int8 copy
QUANTIZATION_FIELD = "quantization"  # not HF's "quantization_config", which transformers would try to act on
SAVED_FORMATS = {"int8": Int8Weight, "int4": Int4Weight}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
CARRIED_CONFIG = ("bos_token_id", "eos_token_id")  # read by the HF tokenizer from config.json
MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's default shard size


def save_quantized(
    model: Transformer,
    args: ModelArgs,
    tokenizer_dir_or_file: Path | str,
    out_dir: Path | str,
    mode: str,
    log: TextIO = sys.stderr,
    int8_head: bool = False,
) -> None:
    """Write `model`, whose block linears are all quantized to `mode` ('int8' or 'int4'), to the new or
    empty directory out_dir, with the tokenizer files from tokenizer_dir_or_file. int8_head: record that on
    the CPU its head reads an int8 copy, as a --quant run's does (engine/cpu_decode.py)."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    config: dict[str, Any] = {QUANTIZATION_FIELD: _describe(model, mode) | ({CPU_HEAD: "int8"} if int8_head else {})}
    source = Path(tokenizer_dir_or_file)
    source_config = (source if source.is_dir() else source.parent) / CONFIG
    if source_config.is_file():
        config.update({k: v for k, v in read_json(source_config).items() if k in CARRIED_CONFIG})
    state = model.state_dict()
    size = sum(t.numel() * t.element_size() for t in state.values())
    print(f"writing the {mode} model ({size / 2**20:.1f} MiB) to {out_dir}", file=log)
    write_hf_checkpoint(state, args, out_dir, max_shard_bytes=MAX_SHARD_BYTES, extra_config=config)
    copy_tokenizer(source, out_dir)


def save_quantized_from_config(cfg: RunConfig, log: TextIO = sys.stderr) -> Path:
    """--save_quantized: load cfg.model_dir on the CPU, quantize it to cfg.quant, save it; returns the directory."""
    from engine.save_converted import save_converted
    from llama.checkpoint_kind import is_prequantized

    if is_prequantized(cfg.model_dir):
        return save_converted(cfg, log)  # GGUF, GPTQ, AWQ: written in the formats they are read into
    mode = cfg.quant.value if cfg.quant is not None else None
    if mode not in SAVED_FORMATS:
        raise ValueError(f"save_quantized_from_config: cfg.quant must be one of {', '.join(SAVED_FORMATS)}")
    out_dir, model_dir = Path(cfg.save_quantized), Path(cfg.model_dir)
    check_output_dir(out_dir)
    if read_quantization(model_dir) is not None:
        raise UserError(f"--save_quantized: {model_dir} is already quantized; give the original model")
    tokenizer = resolve_tokenizer(cfg)
    args = read_model_args(model_dir, tokenizer.vocab_size)
    cpu = torch.device("cpu")
    dtype = _checkpoint_dtype(model_dir, args) if cfg.dtype == "auto" else pick_dtype(cfg.dtype, cpu, args)
    print(f"loading {model_dir} as {str(dtype).removeprefix('torch.')} on the CPU to quantize it", file=log)
    with flag_messages():
        model = build_resident_model(model_dir, args, OffloadConfig(dtype=dtype, device=cpu, quant=cfg.quant))
    save_quantized(model, args, cfg.tokenizer or model_dir, out_dir, mode, log, int8_head=True)
    return out_dir


def check_output_dir(out_dir: Path) -> None:
    """UserError unless out_dir is absent or an empty directory."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--save_quantized: {out_dir} is a file, not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise UserError(f"--save_quantized: {out_dir} is not empty; give a new or empty directory")


def copy_tokenizer(source: Path, out_dir: Path) -> None:
    """Copy a tokenizer file (as tokenizer.json or tokenizer.model, the names the loader looks for), or every
    tokenizer file of a directory, plus the config files beside it that set BOS/EOS and the chat template."""
    folder = source if source.is_dir() else source.parent
    if source.is_dir():
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, out_dir / name)
    else:
        shutil.copyfile(source, out_dir / ("tokenizer.json" if source.suffix == ".json" else "tokenizer.model"))
    for name in TOKENIZER_SIDE_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out_dir / name)


def read_quantization(model_dir: Path | str) -> dict[str, Any] | None:
    """The "quantization" field of model_dir's config.json ({"format": "int8"} or {"format": "int4",
    "group_size": G}, either with "cpu_head": "int8" when a --quant run saved it), None for an unquantized
    model; UserError naming the file when it is malformed."""
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        return None
    quant = read_json(path).get(QUANTIZATION_FIELD)
    if quant is None:
        return None
    fmt = quant.get("format") if isinstance(quant, dict) else None
    if fmt not in SAVED_FORMATS:
        raise UserError(f"{path}: '{QUANTIZATION_FIELD}' must name a format, one of {', '.join(SAVED_FORMATS)}")
    group = quant.get("group_size")
    if fmt == "int4" and not (isinstance(group, int) and group >= 2 and group % 2 == 0):
        raise UserError(f"{path}: '{QUANTIZATION_FIELD}' needs an even integer group_size >= 2 for int4")
    if quant.get(CPU_HEAD, "int8") != "int8":
        raise UserError(f"{path}: '{QUANTIZATION_FIELD}.{CPU_HEAD}' may only be \"int8\", not {quant[CPU_HEAD]!r}")
    return quant


def check_quantized_run(model_dir: Path, quant: dict[str, Any], requested: QuantMode | None, use_offload: bool) -> None:
    """UserError for flags that cannot apply to an already quantized directory."""
    fmt = quant["format"]
    if use_offload:
        raise UserError(f"{model_dir} is quantized: a quantized directory runs resident or on the CPU; streaming "
                        f"it is not supported yet, load the original with --use_offload --quant {fmt}")
    if requested is not None and requested.value != fmt:
        flag = "--use_8bit" if requested is QuantMode.BNB else f"--quant {requested.value}"
        raise UserError(f"{flag}: {model_dir} is already quantized to {fmt}; drop the flag")


def load_quantized_model(model_dir: Path, args: ModelArgs, quant: dict[str, Any], dtype: torch.dtype,
                         device: torch.device = torch.device("cpu"), fuse: bool = False) -> Transformer:
    """The quantized model in model_dir on `device`, in eval mode, placed as every resident load is
    (engine/llama_offload.resident_transformer): the formats' tensors as saved, the other float tensors in
    `dtype`; fuse as there. Strict: a missing, unexpected or misshapen tensor is a UserError naming the file."""
    model = empty_model(args)
    read: dict[str, Weight] = {}
    weights = _saved_weights(model_dir, args, quant, dtype, model, read)
    config = OffloadConfig(dtype=dtype, device=device)
    return resident_transformer(model, iter(weights), config, lambda name: read.pop(name).release(), fuse)


def _saved_weights(model_dir: Path, args: ModelArgs, quant: dict[str, Any], dtype: torch.dtype, model: Transformer,
                   read: dict[str, Weight]) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of the directory, checked, as (canonical name, tensor): a block linear's format tensors under
    `{module}.{field}`, its layer (built from them) swapped into the meta-built `model` as a shell of that format.
    read: filled with each tensor's Weight, for releasing its file pages once placed."""
    linears = {n: m for n, m in model.layers.named_modules(prefix="layers") if isinstance(m, nn.Linear)}
    expected = {n: t for n, t in model.state_dict().items() if n.rpartition(".")[0] not in linears}
    if args.tie_embeddings:
        expected.pop("output.weight", None)  # the embedding fills the head
    layer_tensors: dict[str, dict[str, torch.Tensor]] = {n: {} for n in linears}
    layer_files: dict[str, Path] = {}
    plain: list[tuple[str, torch.Tensor]] = []
    for w in iter_hf_weights(model_dir, args):
        module, _, leaf = w.name.rpartition(".")
        if w.name in read:
            raise UserError(f"{w.file}: tensor {hf_name(w.name)!r} appears a second time")
        read[w.name] = w
        if module in layer_tensors:
            layer_tensors[module][leaf] = w.tensor  # a view of the file: built into its layer below
            layer_files[module] = w.file
        elif w.name in expected:
            plain.append((w.name, _checked(w, expected[w.name].shape)))
        elif not (args.tie_embeddings and w.name == "output.weight"):
            raise UserError(f"{w.file}: tensor {hf_name(w.name)!r} does not belong to this {quant['format']} model")
    missing = [hf_name(n) for n in expected if n not in read]
    missing += [f"{_hf_module(n)}.*" for n, tensors in layer_tensors.items() if not tensors]
    if missing:
        raise UserError(f"{model_dir}: missing tensor {first_named(missing)}")
    formats: list[tuple[str, torch.Tensor]] = []
    for name, tensors in layer_tensors.items():
        layer = _quantized_layer(tensors, linears[name], quant, dtype, f"{layer_files[name]}: {_hf_module(name)}")
        formats += [(f"{name}.{field}", t) for field, t in layer.state_dict().items()]
        model.set_submodule(name, layer.to("meta"))
    return plain + formats


def _checked(w: Weight, shape: torch.Size) -> torch.Tensor:
    """w's tensor, or a UserError naming the file if it is not a float tensor of `shape` (placing casts it)."""
    t = w.tensor
    if t.shape != shape or not t.is_floating_point():
        raise UserError(f"{w.file}: tensor {hf_name(w.name)!r} is {t.dtype} {tuple(t.shape)}, the config asks "
                        f"for a float tensor {tuple(shape)}")
    return t


def _quantized_layer(
    tensors: dict[str, torch.Tensor], linear: nn.Linear, quant: dict[str, Any], dtype: torch.dtype, where: str
) -> QuantizedLinear:
    """The layer the saved tensors make, checked against the plain linear it replaces and the recorded format."""
    if "bias" in tensors:
        tensors = {**tensors, "bias": tensors["bias"].to(dtype)}
    try:
        layer = quantized_linear_from_tensors(tensors)
    except (UserError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None
    fmt = SAVED_FORMATS[quant["format"]]
    group = int4_group_size(linear.in_features, quant["group_size"]) if fmt is Int4Weight else 0
    if (layer.format_type is not fmt or (layer.in_features, layer.out_features) != (linear.in_features,
            linear.out_features) or (layer.bias is None) != (linear.bias is None)
            or (fmt is Int4Weight and layer.weight_format().group_size != group)):
        raise UserError(f"{where}: tensors {sorted(tensors)} of shapes {[tuple(t.shape) for t in tensors.values()]} "
                        f"do not make the [{linear.out_features}, {linear.in_features}] {quant['format']} layer "
                        f"config.json describes")
    return layer


def _hf_module(name: str) -> str:
    return hf_name(f"{name}.weight").removesuffix(".weight")


def _describe(model: Transformer, mode: str) -> dict[str, Any]:
    """The config.json record of how model's block linears are quantized; ValueError if not all are in `mode`."""
    if mode not in SAVED_FORMATS:
        raise ValueError(f"save_quantized: mode must be one of {', '.join(SAVED_FORMATS)}, got {mode!r}")
    linears = [m for m in model.layers.modules() if isinstance(m, (nn.Linear, QuantizedLinear))]
    if not linears or any(getattr(m, "format_type", None) is not SAVED_FORMATS[mode] for m in linears):
        raise ValueError(f"save_quantized: quantize every linear of model.layers to {mode} first")
    if mode == "int8":
        return {"format": mode}
    # Groups are chosen per matrix (int4_group_size); the widest group seen, recorded, gives back each one.
    group = max(m.weight_format().group_size for m in linears)
    if any(m.weight_format().group_size != int4_group_size(m.in_features, group) for m in linears):
        raise ValueError("save_quantized: the int4 group sizes do not follow one requested size")
    return {"format": mode, "group_size": group}


def _checkpoint_dtype(model_dir: Path, args: ModelArgs) -> torch.dtype:
    """The dtype the checkpoint stores its first weight in (an unquantized checkpoint has one float dtype)."""
    _, t = next(iter_weights(model_dir, args))
    return t.dtype if t.is_floating_point() else torch.float32
