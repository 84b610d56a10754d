"""How well do predicted sets cover the true active sets? (sparse/predictor.py predicts them.)

Measured on an engine's sparse forward pass (bench/quality.py reports it); the recall figures the
planner's cost model uses (runtime/planner.py) were measured this way.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from activeflow_jax.config import OP_GROUPS, SparsityConfig
from activeflow_jax.eval.perplexity import engine_tokens, eval_windows
from activeflow_jax.models.llama import flatten_params, forward_with_taps
from activeflow_jax.sparse.predictor import SCORES, prediction_score
from activeflow_jax.sparse.thresholds import store_thresholds


def _true_masks(x: np.ndarray, k: int, threshold: float, policy: str) -> np.ndarray:
    a = np.abs(x)
    kth = -np.partition(-a, k - 1, axis=-1)[..., k - 1:k]
    cut = np.maximum(kth, threshold) if policy == "threshold" else kth
    return a >= cut


def _recall_at(score: np.ndarray, true: np.ndarray, sizes: list[int]) -> list[float]:
    """Recall of `true` by the top-n of `score` for each n (ties broken by channel order)."""
    order = np.argsort(-score, axis=-1, kind="stable")
    hits_in_order = np.take_along_axis(true, order, axis=-1).cumsum(axis=-1)  # [T, d]
    total = np.maximum(true.sum(axis=-1), 1)
    return [float((hits_in_order[:, min(n, score.shape[-1]) - 1] / total).mean()) for n in sizes]


def measure_prediction(engine, text_path, *, sparsity: float = 0.5, policy: str = "threshold",
                       distances=(1, 2, 3, 4), supersets=(1.0, 1.25, 1.5, 2.0), scores=SCORES, ctx: int = 512,
                       max_windows: int = 4, warmup_tokens: int = 16, progress: bool = False) -> dict[str, Any]:
    """Recall of the true active sets of the sparse model by predicted supersets.

    qkv and gate_up: predicted from the residual `distance` layers earlier with each score.
    o and down: "context_frequency", the channels most often active earlier in the same
    sequence (what a context-level hot cache holds), measured after `warmup_tokens` tokens.
    Returns {"rows": [...], "per_layer": {...}} with recall means over tokens and sparse layers.
    """
    cfg = engine.config
    sp = SparsityConfig(sparsity, policy=policy)
    ks = sp.ks(cfg)
    thresholds = np.zeros((cfg.num_layers, len(OP_GROUPS)), np.float32)
    if policy == "threshold":
        thresholds = store_thresholds(engine.store_path, cfg, sparsity)
    flat = flatten_params(engine.params)
    gains = {"qkv": np.stack([np.asarray(flat[f"layers.{i}.attn_norm.weight"]) for i in range(cfg.num_layers)]),
             "gate_up": np.stack([np.asarray(flat[f"layers.{i}.mlp_norm.weight"]) for i in range(cfg.num_layers)])}
    tokens, bos = engine_tokens(engine, text_path, ctx)
    windows = eval_windows(tokens, ctx=ctx, max_windows=max_windows, bos_id=bos)
    first = max(sp.dense_layers, 1)
    layers = range(first, cfg.num_layers)
    sizes = {g: [round(m * ks[OP_GROUPS.index(g)]) for m in supersets] for g in OP_GROUPS}
    acc: dict[tuple, list[float]] = {}
    iterator = windows
    if progress:
        from tqdm import tqdm

        iterator = tqdm(windows, desc="predictor", unit="window")
    for window in iterator:
        _, taps = forward_with_taps(engine.params, jnp.asarray(window), jnp.asarray(thresholds), cfg=cfg, sparse=sp)
        taps = {k: np.asarray(v) for k, v in taps.items()}
        for j in layers:
            for g in ("qkv", "gate_up", "o", "down"):
                gi = OP_GROUPS.index(g)
                true = _true_masks(taps[g][j], ks[gi], float(thresholds[j, gi]), policy)
                if g in ("qkv", "gate_up"):
                    for score in scores:
                        for d in distances:
                            if j - d < 0:
                                continue
                            s = prediction_score(taps["residual"][j - d], gains[g][j], gains[g][j - d], score)
                            for m, r in zip(supersets, _recall_at(np.asarray(s), true, sizes[g])):
                                acc.setdefault((g, score, d, m), []).append(r)
                                acc.setdefault((g, score, d, m, j), []).append(r)
                else:
                    seen = np.cumsum(true, axis=0) - true  # activations strictly before each token
                    rng_tiebreak = np.arange(true.shape[-1])[None, :] * 1e-6  # deterministic order of ties
                    s = (seen - rng_tiebreak)[warmup_tokens:]
                    for m, r in zip(supersets, _recall_at(s, true[warmup_tokens:], sizes[g])):
                        acc.setdefault((g, "context_frequency", 0, m), []).append(r)
                        acc.setdefault((g, "context_frequency", 0, m, j), []).append(r)
    rows = []
    for key, values in sorted(acc.items(), key=lambda kv: str(kv[0])):
        if len(key) == 4:
            g, score, d, m = key
            rows.append({"group": g, "score": score, "distance": d, "superset": m, "recall": float(np.mean(values)),
                         "superset_rows_per_layer": round(m * ks[OP_GROUPS.index(g)]), "k": ks[OP_GROUPS.index(g)]})
    per_layer = {}
    for key, values in acc.items():
        if len(key) == 5:
            g, score, d, m, j = key
            per_layer.setdefault(f"{g}|{score}|d={d}|x{m}", {})[j] = float(np.mean(values))
    return {"sparsity": sparsity, "policy": policy, "windows": len(windows), "ctx": ctx, "rows": rows,
            "per_layer": per_layer}
