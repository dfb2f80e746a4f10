"""--save_quantized: quantize once, save, load the directory back with nothing re-quantized."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fixtures import make_meta_checkpoint, random_state, tiny_args
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_model import GREEDY
from tiny_tokenizer import train_tiny_sentencepiece, write_tiny_hf_tokenizer

import app
from engine.build import build_engine
from engine.config import DeviceSpec, RunConfig
from engine.quantized_checkpoint import (
    load_quantized_model,
    read_quantization,
    save_quantized,
    save_quantized_from_config,
)
from llama.errors import UserError
from llama.loader import model_from_state
from offload.quant_mode import QuantMode
from offload.kernels.linear import Int4Linear, Int8Linear, quantize_linears

ROOT = Path(__file__).resolve().parent.parent
GREEDY_FLAGS = ["--temperature", "0", "--repetition_penalty", "1.0", "--device", "cpu", "--dtype", "float32"]
LINEARS = {"int8": Int8Linear, "int4": Int4Linear}


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A tiny Meta-format model whose FFN width (256) splits into two int4 groups of 128."""
    model_dir = tmp_path_factory.mktemp("save_quantized") / "src"
    model_dir.mkdir()
    make_meta_checkpoint(tiny_args(vocab_size=400, ffn_dim=256, max_seq_len=256), model_dir)
    train_tiny_sentencepiece(model_dir)
    (model_dir / "generation_config.json").write_text('{"eos_token_id": 2}\n')
    return model_dir


def _cfg(model_dir: Path, **overrides) -> RunConfig:
    cfg = RunConfig(model_dir=model_dir, device=DeviceSpec("cpu"), dtype="float32", ctx=64, sampling=GREEDY)
    if isinstance(overrides.get("quant"), str):
        overrides["quant"] = QuantMode(overrides["quant"])  # as --quant gives it
    return replace(cfg, **overrides)


