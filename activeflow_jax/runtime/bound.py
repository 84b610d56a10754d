"""How few bytes any swapping runtime must read from flash: a lower bound from an activation trace.

Given, for every decoded token, the rows the sparse model computes with (its active sets), and a
DRAM cache of C bytes that persists between tokens, every byte of an active row that is not in
the cache when its token starts must be read from flash. No caching policy, predictor or
preloading can read fewer bytes than the offline optimum below; preloading only moves reads
earlier, and a predicted superset only adds bytes.

The optimum is computed in the byte model: every byte of a row is requested whenever its row is,
and the cache may keep any part of a row. A policy that caches whole rows is one of this model's
policies, so its optimum is a lower bound for whole-row caching too. In the byte model all pages
(bytes) have the same size, and for equal-size pages Belady's rule (keep what is requested
again soonest) is optimal, also when a token requests its set all at once: after each token the
cache keeps, of what it holds and what the token just read, the bytes whose next request comes
first, up to C.

This says nothing about speed by itself: `bench/swap_bound.py` divides the bytes by the best
flash bandwidth measured on the machine (whatever the chunk size, so optimistically) to get the
fastest decode any implementation could reach at a budget.
"""

from __future__ import annotations

import numpy as np

from activeflow_jax.errors import InvalidArgumentError


def next_request(active: np.ndarray) -> np.ndarray:
    """[T, n] int: for each token t and row, the next token after t that requests the row (T if
    none)."""
    t_count, n = active.shape
    out = np.empty((t_count, n), np.int32)
    upcoming = np.full(n, t_count, np.int32)
    for t in range(t_count - 1, -1, -1):
        out[t] = upcoming
        upcoming = np.where(active[t], t, upcoming)
    return out


def min_flash_bytes(active: np.ndarray, row_bytes: np.ndarray, capacity: float,
                    cached: np.ndarray | None = None) -> np.ndarray:
    """Fewest bytes read from flash per token ([T]) for the trace `active` ([T, n] bool: token t
    computes with row j), rows of `row_bytes` ([n]) and a cache of `capacity` bytes.

    cached: bytes of each row already in DRAM before the first token (default: none, a cold
    start); the first tokens of a trace then pay for filling the cache."""
    active = np.asarray(active, bool)
    sizes = np.asarray(row_bytes, np.float64)
    if active.ndim != 2 or sizes.shape != (active.shape[1],):
        raise InvalidArgumentError(f"need active [T, n] and row_bytes [n], got {active.shape} and {sizes.shape}")
    if not (capacity >= 0 and np.isfinite(capacity)) or np.any(sizes < 0):
        raise InvalidArgumentError("capacity and row sizes must be finite and >= 0")
    t_count, n = active.shape
    held = np.zeros(n) if cached is None else np.minimum(np.asarray(cached, np.float64), sizes)
    nxt = next_request(active)
    misses = np.empty(t_count)
    for t in range(t_count):
        need = active[t]
        misses[t] = float(np.sum((sizes - held)[need]))
        available = np.where(need, sizes, held)  # what DRAM holds right after token t's reads
        available[nxt[t] >= t_count] = 0.0  # never requested again: worthless
        order = np.argsort(nxt[t], kind="stable")
        before = np.cumsum(available[order]) - available[order]
        held = np.zeros(n)
        held[order] = np.clip(capacity - before, 0.0, available[order])
    return misses


def lru_flash_bytes(active: np.ndarray, row_bytes: np.ndarray, capacity: float) -> np.ndarray:
    """Bytes per token that whole-row LRU caching reads (a reference point, not a bound): after
    each token the cache holds the most recently used rows that fit."""
    active = np.asarray(active, bool)
    sizes = np.asarray(row_bytes, np.float64)
    t_count, n = active.shape
    last = np.full(n, -1, np.int64)
    held = np.zeros(n, bool)
    misses = np.empty(t_count)
    for t in range(t_count):
        misses[t] = float(sizes[active[t] & ~held].sum())
        last[active[t]] = t
        order = np.argsort(-last, kind="stable")
        fits = np.cumsum(sizes[order]) <= capacity + 1e-9
        held = np.zeros(n, bool)
        held[order[fits]] = True
        held &= last >= 0
    return misses


def static_flash_bytes(active: np.ndarray, row_bytes: np.ndarray, capacity: float) -> np.ndarray:
    """Bytes per token with the best fixed set of rows in DRAM, chosen knowing the whole trace
    (the most often used rows that fit, by uses per byte being equal within an op): what a
    hot-weight cache whose frequency estimate were perfect would read, cold start excluded."""
    active = np.asarray(active, bool)
    sizes = np.asarray(row_bytes, np.float64)
    uses = active.sum(axis=0)
    order = np.argsort(-uses, kind="stable")
    fits = np.cumsum(sizes[order]) <= capacity + 1e-9
    held = np.zeros(active.shape[1], bool)
    held[order[fits]] = True
    return (active & ~held) @ sizes
