"""The checkpoint decides: greedy equals transformers' greedy, generation_config.json's defaults, BOS or not."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from cli_runner import CPU_GREEDY, main_error, run_app
from tiny_tokenizer import CORPUS, train_tiny_sentencepiece, write_tiny_hf_tokenizer

import app
from engine.build import build_engine
from fixtures import make_hf_model, random_state, tiny_args
from llama.checkpoint_writer import write_hf_checkpoint
from llama.loader import load_model
from llama.perplexity import perplexity
from llama.tokenizer import load_tokenizer

PROMPT = "the quick brown fox jumps over"
N_NEW = 16


def _hf_dir(root: Path, arch: str = "llama", **tokenizer_config) -> Path:
    """A tiny random HF checkpoint of `arch` with the tiny byte-level tokenizer; tokenizer_config overrides."""
    model_dir = root / arch
    args = tiny_args(arch, vocab_size=400, max_seq_len=256)
    write_hf_checkpoint(random_state(args, seed=3), args, model_dir)
    write_tiny_hf_tokenizer(model_dir)
    path = model_dir / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **tokenizer_config}))
    return model_dir


def _prefilled(stderr: str) -> int:
    return int(re.search(r"\[prefill (\d+) tok", stderr).group(1))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_temperature_0_through_the_command_line_is_transformers_greedy(tmp_path, arch):
    args = tiny_args(arch, vocab_size=400, max_seq_len=256)
    hf = make_hf_model(args, tmp_path, seed=1)
    tokenizer = load_tokenizer(write_tiny_hf_tokenizer(tmp_path))
    prompt = tokenizer.encode(PROMPT)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=N_NEW, do_sample=False,
                          eos_token_id=sorted(tokenizer.stop_ids), pad_token_id=0)
    hf_ids = [i for i in out[0, len(prompt):].tolist() if i not in tokenizer.stop_ids]
    r = run_app(str(tmp_path), "--prompt", PROMPT, "--chat_format", "raw", "--max_new_tokens", str(N_NEW),
                *CPU_GREEDY)
    assert r.returncode == 0, r.stderr
    assert r.stdout == tokenizer.decode(hf_ids) + "\n"
    # Some reply token repeats one before it: a repetition penalty would have had something to change.
    assert any(t in prompt + hf_ids[:i] for i, t in enumerate(hf_ids))


def test_generation_config_gives_the_defaults_and_flags_win(tmp_path):
    model_dir = _hf_dir(tmp_path)
    (model_dir / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 7, "repetition_penalty": 1.3}))
    sampling = app.config_from_args(app.build_parser().parse_args([str(model_dir)])).sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.repetition_penalty) == (0.6, 0.9, 7, 1.3)
    ns = app.build_parser().parse_args([str(model_dir), "--top_k", "3", "--repetition_penalty", "1"])
    sampling = app.config_from_args(ns).sampling
    assert (sampling.temperature, sampling.top_k, sampling.repetition_penalty) == (0.6, 3, 1.0)
    (model_dir / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert app.config_from_args(app.build_parser().parse_args([str(model_dir)])).sampling.temperature == 0.0


def test_generation_config_eos_ids_stop_the_reply(tmp_path):
    model_dir = _hf_dir(tmp_path)
    flags = ["--prompt", PROMPT, "--chat_format", "raw", "--max_new_tokens", "8", *CPU_GREEDY]
    with torch.no_grad():
        first = int(load_model(model_dir)(torch.tensor([load_tokenizer(model_dir).encode(PROMPT)]))[0, -1].argmax())
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [399, first]}))
    r = run_app(str(model_dir), *flags)
    assert r.returncode == 0 and r.stdout == "\n" and "stop: eos" in r.stderr


def test_generation_config_is_read_once_for_defaults_and_stop_ids(tmp_path, monkeypatch):
    model_dir = _hf_dir(tmp_path)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [399], "top_k": 7}))
    reads = []
    read_text = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda path, *a, **k: reads.append(path.name) or read_text(path, *a, **k))
    cfg = app.config_from_args(app.build_parser().parse_args([str(model_dir), *CPU_GREEDY]))
    engine = build_engine(cfg)
    assert cfg.sampling.top_k == 7 and 399 in engine.tokenizer.stop_ids
    assert reads.count("generation_config.json") == 1


@pytest.mark.parametrize("bad, field", [({"top_p": "high"}, "top_p"), ({"top_p": 1.5}, "top_p"),
                                        ({"eos_token_id": "x"}, "eos_token_id")])
def test_bad_generation_config_is_named(tmp_path, capsys, bad, field):
    model_dir = _hf_dir(tmp_path)
    (model_dir / "generation_config.json").write_text(json.dumps(bad))
    line = main_error(capsys, model_dir, "--prompt", "hi", *CPU_GREEDY)
    assert "generation_config.json" in line and field in line


@pytest.mark.parametrize("config, with_bos", [({"bos_token": "<|im_start|>"}, False),
                                              ({"bos_token": "<|im_start|>", "add_bos_token": True}, True)])
def test_raw_prompt_and_ppl_begin_with_bos_only_where_the_checkpoint_adds_it(tmp_path, config, with_bos):
    model_dir = _hf_dir(tmp_path, **config)
    tokenizer = load_tokenizer(model_dir)
    assert tokenizer.bos_id == 1 and tokenizer.add_bos is with_bos
    r = run_app(str(model_dir), "--prompt", PROMPT, "--chat_format", "raw", "--max_new_tokens", "2", *CPU_GREEDY)
    assert _prefilled(r.stderr) == len(tokenizer.encode(PROMPT)) + with_bos

    text = tmp_path / "text.txt"
    text.write_text(CORPUS * 2)
    r = run_app(str(model_dir), "--ppl", str(text), "--ctx", "32", *CPU_GREEDY)
    assert r.returncode == 0, r.stderr
    got = float(re.search(r"perplexity: ([\d.]+)", r.stdout).group(1))
    ids = tokenizer.encode(CORPUS * 2, bos=with_bos)
    want = perplexity(load_model(model_dir), ids, 32, bos_id=1 if with_bos else None, progress=False)
    assert got == pytest.approx(want, abs=1e-4)


def test_sentencepiece_bos_follows_add_bos_token(tmp_path):
    train_tiny_sentencepiece(tmp_path)
    assert load_tokenizer(tmp_path).encode("hi", bos=True)[0] == 1
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert 1 not in load_tokenizer(tmp_path).encode("hi", bos=True)


def test_post_processor_that_adds_bos_is_followed(tmp_path):
    from tokenizers import processors

    model_dir = _hf_dir(tmp_path, bos_token="<|im_start|>")
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_file(str(model_dir / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    backend.save(str(model_dir / "tokenizer.json"))
    assert load_tokenizer(model_dir).add_bos
