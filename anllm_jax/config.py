"""Model configuration and named presets."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

ANCHOR_MODES = ("full", "ep", "ac")
ATTENTION_IMPLS = ("xla", "cudnn", "anchor")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{field}={value!r} is not one of {', '.join(choices)}")


def _suggest(name: str, names: Any) -> str:
    close = difflib.get_close_matches(name, list(names), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (HF `rope_type: llama3`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder. Frozen and hashable so it can be a static jit argument."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_eps: float = 1e-5
    tie_embeddings: bool = False
    max_seq_len: int = 4096
    param_dtype: str = "float32"
    dtype: str = "bfloat16"
    remat: str = "none"
    attention: str = "xla"
    # Anchor mode of the model: "full" (plain causal), "ep" (existing tokens such as "." are anchors) or
    # "ac" (the added <AC> token). anchor_ids are the token ids that count as anchors in ep/ac.
    anchor_mode: str = "full"
    anchor_ids: tuple[int, ...] = ()
    pad_id: int | None = None
    bos_id: int | None = None
    eos_id: int | None = None

    def __post_init__(self) -> None:
        _check_choice("anchor_mode", self.anchor_mode, ANCHOR_MODES)
        _check_choice("attention", self.attention, ATTENTION_IMPLS)
        _check_choice("remat", self.remat, REMAT_POLICIES)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; "
                "grouped-query attention needs whole groups"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        object.__setattr__(self, "anchor_ids", tuple(int(i) for i in self.anchor_ids))

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["anchor_ids"] = list(self.anchor_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in names:
                raise ValueError(f"unknown model config key {key!r}{_suggest(key, names)}")
        return cls(**d)

    def num_params(self) -> int:
        d, f, h = self.d_model, self.ffn_dim, self.head_dim
        attn = d * h * (2 * self.n_heads + 2 * self.n_kv_heads)
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.n_layers * per_layer + d + head


PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        vocab_size=49152,
        d_model=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        ffn_dim=1536,
        rope_theta=100000.0,
        tie_embeddings=True,
        max_seq_len=8192,
        bos_id=1,
        eos_id=2,
    ),
    "llama3.2-1b": ModelConfig(
        vocab_size=128256,
        d_model=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        head_dim=64,
        ffn_dim=8192,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
        tie_embeddings=True,
        max_seq_len=131072,
        bos_id=128000,
        eos_id=128001,
    ),
    "llama2-7b": ModelConfig(
        vocab_size=32000,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        head_dim=128,
        ffn_dim=11008,
        rope_theta=10000.0,
        max_seq_len=4096,
        bos_id=1,
        eos_id=2,
    ),
    # Small sizes for tests and CPU smoke runs.
    "tiny": ModelConfig(
        vocab_size=256,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn_dim=128,
        max_seq_len=512,
        dtype="float32",
    ),
    "small": ModelConfig(
        vocab_size=8192,
        d_model=256,
        n_layers=4,
        n_heads=8,
        n_kv_heads=4,
        head_dim=32,
        ffn_dim=704,
        max_seq_len=2048,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Return the named preset, with fields replaced by `overrides`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}{_suggest(name, PRESETS)}; presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)
