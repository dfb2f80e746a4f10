"""ModelArgs: the shape of a Llama-family model, read from Meta's params.json or HF's config.json."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from llama.errors import UserError


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's frequency-dependent RoPE stretch (rope_type "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    ffn_dim: int
    n_kv_heads: int | None = None  # None: same as n_heads (no GQA)
    head_dim: int | None = None  # None: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    max_seq_len: int = 4096  # longest context the KV cache is sized for
    tie_embeddings: bool = False  # output head shares tok_embeddings' weight
    qkv_bias: bool = False  # Qwen2 has biases on wq, wk, wv
    sliding_window: int | None = None  # Mistral v0.1: a query sees only the last this-many keys
    arch: str = "llama"  # llama | mistral | qwen2 (only changes defaults and chat format detection)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")

    # -- sizes used by the planner ------------------------------------------------------------
    def block_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of one block's weights, by the short names the exclusion list uses."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "attention.wq.weight": (q, self.dim),
            "attention.wk.weight": (kv, self.dim),
            "attention.wv.weight": (kv, self.dim),
            "attention.wo.weight": (self.dim, q),
            "feed_forward.w1.weight": (self.ffn_dim, self.dim),
            "feed_forward.w2.weight": (self.dim, self.ffn_dim),
            "feed_forward.w3.weight": (self.ffn_dim, self.dim),
            "attention_norm.weight": (self.dim,),
            "ffn_norm.weight": (self.dim,),
        }
        if self.qkv_bias:
            shapes.update({"attention.wq.bias": (q,), "attention.wk.bias": (kv,), "attention.wv.bias": (kv,)})
        return shapes

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight of the model by its canonical (Meta) name."""
        shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (self.vocab_size, self.dim)}
        for i in range(self.n_layers):
            for name, shape in self.block_weight_shapes().items():
                shapes[f"layers.{i}.{name}"] = shape
        shapes["norm.weight"] = (self.dim,)
        if not self.tie_embeddings:
            shapes["output.weight"] = (self.vocab_size, self.dim)
        return shapes

    def kv_cache_bytes(self, seq_len: int, dtype: torch.dtype, batch: int = 1) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.n_layers * batch * seq_len * self.n_kv_heads * self.head_dim * elem

    def with_vocab(self, vocab_size: int) -> ModelArgs:
        return replace(self, vocab_size=vocab_size)

    # -- readers ------------------------------------------------------------------------------
    @staticmethod
    def from_meta_params(params: dict[str, Any], source: str = "params.json") -> ModelArgs:
        """Meta's params.json. vocab_size -1 means "ask the tokenizer" (caller fixes it with with_vocab)."""
        try:
            dim, n_layers, n_heads = int(params["dim"]), int(params["n_layers"]), int(params["n_heads"])
        except KeyError as e:
            raise UserError(f"{source}: missing field {e.args[0]!r}") from None
        hidden = int(2 * 4 * dim / 3)
        if params.get("ffn_dim_multiplier"):
            hidden = int(params["ffn_dim_multiplier"] * hidden)
        multiple_of = int(params.get("multiple_of", 256))
        hidden = multiple_of * math.ceil(hidden / multiple_of)
        scaling = Llama3RopeScaling() if params.get("use_scaled_rope") else None
        return ModelArgs(
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=params.get("n_kv_heads"),
            vocab_size=int(params.get("vocab_size", -1)),
            ffn_dim=hidden,
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_seq_len=int(params.get("max_seq_len", 4096)),
        )

    @staticmethod
    def from_hf_config(cfg: dict[str, Any], source: str = "config.json") -> ModelArgs:
        """HF config.json of LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM."""
        archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
        arch = _ARCHS.get(archs[0]) or _ARCHS.get(cfg.get("model_type", ""))
        if arch is None:
            raise UserError(f"{source}: unsupported architecture {archs[0]!r} (supported: {', '.join(_ARCHS)})")
        try:
            dim, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            n_layers, ffn = int(cfg["num_hidden_layers"]), int(cfg["intermediate_size"])
            vocab = int(cfg["vocab_size"])
        except KeyError as e:
            raise UserError(f"{source}: missing field {e.args[0]!r}") from None
        if cfg.get("hidden_act", "silu") != "silu" or cfg.get("mlp_bias"):
            raise UserError(f"{source}: only silu MLPs without bias are supported (hidden_act, mlp_bias)")
        rope = cfg.get("rope_parameters") or {}  # transformers v5
        theta = float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0)
        scaling_cfg = cfg.get("rope_scaling") or rope
        scaling = None
        rope_type = scaling_cfg.get("rope_type", scaling_cfg.get("type", "default")) if scaling_cfg else "default"
        if rope_type == "llama3":
            scaling = Llama3RopeScaling(
                factor=float(scaling_cfg["factor"]),
                low_freq_factor=float(scaling_cfg["low_freq_factor"]),
                high_freq_factor=float(scaling_cfg["high_freq_factor"]),
                original_max_position_embeddings=int(scaling_cfg["original_max_position_embeddings"]),
            )
        elif rope_type not in ("default", None):
            raise UserError(f"{source}: unsupported rope_scaling type {rope_type!r} (supported: default, llama3)")
        return ModelArgs(
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads"),
            head_dim=cfg.get("head_dim"),
            vocab_size=vocab,
            ffn_dim=ffn,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=int(cfg.get("max_position_embeddings", 4096)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
            sliding_window=_sliding_window(cfg, arch),
            arch=arch,
        )

    def to_hf_config(self) -> dict[str, Any]:
        """A config.json that transformers (and our reader) accept for this shape."""
        archs = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        cfg: dict[str, Any] = {
            "architectures": [archs[self.arch]],
            "model_type": self.arch,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
        }
        if self.arch == "llama":
            cfg["attention_bias"] = self.qkv_bias
        if self.rope_scaling is not None:
            cfg["rope_scaling"] = {"rope_type": "llama3", **asdict(self.rope_scaling)}
        if self.arch in ("mistral", "qwen2"):
            cfg["sliding_window"] = self.sliding_window
            if self.arch == "qwen2":
                cfg["use_sliding_window"] = self.sliding_window is not None
                cfg["max_window_layers"] = 0  # every layer uses the window when it is on
        return cfg


def _sliding_window(cfg: dict[str, Any], arch: str) -> int | None:
    """Mistral: sliding_window when set. Qwen2: only with use_sliding_window, and only if every layer uses it."""
    window = cfg.get("sliding_window")
    if arch == "mistral" or window is None:
        return window
    if arch == "qwen2" and cfg.get("use_sliding_window"):
        if cfg.get("max_window_layers", 0) not in (0,):
            raise UserError("config.json: Qwen2 with sliding windows on only some layers is not supported")
        return int(window)
    return None


_ARCHS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
}
