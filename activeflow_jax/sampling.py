"""Next-token sampling: greedy, or temperature + top-p (nucleus) with an explicit PRNG key."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from activeflow_jax.errors import InvalidArgumentError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_p 1 disables nucleus filtering."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        t, p = self.temperature, self.top_p
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise InvalidArgumentError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if not isinstance(p, (int, float)) or not (0 < p <= 1):
            raise InvalidArgumentError(f"top_p must be in (0, 1], got {p!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not -2**63 <= self.seed < 2**63:
            raise InvalidArgumentError(f"seed must be a 64-bit int (|seed| < 2**63), got {self.seed!r}")


def first_argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax of a 1-D array (the first maximum; the first NaN if there is one) as int32.
    XLA:CPU runs argmax as a variadic (value, index) reduction: ~0.24 ms for SmolLM2's 49152
    logits, 1-2% of a decode step; a max and a min over the hits take ~0.05 ms."""
    m = jnp.max(x)
    hit = (x == m) | jnp.isnan(x)
    return jnp.min(jnp.where(hit, jnp.arange(x.shape[0], dtype=jnp.int32), x.shape[0]))


@jax.jit
def sample_token(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits: [V] float32 -> token id (int32 scalar). Branches are taken at run time, so
    changing temperature or top_p never recompiles; the sort only runs when top_p < 1."""

    def nucleus(scaled):
        sorted_desc = jnp.sort(scaled)[::-1]
        probs = jax.nn.softmax(sorted_desc)
        mass_before = jnp.cumsum(probs) - probs
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_desc, jnp.inf))
        return jnp.where(scaled >= cutoff, scaled, -jnp.inf)

    def sample():
        scaled = logits / temperature
        scaled = jax.lax.cond(top_p < 1.0, nucleus, lambda s: s, scaled)
        return jax.random.categorical(key, scaled).astype(jnp.int32)

    return jax.lax.cond(temperature <= 0.0, lambda: first_argmax(logits), sample)
