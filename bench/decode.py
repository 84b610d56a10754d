"""Dense prefill/decode benchmark of the engine: tokens/s, compile time, RSS, roofline.

    python bench/decode.py                       # default model, fetched if needed
    python bench/decode.py --store PATH --prompt_len 256 --decode_tokens 128 --output results/decode.jsonl
    python bench/decode.py --dtype f32,q8,q4 --sparsity 0.5 --kernels native   # one run, every store dtype

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
flags.DEFINE_list("sparsity", [], "sparsity levels to measure next to dense, e.g. 0.3,0.5,0.7")
flags.DEFINE_list("kernels", ["native", "gather"], "sparse decode kernels to measure: native, gather, mask")
flags.DEFINE_enum("policy", "topk", ["topk", "threshold"], "mask policy (threshold needs a calibrated store)")
flags.DEFINE_enum("q8_embedding", "auto", ["auto", "false"],
                  "hold the tied embedding as exact Q8_0 blocks where it is one (auto), or as f32 (false)")
flags.DEFINE_list("dtype", [], "store dtypes to compare in one run (f32, f16, q8, q4): the default model "
                  "converted to each (once, cached); every setting of every dtype is timed round-robin")
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


def _rates(units: int, seconds: dict[str, float]) -> dict[str, float]:
    # a slow run (p90 of seconds) is the low rate (p10 of rates)
    return {"median": units / seconds["median"], "p10": units / seconds["p90"], "p90": units / seconds["p10"],
            "n": seconds["n"]}


def _settings() -> list[tuple[str, float, str]]:
    """(label, sparsity, kernel); dense first so every ratio has its reference in the same run."""
    out = [("dense", 0.0, "dense")]
    for s in (float(x) for x in FLAGS.sparsity):
        for kernel in FLAGS.kernels:
            out.append((f"sparse {s:g} {kernel}", s, kernel))
    return out


def main(argv):
    del argv
    import activeflow_jax as af
    from common import emit, memory_bandwidth, summarize

    if FLAGS.dtype:
        if FLAGS.store:
            raise app.UsageError("--dtype converts the default model; leave --store out")
        return _main_dtypes(af, emit, summarize)
    store = FLAGS.store or af.fetch_default_model(quiet=True)
    t0 = time.perf_counter()
    engine = af.Engine.load(store, q8_embedding=FLAGS.q8_embedding == "auto")
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(FLAGS.seed)
    prompt = rng.integers(100, engine.config.vocab_size, FLAGS.prompt_len).astype(np.int32)
    no_stop = frozenset()

    def configure(sparsity: float, kernel: str) -> None:
        engine.configure_sparsity(sparsity or None, policy=FLAGS.policy,
                                  kernel=kernel if kernel != "dense" else "gather")

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

    settings = _settings()
    for _, sparsity, kernel in settings:  # warm-up: compiles every program the timed runs use
        configure(sparsity, kernel)
        run_once()
    compile_s, compiles = engine.stats.compile_seconds, engine.stats.compiles
    prefill_s = {label: [] for label, _, _ in settings}
    step_s = {label: [] for label, _, _ in settings}
    for _ in range(FLAGS.repeats):  # round-robin, so drift of a noisy machine hits every setting alike
        for label, sparsity, kernel in settings:
            configure(sparsity, kernel)
            p, steps = run_once()
            prefill_s[label].append(p)
            step_s[label].extend(steps)
    assert engine.stats.compiles == compiles, "timed runs recompiled"
    context = FLAGS.prompt_len + FLAGS.decode_tokens
    touched = bytes_per_token(engine, context)
    peak_rss = af.engine.peak_rss_bytes()  # before the bandwidth probe allocates its buffers
    bw = memory_bandwidth()
    roofline_tps = bw["roofline_bytes_per_s"] / touched["total"]
    dense_tps = 1.0 / summarize(step_s["dense"])["median"]
    results = []
    for label, sparsity, kernel in settings:
        step = summarize(step_s[label])
        tps = 1.0 / step["median"]
        results.append({
            "setting": label, "sparsity": sparsity, "kernel": kernel,
            "policy": FLAGS.policy if sparsity else None,
            "prefill_tokens_per_s": _rates(FLAGS.prompt_len, summarize(prefill_s[label])),
            "decode_ms_per_token": {k: (v * 1e3 if k != "n" else v) for k, v in step.items()},
            "decode_tokens_per_s": tps,
            "decode_tokens_per_s_p10_p90": [1.0 / step["p90"], 1.0 / step["p10"]],
            "speedup_vs_dense": tps / dense_tps,
        })
    emit({
        "bench": "decode",
        "config": {"store": os.path.abspath(store), "model": engine.config.name, "prompt_len": FLAGS.prompt_len,
                   "decode_tokens": FLAGS.decode_tokens, "repeats": FLAGS.repeats, "mode": "all weights in DRAM", "embedding": type(engine.params["embed"]).__name__},
        "load_seconds": load_s,
        "compile_seconds": compile_s,
        "compiled_programs": compiles,
        "results": results,
        "decode_tokens_per_s": dense_tps,
        "bytes_per_token": touched,
        "memory_bandwidth": bw,
        "roofline_tokens_per_s": roofline_tps,
        "fraction_of_roofline": dense_tps / roofline_tps,
        "achieved_bytes_per_s": touched["total"] * dense_tps,
        "peak_rss_bytes": peak_rss,
    }, FLAGS.output)
    for r in results:
        print(f"{r['setting']:>22}: {r['decode_tokens_per_s']:6.1f} tok/s decode "
              f"({r['speedup_vs_dense']:.2f}x dense), prefill {r['prefill_tokens_per_s']['median']:.0f} tok/s",
              file=sys.stderr)


def _main_dtypes(af, emit, summarize):
    """One engine per store dtype in the same process; settings x dtypes timed round-robin."""
    from activeflow_jax.quant import canonical_dtype

    dtypes = [canonical_dtype(d) for d in FLAGS.dtype]
    engines, stores, loads = {}, {}, {}
    for dtype in dtypes:
        stores[dtype] = af.fetch_default_model(dtype=dtype, quiet=True)
        t0 = time.perf_counter()
        engines[dtype] = af.Engine.load(stores[dtype], q8_embedding=FLAGS.q8_embedding == "auto")
        loads[dtype] = time.perf_counter() - t0
    cfg = engines[dtypes[0]].config
    rng = np.random.default_rng(FLAGS.seed)
    prompt = rng.integers(100, cfg.vocab_size, FLAGS.prompt_len).astype(np.int32)
    settings = _settings()

    def run_once(engine, sparsity, kernel):
        engine.configure_sparsity(sparsity or None, policy=FLAGS.policy, kernel=kernel if kernel != "dense" else "gather")
        gen = engine.generate_ids(prompt, max_new_tokens=FLAGS.decode_tokens + 1, stop_ids=frozenset())
        t = time.perf_counter()
        next(gen)
        times = []
        t = time.perf_counter()
        for _ in gen:
            now = time.perf_counter()
            times.append(now - t)
            t = now
        return times

    for dtype in dtypes:  # warm-up: every program compiled before any clock
        for _, sparsity, kernel in settings:
            run_once(engines[dtype], sparsity, kernel)
    steps = {(d, label): [] for d in dtypes for label, _, _ in settings}
    for _ in range(FLAGS.repeats):
        for dtype in dtypes:
            for label, sparsity, kernel in settings:
                steps[(dtype, label)].extend(run_once(engines[dtype], sparsity, kernel))
    context = FLAGS.prompt_len + FLAGS.decode_tokens
    results = []
    dense = {d: 1.0 / summarize(steps[(d, "dense")])["median"] for d in dtypes}
    for dtype in dtypes:
        touched = bytes_per_token(engines[dtype], context)
        for label, sparsity, kernel in settings:
            step = summarize(steps[(dtype, label)])
            tps = 1.0 / step["median"]
            results.append({"dtype": dtype, "setting": label, "sparsity": sparsity, "kernel": kernel,
                            "decode_tokens_per_s": tps, "decode_tokens_per_s_p10_p90": [1.0 / step["p90"],
                                                                                       1.0 / step["p10"]],
                            "speedup_vs_dense_same_dtype": tps / dense[dtype],
                            "speedup_vs_first_dtype_dense": tps / dense[dtypes[0]],
                            "weight_bytes": engines[dtype].stats.weight_bytes,
                            "bytes_per_token": touched, "load_seconds": loads[dtype],
                            "embedding": type(engines[dtype].params["embed"]).__name__})
    emit({"bench": "decode_dtypes",
          "config": {"stores": stores, "model": cfg.name, "prompt_len": FLAGS.prompt_len,
                     "decode_tokens": FLAGS.decode_tokens, "repeats": FLAGS.repeats, "policy": FLAGS.policy,
                     "mode": "all weights in DRAM", "native": engines[dtypes[0]]._native},
          "results": results, "peak_rss_bytes": af.engine.peak_rss_bytes()}, FLAGS.output)
    for r in results:
        print(f"{r['dtype']:>8} {r['setting']:>20}: {r['decode_tokens_per_s']:6.1f} tok/s "
              f"({r['speedup_vs_dense_same_dtype']:.2f}x its dense, {r['speedup_vs_first_dtype_dense']:.2f}x "
              f"{dtypes[0]} dense), weights {r['weight_bytes'] / 1e6:.0f} MB", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
