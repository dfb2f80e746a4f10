"""Shared plumbing for the speculative decoding tests: engines with a draft source and a forced plan."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from engine.build import Engine
from engine.speculative import attach_speculation
from llama.speculative.planner import TreeShape


def speculating(engine: Engine, shape: TreeShape | None = None, **cfg) -> Engine:
    """`engine` with a Speculator for cfg (draft=DIR, lookup=True, ...); with `shape`, every round uses it."""
    engine.cfg = replace(engine.cfg, **cfg)
    attach_speculation(engine)
    if shape is not None:
        force_shape(engine, shape)
    return engine


def force_shape(engine: Engine, shape: TreeShape) -> None:
    planner = engine.generator.speculator.planner
    planner.needs_probe = lambda: False
    planner.choose = lambda: shape


def without_speculation(engine: Engine) -> Engine:
    engine.generator.speculator = None
    return engine


def root_of(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
