"""The decoder cut at its linear ops, for a runtime that loads weight rows between jitted calls.

A layer runs as four jitted stages, one per op group; each stage multiplies by its op's weight
(read from a slot pool, or resident), does the non-linear work that follows, and ends by selecting
the active channels of the next op's input. The host reads that selection (a [in] bool union over
the chunk's tokens), makes sure those rows are in the pool (on-demand loads), and calls the next
stage. The maths is the model's own (`llama.attend`, `rms_norm`, `swiglu`, `head_logits`,
`kernels.active_mask`), so the swapped path computes what the all-in-DRAM sparse path computes.

A weight source is a dict: {"w": [in, out]}, or {"pool": [slots+1, out], "cols": [P], "slots": [P],
"count": [1]}: the op's first `count` active input columns `cols` live in pool rows `slots`
(padding points at the pool's last row, which is kept all-zero). A decoded token's sparse op
multiplies with the native kernel straight from the pool, summing in the same order as the
all-in-DRAM kernel. A prefill chunk (whose tokens together need up to every row) and a dense layer
get {"w": ...}: the op's weight assembled, slice by slice through the pool, into a transient
[in, out] buffer whose rows outside the active union are zero -- the same matmul, bit for bit, as
the all-in-DRAM path's masked product. Both make the swapped path equal the all-in-DRAM one
exactly, not just closely: with contextual sparsity a last-bit difference can flip a channel at
the top-k cut, and the outputs then drift apart.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from activeflow_jax.config import ModelConfig
from activeflow_jax.models.embedding import lookup
from activeflow_jax.models.llama import attend, causal_bias, head_logits, rms_norm, swiglu
from activeflow_jax.quant import QRows, take_rows
from activeflow_jax.quant import matmul as quant_matmul
from activeflow_jax.sparse.kernels import active_mask


class Select(NamedTuple):
    """Static part of a selection: k channels, policy; None means dense (every channel)."""

    k: int
    policy: str


def _select(h: jax.Array, sel: Select | None, threshold, n_valid, native: bool = False):
    """(masked input [T, in], union of the real tokens' active channels [in] bool)."""
    if sel is None:
        return h, jnp.ones(h.shape[-1], bool)
    if native and sel.k < h.shape[-1]:
        from activeflow_jax.sparse import native as native_kernels

        mask = native_kernels.active_mask(h, sel.k, threshold, sel.policy == "threshold")
    else:
        mask = active_mask(h, sel.k, threshold, sel.policy)
    real = (jnp.arange(h.shape[0]) < n_valid)[:, None]
    return jnp.where(mask, h, 0.0), jnp.any(mask & real, axis=0)


def _linear(hm: jax.Array, src: dict, native: bool) -> jax.Array:
    if "w" in src:  # f32, or an assembled QRows: the all-in-DRAM engine's own product (quant.matmul)
        return quant_matmul(hm, src["w"], native)
    cols, slots, pool = src["cols"], src["slots"], src["pool"]
    if native:
        from activeflow_jax.sparse.native import gather_matvec, q_gather_matvec

        matvec = q_gather_matvec if isinstance(pool, QRows) else gather_matvec
        return matvec(hm[0, cols], slots, pool, src["count"])[None]
    return hm[:, cols] @ take_rows(pool, slots, rows_sorted=False)  # a quantized pool widens just these rows




@functools.partial(jax.jit, static_argnames=("eps", "sel", "native"))
def start(embed, tokens, norm_w, threshold, n_valid, *, eps: float, sel: Select | None, native: bool):
    """tokens [T] -> (residual [T, d], masked qkv input of the first layer, its union)."""
    x = lookup(embed, tokens)  # embed: f32 or a Q8 table
    hm, union = _select(rms_norm(x, norm_w, eps, native), sel, threshold, n_valid, native)
    return x, hm, union


@functools.partial(jax.jit, static_argnames=("cfg", "sel", "native", "attn_len"), donate_argnames=("k_cache", "v_cache"))
def qkv_stage(hm, src, k_cache, v_cache, start_pos, threshold, n_valid, *, cfg: ModelConfig, sel: Select | None,
              native: bool, attn_len: int):
    qkv = _linear(hm, src, native)
    bias = causal_bias(start_pos, hm.shape[0], attn_len)
    out, k_cache, v_cache = attend(cfg, qkv, k_cache, v_cache, start_pos, bias, attn_len, native)
    hm_o, union = _select(out, sel, threshold, n_valid, native)
    return hm_o, union, k_cache, v_cache


@functools.partial(jax.jit, static_argnames=("eps", "sel", "native"))
def o_stage(x, hm, src, norm_w, threshold, n_valid, *, eps: float, sel: Select | None, native: bool):
    x = x + _linear(hm, src, native)
    hm_gu, union = _select(rms_norm(x, norm_w, eps, native), sel, threshold, n_valid, native)
    return x, hm_gu, union


@functools.partial(jax.jit, static_argnames=("sel", "native"))
def gate_up_stage(hm, src, threshold, n_valid, *, sel: Select | None, native: bool):
    return _select(swiglu(_linear(hm, src, native)), sel, threshold, n_valid, native)


@functools.partial(jax.jit, static_argnames=("eps", "sel", "native"))
def down_stage(x, hm, src, next_norm_w, threshold, n_valid, *, eps: float, sel: Select | None, native: bool):
    """Ends a layer; selects the next layer's qkv input (normed with `next_norm_w`)."""
    x = x + _linear(hm, src, native)
    hm_next, union = _select(rms_norm(x, next_norm_w, eps, native), sel, threshold, n_valid, native)
    return x, hm_next, union


@functools.partial(jax.jit, static_argnames=("eps", "native", "all_logits"))
def last_stage(x, hm, src, final_norm_w, embed, lm_head, n_valid, *, eps: float, native: bool, all_logits: bool):
    """Ends the last layer and applies the head: logits [T, V], or [1, V] of the last real token."""
    x = x + _linear(hm, src, native)
    if not all_logits:
        x = jax.lax.dynamic_slice_in_dim(x, n_valid - 1, 1, axis=0)
    return head_logits(rms_norm(x, final_norm_w, eps, native), embed, lm_head, native)


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def empty_weight(*, shape: tuple[int, int], dtype: str = "float32"):
    """An all-zero [in, out] f32 weight, or [in, row_bytes] uint8 rows for a quantized pool."""
    return jnp.zeros(shape, dtype)


@functools.partial(jax.jit, donate_argnames=("w",))
def assemble_rows(w, pool, cols, slots):
    """w[cols] = pool[slots] in place (a quantized pool's rows as they are held); padding entries
    carry col = in (dropped)."""
    held = pool.data if isinstance(pool, QRows) else pool  # uint8 rows of blocks, or f32 rows
    return w.at[cols].set(held.at[slots].get(mode="promise_in_bounds"), mode="drop")


@functools.partial(jax.jit, donate_argnames=("pool",))
def scatter_rows(pool, slots, rows):
    """Writes rows [n, out] into pool slots [n] in place (the pool buffer is donated)."""
    return pool.at[slots].set(rows, mode="promise_in_bounds")


class DispatchCounter:
    """Jitted calls made into this module's programs (the runtime's dispatches per token)."""

    calls = 0


def _counted(fn):
    """fn, counting each call in DispatchCounter; `lower` and the other jit attributes stay usable."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        DispatchCounter.calls += 1
        return fn(*args, **kwargs)

    call.lower = fn.lower
    return call


start, qkv_stage, o_stage, gate_up_stage, down_stage, last_stage, empty_weight, assemble_rows, scatter_rows = map(
    _counted, (start, qkv_stage, o_stage, gate_up_stage, down_stage, last_stage, empty_weight, assemble_rows,
               scatter_rows))
