"""Dense prefill/decode benchmark of the engine: tokens/s, compile time, RSS, roofline.

    python bench/decode.py                       # default model, fetched if needed
    python bench/decode.py --store PATH --prompt_len 256 --decode_tokens 128 --output results/decode.jsonl

Warm-up runs (which compile) are excluded from the timings; compile time is reported apart.
The roofline is the measured DRAM read bandwidth divided by the bytes of weights (and KV cache)
one decoded token must read.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags

import numpy as np

import jax

jax.config.config_with_absl()

FLAGS = flags.FLAGS
flags.DEFINE_string("store", None, "store directory; default: the default model (fetched and converted if needed)")
flags.DEFINE_integer("prompt_len", 128, "prompt tokens for the prefill measurement and before decoding")
flags.DEFINE_integer("decode_tokens", 64, "tokens decoded per repeat")
flags.DEFINE_integer("repeats", 5, "timed repeats (after one warm-up)")
flags.DEFINE_integer("seed", 0, "seed of the random prompt")
flags.DEFINE_string("output", None, "append the JSON record to this file as well (JSON lines)")


def bytes_per_token(engine, context_len: int) -> dict[str, int]:
    """Bytes one decode step must read: every weight matrix once (the embedding once more as the
    tied lm_head; the embedding lookup reads one row), norms, and the filled KV cache."""
    from activeflow_jax.models.llama import flatten_params

    cfg = engine.config
    flat = flatten_params(engine.params)
    weights = sum(v.nbytes for k, v in flat.items() if k != "embed")
    embed = flat["embed"]
    weights += embed.nbytes if cfg.tie_embeddings else embed.nbytes // cfg.vocab_size
    kv = 2 * cfg.num_layers * context_len * cfg.kv_dim * 4
    return {"weights": int(weights), "kv_cache": int(kv), "total": int(weights + kv)}


def main(argv):
    del argv
    import activeflow_jax as af
    from common import emit, memory_bandwidth, summarize

    store = FLAGS.store or af.fetch_default_model(quiet=True)
    t0 = time.perf_counter()
    engine = af.Engine.load(store)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(FLAGS.seed)
    prompt = rng.integers(100, engine.config.vocab_size, FLAGS.prompt_len).astype(np.int32)
    no_stop = frozenset()

    def run_once():
        times = []
        gen = engine.generate_ids(prompt, max_new_tokens=FLAGS.decode_tokens + 1, stop_ids=no_stop)
        t_start = time.perf_counter()
        next(gen)  # prefill + first token
        prefill = time.perf_counter() - t_start
        t = time.perf_counter()
        for _ in gen:
            now = time.perf_counter()
            times.append(now - t)
            t = now
        return prefill, times

    run_once()  # warm-up: compiles every program the timed runs use
    compile_s, compiles = engine.stats.compile_seconds, engine.stats.compiles
    prefill_s, step_s = [], []
    for _ in range(FLAGS.repeats):
        p, steps = run_once()
        prefill_s.append(p)
        step_s.extend(steps)
    assert engine.stats.compiles == compiles, "timed runs recompiled"
    step = summarize(step_s)
    context = FLAGS.prompt_len + FLAGS.decode_tokens
    touched = bytes_per_token(engine, context)
    bw = memory_bandwidth()
    roofline_tps = bw["roofline_bytes_per_s"] / touched["total"]
    decode_tps = 1.0 / step["median"]
    emit({
        "bench": "decode",
        "config": {"store": os.path.abspath(store), "model": engine.config.name, "prompt_len": FLAGS.prompt_len,
                   "decode_tokens": FLAGS.decode_tokens, "repeats": FLAGS.repeats, "mode": "dense, all in DRAM"},
        "load_seconds": load_s,
        "compile_seconds": compile_s,
        "compiled_programs": compiles,
        "prefill_tokens_per_s": {k: (FLAGS.prompt_len / v if k != "n" else v) for k, v in summarize(prefill_s).items()},
        "decode_ms_per_token": {k: (v * 1e3 if k != "n" else v) for k, v in step.items()},
        "decode_tokens_per_s": decode_tps,
        "decode_tokens_per_s_p10_p90": [1.0 / step["p90"], 1.0 / step["p10"]],
        "bytes_per_token": touched,
        "memory_bandwidth": bw,
        "roofline_tokens_per_s": roofline_tps,
        "fraction_of_roofline": decode_tps / roofline_tps,
        "achieved_bytes_per_s": touched["total"] * decode_tps,
        "peak_rss_bytes": af.engine.peak_rss_bytes(),
    }, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
