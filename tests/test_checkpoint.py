"""Checkpoint readers and writers: name mapping, shard merging, formats, pass-through, user errors."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures import make_hf_model, make_meta_checkpoint, random_state, tiny_args
from llama.checkpoint import check_weights, iter_checkpoint, iter_weights, read_model_args
from llama.checkpoint_hf import canonical_name, hf_name, hf_to_meta_rows, meta_to_hf_rows
from llama.checkpoint_writer import write_hf_checkpoint, write_meta_checkpoint
from llama.config import Llama3RopeScaling, ModelArgs
from llama.errors import UserError
from llama.loader import load_model


def read_all(model_dir: Path, args: ModelArgs, allow_extra: bool = False) -> dict[str, torch.Tensor]:
    return dict(iter_weights(model_dir, args, allow_extra))


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


# -- names and layouts ------------------------------------------------------------------------


def test_hf_names_map_to_canonical_and_back() -> None:
    pairs = {
        "model.embed_tokens.weight": "tok_embeddings.weight",
        "model.layers.3.self_attn.q_proj.weight": "layers.3.attention.wq.weight",
        "model.layers.3.self_attn.k_proj.bias": "layers.3.attention.wk.bias",
        "model.layers.3.self_attn.v_proj.weight": "layers.3.attention.wv.weight",
        "model.layers.3.self_attn.o_proj.weight": "layers.3.attention.wo.weight",
        "model.layers.11.mlp.gate_proj.weight": "layers.11.feed_forward.w1.weight",
        "model.layers.11.mlp.down_proj.weight": "layers.11.feed_forward.w2.weight",
        "model.layers.11.mlp.up_proj.weight": "layers.11.feed_forward.w3.weight",
        "model.layers.0.input_layernorm.weight": "layers.0.attention_norm.weight",
        "model.layers.0.post_attention_layernorm.weight": "layers.0.ffn_norm.weight",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight",
        "model.layers.0.self_attn.q_proj.scales": "layers.0.attention.wq.scales",  # any leaf name
        "model.layers.0.self_attn.rotary_emb.inv_freq": "model.layers.0.self_attn.rotary_emb.inv_freq",
    }
    for hf, ours in pairs.items():
        assert canonical_name(hf) == ours
        assert hf_name(ours) == hf


def test_rope_row_permutation_inverts_and_moves_pairs_to_halves() -> None:
    n_heads, head_dim = 3, 8
    w = torch.randn(n_heads * head_dim, 5)
    hf = meta_to_hf_rows(w, n_heads, head_dim)
    assert torch.equal(hf_to_meta_rows(hf, n_heads, head_dim), w)
    # Meta's rows of head 1 are pairs (x0, x1), (x0, x1), ...; HF puts all x0 first, then all x1.
    head = w[head_dim : 2 * head_dim]
    assert torch.equal(hf[head_dim : 2 * head_dim], torch.cat([head[0::2], head[1::2]]))
    bias = torch.randn(n_heads * head_dim)
    assert torch.equal(hf_to_meta_rows(meta_to_hf_rows(bias, n_heads, head_dim), n_heads, head_dim), bias)


# -- configs ----------------------------------------------------------------------------------


def test_rope_scaling_is_read_from_v4_rope_scaling_and_v5_rope_parameters() -> None:
    base = tiny_args("llama").to_hf_config()
    del base["rope_theta"]
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    v4 = {**base, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **scaling}}
    v4_old_key = {**base, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **scaling}}
    v5 = {**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **scaling}}
    want = tiny_args("llama", rope_theta=500000.0, rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 64))
    for cfg in (v4, v4_old_key, v5):
        assert ModelArgs.from_hf_config(cfg) == want
    plain_v5 = {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}
    assert ModelArgs.from_hf_config(plain_v5) == tiny_args("llama", rope_theta=1000000.0)


def test_transformers_config_round_trips(tmp_path: Path) -> None:
    args = tiny_args("qwen2", tie_embeddings=True, rope_scaling=Llama3RopeScaling(4.0, 1.0, 4.0, 32))
    make_hf_model(args, tmp_path)  # transformers writes its own (v5: rope_parameters) config.json
    assert read_model_args(tmp_path) == args


# -- Meta shards ------------------------------------------------------------------------------


@pytest.mark.parametrize("n_shards", [2, 4])
@pytest.mark.parametrize("vocab_parallel", [False, True])
def test_meta_shards_merge_to_the_unsplit_weights(tmp_path: Path, n_shards: int, vocab_parallel: bool) -> None:
    args = tiny_args("llama", n_heads=8, n_kv_heads=4)
    state = make_meta_checkpoint(args, tmp_path / "one")
    make_meta_checkpoint(args, tmp_path / "split", state, n_shards=n_shards, vocab_parallel_embedding=vocab_parallel)
    # The shards have Meta's layout (checked on the files, not through our reader).
    shard = torch.load(tmp_path / "split" / "consolidated.01.pth", weights_only=True)
    q, kv, ffn, n = 8 * 8, 4 * 8, args.ffn_dim, n_shards
    assert shard["layers.0.attention.wq.weight"].shape == (q // n, 64)
    assert shard["layers.0.attention.wk.weight"].shape == (kv // n, 64)
    assert shard["layers.0.attention.wo.weight"].shape == (64, q // n)
    assert shard["layers.1.feed_forward.w1.weight"].shape == (ffn // n, 64)
    assert shard["layers.1.feed_forward.w2.weight"].shape == (64, ffn // n)
    assert shard["output.weight"].shape == (256 // n, 64)
    assert shard["tok_embeddings.weight"].shape == ((256 // n, 64) if vocab_parallel else (256, 64 // n))
    assert torch.equal(shard["layers.0.ffn_norm.weight"], state["layers.0.ffn_norm.weight"])

    assert read_model_args(tmp_path / "split") == read_model_args(tmp_path / "one") == args
    assert_same_state(read_all(tmp_path / "split", args), read_all(tmp_path / "one", args))
    assert_same_state(read_all(tmp_path / "split", args), state)


def test_meta_vocab_minus_one_comes_from_the_embedding_or_the_caller(tmp_path: Path) -> None:
    args = tiny_args("llama", n_heads=8, n_kv_heads=8)
    make_meta_checkpoint(args, tmp_path, n_shards=2)  # Llama 2 style: embedding split on its width
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))
    assert read_model_args(tmp_path).vocab_size == 256
    assert read_model_args(tmp_path, vocab_size=300).vocab_size == 300
    with pytest.raises(UserError, match=r"tok_embeddings\.weight.*\(256, 64\).*\(300, 64\)"):
        load_model(tmp_path, vocab_size=300)


def test_meta_reader_drops_rope_freqs_and_ties_a_missing_output(tmp_path: Path) -> None:
    args = tiny_args("llama", tie_embeddings=True)
    state = random_state(args)
    write_meta_checkpoint(state, args, tmp_path)
    shard = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    assert "output.weight" not in shard
    torch.save({**shard, "rope.freqs": torch.randn(8)}, tmp_path / "consolidated.00.pth")
    assert read_model_args(tmp_path) == args
    model = load_model(tmp_path)
    assert model.output.weight is model.tok_embeddings.weight
    assert torch.equal(model.output.weight, state["tok_embeddings.weight"])


# -- HF files ---------------------------------------------------------------------------------


def test_hf_sharded_with_index_reads_like_single_file(tmp_path: Path) -> None:
    args = tiny_args("qwen2")
    state = random_state(args)
    write_hf_checkpoint(state, args, tmp_path / "one")
    write_hf_checkpoint(state, args, tmp_path / "many", max_shard_bytes=30_000)
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert_same_state(read_all(tmp_path / "many", args), state)
    assert_same_state(read_all(tmp_path / "one", args), state)


def test_hf_writer_stores_hf_names_and_layout(tmp_path: Path) -> None:
    args = tiny_args("llama", tie_embeddings=True)
    state = random_state(args)
    write_hf_checkpoint(state, args, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors
    assert torch.equal(tensors["model.layers.1.mlp.down_proj.weight"], state["layers.1.feed_forward.w2.weight"])
    wq = tensors["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(wq, meta_to_hf_rows(state["layers.0.attention.wq.weight"], args.n_heads, args.head_dim))
    assert not torch.equal(wq, state["layers.0.attention.wq.weight"])


def test_load_in_other_dtypes_and_views_of_the_file(tmp_path: Path) -> None:
    args = tiny_args("mistral")
    state = random_state(args, dtype=torch.bfloat16)
    write_hf_checkpoint(state, args, tmp_path)
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        model = load_model(tmp_path, dtype=dtype)
        params = dict(model.named_parameters())
        assert all(p.dtype == dtype and not p.requires_grad for p in params.values())
        for name, t in state.items():
            assert torch.equal(params[name], t.to(dtype)), name
    weights = list(iter_checkpoint(tmp_path, args))
    assert all(w.tensor.dtype == torch.bfloat16 for w in weights)
    # Only un-permuted q/k are copies; the rest are views of the file's memory map.
    assert {w.name.split(".", 2)[-1] for w in weights if not w.mapped} == {"attention.wq.weight", "attention.wk.weight"}


# -- pass-through for quantized checkpoints ----------------------------------------------------


def test_extra_tensors_and_config_fields_pass_through(tmp_path: Path) -> None:
    args = tiny_args("llama")
    extra = {"layers.0.attention.wq.scales": torch.randn(64, 2), "quant_meta.table": torch.arange(16)}
    state = {**random_state(args), **extra}
    write_hf_checkpoint(state, args, tmp_path / "hf", extra_config={"quantization": {"bits": 4}})
    write_meta_checkpoint(state, args, tmp_path / "meta", n_shards=2, extra_params={"quantization": {"bits": 4}})
    assert "model.layers.0.self_attn.q_proj.scales" in load_file(tmp_path / "hf" / "model.safetensors")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["quantization"] == {"bits": 4}
    assert json.loads((tmp_path / "meta" / "params.json").read_text())["quantization"] == {"bits": 4}
    for fmt in ("hf", "meta"):
        assert read_model_args(tmp_path / fmt) == args
        assert_same_state(read_all(tmp_path / fmt, args, allow_extra=True), state)
        with pytest.raises(UserError, match="unexpected tensor 'layers.0.attention.wq.scales'"):
            read_all(tmp_path / fmt, args)


# -- user errors ------------------------------------------------------------------------------


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    args = tiny_args("llama")
    write_hf_checkpoint(random_state(args), args, tmp_path / "model")
    return tmp_path / "model"


def rewrite_tensors(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_error_missing_directory_and_no_weights(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'nope'}: no such directory")):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'empty'}: no weights found")):
        load_model(tmp_path / "empty")
    (tmp_path / "empty" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="pytorch_model.*not supported"):
        load_model(tmp_path / "empty")


def test_error_unknown_architecture(hf_dir: Path) -> None:
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(UserError, match=re.escape(f"{hf_dir / 'config.json'}: unsupported architecture 'GPT2LMHeadModel'")):
        load_model(hf_dir)


def test_error_bad_json(hf_dir: Path) -> None:
    (hf_dir / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=re.escape(f"{hf_dir / 'config.json'}: cannot read JSON")):
        load_model(hf_dir)


def test_error_wrong_shape_names_file_and_tensor(hf_dir: Path) -> None:
    def shrink(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"][:100]

    rewrite_tensors(hf_dir / "model.safetensors", shrink)
    pattern = r"model\.safetensors: tensor 'layers\.1\.feed_forward\.w3\.weight' \(model\.layers\.1\.mlp\.up_proj\.weight .*\(100, 64\).*\(160, 64\)"
    with pytest.raises(UserError, match=pattern):
        load_model(hf_dir)


def test_error_missing_weight(hf_dir: Path) -> None:
    rewrite_tensors(hf_dir / "model.safetensors", lambda t: t.pop("model.layers.0.self_attn.v_proj.weight"))
    with pytest.raises(UserError, match=re.escape(f"{hf_dir}: missing weight 'layers.0.attention.wv.weight'")):
        load_model(hf_dir)


def test_error_extra_weight(hf_dir: Path) -> None:
    rewrite_tensors(hf_dir / "model.safetensors", lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.ones(2)}))
    with pytest.raises(UserError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight'"):
        load_model(hf_dir)


def test_error_duplicate_weight_across_files(hf_dir: Path) -> None:
    save_file({"model.norm.weight": torch.ones(64)}, hf_dir / "model-extra.safetensors")
    with pytest.raises(UserError, match=r"safetensors: tensor 'norm\.weight' .*appears a second time"):
        load_model(hf_dir)


def test_error_corrupt_safetensors(hf_dir: Path) -> None:
    data = (hf_dir / "model.safetensors").read_bytes()
    (hf_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=re.escape(f"{hf_dir / 'model.safetensors'}: not a valid safetensors file")):
        load_model(hf_dir)


def test_error_index_lists_a_missing_file(tmp_path: Path) -> None:
    args = tiny_args("llama")
    write_hf_checkpoint(random_state(args), args, tmp_path, max_shard_bytes=30_000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(UserError, match=f"model.safetensors.index.json: lists {victim.name}, which does not exist"):
        load_model(tmp_path)


def test_error_corrupt_pth(tmp_path: Path) -> None:
    make_meta_checkpoint(tiny_args("llama"), tmp_path, n_shards=2)
    data = (tmp_path / "consolidated.01.pth").read_bytes()
    (tmp_path / "consolidated.01.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'consolidated.01.pth'}: cannot read PyTorch checkpoint")):
        load_model(tmp_path)


def test_error_meta_shard_missing_a_tensor_or_a_shard(tmp_path: Path) -> None:
    make_meta_checkpoint(tiny_args("llama"), tmp_path, n_shards=4)
    shard = torch.load(tmp_path / "consolidated.02.pth", weights_only=True)
    del shard["layers.1.attention.wo.weight"]
    torch.save(shard, tmp_path / "consolidated.02.pth")
    with pytest.raises(UserError, match=r"consolidated\.02\.pth: tensor 'layers\.1\.attention\.wo\.weight' is missing"):
        load_model(tmp_path)
    (tmp_path / "consolidated.02.pth").unlink()
    with pytest.raises(UserError, match="shards must be numbered 00 to 02, found consolidated.00.pth, consolidated.01.pth, consolidated.03.pth"):
        load_model(tmp_path)


def test_error_meta_params_missing_field(tmp_path: Path) -> None:
    make_meta_checkpoint(tiny_args("llama"), tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    del params["n_heads"]
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'params.json'}: missing field 'n_heads'")):
        load_model(tmp_path)


def test_check_weights_on_its_own() -> None:
    args = tiny_args("llama", n_layers=1)
    seen = dict(args.weight_shapes())
    check_weights(seen, args, "host buffers")
    with pytest.raises(UserError, match="host buffers: missing weight 'norm.weight'"):
        check_weights({k: v for k, v in seen.items() if k != "norm.weight"}, args, "host buffers")
    with pytest.raises(UserError, match=r"x: tensor 'layers\.0\.attention\.wk\.weight' has shape \(1, 64\)"):
        check_weights({**seen, "layers.0.attention.wk.weight": (1, 64)}, args, "x")
    with pytest.raises(UserError, match="x: unexpected tensor 'layers.7.ffn_norm.weight'"):
        check_weights({**seen, "layers.7.ffn_norm.weight": (64,)}, args, "x")
    check_weights({**seen, "layers.0.attention.wq.scales": (64, 2)}, args, "x", allow_extra=True)


def test_error_meta_names_in_a_hf_file(hf_dir: Path) -> None:
    rewrite_tensors(hf_dir / "model.safetensors", lambda t: t.update({"norm.weight": t.pop("model.norm.weight")}))
    with pytest.raises(UserError, match=r"model\.safetensors: tensor 'norm\.weight' has a Meta name"):
        load_model(hf_dir)


def test_hf_reader_prefers_model_files_without_an_index(hf_dir: Path) -> None:
    """Mistral's repositories hold consolidated.safetensors (Meta names) beside model.safetensors."""
    args = tiny_args("llama")
    save_file({"tok_embeddings.weight": torch.zeros(256, 64)}, hf_dir / "consolidated.safetensors")
    assert_same_state(read_all(hf_dir, args), random_state(args))
