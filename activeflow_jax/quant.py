"""Quantized weight rows: the store format, the DRAM format and the pure-XLA widening, in one place.

A weight is stored and held channel-major, [in, out], one row per input channel (the embedding
[V, d]: one row per token). A quantized row is a self-contained uint8 row of blocks, each block
covering 32 consecutive values along the row (along `out`), laid out as GGML's blocks are:

    q8  (34 bytes per 32 values)  f16 scale d, then 32 int8 codes q:          value = d * q
    q4  (20 bytes per 32 values)  f16 scale d, f16 minimum m, then 16 bytes
                                  holding codes 0..15 (byte l: value l in the
                                  low nibble, value l + 16 in the high one):  value = d * q + m

So one row is one contiguous byte range: a sparse read of channel j (flash or DRAM) is one read
of `row_bytes` bytes, and a pool of rows (runtime) is a uint8 array [slots, row_bytes] filled by
row. A row whose length is not a multiple of 32 is padded to whole blocks: the padding repeats
the row's last value (so it does not widen the last block's range) and is never read back (the
kernels and `dequantize` drop it).

Quantization (the writer, from the importer's f32; GGUF's own blocks run along the other axis of
our layout, so they are re-quantized): q8 as GGML's Q8_0 (d = max|x| / 127, q = round(x / d)),
q4 by an error-minimizing search of each block's scale and minimum (_q4_fit, llama.cpp's
make_qkx2_quants for Q4_K without the weights), with d and m rounded to f16 first so that the
codes are chosen against the scale that is stored.

Widening is exact and the same everywhere: f16 -> f32, code -> f32, d * q (exact in f32: an
11-bit by 8-bit product), + m for q4 (one rounding). The native kernels (sparse/native) and the
XLA path here therefore see identical f32 weights; only the order of the sums differs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from activeflow_jax.errors import InvalidArgumentError
from activeflow_jax.sparse import native as native_lib
from activeflow_jax.sparse.native import q_matvec

BLOCK = 32  # values per block (scale), along the row
QUANT_DTYPES = ("q8", "q4")
BLOCK_BYTES = {"q8": 2 + BLOCK, "q4": 4 + BLOCK // 2}
FLOAT_DTYPES = ("float32", "float16")
ALIASES = {"f32": "float32", "f16": "float16", "fp32": "float32", "fp16": "float16"}
ALL_DTYPES = FLOAT_DTYPES + QUANT_DTYPES
Q4_FIT_SCALES = 11  # candidate scales per q4 block (see _q4_fit): 14 to 16 codes across its range


def canonical_dtype(name: Any) -> str:
    """The store dtype name for a user's spelling (f32/float32, f16/float16, q8, q4)."""
    key = ALIASES.get(str(name).lower(), str(name).lower()) if isinstance(name, str) else None
    if key not in ALL_DTYPES:
        raise InvalidArgumentError(f"storage dtype {name!r} is not supported; choose one of "
                                   "f32 (float32), f16 (float16), q8, q4")
    return key


def is_quantized(dtype: str) -> bool:
    return dtype in QUANT_DTYPES


