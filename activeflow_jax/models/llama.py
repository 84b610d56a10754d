"""The decoder of every model family, as Flax NNX modules; the dense forward is the reference path.

Llama is the base; the fields of `ModelConfig` that models/families.py sets per family switch on
what others add (GeGLU, q/k norms, post-norms, q/k/v biases, sliding-window layers with their own
RoPE base, RoPE scaling, embedding scale, soft-capping). The native one-token kernels run only
where `families.native_attention_ok` says they compute the same thing.

NNX defines the model's parameters (names, shapes and initialization live here and nowhere else);
the maths runs on their pure dict (`model_forward`, `layer_forward`), so a call costs a dict
flatten rather than NNX's per-call graph traversal, and the DRAM-budget runtime runs the same
layer function with its weights coming from slot pools instead of the dict.

Weights are [in, out] (one row per input channel) so that the sparse path of later layers can
select rows. q/k use the Hugging Face (rotate-half) RoPE layout; see formats/gguf_import.py.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from activeflow_jax.config import OP_GROUPS, ModelConfig, PredictionConfig, SparsityConfig
from activeflow_jax.models.embedding import as_f32, lookup
from activeflow_jax.models.families import native_attention_ok
from activeflow_jax.quant import QRows
from activeflow_jax.quant import matmul as quant_matmul
from activeflow_jax.sparse import native as native_lib
from activeflow_jax.sparse.kernels import sparse_linear
from activeflow_jax.sparse.predictor import prediction_score, top_mask

Params = dict[str, Any]  # nested pure dict of arrays, as produced by nnx.to_pure_dict


class KVCache(NamedTuple):
    """Per-layer key/value buffers, [num_kv_heads, max_len, head_dim] each; donated between steps.

    Head-major: the attention products are batched over KV heads, and with this layout XLA:CPU
    feeds them straight from the cache. A sequence-major cache made it copy both whole caches into
    transposed temporaries in every layer of every step (cost growing with the context)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    @classmethod
    def zeros(cls, cfg: ModelConfig, max_len: int) -> "KVCache":
        shape = (cfg.num_kv_heads, max_len, cfg.head_dim)
        return cls(
            k=tuple(jnp.zeros(shape, jnp.float32) for _ in range(cfg.num_layers)),
            v=tuple(jnp.zeros(shape, jnp.float32) for _ in range(cfg.num_layers)),
        )

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v)


class LinearOps:
    """How one layer runs its linear ops: dense, or sparse with per-group k and thresholds
    (optionally restricted to predicted channel sets); can record each op group's input.
    Lives only inside a trace; `DENSE` is the reference path.

    thresholds is the whole [L, 4] table and `layer` the row: the native decode kernel reads its
    threshold from the table itself, which saves a slice program per op (~120 per token)."""

    def __init__(self, sparse: SparsityConfig | None = None, ks: tuple[int, ...] = (),
                 thresholds: jax.Array | None = None, restrict: dict[str, jax.Array] | None = None,
                 taps: dict[str, jax.Array] | None = None, layer: int = 0):
        self.sparse, self.ks, self.thresholds, self.layer = sparse, ks, thresholds, layer
        self.restrict = restrict or {}
        self.taps = taps

    def __call__(self, group: str, x: jax.Array, w: jax.Array) -> jax.Array:
        if self.taps is not None:
            self.taps[group] = x
        if self.sparse is None:
            return quant_matmul(x, w, self.native)  # a QRows weight (quantized store) is widened in the kernel
        g = OP_GROUPS.index(group)
        index = self.layer * len(OP_GROUPS) + g
        return sparse_linear(x, w, k=self.ks[g], threshold=0.0 if self.thresholds is None else self.thresholds,
                             threshold_index=None if self.thresholds is None else index,
                             policy=self.sparse.policy, kernel=self.sparse.kernel,
                             restrict=self.restrict.get(group), straight_through=self.sparse.straight_through)

    native: bool | None = None  # dense products of quantized weights: native kernel (None: where usable)

    def with_native(self, native: bool) -> "LinearOps":
        """This LinearOps with the forward's native choice for dense quantized products."""
        ops = copy.copy(self)
        ops.native = native
        return ops


