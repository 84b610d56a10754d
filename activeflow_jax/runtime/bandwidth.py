"""Bandwidths the planner needs, measured once per machine and device and cached.

    flash   cold random reads of the store's own files (os.pread of chunk-aligned ranges after
            posix_fadvise DONTNEED, several threads), by chunk size: small chunks are what
            on-demand rows cost, large ones what a layer group's bundled preload costs
    dram    a large numpy copy (read + write bytes)

Cached in `activeflow_home()/bandwidth.json`, keyed by the device holding the store and the
machine, so `Engine.load` does not re-measure; `activeflow plan --remeasure` refreshes it. The
environment variable ACTIVEFLOW_BANDWIDTH_FILE points at an explicit file instead (tests).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import socket
import time

import numpy as np

from activeflow_jax.errors import StoreError
from activeflow_jax.paths import activeflow_home
from activeflow_jax.runtime.iostats import drop_page_cache, process_read_bytes

CHUNK_KIB = (4, 16, 64, 256, 1024)
BUSY_SHARE = 0.5  # share of the cores other processes used during a measurement above which it is not cached


def _cpu_seconds() -> tuple[float, float] | None:
    """(non-idle CPU seconds of the whole machine, of this process) so far, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0.0)  # minus idle and iowait
    own = os.times()
    return busy / tick, own.user + own.system


def others_share(before, after, seconds: float) -> float:
    """Share of all cores that *other* processes kept busy between two _cpu_seconds() readings."""
    if before is None or after is None or seconds < 0.5:  # too short to tell
        return 0.0
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, others / (seconds * (os.cpu_count() or 1)))


@dataclasses.dataclass(frozen=True)
class Bandwidths:
    dram_bps: float
    flash_bps_by_chunk: tuple[tuple[int, float], ...]  # (chunk bytes, bytes/s), ascending
    measured_at: str = ""
    threads: int = 8

    def flash_bps(self, chunk_bytes: float) -> float:
        """Interpolated log-linearly in the chunk size, clamped to the measured range."""
        sizes = np.log([c for c, _ in self.flash_bps_by_chunk])
        rates = [r for _, r in self.flash_bps_by_chunk]
        return float(np.interp(np.log(max(1.0, chunk_bytes)), sizes, rates))

    def to_json(self) -> dict:
        return {"dram_bps": self.dram_bps, "flash_bps_by_chunk": [list(x) for x in self.flash_bps_by_chunk],
                "measured_at": self.measured_at, "threads": self.threads}

    @classmethod
    def from_json(cls, data: dict) -> "Bandwidths":
        return cls(float(data["dram_bps"]), tuple((int(c), float(r)) for c, r in data["flash_bps_by_chunk"]),
                   data.get("measured_at", ""), int(data.get("threads", 8)))


