"""The embedding table as Q8_0 blocks, where that representation is exact.

SmolLM2's GGUF ships token_embd as Q8_0: each block of 32 values of a row is an f16 scale times
int8 codes, so the f32 store holds exactly `scale * q`. Kept that way in DRAM -- as q8 rows, the
row format of quantized stores (activeflow_jax/quant.py), whose bytes per block are GGML's own --
the table takes 3.8x fewer bytes (113 -> 30 MB), and the tied head, which reads the whole table
every token (~21% of a decode step's bytes on SmolLM2), runs on the quantized-row head kernel,
which widens each code back to the same f32 value and sums in the f32 kernel's order: the logits
are bit-identical (`sparse/native.q_rows_dot`). Nothing is approximated: a table that is not
exactly Q8_0 (random test models, f16/f32 checkpoints) stays f32.

Whether to hold the table so, and how any store tensor is put on the device (`resident_tensor`),
is decided here for the all-in-DRAM engine and the budget runtime alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from activeflow_jax import quant
from activeflow_jax.aligned import aligned_array
from activeflow_jax.config import ModelConfig
from activeflow_jax.errors import InvalidArgumentError
from activeflow_jax.quant import QRows
from activeflow_jax.sparse import native

BLOCK = 32  # values per scale, as in GGML's Q8_0


# An exact Q8_0 table is held as q8 rows (activeflow_jax/quant.py): GGML's Q8_0 block bytes (f16
# scale, 32 int8 codes), one row per token, read by the same kernels as a q8 store's weights.
Q8Table = QRows


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


def to_q8(table: np.ndarray, rows_per_chunk: int = 4096) -> QRows | None:
    """The table as q8 rows (a QRows) on the default device, or None where it is not exactly Q8_0.
    quant's q8 quantizer picks GGML's own scale and codes for such a table, so the rows widen back
    to the table bit for bit (checked here, chunk by chunk)."""
    if table.ndim != 2 or table.dtype != np.float32:
        return None
    blocks = ((r0, table[r0:r0 + rows_per_chunk]) for r0 in range(0, table.shape[0], rows_per_chunk))
    return _q8_from_blocks(blocks, table.shape)


def _q8_from_blocks(blocks: Iterable[tuple[int, np.ndarray]], shape: tuple[int, int]) -> QRows | None:
    """q8 rows from (first row, f32 rows) blocks covering a [V, d] table, or None at the first
    block that is not exactly Q8_0 (the rest is then not read). Only the q8 rows (aligned, so the
    device adopts them) and one block are held at a time: a table read whole as f32 first would
    cost 4x the q8 table on top of it (Gemma 3: 671 MB for a 178 MB table)."""
    v, d = shape
    if d % BLOCK:
        return None
    data = aligned_array((v, quant.row_bytes("q8", d)), np.uint8)
    for r0, part in blocks:
        if not np.isfinite(part).all():
            return None
        rows = quant.quantize_rows(part, "q8")
        if not np.array_equal(quant.dequantize_np(rows, "q8", d), part):
            return None
        data[r0:r0 + len(part)] = rows
    return jax.device_put(QRows(data, "q8", d))


def as_f32(table) -> jax.Array:
    """The f32 [V, d] values of an f32, Q8 or quantized-store (quant.QRows) table (a quantized
    table is widened: 4-6x its bytes); also widens a table of gathered rows (`lookup`)."""
    if isinstance(table, QRows):
        return quant.as_f32(table)
    return table


def lookup(table, tokens: jax.Array) -> jax.Array:
    """Rows of the table for tokens [T] -> [T, d] f32 (a quantized table widens only those rows)."""
    if isinstance(table, QRows):
        return quant.dequantize(jnp.take(table.data, tokens, axis=0), table.kind, table.cols)
    return jnp.take(table, tokens, axis=0)


def q8_embedding_wanted(cfg: ModelConfig, option: Any) -> bool:
    """Whether to try holding the embedding as a Q8 table: only a tied one (the head is what
    gains), and with "auto" only where the native kernels run (elsewhere the head would widen
    the whole table every token)."""
    if option is False or not cfg.tie_embeddings:
        if option is True:
            raise InvalidArgumentError("q8_embedding=True needs a tied embedding (this model has its own lm_head)")
        return False
    if option is True or native.usable():
        return True
    return False


def resident_tensor(name: str, arr: np.ndarray, q8: bool, insist: bool, store_path: str):
    """A store tensor on the device: the embedding as a Q8 table when asked and exact, else f32;
    a quantized store's weights stay quantized (quant.QRows)."""
    if isinstance(arr, QRows):
        return jax.device_put(arr)
    if name == "embed" and q8:
        table = to_q8(arr)
        if table is not None:
            return table
        _not_q8(insist, store_path)
    return jax.device_put(arr)


def resident_table(reader, q8: bool, insist: bool):
    """The store's "embed" table on the device, read block by block: as a Q8 table when asked and
    exact (never the whole f32 table in memory then), else as f32 (read again into one aligned
    buffer, which the device adopts); a quantized store's table stays as stored. `reader` is a
    store.reader.StoreReader."""
    if quant.is_quantized(reader.tensor_dtype("embed")):
        return jax.device_put(reader.read_held("embed"))
    if q8:
        table = _q8_from_blocks(reader.iter_row_blocks("embed"), reader.shape("embed"))
        if table is not None:
            return table
        _not_q8(insist, reader.path)
    return jax.device_put(reader.read_aligned("embed"))


def _not_q8(insist: bool, store_path: str) -> None:
    if insist:
        raise InvalidArgumentError(f"the embedding of {store_path} is not exactly Q8_0 blocks (it was not "
                                   "converted from a Q8_0 GGUF tensor), so it cannot be held as one losslessly; "
                                   "load with q8_embedding='auto' or False")
