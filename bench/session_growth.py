"""How far a budget engine's process grows beyond its budget over a session of requests (absl, JSON).

    python bench/session_growth.py --store ~/.cache/activeflow/stores/smollm2-135m-instruct-q8 \
        --requests 10+8,20+8,40+8,70+8,130+8,200+8,300+8,450+8,10+40,20+40      # ~10 min

One process: RSS before loading, then the engine under `--budget` (50% top-k by default), then
each request `<prompt tokens>+<new tokens>` (prompts cut from the shipped calibration text). After
each: anonymous RSS, the peak RSS so far (VmHWM) and the growth, peak minus RSS before loading
minus the bytes the budget accounts, where "before loading" is the process as the budget measures
it (RSS after the tokenizer is built, before any weight): what budget.COMPILE_GROWTH_RESERVE must
cover when the budget counts the whole process. Requests of new prompt lengths compile new programs, and every
compiled program stays in the process, so growth that keeps rising with the session is a budget
that will not hold.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("store", None, "store directory; default: the default model")
flags.DEFINE_string("budget", "0.5", "DRAM budget (bytes, a size such as 200MB, or a fraction of the weights)")
flags.DEFINE_float("sparsity", 0.5, "top-k sparsity (0: dense layer streaming)")
flags.DEFINE_integer("group_size", 2, "layers per preload group")
flags.DEFINE_integer("kv_tokens", 512, "KV cache positions the budget reserves")
flags.DEFINE_list("requests", ["10+8", "40+8", "130+8", "450+8", "10+40"], "prompt tokens + new tokens, in order")
flags.DEFINE_string("output", None, "append the JSON record here as well (JSON lines)")


def _memory() -> tuple[int, int]:
    """(anonymous RSS, peak RSS) of this process in bytes, from /proc."""
    anon = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:",)):
                anon = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return anon, peak


def main(argv) -> None:
    del argv
    import jax

    import activeflow_jax as af
    from activeflow_jax.paths import default_calibration_text
    from activeflow_jax.runtime import swap as swap_module
    from activeflow_jax.runtime.budget import COMPILE_GROWTH_RESERVE, current_rss
    from common import budget_arg, emit, machine_info

    try:
        requests = [tuple(int(v) for v in r.split("+")) for r in FLAGS.requests]
    except ValueError:
        raise SystemExit(f"--requests: each one is <prompt tokens>+<new tokens>, got {FLAGS.requests}") from None
    store = FLAGS.store or af.fetch_default_model(quiet=True)
    jax.numpy.zeros(1).block_until_ready()
    before_load = current_rss()
    engine = af.Engine.load(store, dram_budget=budget_arg(FLAGS.budget), sparsity=FLAGS.sparsity or None,
                            policy="topk", plan=False, group_size=FLAGS.group_size, kv_tokens=FLAGS.kv_tokens,
                            progress=False, direct_io=True)
    accounted = engine.stats.memory["total"]
    # the process as the budget measures it (after the tokenizer, before any weight): what the
    # reserve is added to when the budget covers the whole process
    before = engine.swap.process - COMPILE_GROWTH_RESERVE
    with open(default_calibration_text(), encoding="utf-8") as f:
        ids = engine.tokenizer.encode(f.read())
    rows = []
    anon, peak = _memory()
    print(f"before load {before_load / 1e6:.0f} MB, process as measured by the budget {before / 1e6:.0f} MB, budget accounts {accounted / 1e6:.0f} MB; loaded: anon "
          f"{anon / 1e6:.0f} MB, peak {peak / 1e6:.0f} MB", flush=True)
    for prompt_len, new_tokens in requests:
        list(engine.generate_ids(ids[:prompt_len], max_new_tokens=new_tokens, stop_ids=frozenset()))
        anon, peak = _memory()
        growth = peak - before - accounted
        rows.append({"prompt_tokens": prompt_len, "new_tokens": new_tokens, "anon_mb": round(anon / 1e6, 1),
                     "peak_mb": round(peak / 1e6, 1), "growth_mb": round(growth / 1e6, 1),
                     "programs_compiled": swap_module._CompileClock.programs})
        print(f"{prompt_len}+{new_tokens}: anon {anon / 1e6:.0f} MB, peak {peak / 1e6:.0f} MB, growth "
              f"{growth / 1e6:.0f} MB, programs compiled {swap_module._CompileClock.programs}", flush=True)
    emit({"bench": "session_growth", "store": os.path.abspath(store), "budget": FLAGS.budget,
          "sparsity": FLAGS.sparsity, "group_size": FLAGS.group_size, "kv_tokens": FLAGS.kv_tokens,
          "before_load_mb": round(before_load / 1e6, 1), "process_mb": round(before / 1e6, 1), "accounted_mb": round(accounted / 1e6, 1), "requests": rows,
          "machine": machine_info()}, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
