"""Slot pools: one fixed-size device buffer per op group holding weight rows of any sparse layer.

A slot holds one row: input channel c of layer l of this op. The host keeps the maps
(`slot_of[l, c]`, `owner[slot]`) and a context-level LFU counter per (layer, channel) — reset for
every new sequence, as the paper's hot-weight cache — and picks victims among slots that are
neither needed by the op being computed nor pinned for a layer group about to run. Rows enter by
a jitted scatter into the donated buffer (in place, no copy of the pool); padding entries point
at the pool's extra last row, which stays all-zero so padded gathers add nothing.

A pool holds rows as the store holds them when the store is quantized (q8 / q4: uint8 rows of
blocks, activeflow_jax/quant.py; an all-zero quantized row widens to zeros) and as f32 otherwise;
`held()` is what a stage computes with (the buffer, or a quant.QRows view of it).
"""

from __future__ import annotations

import numpy as np

import jax.numpy as jnp

from activeflow_jax.engine import _pow2_at_least
from activeflow_jax.runtime import stages
from activeflow_jax.store.layout import _pow2_floor
from activeflow_jax.quant import QRows, is_quantized, row_bytes
from activeflow_jax.store.reader import aligned_float32

MIN_SCATTER = 8  # scatter batches are padded to powers of two from 8: a handful of programs
SCATTER_BYTES = 2 << 20  # ... up to this many bytes; larger installs go in batches of that size


class SlotPool:
    def __init__(self, name: str, num_layers: int, in_dim: int, out_dim: int, slots: int, dtype: str = "float32"):
        self.name, self.in_dim, self.out_dim, self.slots = name, in_dim, out_dim, slots
        self.dtype = dtype  # float32, or the store's quantized dtype (rows held as stored)
        self.quantized = is_quantized(dtype)
        self.row_width = row_bytes(dtype, out_dim) if self.quantized else out_dim  # elements of one held row
        self._np_dtype = np.dtype(np.uint8 if self.quantized else np.float32)
        self.trash = slots  # index of the all-zero padding row
        self.buffer = jnp.zeros((slots + 1, self.row_width), self._np_dtype)
        self.slot_of = np.full((num_layers, in_dim), -1, np.int32)
        self.owner = np.full(slots, -1, np.int64)  # layer * in_dim + channel
        self.pin_until = np.full(slots, -1, np.int32)  # protected while the current layer <= this
        self.freq = np.zeros((num_layers, in_dim), np.int32)
        self._free = np.arange(slots, dtype=np.int32)  # free slots: self._free[:self._n_free]
        self._n_free = slots
        # rows per scatter batch: the padded host copy a scatter adopts stays within SCATTER_BYTES
        self._scatter_batch = max(MIN_SCATTER, _pow2_floor(SCATTER_BYTES // (self._np_dtype.itemsize * self.row_width)))

    @property
    def nbytes(self) -> int:
        return (self.slots + 1) * self.row_width * self._np_dtype.itemsize

    def held(self):
        """The buffer as the stages compute with it: f32 rows, or a QRows of quantized rows."""
        return QRows(self.buffer, self.dtype, self.out_dim) if self.quantized else self.buffer

    @property
    def resident_rows(self) -> int:
        return self.slots - self._n_free

    def reset_counters(self) -> None:
        """A new sequence: LFU counts restart (rows stay: they are still valid weights)."""
        self.freq[:] = 0
        self.pin_until[:] = -1

    def lookup(self, layer: int, cols: np.ndarray) -> np.ndarray:
        return self.slot_of[layer, cols]

    def touch(self, layer: int, cols: np.ndarray) -> None:
        self.freq[layer, cols] += 1

    def _allocate(self, n: int, current_layer: int, protect: np.ndarray) -> np.ndarray:
        take = min(n, self._n_free)
        out = [self._free[self._n_free - take:self._n_free].copy()]
        self._n_free -= take
        need = n - take
        if need:
            score = self.freq.ravel()[np.maximum(self.owner, 0)].astype(np.float64)
            score[self.owner < 0] = np.inf  # free slots were all taken above
            score[self.pin_until >= current_layer] = np.inf
            score[protect] = np.inf
            victims = np.argpartition(score, need - 1)[:need] if need < self.slots else np.arange(self.slots)
            if np.isinf(score[victims]).any():
                raise RuntimeError(f"{self.name} pool: {self.slots} slots cannot hold {n} more rows next to the "
                                   "pinned ones (the budget planner should have prevented this)")
            old = self.owner[victims]
            self.slot_of.ravel()[old] = -1
            self.owner[victims] = -1
            out.append(victims.astype(np.int32))
        return np.concatenate(out)

    def install(self, layers: np.ndarray, cols: np.ndarray, rows: np.ndarray, *, current_layer: int,
                protect: np.ndarray, pin_until: int = -1, take: np.ndarray | None = None) -> np.ndarray:
        """Puts rows [n, out] of (layers[n], cols[n]) into free or evicted slots; returns the slots.
        take: row i is rows[take[i]] (saves the caller a gathered copy of a preload block)."""
        n = len(cols)
        if n == 0:
            return np.zeros(0, np.int32)
        slots = self._allocate(n, current_layer, protect)
        # Batches of at most SCATTER_BYTES: one pow2-padded copy of a whole on-demand read was up to
        # 2x its rows on top of the budget.
        batch = self._scatter_batch
        for begin in range(0, n, batch):
            part = slice(begin, min(n, begin + batch))
            m = part.stop - begin
            size = _pow2_at_least(m, MIN_SCATTER)
            padded_slots = np.full(size, self.trash, np.int32)
            padded_slots[:m] = slots[part]
            if self.quantized:
                padded_rows = (np.zeros if size > m else np.empty)((size, self.row_width), np.uint8)
            else:
                padded_rows = aligned_float32((size, self.out_dim), zeros=size > m)  # adopted by the scatter, not copied
            padded_rows[:m] = rows[part] if take is None else rows[take[part]]
            # numpy straight into the jitted scatter: an eager jnp.asarray costs ~0.4 ms here
            self.buffer = stages.scatter_rows(self.buffer, padded_slots, padded_rows)
        self.slot_of[layers, cols] = slots
        self.owner[slots] = layers.astype(np.int64) * self.in_dim + cols
        self.pin_until[slots] = pin_until
        return slots

    def release(self) -> None:
        """Frees the device buffer (the engine is being re-budgeted or closed)."""
        try:
            self.buffer.delete()
        except Exception:
            pass
        self.buffer = None


def padded_source(pool: SlotPool, cols: np.ndarray, slots: np.ndarray, size: int, pad_col: int = 0) -> dict:
    """The stage's weight source for `cols` living in `slots`, padded to `size` entries."""
    pc = np.full(size, pad_col, np.int32)
    ps = np.full(size, pool.trash, np.int32)
    pc[:len(cols)] = cols
    ps[:len(slots)] = slots
    # numpy, not device_put: jit's C++ path takes host arrays ~10x faster than a device_put call
    return {"pool": pool.held(), "cols": pc, "slots": ps, "count": np.array([len(cols)], np.int32)}
