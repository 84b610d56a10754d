"""Does WINA's channel score (|x_j| times the norm of weight row j) pick better top-k sets than |x_j|?

    python bench/wina.py --ops qkv,o,gate_up,down,all --sparsity 0.5 --max_windows 16

WINA (Chen et al., 2025) ranks input channels by |x_j| * ||W[j, :]||. With weights stored [in, out]
that equals ranking a reparametrized model by |x_j| alone: scale channel j of the op's input by
n_j = ||W[j, :]|| where the input is produced and divide row j of W by n_j. The dense function is
unchanged (up to rounding), so the model's own |x| top-k kernels then select WINA's sets:
  qkv, gate_up   fold n into the RMSNorm gain before the op;
  down           fold n into the up-projection's output columns (the SwiGLU product is linear in up);
  o              fold into the v-projection's output columns; GQA shares a v channel among the
                 query heads of its group, so that group's root-mean-square row norm is used (an
                 approximation of WINA for o only).
Each variant is written as a temporary store and evaluated with the quality harness against the
original model's dense logits, top-k policy (no thresholds needed), on the same windows.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FLAGS = flags.FLAGS
flags.DEFINE_string("store", None, "store directory; default: the default model")
flags.DEFINE_string("text", os.path.join(HERE, "..", "tests", "data", "wiki.test.lf.raw"), "evaluation text")
flags.DEFINE_list("ops", ["qkv", "o", "gate_up", "down", "all"], "variants: one op group, or all")
flags.DEFINE_float("sparsity", 0.5, "top-k sparsity of every op")
flags.DEFINE_integer("max_windows", 16, "windows of the evaluation text")
flags.DEFINE_string("output", None, "append the JSON record here (JSON lines)")


def wina_tensors(tensors: dict[str, np.ndarray], cfg, ops: set[str]) -> dict[str, np.ndarray]:
    """The reparametrized weights (copies); see the module docstring."""
    t = {name: np.array(a, np.float32) for name, a in tensors.items()}
    f, q, kv, hd = cfg.d_ff, cfg.q_dim, cfg.kv_dim, cfg.head_dim
    group = cfg.num_heads // cfg.num_kv_heads
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        if "qkv" in ops:
            n = np.linalg.norm(t[p + "attn.wqkv"], axis=1)
            t[p + "attn_norm.weight"] *= n
            t[p + "attn.wqkv"] /= n[:, None]
        if "gate_up" in ops:
            n = np.linalg.norm(t[p + "mlp.w_gate_up"], axis=1)
            t[p + "mlp_norm.weight"] *= n
            t[p + "mlp.w_gate_up"] /= n[:, None]
        if "down" in ops:
            n = np.linalg.norm(t[p + "mlp.w_down"], axis=1)
            t[p + "mlp.w_gate_up"][:, f:] *= n[None, :]
            t[p + "mlp.w_down"] /= n[:, None]
        if "o" in ops:
            n = np.linalg.norm(t[p + "attn.wo"], axis=1).reshape(cfg.num_kv_heads, group, hd)
            s = np.sqrt((n ** 2).mean(axis=1))  # [kv heads, hd]
            t[p + "attn.wqkv"][:, q + kv:] *= s.reshape(-1)[None, :]
            t[p + "attn.wo"] /= np.repeat(s[:, None, :], group, axis=1).reshape(-1)[:, None]
    return t


def main(argv) -> None:
    del argv
    import activeflow_jax as af
    from activeflow_jax.eval.quality import QualitySetting, evaluate_quality
    from activeflow_jax.store.reader import StoreReader
    from activeflow_jax.store.writer import write_store
    from common import emit, machine_info

    store = FLAGS.store or af.fetch_default_model(quiet=True)
    reader = StoreReader(store)
    tensors = reader.read_many(reader.tensor_names)
    reference = af.Engine.load(store)
    label = f"top-k {FLAGS.sparsity:.0%}"
    settings = [QualitySetting(label, FLAGS.sparsity, "topk")]
    rows = []
    variants = ["none"] + list(FLAGS.ops)
    tmp = tempfile.mkdtemp(prefix="wina-")
    try:
        for variant in variants:
            if variant == "none":
                engine = reference
            else:
                ops = {"qkv", "o", "gate_up", "down"} if variant == "all" else {variant}
                path = os.path.join(tmp, variant)
                write_store(path, reader.config, reader.tokenizer_spec,
                            iter(wina_tensors(tensors, reader.config, ops).items()), dtype=reader.storage_dtype,
                            source={"wina": sorted(ops)}, overwrite=True)
                engine = af.Engine.load(path)
            report = evaluate_quality(engine, FLAGS.text, settings, max_windows=FLAGS.max_windows, reference=reference)
            row = next(r for r in report.rows if r.label == label)
            rows.append({"wina_ops": variant, "ppl": row.ppl, "kl": row.kl_mean, "agreement": row.top1_agreement,
                         "dense_ppl": report.reference_ppl})
            print(f"WINA on {variant:8s} {label}: PPL {row.ppl:.3f}  KL {row.kl_mean:.4f}  agreement {row.top1_agreement:.3f}",
                  flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    emit({"bench": "wina", "machine": machine_info(), "store": store, "sparsity": FLAGS.sparsity,
          "max_windows": FLAGS.max_windows, "rows": rows}, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