def blocks(cols: int) -> int:
    return -(-int(cols) // BLOCK)


def row_bytes(dtype: str, cols: int) -> int:
    """Bytes of one stored / held row of `cols` values."""
    if dtype in QUANT_DTYPES:
        return blocks(cols) * BLOCK_BYTES[dtype]
    return int(cols) * np.dtype(dtype).itemsize


EMBEDDING_TENSORS = ("embed", "lm_head")  # the token table and an untied head


def tensor_dtype(store_dtype: str, name: str, shape: tuple[int, ...]) -> str:
    """The dtype a store of `store_dtype` holds tensor `name` in: the one rule, used by the writer,
    the reader and every byte count.

    Norms (1-D) stay f32 in a quantized store: they are tiny and every token reads them whole. The
    embedding and an untied head stay q8 in a q4 store: they take the worst of a second 4-bit
    rounding (SmolLM2-135M, 8 windows of WikiText-2: everything q4 28.11, the same with a q8
    embedding 26.50, against 24.37 for the source; docs/results.md), GGUF files ship them at 8 bits
    (the default model's Q4_1 file holds a Q8_0 embedding, Gemma 3's Q4_K_M as well), so q8 keeps
    them exactly as imported, and llama.cpp's 4-bit mixes hold them at 6-8 bits too. Every other
    2-D weight (the linear ops) takes the store's dtype."""
    if not is_quantized(store_dtype):
        return store_dtype
    if len(shape) != 2:
        return "float32"
    if store_dtype == "q4" and name in EMBEDDING_TENSORS:
        return "q8"
    return store_dtype


# ------------------------------------------------------------------------------------------
# numpy: the writer's quantizer and the host-side widening (reads, installs, checks)


def quantize_rows(w: np.ndarray, dtype: str, rows_per_chunk: int = 4096) -> np.ndarray:
    """f32 [rows, cols] -> uint8 [rows, blocks(cols) * BLOCK_BYTES[dtype]] (see the module doc)."""
    if dtype not in QUANT_DTYPES:
        raise InvalidArgumentError(f"quantize_rows: {dtype!r} is not a quantized dtype ({QUANT_DTYPES})")
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise InvalidArgumentError(f"quantize_rows needs a 2-D array, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise InvalidArgumentError("cannot quantize a weight with non-finite values (inf/nan)")
    rows, cols = w.shape
    nb = blocks(cols)
    out = np.empty((rows, nb, BLOCK_BYTES[dtype]), np.uint8)
    for r0 in range(0, rows, rows_per_chunk):
        x = w[r0:r0 + rows_per_chunk]
        if cols % BLOCK:
            x = np.pad(x, ((0, 0), (0, nb * BLOCK - cols)), mode="edge")
        x = x.reshape(x.shape[0], nb, BLOCK)
        dst = out[r0:r0 + rows_per_chunk]
        if dtype == "q8":
            d = (np.max(np.abs(x), axis=-1) / np.float32(127)).astype(np.float16)
            _check_f16(d)
            d32 = d.astype(np.float32)[..., None]
            q = np.clip(np.rint(x / np.where(d32 > 0, d32, 1)), -127, 127).astype(np.int8)
            dst[..., 0:2] = d[..., None].view(np.uint8)
            dst[..., 2:] = q.view(np.uint8)
        else:
            d, m = _q4_fit(x)
            m = m.astype(np.float16)
            d = d.astype(np.float16)
            _check_f16(d)
            _check_f16(m)
            d32, m32 = d.astype(np.float32)[..., None], m.astype(np.float32)[..., None]
            q = np.clip(np.rint((x - m32) / np.where(d32 > 0, d32, 1)), 0, 15).astype(np.uint8)
            dst[..., 0:2] = d[..., None].view(np.uint8)
            dst[..., 2:4] = m[..., None].view(np.uint8)
            dst[..., 4:] = q[..., :BLOCK // 2] | (q[..., BLOCK // 2:] << 4)
    return out.reshape(rows, nb * BLOCK_BYTES[dtype])


def _q4_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scale d, minimum m) [rows, blocks] of q4 blocks x [rows, blocks, 32] that minimize the
    block's squared error, searched as llama.cpp's make_qkx2_quants does for Q4_K: for each
    candidate scale (Q4_FIT_SCALES steps across the block's range, from 14 to 16 codes' worth,
    so the extreme values may be clipped), round to codes from the minimum, fit (d, m) to those
    codes by least squares (closed form: the block is the codes' linear image), round to codes
    against that fit and fit once more; keep the candidate with the lowest squared error.

    Plain squared error is the right objective within a row: a row is one input channel, so its
    activation scales every value of the row alike. GGML's min/max (14 + 1 steps: candidate 5)
    refitted is one of the candidates, and min/max is kept where rounding d and m to f16 would make
    the search's choice worse, so no block's error (as stored) is above min/max's. On SmolLM2-135M
    (its Q4_1 weights re-quantized along the other axis) the RMS error is ~11% below min/max's (~4%
    below min/max with 4 least-squares refits, the previous quantizer) and its perplexity on 8
    windows 28.11 instead of 28.93 (docs/results.md), for ~3x the quantizing time."""
    x = x.astype(np.float32)
    n = x.shape[-1]
    lo, hi = x.min(axis=-1), x.max(axis=-1)
    span = np.where(hi > lo, hi - lo, 1).astype(np.float32)
    sx = x.sum(axis=-1, dtype=np.float64)
    sxx = np.einsum("...i,...i->...", x, x, dtype=np.float64)

    def fit(q):  # least-squares (d, m) for codes q, whether it is usable, and its squared error
        sq = q.sum(axis=-1, dtype=np.float64)
        sqq = np.einsum("...i,...i->...", q, q, dtype=np.float64)
        sxq = np.einsum("...i,...i->...", x, q, dtype=np.float64)
        det = n * sqq - sq * sq  # 0 when every code is the same (a constant block)
        det1 = np.where(det > 0, det, 1)
        d = (n * sxq - sx * sq) / det1
        m = (sqq * sx - sq * sxq) / det1
        err = sxx + d * d * sqq + n * m * m + 2 * d * m * sq - 2 * d * sxq - 2 * m * sx
        return d, m, (det > 0) & (d > 0), err

    def codes(origin, iscale):
        q = np.rint((x - origin[..., None].astype(np.float32)) * iscale[..., None].astype(np.float32))
        return np.clip(q, 0, 15, out=q)

    best_d, best_m = (hi - lo).astype(np.float64) / 15, lo.astype(np.float64)  # constant blocks: d 0, m = x
    best_err = np.full(lo.shape, np.inf)
    for k in range(Q4_FIT_SCALES):
        d, m, ok, err = fit(codes(lo, (14 + 2 * k / (Q4_FIT_SCALES - 1)) / span))
        d2, m2, ok2, err2 = fit(codes(m, 1 / np.where(ok, d, 1)))
        refit = ok2 & (err2 < np.where(ok, err, np.inf))
        d, m, err, ok = np.where(refit, d2, d), np.where(refit, m2, m), np.where(refit, err2, err), ok | ok2
        better = ok & (err < best_err)
        best_d, best_m = np.where(better, d, best_d), np.where(better, m, best_m)
        best_err = np.where(better, err, best_err)
    # as stored (d and m in f16, codes against them), keep min/max where rounding made the search lose
    return _f16_no_worse(x, (best_d, best_m), ((hi - lo) / 15, lo))


def _f16_no_worse(x: np.ndarray, fit, fallback) -> tuple[np.ndarray, np.ndarray]:
    """Per block, whichever (d, m) of two has the lower squared error once rounded to f16."""
    def rounded(dm):
        d, m = (np.asarray(a, np.float32).astype(np.float16) for a in dm)
        d32, m32 = d.astype(np.float32)[..., None], m.astype(np.float32)[..., None]
        q = np.clip(np.rint((x - m32) / np.where(d32 > 0, d32, 1)), 0, 15)
        return d, m, np.square(q * d32 + m32 - x).sum(axis=-1)

    with np.errstate(over="ignore", invalid="ignore"):  # an f16 overflow is refused by the caller (_check_f16)
        d, m, err = rounded(fit)
        d0, m0, err0 = rounded(fallback)
    keep = err <= err0
    return np.where(keep, d, d0), np.where(keep, m, m0)


def _check_f16(a: np.ndarray) -> None:
    if not np.isfinite(a).all():
        raise InvalidArgumentError("a block's scale or minimum does not fit an f16 (weights above ~8e6 for q8, "
                                   "~65,000 for q4); store this model as f32 or f16 instead")


def block_scales(data: np.ndarray, dtype: str, cols: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(scale d, minimum m) f32 [..., blocks] of quantized rows uint8 [..., row_bytes] (m None for q8)."""
    data = np.ascontiguousarray(data, np.uint8)
    b = data.reshape(*data.shape[:-1], blocks(cols), BLOCK_BYTES[dtype])
    d = np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0].astype(np.float32)
    if dtype == "q8":
        return d, None
    return d, np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0].astype(np.float32)