DENSE = LinearOps()


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], scale: float) -> nnx.Param:
    return nnx.Param(scale * jax.random.normal(rngs.params(), shape, jnp.float32))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, native: bool = False) -> jax.Array:
    """native: one token's norm is one native call (XLA:CPU makes it four programs)."""
    if native and x.ndim == 2 and x.shape[0] == 1:
        return native_lib.rms_norm_one(x[0], weight, eps)[None]
    variance = jnp.mean(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(variance + eps) * weight


def swiglu(gate_up: jax.Array, activation: str = "silu") -> jax.Array:
    """[T, 2*ff] (gate columns first) -> the down projection's input [T, ff]: act(gate) * up, with
    act = silu (SwiGLU) or the tanh form of gelu (GeGLU: Gemma, llama.cpp's ggml_gelu)."""
    f = gate_up.shape[-1] // 2
    gate = gate_up[:, :f]
    act = jax.nn.gelu(gate, approximate=True) if activation == "gelu_tanh" else jax.nn.silu(gate)
    return act * gate_up[:, f:]


def sliding_bias(start_pos, t: int, attn_len: int, window: int) -> jax.Array:
    """causal_bias, also masking keys `window` or more positions back (llama.cpp's standard SWA:
    key p0 is hidden from query p1 when p1 - p0 >= window)."""
    positions = start_pos + jnp.arange(t)[:, None]
    keys = jnp.arange(attn_len)[None, :]
    return jnp.where((keys <= positions) & (positions - keys < window), 0.0, -1e30)


def softcap(x: jax.Array, cap: float) -> jax.Array:
    return x if not cap else cap * jnp.tanh(x / cap)


def causal_bias(start_pos, t: int, attn_len: int) -> jax.Array:
    """Additive causal mask [T, attn_len] for tokens at positions [start_pos, start_pos+T)."""
    positions = start_pos + jnp.arange(t)
    return jnp.where(jnp.arange(attn_len)[None, :] <= positions[:, None], 0.0, -1e30)


def rope(x: jax.Array, positions: jax.Array, theta: float, scale: float = 1.0,
         freq_factors: tuple[float, ...] = ()) -> jax.Array:
    """Rotate-half RoPE. x: [T, heads, head_dim], positions: [T]. scale: linear position scaling;
    freq_factors: per-frequency divisors (Llama 3.x rope_freqs), as llama.cpp's ggml_rope_ext."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(0, half, dtype=jnp.float32) / half)  # [half]
    if freq_factors:
        inv_freq = inv_freq / jnp.asarray(freq_factors, jnp.float32)
    if scale != 1.0:
        inv_freq = inv_freq * scale
    angles = positions.astype(jnp.float32)[:, None, None] * inv_freq  # [T, 1, half]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def head_logits(x_normed: jax.Array, embed, lm_head: jax.Array | None, native: bool = False,
                final_softcap: float = 0.0) -> jax.Array:
    """[T, d] final-normed -> logits [T, V]; a tied head multiplies by the embedding [V, d] (f32,
    or an exact Q8 table: models/embedding.py). native: one token's tied head runs on the native
    kernel (XLA:CPU streams [V, d] slowly here)."""
    if lm_head is None and native and x_normed.shape[0] == 1:
        if isinstance(embed, QRows):  # a quantized store's table, or an f32 store's exact Q8_0 one
            return softcap(native_lib.q_rows_dot(x_normed[0], embed)[None], final_softcap)
        return softcap(native_lib.rows_dot(x_normed[0], embed)[None], final_softcap)
    if lm_head is None:
        return softcap(jnp.einsum("td,vd->tv", x_normed, as_f32(embed)), final_softcap)
    return softcap(quant_matmul(x_normed, lm_head, native), final_softcap)


class Attention(nnx.Module):
    """GQA attention parameters. q/k/v share one input, so their weights are one [d, q+2kv] matrix
    whose row j holds everything input channel j touches (one row read per channel when streaming)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, s = cfg.d_model, cfg.d_model**-0.5
        self.wqkv = _param(rngs, (d, cfg.q_dim + 2 * cfg.kv_dim), s)  # [d, H*hd + 2*KV*hd]
        self.wo = _param(rngs, (cfg.q_dim, d), cfg.q_dim**-0.5)  # [H*hd, d]
        if cfg.qkv_bias:
            self.bqkv = _param(rngs, (cfg.q_dim + 2 * cfg.kv_dim,), 0.1)  # [H*hd + 2*KV*hd]
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)


