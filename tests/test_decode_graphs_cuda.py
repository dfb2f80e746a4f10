"""CUDA graphs for decode steps (llama/decode_graphs.py) give the tokens decoding op by op gives (--no_graphs):
fp16, bf16, int8, int4, a sliding window, sampling, a draft model's steps, and across a kv-bucket boundary."""
from __future__ import annotations

import importlib.util
import io
import math
from dataclasses import replace

import pytest
import torch
from cli_runner import run_app
from conftest import greedy
from fixtures import random_state, tiny_args
from tiny_tokenizer import train_tiny_sentencepiece
from speculative_testing import speculating
from tiny_model import GREEDY, make_tiny_model_dir

from engine.build import build_engine
from engine.config import DeviceSpec, RunConfig
from llama.checkpoint_writer import write_hf_checkpoint
from llama.generation import GenerationStats
from llama.sampling import Sampler, SamplingParams
from llama.speculative.planner import TreeShape
from offload.quant_mode import QuantMode

pytestmark = pytest.mark.cuda

CTX = 1024  # buckets 256, 512, 1024
PROMPT_LEN, NEW = 230, 60  # decode positions 230..289 cross from the 256 bucket into the 512 one
MODES = [
    {"dtype": "float16"},
    {"dtype": "bfloat16"},
    {"dtype": "float16", "quant": QuantMode.INT8},
    {"dtype": "bfloat16", "quant": QuantMode.INT4},
]


def _ids(mode: dict) -> str:
    return ",".join(f"{k}={getattr(v, 'value', v)}" for k, v in mode.items())


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> RunConfig:
    model_dir = make_tiny_model_dir(tmp_path_factory.mktemp("graphs"), ctx=CTX, ffn_dim=256)
    return RunConfig(model_dir=model_dir, device=DeviceSpec("cuda"), ctx=CTX, sampling=GREEDY)


def _prompt(n: int = PROMPT_LEN) -> list[int]:
    return [1] + torch.randint(3, 400, (n - 1,), generator=torch.Generator().manual_seed(0)).tolist()


def _generate(cfg: RunConfig, sampling: SamplingParams = GREEDY, new: int = NEW, **spec):
    engine = build_engine(cfg, log=io.StringIO())
    if spec:
        speculating(engine, **spec)
    tokens = engine.generator.generate(_prompt(), Sampler(sampling), new, stop_ids=set()).token_ids
    return tokens, engine


@pytest.mark.parametrize("mode", MODES, ids=_ids)
def test_graphs_on_and_off_give_the_same_tokens_across_a_bucket_boundary(base, mode):
    on, engine = _generate(replace(base, **mode))
    off, plain = _generate(replace(base, graphs=False, **mode))
    assert len(on) == NEW and on == off
    assert {bucket for _, _, bucket in engine.generator.steps._graphs} == {256, 512}  # both were captured
    assert not plain.generator.steps._graphs
    steps = engine.generator.steps
    assert steps.captured == len(steps._graphs) and 0 < steps.capture_estimate < math.inf  # what a start would pay
    assert steps.first_capture_seconds > steps.capture_estimate / 2  # the first recording and its warm-up, at least
    assert plain.generator.steps.capture_estimate == math.inf  # nothing recorded


@pytest.mark.parametrize("mode", MODES[:1] + MODES[3:], ids=_ids)
def test_bucketed_steps_stay_close_to_the_models_own_decode(base, mode):
    """The step attends over a padded bucket with a mask; the model's plain decode over the exact length. The
    steps are fed the model's own tokens: int4 steps round x to int8 (offload/kernels/int4_gemv_cuda.py), so a
    near-tie of this random model can part the two greedy paths, and from there they compare nothing."""
    _, engine = _generate(replace(base, **mode), new=2)
    model, dtype = engine.model, engine.dtype
    expected, expected_logits = greedy(model, _prompt(), 40, "cuda", dtype, CTX)
    engine.generator.reset()
    gen = engine.generator
    logits = gen.prefill(_prompt(), GenerationStats())
    seen = []
    for pos, token in zip(range(PROMPT_LEN, PROMPT_LEN + 40), expected):
        seen.append(logits)
        logits = gen._forward([token], pos)
    seen = torch.stack(seen)
    agree = float((seen.argmax(-1).cpu() == torch.tensor(expected)).float().mean())
    assert agree == 1.0 if "quant" not in mode else agree >= 0.9
    rel = (seen - expected_logits).norm() / expected_logits.norm()
    assert rel < (1e-2 if "quant" not in mode else 3e-2)


