"""The native CPU decode kernel: a sparse matrix-vector product over selected rows (XLA FFI).

On XLA:CPU a row gather is a copy into a temporary at ~5 GB/s, so "gather k rows, then multiply"
costs more than the dense product it replaces (bench/kernels.py). `gather_matvec.cc` streams the
selected rows straight from the weight instead, split over a small persistent thread pool.

It is compiled on first use with the system C++ compiler against the FFI headers that ship with
jaxlib (`jax.ffi.include_dir()`), cached under `activeflow_home()/native/`, and registered as an
FFI target for the CPU. Where no compiler is found the engine falls back to the pure-XLA gather
kernel (same results), and says so once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess

import jax
import jax.numpy as jnp

from activeflow_jax.paths import activeflow_home

TARGET = "activeflow_gather_matvec"
TOPK_TARGET = "activeflow_topk_matvec"
MASK_TARGET = "activeflow_active_mask"
ROWS_DOT_TARGET = "activeflow_rows_dot"
ATTEND_TARGET = "activeflow_attend_one"
RMS_NORM_TARGET = "activeflow_rms_norm_one"
Q_TARGETS = {"AfQGatherMatvec": "activeflow_q_gather_matvec", "AfQMatvec": "activeflow_q_matvec",
             "AfQTopkMatvec": "activeflow_q_topk_matvec", "AfQRowsDot": "activeflow_q_rows_dot",
             "AfPoolSelect": "activeflow_pool_select"}
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native", "gather_matvec.cc")
log = logging.getLogger(__name__)


def _cpu_key() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()}|{platform.processor()}|{flags}".encode()).hexdigest()[:10]


def _build(out_path: str) -> None:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-w", "-march=native"]
    if platform.system() == "Darwin":
        flags += ["-undefined", "dynamic_lookup"]
    tmp = f"{out_path}.tmp-{os.getpid()}"
    cmd = [compiler, *flags, f"-I{jax.ffi.include_dir()}", SOURCE, "-o", tmp, "-lpthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stderr[-2000:]}")
    os.replace(tmp, out_path)  # atomic: a concurrent process never loads a half-written library


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True once the kernel is built, loaded and registered (tries once per process)."""
    if os.environ.get("ACTIVEFLOW_NATIVE", "1") == "0":
        return False
    try:
        with open(SOURCE, "rb") as f:
            digest = hashlib.sha256(f.read() + jax.__version__.encode()).hexdigest()[:12]
        directory = os.path.join(activeflow_home(), "native")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"gather_matvec-{digest}-{_cpu_key()}.so")
        if not os.path.exists(path):
            _build(path)
        lib = ctypes.cdll.LoadLibrary(path)
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.AfGatherMatvec), platform="cpu")
        jax.ffi.register_ffi_target(TOPK_TARGET, jax.ffi.pycapsule(lib.AfTopkMatvec), platform="cpu")
        jax.ffi.register_ffi_target(MASK_TARGET, jax.ffi.pycapsule(lib.AfActiveMask), platform="cpu")
        jax.ffi.register_ffi_target(ROWS_DOT_TARGET, jax.ffi.pycapsule(lib.AfRowsDot), platform="cpu")
        jax.ffi.register_ffi_target(ATTEND_TARGET, jax.ffi.pycapsule(lib.AfAttendOne), platform="cpu")
        jax.ffi.register_ffi_target(RMS_NORM_TARGET, jax.ffi.pycapsule(lib.AfRmsNormOne), platform="cpu")
        for symbol, target in Q_TARGETS.items():  # the quantized-row family (quant.py)
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
        return True
    except Exception as exc:  # any failure means: use the XLA kernel instead
        log.warning("native sparse kernel unavailable, using the XLA gather kernel: %s", exc)
        return False


def usable() -> bool:
    """True where the native kernels run: the CPU backend, with the library built and registered."""
    return jax.default_backend() == "cpu" and available()


