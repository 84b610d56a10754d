"""Top-k channel selection and sparse linear kernels (pure jnp, traced inside the model's jit).

For y = x @ W with W stored [in, out], input channel j contributes only through row j of W. A
sparse op keeps k channels (static) of x; the decode kernel gathers those k rows and multiplies a
[k] vector by a [k, out] matrix, so it reads k/in of the weight bytes. Prefill (T > 1) and the
evaluation path use the masked dense product, which computes the same function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def active_mask(x: jax.Array, k: int, threshold: jax.Array | float, policy: str) -> jax.Array:
    """Boolean mask [..., in] of the active channels of x: the top-k by |x|, and with the
    "threshold" policy only those with |x| >= threshold (so at most k, maybe fewer)."""
    a = jnp.abs(x)
    if k >= x.shape[-1]:
        cut = jnp.zeros_like(a[..., :1])
    else:
        cut = jax.lax.top_k(a, k)[0][..., -1:]
    if policy == "threshold":
        cut = jnp.maximum(cut, threshold)
    return a >= cut


def masked_linear(x: jax.Array, w: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.where(mask, x, 0.0) @ w


def gather_linear(x: jax.Array, w: jax.Array, k: int, threshold: jax.Array | float, policy: str) -> jax.Array:
    """Decode kernel for one token: x [1, in], w [in, out] -> [1, out], reading k rows of w."""
    values, idx = jax.lax.top_k(jnp.abs(x[0]), k)
    idx = jnp.sort(idx)  # ascending rows: the gather walks memory forwards
    xk = x[0, idx]
    if policy == "threshold":
        xk = jnp.where(jnp.abs(xk) >= threshold, xk, 0.0)
    rows = w.at[idx].get(mode="promise_in_bounds", indices_are_sorted=True, unique_indices=True)
    return (xk @ rows)[None]


def sparse_linear(x: jax.Array, w: jax.Array, *, k: int, threshold: jax.Array | float, policy: str,
                  kernel: str, restrict: jax.Array | None = None) -> jax.Array:
    """y = x @ w over the active channels of x. `restrict` ([..., in] bool) limits which channels
    may be active (a predicted set whose misses are dropped)."""
    if restrict is None and kernel == "gather" and x.shape[0] == 1 and k < x.shape[-1]:
        return gather_linear(x, w, k, threshold, policy)
    if restrict is not None:
        x = jnp.where(restrict, x, 0.0)
    return masked_linear(x, w, active_mask(x, k, threshold, policy))
