"""Bandwidths the planner needs, measured once per machine and device, then cached.

    flash   cold random reads of a probe file written next to the store (same filesystem), by
            read size, with several reads in flight: small reads are what on-demand rows cost,
            large ones what a layer group's bundled preload costs (DESIGN.md section 3: on this
            disk 4 KiB reads move ~35-170 MB/s, 64 KiB ~0.5 GB/s, so the size matters ~20x)
    dram    a large numpy copy (read + write bytes per second): what streaming weights through
            the cores costs

Honesty (DESIGN.md section 5): the probe is dropped from the page cache (posix_fadvise
DONTNEED) before every measurement and the bytes the kernel really fetched (/proc/self/io) are
recorded next to the bytes asked for; a measurement served from DRAM is marked warm.

Measuring takes a few seconds, so results are cached in `activeflow_home()/bandwidth.json`,
keyed by the machine (hostname, CPU count) and the device holding the directory (st_dev):
`Engine.load` reads the cache and never re-measures; `activeflow plan --remeasure` refreshes it.
ACTIVEFLOW_BANDWIDTH_FILE points at another file: either such a keyed cache, or one explicit
record ({"dram_bps": ..., "flash_bps_by_chunk": [[bytes, bytes_per_s], ...]}), which is used as
is for every directory (tests, or a machine measured elsewhere) and never overwritten.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import socket
import sys
import time
from collections.abc import Iterable, Mapping

import numpy as np

from activeflow_jax.errors import InvalidArgumentError
from activeflow_jax.paths import activeflow_home
from activeflow_jax.runtime.iostats import drop_page_cache, process_read_bytes

CHUNK_KIB = (4, 16, 64, 256, 1024)  # one weight row ... a layer group's bundle of rows
THREADS = 8  # reads in flight: the runtime's readers (TensorStore) keep several going too
ENV_FILE = "ACTIVEFLOW_BANDWIDTH_FILE"


@dataclasses.dataclass(frozen=True)
class Bandwidths:
    """Measured bandwidths in bytes/s. `flash_bps_by_chunk` maps a read size to its bandwidth."""

    dram_bps: float
    flash_bps_by_chunk: Mapping[int, float]
    measured_at: str = ""
    threads: int = THREADS

    def __post_init__(self) -> None:
        pairs = self.flash_bps_by_chunk
        pairs = pairs.items() if isinstance(pairs, Mapping) else pairs
        table = {int(c): float(r) for c, r in sorted((int(c), float(r)) for c, r in pairs)}
        if not table or any(c <= 0 or r <= 0 for c, r in table.items()) or not self.dram_bps > 0:
            raise InvalidArgumentError(f"bandwidths must be positive, with at least one flash read size; got "
                                       f"dram {self.dram_bps!r}, flash {table!r}")
        object.__setattr__(self, "flash_bps_by_chunk", table)
        object.__setattr__(self, "dram_bps", float(self.dram_bps))

    def __hash__(self) -> int:
        return hash((self.dram_bps, tuple(self.flash_bps_by_chunk.items())))

    def flash_bps(self, chunk_bytes: float) -> float:
        """Bandwidth of reads of `chunk_bytes`: log-linear in the size between the measured sizes,
        clamped above the largest. Below the smallest measured size a read costs what one of that
        size costs (the device reads whole pages and is latency-bound there), so the bandwidth
        falls in proportion to the size."""
        sizes = list(self.flash_bps_by_chunk)
        rates = list(self.flash_bps_by_chunk.values())
        chunk = max(1.0, float(chunk_bytes))
        if chunk <= sizes[0]:
            return rates[0] * chunk / sizes[0]
        return float(np.interp(np.log(chunk), np.log(sizes), rates))

    def to_json(self) -> dict:
        return {"dram_bps": self.dram_bps, "flash_bps_by_chunk": [[c, r] for c, r in self.flash_bps_by_chunk.items()],
                "measured_at": self.measured_at, "threads": self.threads}

    @classmethod
    def from_json(cls, data: Mapping) -> "Bandwidths":
        try:
            return cls(float(data["dram_bps"]), [(int(c), float(r)) for c, r in data["flash_bps_by_chunk"]],
                       str(data.get("measured_at", "")), int(data.get("threads", THREADS)))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"a bandwidth record needs dram_bps and flash_bps_by_chunk [[bytes, bytes/s], "
                                       f"...]: {exc}") from None

    def describe(self) -> str:
        flash = ", ".join(f"{_size(c)} {r / 1e6:.0f}" for c, r in self.flash_bps_by_chunk.items())
        return f"DRAM {self.dram_bps / 1e9:.1f} GB/s; flash MB/s by read size ({self.threads} in flight): {flash}"


def _size(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KiB"


# -- measuring -----------------------------------------------------------------------------------


def _read_runs(files: Mapping[str, int], chunk: int, reads: int, threads: int, repeats: int,
               rng: np.random.Generator) -> dict:
    """Cold random chunk-aligned preads over `files` ({path: size}); the median of `repeats`
    runs, each on fresh offsets (distinct within a run) after dropping the files' pages."""
    slots = [(f, i * chunk) for f, size in files.items() for i in range(size // chunk)]
    if not slots:
        raise InvalidArgumentError(f"no file is large enough to read {_size(chunk)} chunks from")
    order = rng.permutation(len(slots))
    reads = min(reads, len(slots))
    runs = []
    for r in range(repeats):
        picks = [slots[order[(r * reads + i) % len(slots)]] for i in range(reads)]
        for path in files:
            drop_page_cache(path)
        fds = {f: os.open(f, os.O_RDONLY) for f in files}
        before = process_read_bytes() or 0
        t0 = time.perf_counter()
        try:
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                got = sum(pool.map(lambda job: len(os.pread(fds[job[0]], chunk, job[1])), picks))
        finally:
            for fd in fds.values():
                os.close(fd)
        seconds = time.perf_counter() - t0
        device = (process_read_bytes() or 0) - before
        runs.append({"bytes": got, "seconds": seconds, "device_read_bytes": device})
    runs.sort(key=lambda x: x["bytes"] / x["seconds"])
    mid = runs[len(runs) // 2]
    return {"chunk_kib": chunk >> 10, "threads": threads, "bytes": mid["bytes"], "seconds": mid["seconds"],
            "mb_per_s": mid["bytes"] / mid["seconds"] / 1e6, "device_read_bytes": mid["device_read_bytes"],
            "cold": mid["device_read_bytes"] >= 0.8 * mid["bytes"], "repeats": repeats}


def measure_flash(directory: str, chunk_kib: Iterable[int] = CHUNK_KIB, threads: int = THREADS,
                  mib_per_size: int = 16, seed: int = 0, repeats: int = 1) -> list[dict]:
    """Cold random pread bandwidth of the files already under `directory` (those >= 1 MiB), by
    chunk size: one record per size (bytes, seconds, MB/s, device bytes, cold)."""
    files = {os.path.join(root, name): 0 for root, _, names in os.walk(directory) for name in names}
    files = {f: os.path.getsize(f) for f in files if os.path.getsize(f) >= 1 << 20}
    if not files:
        raise InvalidArgumentError(f"no file of at least 1 MiB under {directory} to measure reads on")
    rng = np.random.default_rng(seed)
    return [_read_runs(files, kib << 10, max(64, (mib_per_size << 20) // (kib << 10)), threads, repeats, rng)
            for kib in chunk_kib]


def measure_dram(nbytes: int = 256 << 20, repeats: int = 3) -> float:
    """Bytes moved per second (read + write) by a numpy copy far larger than any CPU cache."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):  # the first also faults dst in; the best is the bandwidth
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def _write_probe(path: str, nbytes: int) -> None:
    """A file of incompressible bytes, flushed to the device (so dropping it is possible)."""
    block = np.random.default_rng(1).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        for _ in range(nbytes // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


def measure_bandwidths(directory: str, *, quick: bool = True) -> Bandwidths:
    """Measures DRAM and cold flash bandwidth here (~5-10 s quick, ~30 s otherwise). Flash is read
    from a probe file written under `directory` and deleted afterwards; where the directory is not
    writable, the files already there are read instead."""
    probe_mib, mib_per_size, repeats = (128, 16, 2) if quick else (256, 64, 5)
    path = os.path.join(directory, f".bandwidth-probe-{os.getpid()}.bin")
    rng = np.random.default_rng(0)
    try:
        _write_probe(path, probe_mib << 20)
    except OSError:
        _remove(path)
        flash = measure_flash(directory, CHUNK_KIB, THREADS, mib_per_size, repeats=repeats)
    else:
        try:
            size = {path: os.path.getsize(path)}
            flash = [_read_runs(size, kib << 10, max(64, (mib_per_size << 20) // (kib << 10)), THREADS, repeats, rng)
                     for kib in CHUNK_KIB]
        finally:
            _remove(path)
    warm = [r["chunk_kib"] for r in flash if not r["cold"]]
    if warm:
        print(f"activeflow: flash reads of {warm} KiB were served partly from DRAM (the page cache could not be "
              "dropped); the flash bandwidths are optimistic", file=sys.stderr)
    dram = measure_dram(128 << 20 if quick else 256 << 20)
    return Bandwidths(dram, [(r["chunk_kib"] << 10, r["bytes"] / r["seconds"]) for r in flash],
                      time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), THREADS)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# -- the cache -----------------------------------------------------------------------------------


def cache_key(directory: str) -> str:
    """Machine and device: another disk, or the same disk seen from another machine, is measured anew."""
    return f"{socket.gethostname()}|{os.cpu_count()}|dev{os.stat(directory).st_dev}"


def cache_path() -> str:
    return os.environ.get(ENV_FILE) or os.path.join(activeflow_home(), "bandwidth.json")


def _read_cache(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        if os.environ.get(ENV_FILE):
            raise InvalidArgumentError(f"cannot read the bandwidth file {path} ({ENV_FILE}): {exc}") from None
        return {}  # a damaged cache is measured again and rewritten
    return data if isinstance(data, dict) else {}


def get_bandwidths(directory: str | os.PathLike, *, remeasure: bool = False, quick: bool = True) -> Bandwidths:
    """The cached bandwidths of this machine and of the device holding `directory`; measured (and
    cached) only when there are none yet, or with remeasure=True."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise InvalidArgumentError(f"cannot measure bandwidths for {directory}: not a directory")
    path = cache_path()
    cache = _read_cache(path)
    explicit = "dram_bps" in cache  # one record for every directory: used as is, never rewritten
    if explicit and not remeasure:
        return Bandwidths.from_json(cache)
    key = cache_key(directory)
    if key in cache and not remeasure:
        return Bandwidths.from_json(cache[key])
    print(f"activeflow: measuring flash and DRAM bandwidth for {directory} (once; cached in {path})",
          file=sys.stderr)
    result = measure_bandwidths(directory, quick=quick)
    if not explicit:
        cache[key] = result.to_json()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(tmp, path)
    return result