def dequantize_np(data: np.ndarray, dtype: str, cols: int) -> np.ndarray:
    """uint8 [..., row_bytes] -> f32 [..., cols]: the exact values the kernels multiply by."""
    data = np.ascontiguousarray(data, np.uint8)
    lead = data.shape[:-1]
    nb = blocks(cols)
    b = data.reshape(*lead, nb, BLOCK_BYTES[dtype])
    d, m = block_scales(data, dtype, cols)
    d = d[..., None]
    if dtype == "q8":
        w = np.ascontiguousarray(b[..., 2:]).view(np.int8).astype(np.float32) * d
    else:
        m = m[..., None]
        qs = b[..., 4:]
        q = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.float32)
        w = q * d + m
    return w.reshape(*lead, nb * BLOCK)[..., :cols]


# ------------------------------------------------------------------------------------------
# jax: the held form and the pure-XLA widening (traced inside the model's jit)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QRows:
    """A quantized weight held in DRAM: logical [rows, cols] f32, held as uint8 rows (module doc).

    `data` is the only array leaf; kind and cols are static (part of the compiled program), so
    params holding QRows pass through jit like plain arrays."""

    data: jax.Array  # uint8 [rows, blocks(cols) * BLOCK_BYTES[kind]]
    kind: str = dataclasses.field(metadata={"static": True})
    cols: int = dataclasses.field(metadata={"static": True})

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.data.shape[0]), self.cols)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def __getitem__(self, index):
        # nnx reads parameters as `param[...]`: that is the whole weight, as held
        if index is Ellipsis:
            return self
        raise TypeError("QRows supports only [...]; use quant.take_rows / dequantize")

    def delete(self) -> None:
        self.data.delete()


