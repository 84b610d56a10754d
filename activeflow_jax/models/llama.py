"""Llama-family decoder as Flax NNX modules; the dense forward is the reference path.

NNX defines the model (parameter names and shapes live here and nowhere else). The hot loop
runs on plain pytrees: `split_params` turns a module into (graphdef, pure dict of arrays) and
`forward` (module level, `jax.jit`) merges them inside the trace, so a call costs a dict
flatten rather than NNX's per-call graph traversal.

Weights are [in, out] (one row per input channel) so that the sparse path of later layers can
select rows. q/k use the Hugging Face (rotate-half) RoPE layout; see formats/gguf_import.py.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from activeflow_jax.config import ModelConfig

Params = dict[str, Any]  # nested pure dict of arrays, as produced by nnx.to_pure_dict


class KVCache(NamedTuple):
    """Per-layer key/value buffers, [max_len, num_kv_heads, head_dim] each; donated between steps.

    Sequence-major, so appending a token writes one contiguous row and the filled prefix
    `[:attn_len]` is a contiguous slice."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[0]

    @classmethod
    def zeros(cls, cfg: ModelConfig, max_len: int) -> "KVCache":
        shape = (max_len, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            k=tuple(jnp.zeros(shape, jnp.float32) for _ in range(cfg.num_layers)),
            v=tuple(jnp.zeros(shape, jnp.float32) for _ in range(cfg.num_layers)),
        )

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], scale: float) -> nnx.Param:
    return nnx.Param(scale * jax.random.normal(rngs.params(), shape, jnp.float32))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        variance = jnp.mean(x * x, axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(variance + self.eps) * self.weight[...]


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate-half RoPE. x: [T, heads, head_dim], positions: [T]."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(0, half, dtype=jnp.float32) / half)  # [half]
    angles = positions.astype(jnp.float32)[:, None, None] * inv_freq  # [T, 1, half]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nnx.Module):
    """GQA attention. q/k/v share one input, so their weights are one [d, q+2kv] matrix whose
    row j holds everything input channel j touches (one row read per channel when streaming)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, s = cfg.d_model, cfg.d_model**-0.5
        self.wqkv = _param(rngs, (d, cfg.q_dim + 2 * cfg.kv_dim), s)  # [d, H*hd + 2*KV*hd]
        self.wo = _param(rngs, (cfg.q_dim, d), cfg.q_dim**-0.5)  # [H*hd, d]
        self.cfg = cfg

    def __call__(self, x, k_cache, v_cache, start_pos, mask_bias, *, attn_len: int):
        """x: [T, d] normed input. Writes K/V at [start_pos, start_pos+T) and attends over the
        first `attn_len` cache positions only (cost follows the filled length, not the buffer).
        mask_bias: [T, attn_len] additive causal mask, shared by all layers."""
        cfg = self.cfg
        t = x.shape[0]
        positions = start_pos + jnp.arange(t)
        qkv = x @ self.wqkv[...]
        q = qkv[:, :cfg.q_dim].reshape(t, cfg.num_heads, cfg.head_dim)
        k = qkv[:, cfg.q_dim:cfg.q_dim + cfg.kv_dim].reshape(t, cfg.num_kv_heads, cfg.head_dim)
        v = qkv[:, cfg.q_dim + cfg.kv_dim:].reshape(t, cfg.num_kv_heads, cfg.head_dim)
        q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k, (start_pos, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v, (start_pos, 0, 0))
        keys, values = k_cache[:attn_len], v_cache[:attn_len]  # [S, KV, hd]
        group = cfg.num_heads // cfg.num_kv_heads
        q = q.reshape(t, cfg.num_kv_heads, group, cfg.head_dim) * cfg.head_dim**-0.5
        scores = jnp.einsum("tkgd,skd->tkgs", q, keys) + mask_bias[:, None, None, :]
        probs = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
        probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
        out = jnp.einsum("tkgs,skd->tkgd", probs, values).reshape(t, cfg.q_dim)
        return out @ self.wo[...], k_cache, v_cache


class MLP(nnx.Module):
    """SwiGLU. gate/up share one input: one [d, 2*ff] matrix, gate columns first."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        self.w_gate_up = _param(rngs, (d, 2 * f), d**-0.5)  # [d, 2*ff]
        self.w_down = _param(rngs, (f, d), f**-0.5)  # [ff, d]

    def __call__(self, x):
        gate_up = x @ self.w_gate_up[...]
        f = gate_up.shape[-1] // 2
        return (jax.nn.silu(gate_up[:, :f]) * gate_up[:, f:]) @ self.w_down[...]


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, k_cache, v_cache, start_pos, mask_bias, *, attn_len: int):
        with jax.named_scope("attention"):
            h, k_cache, v_cache = self.attn(self.attn_norm(x), k_cache, v_cache, start_pos, mask_bias,
                                            attn_len=attn_len)
        x = x + h
        with jax.named_scope("mlp"):
            x = x + self.mlp(self.mlp_norm(x))
        return x, k_cache, v_cache


class LlamaModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), 0.25)  # [V, d]
        self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else _param(rngs, (cfg.d_model, cfg.vocab_size), cfg.d_model**-0.5)

    def head(self, x: jax.Array) -> jax.Array:
        """x: [T, d] -> logits [T, V]."""
        x = self.final_norm(x)
        if self.lm_head is None:
            return jnp.einsum("td,vd->tv", x, self.embed[...])
        return x @ self.lm_head[...]

    def __call__(self, tokens, cache: KVCache, start_pos, n_valid, *, attn_len: int, all_logits: bool):
        """tokens: [T] (first n_valid are real) at positions [start_pos, start_pos+T).
        Returns (logits [T, V] if all_logits else [1, V] for the last real token, new cache)."""
        x = jnp.take(self.embed[...], tokens, axis=0)  # [T, d]
        positions = start_pos + jnp.arange(tokens.shape[0])
        mask_bias = jnp.where(jnp.arange(attn_len)[None, :] <= positions[:, None], 0.0, -1e30)  # [T, S]
        ks, vs = list(cache.k), list(cache.v)
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer{i}"):
                x, ks[i], vs[i] = layer(x, ks[i], vs[i], start_pos, mask_bias, attn_len=attn_len)
        if not all_logits:
            x = jax.lax.dynamic_slice_in_dim(x, n_valid - 1, 1, axis=0)
        return self.head(x), KVCache(tuple(ks), tuple(vs))


# ---------------------------------------------------------------------------------------------
# Plain-pytree interface used by the engine's hot loop.


@functools.lru_cache(maxsize=16)
def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, abstract state) of a model without allocating its weights."""
    return nnx.split(nnx.eval_shape(lambda: LlamaModel(cfg, nnx.Rngs(0))))


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Flat 'layers.3.attn.wq'-style names -> shapes; the single source of truth for shapes."""
    _, state = abstract_model(cfg)
    flat = nnx.to_flat_state(state)
    return {".".join(str(p) for p in path): tuple(var.shape) for path, var in flat}


def init_params(cfg: ModelConfig, seed: int = 0) -> Params:
    """Random parameters (tests and synthetic models)."""
    _, state = nnx.split(LlamaModel(cfg, nnx.Rngs(seed)))
    return nnx.to_pure_dict(state)


def params_from_flat(cfg: ModelConfig, flat: dict[str, np.ndarray | jax.Array]) -> Params:
    """Nests a flat {name: array} dict (store names) into the pure-dict pytree of the model."""
    shapes = param_shapes(cfg)
    missing = sorted(set(shapes) - set(flat))
    if missing:
        raise KeyError(f"missing parameters: {missing[:5]}{'...' if len(missing) > 5 else ''}")
    nested: Params = {}
    for name, shape in shapes.items():
        arr = flat[name]
        if tuple(arr.shape) != shape:
            raise ValueError(f"parameter {name} has shape {tuple(arr.shape)}, expected {shape}")
        node = nested
        *parents, leaf = [int(p) if p.isdigit() else p for p in name.split(".")]
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = arr
    return nested


def flatten_params(params: Params, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_params(value, name + "."))
        else:
            out[name] = value
    return out


@functools.partial(jax.jit, static_argnames=("cfg", "attn_len", "all_logits"), donate_argnames=("cache",))
def forward(params: Params, cache: KVCache, tokens, start_pos, n_valid, *, cfg: ModelConfig, attn_len: int,
            all_logits: bool):
    """One chunk of tokens through the model (prefill when T > 1, decode when T == 1)."""
    graphdef, abstract_state = abstract_model(cfg)
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state)
    return model(tokens, cache, start_pos, n_valid, attn_len=attn_len, all_logits=all_logits)
