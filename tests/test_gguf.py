"""GGUF files written with gguf's writer from tiny random Llama and Qwen2 models, read back through our engine."""
from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import greedy
from fixtures import random_state, tiny_args
from gguf_writer import byte_level_metadata, dequantized_state, sentencepiece_metadata, write_gguf
from tiny_model import GREEDY
from tiny_tokenizer import train_tiny_sentencepiece, write_tiny_hf_tokenizer

import app
from engine.build import build_engine
from engine.config import DeviceSpec, RunConfig
from engine.gguf_model import open_gguf_model
from llama.chat_template import JinjaChatFormat
from llama.errors import UserError
from llama.gguf_tokenizer import GGUFTokenizer
from llama.loader import model_from_state
from offload.kernels.int4_format import Int4Weight
from offload.kernels.int8_format import Int8Weight
from offload.quant_mode import QuantMode

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["Hello world", "  two  spaces\nnew line\n\n\ttab", "Café crème 日本語 😀 naïve", "x = 1234567890;"]


def _args(arch: str):
    # ffn 256 and dim 64: every inner dimension splits into 32-wide GGUF blocks.
    return tiny_args(arch, vocab_size=400, ffn_dim=256, max_seq_len=128)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gguf-tok")
    return {"llama": sentencepiece_metadata(train_tiny_sentencepiece(root)),
            "qwen2": byte_level_metadata(write_tiny_hf_tokenizer(root), eos="<|im_end|>")}


def _write(tmp_path: Path, arch: str, kind: str, tokenizers: dict, **kw) -> tuple[Path, dict]:
    args = _args(arch)
    state = random_state(args, seed=3)
    folder = tmp_path / f"{arch}-{kind}"
    folder.mkdir()
    path = write_gguf(folder / "model.gguf", args, state, tokenizers[arch], {"linear": kind}, **kw)
    return path, state


def _cfg(path: Path, **kw) -> RunConfig:
    cfg = RunConfig(model_dir=path, device=DeviceSpec("cpu"), dtype="float32", ctx=64, sampling=GREEDY)
    return replace(cfg, **kw)