def _prepare_qkv(cfg: ModelConfig, qkv, qk_norms):
    """qkv [T, q+2kv] with the per-head q/k norms applied and q rescaled so that the standard
    1/sqrt(head_dim) scale of the attention kernels yields the family's query scale."""
    t = qkv.shape[0]
    q, k, v = qkv[:, :cfg.q_dim], qkv[:, cfg.q_dim:cfg.q_dim + cfg.kv_dim], qkv[:, cfg.q_dim + cfg.kv_dim:]
    if qk_norms is not None:
        q = rms_norm(q.reshape(t * cfg.num_heads, cfg.head_dim), qk_norms[0], cfg.norm_eps).reshape(t, cfg.q_dim)
        k = rms_norm(k.reshape(t * cfg.num_kv_heads, cfg.head_dim), qk_norms[1], cfg.norm_eps).reshape(t, cfg.kv_dim)
    if cfg.query_scale and cfg.query_scale != cfg.head_dim**-0.5:
        q = q * (cfg.query_scale * cfg.head_dim**0.5)
    return jnp.concatenate([q, k, v], axis=-1)


def attend(cfg: ModelConfig, qkv, k_cache, v_cache, start_pos, mask_bias, attn_len: int, native: bool = False,
           *, layer: int = 0, qk_norms=None):
    """Everything of attention between the qkv and o projections: qkv [T, q+2kv] -> the o
    projection's input [T, q_dim], with K/V written into the caches at start_pos.
    native: one token's attention runs as one native call (sparse/native.py) instead of ~13 XLA
    programs where that kernel computes this layer's attention (families.native_attention_ok);
    every decode path of an engine must make the same choice (swapped == all-in-DRAM).
    layer: picks the layer kind (sliding or global: RoPE base); qk_norms: (q, k) norm weights."""
    t = qkv.shape[0]
    if qk_norms is not None or (cfg.query_scale and cfg.query_scale != cfg.head_dim**-0.5):
        qkv = _prepare_qkv(cfg, qkv, qk_norms)
    theta = cfg.layer_rope_theta(layer)
    if native and t == 1 and native_attention_ok(cfg, layer):
        out, k_cache, v_cache = native_lib.attend_one(qkv[0], k_cache, v_cache, start_pos, heads=cfg.num_heads,
                                           kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, attn_len=attn_len,
                                           theta=theta)
        return out[None], k_cache, v_cache
    positions = start_pos + jnp.arange(t)
    q = qkv[:, :cfg.q_dim].reshape(t, cfg.num_heads, cfg.head_dim)
    k = qkv[:, cfg.q_dim:cfg.q_dim + cfg.kv_dim].reshape(t, cfg.num_kv_heads, cfg.head_dim)
    v = qkv[:, cfg.q_dim + cfg.kv_dim:].reshape(t, cfg.num_kv_heads, cfg.head_dim)
    local = cfg.is_local_layer(layer)
    scale, factors = (1.0, ()) if local else (cfg.rope_scale, cfg.rope_freq_factors)
    q, k = rope(q, positions, theta, scale, factors), rope(k, positions, theta, scale, factors)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.transpose(1, 0, 2), (0, start_pos, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.transpose(1, 0, 2), (0, start_pos, 0))
    keys, values = k_cache[:, :attn_len], v_cache[:, :attn_len]  # [KV, S, hd]
    group = cfg.num_heads // cfg.num_kv_heads
    # Heads first ([KV, group, T, hd]): XLA:CPU runs dots whose batch dimensions lead as plain
    # batched matmuls, but with the batch in the middle ("tkgd,ksd") it transposes around every
    # dot; this layout made a 512-token attention 2.8x faster forward and 2.8x with its backward
    # (training). jax.nn.softmax's own derivative rule halves the backward's elementwise passes.
    q = q.reshape(t, cfg.num_kv_heads, group, cfg.head_dim).transpose(1, 2, 0, 3) * cfg.head_dim**-0.5
    scores = softcap(jnp.einsum("kgtd,ksd->kgts", q, keys), cfg.attn_softcap) + mask_bias
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("kgts,ksd->kgtd", probs, values).transpose(2, 0, 1, 3).reshape(t, cfg.q_dim)
    return out, k_cache, v_cache


