"""A store's calibrated sparsity thresholds (`calibration.json`): the record, read and written.

sparse/calibrate.py measures them by running the model; everything that only uses them (the
engine, the swapping runtime, the planner) reads them from here, without the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from activeflow_jax.config import MAX_SPARSITY, OP_GROUPS, ModelConfig, SparsityConfig
from activeflow_jax.errors import InvalidArgumentError, StoreError
from activeflow_jax.store import layout

# the histogram of log2|x| that calibration bins into, recorded beside the thresholds
HIST_BINS = 2048
LOG2_MIN = -24.0
BINS_PER_OCTAVE = 64


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