def _logits(model, seed: int = 1) -> torch.Tensor:
    tokens = torch.randint(0, 400, (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f32_gguf_gives_the_source_models_logits(tmp_path, tokenizers, arch):
    path, state = _write(tmp_path, arch, "F32", tokenizers)
    engine = build_engine(_cfg(path))
    assert engine.args == _args(arch)
    torch.testing.assert_close(_logits(engine.model), _logits(model_from_state(_args(arch), state)),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kind, fmt", [("Q8_0", Int8Weight), ("Q4_0", Int4Weight), ("Q4_1", Int4Weight)])
def test_block_quants_stream_as_our_formats_with_ggufs_own_values(tmp_path, tokenizers, arch, kind, fmt):
    path, _ = _write(tmp_path, arch, kind, tokenizers)
    model = build_engine(_cfg(path)).model
    wq = model.layers[0].attention.wq
    assert wq.format_type is fmt and wq.weight_format().group_size == 32
    reference = model_from_state(_args(arch), dequantized_state(path, _args(arch)))
    for name, w in reference.state_dict().items():
        if name.endswith("attention.wq.weight"):
            layer = model.get_submodule(name.removesuffix(".weight"))
            assert torch.allclose(layer.weight_format().dequantize(), w, atol=1e-6, rtol=1e-5), name
    torch.testing.assert_close(_logits(model), _logits(reference), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_greedy_tokens_equal_transformers_reading_the_same_gguf(tmp_path, tokenizers, kind):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF
    path, _ = _write(tmp_path, "llama", kind, tokenizers)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    engine = build_engine(_cfg(path))
    prompt = [1, 20, 300, 7, 99]
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, 5:].tolist()
    assert greedy(engine.model, prompt, 12)[0] == theirs


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tokenizer_from_metadata_gives_transformers_ids(tmp_path, tokenizers, arch):
    transformers = pytest.importorskip("transformers")
    path, _ = _write(tmp_path, arch, "F32", tokenizers, chat_template=CHATML)
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = open_gguf_model(path)
    ours = GGUFTokenizer(model.meta, model.path)
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
        assert ours.encode(text, bos=True) == theirs.encode(text), text  # BOS only where the file adds it
        assert ours.decode(ours.encode(text)) == theirs.decode(ours.encode(text))
    assert ours.bos_id == (1 if arch == "llama" else None) and ours.eos_id == theirs.eos_token_id
    # Special tokens in rendered template text become their ids, with the text around them split as transformers
    # splits it (for SentencePiece vocabularies: no `▁` after a special token).
    fmt = JinjaChatFormat(ours, CHATML, "test", {})
    text = ("<|im_start|>user\nHi there<|im_end|>\n" if arch == "qwen2" else
            "<s>[INST] hello there [/INST] Hi</s>[INST] more [/INST]")
    assert fmt.encode_text(text) == theirs.encode(text, add_special_tokens=False)


def test_chat_template_comes_from_the_metadata_and_a_tokenizer_argument_overrides(tmp_path, tokenizers):
    path, _ = _write(tmp_path, "qwen2", "Q8_0", tokenizers, chat_template=CHATML)
    engine = build_engine(_cfg(path))
    assert isinstance(engine.chat_format, JinjaChatFormat)
    assert engine.chat_format.stop_ids >= {engine.tokenizer.special_ids["<|im_end|>"]}
    other = tmp_path / "tok"
    other.mkdir()
    build = build_engine(_cfg(path, tokenizer=write_tiny_hf_tokenizer(other)))
    assert not isinstance(build.tokenizer, GGUFTokenizer) and build.chat_format.name == "chatml"


def test_gguf_in_a_directory_and_split_files(tmp_path, tokenizers):
    path, state = _write(tmp_path, "llama", "F32", tokenizers)
    by_dir = build_engine(_cfg(path.parent)).model
    torch.testing.assert_close(_logits(by_dir), _logits(model_from_state(_args("llama"), state)))
    split = path.parent / "model-00001-of-00002.gguf"
    shutil.move(path, split)
    with pytest.raises(UserError, match="model-00002-of-00002.gguf is missing"):
        build_engine(_cfg(split))


def test_bad_gguf_is_one_line_naming_the_file(tmp_path, tokenizers, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    assert app.main([str(bad), "--prompt", "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(bad) in err and "\n" not in err
    args = _args("llama")
    state = {n: t for n, t in random_state(args).items() if n != "layers.1.feed_forward.w2.weight"}
    folder = tmp_path / "missing"
    folder.mkdir()
    path = write_gguf(folder / "m.gguf", args, state, tokenizers["llama"])
    with pytest.raises(UserError, match="missing weight 'layers.1.feed_forward.w2.weight'"):
        build_engine(_cfg(path))


def test_requested_quant_requantizes_and_says_so(tmp_path, tokenizers, capsys):
    path, _ = _write(tmp_path, "llama", "Q8_0", tokenizers)
    model = build_engine(_cfg(path, quant=QuantMode.INT4)).model
    assert model.layers[0].feed_forward.w2.format_type is Int4Weight
    assert "Q8_0 weights are dequantized and stored as int4" in capsys.readouterr().err


@pytest.mark.parametrize("kind, mode, tolerance", [
    ("Q2_K", "int4", 0.1), ("Q3_K", "int4", 0.1), ("Q4_K", "int4", 0.1), ("Q5_K", "int8", 0.01), ("Q6_K", "int8", 0.01),
])
def test_k_quants_are_dequantized_by_gguf_and_stored_in_the_default_format(tmp_path, tokenizers, capsys, kind, mode,
                                                                          tolerance):
    # K-quant blocks hold 256 values: every inner dimension is a multiple of 256. tolerance: the relative
    # (Frobenius) error of re-quantizing to int8 (per row) or int4 (groups of 128).
    args = tiny_args(vocab_size=400, dim=256, ffn_dim=512, max_seq_len=128)
    path = write_gguf(tmp_path / "k.gguf", args, random_state(args), tokenizers["llama"], {"linear": kind})
    model = build_engine(_cfg(path)).model
    assert f"{kind} weights are dequantized and stored as {mode}" in capsys.readouterr().err
    reference = dequantized_state(path, args)
    for name in ("layers.0.attention.wq", "layers.1.feed_forward.w2"):
        layer = model.get_submodule(name)
        assert layer.format_type is (Int8Weight if mode == "int8" else Int4Weight)
        w, ref = layer.weight_format().dequantize(), reference[f"{name}.weight"]
        assert float((w - ref).norm() / ref.norm()) < tolerance


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_1"])
def test_save_quantized_writes_what_was_read(tmp_path, tokenizers, kind):
    path, _ = _write(tmp_path, "qwen2", kind, tokenizers, chat_template=CHATML)
    out = tmp_path / "saved"
    assert app.main([str(path), "--save_quantized", str(out), "--device", "cpu"]) == 0
    direct, saved = build_engine(_cfg(path)), build_engine(_cfg(out))
    assert saved.model.layers[0].attention.wq.weight_format().group_size == 32
    assert torch.equal(_logits(saved.model), _logits(direct.model))
    assert all(saved.tokenizer.encode(t) == direct.tokenizer.encode(t) for t in TEXTS)
    assert saved.chat_format.render([]) == direct.chat_format.render([])  # the template came along


@pytest.mark.parametrize("kind, bits", [("Q8_0", 8), ("Q4_0", 4)])
def test_streamed_blocks_stay_in_their_bit_width(tmp_path, tokenizers, kind, bits, monkeypatch):
    # The offload machinery on the CPU (synchronous copies): the same path --use_offload takes on a GPU.
    from engine.gguf_build import load_gguf_offloaded
    from offload.policy import OffloadConfig

    from offload import block_buffers

    made = []  # data pointers of the home buffers made ahead for the blocks
    monkeypatch.setattr(block_buffers, "block_buffer", lambda n, make=block_buffers.block_buffer: _noted(make(n), made))
    path, _ = _write(tmp_path, "llama", kind, tokenizers)
    config = OffloadConfig(dtype=torch.float32, device=torch.device("cpu"), exclusions=frozenset(), max_seq_len=64,
                           prefill_chunk=64, verbose=False)
    net, offloaded = load_gguf_offloaded(open_gguf_model(path), None, config)
    block_weights = sum(math.prod(s) for n, s in _args("llama").block_weight_shapes().items() if "norm" not in n)
    per_block = offloaded.streamed_bytes / _args("llama").n_layers
    # bits per weight, plus at most one more for the fp16 scales (and zeros) of 32 weights, plus each of the
    # block's tensors (up to 3 per linear) aligned to 512 bytes in its home buffer.
    assert block_weights * bits / 8 < per_block <= block_weights * (bits + 1) / 8 + 21 * 512
    # converted straight into the buffers the store keeps (offload/block_buffers.py): none was copied
    assert sorted(offloaded.store.buffer(b).data_ptr() for b in offloaded.store.blocks) == sorted(made)
    torch.testing.assert_close(_logits(net), _logits(build_engine(_cfg(path)).model), atol=1e-5, rtol=1e-5)
    offloaded.close()


def _noted(buffer: torch.Tensor, made: list[int]) -> torch.Tensor:
    made.append(buffer.data_ptr())
    return buffer


def test_rope_scaling_and_sliding_window_come_from_the_file(tmp_path, tokenizers):
    from llama.config import Llama3RopeScaling

    args = replace(_args("llama"), rope_scaling=Llama3RopeScaling(factor=4.0), sliding_window=8)
    state = random_state(args, seed=4)
    path = write_gguf(tmp_path / "rope.gguf", args, state, tokenizers["llama"])
    engine = build_engine(_cfg(path))
    assert engine.args.rope_scaling == args.rope_scaling and engine.args.sliding_window == 8
    torch.testing.assert_close(_logits(engine.model), _logits(model_from_state(args, state)), atol=1e-5, rtol=1e-5)
