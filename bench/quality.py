"""Quality of contextual sparsity against dense: PPL, KL(dense||sparse), top-1 agreement (absl).

    python bench/quality.py --max_windows 16 --output results/quality.jsonl --plot results/quality.png

Every setting is evaluated on the same windows of the evaluation text (llama.cpp's perplexity
protocol, second half of each 512-token window scored), against dense logits computed in the same
run. Also measures the cross-layer predictor (recall of the true active sets by predicted supersets).
"""

from __future__ import annotations

import dataclasses
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
flags.DEFINE_list("sparsity", ["0.3", "0.4", "0.5", "0.6", "0.7"], "sparsity levels")
flags.DEFINE_list("policies", ["threshold", "topk"], "mask policies: threshold (TEAL), topk")
flags.DEFINE_integer("max_windows", 16, "windows of the evaluation text")
flags.DEFINE_integer("predict_distance", 2, "distance of the predicted-set rows (0: none)")
flags.DEFINE_float("superset", 1.5, "predicted set size in multiples of k")
flags.DEFINE_boolean("predictor_table", True, "also measure predictor recall")
flags.DEFINE_integer("predictor_windows", 4, "windows for the predictor measurement")
flags.DEFINE_float("predictor_sparsity", 0.5, "sparsity of the predictor measurement")
flags.DEFINE_string("output", None, "append the JSON record here (JSON lines)")
flags.DEFINE_string("plot", None, "write a PNG plot here")


def plot(report, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    series: dict[str, list] = {}
    dense = next(r for r in report.rows if r.sparsity == 0)
    for r in report.rows:
        if r.sparsity == 0:
            continue
        name = r.label.rsplit(" ", 1)[0] if r.prediction is None else r.label.split(" ")[0] + " predicted"
        series.setdefault(name, []).append(r)
    for name, rows in series.items():
        xs = [r.sparsity * 100 for r in rows]
        axes[0].plot(xs, [r.ppl for r in rows], "o-", label=name)
        axes[1].plot(xs, [r.kl_mean for r in rows], "o-", label=name)
        axes[2].plot(xs, [r.top1_agreement for r in rows], "o-", label=name)
    axes[0].axhline(dense.ppl, color="k", ls="--", label="dense")
    for ax, title in zip(axes, ("WikiText-2 PPL", "KL(dense || sparse), nats", "top-1 agreement with dense")):
        ax.set_xlabel("sparsity (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{report.text}: {report.windows} windows, {report.scored_tokens} scored tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv):
    del argv
    import activeflow_jax as af
    from activeflow_jax.config import PredictionConfig
    from activeflow_jax.eval.prediction import measure_prediction
    from activeflow_jax.eval.quality import default_settings, evaluate_quality
    from common import emit

    store = FLAGS.store or af.fetch_default_model(quiet=True)
    engine = af.Engine.load(store)
    levels = [float(s) for s in FLAGS.sparsity]
    prediction = (PredictionConfig(distance=FLAGS.predict_distance, superset=FLAGS.superset)
                  if FLAGS.predict_distance else None)
    settings = default_settings(levels, tuple(FLAGS.policies), prediction)
    report = evaluate_quality(engine, FLAGS.text, settings, max_windows=FLAGS.max_windows, progress=True)
    record = {"bench": "quality", "config": {"store": os.path.abspath(store), "text": os.path.abspath(FLAGS.text)},
              "quality": dataclasses.asdict(report)}
    print(report.table(), file=sys.stderr)
    if FLAGS.predictor_table:
        pred = measure_prediction(engine, FLAGS.text, sparsity=FLAGS.predictor_sparsity,
                                  max_windows=FLAGS.predictor_windows, progress=True)
        record["predictor"] = pred
        print("| group | score | distance | superset | recall |", file=sys.stderr)
        for row in pred["rows"]:
            print(f"| {row['group']} | {row['score']} | {row['distance']} | {row['superset']}x k "
                  f"({row['superset_rows_per_layer']} rows) | {row['recall']:.3f} |", file=sys.stderr)
    emit(record, FLAGS.output)
    if FLAGS.plot:
        plot(report, FLAGS.plot)


if __name__ == "__main__":
    app.run(main)
