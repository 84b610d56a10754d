"""Flash read bandwidth of the store's device by chunk size, cold (absl flags).

    python bench/flash.py --chunk_kib 4,64,1024 --threads 1,8 --output results/flash.jsonl

Reads random, chunk-aligned ranges of the store's shard files with os.pread after dropping them
from the page cache (posix_fadvise DONTNEED), from 1 or more threads, and reports MB/s together
with the bytes the kernel really fetched from the device (/proc/self/io read_bytes): if those are
far below the bytes asked, the run was served from DRAM and is labelled warm. These are the
bandwidths the swapping runtime's planner needs (small chunks: on-demand rows; large: preloads).
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags

import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_string("store", None, "store directory; default: the default model")
flags.DEFINE_list("chunk_kib", ["4", "16", "64", "256", "1024"], "read sizes in KiB")
flags.DEFINE_list("threads", ["1", "8"], "reader thread counts")
flags.DEFINE_integer("mib_per_run", 64, "MiB read per (chunk size, threads) run")
flags.DEFINE_integer("seed", 0, "seed of the random offsets")
flags.DEFINE_string("output", None, "append the JSON record here (JSON lines)")


def main(argv):
    del argv
    import activeflow_jax as af
    from activeflow_jax.runtime.iostats import drop_page_cache, process_read_bytes
    from common import emit

    store = FLAGS.store or af.fetch_default_model(quiet=True)
    files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(store, "tensors"))
             for name in names if os.path.getsize(os.path.join(root, name)) >= (1 << 20)]
    sizes = {f: os.path.getsize(f) for f in files}
    rng = np.random.default_rng(FLAGS.seed)
    results = []
    for threads in (int(t) for t in FLAGS.threads):
        for kib in (int(c) for c in FLAGS.chunk_kib):
            chunk = kib << 10
            count = max(1, (FLAGS.mib_per_run << 20) // chunk)
            picks = [files[i] for i in rng.integers(0, len(files), count)]
            jobs = [(f, int(rng.integers(0, max(1, sizes[f] // chunk))) * chunk) for f in picks]
            drop_page_cache(os.path.join(store, "tensors"))
            fds = {f: os.open(f, os.O_RDONLY) for f in set(picks)}
            before = process_read_bytes()
            t0 = time.perf_counter()

            def read(job):
                path, offset = job
                return len(os.pread(fds[path], chunk, offset))

            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                got = sum(pool.map(read, jobs))
            seconds = time.perf_counter() - t0
            device = (process_read_bytes() or 0) - (before or 0)
            for fd in fds.values():
                os.close(fd)
            record = {"chunk_kib": kib, "threads": threads, "bytes": got, "seconds": seconds,
                      "mb_per_s": got / seconds / 1e6, "device_read_bytes": device,
                      "cold": device >= 0.8 * got}
            results.append(record)
            print(f"{kib:>6} KiB x {threads} threads: {record['mb_per_s']:8.1f} MB/s "
                  f"({'cold' if record['cold'] else 'WARM'}: device read {device / 1e6:.1f} of {got / 1e6:.1f} MB)",
                  file=sys.stderr)
    emit({"bench": "flash", "config": {"store": os.path.abspath(store), "mib_per_run": FLAGS.mib_per_run},
          "results": results}, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