def _app(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args], check=False, capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_saved_model_loads_to_identical_logits(src, tmp_path, mode):
    out = tmp_path / "q"
    assert save_quantized_from_config(_cfg(src, quant=mode, save_quantized=out)) == out
    fmt = {"format": "int8"} if mode == "int8" else {"format": "int4", "group_size": 128}
    assert read_quantization(out) == fmt | {"cpu_head": "int8"}  # its head reads int8 on the CPU, as --quant's
    assert (out / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    assert (out / "generation_config.json").read_bytes() == (src / "generation_config.json").read_bytes()
    with safe_open(out / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
    fields = ("qweight", "scale") if mode == "int8" else ("packed", "scales", "zeros")
    assert {f"model.layers.1.mlp.down_proj.{n}" for n in fields} <= names
    assert "model.layers.1.mlp.down_proj.weight" not in names and "lm_head.weight" in names

    in_memory = build_engine(_cfg(src, quant=mode)).model
    loaded = build_engine(_cfg(out)).model
    assert all(type(a) is type(b) for a, b in zip(in_memory.modules(), loaded.modules()))
    assert isinstance(loaded.layers[0].attention.wq, LINEARS[mode])
    for name, t in in_memory.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    tokens = torch.randint(0, 400, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), in_memory(tokens))


def _run_app(args: list[str], capsys, in_process: bool) -> tuple[int, str, str]:
    """app.py as a subprocess, or app.main in this process (no second torch import: seconds saved)."""
    if not in_process:
        r = _app(*args)
        return r.returncode, r.stdout, r.stderr
    rc = app.main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize("mode, in_process", [("int4", False), ("int8", True)])
def test_app_saves_and_runs_the_same_greedy_text(src, tmp_path, capsys, mode, in_process):
    out = tmp_path / "q"
    rc, stdout, stderr = _run_app([str(src), "--quant", mode, "--save_quantized", str(out), "--device", "cpu"],
                                  capsys, in_process)
    assert rc == 0, stderr
    assert str(out) in stdout and "quantizing" in stderr
    prompt = ["--prompt", "hello there", "--max_new_tokens", "12", *GREEDY_FLAGS]
    rc, from_dir, stderr = _run_app([str(out), *prompt], capsys, in_process)
    assert rc == 0, stderr
    assert "quantizing" not in stderr  # loaded as saved, not quantized again
    rc, in_memory, _ = _run_app([str(src), "--quant", mode, *prompt], capsys, in_process)
    assert from_dir == in_memory and from_dir.strip()


def test_save_needs_quant_and_an_empty_directory(src, tmp_path, capsys):
    assert app.main([str(src), "--save_quantized", str(tmp_path / "q")]) == 2
    assert "--save_quantized" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("keep me\n")
    assert app.main([str(src), "--quant", "int8", "--save_quantized", str(full)]) == 2
    assert str(full) in capsys.readouterr().err
    assert [p.name for p in full.iterdir()] == ["notes.txt"]


@pytest.fixture(scope="module")
def int8_dir(src, tmp_path_factory) -> Path:
    return save_quantized_from_config(_cfg(src, quant="int8", save_quantized=tmp_path_factory.mktemp("q8") / "q"))


def test_flags_that_cannot_apply_to_a_quantized_directory(int8_dir, capsys):
    assert app.main([str(int8_dir), "--quant", "int4", *GREEDY_FLAGS, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "--quant int4" in err and "int8" in err
    with pytest.raises(UserError, match="--use_offload --quant int8"):
        build_engine(_cfg(int8_dir, use_offload=True))
    with pytest.raises(UserError, match="already quantized"):
        save_quantized_from_config(_cfg(int8_dir, quant="int8", save_quantized=int8_dir.parent / "again"))
    build_engine(_cfg(int8_dir, quant="int8"))  # the matching --quant is fine


def _tampered_copy(int8_dir: Path, tmp_path: Path, change) -> Path:
    out = tmp_path / "tampered"
    out.mkdir()
    for f in int8_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    tensors = load_file(out / "model.safetensors")
    change(tensors)
    save_file(tensors, out / "model.safetensors")
    return out


@pytest.mark.parametrize("change, needle", [
    (lambda t: t.pop("model.layers.0.self_attn.k_proj.scale"),
     r"model\.safetensors: model\.layers\.0\.self_attn\.k_proj: quantized layer with tensors \['qweight'\]"),
    (lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.1.mlp.up_proj.")],
     r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.\*'"),
    (lambda t: t.pop("model.norm.weight"), r"missing tensor 'model\.norm\.weight'"),
    (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}),
     r"model\.safetensors: model\.layers\.0\.self_attn\.k_proj: quantized layer with tensors"),
    (lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(64)}),
     r"model\.safetensors: tensor 'model\.layers\.0\.extra\.weight' does not belong to this int8 model"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.qweight": torch.zeros(256, 64)}),
     r"model\.safetensors: model\.layers\.0\.mlp\.up_proj: Int8Weight\.qweight must be int8"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.qweight": torch.zeros(256, 32, dtype=torch.int8),
                         "model.layers.0.mlp.up_proj.scale": torch.ones(256)}),
     r"up_proj: tensors .* do not make the \[256, 64\] int8 layer"),
])
def test_loading_is_strict(int8_dir, tmp_path, change, needle):
    with pytest.raises(UserError, match=needle):
        build_engine(_cfg(_tampered_copy(int8_dir, tmp_path, change)))


def test_malformed_quantization_field_names_config(int8_dir, tmp_path):
    out = _tampered_copy(int8_dir, tmp_path, lambda t: None)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization": {"format": "int3"}}))
    with pytest.raises(UserError, match="config.json"):
        read_quantization(out)


def test_an_unknown_cpu_head_is_refused_by_the_app(int8_dir, tmp_path, capsys):
    out = _tampered_copy(int8_dir, tmp_path, lambda t: None)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["cpu_head"] == "int8"  # what a --quant run saves
    config["quantization"]["cpu_head"] = "fp8"
    (out / "config.json").write_text(json.dumps(config))
    assert app.main([str(out), "--prompt", "hi", *GREEDY_FLAGS]) == 2
    err = capsys.readouterr().err.strip()
    assert "config.json" in err and "cpu_head" in err and "'fp8'" in err and "\n" not in err


def test_round_trip_keeps_biases_and_tied_embeddings(tmp_path):
    """Qwen2 shape: q/k/v biases (their rows are permuted in HF files), GQA, and a head tied to the embedding."""
    args = tiny_args("qwen2", ffn_dim=256, tie_embeddings=True)
    model = model_from_state(args, random_state(args, seed=3))
    quantize_linears(model.layers, QuantMode.INT4, progress=False)
    (tmp_path / "tok").mkdir()
    write_tiny_hf_tokenizer(tmp_path / "tok")
    save_quantized(model, args, tmp_path / "tok", tmp_path / "q", "int4")
    assert (tmp_path / "q" / "tokenizer_config.json").is_file()
    loaded = load_quantized_model(tmp_path / "q", args, read_quantization(tmp_path / "q"), torch.float32)
    assert loaded.output.weight is loaded.tok_embeddings.weight
    tokens = torch.randint(0, args.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
