"""Where an all-in-DRAM engine's memory goes: resident memory and its high-water mark after each step.

    python bench/memory_stages.py --store ~/.cache/activeflow/stores/smollm2-135m-instruct-q8

Steps, in one fresh process: Python alone, `import jax`, JAX's CPU client, `import activeflow_jax`,
the store loaded, a first prompt (its logits: compiles the prompt programs), a first generation
(compiles the decode program), a second generation. Reported per step: RSS and the process's
high-water mark (VmRSS / VmHWM from /proc/self/status, MB), so the cost of compiling shows as the
gap between the two. The peak is what a memory cap (and bench/peer.py's "peak RSS") must cover.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_STEPS: list[dict] = []


def _mark(step: str) -> None:
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value
    _STEPS.append({"step": step, "rss_mb": int(status["VmRSS"].split()[0]) / 1024,
                   "hwm_mb": int(status["VmHWM"].split()[0]) / 1024, "seconds": time.perf_counter()})


_mark("python")  # before absl and jax: what the interpreter alone holds

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("store", None, "store directory; default: the default model")
flags.DEFINE_float("sparsity", 0.0, "contextual sparsity (top-k); 0: dense")
flags.DEFINE_integer("prompt_len", 128, "prompt tokens")
flags.DEFINE_integer("decode_tokens", 32, "tokens per generation")
flags.DEFINE_string("output", None, "append the JSON record to this file as well (JSON lines)")


def main(argv) -> None:
    del argv
    import jax
    import jax.numpy as jnp

    _mark("import jax")
    jnp.zeros(1).block_until_ready()
    _mark("JAX CPU client")
    import numpy as np

    import activeflow_jax as af
    from common import emit

    _mark("import activeflow_jax")
    store = FLAGS.store or af.fetch_default_model(quiet=True)
    sparsity = dict(sparsity=FLAGS.sparsity, policy="topk") if FLAGS.sparsity else {}
    engine = af.Engine.load(store, **sparsity)
    _mark("store loaded")
    prompt = np.random.default_rng(0).integers(5, engine.config.vocab_size - 5, FLAGS.prompt_len)
    engine.logits(prompt)
    _mark("first prompt (logits)")
    list(engine.generate_ids(prompt, max_new_tokens=FLAGS.decode_tokens))
    _mark("first generation")
    list(engine.generate_ids(prompt, max_new_tokens=FLAGS.decode_tokens))
    _mark("second generation")
    start = _STEPS[0]["seconds"]
    steps = [{**s, "seconds": round(s["seconds"] - start, 2)} for s in _STEPS]
    for s in steps:
        print(f"{s['step']:<24} RSS {s['rss_mb']:7.0f} MB   high-water {s['hwm_mb']:7.0f} MB   at {s['seconds']:6.1f} s",
              file=sys.stderr)
    emit({"benchmark": "memory_stages", "store": os.path.abspath(store), "sparsity": FLAGS.sparsity,
          "prompt_len": FLAGS.prompt_len, "weight_bytes": engine.stats.weight_bytes,
          "peak_rss_mb": max(s["hwm_mb"] for s in steps), "steps": steps}, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
