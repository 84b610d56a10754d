"""Perplexity with llama.cpp's protocol, so our figures compare with `llama-perplexity`.

Protocol: tokenize the whole file as-is (bytes decoded as UTF-8, line endings kept; BOS only if
the tokenizer adds one), cut it into consecutive windows of `ctx` tokens (a partial last window
is dropped), evaluate each window from an empty cache, and score only the second half: the
logits at positions ctx/2 .. ctx-2 predicting tokens ctx/2+1 .. ctx-1 (ctx/2 - 1 tokens per
window), so every scored token sees at least ctx/2 tokens of context. PPL = exp(mean NLL).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from activeflow_jax.errors import InvalidArgumentError


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll_mean: float
    windows: int
    scored_tokens: int
    ctx: int
    file_tokens: int
    seconds: float
    ppl_stderr: float  # delta-method standard error of the PPL over scored tokens


def read_text(path: str | os.PathLike) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError(f"{path} is not UTF-8 text ({exc})") from None


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target under float32 logits (computed in float64)."""
    logits = logits.astype(np.float64)
    peak = logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[:, 0]
    return log_z - logits[np.arange(len(targets)), targets]


def eval_windows(tokens: Sequence[int], *, ctx: int, max_windows: int | None, bos_id: int | None) -> list[np.ndarray]:
    """The protocol's windows: consecutive, `ctx` tokens each, first token replaced by BOS if the
    tokenizer adds one. Validates ctx and max_windows."""
    if ctx < 4 or ctx % 2:
        raise InvalidArgumentError(f"ctx must be an even number >= 4, got {ctx}")
    tokens = np.asarray(tokens, np.int32)
    windows = len(tokens) // ctx
    if max_windows is not None:
        if max_windows < 1:
            raise InvalidArgumentError(f"max_windows must be >= 1, got {max_windows}")
        windows = min(windows, max_windows)
    if windows == 0:
        raise InvalidArgumentError(f"the text has {len(tokens)} tokens, fewer than one window of {ctx}")
    out = []
    for w in range(windows):
        window = tokens[w * ctx:(w + 1) * ctx].copy()
        if bos_id is not None:
            window[0] = bos_id
        out.append(window)
    return out


def scored_slice(ctx: int) -> slice:
    """Positions whose logits are scored (they predict the token after them)."""
    return slice(ctx // 2, ctx - 1)


def engine_tokens(engine, path: str | os.PathLike, ctx: int) -> tuple[list[int], int | None]:
    """(token ids of a text file, BOS id to put first in each window or None)."""
    if engine.tokenizer is None:
        raise InvalidArgumentError("the store has no tokenizer; cannot evaluate text")
    if ctx > engine.config.max_context:
        raise InvalidArgumentError(f"ctx={ctx} exceeds the model's context of {engine.config.max_context}")
    tokens = engine.tokenizer.encode(read_text(path))
    return tokens, (engine.tokenizer.bos_id if engine.tokenizer.add_bos else None)


def perplexity(logits_fn: Callable[[np.ndarray], np.ndarray], tokens: Sequence[int], *, ctx: int = 512,
               max_windows: int | None = None, bos_id: int | None = None,
               progress: bool = False) -> PerplexityResult:
    """`logits_fn(window_ids) -> [ctx, V]` float32; see the module docstring for the protocol."""
    windows = eval_windows(tokens, ctx=ctx, max_windows=max_windows, bos_id=bos_id)
    scored = scored_slice(ctx)
    nlls = []
    start = time.perf_counter()
    iterator = windows
    if progress:
        from tqdm import tqdm

        iterator = tqdm(windows, desc="perplexity", unit="window")
    for window in iterator:
        logits = logits_fn(window)
        nlls.append(token_nll(logits[scored], window[scored.start + 1:ctx]))
        if progress:
            iterator.set_postfix(ppl=f"{math.exp(np.concatenate(nlls).mean()):.3f}")
    nll = np.concatenate(nlls)
    mean = float(nll.mean())
    stderr = float(nll.std(ddof=1) / math.sqrt(len(nll))) if len(nll) > 1 else 0.0
    return PerplexityResult(ppl=math.exp(mean), nll_mean=mean, windows=len(windows), scored_tokens=len(nll), ctx=ctx,
                            file_tokens=len(tokens), seconds=time.perf_counter() - start,
                            ppl_stderr=math.exp(mean) * stderr)


def engine_perplexity(engine, path: str | os.PathLike, *, ctx: int = 512, max_windows: int | None = None,
                      progress: bool = False) -> PerplexityResult:
    """Perplexity of a text file under an Engine (see module docstring for the protocol)."""
    tokens, bos = engine_tokens(engine, path, ctx)
    return perplexity(engine.logits, tokens, ctx=ctx, max_windows=max_windows, bos_id=bos, progress=progress)
