"""Hostile or broken checkpoint files: one error line naming the file and field, exit 2, never a traceback."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_runner import CPU_GREEDY, main_error, run_app
from safetensors.torch import load_file, save_file
from tiny_tokenizer import write_tiny_hf_tokenizer

import app
from fixtures import random_state, tiny_args
from llama.checkpoint_writer import write_hf_checkpoint

ARGS = tiny_args(vocab_size=400)
EMBED = "model.embed_tokens.weight"
PROMPT = ["--prompt", "hello", "--max_new_tokens", "2", *CPU_GREEDY]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    model_dir = tmp_path_factory.mktemp("hostile") / "model"
    write_hf_checkpoint(random_state(ARGS), ARGS, model_dir)
    write_tiny_hf_tokenizer(model_dir)
    return model_dir


@pytest.fixture
def model_dir(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "model"))


def _edit_config(model_dir: Path, **changes: Any) -> Path:
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))
    return path


def _edit_tensor(model_dir: Path, name: str, change) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    tensors[name] = change(tensors[name])
    save_file(tensors, path, metadata={"format": "pt"})


def test_a_sound_checkpoint_runs(model_dir, capsys):
    assert app.main([str(model_dir), *PROMPT]) == 0


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"num_key_value_heads": 0}, "num_key_value_heads"),
        ({"num_key_value_heads": 3}, "n_kv_heads"),  # 4 heads do not split into 3 groups
        ({"num_attention_heads": 5, "head_dim": None}, "n_heads"),  # 64 wide: not 5 heads
        ({"head_dim": 15}, "head size"),
        ({"hidden_size": "64"}, "hidden_size"),
        ({"intermediate_size": -160}, "intermediate_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"vocab_size": 400.5}, "vocab_size"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        ({"rope_scaling": "llama3"}, "rope_scaling"),
        ({"rms_norm_eps": -1e-5}, "rms_norm_eps"),
        ({"rope_theta": 0}, "rope_theta"),
    ],
)
def test_bad_config_field_is_named(model_dir, capsys, changes, field):
    path = _edit_config(model_dir, **changes)
    line = main_error(capsys, model_dir, *PROMPT)
    assert str(path) in line and field in line


def test_bad_meta_params_field_is_named(tmp_path, capsys):
    from fixtures import make_meta_checkpoint
    from tiny_tokenizer import train_tiny_sentencepiece

    make_meta_checkpoint(ARGS, tmp_path)
    train_tiny_sentencepiece(tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps({**params, "n_kv_heads": 0}))
    line = main_error(capsys, tmp_path, *PROMPT)
    assert "params.json" in line and "n_kv_heads" in line


def test_tokenizer_config_that_is_not_an_object(model_dir, capsys):
    (model_dir / "tokenizer_config.json").write_text("[1, 2]")
    assert "tokenizer_config.json: expected a JSON object" in main_error(capsys, model_dir, *PROMPT)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../outside.safetensors"])
def test_index_naming_a_file_outside_the_directory_is_refused(model_dir, capsys, shard):
    outside = model_dir.parent / "outside.safetensors"
    shutil.copyfile(model_dir / "model.safetensors", outside)  # it exists: only where it lies is wrong
    shutil.copyfile(outside, "/tmp/outside.safetensors")
    (model_dir / "model.safetensors").unlink()
    names = load_file(outside).keys()
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names, shard)}))
    line = main_error(capsys, model_dir, *PROMPT)
    assert "model.safetensors.index.json" in line and "outside" in line and shard in line


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_integer_and_bool_weights_are_refused(model_dir, capsys, dtype):
    _edit_tensor(model_dir, EMBED, lambda t: t.to(dtype))
    line = main_error(capsys, model_dir, *PROMPT)
    assert "model.safetensors" in line and "tok_embeddings.weight" in line and "floating point" in line


@pytest.mark.parametrize("dtype", [torch.float64, torch.float8_e4m3fn])
def test_other_float_kinds_are_converted_with_one_note(model_dir, capsys, dtype):
    for name in (EMBED, "model.norm.weight", "model.layers.0.mlp.up_proj.weight"):
        _edit_tensor(model_dir, name, lambda t: t.to(dtype))
    assert app.main([str(model_dir), *PROMPT]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and str(dtype).removeprefix("torch.") in notes[0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_in_a_weight_is_refused_naming_it(model_dir, capsys, bad):
    def spoil(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[3, 5] = bad
        return t

    _edit_tensor(model_dir, "model.layers.1.mlp.down_proj.weight", spoil)
    line = main_error(capsys, model_dir, *PROMPT)
    assert "layers.1.feed_forward.w2.weight" in line and "NaN or infinite" in line


def test_huge_finite_weights_are_not_mistaken_for_inf(model_dir, capsys):
    """A float32 sum of large finite values overflows; the exact check then clears them."""
    _edit_tensor(model_dir, "model.norm.weight", lambda t: torch.full_like(t, 3e38))
    assert app.main([str(model_dir), *PROMPT]) == 0


def test_bad_config_through_the_command_line(model_dir):
    _edit_config(model_dir, num_key_value_heads=0)
    r = run_app(str(model_dir), *PROMPT)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "num_key_value_heads" in r.stderr
