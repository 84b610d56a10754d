"""Sparse linear kernels on XLA: dense vs gather-in-jit vs pre-gathered active buffers (absl).

    python bench/kernels.py --sparsity 0.3,0.5,0.7 --output results/kernels.jsonl

For each op shape of the default model (SmolLM2-135M: qkv 576x960, o 576x576, gate_up 576x3072,
down 1536x576) a chain of 30 layers with distinct weights (so nothing stays in cache) is timed:
  dense         x @ W                                  reads all rows
  native        the FFI kernel (sparse/native.py): selects the k channels and streams their rows in
                place, split over XLA's intra-op threads
  gather        select k channels, gather k rows in jit, then [k] @ [k, out] (pure XLA)
  pregathered   [k] @ B with B a [k, out] buffer that already holds the active rows (what the
                swapping runtime's slot buffers give the compute; filling them is the loader's job)
Medians over repeats, interleaved round-robin; ratios are against dense in the same run.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags

import jax
import jax.numpy as jnp
import numpy as np

jax.config.config_with_absl()

FLAGS = flags.FLAGS
flags.DEFINE_list("sparsity", ["0.3", "0.5", "0.7"], "sparsity levels")
flags.DEFINE_integer("layers", 30, "chained layers per op (distinct weights)")
flags.DEFINE_integer("repeats", 9, "timed repeats")
flags.DEFINE_string("output", None, "append the JSON record here (JSON lines)")

SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576)}


def _chain(op, layers: int):
    def run(ws, x):
        for w in ws:
            x = x + jnp.resize(op(w, x), x.shape) * 1e-3  # keeps a data dependency between layers
        return x

    return jax.jit(run)


def main(argv):
    del argv
    from activeflow_jax.sparse import native
    from activeflow_jax.sparse.kernels import gather_linear
    from common import emit

    have_native = native.available()

    rng = np.random.default_rng(0)
    results = []
    for name, (din, dout) in SHAPES.items():
        ws = [jnp.asarray(rng.standard_normal((din, dout), np.float32)) for _ in range(FLAGS.layers)]
        x = jnp.asarray(rng.standard_normal(din, np.float32))
        variants = {"dense": (_chain(lambda w, x: x @ w, FLAGS.layers), ws)}
        for s in (float(v) for v in FLAGS.sparsity):
            k = max(1, round((1 - s) * din))
            pre = [jnp.asarray(np.asarray(w)[:k]) for w in ws]
            if have_native:
                variants[f"native {s:g}"] = (
                    _chain(lambda w, x, k=k: native.topk_matvec(x, w, k, 0.0, False), FLAGS.layers), ws)
            variants[f"gather {s:g}"] = (
                _chain(lambda w, x, k=k: gather_linear(x[None], w, k, 0.0, "topk")[0], FLAGS.layers), ws)
            variants[f"pregathered {s:g}"] = (_chain(lambda b, x, k=k: x[:k] @ b, FLAGS.layers), pre)
        for fn, w in variants.values():
            jax.block_until_ready(fn(w, x))
        times = {label: [] for label in variants}
        for _ in range(FLAGS.repeats):
            for label, (fn, w) in variants.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(w, x))
                times[label].append(time.perf_counter() - t0)
        dense = float(np.median(times["dense"]))
        for label, ts in times.items():
            med = float(np.median(ts))
            results.append({"op": name, "shape": [din, dout], "variant": label,
                            "us_per_op": med / FLAGS.layers * 1e6, "speedup_vs_dense": dense / med})
            print(f"{name:>8} {label:>18}: {med / FLAGS.layers * 1e6:8.1f} us/op  {dense / med:5.2f}x dense",
                  file=sys.stderr)
    emit({"bench": "kernels", "config": {"layers": FLAGS.layers, "repeats": FLAGS.repeats}, "results": results},
         FLAGS.output)


if __name__ == "__main__":
    app.run(main)