def measure_flash(directory: str, chunk_kib=CHUNK_KIB, threads: int = 8, mib_per_size: int = 16,
                  seed: int = 0) -> list[dict]:
    """Cold random pread bandwidth of the files under `directory` (>= 1 MiB each), by chunk size."""
    files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names
             if os.path.getsize(os.path.join(root, name)) >= (1 << 20)]
    if not files:
        raise FileNotFoundError(f"no file of at least 1 MiB under {directory} to measure reads on")
    sizes = {f: os.path.getsize(f) for f in files}
    rng = np.random.default_rng(seed)
    results = []
    for kib in chunk_kib:
        chunk = kib << 10
        count = max(4, (mib_per_size << 20) // chunk)
        picks = [files[i] for i in rng.integers(0, len(files), count)]
        jobs = [(f, int(rng.integers(0, max(1, sizes[f] // chunk))) * chunk) for f in picks]
        drop_page_cache(directory)
        fds = {f: os.open(f, os.O_RDONLY) for f in set(picks)}
        before = process_read_bytes() or 0
        t0 = time.perf_counter()
        try:
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                got = sum(pool.map(lambda job: len(os.pread(fds[job[0]], chunk, job[1])), jobs))
        finally:
            for fd in fds.values():
                os.close(fd)
        seconds = time.perf_counter() - t0
        device = (process_read_bytes() or 0) - before
        results.append({"chunk_kib": kib, "threads": threads, "bytes": got, "seconds": seconds,
                        "mb_per_s": got / seconds / 1e6, "device_read_bytes": device, "cold": device >= 0.8 * got})
    return results


def measure_dram(nbytes: int = 64 << 20, repeats: int = 3) -> float:
    # 2 x 64 MiB: past any CPU cache, and small beside a DRAM budget (2 x 256 MiB got a 0.5-budget
    # run of the default model killed in a memory cgroup capped at budget + process)
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2 * nbytes / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _key(directory: str) -> str:
    return f"{socket.gethostname()}|{os.cpu_count()}|dev{os.stat(directory).st_dev}"


def _cache_path() -> str:
    return os.environ.get("ACTIVEFLOW_BANDWIDTH_FILE") or os.path.join(activeflow_home(), "bandwidth.json")


def get_bandwidths(store_dir: str, *, remeasure: bool = False) -> Bandwidths:
    """The cached bandwidths for the device holding `store_dir`, measured (~10 s) if absent."""
    path = _cache_path()
    key = _key(store_dir)
    cache: dict = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                cache = json.load(f)
        except (OSError, json.JSONDecodeError):
            cache = {}
    if "dram_bps" in cache:  # an explicit single record (ACTIVEFLOW_BANDWIDTH_FILE)
        return Bandwidths.from_json(cache)
    if key in cache and not remeasure:
        return Bandwidths.from_json(cache[key])
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    try:
        flash = measure_flash(os.path.join(store_dir, "tensors"))
    except FileNotFoundError as exc:
        raise StoreError(f"{exc}: the store is too small for the planner to measure this disk on; give the "
                         "sparsity and the group size yourself (--sparsity S --group-size N), or point "
                         "ACTIVEFLOW_BANDWIDTH_FILE at a bandwidth record") from None
    result = Bandwidths(measure_dram(), tuple((r["chunk_kib"] << 10, r["bytes"] / r["seconds"]) for r in flash),
                        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    busy = others_share(cpu0, _cpu_seconds(), time.perf_counter() - t0)
    if busy >= BUSY_SHARE:
        # Other work competing for the cores and the disk skews the figures (stop 13: a table
        # measured beside a training run read 18 instead of 52 MB/s at 4 KiB, and the planner
        # then chose the slowest group size); use them for this load only.
        logging.warning("bandwidths measured while other processes kept %.0f%% of the cores busy: used for this "
                        "load but not cached; run `activeflow plan --dram-budget 50%% --remeasure` on a quiet "
                        "machine", 100 * busy)
        return result
    cache[key] = result.to_json()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(cache, f, indent=1)
    os.replace(tmp, path)
    return result


def flash_use(loader: dict, bw: Bandwidths) -> dict:
    """How well the decode's reads used the flash: per kind (on-demand, preload), the mean
    contiguous read (extent), the throughput achieved (extent bytes over the seconds the reads
    took) and its share of what this machine measured at that read size. The preload seconds run
    from issue to data in hand, with qkv and gate_up reads of a group in flight together and next
    to the on-demand reads, so its share understates the device's use."""
    out = {}
    for kind in ("ondemand", "preload"):
        extents, nbytes, seconds = (loader.get(f"{kind}_extents", 0), loader.get(f"{kind}_extent_bytes", 0),
                                    loader.get(f"{kind}_seconds", 0.0))
        if not extents or seconds <= 0:
            continue
        mean = nbytes / extents
        achieved = nbytes / seconds
        expected = bw.flash_bps(mean)
        out[kind] = {"mean_extent_bytes": mean, "achieved_bps": achieved, "measured_bps_at_extent": expected,
                     "share": achieved / expected}
    return out
