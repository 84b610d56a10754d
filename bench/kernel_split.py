"""A decoded token's weight products alone, dense against sparse, and the head's share of them.

    python bench/kernel_split.py --dtype q8 --sparsity 0.5

On random weights of the model's shapes (a store's config, default SmolLM2-135M), every layer's
weights distinct as in the model, one program per measurement: every linear op's dense decode
product (q_matvec; f32: the XLA dot) or its sparse product over a random (1 - sparsity) share of
the rows (q_gather_matvec / gather_matvec), plus the tied head (q_rows_dot over the [V, d] table);
then the layers alone and the head alone. Attention, norms and the channel selection are left
out, so dense / sparse here bounds what sparse decode can gain over dense with the head dense.
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
    head_fn = native.q_rows_dot if q else native.rows_dot
    dense_fn = native.q_matvec if q else (lambda x, w: x @ w)
    sparse_fn = native.q_gather_matvec if q else native.gather_matvec
    # every layer's weights distinct, as in the model: a token streams them all from DRAM (one
    # weight timed alone would sit in the cache and run several times faster)
    dims = list(zip(OP_GROUPS, op_input_dims(cfg), op_output_dims(cfg)))
    weights = [[weight(n_in, n_out) for _, n_in, n_out in dims] for _ in range(cfg.num_layers)]
    head = weight(cfg.vocab_size, cfg.d_model)
    xs = [jnp.asarray(rng.normal(size=n_in).astype(np.float32)) for _, n_in, _ in dims]
    ks = [max(1, round(n_in * (1 - FLAGS.sparsity))) for _, n_in, _ in dims]
    rows = [jnp.asarray(np.sort(rng.choice(n_in, k, replace=False)).astype(np.int32))
            for (_, n_in, _), k in zip(dims, ks)]
    x_head = jnp.asarray(rng.normal(size=cfg.d_model).astype(np.float32))

    def token(sparse: bool, with_head: bool, with_layers: bool = True):
        def run(weights, head):
            outs = []
            for layer in weights if with_layers else []:
                for j, w in enumerate(layer):  # each product's input is independent: no data chain
                    outs.append(sparse_fn(xs[j][:ks[j]], rows[j], w) if sparse else dense_fn(xs[j], w))
            if with_head:
                outs.append(head_fn(x_head, head))
            return outs
        return jax.jit(run)

    n = FLAGS.repeats
    timings = {name: ms(token(*args), weights, head, n=n) for name, args in
               (("dense", (False, True)), ("sparse", (True, True)), ("dense_layers", (False, False)),
                ("sparse_layers", (True, False)), ("head", (False, True, False)))}
    layer_bytes = sum(nbytes(w) for layer in weights for w in layer)
    record = {"benchmark": "kernel_split", "dtype": FLAGS.dtype, "sparsity": FLAGS.sparsity,
              "layer_bytes": layer_bytes, "head_bytes": nbytes(head), "ms": timings,
              "dense_gb_s": (layer_bytes + nbytes(head)) / timings["dense"] / 1e6,
              "head_share_dense": timings["head"] / timings["dense"],
              "sparse_gain": timings["dense"] / timings["sparse"],
              "sparse_gain_layers": timings["dense_layers"] / timings["sparse_layers"]}
    print(f"per token, weight products only: dense {timings['dense']:.2f} ms ({record['dense_gb_s']:.1f} GB/s), "
          f"sparse {timings['sparse']:.2f} ms: {record['sparse_gain']:.2f}x; the head alone {timings['head']:.2f} ms "
          f"({100 * record['head_share_dense']:.0f}% of dense), layers alone {record['sparse_gain_layers']:.2f}x",
          file=sys.stderr)
    emit(record, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
