"""Calibration of per-(layer, op group) magnitude thresholds for target sparsities (TEAL's rule).

The dense model runs over calibration text (never the evaluation text); inside the jitted step the
|x| of every op group's input is binned into a log2 histogram (64 bins per octave, ~1% wide), so
any sparsity level can be read off as a quantile without keeping the activations. Thresholds for
the requested levels are written atomically into the store's `calibration.json`; the weights are
never touched. The record itself is read and written by sparse/thresholds.py.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from activeflow_jax.config import MAX_SPARSITY, OP_GROUPS, ModelConfig
from activeflow_jax.engine import Engine
from activeflow_jax.errors import InvalidArgumentError
from activeflow_jax.models.llama import forward_with_taps
from activeflow_jax.paths import default_calibration_text
from activeflow_jax.sparse.thresholds import (
    BINS_PER_OCTAVE,
    HIST_BINS,
    LOG2_MIN,
    Calibration,
    read_calibration,
    write_calibration,
)

DEFAULT_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CALIBRATION_WINDOW = 512
MIN_CALIBRATION_TOKENS = 1024


def _bin_of(a: jax.Array) -> jax.Array:
    pos = (jnp.log2(jnp.maximum(a, 2.0**LOG2_MIN)) - LOG2_MIN) * BINS_PER_OCTAVE
    return jnp.clip(pos.astype(jnp.int32), 0, HIST_BINS - 1)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _window_histograms(params, tokens, *, cfg: ModelConfig) -> jax.Array:
    """Counts [L, G, HIST_BINS] of log2|x| of each op group's input over one window."""
    _, taps = forward_with_taps(params, tokens, cfg=cfg)
    hist = jax.vmap(lambda b: jnp.bincount(b.reshape(-1), length=HIST_BINS))
    return jnp.stack([hist(_bin_of(jnp.abs(taps[g]))) for g in OP_GROUPS], axis=1)


def thresholds_from_histograms(counts: np.ndarray, sparsity: float) -> np.ndarray:
    """[L, G] thresholds t such that a fraction >= sparsity of |x| lies below t."""
    cdf = np.cumsum(counts, axis=-1) / np.maximum(counts.sum(axis=-1, keepdims=True), 1)
    idx = np.argmax(cdf >= sparsity - 1e-12, axis=-1)  # first bin reaching the level
    thr = 2.0 ** ((idx + 1) / BINS_PER_OCTAVE + LOG2_MIN)
    return np.where(sparsity <= 0, 0.0, thr).astype(np.float32)


def calibrate(store_or_engine: Any, text_path: str | None = None, *, levels=DEFAULT_LEVELS,
              max_tokens: int | None = 32768, progress: bool = True) -> Calibration:
    """Calibrates thresholds for `levels` on `text_path` (default: the shipped corpus) and saves
    them into the engine's store (merged with levels already there). Returns the calibration."""
    engine = store_or_engine if isinstance(store_or_engine, Engine) else Engine.load(store_or_engine)
    if engine.store_path is None:
        raise InvalidArgumentError("the engine has no store to save the calibration into")
    levels = _validate_levels(levels)
    text_path = text_path or default_calibration_text()
    if not os.path.isfile(text_path):
        raise InvalidArgumentError(f"calibration text not found: {text_path}")
    with open(text_path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if engine.tokenizer is None:
        raise InvalidArgumentError("the store has no tokenizer; cannot calibrate on text")
    ids = np.asarray(engine.tokenizer.encode(text), np.int32)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < MIN_CALIBRATION_TOKENS:
        raise InvalidArgumentError(
            f"calibration text too short: {len(ids)} tokens, at least {MIN_CALIBRATION_TOKENS} are needed "
            "(a few pages of ordinary prose); give a longer --text file"
        )
    windows = [ids[i:i + CALIBRATION_WINDOW] for i in range(0, len(ids) - CALIBRATION_WINDOW + 1,
                                                               CALIBRATION_WINDOW)]
    cfg = engine.config
    counts = np.zeros((cfg.num_layers, len(OP_GROUPS), HIST_BINS), np.int64)
    t0 = time.perf_counter()
    iterator = windows
    if progress:
        from tqdm import tqdm

        iterator = tqdm(windows, desc="calibrate", unit="window")
    for window in iterator:
        counts += np.asarray(_window_histograms(engine.params, jnp.asarray(window), cfg=cfg))
    source = {
        "text": os.path.basename(text_path),
        "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "tokens": int(len(windows) * CALIBRATION_WINDOW),
        "windows": len(windows),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    new = {s: thresholds_from_histograms(counts, s) for s in levels}
    existing = read_calibration(engine.store_path, cfg)
    merged = dict(existing.levels) if existing and existing.source.get("text_sha256") == source["text_sha256"] else {}
    merged.update(new)
    calibration = Calibration(levels=merged, source=source)
    write_calibration(engine.store_path, calibration, counts)
    return calibration


def _validate_levels(levels) -> tuple[float, ...]:
    try:
        out = tuple(sorted({round(float(s), 4) for s in levels}))
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"levels must be numbers in (0, {MAX_SPARSITY}], got {levels!r}") from None
    if not out or any(not (0 < s <= MAX_SPARSITY) for s in out):
        raise InvalidArgumentError(f"levels must be numbers in (0, {MAX_SPARSITY}], got {levels!r}")
    return out