class MLP(nnx.Module):
    """SwiGLU / GeGLU parameters. gate/up share one input: one [d, 2*ff] matrix, gate columns first."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        self.w_gate_up = _param(rngs, (d, 2 * f), d**-0.5)  # [d, 2*ff]
        self.w_down = _param(rngs, (f, d), f**-0.5)  # [ff, d]


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg, rngs)
        if cfg.post_norms:  # Gemma: norms on the block outputs before the residual add
            self.post_attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.post_mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)


class LlamaModel(nnx.Module):
    """The parameters of a model (names, shapes, initialization); `model_forward` runs them."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), 0.25)  # [V, d]
        self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else _param(rngs, (cfg.d_model, cfg.vocab_size), cfg.d_model**-0.5)


# ---------------------------------------------------------------------------------------------
# The decoder, one definition for every path. A layer's parameters `p` are its pure dict; the big
# weights (wqkv, wo, w_gate_up, w_down) reach the maths only through `ops(group, x, w)`: the
# all-in-DRAM paths pass the arrays (LinearOps), the DRAM-budget runtime passes None and its ops
# multiply from slot pools (runtime/pooled.py).


def embed_tokens(cfg: ModelConfig, embed, tokens) -> jax.Array:
    """tokens [T] -> residual [T, d] (embed: f32 [V, d] or a quantized table)."""
    x = lookup(embed, tokens)
    if cfg.embed_scale != 1.0:
        x = x * jnp.float32(cfg.embed_scale)
    return x


def scale_embedding(cfg: ModelConfig, rows: jax.Array) -> jax.Array:
    """Embedding rows read elsewhere (an untied embedding on flash), scaled as embed_tokens does."""
    return rows * jnp.float32(cfg.embed_scale) if cfg.embed_scale != 1.0 else rows


def attention_biases(cfg: ModelConfig, start_pos, t: int, attn_len: int) -> tuple[jax.Array, jax.Array | None]:
    """(causal bias, sliding-window bias or None) for tokens at [start_pos, start_pos+T)."""
    local = sliding_bias(start_pos, t, attn_len, cfg.sliding_window) if cfg.sliding_window else None
    return causal_bias(start_pos, t, attn_len), local


def layer_forward(cfg: ModelConfig, p: Params, x, k_cache, v_cache, start_pos, biases, *, attn_len: int, ops,
                  native: bool = False, layer: int = 0):
    """One decoder layer: x [T, d] -> (x, k_cache, v_cache). biases: attention_biases(...)."""
    eps = cfg.norm_eps
    attn, mlp = p.get("attn", {}), p.get("mlp", {})
    with jax.named_scope("attention"):
        qkv = ops("qkv", rms_norm(x, p["attn_norm"]["weight"], eps, native), attn.get("wqkv"))
        if cfg.qkv_bias:
            qkv = qkv + attn["bqkv"]
        qk_norms = (attn["q_norm"]["weight"], attn["k_norm"]["weight"]) if cfg.qk_norm else None
        bias = biases[1] if cfg.is_local_layer(layer) else biases[0]
        out, k_cache, v_cache = attend(cfg, qkv, k_cache, v_cache, start_pos, bias, attn_len, native, layer=layer,
                                       qk_norms=qk_norms)
        h = ops("o", out, attn.get("wo"))
    if cfg.post_norms:
        h = rms_norm(h, p["post_attn_norm"]["weight"], eps, native)
    x = x + h
    with jax.named_scope("mlp"):
        gate_up = ops("gate_up", rms_norm(x, p["mlp_norm"]["weight"], eps, native), mlp.get("w_gate_up"))
        h = ops("down", swiglu(gate_up, cfg.mlp_activation), mlp.get("w_down"))
    if cfg.post_norms:
        h = rms_norm(h, p["post_mlp_norm"]["weight"], eps, native)
    return x + h, k_cache, v_cache


def final_logits(cfg: ModelConfig, params: Params, x, n_valid, *, all_logits: bool, native: bool) -> jax.Array:
    """Residual leaving the last layer [T, d] -> logits [T, V], or [1, V] of the last real token."""
    if not all_logits:
        x = jax.lax.dynamic_slice_in_dim(x, n_valid - 1, 1, axis=0)
    lm_head = params.get("lm_head")
    return head_logits(rms_norm(x, params["final_norm"]["weight"], cfg.norm_eps, native), params.get("embed"), lm_head,
                       native, cfg.final_softcap)


