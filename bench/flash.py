"""Flash read bandwidth of the store's device by chunk size, cold (absl flags).

    python bench/flash.py --chunk_kib 4,64,1024 --threads 1,8 --output results/flash.jsonl

Reads random, chunk-aligned ranges of the store's shard files with os.pread after dropping them
from the page cache (posix_fadvise DONTNEED), from 1 or more threads, and reports MB/s together
with the bytes the kernel really fetched from the device (/proc/self/io read_bytes): if those are
far below the bytes asked, the run was served from DRAM and is labelled warm. These are the
bandwidths the swapping runtime's planner needs (small chunks: on-demand rows; large: preloads).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags

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
    from activeflow_jax.runtime.bandwidth import measure_flash
    from common import emit

    store = FLAGS.store or af.fetch_default_model(quiet=True)
    results = []
    for threads in (int(t) for t in FLAGS.threads):
        for record in measure_flash(os.path.join(store, "tensors"), [int(c) for c in FLAGS.chunk_kib], threads,
                                    FLAGS.mib_per_run, FLAGS.seed):
            results.append(record)
            print(f"{record['chunk_kib']:>6} KiB x {threads} threads: {record['mb_per_s']:8.1f} MB/s "
                  f"({'cold' if record['cold'] else 'WARM'}: device read {record['device_read_bytes'] / 1e6:.1f} of "
                  f"{record['bytes'] / 1e6:.1f} MB)", file=sys.stderr)
    emit({"bench": "flash", "config": {"store": os.path.abspath(store), "mib_per_run": FLAGS.mib_per_run},
          "results": results}, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
