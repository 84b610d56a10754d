"""Log-likelihood of continuations with the context's KV cache computed once and reused.

A multiple-choice item is one context and C continuations (its choices). The naive way runs
context + choice as C separate sequences, so the context is evaluated C times. Here the
context is prefilled once and its KV cache is the starting point of every choice:

    one compiled program per shape bucket (B items, context bucket Tc, C choices, choice bucket Tk):
      1. prefill the B contexts (vmapped, right-padded to Tc) into B KV caches, keeping each
         context's last logits (they predict the first token of every choice);
      2. run the C choices of each item from its context cache (vmapped over items and choices;
         the cache is shared by reading it, never by copying it on the host), all logits;
      3. log-softmax in the program and gather the log-prob of each choice token, so only
         [B, C, Tk] floats leave it, never [.., vocab] logits.

Both passes call `llama.forward`, the engine's own forward (the same sparse settings apply), so
the result equals full-sequence scoring up to float32 rounding. Padding is harmless: context
padding sits at positions the choices overwrite (and the causal mask hides), choice padding only
follows the real tokens. Requests are sorted by length and batched up to a token budget, so a
run compiles a few dozen programs at most, not one per item.
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from activeflow_jax.buckets import MIN_PREFILL_BUCKET, _pow2_at_least
from activeflow_jax.errors import InvalidArgumentError, PromptTooLongError
from activeflow_jax.eval.perplexity import token_nll
from activeflow_jax.models import llama
from activeflow_jax.runtime.budget import peak_rss_bytes

MIN_CONTEXT_BUCKET = MIN_PREFILL_BUCKET
MIN_CHOICE_BUCKET = 4  # >= 2: one-token decode kernels (gather, native FFI) never run under vmap
DEFAULT_TOKEN_BUDGET = 1024  # padded tokens per program call (contexts + choices)
MAX_ITEMS_PER_CALL = 32

# engine -> {shape key: compiled program}; kept apart from the engine's own program cache
_PROGRAMS: weakref.WeakKeyDictionary[object, dict] = weakref.WeakKeyDictionary()

Request = tuple[Sequence[int], Sequence[Sequence[int]]]  # (context ids, [continuation ids, ...])


def validate_requests(engine, requests: Sequence[Request]) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Checks ids and lengths; returns numpy int32 copies."""
    out = []
    ctx_limit = engine.config.max_context
    for i, (context, continuations) in enumerate(requests):
        ctx = engine._validate_ids(context)
        if len(ctx) == 0:
            raise InvalidArgumentError(f"request {i}: the context is empty; give at least one token (e.g. BOS)")
        if isinstance(continuations, np.ndarray) and continuations.ndim == 1:
            raise InvalidArgumentError(f"request {i}: continuations must be a list of token-id sequences")
        conts = [engine._validate_ids(c) for c in continuations]
        if not conts:
            raise InvalidArgumentError(f"request {i}: no continuations to score")
        for j, c in enumerate(conts):
            if len(c) == 0:
                raise InvalidArgumentError(f"request {i}: continuation {j} is empty")
            if len(ctx) + len(c) > ctx_limit:
                raise PromptTooLongError(
                    f"request {i}: context of {len(ctx)} tokens plus continuation {j} of {len(c)} tokens exceeds "
                    f"the model's context window of {ctx_limit} tokens")
        out.append((ctx, conts))
    return out


