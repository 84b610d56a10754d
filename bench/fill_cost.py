"""What a fill (a read of missing rows from inside a compiled program) costs, and whether running
inside the program makes the read slower.

    python bench/fill_cost.py --store ~/.cache/activeflow/stores/smollm2-135m-instruct-q8 --budget 0.6

1. The budget engine decodes cold (pools empty, store dropped from the page cache): the fills per
   token, the seconds the programs spent in fill callbacks, and how much of that was the reads.
2. The same `BundleReader.read_layer` requests (random sorted channels of one op) timed from plain
   Python and from an `io_callback` inside a jitted program that also computes, alternating rounds,
   the page cache dropped before each round (O_DIRECT reads).

Pool-sizing settings (the o/down cache weight, the preload superset) are swept by
bench/swap_settings.py, not here.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("store", None, "store directory; default: the default model")
flags.DEFINE_string("budget", "0.6", "DRAM budget: a fraction of the weight bytes or a size")
flags.DEFINE_float("sparsity", 0.5, "top-k sparsity")
flags.DEFINE_integer("group_size", 2, "layers per group")
flags.DEFINE_integer("decode_tokens", 24, "tokens decoded cold")
flags.DEFINE_integer("rows", 146, "rows per read in the read A/B (146: the mean of a fill at 60% on q8)")
flags.DEFINE_integer("reads", 40, "reads per round in the read A/B")
flags.DEFINE_integer("rounds", 3, "alternating rounds of the read A/B")
flags.DEFINE_bool("read_ab", True, "also run the read A/B (part 2)")
flags.DEFINE_string("output", None, "append the JSON record here")


def _decode(store, budget):
    import activeflow_jax as af
    from activeflow_jax.runtime import budget as budget_model
    from common import restart_cold

    engine = af.Engine.load(store, dram_budget=budget, sparsity=FLAGS.sparsity, policy="topk",
                            group_size=FLAGS.group_size, direct_io=True, progress=False, kv_tokens=256)
    prompt = list(range(100, 164))
    list(engine.generate_ids(prompt, max_new_tokens=4))  # compiles
    restart_cold(engine, store, budget)
    list(engine.generate_ids(prompt, max_new_tokens=FLAGS.decode_tokens))
    loader = engine.stats.loader
    n = max(1, loader["tokens"])
    out = {"decode_tokens_per_s": engine.stats.as_dict()["decode_tokens_per_s"], "tokens": loader["tokens"],
           "fills_per_token": loader["fills"] / n, "fill_seconds_per_token": loader["fill_seconds"] / n,
           "ondemand_seconds_per_token": loader["ondemand_seconds"] / n,
           "ondemand_rows_per_token": loader["ondemand_rows"] / n, "hit_rate": loader["hit_rate"],
           "read_share_of_fill_time": loader["ondemand_seconds"] / max(1e-9, loader["fill_seconds"]),
           "ondemand_cache_weight": budget_model.ONDEMAND_CACHE_WEIGHT,
           "pool_rows": engine.stats.memory["cache_rows_resident"]}
    engine.close()
    return out


def _read_ab(store):
    import jax
    import jax.numpy as jnp
    from jax.experimental import io_callback

    from activeflow_jax.runtime.iostats import drop_page_cache
    from activeflow_jax.store.bundles import BundleReader
    from activeflow_jax.store.reader import config_from_manifest, read_manifest

    cfg = config_from_manifest(read_manifest(store), store)
    hidden, layers = cfg.d_model, cfg.num_layers
    reader = BundleReader(store, FLAGS.group_size, direct_io=True)
    rng = np.random.default_rng(0)
    requests = [np.sort(rng.choice(hidden, min(FLAGS.rows, hidden), replace=False)) for _ in range(FLAGS.reads)]
    inside: list[float] = []

    def read(i):
        t0 = time.perf_counter()
        reader.read_layer("gate_up", int(i) % layers, requests[int(i)])
        inside.append(time.perf_counter() - t0)
        return np.int32(0)

    @jax.jit
    def program(i, x):
        return x @ x + io_callback(read, jax.ShapeDtypeStruct((), jnp.int32), i, ordered=False)

    x = jnp.ones((256, 256), jnp.float32)
    program(0, x).block_until_ready()
    rounds = []
    for _ in range(FLAGS.rounds):
        drop_page_cache(store)
        inside.clear()
        for i in range(FLAGS.reads):
            program(i, x).block_until_ready()
        in_program = float(np.median(inside))
        drop_page_cache(store)
        plain = []
        for i in range(FLAGS.reads):
            t0 = time.perf_counter()
            reader.read_layer("gate_up", i % layers, requests[i])
            plain.append(time.perf_counter() - t0)
        rounds.append({"in_program_ms": in_program * 1e3, "plain_ms": float(np.median(plain)) * 1e3})
    return {"rows_per_read": int(min(FLAGS.rows, hidden)), "rounds": rounds,
            "median_ratio_in_program_over_plain": float(np.median([r["in_program_ms"] / r["plain_ms"] for r in rounds]))}


def main(argv):
    del argv
    import activeflow_jax as af
    from common import budget_arg, emit

    store = FLAGS.store or af.fetch_default_model(quiet=True)
    budget = budget_arg(FLAGS.budget)
    record = {"bench": "fill_cost", "store": store, "budget": budget, "sparsity": FLAGS.sparsity,
              "group_size": FLAGS.group_size, "decode": _decode(store, budget),
              "read_ab": _read_ab(store) if FLAGS.read_ab else None}
    d, r = record["decode"], record["read_ab"]
    print(f"{d['decode_tokens_per_s']:.3f} tok/s, hit rate {d['hit_rate']:.3f}, {d['ondemand_rows_per_token']:.0f} rows "
          f"and {d['fills_per_token']:.0f} fills/token, {d['fill_seconds_per_token'] * 1e3:.0f} ms/token in fills, "
          f"{d['read_share_of_fill_time']:.0%} of it reads" + (f"; a read inside a program / plain: "
          f"{r['median_ratio_in_program_over_plain']:.2f}x" if r else ""), file=sys.stderr)
    emit(record, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
