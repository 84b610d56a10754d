"""Where a q4 store loses perplexity, and what keeping parts of it at 8 bits buys (absl, JSON).

    python bench/q4_mix.py --mixes q4,q4:down=q8,q4:gate_up=q8,q4:layers=0-1+28-29=q8   # ~20 min

From a float store of the model (default: the default model's f32 store, fetched if missing, which
holds the GGUF's weights exactly), each mix re-rounds every linear op's weight in memory as the
q4 writer would (calibrated rounding by default, `--rounding plain` for plain), widens it back to
f32 and measures perplexity on the first `--windows` windows of `--text`; the first record is the
float store itself, the reference of every `vs_float` figure. The embedding/head stays as
stored: a q4 store keeps it at q8, and the GGUF holds it as Q8_0 blocks along the same axis, so
q8 is lossless for it (quant.tensor_dtype).

A mix: `<default dtype>[:<what>=<dtype>[:...]]`, what being an op group (qkv, o, gate_up, down) or
`layers=<i>-<j>+<k>...` (those layers, every op). Layer mixes are measurements only: the budget
runtime's pools hold one row size per op group, so a store cannot mix dtypes across layers.
`bits_per_weight`: the linear ops' stored bits per weight (q4 5.0, q8 8.5 with their scales).
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
flags.DEFINE_list("mixes", ["q4", "q4:down=q8", "q4:gate_up=q8"], "mixes to measure (module doc)")
flags.DEFINE_enum("rounding", "calibrated", ["calibrated", "plain"], "how the weights are rounded")
flags.DEFINE_string("text", os.path.join(HERE, "..", "tests", "data", "wiki.test.lf.raw"), "evaluation text")
flags.DEFINE_integer("windows", 8, "windows of the evaluation text")
flags.DEFINE_integer("ctx", 512, "window length in tokens")
flags.DEFINE_string("output", None, "append the JSON record here as well (JSON lines)")


def parse_mix(text: str, num_layers: int):
    """A mix spec -> (default dtype, {op group: dtype}, {layer: dtype}); ValueError names what is wrong."""
    from activeflow_jax.config import OP_GROUPS
    from activeflow_jax.quant import QUANT_DTYPES

    default, *parts = text.strip().split(":")
    if default not in QUANT_DTYPES:
        raise ValueError(f"mix {text!r}: the default dtype must be one of {QUANT_DTYPES}")
    ops, layers = {}, {}
    for part in parts:
        what, _, dtype = part.partition("=") if not part.startswith("layers=") else part[7:].rpartition("=")
        if dtype not in QUANT_DTYPES:
            raise ValueError(f"mix {text!r}: {part!r} needs =<dtype>, one of {QUANT_DTYPES}")
        if part.startswith("layers="):
            for span in what.split("+"):
                lo, _, hi = span.partition("-")
                first, last = int(lo), int(hi or lo)
                if not 0 <= first <= last < num_layers:
                    raise ValueError(f"mix {text!r}: layers {span} outside 0-{num_layers - 1}")
                layers.update({i: dtype for i in range(first, last + 1)})
        elif what in OP_GROUPS:
            ops[what] = dtype
        else:
            raise ValueError(f"mix {text!r}: {what!r} is neither an op group {OP_GROUPS} nor layers=...")
    return default, ops, layers


def main(argv) -> None:
    del argv
    import numpy as np

    from activeflow_jax import calibrated_rounding as cr
    from activeflow_jax import quant
    from activeflow_jax.config import TENSOR_OF_OP
    from common import emit, flat_perplexity, float_model, machine_info

    store, reader, flat, tokenizer = float_model(FLAGS.store)
    cfg = reader.config
    try:
        mixes = [(m, *parse_mix(m, cfg.num_layers)) for m in FLAGS.mixes]
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    op_tensors = {f"layers.{i}.{TENSOR_OF_OP[g]}": (i, g) for i in range(cfg.num_layers) for g in TENSOR_OF_OP}

    start = time.perf_counter()
    grams = None
    if FLAGS.rounding == "calibrated":
        grams = cr.input_grams(cfg, flat, cr.calibration_tokens(reader.tokenizer_spec))
    gram_seconds = time.perf_counter() - start

    def ppl(tensors):
        return flat_perplexity(cfg, tensors, tokenizer, FLAGS.text, FLAGS.windows, FLAGS.ctx)

    results = []
    reference = ppl(flat)
    results.append({"mix": reader.storage_dtype, "ppl": round(reference, 4), "vs_float": 0.0})
    print(f"{reader.storage_dtype}: {reference:.3f}", flush=True)
    for text, default, ops, layers in mixes:
        start = time.perf_counter()
        tensors, bits, weights = dict(flat), 0.0, 0
        for name, (layer, group) in op_tensors.items():
            dtype = layers.get(layer, ops.get(group, default))
            w = flat[name]
            if grams is not None:
                w = cr.calibrated_rows(w, grams[(layer, group)], dtype)
            tensors[name] = quant.dequantize_np(quant.quantize_rows(w, dtype), dtype, w.shape[1])
            bits += quant.row_bytes(dtype, w.shape[1]) * 8 * w.shape[0]
            weights += w.size
        rounding_seconds = time.perf_counter() - start
        value = ppl(tensors)
        results.append({"mix": text, "ppl": round(value, 4), "vs_float": round(value / reference - 1, 4),
                        "bits_per_weight": round(bits / weights, 3), "rounding_seconds": round(rounding_seconds, 1)})
        print(f"{text}: {value:.3f} ({value / reference - 1:+.1%}, {bits / weights:.2f} bits per weight)", flush=True)
    emit({"bench": "q4_mix", "store": os.path.abspath(store), "rounding": FLAGS.rounding, "text": FLAGS.text,
          "windows": FLAGS.windows, "ctx": FLAGS.ctx, "gram_seconds": round(gram_seconds, 1), "results": results,
          "machine": machine_info()}, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
