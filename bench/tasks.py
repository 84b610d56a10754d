"""Task-accuracy scoring speed: cached-prefix (batched) vs naive, in one run, plus accuracies.

    python bench/tasks.py                                   # default model, 100 items of each task
    python bench/tasks.py --limit 100 --tasks piqa,hellaswag --output results/tasks.jsonl

For each task the same first `limit` items are scored twice, interleaved per task:
    cached  the context's KV cache computed once per item and reused for every choice, many
            items per compiled call (eval/scoring.py; what `activeflow tasks` uses)
    naive   every context + choice as its own sequence through `engine.logits`
A warm-up pass over the same items compiles every program first; compile time is reported
apart and excluded from items/s. Both ways must agree on every log-likelihood (max |diff|
reported) and so on the accuracies.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
from absl import app, flags

jax.config.config_with_absl()

FLAGS = flags.FLAGS
flags.DEFINE_string("store", None, "store directory; default: the default model (fetched and converted if needed)")
flags.DEFINE_list("tasks", ["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande"], "tasks to measure")
flags.DEFINE_integer("limit", 100, "first N items of each task (the same items for both ways)")
flags.DEFINE_integer("shots", 0, "few-shot examples per item")
flags.DEFINE_float("sparsity", None, "contextual sparsity (needs a calibrated store for --policy threshold)")
flags.DEFINE_enum("policy", "threshold", ["threshold", "topk"], "sparsity policy")
flags.DEFINE_bool("warmup", True, "compile every program in a first pass (excluded from the timings)")
flags.DEFINE_string("output", None, "append the JSON record to this file as well (JSON lines)")


def main(argv):
    del argv
    from common import emit

    import activeflow_jax as af
    from activeflow_jax.eval.tasks import (
        TASKS,
        build_items,
        check_limit_shots,
        load_task_docs,
        loglikelihoods,
        parse_task_names,
        score_items,
    )

    names = parse_task_names(FLAGS.tasks)
    check_limit_shots(FLAGS.limit, FLAGS.shots)
    store = FLAGS.store or af.fetch_default_model(quiet=True)
    engine = af.Engine.load(store, sparsity=FLAGS.sparsity, policy=FLAGS.policy)
    results = []
    totals = {"items": 0, "cached_s": 0.0, "naive_s": 0.0}
    for name in names:
        items = build_items(name, load_task_docs(name), limit=FLAGS.limit, shots=FLAGS.shots)
        c0 = engine.stats.compile_seconds
        if FLAGS.warmup:
            loglikelihoods(engine, name, items)
            loglikelihoods(engine, name, items[:1], naive=True)  # the naive buckets compile below as needed
        times, lls = {}, {}
        for way in ("naive", "cached"):
            cb = engine.stats.compile_seconds
            t0 = time.perf_counter()
            lls[way] = loglikelihoods(engine, name, items, naive=way == "naive")
            times[way] = time.perf_counter() - t0 - (engine.stats.compile_seconds - cb)
        compile_s = engine.stats.compile_seconds - c0
        diff = max(abs(a - b) for ra, rb in zip(lls["cached"], lls["naive"]) for a, b in zip(ra, rb))
        metrics = {way: score_items(items, lls[way]) for way in lls}
        row = {
            "task": name, "items": len(items), "license": TASKS[name].license,
            "cached_items_per_s": len(items) / times["cached"], "naive_items_per_s": len(items) / times["naive"],
            "speedup": times["naive"] / times["cached"], "cached_seconds": times["cached"],
            "naive_seconds": times["naive"], "compile_seconds": compile_s, "max_abs_loglik_diff": diff,
            **metrics["cached"], "naive_acc": metrics["naive"]["acc"], "naive_acc_norm": metrics["naive"]["acc_norm"],
        }
        results.append(row)
        totals["items"] += len(items)
        totals["cached_s"] += times["cached"]
        totals["naive_s"] += times["naive"]
        norm = "" if row["acc_norm"] is None else f" acc_norm {row['acc_norm']:.4f}"
        print(f"{name:>14}: cached {row['cached_items_per_s']:6.2f} items/s, naive {row['naive_items_per_s']:6.2f} "
              f"items/s ({row['speedup']:.2f}x); acc {row['acc']:.4f}{norm}; max |dlogL| {diff:.1e}; "
              f"compile {compile_s:.1f} s", file=sys.stderr, flush=True)
    overall = {
        "items": totals["items"],
        "cached_items_per_s": totals["items"] / totals["cached_s"],
        "naive_items_per_s": totals["items"] / totals["naive_s"],
        "speedup": totals["naive_s"] / totals["cached_s"],
    }
    print(f"{'all':>14}: cached {overall['cached_items_per_s']:6.2f} items/s, naive "
          f"{overall['naive_items_per_s']:6.2f} items/s ({overall['speedup']:.2f}x)", file=sys.stderr)
    emit({
        "bench": "tasks",
        "config": {"store": os.path.abspath(store), "model": engine.config.name, "limit": FLAGS.limit,
                   "shots": FLAGS.shots, "sparsity": FLAGS.sparsity, "policy": FLAGS.policy if FLAGS.sparsity else None,
                   "tasks": names},
        "results": results,
        "overall": overall,
        "compiled_programs": engine.stats.compiles,
        "compile_seconds": engine.stats.compile_seconds,
        "peak_rss_bytes": af.engine.peak_rss_bytes(),
    }, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
