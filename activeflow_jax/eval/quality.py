"""Quality of sparse settings against the dense model on the same windows.

For every window of the perplexity protocol (eval/perplexity.py) the dense logits are computed
once, then each setting's logits; on the scored positions we report perplexity, mean
KL(P_dense || P_sparse) of the next-token distributions, and top-1 agreement with dense. All
settings see the same tokens, so their differences are paired and far more precise than the
perplexity's own standard error suggests.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from activeflow_jax.config import OP_GROUPS, PredictionConfig, SparsityConfig
from activeflow_jax.errors import InvalidArgumentError
from activeflow_jax.eval.perplexity import engine_tokens, eval_windows, perplexity, scored_slice, token_nll
from activeflow_jax.models.embedding import Q8Table
from activeflow_jax.models.llama import forward_with_taps
from activeflow_jax.quant import QRows
from activeflow_jax.sparse.kernels import active_mask

POLICY_NAMES = {"threshold": "TEAL", "topk": "top-k"}


@dataclasses.dataclass(frozen=True)
class QualitySetting:
    """One evaluated configuration; sparsity 0 is the dense model."""

    label: str
    sparsity: float = 0.0
    policy: str = "threshold"
    prediction: PredictionConfig | None = None
    op_sparsity: tuple[float, ...] | None = None  # a per-op allocation instead of `sparsity`

    @property
    def dense(self) -> bool:
        return self.sparsity == 0 and self.op_sparsity is None


@dataclasses.dataclass
class QualityRow:
    label: str
    sparsity: float
    policy: str
    prediction: dict[str, Any] | None
    ppl: float
    ppl_stderr: float
    ppl_increase_pct: float  # relative to dense on the same windows
    kl_mean: float  # mean KL(P_dense || P_setting), nats per token
    top1_agreement: float  # share of positions where the argmax equals dense's
    kept_fraction: dict[str, float] | None  # mean share of input channels active, per op group
    seconds: float


@dataclasses.dataclass
class QualityReport:
    rows: list[QualityRow]
    text: str
    ctx: int
    windows: int
    scored_tokens: int
    reference: str | None = None  # store of the reference model when it is not the evaluated one
    reference_ppl: float | None = None

    def table(self) -> str:
        lines = ["| setting | sparsity | PPL | vs dense | KL(dense‖·) | top-1 agree | kept qkv/o/gate_up/down |",
                 "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            kept = "/".join(f"{r.kept_fraction[g]:.2f}" for g in OP_GROUPS) if r.kept_fraction else "1"
            lines.append(f"| {r.label} | {r.sparsity:.0%} | {r.ppl:.3f} ± {r.ppl_stderr:.2f} | "
                         f"{r.ppl_increase_pct:+.1f}% | {r.kl_mean:.4f} | {r.top1_agreement:.3f} | {kept} |")
        return "\n".join(lines)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def token_kl(reference_logp: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """KL(reference || other) per token [T] from log-probabilities [T, V]."""
    return (np.exp(reference_logp) * (reference_logp - logp)).sum(axis=-1)


@functools.partial(jax.jit, static_argnames=("k", "policy"))
def _kept_share(x: jax.Array, thresholds: jax.Array, *, k: int, policy: str) -> jax.Array:
    """Mean share of active channels per layer: x [L, T, d], thresholds [L] -> [L]."""
    return jax.vmap(lambda xl, tl: jnp.mean(active_mask(xl, k, tl, policy)))(x, thresholds)


def kept_fraction(engine, window: np.ndarray) -> dict[str, float] | None:
    """Mean share of channels the current sparse setting keeps per op group (sparse layers only)."""
    sp = engine.sparsity
    if sp is None:
        return None
    cfg = engine.config
    thresholds = engine._thresholds
    if thresholds is None:
        thresholds = jnp.zeros((cfg.num_layers, len(OP_GROUPS)), jnp.float32)
    _, taps = forward_with_taps(engine.params, jnp.asarray(window), engine._thresholds, cfg=cfg, sparse=sp)
    ks = sp.ks(cfg)
    out = {}
    for g, name in enumerate(OP_GROUPS):
        share = np.asarray(_kept_share(taps[name], thresholds[:, g], k=ks[g], policy=sp.policy))
        out[name] = float(share[sp.dense_layers:].mean()) if sp.dense_layers < cfg.num_layers else 1.0
    return out


def evaluate_quality(engine, text_path: str | os.PathLike, settings: list[QualitySetting], *, ctx: int = 512,
                     max_windows: int | None = 16, progress: bool = False, reference=None) -> QualityReport:
    """Evaluates `settings` against the dense model on the first `max_windows` windows.

    reference: another engine whose dense logits are the yardstick instead of this engine's own
    (a distilled model against its teacher: KL and agreement to the *original* dense model, and
    "vs dense" relative to the teacher's perplexity). It must share the tokenizer's vocabulary."""
    if reference is not None and (reference.config.vocab_size != engine.config.vocab_size
                                  or reference.tokenizer.encode("Hello world") != engine.tokenizer.encode("Hello world")):
        raise InvalidArgumentError("the reference model has another tokenizer; KL and agreement need the same vocabulary")
    tokens, bos = engine_tokens(engine, text_path, ctx)
    windows = eval_windows(tokens, ctx=ctx, max_windows=max_windows, bos_id=bos)
    scored = scored_slice(ctx)
    sums = {s.label: {"nll": [], "kl": 0.0, "agree": 0, "seconds": 0.0} for s in settings}
    kept: dict[str, Any] = {}
    levels: dict[str, float] = {}  # the sparsity each setting ran at (an allocation's byte mean)
    iterator = windows
    if progress:
        from tqdm import tqdm

        iterator = tqdm(windows, desc="quality", unit="window")
    yardstick = engine if reference is None else reference  # whose dense logits the settings are judged by
    reference_nll = []
    with engine.sparsity_scope():
        for wi, window in enumerate(iterator):
            targets = window[scored.start + 1:ctx]
            with yardstick.sparsity_scope():
                yardstick.configure_sparsity(None)
                dense = yardstick.logits(window)[scored]
            reference_nll.append(token_nll(dense, targets))
            dense_logp = _log_softmax(dense)
            for s in settings:
                t0 = time.perf_counter()
                _configure(engine, s)
                own_dense = s.dense and s.prediction is None and reference is None
                logits = dense if own_dense else engine.logits(window)[scored]
                acc = sums[s.label]
                acc["nll"].append(token_nll(logits, targets))
                logp = _log_softmax(logits)
                acc["kl"] += float(token_kl(dense_logp, logp).sum())
                acc["agree"] += int((logits.argmax(-1) == dense.argmax(-1)).sum())
                if wi == 0:
                    kept[s.label] = kept_fraction(engine, window)
                    levels[s.label] = engine.sparsity.sparsity if engine.sparsity is not None else 0.0
                acc["seconds"] += time.perf_counter() - t0
    n = len(windows) * (scored.stop - scored.start)
    dense_nll = float(np.concatenate(reference_nll).mean()) if reference is not None else None
    rows = []
    for s in settings:
        acc = sums[s.label]
        nll = np.concatenate(acc["nll"])
        mean = float(nll.mean())
        if dense_nll is None and s.dense and s.prediction is None:
            dense_nll = mean
        ppl = math.exp(mean)
        rows.append(QualityRow(
            label=s.label, sparsity=levels.get(s.label, s.sparsity), policy=s.policy,
            prediction=dataclasses.asdict(s.prediction) if s.prediction else None,
            ppl=ppl, ppl_stderr=ppl * float(nll.std(ddof=1) / math.sqrt(len(nll))),
            ppl_increase_pct=0.0, kl_mean=acc["kl"] / n, top1_agreement=acc["agree"] / n,
            kept_fraction=kept.get(s.label), seconds=acc["seconds"],
        ))
    if dense_nll is not None:
        for r in rows:
            r.ppl_increase_pct = 100.0 * (r.ppl / math.exp(dense_nll) - 1.0)
    return QualityReport(rows=rows, text=os.path.basename(os.fspath(text_path)), ctx=ctx, windows=len(windows),
                         scored_tokens=n, reference=getattr(reference, "store_path", None),
                         reference_ppl=math.exp(dense_nll) if reference is not None else None)


class WindowKL:
    """Mean KL(dense || the engine as configured now) on fixed windows of a text: the objective of
    searches that score many settings or weights on one engine (sparse/allocate.py, the merge of
    distill/train.py). The dense log-probabilities are computed once, at construction."""

    def __init__(self, engine, text_path: str | os.PathLike, *, ctx: int, windows: int | None):
        tokens, bos = engine_tokens(engine, text_path, ctx)
        self.windows = eval_windows(tokens, ctx=ctx, max_windows=windows, bos_id=bos)
        self.scored = scored_slice(ctx)
        with engine.sparsity_scope():
            engine.configure_sparsity(None)
            self.reference = [_log_softmax(engine.logits(w)[self.scored]) for w in self.windows]

    def __call__(self, engine) -> float:
        total = 0.0
        for window, reference in zip(self.windows, self.reference):
            total += float(token_kl(reference, _log_softmax(engine.logits(window)[self.scored])).mean())
        return total / len(self.windows)


def _configure(engine, s: QualitySetting) -> None:
    if s.op_sparsity is not None:
        engine.configure_sparsity(None, policy=s.policy, prediction=s.prediction, op_sparsity=s.op_sparsity)
    elif s.sparsity == 0:
        engine.configure_sparsity(None)
    else:
        engine.configure_sparsity(s.sparsity, policy=s.policy, prediction=s.prediction)


def default_settings(sparsities=(0.3, 0.4, 0.5, 0.6, 0.7), policies=("threshold",),
                     prediction: PredictionConfig | None = None,
                     op_sparsity: tuple[float, ...] | None = None) -> list[QualitySetting]:
    """Dense, then each sparsity for each policy ("threshold" is TEAL), then with predicted sets,
    then (op_sparsity, a parsed per-op allocation) each policy with that allocation."""
    settings = [QualitySetting("dense")]
    for p in policies:
        for s in sparsities:
            settings.append(QualitySetting(f"{POLICY_NAMES[p]} {s:.0%}", s, p))
    if prediction is not None:
        for s in sparsities:
            settings.append(QualitySetting(f"{POLICY_NAMES[policies[0]]} {s:.0%} predicted", s, policies[0], prediction))
    if op_sparsity is not None:
        settings += [QualitySetting(f"{POLICY_NAMES[p]} allocated", policy=p, op_sparsity=op_sparsity)
                     for p in policies]
    return settings


def perturbation_spread(engine, text_path: str | os.PathLike, setting: QualitySetting, *, seeds: int = 4,
                        eps: float = 1e-6, ctx: int = 512, max_windows: int | None = 16,
                        progress: bool = False) -> dict[str, Any]:
    """How much of a setting's perplexity is numerical luck: its PPL with the weights as stored,
    then with the input embedding (and a tied head) multiplied by 1 + eps * N(0, 1), one draw
    per seed. eps = 1e-6 is ~16 float32 ulps: the size of the difference a reordered sum makes.

    A dense model barely moves. A top-k or thresholded one is a discontinuous function: a change
    in the last bits flips channels that sit at the cut, and the flips cascade through the layers,
    so its PPL moves by about as much as a different draw of the selection near the cut would."""
    if engine.swap is not None:
        raise InvalidArgumentError("perturbation_spread needs the weights in DRAM; load without dram_budget")
    if not isinstance(seeds, int) or seeds < 1:
        raise InvalidArgumentError(f"seeds must be an int >= 1, got {seeds!r}")
    if not (eps > 0 and math.isfinite(eps)):
        raise InvalidArgumentError(f"eps must be a positive number, got {eps!r}")
    original = engine.params["embed"]
    if isinstance(original, Q8Table):
        raise InvalidArgumentError("the embedding is held as Q8_0 blocks; load the engine with q8_embedding=False")

    if isinstance(original, QRows):
        raise InvalidArgumentError("the embedding is held quantized (a q8/q4 store); perturb an f32 or f16 store")
    tokens, bos = engine_tokens(engine, text_path, ctx)
    ppls = []
    try:
        with engine.sparsity_scope():
            _configure(engine, setting)
            for seed in [None, *range(seeds)]:
                engine.params["embed"] = original if seed is None else original * (
                    1 + eps * jax.random.normal(jax.random.key(seed), original.shape, original.dtype))
                ppls.append(perplexity(engine.logits, tokens, ctx=ctx, max_windows=max_windows, bos_id=bos,
                                       progress=progress).ppl)
    finally:
        engine.params["embed"] = original
    perturbed = np.asarray(ppls[1:])
    return {"label": setting.label, "eps": eps, "seeds": seeds, "ppl": ppls[0], "perturbed": perturbed.tolist(),
            "mean": float(perturbed.mean()), "std": float(perturbed.std(ddof=1)) if seeds > 1 else 0.0,
            "min": float(perturbed.min()), "max": float(perturbed.max())}


__all__ = ["QualitySetting", "QualityRow", "QualityReport", "evaluate_quality", "default_settings",
           "perturbation_spread", "WindowKL", "SparsityConfig"]
