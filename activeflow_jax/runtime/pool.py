"""Slot pools, host side: which weight row lives in which slot of one op group's device pool.

The device holds the pool itself, the channel-to-slot map the programs look rows up in, and the
LFU counters (runtime/pooled.py). The host decides where rows go: `slot_of[l, c]` and
`owner[slot]` here are the allocation's truth, and may run ahead of the device map by one
program, since slots for a layer group's preload are reserved (and their old rows evicted)
while the group before it still computes. Such a slot is `pending` until the program that
scatters the preloaded rows has been dispatched; its old row stays valid on the device until
then, so no program reads a half-installed slot, and a fill callback that wants a pending row
early writes it itself (and clears the old owner's device entry, which `pending_clear` keeps).

Victims are the least frequently used rows (context-level counts, reset per sequence, as the
paper's hot-weight cache), excluding rows pinned for a layer group about to run and rows the
current op uses. They are taken from a queue filled by one scan of the slots for the lowest
scores, at least `slots / 16` of them at a time, so an install costs no scan of every slot.
"""

from __future__ import annotations

import numpy as np

from activeflow_jax.quant import is_quantized, row_bytes

REFILL_SHARE = 16  # a victim-queue refill takes at least slots / REFILL_SHARE candidates


class SlotPool:
    def __init__(self, name: str, num_layers: int, in_dim: int, out_dim: int, slots: int, dtype: str = "float32"):
        self.name, self.num_layers, self.in_dim, self.out_dim, self.slots = name, num_layers, in_dim, out_dim, slots
        self.dtype = dtype  # float32, or the store's quantized dtype (rows held as stored)
        self.quantized = is_quantized(dtype)
        self.row_width = row_bytes(dtype, out_dim) if self.quantized else out_dim  # elements of one held row
        self.np_dtype = np.dtype(np.uint8 if self.quantized else np.float32)
        self.trash = slots  # index of the all-zero padding row
        self.map_size = num_layers * in_dim  # flat map index out of range: padding
        self.slot_of = np.full((num_layers, in_dim), -1, np.int32)
        self.owner = np.full(slots, -1, np.int64)  # layer * in_dim + channel
        self.pin_until = np.full(slots, -1, np.int32)  # protected while the current layer <= this
        self.pending = np.zeros(slots, bool)
        self.pending_clear = np.full(slots, -1, np.int64)  # device owner to clear when a pending slot fills early
        self._free = np.arange(slots, dtype=np.int32)[::-1].copy()  # free slots: self._free[:self._n_free]
        self._n_free = slots
        self._queue = np.zeros(0, np.int32)  # victim candidates, lowest score first
        self._queue_owner = np.zeros(0, np.int64)  # ... and their owners when queued

    @property
    def nbytes(self) -> int:
        return (self.slots + 1) * self.row_width * self.np_dtype.itemsize

    @property
    def resident_rows(self) -> int:
        return self.slots - self._n_free

    @property
    def free_slots(self) -> int:
        return self._n_free

    @property
    def holds_every_row(self) -> bool:
        return self.slots >= self.map_size

    def new_sequence(self) -> None:
        """LFU counts restart (the device's counters are zeroed by the runtime); rows stay."""
        self._queue = self._queue[:0]
        self.pin_until[:] = -1

    def new_pass(self) -> None:
        """Pins name layers of one forward pass."""
        self.pin_until[:] = -1

    def allocate(self, n: int, current_layer: int, protect: np.ndarray, freq) -> tuple[np.ndarray, np.ndarray]:
        """n slots, free ones first, then LFU victims; returns (slots, evicted owners or -1).
        The victims' host entries are cleared; the caller clears the device's. protect: slots the
        caller is using; freq: a callable giving the current LFU counts [L, in] (read only when the
        victim queue must be refilled)."""
        take = min(n, self._n_free)
        slots = [self._free[self._n_free - take:self._n_free][::-1].copy()]
        self._n_free -= take
        evicted = [np.full(take, -1, np.int64)]
        need = n - take
        if need:
            victims = self._victims(need, current_layer, protect, freq)
            old = self.owner[victims]
            self.slot_of.ravel()[old] = -1
            self.owner[victims] = -1
            slots.append(victims)
            evicted.append(old)
        return np.concatenate(slots).astype(np.int32), np.concatenate(evicted)

    def _victims(self, need: int, current_layer: int, protect: np.ndarray, freq) -> np.ndarray:
        blocked = np.zeros(self.slots, bool)
        blocked[protect[(protect >= 0) & (protect < self.slots)]] = True
        out: list[np.ndarray] = []
        got, refilled = 0, 0
        while got < need:
            if len(self._queue) == 0:
                if refilled == 2:
                    raise RuntimeError(f"{self.name} pool: {self.slots} slots cannot hold {need} more rows next to "
                                       "the pinned ones (the budget planner should have prevented this)")
                # pins are a preference: rows pinned for a group about to run are evicted last (they
                # are read again on demand if they were), only pending slots and `protect` are never
                self._refill(need - got, current_layer, blocked, freq(), respect_pins=not refilled)
                refilled += 1
                continue
            cand, owners = self._queue, self._queue_owner
            ok = (self.owner[cand] == owners) & (owners >= 0) & ~blocked[cand] & ~self.pending[cand]
            if refilled < 2:
                ok &= self.pin_until[cand] < current_layer
            usable = cand[ok][:need - got]
            # candidates before the last one taken are consumed whether usable or not (a pinned or
            # reassigned slot is rescored by the next refill)
            last = int(np.flatnonzero(ok)[len(usable) - 1]) + 1 if len(usable) else len(cand)
            self._queue, self._queue_owner = cand[last:], owners[last:]
            out.append(usable)
            blocked[usable] = True  # a refill in this same call must not offer them again
            got += len(usable)
        return np.concatenate(out).astype(np.int32)

    def _refill(self, need: int, current_layer: int, blocked: np.ndarray, freq: np.ndarray, *,
                respect_pins: bool) -> None:
        owned = self.owner >= 0
        score = np.full(self.slots, np.inf)
        score[owned] = np.asarray(freq).ravel()[self.owner[owned]]
        score[blocked | self.pending] = np.inf
        if respect_pins:
            score[self.pin_until >= current_layer] = np.inf
        m = min(self.slots, max(need, self.slots // REFILL_SHARE))
        cand = np.argpartition(score, m - 1)[:m] if m < self.slots else np.arange(self.slots)
        cand = cand[np.argsort(score[cand], kind="stable")]
        cand = cand[np.isfinite(score[cand])]
        self._queue, self._queue_owner = cand.astype(np.int32), self.owner[cand].copy()

    def assign(self, layers: np.ndarray, cols: np.ndarray, slots: np.ndarray, *, pin_until: int = -1) -> None:
        """Records (layers, cols) as living in `slots` (already allocated)."""
        self.slot_of[layers, cols] = slots
        self.owner[slots] = layers.astype(np.int64) * self.in_dim + cols
        self.pin_until[slots] = pin_until
