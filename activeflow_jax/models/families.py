"""Model families as data: one small declarative spec per GGUF architecture.

A spec says how a family departs from Llama (norm placement, MLP activation, q/k norms, biases,
sliding-window layers, RoPE bases, embedding scale, soft-capping), which GGUF tensors make up
each of our parameters, which tokenizers it ships with, and the hyper-parameters that the GGUF
file does not carry (each with a comment naming where it is defined). `config_from_gguf` turns a
GGUF's metadata into a `ModelConfig`; the one decoder (models/llama.py) reads only the config.

Adding a family that uses features the decoder already has = one `FamilySpec` below plus tests
(a tiny random GGUF of it against tests/reference_numpy.py).

Norm weights: llama.cpp's converter already folds Gemma's `1 + w` into the GGUF norm weights
(conversion/gemma.py, `norm_shift` = 1.0 for every "norm.weight" of Gemma 3, `+ 1` for Gemma 1/2),
and llama.cpp's graph multiplies by the stored weight; so every family here is a plain RMSNorm
on the weights as stored (the real Gemma 3 model matches the float64 reference, which follows llama.cpp,
within 3e-5 in its logits, and llama.cpp's perplexity within 0.7%: tests/test_gemma_real.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from activeflow_jax.config import ModelConfig
from activeflow_jax.errors import UnsupportedModelError


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """How one GGUF architecture maps onto the decoder."""

    arch: str  # general.architecture
    tokenizers: tuple[str, ...]  # tokenizer.ggml.model values it ships with
    gguf_qk_permuted: bool = False  # llama.cpp's converter permuted q/k rows for interleaved RoPE
    mlp_activation: str = "silu"
    qk_norm: bool = False
    post_norms: bool = False
    qkv_bias: bool = False
    embed_scale_sqrt_d: bool = False  # embedding rows times sqrt(d_model)
    sliding_window_pattern: int = 0  # default when the GGUF lacks {arch}.attention.sliding_window_pattern
    rope_local_theta: float = 0.0  # default when the GGUF lacks {arch}.rope.freq_base_swa
    query_scale: Callable[[dict[str, int]], float] | None = None  # from the config's dims; None: 1/sqrt(hd)
    defaults: tuple[tuple[str, Any], ...] = ()  # metadata defaults the converter may omit


LLAMA = FamilySpec(arch="llama", tokenizers=("gpt2", "llama"), gguf_qk_permuted=True)

GEMMA3 = FamilySpec(
    arch="gemma3",
    tokenizers=("llama",),  # SentencePiece vocabulary with scores and byte fallback
    mlp_activation="gelu_tanh",  # HF hidden_activation "gelu_pytorch_tanh"; llama.cpp LLM_FFN_GELU (tanh form)
    qk_norm=True,
    post_norms=True,  # post_attention_norm, post_ffw_norm
    embed_scale_sqrt_d=True,  # Gemma3TextScaledWordEmbedding; llama.cpp gemma3.cpp: ggml_scale(.., sqrtf(n_embd))
    # Every 6th layer is global, the others slide: llama.cpp gemma3.cpp load_swa_pattern(ml, 6),
    # HF Gemma3TextConfig sliding_window_pattern = 6.
    sliding_window_pattern=6,
    # Local layers' RoPE base: HF Gemma3TextConfig rope_local_base_freq = 10000; llama.cpp
    # llama-hparams.h rope_freq_base_train_swa = 10000.0f (the 270M GGUF does not carry it).
    rope_local_theta=10000.0,
    # Query scaling 1/sqrt(query_pre_attn_scalar): llama.cpp gemma3.cpp f_attention_scale is
    # 1/sqrt(n_embd / n_head) for the 27B model and 1/sqrt(head_dim) for every other size (HF
    # configs: query_pre_attn_scalar = 256 = head_dim for 270M..12B, 168 for 27B).
    query_scale=lambda d: (d["d_model"] / d["num_heads"]) ** -0.5 if d["num_layers"] == 62 else d["head_dim"] ** -0.5,
    defaults=(("attention.layer_norm_rms_epsilon", 1e-6),),
)

QWEN2 = FamilySpec(arch="qwen2", tokenizers=("gpt2",), qkv_bias=True)

FAMILIES: dict[str, FamilySpec] = {spec.arch: spec for spec in (LLAMA, GEMMA3, QWEN2)}
SUPPORTED_ARCHS = tuple(FAMILIES)


def family(arch: str) -> FamilySpec:
    if arch not in FAMILIES:
        raise UnsupportedModelError(f"architecture '{arch}' is not supported; supported: {', '.join(SUPPORTED_ARCHS)}")
    return FAMILIES[arch]


def config_from_gguf(spec: FamilySpec, field: Callable[..., Any], tensor_names: set[str], *, name: str,
                     rope_freqs: tuple[float, ...] = ()) -> ModelConfig:
    """The ModelConfig of a GGUF of family `spec`. field(key, default) reads metadata; raises
    UnsupportedModelError for features the decoder lacks (partial RoPE, YaRN, MoE)."""
    p = spec.arch + "."
    defaults = dict(spec.defaults)

    def meta(key: str, default: Any = None, required: bool = False) -> Any:
        return field(p + key, defaults.get(key, default), required=required)

    d_model = int(meta("embedding_length", required=True))
    num_heads = int(meta("attention.head_count", required=True))
    head_dim = int(meta("attention.key_length", d_model // num_heads))
    value_dim = int(meta("attention.value_length", head_dim))
    if value_dim != head_dim:
        raise UnsupportedModelError(f"key length {head_dim} != value length {value_dim} is not supported")
    rope_dims = int(meta("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise UnsupportedModelError(f"partial RoPE ({rope_dims} of {head_dim} dims) is not supported")
    if meta("expert_count", 0):
        raise UnsupportedModelError(f"mixture-of-experts {spec.arch} models are not supported yet")
    scaling = meta("rope.scaling.type") or "none"
    rope_scale = 1.0
    if scaling == "linear":
        rope_scale = 1.0 / float(meta("rope.scaling.factor", 1.0))
    elif scaling != "none":
        raise UnsupportedModelError(f"RoPE scaling '{scaling}' is not supported; supported: none, linear, "
                                    "and Llama 3's frequency factors (rope_freqs)")
    num_layers = int(meta("block_count", required=True))
    dims = dict(d_model=d_model, num_heads=num_heads, head_dim=head_dim, num_layers=num_layers)
    window = int(meta("attention.sliding_window", 0) or 0)
    pattern = meta("attention.sliding_window_pattern", spec.sliding_window_pattern)
    if isinstance(pattern, (list, tuple)):  # newer converters write the per-layer flags
        pattern = _pattern_period([bool(x) for x in pattern])
    tokens = field("tokenizer.ggml.tokens", None)
    return ModelConfig(
        arch=spec.arch,
        num_layers=num_layers,
        d_model=d_model,
        d_ff=int(meta("feed_forward_length", required=True)),
        num_heads=num_heads,
        num_kv_heads=int(meta("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        vocab_size=int(meta("vocab_size", len(tokens) if tokens else 0)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        max_context=int(meta("context_length", 2048)),
        tie_embeddings="output.weight" not in tensor_names,
        name=name,
        mlp_activation=spec.mlp_activation,
        qk_norm=spec.qk_norm,
        post_norms=spec.post_norms,
        qkv_bias=spec.qkv_bias,
        embed_scale=math.sqrt(d_model) if spec.embed_scale_sqrt_d else 1.0,
        query_scale=spec.query_scale(dims) if spec.query_scale else 0.0,
        sliding_window=window,
        sliding_window_pattern=int(pattern) if window else 0,
        rope_local_theta=float(meta("rope.freq_base_swa", spec.rope_local_theta) or 0.0) if window else 0.0,
        rope_scale=rope_scale,
        rope_freq_factors=rope_freqs,
        attn_softcap=float(meta("attn_logit_softcapping", 0.0) or 0.0),
        final_softcap=float(meta("final_logit_softcapping", 0.0) or 0.0),
    )


def _pattern_period(flags: list[bool]) -> int:
    """The N of llama.cpp's set_swa_pattern that gives these per-layer sliding flags."""
    for n in range(1, len(flags) + 1):
        if all(f == (i % n < n - 1) for i, f in enumerate(flags)):
            return n
    if all(flags):
        return 0
    raise UnsupportedModelError(f"sliding-window layer pattern {flags} is not periodic; not supported yet")


