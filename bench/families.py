"""Two models side by side in one process: dense (and optionally sparse) decode tok/s, and where
each model's bytes go (the embedding's share).

    python bench/families.py --stores gemma3-270m,smollm2-135m-instruct --decode_tokens 32 --sparsity 0.5

Store names from the registry (fetch.MODELS) are fetched and converted if needed; paths are used
as they are. Each model is warmed up (compile excluded), then the models are timed alternately,
`repeats` times each, so that both see the same machine load. One JSON record on stdout.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags

import numpy as np

import jax

jax.config.config_with_absl()

FLAGS = flags.FLAGS
flags.DEFINE_list("stores", ["gemma3-270m", "smollm2-135m-instruct"], "registry names or store paths")
flags.DEFINE_integer("prompt_len", 64, "prompt tokens before decoding")
flags.DEFINE_integer("decode_tokens", 32, "tokens decoded per timed repeat")
flags.DEFINE_integer("repeats", 3, "timed repeats per model (alternating between models)")
flags.DEFINE_float("sparsity", 0.0, "also time top-k sparse decode at this level (0: dense only)")
flags.DEFINE_string("output", None, "append the JSON record to this file as well (JSON lines)")


def _store(name: str) -> str:
    import activeflow_jax as af
    from activeflow_jax.fetch import MODELS

    return af.fetch_model(name, quiet=True) if name in MODELS else name


def byte_shares(engine) -> dict:
    from activeflow_jax.models.llama import flatten_params

    flat = flatten_params(engine.params)
    sizes = {k: int(v.nbytes) for k, v in flat.items()}
    embed = sizes["embed"]
    total = sum(sizes.values())
    cfg = engine.config
    return {"resident_bytes": total, "embedding_bytes": embed, "embedding_share": embed / total,
            "embedding_params_share": cfg.vocab_size * cfg.d_model / cfg.num_params(),
            "embedding_held_as": type(engine.params["embed"]).__name__}


def time_decode(engine, prompt: np.ndarray, n: int) -> float:
    """Seconds of the decode steps alone (the engine's own counter: prefill and compiles excluded)."""
    engine.stats.reset()
    out = list(engine.generate_ids(prompt, max_new_tokens=n, stop_ids=frozenset()))
    assert len(out) == n
    return engine.stats.decode_seconds / max(1, engine.stats.decode_tokens) * n


def main(argv):
    import activeflow_jax as af

    engines = {name: af.Engine.load(_store(name)) for name in FLAGS.stores}
    rng = np.random.default_rng(0)
    settings = [None] + ([FLAGS.sparsity] if FLAGS.sparsity else [])
    results = {name: {"config": {"arch": e.config.arch, "num_layers": e.config.num_layers, "d_model": e.config.d_model,
                                 "vocab_size": e.config.vocab_size}, **byte_shares(e)} for name, e in engines.items()}
    for setting in settings:
        key = "dense" if setting is None else f"topk_{setting}"
        prompts = {}
        for name, engine in engines.items():
            engine.configure_sparsity(setting, policy="topk") if setting else engine.configure_sparsity(None)
            prompts[name] = rng.integers(100, min(engine.config.vocab_size, 30000), FLAGS.prompt_len).astype(np.int32)
            time_decode(engine, prompts[name], FLAGS.decode_tokens)  # warm-up: compiles
        seconds = {name: [] for name in engines}
        for _ in range(FLAGS.repeats):
            for name, engine in engines.items():
                seconds[name].append(time_decode(engine, prompts[name], FLAGS.decode_tokens))
        for name in engines:
            med = float(np.median(seconds[name]))
            results[name][key] = {"decode_tok_s_median": FLAGS.decode_tokens / med,
                                  "seconds": [round(s, 4) for s in seconds[name]]}
    record = {"bench": "families", "machine": platform.node(), "cpus": os.cpu_count(), "time": time.time(),
              "prompt_len": FLAGS.prompt_len, "decode_tokens": FLAGS.decode_tokens, "repeats": FLAGS.repeats,
              "load_average": os.getloadavg(),  # other jobs on the machine during the run
              "note": "decode seconds from EngineStats (prefill and compiles excluded)",
              "models": results}
    line = json.dumps(record)
    print(line)
    if FLAGS.output:
        with open(FLAGS.output, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    app.run(main)
