"""Soak: long runs and many requests on one engine; RSS sampled as they go (absl flags, JSON).

    python bench/soak.py --tokens 1000 --requests 100 --output /tmp/soak.json

Three phases, each on the default model unless --store is given:
    dense     one sequence of --tokens tokens, all weights in DRAM
    budget    the same under --dram_budget (weights on flash; an existing streaming layout of the
              store is used where there is one, so the soak writes nothing into the store)
    requests  --requests requests in a row on the dense engine with mixed settings (greedy and
              sampled, top-p, seeds, lengths 1..--max_request_tokens, chat or not); the first
              request is repeated at the end and must give the same text
Stop tokens are ignored in the long sequences so that they really run --tokens tokens. RSS is
read from /proc every --sample_every tokens; "growth_after_warmup" is the last sample minus the
one at --warmup_tokens (flat: a few MB at most).
"""

from __future__ import annotations

import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout, not an installed copy

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("store", None, "store directory; default: the default model")
flags.DEFINE_integer("tokens", 1000, "tokens per long sequence")
flags.DEFINE_integer("sample_every", 100, "RSS sample period in tokens")
flags.DEFINE_integer("warmup_tokens", 200, "growth is measured from the sample at this token")
flags.DEFINE_string("dram_budget", "0.5", "budget of the budget phase ('' skips the phase)")
flags.DEFINE_integer("requests", 100, "requests in a row on one engine ('0' skips the phase)")
flags.DEFINE_integer("max_request_tokens", 32, "longest request")
flags.DEFINE_list("phases", ["dense", "budget", "requests"], "phases to run")
flags.DEFINE_integer("seed", 0, "seed of the request mix")
flags.DEFINE_string("output", None, "write the JSON record here too")

PROMPTS = ("The history of the river town", "Write a short poem about the sea.", "What is the capital of France?",
           "List three uses of copper.", "Once upon a time", "Explain photosynthesis in one sentence.",
           "def fibonacci(n):", "The weather today is")


def _mb(n: int) -> float:
    return round(n / 1e6, 1)


def long_sequence(engine, tokens: int) -> dict:
    from activeflow_jax.runtime.budget import current_rss

    ids = engine.tokenizer.encode(PROMPTS[0])
    samples = [{"token": 0, "rss_mb": _mb(current_rss()), "seconds": 0.0}]
    start = time.perf_counter()
    n = 0
    for n, _ in enumerate(engine.generate_ids(ids, max_new_tokens=tokens, stop_ids=frozenset()), start=1):
        if n % FLAGS.sample_every == 0:
            samples.append({"token": n, "rss_mb": _mb(current_rss()), "seconds": round(time.perf_counter() - start, 2)})
    warm = next((s for s in samples if s["token"] >= FLAGS.warmup_tokens), samples[-1])
    s = engine.stats
    return {"tokens": n, "samples": samples, "growth_after_warmup_mb": round(samples[-1]["rss_mb"] - warm["rss_mb"], 1),
            "peak_rss_mb": _mb(s.peak_rss_bytes), "decode_tokens_per_s": round(s.decode_tokens_per_s, 2),
            "seconds": round(time.perf_counter() - start, 1)}


def many_requests(engine, count: int) -> dict:
    from activeflow_jax.runtime.budget import current_rss

    rng = random.Random(FLAGS.seed)
    settings = []
    for _ in range(count):
        temperature = rng.choice((0.0, 0.0, 0.7, 1.0))
        settings.append(dict(prompt=rng.choice(PROMPTS), max_new_tokens=rng.randint(1, FLAGS.max_request_tokens),
                             temperature=temperature, top_p=rng.choice((1.0, 0.9, 0.5)) if temperature else 1.0,
                             seed=rng.randrange(1 << 31), chat=rng.random() < 0.5))
    rss = [_mb(current_rss())]
    texts, failures, seconds = [], [], []
    for i, kw in enumerate(settings):
        t0 = time.perf_counter()
        try:
            texts.append(engine.generate(**kw))
        except Exception as exc:  # noqa: BLE001 - counted, not raised: the soak reports every failure
            failures.append({"request": i, "error": f"{type(exc).__name__}: {exc}"[:300]})
            texts.append(None)
        seconds.append(time.perf_counter() - t0)
        if (i + 1) % 10 == 0:
            rss.append(_mb(current_rss()))
    repeat = engine.generate(**settings[0])
    return {"requests": count, "failures": failures, "rss_mb_every_10": rss,
            "growth_after_first_10_mb": round(rss[-1] - rss[1], 1) if len(rss) > 2 else None,
            "first_request_repeated_identical": repeat == texts[0],
            "mean_request_seconds": round(sum(seconds) / len(seconds), 3),
            "settings_mix": {"sampled": sum(1 for s in settings if s["temperature"] > 0),
                             "chat": sum(1 for s in settings if s["chat"]),
                             "lengths": [min(s["max_new_tokens"] for s in settings),
                                         max(s["max_new_tokens"] for s in settings)]}}


def main(argv):
    del argv
    import json

    import activeflow_jax as af
    from activeflow_jax.runtime.budget import current_rss
    from activeflow_jax.store.bundles import available_group_sizes
    from common import machine_info

    store = FLAGS.store or af.fetch_default_model(quiet=True)
    record = {"store": store, "machine": machine_info(), "load": os.getloadavg(), "flags": {
        "tokens": FLAGS.tokens, "sample_every": FLAGS.sample_every, "dram_budget": FLAGS.dram_budget,
        "requests": FLAGS.requests}, "rss_at_start_mb": _mb(current_rss())}
    dense = None
    if "dense" in FLAGS.phases or "requests" in FLAGS.phases:
        dense = af.Engine.load(store)
    if "dense" in FLAGS.phases:
        record["dense"] = long_sequence(dense, FLAGS.tokens)
        print(json.dumps({"dense": record["dense"]}), file=sys.stderr, flush=True)
    if "requests" in FLAGS.phases and FLAGS.requests:
        dense.stats.reset()
        record["requests"] = many_requests(dense, FLAGS.requests)
        print(json.dumps({"requests": record["requests"]}), file=sys.stderr, flush=True)
    if dense is not None:
        dense.close()
        del dense
    if "budget" in FLAGS.phases and FLAGS.dram_budget:
        have = available_group_sizes(store)
        options = {"group_size": have[0]} if have else {}
        from common import budget_arg

        budget = budget_arg(FLAGS.dram_budget)
        kv = 1 << (FLAGS.tokens + 64 - 1).bit_length()
        engine = af.Engine.load(store, dram_budget=budget, kv_tokens=kv, progress=False, **options)
        record["budget"] = {"plan": engine.plan_explanation, **long_sequence(engine, FLAGS.tokens),
                            "memory_mb": {k: _mb(v) for k, v in engine.stats.memory.items() if isinstance(v, int)},
                            "scope": engine.stats.memory.get("scope"), "hit_rate": (engine.stats.loader or {}).get("hit_rate")}
        print(json.dumps({"budget": record["budget"]}), file=sys.stderr, flush=True)
    from common import emit  # bench/common.py: time and machine added, one JSON line, appended to --output

    emit(record, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