def tensor_map(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...]]]:
    """(our parameter name, the GGUF tensors it is made of, fused column-wise in this order);
    our names are those of models.llama.param_shapes."""
    pairs = [("embed", ("token_embd.weight",))]
    for i in range(cfg.num_layers):
        ours, b = f"layers.{i}.", f"blk.{i}."
        pairs += [
            (ours + "attn_norm.weight", (b + "attn_norm.weight",)),
            (ours + "attn.wqkv", (b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight")),
            (ours + "attn.wo", (b + "attn_output.weight",)),
            (ours + "mlp_norm.weight", (b + "ffn_norm.weight",)),
            (ours + "mlp.w_gate_up", (b + "ffn_gate.weight", b + "ffn_up.weight")),
            (ours + "mlp.w_down", (b + "ffn_down.weight",)),
        ]
        if cfg.qkv_bias:
            pairs.append((ours + "attn.bqkv", (b + "attn_q.bias", b + "attn_k.bias", b + "attn_v.bias")))
        if cfg.qk_norm:
            pairs += [(ours + "attn.q_norm.weight", (b + "attn_q_norm.weight",)),
                      (ours + "attn.k_norm.weight", (b + "attn_k_norm.weight",))]
        if cfg.post_norms:
            pairs += [(ours + "post_attn_norm.weight", (b + "post_attention_norm.weight",)),
                      (ours + "post_mlp_norm.weight", (b + "post_ffw_norm.weight",))]
    pairs.append(("final_norm.weight", ("output_norm.weight",)))
    if not cfg.tie_embeddings:
        pairs.append(("lm_head", ("output.weight",)))
    return pairs


def native_attention_ok(cfg: ModelConfig, layer: int) -> bool:
    """Whether the native one-token attention kernel (sparse/native.attend_one: causal GQA,
    rotate-half RoPE at one base, 1/sqrt(head_dim) scale) computes this layer's attention. q/k
    norms, biases and another query scale are applied before it (models/llama.attend), so only
    what happens inside the kernel matters: no sliding window, soft-cap or RoPE scaling."""
    return (not cfg.is_local_layer(layer) and not cfg.attn_softcap and cfg.rope_scale == 1.0
            and not cfg.rope_freq_factors)

