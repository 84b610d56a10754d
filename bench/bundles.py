"""Cold reads of the streaming layout (store/bundles.py): latency, MB/s, device bytes (absl flags).

    python bench/bundles.py --store PATH --group_size 4 --output results/bundles.jsonl

Writes the layout for --group_size (timed; --norelayout reuses an existing one), then for each
access pattern reads a random sorted --fractions of the channels, once per layer group, each read
cold (the array's files dropped from the page cache first):
    group   read_group of --group_ops: one channel set, all layers of a group (the preload)
    layer   read_layer of --layer_ops, one layer of each group (the on-demand load)
with the reader's own `oindex` read and, for comparison, one slice read per run of adjacent
channels (`--strategies`), buffered and with O_DIRECT (`--modes`). Reports latency (median, p10,
p90), MB/s of payload (float32 bytes returned) and the bytes the kernel fetched from the device.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("store", None, "store directory; default: the default model (its layout is rewritten)")
flags.DEFINE_integer("group_size", 4, "layers per layer group")
flags.DEFINE_bool("relayout", True, "write (and time) the layout first; else an existing one is read")
flags.DEFINE_list("fractions", ["0.5", "0.75"], "fractions of the input channels read")
flags.DEFINE_list("group_ops", ["qkv", "gate_up"], "op groups read with read_group")
flags.DEFINE_list("layer_ops", ["down", "o"], "op groups read with read_layer")
flags.DEFINE_list("layer_fractions", ["0.5"], "fractions of the channels read by read_layer")
flags.DEFINE_list("modes", ["buffered", "direct"], "buffered reads and/or O_DIRECT")
flags.DEFINE_list("strategies", ["oindex", "runs"], "oindex: the reader's one read; runs: a slice per run")
flags.DEFINE_integer("seed", 0, "seed of the channel sets")
flags.DEFINE_string("output", None, "append the JSON record here (JSON lines)")


def _runs_read(array, channels, position):
    """One slice read per run of adjacent channels, all in one batch (for comparison)."""
    import numpy as np
    import tensorstore as ts

    runs = np.split(channels, np.flatnonzero(np.diff(channels) != 1) + 1)
    with ts.Batch() as batch:  # awaiting inside the block would deadlock
        futures = [(array[int(r[0]):int(r[-1]) + 1] if position is None else
                    array[int(r[0]):int(r[-1]) + 1, position]).read(batch=batch) for r in runs if len(r)]
    return np.concatenate([np.asarray(f.result(), np.float32) for f in futures])


def main(argv):
    del argv
    import numpy as np
    from common import emit, summarize

    import activeflow_jax as af
    from activeflow_jax.runtime.iostats import drop_page_cache, process_read_bytes
    from activeflow_jax.store.bundles import BundleReader, layout_dir, write_bundles

    store = os.path.abspath(FLAGS.store or af.fetch_default_model(quiet=True))
    n = FLAGS.group_size
    config = {"store": store, "group_size": n}
    if FLAGS.relayout:
        t0 = time.perf_counter()
        write_bundles(store, n)
        config["relayout_seconds"] = time.perf_counter() - t0
        print(f"relayout N={n}: {config['relayout_seconds']:.1f} s", file=sys.stderr)
    root = layout_dir(store, n)
    rng = np.random.default_rng(FLAGS.seed)
    patterns = [("group", op, float(f)) for op in FLAGS.group_ops for f in FLAGS.fractions]
    patterns += [("layer", op, float(f)) for op in FLAGS.layer_ops for f in FLAGS.layer_fractions]
    info = BundleReader(store, n)
    # The same channel sets for every mode and strategy, so they compare like for like.
    channel_sets = {(op, fraction): [np.sort(rng.choice(n_in, max(1, round(fraction * n_in)), replace=False))
                                     for n_in in [info._array(op, g).shape[0] for g in range(len(info.layer_groups))]]
                    for _, op, fraction in patterns}
    results = []
    for mode in FLAGS.modes:
        reader = BundleReader(store, n, direct_io=mode == "direct")
        for kind, op, fraction in patterns:
            for strategy in FLAGS.strategies:
                seconds, payload, device = [], 0, 0
                for g, layers in enumerate(reader.layer_groups):
                    array = reader._array(op, g)  # the bench's "runs" strategy reads the array itself
                    channels = channel_sets[op, fraction][g]
                    layer = layers[len(layers) // 2]
                    drop_page_cache(os.path.join(root, op, f"g{g}"))
                    before = process_read_bytes() or 0
                    t0 = time.perf_counter()
                    if strategy == "oindex":
                        rows = (reader.read_group(op, g, channels) if kind == "group"
                                else reader.read_layer(op, layer, channels))
                    else:
                        rows = _runs_read(array, channels, None if kind == "group" else reader.group_of(layer)[1])
                    seconds.append(time.perf_counter() - t0)
                    device += (process_read_bytes() or 0) - before
                    payload += rows.nbytes
                record = {"mode": mode, "kind": kind, "op": op, "fraction": fraction, "strategy": strategy,
                          "reads": len(seconds), "latency_s": summarize(seconds), "payload_bytes": payload,
                          "device_read_bytes": device, "mb_per_s": payload / sum(seconds) / 1e6,
                          "cold": device >= 0.5 * payload}
                results.append(record)
                print(f"{mode:>8} {kind:>5} {op:>7} {fraction:4.2f} {strategy:>6}: "
                      f"{record['latency_s']['median'] * 1e3:7.1f} ms median, {record['mb_per_s']:6.1f} MB/s, "
                      f"device {device / 1e6:6.1f} MB for {payload / 1e6:6.1f} MB"
                      f"{'' if record['cold'] else ' (WARM)'}", file=sys.stderr)
    emit({"bench": "bundles", "config": config, "results": results}, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
