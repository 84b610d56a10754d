"""Calibrated rounding of q4 stores: each linear op's rows are rounded one after another, and what
rounding a row got wrong is carried into the rows not yet rounded, weighted by how the op's inputs
co-vary on calibration text (GPTQ, Frantar et al. 2022, in our row layout).

Why: a q4 store rounds weights that the GGUF already holds at 4 bits along the other axis (quant.py),
so plain rounding adds a second 4-bit error. On SmolLM2-135M (8 windows of WikiText-2, embedding q8
in both) plain rounding gives 26.50 against the source's 24.37, calibrated rounding 25.65
(docs/results.md). A row is one input channel (layout [in, out]), which is GPTQ's unit: rounding row
i changes y = x W by x_i * e_i, and with H = E[x^T x] over the op's inputs the best correction of
the rows after i is -e_i H^-1[i, i+1:] / H^-1[i, i]. Rows go in order of falling H[i, i] (GPTQ's
"act order": the channels that carry the most energy are rounded while the most rows are left to
absorb their error). The format is unchanged: the result is a float weight W' whose plain rounding
(quant.quantize_rows, row by row) is the calibrated rounding, so the writer quantizes W' as usual.

The statistics come from the shipped calibration text (activeflow_jax/data/calibration.txt, never
the evaluation text), run layer by layer through the model as imported (f32), one window at a time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from activeflow_jax.config import OP_GROUPS, TENSOR_OF_OP, ModelConfig
from activeflow_jax.errors import InvalidArgumentError
from activeflow_jax.formats.tokenizer import Tokenizer
from activeflow_jax.models import llama
from activeflow_jax.paths import default_calibration_text
from activeflow_jax.quant import dequantize_np, quantize_rows

ROUNDINGS = ("plain", "calibrated")
WINDOW = 512  # tokens per calibration window
MAX_WINDOWS = 40  # the shipped text has ~35 windows of SmolLM2 tokens
DAMP = 0.01  # added to H's diagonal, as a share of its mean: keeps the inverse well conditioned
BLOCK = 64  # rows whose corrections are applied to the rest of the weight at once (same result)


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDINGS:
        raise InvalidArgumentError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return rounding


def calibration_tokens(tokenizer_spec: dict, text_path: str | None = None) -> np.ndarray:
    """The calibration text's token ids, cut into whole windows [n, WINDOW]."""
    if not tokenizer_spec:
        raise InvalidArgumentError("calibrated rounding needs the model's tokenizer, and this GGUF has none; "
                                   "convert with rounding='plain' (--rounding plain)")
    tokenizer = Tokenizer.from_spec(tokenizer_spec)
    with open(text_path or default_calibration_text(), encoding="utf-8") as f:
        ids = np.asarray(tokenizer.encode(f.read()), np.int32)
    n = min(MAX_WINDOWS, len(ids) // WINDOW)
    if n < 1:
        raise InvalidArgumentError(f"the calibration text has {len(ids)} tokens, fewer than one window of {WINDOW}")
    return ids[:n * WINDOW].reshape(n, WINDOW)


@functools.partial(jax.jit, static_argnames=("cfg", "layer"))
def _layer_with_grams(p, x, *, cfg: ModelConfig, layer: int):
    """One layer over one window from an empty cache: (output, the Gram matrix x^T x of each op
    group's input, in OP_GROUPS order). `layer`: any layer of this one's kind (llama.layer_kind)."""
    t = x.shape[0]
    taps: dict = {}
    cache = llama.KVCache.zeros(cfg, t)
    biases = llama.attention_biases(cfg, 0, t, t)
    y, _, _ = llama.layer_forward(cfg, p, x, cache.k[0], cache.v[0], 0, biases, attn_len=t,
                                  ops=llama.LinearOps(taps=taps), layer=layer)
    return y, tuple(taps[g].T @ taps[g] for g in OP_GROUPS)


def input_grams(cfg: ModelConfig, flat: dict[str, np.ndarray], windows: np.ndarray) -> dict[tuple[int, str], np.ndarray]:
    """{(layer, op group): mean x^T x of that op's input over the windows' tokens}, layer by layer."""
    params = llama.params_from_flat(cfg, flat)
    xs = [llama.embed_tokens(cfg, params["embed"], jnp.asarray(w)) for w in windows]
    grams: dict[tuple[int, str], np.ndarray] = {}
    for i, (_, layer) in enumerate(llama.layer_programs(cfg, None, None)):
        sums = None
        for w, x in enumerate(xs):
            xs[w], g = _layer_with_grams(params["layers"][i], x, cfg=cfg, layer=layer)
            sums = g if sums is None else tuple(a + b for a, b in zip(sums, g))
        for group, total in zip(OP_GROUPS, sums):
            grams[(i, group)] = np.asarray(total, np.float64) / (len(xs) * windows.shape[1])
    return grams


def _rounded(rows: np.ndarray, dtype: str) -> np.ndarray:
    return dequantize_np(quantize_rows(rows, dtype), dtype, rows.shape[1])


def calibrated_rows(w: np.ndarray, gram: np.ndarray, dtype: str = "q4") -> np.ndarray:
    """W' [in, out] whose plain rounding to `dtype` is the calibrated rounding of w (module doc)."""
    w = np.asarray(w, np.float64)
    h = np.array(gram, np.float64)
    n = w.shape[0]
    order = np.argsort(-np.diag(h), kind="stable")
    w, h = w[order], h[order][:, order]
    dead = np.diag(h) <= 0  # a channel never active: nothing to weigh its error by
    h[dead, dead] = 1.0
    h[np.diag_indices(n)] += DAMP * float(np.mean(np.diag(h)))
    try:
        u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: row i holds H^-1's i-th step of elimination
    except np.linalg.LinAlgError:
        return np.asarray(w[np.argsort(order)], np.float32)  # degenerate statistics: plain rounding
    out = np.empty_like(w)
    for b0 in range(0, n, BLOCK):
        b1 = min(n, b0 + BLOCK)
        block = w[b0:b1].copy()
        errors = np.empty_like(block)
        ub = u[b0:b1, b0:b1]
        for r in range(b1 - b0):
            row = block[r]
            out[b0 + r] = row
            e = (row - _rounded(row[None].astype(np.float32), dtype)[0]) / ub[r, r]
            block[r:] -= np.outer(ub[r, r:], e)
            errors[r] = e
        w[b1:] -= u[b0:b1, b1:].T @ errors
    return np.asarray(out[np.argsort(order)], np.float32)


def calibrated_tensors(cfg: ModelConfig, tokenizer_spec: dict, flat: dict[str, np.ndarray], dtype: str = "q4",
                       progress: bool = False) -> dict[str, np.ndarray]:
    """The model's tensors with every linear op's weight replaced by its calibrated W' (the others
    as given)."""
    windows = calibration_tokens(tokenizer_spec)
    grams = input_grams(cfg, flat, windows)
    out = dict(flat)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(grams), desc="calibrated rounding", unit="op")
    for (i, group), gram in grams.items():
        name = f"layers.{i}.{TENSOR_OF_OP[group]}"
        out[name] = calibrated_rows(flat[name], gram, dtype)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return out
