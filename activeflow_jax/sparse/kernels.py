"""Top-k channel selection and sparse linear kernels (pure jnp, traced inside the model's jit).

For y = x @ W with W stored [in, out], input channel j contributes only through row j of W. A
sparse op keeps at most k channels (k static) of x; the decode kernel gathers those k rows and
multiplies a [k] vector by a [k, out] matrix, so it reads k/in of the weight bytes. Prefill
(T > 1) and the evaluation path use the masked dense product, which computes the same function.

Selection does not use `lax.top_k` (or a sort): on XLA:CPU that costs ~85 ms for a [512, 1536]
array. The k-th largest |x| is found instead by bisection on the float's bit pattern (31 passes
of compare-and-count, exact, ~14 ms for the same array), and the active indices come out of
`nonzero(size=k)` already in ascending order, so the row gather walks memory forwards.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from activeflow_jax import quant
from activeflow_jax.config import SparsityConfig
from activeflow_jax.errors import InvalidArgumentError
from activeflow_jax.sparse import native as native_lib
from activeflow_jax.sparse.native import active_mask as native_active_mask
from activeflow_jax.sparse.native import q_topk_matvec, topk_matvec


def kth_largest(a: jax.Array, k: int) -> jax.Array:
    """The k-th largest value along the last axis of a non-negative float32 array ([...]).

    Non-negative IEEE floats order like their int32 bit patterns, so we bisect on the integer:
    the largest t with count(bits >= t) >= k is the bit pattern of the k-th largest value."""
    bits = lax.bitcast_convert_type(a, jnp.int32)

    def step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo + 1) // 2
        enough = jnp.sum(bits >= mid[..., None], axis=-1) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    lo = jnp.zeros(a.shape[:-1], jnp.int32)
    lo, _ = lax.fori_loop(0, 31, step, (lo, jnp.max(bits, axis=-1)))
    return lax.bitcast_convert_type(lo, jnp.float32)


def selection_cut(x: jax.Array, k: int, threshold: jax.Array | float, policy: str) -> jax.Array:
    """Per-token cut [..., 1]: channels with |x| >= cut are candidates."""
    a = jnp.abs(x)
    cut = kth_largest(a, k)[..., None] if k < x.shape[-1] else jnp.zeros_like(a[..., :1])
    if policy == "threshold":
        cut = jnp.maximum(cut, threshold)
    return cut


def active_mask(x: jax.Array, k: int, threshold: jax.Array | float, policy: str) -> jax.Array:
    """Boolean mask [..., in] of the active channels of x: |x| >= the k-th largest |x| (and, with
    the "threshold" policy, >= the calibrated threshold), at most k of them: among channels tied at
    the cut the lowest indices win, exactly as the decode kernel's nonzero(size=k) picks them."""
    candidates = jnp.abs(x) >= selection_cut(x, k, threshold, policy)
    if k >= x.shape[-1]:
        return candidates
    return candidates & (jnp.cumsum(candidates, axis=-1) <= k)


def masked_linear(x: jax.Array, w, mask: jax.Array, native: bool = False) -> jax.Array:
    return quant.matmul(jnp.where(mask, x, 0.0), w, native)


def select_rows(x0: jax.Array, k: int, threshold: jax.Array | float, policy: str) -> tuple[jax.Array, jax.Array]:
    """(active row indices [k] ascending, their input values [k]) for one token x0 [in]; when
    fewer than k are active the tail is padded with row 0 and value 0."""
    candidates = jnp.abs(x0) >= selection_cut(x0, k, threshold, policy)[0]
    idx = jnp.nonzero(candidates, size=k, fill_value=0)[0]
    valid = jnp.arange(k) < jnp.sum(candidates)
    return idx, jnp.where(valid, x0[idx], 0.0)


def gather_linear(x: jax.Array, w: jax.Array, k: int, threshold: jax.Array | float, policy: str,
                  native: bool = False, threshold_index: int | None = None) -> jax.Array:
    """Decode kernel for one token: x [1, in], w [in, out] -> [1, out], reading at most k rows of w.
    native=True uses the FFI kernel (sparse/native.py), which reads the rows in place."""
    if native:
        matvec = q_topk_matvec if isinstance(w, quant.QRows) else topk_matvec
        return matvec(x[0], w, k, threshold, policy == "threshold", index=threshold_index or 0)[None]
    threshold = _pick(threshold, threshold_index)
    idx, xk = select_rows(x[0], k, threshold, policy)
    rows = quant.take_rows(w, idx)  # [k, out] f32: a quantized weight widens only these k rows
    return (xk @ rows)[None]


def _pick(threshold, index: int | None):
    return threshold if index is None else jnp.reshape(threshold, (-1,))[index]


def sparse_linear(x: jax.Array, w: jax.Array, *, k: int, threshold: jax.Array | float, policy: str,
                  kernel: str, restrict: jax.Array | None = None, straight_through: bool = False,
                  threshold_index: int | None = None) -> jax.Array:
    """y = x @ w over the active channels of x. `restrict` ([..., in] bool) limits which channels
    may be active (a predicted set whose misses are dropped). straight_through: the forward pass
    is x * mask, the backward pass treats the mask as identity (sparsity-aware distillation).
    threshold_index: `threshold` is a table and this flat index picks the op's entry."""
    if restrict is None and kernel in ("gather", "native") and x.shape[0] == 1 and k < x.shape[-1] \
            and not straight_through:
        return gather_linear(x, w, k, threshold, policy, native=kernel == "native", threshold_index=threshold_index)
    threshold = _pick(threshold, threshold_index)
    if straight_through:
        mask = active_mask(jax.lax.stop_gradient(x), k, threshold, policy)
        return (x + jax.lax.stop_gradient(jnp.where(mask, x, 0.0) - x)) @ quant.as_f32(w)
    if restrict is not None:
        x = jnp.where(restrict, x, 0.0)
    # the selection is a constant for autodiff (training without the straight-through estimator)
    selected_from = jax.lax.stop_gradient(x)
    if kernel == "native" and k < x.shape[-1]:
        # prefill with the native kernels: the same mask, selected natively (XLA's bisection and
        # cumsum made a sparse prefill half as fast as a dense one)
        mask = native_active_mask(selected_from, k, threshold, policy == "threshold")
    else:
        mask = active_mask(selected_from, k, threshold, policy)
    return masked_linear(x, w, mask, native=kernel == "native")


def resolve_kernel(sparsity: SparsityConfig) -> SparsityConfig:
    """`sparsity` with kernel "auto" replaced by the kernel that will run here; "native" is
    built and registered now (it must be, before a program using it is compiled)."""
    if sparsity.kernel not in ("auto", "native"):
        return sparsity
    usable = native_lib.usable()
    if sparsity.kernel == "native" and not usable:
        raise InvalidArgumentError(
            "the native sparse kernel is unavailable here (it needs the CPU backend and a C++ compiler; "
            "see the log warning); use kernel='gather' or 'auto'"
        )
    return dataclasses.replace(sparsity, kernel="native" if usable else "gather")
