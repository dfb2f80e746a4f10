"""The benchmark's inflated twin predicts what the small model predicts."""
from __future__ import annotations

import torch

from bench.inflated_twin import inflated_weights, twin_args
from engine.config import BUNDLED_MODEL
from llama.loader import load_model
from llama.model import Transformer


def test_twin_logits_are_the_small_models():
    small = load_model(BUNDLED_MODEL, torch.float32, "cpu").eval()
    big_args = twin_args(small.args, dim=768, n_layers=8, ffn_dim=1536)
    assert big_args.head_dim == small.args.head_dim and big_args.n_heads % big_args.n_kv_heads == 0
    twin = Transformer(big_args)
    state = dict(inflated_weights(small.state_dict(), small.args, big_args, torch.device("cpu"), torch.float32))
    twin.load_state_dict(state, strict=True)
    tokens = torch.randint(0, small.args.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = small(tokens)[0], twin.eval()(tokens)[0]
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