def test_sliding_window_decodes_the_same_with_graphs(tmp_path):
    args = tiny_args("mistral", vocab_size=400, max_seq_len=CTX, sliding_window=48, ffn_dim=256)
    model_dir = tmp_path / "mistral"
    write_hf_checkpoint(random_state(args, seed=4), args, model_dir)  # params.json has no window
    train_tiny_sentencepiece(model_dir)
    cfg = RunConfig(model_dir=model_dir, device=DeviceSpec("cuda"), dtype="float16", ctx=CTX, sampling=GREEDY)
    on, engine = _generate(cfg)
    off, _ = _generate(replace(cfg, graphs=False))
    expected, _ = greedy(engine.model, _prompt(), NEW, "cuda", torch.float16, CTX)
    assert on == off == expected


def test_sampling_copies_logits_back_and_draws_the_same_tokens(base):
    sampling = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=7)
    on, _ = _generate(replace(base, dtype="float16"), sampling)
    off, _ = _generate(replace(base, dtype="float16", graphs=False), sampling)
    assert on == off


@pytest.mark.parametrize("draft_quant", [None, QuantMode.INT4])
def test_a_draft_models_captured_steps_propose_what_its_eager_steps_do(base, tmp_path, draft_quant):
    draft = make_tiny_model_dir(tmp_path, name="draft", ctx=CTX, dim=32, n_heads=2, n_kv_heads=2, ffn_dim=128)
    # float32: the target's tree passes and its one-token steps are different kernels, and in bfloat16 their
    # rounding flipped a near-tie of this long random prompt (at token 25, whatever the draft proposed)
    cfg = replace(base, dtype="float32")
    plain, _ = _generate(cfg)
    on, engine = _generate(cfg, shape=TreeShape(4, 3), draft=draft, draft_quant=draft_quant)
    off, _ = _generate(replace(cfg, graphs=False), shape=TreeShape(4, 3), draft=draft, draft_quant=draft_quant)
    assert on == off
    assert on == plain
    draft_steps = engine.generator.speculator.draft.generator.steps
    assert any(tree for tree, _, _ in draft_steps._graphs)  # tree levels were replayed from graphs


def test_a_streamed_model_decodes_without_steps(base):
    _, engine = _generate(replace(base, dtype="float16", use_offload=True), new=4)
    assert engine.generator.steps is None


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_use_8bit_decodes_eagerly_with_one_note(base):
    log = io.StringIO()
    engine = build_engine(replace(base, dtype="float16", quant=QuantMode.BNB), log=log)
    tokens = engine.generator.generate(_prompt(40), Sampler(GREEDY), 8, stop_ids=set()).token_ids
    assert len(tokens) == 8
    assert "without CUDA graphs" in log.getvalue() and not engine.generator.steps.capture


def test_no_graphs_through_the_command_line_gives_the_same_reply(base):
    args = [str(base.model_dir), "--prompt", "The quick brown fox", "--max_new_tokens", "40", "--temperature", "0",
            "--device", "cuda", "--chat_format", "raw"]
    on, off = run_app(*args), run_app(*args, "--no_graphs")
    assert on.returncode == off.returncode == 0, on.stderr + off.stderr
    assert on.stdout == off.stdout and on.stdout.strip()