def model_forward(cfg: ModelConfig, params: Params, tokens, cache: KVCache, start_pos, n_valid, *, attn_len: int,
                  all_logits: bool, sparse: SparsityConfig | None = None, thresholds: jax.Array | None = None,
                  predict: PredictionConfig | None = None, taps: list | None = None, native: bool = False):
    """tokens: [T] (first n_valid are real) at positions [start_pos, start_pos+T).
    Returns (logits [T, V] if all_logits else [1, V] for the last real token, new cache).

    sparse/thresholds ([L, 4], OP_GROUPS order) switch on contextual sparsity; predict
    restricts the residual-stream groups to predicted sets; taps (a list) receives, per layer,
    the input of each op group and the residual entering the layer, then (last entry) the
    residual leaving the last layer."""
    x = embed_tokens(cfg, params["embed"], tokens)  # [T, d]
    biases = attention_biases(cfg, start_pos, tokens.shape[0], attn_len)
    ks, vs = list(cache.k), list(cache.v)
    residuals = []
    layers = params["layers"]
    for i in range(cfg.num_layers):
        residuals.append(x)
        ops = _layer_ops(cfg, layers, i, residuals, sparse, thresholds, predict, taps).with_native(native)
        with jax.named_scope(f"layer{i}"):
            x, ks[i], vs[i] = layer_forward(cfg, layers[i], x, ks[i], vs[i], start_pos, biases, attn_len=attn_len,
                                            ops=ops, native=native, layer=i)
    if taps is not None:
        taps.append({"residual": x})
    return final_logits(cfg, params, x, n_valid, all_logits=all_logits, native=native), KVCache(tuple(ks), tuple(vs))


def _layer_ops(cfg: ModelConfig, layers, i: int, residuals: list, sparse, thresholds, predict, taps) -> LinearOps:
    layer_taps = None
    if taps is not None:
        layer_taps = {"residual": residuals[i]}
        taps.append(layer_taps)
    if sparse is None or not sparse.is_sparse_layer(i):
        return LinearOps(taps=layer_taps) if taps is not None else DENSE
    restrict = None
    if predict is not None and i - predict.distance >= 0:
        src = i - predict.distance
        restrict = _predicted_sets(cfg, sparse, predict, residuals[src], layers[i], layers[src])
    return LinearOps(sparse, sparse.ks(cfg), thresholds, restrict, layer_taps, layer=i)


def _predicted_sets(cfg: ModelConfig, sparse: SparsityConfig, predict: PredictionConfig, residual_src,
                    layer_params: Params, src_params: Params) -> dict[str, jax.Array]:
    """The channel masks a layer's predicted op groups are restricted to, scored from the residual
    entering the source layer (predict.distance layers before) under each layer's norm weight."""
    ks = sparse.ks(cfg)
    restrict = {}
    for group, norm in (("qkv", "attn_norm"), ("gate_up", "mlp_norm")):
        n = min(cfg.d_model, round(predict.superset * ks[OP_GROUPS.index(group)]))
        score = prediction_score(residual_src, layer_params[norm]["weight"], src_params[norm]["weight"], predict.score)
        restrict[group] = top_mask(score, n)
    return restrict


# ---------------------------------------------------------------------------------------------
# A prompt chunk as one program per layer (the all-in-DRAM engine's prefill).
#
# A program over every layer takes XLA ~0.5 GB of transient memory and seconds to compile (SmolLM2
# q8: peak RSS 1.1 GB for a 143 MB model, docs/results.md), for each prompt bucket. Layers of the
# same kind compile to the same program, so one layer's program serves them all: one compile per
# bucket and layer kind, a few MB to compile, and ~30 dispatches per chunk of >= 16 tokens, which
# cost nothing next to the chunk's compute. The logits equal model_forward's up to the order of
# float sums (XLA fuses across layers there). Decode keeps one program per token (speed).


def layer_kind(cfg: ModelConfig, i: int, sparse: SparsityConfig | None, predict: PredictionConfig | None) -> tuple:
    """What layer i's program depends on beyond its arrays: layers with equal kinds share it."""
    sparse_layer = sparse is not None and sparse.is_sparse_layer(i)
    predicted = sparse_layer and predict is not None and i - predict.distance >= 0
    return cfg.is_local_layer(i), cfg.layer_rope_theta(i), sparse_layer, predicted


def layer_programs(cfg: ModelConfig, sparse: SparsityConfig | None,
                   predict: PredictionConfig | None) -> list[tuple[tuple, int]]:
    """For each layer, (its kind, the first layer of that kind): the layer a shared program is
    traced with."""
    kinds = [layer_kind(cfg, i, sparse, predict) for i in range(cfg.num_layers)]
    first: dict[tuple, int] = {}
    return [(kind, first.setdefault(kind, i)) for i, kind in enumerate(kinds)]