def _program(engine, b: int, tc: int, c: int, tk: int):
    cfg, sparse, predict = engine.config, engine.sparsity, engine.prediction
    cache_len = _pow2_at_least(tc + tk, MIN_CONTEXT_BUCKET)  # every choice fits after any context
    key = (b, tc, c, tk, cache_len, sparse, predict)
    programs = _PROGRAMS.setdefault(engine, {})
    compiled = programs.get(key)
    if compiled is not None:
        return compiled
    fwd = functools.partial(llama.forward, cfg=cfg, attn_len=cache_len, sparse=sparse, predict=predict)

    def run(params, thresholds, ctx_tokens, ctx_len, cont_tokens):
        empty = llama.KVCache.zeros(cfg, cache_len)

        def prefill(tokens, n):  # -> last logits [1, V], cache of this context
            return fwd(params, empty, tokens, 0, n, thresholds, all_logits=False)

        last, caches = jax.vmap(prefill)(ctx_tokens, ctx_len)  # [B, 1, V], leaves [B, L, kv, hd]

        def item(cache, start, tokens):  # tokens [C, Tk] -> logits [C, Tk, V]
            def choice(t):
                return fwd(params, cache, t, start, tk, thresholds, all_logits=True)[0]
            return jax.vmap(choice)(tokens)

        logits = jax.vmap(item)(caches, ctx_len, cont_tokens)  # [B, C, Tk, V]
        first = jnp.broadcast_to(last[:, None], (b, c, 1, last.shape[-1]))
        pred = jnp.concatenate([first, logits[:, :, :-1]], axis=2)  # row j predicts choice token j
        logp = jax.nn.log_softmax(pred.astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(logp, cont_tokens[..., None], axis=-1)[..., 0]

    args = _abstract_args(engine, b, tc, c, tk)
    t0 = time.perf_counter()
    compiled = jax.jit(run).lower(*args).compile()
    engine.stats.compile_seconds += time.perf_counter() - t0
    engine.stats.compiles += 1
    programs[key] = compiled
    return compiled


def _abstract_args(engine, b, tc, c, tk):
    i32 = jnp.int32
    return (engine.params, engine._thresholds, jax.ShapeDtypeStruct((b, tc), i32), jax.ShapeDtypeStruct((b,), i32),
            jax.ShapeDtypeStruct((b, c, tk), i32))


def _plan(requests, token_budget: int, max_items: int) -> list[tuple[tuple[int, int, int, int], list[int]]]:
    """Cuts the requests into program calls: ((B, Tc, C, Tk), request indices).

    Requests are sorted by (choices, choice bucket, context bucket), longest first, and taken
    in order while the call stays within `token_budget` padded tokens, so neighbours of similar
    length share a call; B is a power of two (full calls) or the next power of two above the
    rest of a run of equal choice counts (padded with dummy rows)."""
    keys = []
    for ctx, conts in requests:
        keys.append((len(conts), _pow2_at_least(max(len(x) for x in conts), MIN_CHOICE_BUCKET),
                     _pow2_at_least(len(ctx), MIN_CONTEXT_BUCKET)))
    order = sorted(range(len(requests)), key=lambda i: keys[i], reverse=True)
    plan = []
    pos = 0
    while pos < len(order):
        c, tk, tc = keys[order[pos]]
        take = 1
        while pos + take < len(order) and take < max_items:
            c_next, _, tc_next = keys[order[pos + take]]
            if c_next != c or (take + 1) * (max(tc, tc_next) + c * tk) > token_budget:
                break
            tc = max(tc, tc_next)
            take += 1
        end_of_run = pos + take == len(order) or keys[order[pos + take]][0] != c
        if not end_of_run:
            take = 1 << (take.bit_length() - 1)  # full calls: a power of two
        idx = order[pos:pos + take]
        tc = max(keys[i][2] for i in idx)
        plan.append(((_pow2_at_least(take, 1), tc, c, tk), idx))
        pos += take
    return plan


def score_requests(engine, requests: Sequence[Request], *, token_budget: int = DEFAULT_TOKEN_BUDGET,
                   max_items: int = MAX_ITEMS_PER_CALL) -> list[list[np.ndarray]]:
    """Per-token log-probs of every continuation of every request, the context evaluated once
    per request: a list (per request) of lists (per continuation) of float64 arrays."""
    if engine.swap is not None:
        # under a DRAM budget the weights are not one pytree a batched program could take: each
        # sequence goes through the swapping runtime (same function, no context reuse)
        return score_naive(engine, requests)
    reqs = validate_requests(engine, requests)
    if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1:
        raise InvalidArgumentError(f"token_budget must be an int >= 1, got {token_budget!r}")
    results: list = [None] * len(reqs)
    with engine._lock:
        for (b, tc, c, tk), idx in _plan(reqs, token_budget, max_items):
            ctx_tokens = np.zeros((b, tc), np.int32)
            ctx_len = np.ones(b, np.int32)
            cont_tokens = np.zeros((b, c, tk), np.int32)
            for row, i in enumerate(idx):
                ctx, conts = reqs[i]
                ctx_tokens[row, :len(ctx)] = ctx
                ctx_len[row] = len(ctx)
                for j, cont in enumerate(conts):
                    cont_tokens[row, j, :len(cont)] = cont
            program = _program(engine, b, tc, c, tk)
            t0 = time.perf_counter()
            logp = program(engine.params, engine._thresholds, jnp.asarray(ctx_tokens), jnp.asarray(ctx_len),
                           jnp.asarray(cont_tokens))
            logp = np.asarray(logp, np.float64)
            engine.stats.prefill_tokens += sum(len(reqs[i][0]) + sum(len(x) for x in reqs[i][1]) for i in idx)
            engine.stats.prefill_seconds += time.perf_counter() - t0
            for row, i in enumerate(idx):
                results[i] = [logp[row, j, :len(cont)] for j, cont in enumerate(reqs[i][1])]
        engine.stats.peak_rss_bytes = peak_rss_bytes()
    return results


def score_naive(engine, requests: Sequence[Request]) -> list[list[np.ndarray]]:
    """The reference (and the speed baseline): each context + continuation as its own sequence
    through `engine.logits`, log-softmax on the host."""
    reqs = validate_requests(engine, requests)
    out = []
    for ctx, conts in reqs:
        row = []
        for cont in conts:
            full = np.concatenate([ctx, cont])
            logits = engine.logits(full)[len(ctx) - 1:len(full) - 1]
            row.append(-token_nll(logits, cont))
        out.append(row)
    return out
