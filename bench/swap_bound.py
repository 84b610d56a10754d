"""The fastest decode any swapping runtime could reach on this machine at a DRAM budget.

    python bench/swap_bound.py --output results/swap_bound.jsonl

For each sparsity the model runs teacher-forced over a WikiText-2 window (measurement only, as in
the quality harness) and records which rows every token computes with. For each budget the
cache is what the budget leaves after the resident weights and the KV cache (compute buffers and
staging are ignored, in the runtime's favour). `runtime/bound.py` then gives the fewest bytes any
caching policy must read per token (an offline optimum with full knowledge of the future, in the
byte model), averaged over the tokens after --warmup. Dividing by the best flash bandwidth the
planner measured, at any chunk size, gives an upper bound on tokens/s; the sparse model's own
all-in-DRAM decode (measured here) is the other bound. Dense layer streaming gets the same bound
(every row, every token).

For reference, the same trace under whole-row LRU and under the best fixed hot set (the most
used rows that fit, chosen knowing the trace): what a perfect frequency cache would read.

The figure that matters: the flash bandwidth a budget would need for the swapped decode to match
the dense all-in-DRAM decode, against the bandwidth this machine has.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("store", None, "store directory; default: the default model")
flags.DEFINE_list("budgets", ["1.0", "0.6", "0.5", "0.4", "0.25"], "DRAM budgets: fractions of the weight bytes or sizes")
flags.DEFINE_list("sparsity", ["0.0", "0.3", "0.4", "0.5", "0.6", "0.7"], "sparsities (0: dense)")
flags.DEFINE_enum("policy", "threshold", ["threshold", "topk"], "mask policy (threshold needs a calibrated store)")
flags.DEFINE_integer("tokens", 512, "trace length: tokens of one WikiText-2 window")
flags.DEFINE_integer("warmup", 128, "leading tokens left out of the per-token mean (they fill the cache)")
flags.DEFINE_integer("kv_tokens", 128, "KV positions the budget reserves (as bench/swap.py)")
flags.DEFINE_integer("decode_tokens", 48, "tokens decoded to time each sparsity all-in-DRAM")
flags.DEFINE_string("text", None, "evaluation text (default: ../shared/data/wiki.test.raw)")
flags.DEFINE_string("output", None, "append the JSON record here (JSON lines)")

HERE = os.path.dirname(os.path.abspath(__file__))


def trace(engine, window, sparsity: float, policy: str):
    """Rows each token computes with: bool [T, rows] (layer-major, OP_GROUPS order within a layer)
    and each row's bytes."""
    import jax.numpy as jnp
    import numpy as np

    from activeflow_jax.config import OP_GROUPS, SparsityConfig, op_input_dims
    from activeflow_jax.models.llama import forward_with_taps
    from activeflow_jax.runtime.budget import op_row_bytes
    from activeflow_jax.sparse.thresholds import store_thresholds
    from activeflow_jax.sparse.kernels import active_mask

    cfg = engine.config
    sp = SparsityConfig(sparsity, policy=policy, kernel="mask") if sparsity > 0 else None
    thresholds = (jnp.asarray(store_thresholds(engine.store_path, cfg, sparsity))
                  if sp is not None and policy == "threshold" else None)
    _, taps = forward_with_taps(engine.params, jnp.asarray(window), thresholds, cfg=cfg, sparse=sp)
    ks = sp.ks(cfg) if sp is not None else op_input_dims(cfg)
    columns, sizes = [], []
    for layer in range(cfg.num_layers):
        for g, op in enumerate(OP_GROUPS):
            x = taps[op][layer]  # [T, in]
            if sp is None or not sp.is_sparse_layer(layer):
                mask = np.ones(x.shape, bool)
            else:
                thr = thresholds[layer, g] if thresholds is not None else 0.0
                mask = np.asarray(active_mask(x, ks[g], thr, policy))
            columns.append(mask)
            sizes.append(np.full(x.shape[1], op_row_bytes(cfg, engine.storage_dtype)[g], np.float64))
    return np.concatenate(columns, axis=1), np.concatenate(sizes)


def decode_rate(engine, prompt, sparsity: float, policy: str, tokens: int) -> float:
    """All-in-DRAM decode tokens/s: 1 / the median step time, as bench/decode.py measures it."""
    import numpy as np

    engine.configure_sparsity(sparsity or None, policy=policy)
    steps = []
    for timed in (False, True):  # the first pass compiles
        gen = engine.generate_ids(prompt, max_new_tokens=tokens + 1, stop_ids=frozenset())
        next(gen)  # prefill
        t = time.perf_counter()
        for _ in gen:
            now = time.perf_counter()
            if timed:
                steps.append(now - t)
            t = now
    return 1.0 / float(np.median(steps))