@functools.partial(jax.jit, static_argnames=("cfg", "sparse", "predict", "native"))
def embed_program(embed, tokens, *, cfg: ModelConfig, sparse=None, predict=None, native: bool = False):
    """tokens [T] -> the residual entering layer 0."""
    del sparse, predict, native
    return embed_tokens(cfg, embed, tokens)


@functools.partial(jax.jit, static_argnames=("cfg", "layer", "attn_len", "sparse", "predict", "native"),
                   donate_argnames=("k_cache", "v_cache"))
def layer_program(p: Params, x, k_cache, v_cache, start_pos, thresholds, src, *, cfg: ModelConfig, layer: int,
                  attn_len: int, sparse: SparsityConfig | None, predict: PredictionConfig | None,
                  native: bool = False):
    """One layer over a prompt chunk: (x, k_cache, v_cache). `layer` is any layer of this kind
    (layer_kind): the program reads nothing else of it. thresholds: this layer's row [1, 4] (or
    None); src: (residual entering the source layer, its params) for a predicted layer, else None."""
    if sparse is None or not sparse.is_sparse_layer(layer):
        ops = DENSE
    else:
        restrict = _predicted_sets(cfg, sparse, predict, src[0], p, src[1]) if src is not None else None
        ops = LinearOps(sparse, sparse.ks(cfg), thresholds, restrict, None, layer=0)
    biases = attention_biases(cfg, start_pos, x.shape[0], attn_len)
    return layer_forward(cfg, p, x, k_cache, v_cache, start_pos, biases, attn_len=attn_len,
                         ops=ops.with_native(native), native=native, layer=layer)


@functools.partial(jax.jit, static_argnames=("cfg", "all_logits", "sparse", "predict", "native"))
def head_program(params: Params, x, n_valid, *, cfg: ModelConfig, all_logits: bool, sparse=None, predict=None,
                 native: bool = False):
    """The residual leaving the last layer -> logits (final_logits); params: embed, final_norm and
    lm_head (where untied) only."""
    del sparse, predict
    return final_logits(cfg, params, x, n_valid, all_logits=all_logits, native=native)


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


@functools.partial(jax.jit, static_argnames=("cfg", "attn_len", "all_logits", "sparse", "predict", "native"),
                   donate_argnames=("cache",))
def forward(params: Params, cache: KVCache, tokens, start_pos, n_valid, thresholds=None, *, cfg: ModelConfig,
            attn_len: int, all_logits: bool, sparse: SparsityConfig | None = None,
            predict: PredictionConfig | None = None, native: bool = False):
    """One chunk of tokens through the model (prefill when T > 1, decode when T == 1).
    sparse=None is the dense reference path. native: one token's attention and tied head run on
    the native CPU kernels (not under vmap)."""
    return model_forward(cfg, params, tokens, cache, start_pos, n_valid, attn_len=attn_len, all_logits=all_logits,
                         sparse=sparse, thresholds=thresholds, predict=predict, native=native)


def sequence_logits(params: Params, tokens: jax.Array, thresholds=None, *, cfg: ModelConfig,
                    sparse: SparsityConfig | None = None) -> jax.Array:
    """Logits [T, V] of one sequence from an empty cache (traceable, differentiable: training)."""
    t = tokens.shape[0]
    logits, _ = model_forward(cfg, params, tokens, KVCache.zeros(cfg, t), 0, t, attn_len=t, all_logits=True,
                              sparse=sparse, thresholds=thresholds)
    return logits


@functools.partial(jax.jit, static_argnames=("cfg", "sparse"))
def forward_with_taps(params: Params, tokens, thresholds=None, *, cfg: ModelConfig,
                      sparse: SparsityConfig | None = None):
    """Full-sequence forward from an empty cache that also returns, stacked over layers, each op
    group's input and the residual entering each layer: {name: [L, T, dim]}, and "residual_out"
    [T, d] (leaving the last layer), plus logits [T, V]."""
    t = tokens.shape[0]
    taps: list = []
    logits, _ = model_forward(cfg, params, tokens, KVCache.zeros(cfg, t), 0, t, attn_len=t, all_logits=True,
                              sparse=sparse, thresholds=thresholds, taps=taps)
    stacked = {name: jnp.stack([layer[name] for layer in taps[:-1]]) for name in taps[0]}
    return logits, {**stacked, "residual_out": taps[-1]["residual"]}
