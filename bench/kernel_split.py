"""Where a decoded token's weight reads go, kernel by kernel: the head against the linear ops, dense and sparse.

    python bench/kernel_split.py --dtype q8 --sparsity 0.5

Times each native kernel alone on random weights of the model's shapes (from a store's config,
default SmolLM2-135M): the tied head (q_rows_dot over the [V, d] table), each linear op's dense
decode product (q_matvec; f32 stores: the XLA dot) and its sparse product over a random (1 -
sparsity) share of the rows (q_gather_matvec / gather_matvec). Per token: head + layers x ops.
The ratio dense / sparse of these sums is the most sparse decode can gain over dense with the head
dense (attention, norms and the channel selection excluded), and the GB/s say how close each kernel
runs to the machine's bandwidth.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("store", None, "a store whose model shapes to use; default: the default model")
flags.DEFINE_enum("dtype", "q8", ["q8", "q4", "f32"], "weight format")
flags.DEFINE_float("sparsity", 0.5, "share of rows the sparse products skip")
flags.DEFINE_integer("repeats", 200, "calls per timing (the head: a quarter of it)")
flags.DEFINE_string("output", None, "append the JSON record to this file as well (JSON lines)")


def main(argv) -> None:
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    import activeflow_jax as af
    from activeflow_jax import quant
    from activeflow_jax.config import OP_GROUPS, op_input_dims
    from activeflow_jax.runtime.budget import op_output_dims
    from activeflow_jax.sparse import native
    from activeflow_jax.store.reader import StoreReader
    from common import emit

    if not native.usable():
        raise SystemExit("the native kernels are not usable here (no C++ compiler, or ACTIVEFLOW_NATIVE=0)")
    cfg = StoreReader(FLAGS.store or af.fetch_default_model(quiet=True)).config
    rng = np.random.default_rng(0)

    def weight(rows, cols):
        w = (rng.normal(size=(rows, cols)) * 0.02).astype(np.float32)
        if FLAGS.dtype == "f32":
            return jnp.asarray(w)
        return quant.QRows(jnp.asarray(quant.quantize_rows(w, FLAGS.dtype)), FLAGS.dtype, cols)

    def ms(fn, *args, n):
        jax.block_until_ready(fn(*args))
        start = time.perf_counter()
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / n * 1e3

    def nbytes(w):
        return w.nbytes if hasattr(w, "nbytes") else w.data.nbytes

    q = FLAGS.dtype != "f32"
    head = weight(cfg.vocab_size, cfg.d_model)
    x = jnp.asarray(rng.normal(size=cfg.d_model).astype(np.float32))
    head_fn = jax.jit(native.q_rows_dot if q else native.rows_dot)
    head_ms = ms(head_fn, x, head, n=max(1, FLAGS.repeats // 4))
    dense_fn = jax.jit(native.q_matvec if q else (lambda x, w: x @ w))
    sparse_fn = jax.jit(native.q_gather_matvec if q else native.gather_matvec)
    ops = []
    for group, n_in, n_out in zip(OP_GROUPS, op_input_dims(cfg), op_output_dims(cfg)):
        w = weight(n_in, n_out)
        xin = jnp.asarray(rng.normal(size=n_in).astype(np.float32))
        k = max(1, round(n_in * (1 - FLAGS.sparsity)))
        rows = jnp.asarray(np.sort(rng.choice(n_in, k, replace=False)).astype(np.int32))
        dense = ms(dense_fn, xin, w, n=FLAGS.repeats)
        sparse = ms(sparse_fn, xin[:k], rows, w, n=FLAGS.repeats)
        ops.append({"op": group, "shape": [n_in, n_out], "bytes": nbytes(w), "rows_sparse": k,
                    "dense_ms": dense, "sparse_ms": sparse, "dense_gb_s": nbytes(w) / dense / 1e6})
    layers_dense = cfg.num_layers * sum(o["dense_ms"] for o in ops)
    layers_sparse = cfg.num_layers * sum(o["sparse_ms"] for o in ops)
    record = {"benchmark": "kernel_split", "dtype": FLAGS.dtype, "sparsity": FLAGS.sparsity,
              "head": {"shape": [cfg.vocab_size, cfg.d_model], "bytes": nbytes(head), "ms": head_ms,
                       "gb_s": nbytes(head) / head_ms / 1e6},
              "ops": ops, "token_dense_ms": head_ms + layers_dense, "token_sparse_ms": head_ms + layers_sparse,
              "head_share_dense": head_ms / (head_ms + layers_dense),
              "sparse_gain_bound": (head_ms + layers_dense) / (head_ms + layers_sparse)}
    print(f"head {record['head']['bytes'] / 1e6:.1f} MB: {head_ms:.2f} ms ({record['head']['gb_s']:.1f} GB/s); "
          f"layers dense {layers_dense:.2f} ms, sparse {layers_sparse:.2f} ms; per token dense "
          f"{record['token_dense_ms']:.2f} ms, sparse {record['token_sparse_ms']:.2f} ms: at most "
          f"{record['sparse_gain_bound']:.2f}x with the head dense (head {100 * record['head_share_dense']:.0f}% of dense)",
          file=sys.stderr)
    emit(record, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
