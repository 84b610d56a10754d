"""The swapping runtime's preload settings, swept at one budget with sparsity and group size fixed.

    python bench/swap_settings.py --budget 0.6 --group_size 1 --supersets 1.5,1.0 --weights 1,4

Each (superset, o/down cache weight) runs in its own process: load under the budget (cold,
O_DIRECT), a warm-up generation that compiles every program, `set_dram_budget` to empty the
pools, drop the page cache, then a 64-token prompt and --decode_tokens timed tokens. superset:
predicted channels preloaded per op in multiples of k (`Engine.load(..., superset=)`); weight:
`runtime.budget.ONDEMAND_CACHE_WEIGHT`, the cache share of o/down relative to qkv/gate_up. This is
how the defaults (1.0 and 4) were chosen; a single run per setting, so read it next to the noise.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("store", None, "store directory; default: the default model")
flags.DEFINE_string("budget", "0.6", "DRAM budget: a fraction of the weight bytes or a size")
flags.DEFINE_float("sparsity", 0.5, "fixed sparsity")
flags.DEFINE_enum("policy", "topk", ["topk", "threshold"], "sparsity policy (threshold needs `activeflow calibrate`)")
flags.DEFINE_integer("group_size", 1, "fixed layer-group size")
flags.DEFINE_list("supersets", ["1.5", "1.25", "1.0"], "preload set sizes, multiples of k")
flags.DEFINE_list("weights", ["1", "4"], "o/down cache weights")
flags.DEFINE_integer("decode_tokens", 24, "timed tokens")
flags.DEFINE_integer("kv_tokens", 128, "KV positions the budget reserves")
flags.DEFINE_string("output", None, "append the JSON record here (JSON lines)")
flags.DEFINE_string("child", None, "internal: run one setting (JSON) and print its result")


def run_one(spec: dict) -> dict:
    from common import budget_arg, restart_cold
    from activeflow_jax.engine import Engine
    from activeflow_jax.runtime import budget

    budget.ONDEMAND_CACHE_WEIGHT = spec["weight"]
    b = budget_arg(spec["budget"])
    engine = Engine.load(spec["store"], dram_budget=b, sparsity=spec["sparsity"], policy=spec["policy"],
                         group_size=spec["group_size"],
                         superset=spec["superset"], cold=True, direct_io=True, kv_tokens=spec["kv_tokens"],
                         progress=False)
    prompt = list(range(100, 164))
    list(engine.generate_ids(prompt, max_new_tokens=4))  # compiles
    restart_cold(engine, spec["store"], b)  # the warm-up is not counted
    t0 = time.perf_counter()
    list(engine.generate_ids(prompt, max_new_tokens=spec["decode_tokens"], stop_ids=frozenset()))
    loader = {k: v for k, v in engine.stats.loader.items() if isinstance(v, (int, float))}
    return {"decode_tokens_per_s": engine.stats.decode_tokens_per_s, "seconds": time.perf_counter() - t0,
            "memory": engine.stats.memory, "loader": loader}


def main(argv):
    del argv
    if FLAGS.child:
        from common import serve_child

        serve_child(FLAGS.child, run_one)
        return
    from common import emit, machine_info, run_child

    from activeflow_jax.fetch import fetch_default_model

    store = FLAGS.store or fetch_default_model(quiet=False)
    rows = []
    for superset in (float(s) for s in FLAGS.supersets):
        for weight in (float(w) for w in FLAGS.weights):
            spec = dict(store=store, budget=FLAGS.budget, sparsity=FLAGS.sparsity, policy=FLAGS.policy,
                        group_size=FLAGS.group_size, superset=superset, weight=weight,
                        decode_tokens=FLAGS.decode_tokens,
                        kv_tokens=FLAGS.kv_tokens)
            result, error = run_child(__file__, spec)
            if result is None:
                raise SystemExit(f"setting {spec} failed ({error})")
            rows.append({"superset": superset, "weight": weight, **result})
            ld = result["loader"]
            print(f"superset {superset:g}, o/down weight {weight:g}: {result['decode_tokens_per_s']:.2f} tok/s, "
                  f"hit rate {ld.get('hit_rate', 0):.2f}, device {ld.get('device_read_bytes', 0) / 1e6:.0f} MB",
                  flush=True)
    emit({"bench": "swap_settings", "machine": machine_info(), "store": store, "budget": FLAGS.budget,
          "sparsity": FLAGS.sparsity, "policy": FLAGS.policy, "group_size": FLAGS.group_size, "rows": rows},
         FLAGS.output)


if __name__ == "__main__":
    app.run(main)
