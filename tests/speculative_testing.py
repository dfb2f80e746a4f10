"""Shared plumbing for the speculative decoding tests: engines with a draft source and a forced plan."""
from __future__ import annotations

from dataclasses import replace

from engine.build import Engine
from engine.speculative import attach_speculation
from llama.speculative.planner import TreeShape


def speculating(engine: Engine, shape: TreeShape | None = None, **cfg) -> Engine:
    """`engine` with a Speculator for cfg (draft=DIR, lookup=True, ...); with `shape`, every round uses it."""
    engine.cfg = replace(engine.cfg, **cfg)
    attach_speculation(engine, shape=shape)
    return engine


def force_shape(engine: Engine, shape: TreeShape | None) -> None:
    """Every round uses `shape` from now on (None: the planner chooses again)."""
    engine.generator.speculator.planner.fixed = shape


def start_at_once(monkeypatch) -> None:
    """Speculation starts as soon as the planner would probe, however short the reply (tests of what it does then)."""
    from llama.speculative.decoder import Speculator

    monkeypatch.setattr(Speculator, "_start_pays", lambda *args: True)