def gather_matvec(xk: jax.Array, rows: jax.Array, w: jax.Array, count: jax.Array | int | None = None) -> jax.Array:
    """y = xk[:count] @ w[rows[:count]] without materializing the rows. xk [k] f32, rows [k] int32 in
    range, w [in, out] f32 -> [out]; count (default k) lets padded inputs sum exactly like
    topk_matvec over the same active rows. Call `available()` first (outside the trace)."""
    count = jnp.asarray(rows.shape[0] if count is None else count, jnp.int32).reshape(1)
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((w.shape[1],), jnp.float32))(
        xk.astype(jnp.float32), rows.astype(jnp.int32), w, count)


def rows_dot(x0: jax.Array, e: jax.Array) -> jax.Array:
    """e @ x0 for x0 [d], e [V, d] -> [V] (the tied head of one token), streaming e once."""
    return jax.ffi.ffi_call(ROWS_DOT_TARGET, jax.ShapeDtypeStruct((e.shape[0],), jnp.float32))(
        x0.astype(jnp.float32), e)


def rms_norm_one(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """llama.rms_norm of one token: x [d], w [d] -> [d]."""
    import numpy as np

    return jax.ffi.ffi_call(RMS_NORM_TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32))(
        x.astype(jnp.float32), w.astype(jnp.float32), eps=np.float32(eps))


def attend_one(qkv: jax.Array, k_cache: jax.Array, v_cache: jax.Array, pos, *, heads: int, kv_heads: int,
               head_dim: int, attn_len: int, theta: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """llama.attend for one token: qkv [q + 2 kv] (before RoPE), caches [KV, S, hd], pos (int) ->
    (the o projection's input [q_dim], k_cache, v_cache) with this token's k/v written at pos.
    The caches are updated in place (the outputs alias them)."""
    import numpy as np

    out_types = (jax.ShapeDtypeStruct((heads * head_dim,), jnp.float32),
                 jax.ShapeDtypeStruct(k_cache.shape, jnp.float32), jax.ShapeDtypeStruct(v_cache.shape, jnp.float32))
    return jax.ffi.ffi_call(ATTEND_TARGET, out_types, input_output_aliases={1: 1, 2: 2})(
        qkv.astype(jnp.float32), k_cache, v_cache, jnp.asarray(pos, jnp.int32).reshape(1), heads=np.int64(heads),
        kv_heads=np.int64(kv_heads), head_dim=np.int64(head_dim), attn_len=np.int64(attn_len),
        theta=np.float32(theta))


def topk_matvec(x0: jax.Array, w: jax.Array, k: int, threshold: jax.Array | float, use_threshold: bool,
                index: int = 0) -> jax.Array:
    """Decode product with the selection done natively: x0 [in] -> [out], over the active channels
    (|x| >= max(k-th largest |x|, threshold), at most k, lowest indices first among ties).
    threshold may be a whole table; the kernel reads its flat entry `index`."""
    import numpy as np

    thr = jnp.asarray(threshold, jnp.float32).reshape(-1)
    if not 0 <= index < thr.shape[0]:
        raise ValueError(f"threshold index {index} outside a table of {thr.shape[0]}")
    return jax.ffi.ffi_call(TOPK_TARGET, jax.ShapeDtypeStruct((w.shape[1],), jnp.float32))(
        x0.astype(jnp.float32), thr, w, k=np.int64(k), use_threshold=np.int64(bool(use_threshold)),
        index=np.int64(index))


def active_mask(x: jax.Array, k: int, threshold: jax.Array | float, use_threshold: bool) -> jax.Array:
    """kernels.active_mask for x [T, in], computed natively (same rule, same ties): bool [T, in]."""
    import numpy as np

    thr = jnp.asarray(threshold, jnp.float32).reshape(1)
    # under vmap (batched scoring of a sparse model) one call per batch element
    mask = jax.ffi.ffi_call(MASK_TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32), vmap_method="sequential")(
        x.astype(jnp.float32), thr, k=np.int64(k), use_threshold=np.int64(bool(use_threshold)))
    return mask > 0.5


