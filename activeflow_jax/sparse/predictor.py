"""Cross-layer prediction of active channels from the residual stream.

The inputs of q/k/v (and of gate/up) at layer j are RMSNorm(x_j) * g_j, where x_j is the residual
stream entering the op and g_j the norm's gain. The residual changes slowly, so from the residual
x_i known at an earlier layer i the active channels of layer j are predicted by:

    "residual_gain"   |x_i| * |g_j|   (the target layer's own norm gain, known in advance)
    "previous_input"  |RMSNorm(x_i) * g_i|, i.e. reuse layer i's own active set (the naive rule)

RMSNorm only rescales a token's vector by one number, so ranking by |x| * |g| is ranking by the
normed input the op will see if x_j were x_i. A superset (more than k channels) is loaded; the
exact top-k is then taken inside it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from activeflow_jax.config import PREDICTOR_SCORES
from activeflow_jax.sparse.kernels import kth_largest

SCORES = PREDICTOR_SCORES  # the names config.PredictionConfig accepts


def prediction_score(residual: jax.Array, gain_target: jax.Array, gain_source: jax.Array, score: str) -> jax.Array:
    """Score per channel ([..., d]) for the target op's active set; larger = more likely active."""
    if score == "residual_gain":
        return jnp.abs(residual) * jnp.abs(gain_target)
    if score == "previous_input":
        return jnp.abs(residual) * jnp.abs(gain_source)
    raise ValueError(f"unknown predictor score {score!r}")


def top_mask(score: jax.Array, n: int) -> jax.Array:
    """Boolean mask [..., d] of the n largest entries along the last axis."""
    if n >= score.shape[-1]:
        return jnp.ones(score.shape, bool)

    return score >= kth_largest(score, n)[..., None]
