"""The budget runtime's prompt pass: layers per prefill program against compile time, memory and speed.

    python bench/prefill.py --store ~/.cache/activeflow/stores/smollm2-135m-instruct-q8 --prefill_layers 4,1,2,4,1,2

Each setting runs in its own process (alternating, so drift hits both): load under the budget
(O_DIRECT reads), a first generation of one token after the prompt (this compiles every
program: its wall time is what a user waits for the first token), then twice: empty the pools
(`set_dram_budget`), drop the store from the page cache, run the prompt again and take the
engine's prefill tok/s. Reported per setting: load + first token seconds, the cold prefill tok/s,
the peak RSS, and what the process grew by beyond the budget's accounted bytes (peak RSS minus
the RSS before load minus `memory["total"]`; what `budget.COMPILE_GROWTH_RESERVE` must cover).
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
flags.DEFINE_float("sparsity", 0.5, "top-k sparsity (0: dense streaming)")
flags.DEFINE_integer("group_size", 2, "layers per decode group")
flags.DEFINE_list("prefill_layers", ["4", "1", "2", "4", "1", "2"], "layers per prefill program, one process each")
flags.DEFINE_integer("prompt_len", 128, "prompt tokens")
flags.DEFINE_integer("kv_tokens", 256, "KV positions the budget reserves")
flags.DEFINE_string("output", None, "append the JSON record here (JSON lines)")
flags.DEFINE_string("child", None, "internal: run one setting (JSON) and print its result")


def run_one(spec: dict) -> dict:
    from common import budget_arg, restart_cold
    from activeflow_jax.engine import Engine
    from activeflow_jax.runtime import swap
    from activeflow_jax.runtime.budget import current_rss, peak_rss_bytes

    swap.PREFILL_LAYERS = spec["prefill_layers"]
    b = budget_arg(spec["budget"])
    before = current_rss()
    t0 = time.perf_counter()
    engine = Engine.load(spec["store"], dram_budget=b, sparsity=spec["sparsity"] or None, policy="topk",
                         plan=False, group_size=spec["group_size"], direct_io=True, cold=True,
                         kv_tokens=spec["kv_tokens"], progress=False)
    prompt = list(range(100, 100 + spec["prompt_len"]))
    list(engine.generate_ids(prompt, max_new_tokens=1, stop_ids=frozenset()))
    first = time.perf_counter() - t0
    prefill = []
    for _ in range(2):
        restart_cold(engine, spec["store"], b)
        list(engine.generate_ids(prompt, max_new_tokens=1, stop_ids=frozenset()))
        prefill.append(engine.stats.prefill_tokens_per_s)
    peak = peak_rss_bytes()
    return {"load_and_first_token_seconds": first, "cold_prefill_tokens_per_s": prefill, "peak_rss_bytes": peak,
            "growth_bytes": peak - before - engine.stats.memory["total"], "compiles": engine.stats.compiles}


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
    for layers in (int(x) for x in FLAGS.prefill_layers):
        spec = dict(store=store, budget=FLAGS.budget, sparsity=FLAGS.sparsity, group_size=FLAGS.group_size,
                    prefill_layers=layers, prompt_len=FLAGS.prompt_len, kv_tokens=FLAGS.kv_tokens)
        result, error = run_child(__file__, spec)
        if result is None:
            raise SystemExit(f"setting {spec} failed ({error})")
        rows.append({"prefill_layers": layers, **result})
        first = result["load_and_first_token_seconds"]
        print(f"prefill programs of {layers} layers: load + first token {first:.1f} s, "
              f"cold prefill {', '.join(f'{x:.1f}' for x in result['cold_prefill_tokens_per_s'])} tok/s, "
              f"peak RSS {result['peak_rss_bytes'] / 1e6:.0f} MB, growth {result['growth_bytes'] / 1e6:.0f} MB",
              flush=True)
    emit({"bench": "prefill", "machine": machine_info(), "load_average": os.getloadavg(), "store": store,
          "budget": FLAGS.budget, "sparsity": FLAGS.sparsity, "group_size": FLAGS.group_size,
          "prompt_len": FLAGS.prompt_len, "rows": rows}, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
