"""The embedding table as Q8_0 blocks, where that representation is exact.

SmolLM2's GGUF ships token_embd as Q8_0: each block of 32 values of a row is an f16 scale times
int8 codes, so the f32 store holds exactly `scale * q`. Kept that way in DRAM, the table takes
3.6x fewer bytes (113 -> 32 MB), and the tied head, which reads the whole table every token
(~21% of a decode step's bytes on SmolLM2), runs on a native kernel that widens each code back to
the same f32 value and sums in the f32 kernel's order: the logits are bit-identical
(`sparse/native.rows_dot_q8`). Nothing is approximated: a table that is not exactly Q8_0 (random
test models, f16/f32 checkpoints) stays f32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from activeflow_jax import quant
from activeflow_jax.quant import QRows

BLOCK = 32  # values per scale, as in GGML's Q8_0


class Q8Table(NamedTuple):
    """An embedding [V, d]: row v, block b is scale[v, b] * q[v, 32 b : 32 b + 32]."""

    q: jax.Array  # int8 [V, d]
    scale: jax.Array  # f32 [V, d / 32]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def nbytes(self) -> int:
        return int(self.q.nbytes + self.scale.nbytes)


def q8_exact(table: np.ndarray, rows_per_chunk: int = 4096) -> tuple[np.ndarray, np.ndarray] | None:
    """(q int8 [V, d], scale f32 [V, d/32]) with scale * q == table bit for bit, or None where no
    such pair exists. Checked in row chunks, so the host holds a few MB of temporaries at a time.

    A GGML Q8_0 block's largest code is +-127, so its scale is max|x| / 127 (exact: the quotient
    is the f16 scale itself); any other table fails the check."""
    if table.ndim != 2 or table.dtype != np.float32 or table.shape[1] % BLOCK:
        return None
    v, d = table.shape
    q = np.empty((v, d), np.int8)
    scale = np.empty((v, d // BLOCK), np.float32)
    for r0 in range(0, v, rows_per_chunk):
        x = table[r0:r0 + rows_per_chunk].reshape(-1, d // BLOCK, BLOCK)
        s = np.max(np.abs(x), axis=-1) / np.float32(127)
        safe = np.where(s > 0, s, np.float32(1))[..., None]
        codes = np.rint(x / safe)
        if not np.isfinite(codes).all() or np.abs(codes).max(initial=0) > 127:
            return None
        codes = codes.astype(np.int8)
        if not np.array_equal(codes.astype(np.float32) * s[..., None], x):
            return None
        q[r0:r0 + rows_per_chunk] = codes.reshape(-1, d)
        scale[r0:r0 + rows_per_chunk] = s
    return q, scale


def to_q8(table: np.ndarray) -> Q8Table | None:
    """The table as a Q8Table on the default device, or None where it is not exactly Q8_0."""
    pair = q8_exact(table)
    return None if pair is None else Q8Table(jax.device_put(pair[0]), jax.device_put(pair[1]))


def as_f32(table) -> jax.Array:
    """The f32 [V, d] values of an f32, Q8 or quantized-store (quant.QRows) table (a quantized
    table is widened: 4-6x its bytes); also widens a table of gathered rows (`lookup`)."""
    if isinstance(table, QRows):
        return quant.as_f32(table)
    if not isinstance(table, Q8Table):
        return table
    v, d = table.shape
    return (table.q.reshape(v, d // BLOCK, BLOCK).astype(jnp.float32) * table.scale[..., None]).reshape(v, d)


def lookup(table, tokens: jax.Array) -> jax.Array:
    """Rows of the table for tokens [T] -> [T, d] f32 (a quantized table widens only those rows)."""
    if isinstance(table, QRows):
        return quant.dequantize(jnp.take(table.data, tokens, axis=0), table.kind, table.cols)
    if not isinstance(table, Q8Table):
        return jnp.take(table, tokens, axis=0)
    return as_f32(Q8Table(jnp.take(table.q, tokens, axis=0), jnp.take(table.scale, tokens, axis=0)))
