"""Checking a whole store: the manifest, every chunk's checksum, every value finite.

A store's chunks each carry a crc32c (store/layout.py), checked by TensorStore whenever a chunk
is read; a damaged chunk is otherwise found only when a run happens to read it. `verify_store`
reads every shard file of every tensor (and of every streaming layout, store/bundles.py) once,
and lists all that is damaged instead of stopping at the first. `activeflow verify` prints it
and exits 1 when anything is; `convert` and `fetch` run it before calling a store up to date.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from activeflow_jax.errors import StoreError
from activeflow_jax.store import bundles, layout
from activeflow_jax.store.reader import StoreReader


@dataclasses.dataclass
class VerifyReport:
    """What `verify_store` checked and what it found damaged (one line per problem)."""

    store: str
    tensors_checked: int = 0
    layouts_checked: list[int] = dataclasses.field(default_factory=list)
    bytes_checked: int = 0
    seconds: float = 0.0
    problems: list[str] = dataclasses.field(default_factory=list)
    tensors_damaged: bool = False  # damage in the tensors (re-convert), not only in a streaming layout

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ok": self.ok}


def _check_blocks(array, shape: tuple[int, ...], shard_rows: int, where: str, describe, report: VerifyReport,
                  wrap) -> bool:
    """Reads `array` one shard file at a time; appends a line per damaged shard. True if all were fine."""
    fine = True
    for index, start in enumerate(range(0, shape[0], shard_rows)):
        stop = min(shape[0], start + shard_rows)
        try:
            block = np.asarray(array[start:stop].read().result())
        except Exception as exc:  # TensorStore: checksum, missing or short file
            report.problems.append(f"{where}, shard file {describe(index)}: {wrap(exc, [start, stop - 1])}")
            fine = False
            continue
        report.bytes_checked += block.nbytes
        if not np.isfinite(block).all():
            report.problems.append(f"{where}, shard file {describe(index)}: holds NaN or Inf values")
            fine = False
    return fine


def verify_store(store_dir: str | os.PathLike, *, layouts: bool = True) -> VerifyReport:
    """Checks the manifest and reads every chunk of `store_dir` (and, with `layouts`, of its
    streaming layouts), so every checksum is verified. Raises StoreError only where there is no
    store to check at all; everything damaged is listed in the report."""
    start = time.perf_counter()
    path = os.path.abspath(os.fspath(store_dir))
    if not os.path.isdir(path):
        raise StoreError(f"store not found: {path} (create one with `activeflow convert` or `activeflow fetch`)")
    report = VerifyReport(store=path)
    try:
        reader = StoreReader(path, check_files=False)
    except StoreError as exc:
        report.problems.append(f"manifest: {exc}")
        report.tensors_damaged = True
        report.seconds = time.perf_counter() - start
        return report
    for name, entry in reader.manifest["tensors"].items():
        base = layout.tensor_path(path, name)
        keys = layout.shard_keys(tuple(entry["shape"]), entry["shard_rows"])
        missing = [k for k in keys if not os.path.isfile(os.path.join(base, k))]
        report.tensors_checked += 1
        if missing:
            report.problems.append(f"tensor '{name}': shard file(s) {', '.join(missing)} missing")
            continue
        try:
            array = reader._array(name)
        except StoreError as exc:
            report.problems.append(f"tensor '{name}': {exc}")
            continue
        _check_blocks(array, tuple(entry["shape"]), entry["shard_rows"], f"tensor '{name}'",
                      lambda i, keys=keys: f"tensors/{name}/{keys[i]}", report,
                      lambda exc, rows, name=name: _first_line(reader._wrap(exc, name, rows)))
    report.tensors_damaged = bool(report.problems)
    if layouts:
        _verify_layouts(path, report)
    report.seconds = time.perf_counter() - start
    return report


def _verify_layouts(path: str, report: VerifyReport) -> None:
    root = os.path.join(path, bundles.BUNDLE_DIR)
    sizes = sorted(int(e[1:]) for e in os.listdir(root) if e.startswith("n") and e[1:].isdigit()) \
        if os.path.isdir(root) else []
    for n in sizes:
        fix = f"run `activeflow relayout --store {path} --group-size {n}`"
        if bundles.bundle_info(path, n) is None:
            report.problems.append(f"streaming layout for groups of {n}: its record is missing, stale or damaged; {fix}")
            continue
        try:
            reader = bundles.BundleReader(path, n)
        except StoreError as exc:
            report.problems.append(f"streaming layout for groups of {n}: {_first_line(exc)}")
            continue
        report.layouts_checked.append(n)
        for key, entry in reader.info["arrays"].items():
            op, group = key.split("/g")
            where = f"streaming layout n{n}, {op} of layers {reader.layer_groups[int(group)]}"
            try:
                array = reader._array(op, int(group))
            except StoreError as exc:
                report.problems.append(f"{where}: {_first_line(exc)}")
                continue
            if not _check_blocks(array, tuple(entry["shape"]), entry["shard_rows"], where,
                                 lambda i, op=op, group=group: f"bundles/n{n}/{op}/g{group}/c/{i}/*", report,
                                 lambda exc, rows: "failed its checksum or could not be read"):
                report.problems[-1] += f"; {fix}"


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def repair_advice(report: VerifyReport) -> str:
    """What to run to repair what `report` found."""
    import json

    if not report.tensors_damaged:
        return "the tensors are fine; rewrite the damaged streaming layout(s) with the `activeflow relayout` above"
    source = ""
    try:
        with open(os.path.join(report.store, layout.MANIFEST)) as f:
            source = json.load(f).get("source", {}).get("path", "")
    except (OSError, ValueError, AttributeError):
        pass
    gguf = source if source else "MODEL.gguf"
    return (f"re-convert it: `activeflow convert {gguf} {report.store} --overwrite` (`activeflow fetch` for the "
            "default model)")
