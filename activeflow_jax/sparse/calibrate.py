"""Calibration of per-(layer, op group) magnitude thresholds for target sparsities (TEAL's rule).

The dense model runs over calibration text (never the evaluation text); inside the jitted step the
|x| of every op group's input is binned into a log2 histogram (64 bins per octave, ~1% wide), so
any sparsity level can be read off as a quantile without keeping the activations. Thresholds for
the requested levels are written atomically into the store's `calibration.json`; the weights are
never touched.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from activeflow_jax.config import MAX_SPARSITY, OP_GROUPS, ModelConfig, SparsityConfig
from activeflow_jax.errors import InvalidArgumentError, StoreError
from activeflow_jax.store import layout

HIST_BINS = 2048
LOG2_MIN = -24.0
BINS_PER_OCTAVE = 64
DEFAULT_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CALIBRATION_WINDOW = 512
MIN_CALIBRATION_TOKENS = 1024


def default_calibration_text() -> str:
    """The shipped calibration corpus (model-written articles; see checkpoints/make_calibration_text.py)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "calibration.txt")


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Thresholds [L, len(OP_GROUPS)] per sparsity level, and where they came from."""

    levels: dict[float, np.ndarray]
    source: dict[str, Any]

    @property
    def available(self) -> list[float]:
        return sorted(self.levels)

    def thresholds(self, sparsity) -> np.ndarray:
        """[L, G] thresholds for one level, or for a per-op allocation (a level per op group, in
        OP_GROUPS order: each op's column comes from its own level; 0 means dense, threshold 0)."""
        if isinstance(sparsity, (tuple, list)):
            missing = sorted({round(float(s), 4) for s in sparsity if s > 0} - set(self.levels))
            if missing:
                self.thresholds(missing[0])  # the error that names the level to calibrate
            columns = [np.zeros(next(iter(self.levels.values())).shape[0], np.float32) if s == 0
                       else self.levels[round(float(s), 4)][:, g] for g, s in enumerate(sparsity)]
            return np.stack(columns, axis=1)
        key = round(float(sparsity), 4)
        if key not in self.levels:
            raise InvalidArgumentError(
                f"no thresholds for sparsity {sparsity:g}; calibrated levels: "
                f"{', '.join(f'{s:g}' for s in self.available) or 'none'}. Calibrate it with "
                f"`activeflow calibrate --store STORE --levels {sparsity:g}` (or af.calibrate(store, levels=[...]))"
            )
        return self.levels[key]


def _bin_of(a: jax.Array) -> jax.Array:
    pos = (jnp.log2(jnp.maximum(a, 2.0**LOG2_MIN)) - LOG2_MIN) * BINS_PER_OCTAVE
    return jnp.clip(pos.astype(jnp.int32), 0, HIST_BINS - 1)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _window_histograms(params, tokens, *, cfg: ModelConfig) -> jax.Array:
    """Counts [L, G, HIST_BINS] of log2|x| of each op group's input over one window."""
    from activeflow_jax.models.llama import forward_with_taps

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
    from activeflow_jax.engine import Engine

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


def write_calibration(store_dir: str, calibration: Calibration, counts: np.ndarray | None = None) -> None:
    """Atomically replaces the store's calibration.json (temp file + fsync + rename)."""
    record = {
        "version": layout.CALIBRATION_VERSION,
        "op_groups": list(OP_GROUPS),
        "histogram": {"bins": HIST_BINS, "log2_min": LOG2_MIN, "bins_per_octave": BINS_PER_OCTAVE},
        "source": calibration.source,
        "levels": {f"{s:g}": np.asarray(t).round(7).tolist() for s, t in sorted(calibration.levels.items())},
    }
    if counts is not None:
        # sparse encoding of the histograms: enough to derive any other level later
        record["histogram"]["counts_nonzero"] = {
            "index": np.flatnonzero(counts).tolist(), "value": counts.ravel()[np.flatnonzero(counts)].tolist(),
            "shape": list(counts.shape),
        }
    path = os.path.join(store_dir, layout.CALIBRATION)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def store_thresholds(store_dir: str | None, cfg: ModelConfig, sparsity) -> np.ndarray:
    """Thresholds [L, G] the store holds for `sparsity` (a level, or a SparsityConfig, whose
    per-op allocation takes each op's column from its own level); a clear error if it holds none
    (or not that level). The one place every user of the threshold policy gets them from."""
    if isinstance(sparsity, SparsityConfig):
        sparsity = sparsity.op_sparsity or sparsity.sparsity
    calibration = read_calibration(store_dir, cfg) if store_dir else None
    if calibration is None:
        raise InvalidArgumentError(
            f"the store {store_dir} has no calibrated thresholds; run `activeflow calibrate "
            f"--store {store_dir}` (or af.calibrate(store)) first, or use policy='topk'"
        )
    return calibration.thresholds(sparsity)


def read_calibration(store_dir: str, cfg: ModelConfig) -> Calibration | None:
    """The store's calibration, or None if it has none. A damaged file is a clear error."""
    path = os.path.join(store_dir, layout.CALIBRATION)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        if record.get("version") != layout.CALIBRATION_VERSION:
            raise StoreError(f"{path} has calibration version {record.get('version')}, this activeflow reads "
                             f"{layout.CALIBRATION_VERSION}; calibrate again (`activeflow calibrate --store ...`)")
        if record.get("op_groups") != list(OP_GROUPS):
            raise ValueError("op groups differ")
        levels = {round(float(s), 4): np.asarray(t, np.float32) for s, t in record["levels"].items()}
        for s, t in levels.items():
            if t.shape != (cfg.num_layers, len(OP_GROUPS)) or not np.all(np.isfinite(t)) or not 0 < s <= MAX_SPARSITY:
                raise ValueError(f"level {s} has thresholds of shape {t.shape}")
        return Calibration(levels=levels, source=record.get("source", {}))
    except StoreError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StoreError(f"{path} is damaged ({exc}); delete it and calibrate again "
                         "(`activeflow calibrate --store ...`)") from None