# ---------------------------------------------------------------------------------------------
# The same products on quantized rows (quant.QRows: q8 / q4 blocks), widened inside the kernel.


def _q_attrs(w) -> dict:
    import numpy as np

    return {"kind": np.int64(8 if w.kind == "q8" else 4), "cols": np.int64(w.cols)}


def q_matvec(x0: jax.Array, w) -> jax.Array:
    """x0 [in] @ w (QRows [in, cols]) -> [cols]: the dense decode product, every row read once in place."""
    return jax.ffi.ffi_call(Q_TARGETS["AfQMatvec"], jax.ShapeDtypeStruct((w.cols,), jnp.float32),
                            vmap_method="sequential")(
        x0.astype(jnp.float32), w.data, **_q_attrs(w))


def q_gather_matvec(xk: jax.Array, rows: jax.Array, w, count: jax.Array | int | None = None) -> jax.Array:
    """gather_matvec on a QRows: y = xk[:count] @ widen(w[rows[:count]]) -> [cols]."""
    count = jnp.asarray(rows.shape[0] if count is None else count, jnp.int32).reshape(1)
    return jax.ffi.ffi_call(Q_TARGETS["AfQGatherMatvec"], jax.ShapeDtypeStruct((w.cols,), jnp.float32))(
        xk.astype(jnp.float32), rows.astype(jnp.int32), w.data, count, **_q_attrs(w))


def q_topk_matvec(x0: jax.Array, w, k: int, threshold: jax.Array | float, use_threshold: bool,
                  index: int = 0) -> jax.Array:
    """topk_matvec on a QRows (same selection, same ties)."""
    import numpy as np

    thr = jnp.asarray(threshold, jnp.float32).reshape(-1)
    if not 0 <= index < thr.shape[0]:
        raise ValueError(f"threshold index {index} outside a table of {thr.shape[0]}")
    return jax.ffi.ffi_call(Q_TARGETS["AfQTopkMatvec"], jax.ShapeDtypeStruct((w.cols,), jnp.float32))(
        x0.astype(jnp.float32), thr, w.data, k=np.int64(k), use_threshold=np.int64(bool(use_threshold)),
        index=np.int64(index), **_q_attrs(w))


def q_rows_dot(x0: jax.Array, e) -> jax.Array:
    """rows_dot on a QRows table e [V, d]: the tied head; the logits equal rows_dot's on the widened
    table bit for bit (the exact Q8_0 embedding of an f32 store: models/embedding.py)."""
    return jax.ffi.ffi_call(Q_TARGETS["AfQRowsDot"], jax.ShapeDtypeStruct((e.shape[0],), jnp.float32),
                            vmap_method="sequential")(
        x0.astype(jnp.float32), e.data, **_q_attrs(e))


def pool_select(x0: jax.Array, threshold, slot_map: jax.Array, freq: jax.Array, layer, *, k: int,
                use_threshold: bool, trash: int):
    """The decode selection of an op whose rows live in a slot pool (runtime/pooled.py): x0 [in],
    threshold (this op's), slot_map / freq [L, in] int32, layer (traced int) -> (channels [k],
    values [k], slots [k] (-1: missing, padding: trash), counts [2] = (active, missing), freq with
    this layer's active channels counted). k >= in selects every channel (a dense layer)."""
    import numpy as np

    k = min(k, x0.shape[0])
    out_types = (jax.ShapeDtypeStruct((k,), jnp.int32), jax.ShapeDtypeStruct((k,), jnp.float32),
                 jax.ShapeDtypeStruct((k,), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32),
                 jax.ShapeDtypeStruct(freq.shape, jnp.int32))
    return jax.ffi.ffi_call(Q_TARGETS["AfPoolSelect"], out_types, input_output_aliases={3: 4})(
        x0.astype(jnp.float32), jnp.asarray(threshold, jnp.float32).reshape(1), slot_map, freq,
        jnp.asarray(layer, jnp.int32).reshape(1), k=np.int64(k), use_threshold=np.int64(bool(use_threshold)),
        trash=np.int64(trash))
