"""Teacher-generated distillation text: the dense model writes continuations of many prompts,
B sequences at a time.

Distillation must never see the evaluation text, and only package registries are reachable, so
the data comes from the teacher itself (as in the ActiveFlow paper's code). One sequence at a
time the engine decodes ~35 tok/s on the 2-core reference machine; a batch of B sequences reads
each weight once per step for all of them, which is what makes a corpus of 10^5 tokens cheap.

One jitted program per (batch, prompt bucket, new tokens): a vmapped prefill of the right-padded
prompts, then a `fori_loop` of vmapped one-token steps, each sequence at its own position.
Sampling is temperature plus min-p (keep tokens whose probability is at least `min_p` times the
most likely one's): unlike top-p it needs no sort over the vocabulary, which on XLA:CPU would
cost more than the step itself at this batch size.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from activeflow_jax.buckets import MIN_PREFILL_BUCKET, _pow2_at_least
from activeflow_jax.errors import InvalidArgumentError, PromptTooLongError
from activeflow_jax.models import llama


@functools.lru_cache(maxsize=8)
def _program(cfg, batch: int, prompt_bucket: int, new_tokens: int):
    cache_len = _pow2_at_least(prompt_bucket + new_tokens, 16)
    fwd = functools.partial(llama.forward, cfg=cfg, sparse=None, predict=None)

    def run(params, prompts, prompt_len, key, temperature, min_p):
        empty = llama.KVCache.zeros(cfg, cache_len)

        def prefill(tokens, n):
            return fwd(params, empty, tokens, 0, n, None, attn_len=prompt_bucket, all_logits=False)

        logits, caches = jax.vmap(prefill)(prompts, prompt_len)  # [B, 1, V]

        def sample(logits, key):  # [B, V] -> [B]
            scaled = logits / temperature
            keep = scaled >= jnp.max(scaled, axis=-1, keepdims=True) + jnp.log(min_p)
            return jax.random.categorical(key, jnp.where(keep, scaled, -jnp.inf), axis=-1).astype(jnp.int32)

        def step(i, carry):
            caches, token, out, key = carry
            key, sub = jax.random.split(key)
            out = out.at[:, i].set(token)

            def one(cache, tok, pos):
                return fwd(params, cache, tok[None], pos, 1, None, attn_len=cache_len, all_logits=False)

            logits, caches = jax.vmap(one)(caches, token, prompt_len + i)
            return caches, sample(logits[:, 0], sub), out, key

        key, sub = jax.random.split(key)
        first = sample(logits[:, 0], sub)
        out = jnp.zeros((batch, new_tokens), jnp.int32)
        _, _, out, _ = jax.lax.fori_loop(0, new_tokens, step, (caches, first, out, key))
        return out

    return jax.jit(run)


def generate_batch(engine, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.8,
                   min_p: float = 0.05, seed: int = 0) -> list[list[int]]:
    """Samples up to max_new_tokens after each prompt (token ids) with the engine's dense weights;
    each continuation ends before its first stop token. Returns one list of ids per prompt."""
    if not prompts:
        raise InvalidArgumentError("no prompts to continue")
    if not (temperature > 0 and 0 < min_p < 1):
        raise InvalidArgumentError(f"need temperature > 0 and 0 < min_p < 1, got {temperature!r}, {min_p!r}")
    prompts = [engine._validate_ids(p) for p in prompts]
    lengths = [len(p) for p in prompts]
    if min(lengths) < 1:
        raise InvalidArgumentError("every prompt needs at least one token")
    bucket = _pow2_at_least(max(lengths), MIN_PREFILL_BUCKET)
    if bucket + max_new_tokens > engine.config.max_context:
        raise PromptTooLongError(f"prompts of up to {max(lengths)} tokens plus {max_new_tokens} new tokens exceed "
                                 f"the model's context of {engine.config.max_context}")
    padded = np.zeros((len(prompts), bucket), np.int32)
    for i, p in enumerate(prompts):
        padded[i, :len(p)] = p
    program = _program(engine.config, len(prompts), bucket, max_new_tokens)
    out = np.asarray(program(engine.params, jnp.asarray(padded), jnp.asarray(lengths, jnp.int32),
                             jax.random.key(seed), jnp.float32(temperature), jnp.float32(min_p)))
    stops = engine.tokenizer.stop_ids if engine.tokenizer else frozenset()
    result = []
    for row in out.tolist():
        end = next((j for j, t in enumerate(row) if t in stops), len(row))
        result.append(row[:end])
    return result
