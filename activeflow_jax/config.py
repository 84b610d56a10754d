"""Static, hashable configurations.

`ModelConfig` is a frozen dataclass, so it can be passed as a static argument to jitted
functions and used as a cache key; it is also what the store's manifest records.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from activeflow_jax.errors import StoreError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and hyper-parameters of a Llama-family decoder."""

    arch: str  # "llama"
    num_layers: int
    d_model: int
    d_ff: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    norm_eps: float
    max_context: int
    tie_embeddings: bool
    name: str = ""

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(data) - {"name"}
        if missing:
            raise StoreError(f"model config in manifest lacks {sorted(missing)}; re-convert the store")
        return cls(**{k: v for k, v in data.items() if k in names})

    def num_params(self) -> int:
        per_layer = (
            2 * self.d_model  # norms
            + self.d_model * (self.q_dim + 2 * self.kv_dim)
            + self.q_dim * self.d_model
            + 3 * self.d_model * self.d_ff
        )
        head = 0 if self.tie_embeddings else self.d_model * self.vocab_size
        return self.vocab_size * self.d_model + self.num_layers * per_layer + self.d_model + head


def tiny_config(**overrides: Any) -> ModelConfig:
    """A small random-weight config for unit tests and demos (seconds to compile)."""
    base = dict(
        arch="llama", num_layers=2, d_model=64, d_ff=160, num_heads=4, num_kv_heads=2, head_dim=16,
        vocab_size=300, rope_theta=10000.0, norm_eps=1e-5, max_context=256, tie_embeddings=True,
        name="tiny-llama",
    )
    base.update(overrides)
    return ModelConfig(**base)
