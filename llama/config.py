"""ModelArgs: the shape of a Llama-family model, read from Meta's params.json or HF's config.json."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from llama.config_fields import float_field, int_field, object_field
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
        if self.n_heads < 1 or self.n_kv_heads < 1:
            raise UserError(f"n_heads ({self.n_heads}) and n_kv_heads ({self.n_kv_heads}) must be at least 1")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise UserError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
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
        dim = int_field(params, "dim", source)
        hidden = int(2 * 4 * dim / 3)
        multiplier = float_field(params, "ffn_dim_multiplier", source, None, positive=True)
        if multiplier:
            hidden = int(multiplier * hidden)
        multiple_of = int_field(params, "multiple_of", source, default=256)
        hidden = multiple_of * math.ceil(hidden / multiple_of)
        scaling = Llama3RopeScaling() if params.get("use_scaled_rope") else None
        vocab = int_field(params, "vocab_size", source, least=-1, default=-1)
        if vocab == 0:
            raise UserError(f"{source}: field 'vocab_size' must be positive, or -1 for the tokenizer's")
        return _build(
            source,
            dim=dim,
            n_layers=int_field(params, "n_layers", source),
            n_heads=int_field(params, "n_heads", source),
            n_kv_heads=int_field(params, "n_kv_heads", source, default=None),
            vocab_size=vocab,
            ffn_dim=hidden,
            norm_eps=float_field(params, "norm_eps", source, 1e-5, nonnegative=True),
            rope_theta=float_field(params, "rope_theta", source, 10000.0, positive=True),
            rope_scaling=scaling,
            max_seq_len=int_field(params, "max_seq_len", source, default=4096),
        )

    @staticmethod
    def from_hf_config(cfg: dict[str, Any], source: str = "config.json") -> ModelArgs:
        """HF config.json of LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM."""
        archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
        arch = _ARCHS.get(archs[0]) or _ARCHS.get(cfg.get("model_type", ""))
        if arch is None:
            raise UserError(f"{source}: unsupported architecture {archs[0]!r} (supported: {', '.join(_ARCHS)})")
        if cfg.get("hidden_act", "silu") != "silu" or cfg.get("mlp_bias"):
            raise UserError(f"{source}: only silu MLPs without bias are supported (hidden_act, mlp_bias)")
        rope = object_field(cfg, "rope_parameters", source)  # transformers v5
        theta = float_field(cfg, "rope_theta", source, None, positive=True)
        theta = theta if theta is not None else float_field(rope, "rope_theta", source, 10000.0, positive=True)
        scaling_cfg = object_field(cfg, "rope_scaling", source) or rope
        rope_type = scaling_cfg.get("rope_type", scaling_cfg.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            scaling = _llama3_scaling(scaling_cfg, f"{source}: rope_scaling")
        elif rope_type not in ("default", None):
            raise UserError(f"{source}: unsupported rope_scaling type {rope_type!r} (supported: default, llama3)")
        return _build(
            source,
            dim=int_field(cfg, "hidden_size", source),
            n_layers=int_field(cfg, "num_hidden_layers", source),
            n_heads=int_field(cfg, "num_attention_heads", source),
            n_kv_heads=int_field(cfg, "num_key_value_heads", source, default=None),
            head_dim=int_field(cfg, "head_dim", source, default=None),
            vocab_size=int_field(cfg, "vocab_size", source),
            ffn_dim=int_field(cfg, "intermediate_size", source),
            norm_eps=float_field(cfg, "rms_norm_eps", source, 1e-5, nonnegative=True),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=int_field(cfg, "max_position_embeddings", source, default=4096),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
            sliding_window=_sliding_window(cfg, arch, source),
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


def _sliding_window(cfg: dict[str, Any], arch: str, source: str) -> int | None:
    """Mistral: sliding_window when set. Qwen2: only with use_sliding_window, and only if every layer uses it."""
    window = int_field(cfg, "sliding_window", source, default=None)
    if arch == "mistral" or window is None:
        return window
    if arch == "qwen2" and cfg.get("use_sliding_window"):
        if cfg.get("max_window_layers", 0) not in (0,):
            raise UserError(f"{source}: Qwen2 with sliding windows on only some layers is not supported")
        return window
    return None


def _llama3_scaling(cfg: dict[str, Any], source: str) -> Llama3RopeScaling:
    """rope_type "llama3": every field is needed, and high_freq_factor must exceed low_freq_factor."""
    scaling = Llama3RopeScaling(
        factor=float_field(cfg, "factor", source, positive=True),
        low_freq_factor=float_field(cfg, "low_freq_factor", source, positive=True),
        high_freq_factor=float_field(cfg, "high_freq_factor", source, positive=True),
        original_max_position_embeddings=int_field(cfg, "original_max_position_embeddings", source),
    )
    if scaling.high_freq_factor <= scaling.low_freq_factor:
        raise UserError(f"{source}: 'high_freq_factor' ({scaling.high_freq_factor}) must exceed "
                        f"'low_freq_factor' ({scaling.low_freq_factor})")
    return scaling


def _build(source: str, **fields: Any) -> ModelArgs:
    """ModelArgs(**fields), or a UserError naming source when the head counts do not fit the sizes."""
    try:
        args = ModelArgs(**fields)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    if args.head_dim % 2:
        raise UserError(f"{source}: the head size ({args.head_dim}) must be even for rotary embeddings")
    return args


_ARCHS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
}