def main(argv):
    del argv
    import numpy as np

    from common import emit, machine_info

    from activeflow_jax.engine import Engine
    from activeflow_jax.eval.perplexity import engine_tokens, eval_windows
    from activeflow_jax.fetch import fetch_default_model
    from activeflow_jax.models.embedding import Q8Table
    from activeflow_jax.runtime import budget as budget_mod
    from activeflow_jax.runtime.bandwidth import get_bandwidths
    from activeflow_jax.runtime.bound import lru_flash_bytes, min_flash_bytes, static_flash_bytes

    store = FLAGS.store or fetch_default_model(quiet=False)
    engine = Engine.load(store)
    from activeflow_jax.store.reader import StoreReader

    dtype = engine.storage_dtype = StoreReader(store).storage_dtype  # every byte counted is the store's
    cfg = engine.config
    text = FLAGS.text or os.path.join(HERE, "..", "..", "shared", "data", "wiki.test.raw")
    tokens, bos = engine_tokens(engine, text, FLAGS.tokens)
    window = eval_windows(tokens, ctx=FLAGS.tokens, max_windows=1, bos_id=bos)[0]
    bw = get_bandwidths(store)
    best_chunk, best_bps = max(bw.flash_bps_by_chunk, key=lambda cr: cr[1])
    weights = budget_mod.model_weight_bytes(cfg, dtype)
    q8 = isinstance(engine.params["embed"], Q8Table)
    resident = budget_mod.resident_bytes(cfg, q8, dtype) + budget_mod.kv_bytes(cfg, FLAGS.kv_tokens)
    prompt = window[:64]
    dense_rate = decode_rate(engine, prompt, 0.0, FLAGS.policy, FLAGS.decode_tokens)
    rows = []
    for s in (float(v) for v in FLAGS.sparsity):
        t0 = time.perf_counter()
        active, sizes = trace(engine, window, s, FLAGS.policy)
        rate = dense_rate if s == 0 else decode_rate(engine, prompt, s, FLAGS.policy, FLAGS.decode_tokens)
        active_bytes = float((active[FLAGS.warmup:] * sizes).sum(axis=1).mean())
        for b in FLAGS.budgets:
            budget = budget_mod.parse_budget(b, cfg, dtype)
            capacity = max(0.0, budget - resident)
            miss = float(min_flash_bytes(active, sizes, capacity)[FLAGS.warmup:].mean())
            lru = float(lru_flash_bytes(active, sizes, capacity)[FLAGS.warmup:].mean())
            static = float(static_flash_bytes(active, sizes, capacity)[FLAGS.warmup:].mean())
            io_bound = best_bps / miss if miss > 0 else float("inf")
            bound = min(io_bound, rate)
            rows.append({
                "sparsity": s, "budget": b, "budget_bytes": budget, "cache_bytes": capacity,
                "active_mb_per_token": active_bytes / 1e6, "min_flash_mb_per_token": miss / 1e6,
                "lru_mb_per_token": lru / 1e6, "best_static_mb_per_token": static / 1e6,
                "all_in_dram_tok_s": rate, "max_tok_s": bound, "max_vs_dense_all_in_dram": bound / dense_rate,
                "flash_bps_needed_for_dense_parity": miss * dense_rate,
            })
            print(f"sparsity {s:.0%} budget {b}: cache {capacity / 1e6:.0f} MB, active {active_bytes / 1e6:.0f} MB, "
                  f"min flash {miss / 1e6:.1f} MB/token (LRU {lru / 1e6:.1f}, best static {static / 1e6:.1f}) -> at most {bound:.2f} tok/s "
                  f"({bound / dense_rate:.3f}x dense {dense_rate:.1f}); parity needs "
                  f"{miss * dense_rate / 1e9:.2f} GB/s", flush=True)
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    record = {"bench": "swap_bound", "machine": machine_info(), "store": store, "dtype": dtype, "policy": FLAGS.policy,
              "tokens": FLAGS.tokens, "warmup": FLAGS.warmup, "kv_tokens": FLAGS.kv_tokens,
              "weight_bytes": weights, "resident_bytes": resident, "q8_embedding": q8,
              "dense_all_in_dram_tok_s": dense_rate,
              "best_flash_bps": best_bps, "best_flash_chunk_bytes": best_chunk,
              "flash_bps_by_chunk": [list(c) for c in bw.flash_bps_by_chunk], "rows": rows}
    emit(record, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
