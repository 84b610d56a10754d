"""What quantization-aware distillation buys a q4 store (absl, JSON): a measurement, not a feature.

    python bench/q4_qat.py --lrs 5e-5,4e-4 --steps 80        # ~25 min on 2 cores

From a float store of the model (default: the default model's f32 store, which holds the GGUF's
weights exactly), every linear op is rounded to q4 as the writer rounds it (calibrated rounding by
default, `--start plain` for plain), and each block's scale and minimum are taken from the
writer's own q4 bytes and frozen (`--learn_grid`: trained as well, and rounded to f16 at the end,
as a store holds them). Then, for each learning rate, the float weights are trained for
`--steps` steps (Adam, warm-up and cosine decay; batches of the shipped distillation corpora,
never the evaluation text) so that the model with every weight snapped to its frozen block grid
(straight-through: the forward pass uses the snapped weights, the gradient reaches the float ones)
matches the float model: forward KL of next-token distributions, as `activeflow distill` does.
Perplexity is measured on the snapped weights, widened to f32: exactly the values a q4 store with
those codes holds. `codes_moved`: weights whose 4-bit code differs from the starting rounding.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
FLAGS = flags.FLAGS
flags.DEFINE_string("store", None, "a float (f32/f16) store; default: the default model's f32 store")
flags.DEFINE_enum("start", "calibrated", ["calibrated", "plain"], "the rounding training starts from")
flags.DEFINE_list("lrs", ["5e-5", "4e-4"], "peak learning rates, one training run each")
flags.DEFINE_integer("steps", 80, "training steps per run")
flags.DEFINE_bool("learn_grid", False, "train each block's scale and minimum too (rounded to f16 at the end)")
flags.DEFINE_integer("batch_size", 2, "windows per step")
flags.DEFINE_integer("seq_len", 256, "tokens per window")
flags.DEFINE_string("text", os.path.join(HERE, "..", "tests", "data", "wiki.test.lf.raw"), "evaluation text")
flags.DEFINE_integer("windows", 8, "windows of the evaluation text")
flags.DEFINE_string("output", None, "append the JSON record here as well (JSON lines)")


def main(argv) -> None:
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from activeflow_jax import calibrated_rounding as cr
    from activeflow_jax import quant
    from activeflow_jax.config import TENSOR_OF_OP
    from activeflow_jax.distill.train import batch_for_step, distillation_texts, make_windows
    from activeflow_jax.eval.perplexity import read_text
    from activeflow_jax.models import llama
    from common import emit, flat_perplexity, float_model, machine_info

    try:
        lrs = [float(v) for v in FLAGS.lrs]
    except ValueError:
        raise SystemExit(f"--lrs: numbers, got {FLAGS.lrs}") from None
    store, reader, flat, tokenizer = float_model(FLAGS.store)
    cfg = reader.config
    ops = [f"layers.{i}.{TENSOR_OF_OP[g]}" for i in range(cfg.num_layers) for g in TENSOR_OF_OP]

    start = time.perf_counter()
    init = cr.calibrated_tensors(cfg, reader.tokenizer_spec, flat) if FLAGS.start == "calibrated" else flat
    grids, codes0 = {}, {}
    for name in ops:
        rows = quant.quantize_rows(init[name], "q4")  # the writer's rounding, bytes and all
        grids[name] = tuple(jnp.asarray(a) for a in quant.block_scales(rows, "q4", init[name].shape[1]))
    rounding_seconds = time.perf_counter() - start

    def snap(w, d, m):  # w [in, out] -> its block grid's values (f32), and the codes
        x = w.reshape(w.shape[0], -1, quant.BLOCK)
        q = jnp.clip(jnp.round((x - m[..., None]) / jnp.where(d > 0, d, 1.0)[..., None]), 0, 15)
        return (q * d[..., None] + m[..., None]).reshape(w.shape), q

    def snap_ste(w, d, m):  # snap's values; the gradient passes the rounding (to w, and to d, m)
        x = (w.reshape(w.shape[0], -1, quant.BLOCK) - m[..., None]) / jnp.where(d > 0, d, 1.0)[..., None]
        q = jnp.clip(x + jax.lax.stop_gradient(jnp.round(x) - x), 0, 15)
        return (q * d[..., None] + m[..., None]).reshape(w.shape)

    def as_f16(a):
        return a.astype(jnp.float16).astype(jnp.float32)

    for name in ops:
        codes0[name] = np.asarray(snap(jnp.asarray(init[name]), *grids[name])[1], np.uint8)

    def ppl(tensors):
        return flat_perplexity(cfg, tensors, tokenizer, FLAGS.text, FLAGS.windows)

    def snapped(weights, grid):
        return {**flat, **{n: np.asarray(snap(w, *grid[n])[0]) for n, w in weights.items()}}

    reference = ppl(flat)
    begin = {n: jnp.asarray(init[n]) for n in ops}
    start_ppl = ppl(snapped(begin, grids))
    print(f"{reader.storage_dtype}: {reference:.3f}; q4 ({FLAGS.start} rounding): {start_ppl:.3f}", flush=True)

    texts, _ = distillation_texts(None)
    ids = np.concatenate([np.asarray(tokenizer.encode(read_text(t)), np.int32) for t in texts])
    windows = make_windows(ids, FLAGS.seq_len, FLAGS.batch_size)
    teacher = llama.params_from_flat(cfg, {n: jnp.asarray(v) for n, v in flat.items()})
    frozen = {n: v for n, v in flat.items() if n not in grids}
    results = []
    for lr in lrs:
        tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, max(1, FLAGS.steps // 8), FLAGS.steps))

        def loss_fn(trained, batch):
            if FLAGS.learn_grid:
                weights = {n: snap_ste(w, d, m) for n, (w, d, m) in trained.items()}
            else:
                weights = {n: w + jax.lax.stop_gradient(snap(w, *grids[n])[0] - w) for n, w in trained.items()}
            student = llama.params_from_flat(cfg, {**frozen, **weights})
            inputs = batch[:, :-1]
            s = jax.nn.log_softmax(jax.vmap(lambda t: llama.sequence_logits(student, t, cfg=cfg))(inputs), -1)
            t = jax.nn.log_softmax(jax.lax.stop_gradient(
                jax.vmap(lambda t: llama.sequence_logits(teacher, t, cfg=cfg))(inputs)), -1)
            return jnp.mean(jnp.sum(jnp.exp(t) * (t - s), -1))

        @jax.jit
        def step(trained, opt_state, batch):
            kl, grads = jax.value_and_grad(loss_fn)(trained, batch)
            updates, opt_state = tx.update(grads, opt_state, trained)
            return optax.apply_updates(trained, updates), opt_state, kl

        trained = {n: (w, *grids[n]) for n, w in begin.items()} if FLAGS.learn_grid else dict(begin)
        opt_state = tx.init(trained)
        started, kls = time.perf_counter(), []
        for i in range(FLAGS.steps):
            trained, opt_state, kl = step(trained, opt_state, jnp.asarray(batch_for_step(windows, i, FLAGS.batch_size, 0)))
            kls.append(float(kl))
        train_seconds = time.perf_counter() - started
        if FLAGS.learn_grid:  # the stored grid: scale and minimum in f16 (codes against them)
            grid = {n: (as_f16(d), as_f16(m)) for n, (_, d, m) in trained.items()}
            trained = {n: w for n, (w, _, _) in trained.items()}
        else:
            grid = grids
        moved = sum(int(np.sum(np.asarray(snap(w, *grid[n])[1], np.uint8) != codes0[n])) for n, w in trained.items())
        value = ppl(snapped(trained, grid))
        total = sum(codes0[n].size for n in ops)
        results.append({"lr": lr, "steps": FLAGS.steps, "ppl": round(value, 4), "vs_float": round(value / reference - 1, 4),
                        "vs_start": round(value / start_ppl - 1, 4), "codes_moved": moved, "codes": total,
                        "kl_first_10": round(float(np.mean(kls[:10])), 4), "kl_last_10": round(float(np.mean(kls[-10:])), 4),
                        "train_seconds": round(train_seconds, 1)})
        print(f"lr {lr:g}: {value:.3f} ({value / reference - 1:+.1%} vs float, {value / start_ppl - 1:+.1%} vs the "
              f"start), {moved / total:.2%} of codes moved, {train_seconds:.0f} s", flush=True)
    emit({"bench": "q4_qat", "store": os.path.abspath(store), "start": FLAGS.start, "learn_grid": FLAGS.learn_grid,
          "text": FLAGS.text,
          "windows": FLAGS.windows, "batch_size": FLAGS.batch_size, "seq_len": FLAGS.seq_len,
          "float_ppl": round(reference, 4), "start_ppl": round(start_ppl, 4),
          "rounding_seconds": round(rounding_seconds, 1), "results": results, "machine": machine_info()}, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
