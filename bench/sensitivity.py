"""How much of a sparse perplexity is numerical luck (absl flags, JSON output).

    python bench/sensitivity.py --sparsity 0.5 --policies threshold,topk --seeds 4 \
        --output results/sensitivity.jsonl

For each setting (dense first): the protocol's PPL with the weights as stored, then with the input
embedding multiplied by 1 + eps * N(0, 1) for each seed (eval/quality.py:perturbation_spread).
A top-k or thresholded model is discontinuous in its input, so float-level changes (a reordered
sum, another XLA version, another CPU) move its PPL; the spread printed here is the smallest
difference between two sparse figures that means anything.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags

import jax

jax.config.config_with_absl()

HERE = os.path.dirname(os.path.abspath(__file__))
FLAGS = flags.FLAGS
flags.DEFINE_string("store", None, "store directory; default: the default model")
flags.DEFINE_string("text", os.path.join(HERE, "..", "tests", "data", "wiki.test.lf.raw"), "evaluation text")
flags.DEFINE_list("sparsity", ["0.5"], "uniform sparsity levels")
flags.DEFINE_list("policies", ["topk"], "mask policies: threshold (TEAL), topk")
flags.DEFINE_string("op_sparsity", None, "also a per-op allocation, e.g. qkv=0.36,o=0.5,gate_up=0.48,down=0.64")
flags.DEFINE_boolean("dense", True, "also the dense model")
flags.DEFINE_integer("seeds", 4, "perturbed draws per setting")
flags.DEFINE_float("eps", 1e-6, "relative size of the perturbation of the embedding")
flags.DEFINE_integer("max_windows", 16, "windows of the evaluation text")
flags.DEFINE_integer("ctx", 512, "window length in tokens (at most the model's context)")
flags.DEFINE_string("output", None, "append the JSON record here (JSON lines)")


def main(argv):
    del argv
    import activeflow_jax as af
    from activeflow_jax.config import parse_op_sparsity
    from activeflow_jax.errors import ActiveFlowError
    from activeflow_jax.eval.quality import default_settings, perturbation_spread
    from common import emit

    store = FLAGS.store or af.fetch_default_model(quiet=True)
    engine = af.Engine.load(store, q8_embedding=False)
    settings = default_settings([float(s) for s in FLAGS.sparsity], tuple(FLAGS.policies),
                                op_sparsity=parse_op_sparsity(FLAGS.op_sparsity) if FLAGS.op_sparsity else None)
    if not FLAGS.dense:
        settings = settings[1:]  # default_settings puts dense first
    rows = []
    print("| setting | PPL as stored | perturbed: mean ± std | min - max |", file=sys.stderr)
    print("|---|---|---|---|", file=sys.stderr)
    for setting in settings:
        try:
            row = perturbation_spread(engine, FLAGS.text, setting, seeds=FLAGS.seeds, eps=FLAGS.eps,
                                      ctx=FLAGS.ctx, max_windows=FLAGS.max_windows)
        except ActiveFlowError as exc:
            raise app.UsageError(str(exc)) from None
        rows.append(row)
        print(f"| {row['label']} | {row['ppl']:.3f} | {row['mean']:.3f} ± {row['std']:.3f} | "
              f"{row['min']:.3f} - {row['max']:.3f} |", file=sys.stderr, flush=True)
    emit({"bench": "sensitivity",
          "config": {"store": os.path.abspath(store), "text": os.path.abspath(FLAGS.text), "eps": FLAGS.eps,
                     "seeds": FLAGS.seeds, "ctx": FLAGS.ctx, "max_windows": FLAGS.max_windows},
          "rows": rows}, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
