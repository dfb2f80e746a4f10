"""Our model, loaded by our readers, against Hugging Face transformers on tiny random models (float32)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import greedy
from fixtures import make_hf_model, random_state, tiny_args
from llama.checkpoint_writer import write_hf_checkpoint, write_meta_checkpoint
from llama.config import Llama3RopeScaling
from llama.loader import load_model, model_from_state
from llama.model import Transformer

LLAMA3_ROPE = Llama3RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)

CASES = {
    "llama-mha-untied": tiny_args("llama"),
    "llama-gqa-llama3rope-tied": tiny_args(
        "llama", n_kv_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, tie_embeddings=True
    ),
    "llama-wide-heads": tiny_args("llama", n_heads=4, head_dim=32),  # n_heads * head_dim != dim
    "mistral-gqa": tiny_args("mistral", n_kv_heads=2),
    "mistral-sliding-window": tiny_args("mistral", n_kv_heads=2, sliding_window=8),  # prompt and decode pass it
    "qwen2-bias-gqa-tied": tiny_args("qwen2", n_kv_heads=2, tie_embeddings=True),
    "qwen2-bias-mha-untied": tiny_args("qwen2", n_kv_heads=4, rope_theta=1000000.0),
}
N_NEW = 32


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).norm() / ref.float().norm()).item()


def greedy_hf(model: torch.nn.Module, prompt: torch.Tensor, n_new: int) -> list[int]:
    """transformers' greedy generate(), never stopping early on an EOS id."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    out = model.generate(prompt, max_new_tokens=n_new, do_sample=False)
    return out[0, prompt.shape[1] :].tolist()


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_logits_and_greedy_tokens_match_transformers(name: str, tmp_path: Path) -> None:
    args = CASES[name]
    hf = make_hf_model(args, tmp_path, seed=1)
    ours = load_model(tmp_path)
    assert ours.args == args
    prompt = torch.randint(0, args.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))

    batch = torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    assert rel_err(ours(batch), hf(input_ids=batch).logits) < 1e-4

    tokens, _ = greedy(ours, prompt[0].tolist(), N_NEW)
    assert tokens == greedy_hf(hf, prompt, N_NEW)
    # The whole sequence in one pass (positions up to 44) agrees too.
    full = torch.cat([prompt, torch.tensor([tokens])], dim=1)
    assert rel_err(ours(full), hf(input_ids=full).logits) < 1e-4


@pytest.mark.parametrize(
    "name, feature", [("llama-gqa-llama3rope-tied", "rope_scaling"), ("mistral-sliding-window", "sliding_window")]
)
@torch.no_grad()
def test_each_special_case_changes_the_result(name: str, feature: str, tmp_path: Path) -> None:
    """The rope-scaling and sliding-window cases are not vacuous: without the feature our model would
    disagree with HF."""
    args = CASES[name]
    hf = make_hf_model(args, tmp_path, seed=1)
    without = Transformer(replace(args, **{feature: None}))
    without.load_state_dict(load_model(tmp_path).state_dict())
    tokens = torch.randint(0, args.vocab_size, (1, 48), generator=torch.Generator().manual_seed(4))
    assert rel_err(without(tokens), hf(input_ids=tokens).logits) > 1e-3


@pytest.mark.parametrize("name", ["llama-gqa-llama3rope-tied", "qwen2-bias-gqa-tied", "llama-wide-heads"])
@torch.no_grad()
def test_our_hf_writer_is_read_by_transformers(name: str, tmp_path: Path) -> None:
    """write_hf_checkpoint (sharded, with the index) gives files transformers reads to the same model."""
    import transformers

    args = CASES[name]
    state = random_state(args, seed=5)
    write_hf_checkpoint(state, args, tmp_path, max_shard_bytes=40_000)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = torch.randint(0, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(6))
    assert rel_err(model_from_state(args, state)(tokens), hf(input_ids=tokens).logits) < 1e-4


@torch.no_grad()
def test_hf_and_meta_copies_of_one_model_give_the_same_logits(tmp_path: Path) -> None:
    args = tiny_args("llama", n_heads=8, n_kv_heads=4, rope_theta=500000.0, rope_scaling=Llama3RopeScaling())
    hf = make_hf_model(args, tmp_path / "hf", seed=7)
    from_hf = load_model(tmp_path / "hf")
    state = dict(from_hf.state_dict())
    for n_shards, vocab_parallel in [(1, False), (2, False), (4, True)]:
        meta_dir = tmp_path / f"meta{n_shards}"
        write_meta_checkpoint(state, args, meta_dir, n_shards=n_shards, vocab_parallel_embedding=vocab_parallel)
        from_meta = load_model(meta_dir)
        assert from_meta.args == args
        tokens = torch.randint(0, args.vocab_size, (2, 20), generator=torch.Generator().manual_seed(n_shards))
        reference = hf(input_ids=tokens).logits
        assert rel_err(from_hf(tokens), reference) < 1e-4
        assert rel_err(from_meta(tokens), from_hf(tokens)) < 1e-6

