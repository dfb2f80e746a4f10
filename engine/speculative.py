"""Attach speculative decoding to a built Engine: the draft model (a second, resident build), lookup, planner."""
from __future__ import annotations

import sys
from typing import TextIO

from engine.build import Engine, build_engine
from engine.config import RunConfig
from engine.flag_values import parse_device
from llama.decode_graphs import MAX_GRAPH_TOKENS
from llama.dense_row_check import CHUNK as ROWS_A_CALL
from llama.errors import UserError
from llama.generation import Generator
from llama.speculative.decoder import Speculator
from llama.speculative.draft import DraftModel
from llama.speculative.lookup import PromptLookup
from llama.speculative.planner import Planner, TreeShape
from offload.kernels.few_token_linear import FEW_TOKENS

# The planner's cap without --draft_tokens; on the CPU, what a pass takes through the compiled GEMV. On the GPU a
# tree's matmuls keep each row's one-token bits (llama/tree_rows.py): the int4 GEMV in one launch a matrix, cuBLAS in
# calls of 8 rows. The planner's probe times a pass of the cap's size, so where large trees cost more it picks smaller
# ones; streamed 7B speculation on an H200 went faster with 256 than with 64 (BENCHMARKS.md, tenth session).
MAX_TREE_TOKENS = {"cuda": 256, "cpu": FEW_TOKENS}


def default_tree_cap(generator: Generator) -> int:
    """Tokens per target pass the planner may use without --draft_tokens. A resident GPU model's pass reads every
    weight once per matmul call, and an exact tree's calls take ROWS_A_CALL rows each (cuBLAS where checked, our
    int4 GEMV's chunks): a tree of up to ROWS_A_CALL tokens costs about one step, each further ROWS_A_CALL about
    another (H200, 7B fp16: 32 tokens took 4.4 steps, BENCHMARKS.md tenth session)."""
    if generator.steps is not None:
        return min(MAX_GRAPH_TOKENS, ROWS_A_CALL)
    return MAX_TREE_TOKENS[generator.device.type]


def attach_speculation(engine: Engine, log: TextIO | None = None, shape: TreeShape | None = None) -> None:
    """Give engine.generator a Speculator when --draft or --lookup asks for one (`shape`: always that one)."""
    cfg = engine.cfg
    log = log if log is not None else sys.stderr
    if cfg.draft is None and not cfg.lookup:
        return
    draft = DraftModel(build_draft(engine, log).generator) if cfg.draft is not None else None
    cap = cfg.draft_tokens or default_tree_cap(engine.generator)
    announce = lambda line: print(line, file=log)  # noqa: E731
    planner = Planner(cap, draft is not None, announce, shape)
    lookup = PromptLookup() if cfg.lookup else None
    engine.generator.speculator = Speculator(draft, lookup, planner, announce)


def build_draft(engine: Engine, log: TextIO) -> Engine:
    """The draft as an Engine of its own: resident on the target's device, its context the target's."""
    cfg = engine.cfg
    draft_cfg = RunConfig(
        model_dir=cfg.draft,
        device=parse_device(str(engine.device)),
        dtype=cfg.dtype,
        ctx=engine.ctx,
        prefill_chunk=cfg.prefill_chunk,
        chat_format="raw",
        quant=cfg.draft_quant,
        graphs=cfg.graphs,
    )
    try:
        draft = build_engine(draft_cfg, log)
    except UserError as e:
        raise UserError(f"--draft {cfg.draft}: {e}") from None
    check_same_vocabulary(engine, draft)
    return draft


def check_same_vocabulary(target: Engine, draft: Engine) -> None:
    """The draft proposes token ids, so they must mean the same pieces as the target's."""
    t, d = target.tokenizer, draft.tokenizer
    where = f"--draft {draft.cfg.model_dir}"
    if t.vocab_size != d.vocab_size:
        raise UserError(f"{where}: its tokenizer has {d.vocab_size} tokens, the model's has {t.vocab_size}")
    if draft.args.vocab_size < t.vocab_size:
        raise UserError(f"{where}: its vocab_size {draft.args.vocab_size} is smaller than the tokenizer's")
    differ = next((i for i in range(t.vocab_size) if t.id_to_piece(i) != d.id_to_piece(i)), None)
    if differ is not None:
        raise UserError(
            f"{where}: a different tokenizer (token {differ} is {d.id_to_piece(differ)!r} there, "
            f"{t.id_to_piece(differ)!r} here)"
        )

