"""Host buffers that JAX adopts instead of copying.

On the CPU, `jax.device_put` and jit arguments adopt a numpy buffer that starts on a 64-byte
boundary; numpy's default 16-byte alignment forces a copy, i.e. a resident tensor would cost its
size twice while it is handed over. Whoever hands such a buffer to JAX must not reuse it.
"""

from __future__ import annotations

import numpy as np


def aligned_array(shape: tuple[int, ...], dtype=np.float32, *, zeros: bool = False) -> np.ndarray:
    """An uninitialized (or zeroed) array of `shape` and `dtype` on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    pad = 64 // dtype.itemsize
    raw = (np.zeros if zeros else np.empty)(n + pad, dtype)
    offset = (-raw.ctypes.data % 64) // dtype.itemsize
    return raw[offset:offset + n].reshape(shape)