def dequantize(data: jax.Array, kind: str, cols: int) -> jax.Array:
    """uint8 [..., row_bytes] -> f32 [..., cols], inside a trace (same values as dequantize_np)."""
    lead = data.shape[:-1]
    nb = blocks(cols)
    b = data.reshape(*lead, nb, BLOCK_BYTES[kind])
    d = jax.lax.bitcast_convert_type(b[..., 0:2], jnp.float16).astype(jnp.float32)[..., None]  # [..., nb, 1]
    if kind == "q8":
        w = jax.lax.bitcast_convert_type(b[..., 2:], jnp.int8).astype(jnp.float32) * d
    else:
        m = jax.lax.bitcast_convert_type(b[..., 2:4], jnp.float16).astype(jnp.float32)[..., None]
        qs = b[..., 4:]
        q = jnp.concatenate([qs & 15, qs >> 4], axis=-1).astype(jnp.float32)
        w = q * d + m
    return w.reshape(*lead, nb * BLOCK)[..., :cols]


def as_f32(w) -> jax.Array:
    """The f32 [rows, cols] values of a weight (QRows widened; arrays as they are)."""
    return dequantize(w.data, w.kind, w.cols) if isinstance(w, QRows) else w


def widen_params(params):
    """A params pytree with every QRows replaced by its f32 values (training, perturbation)."""
    return jax.tree.map(lambda w: as_f32(w) if isinstance(w, QRows) else w, params,
                        is_leaf=lambda w: isinstance(w, QRows))


def take_rows(w, rows: jax.Array, *, rows_sorted: bool = True) -> jax.Array:
    """Rows `rows` ([k] int, ascending unless rows_sorted=False, e.g. pool slots) of a weight as
    f32 [k, cols]: a QRows gathers k uint8 rows and widens only those (never the whole weight)."""
    if isinstance(w, QRows):
        data = w.data.at[rows].get(mode="promise_in_bounds", indices_are_sorted=rows_sorted)
        return dequantize(data, w.kind, w.cols)
    return w.at[rows].get(mode="promise_in_bounds", indices_are_sorted=rows_sorted)


def matmul(x: jax.Array, w, native: bool | None = None) -> jax.Array:
    """x [T, in] @ w [in, out] -> [T, out] for an f32 array or a QRows.

    One token on the CPU with the native library: the quantized rows are read in place and
    widened in registers (sparse/native.q_matvec). Otherwise (prefill, XLA-only machines, GPUs)
    the weight is widened inside the program and multiplied in f32."""
    if not isinstance(w, QRows):
        return x @ w
    if native is None:
        native = native_lib.usable()
    if native and x.shape[0] == 1:
        return q_matvec(x[0], w)[None]
    return x @ as_f32(w)


def quantize(w: np.ndarray, dtype: str) -> QRows:
    """A host f32 weight as a QRows of numpy data (device_put it to hold it on a device)."""
    return QRows(quantize_rows(w, dtype), dtype, int(np.shape(w)[1]))
