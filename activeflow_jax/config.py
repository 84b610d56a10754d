"""Static, hashable configurations.

`ModelConfig` is a frozen dataclass, so it can be passed as a static argument to jitted
functions and used as a cache key; it is also what the store's manifest records.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from activeflow_jax.errors import InvalidArgumentError, StoreError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and hyper-parameters of a decoder of one of the families in models/families.py.

    The fields after `name` describe how a family departs from Llama; their defaults are Llama's,
    so manifests written before they existed still load. A family's spec sets them at import."""

    arch: str  # GGUF general.architecture: "llama", "gemma3", "qwen2" (models/families.py)
    num_layers: int
    d_model: int
    d_ff: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    norm_eps: float
    max_context: int
    tie_embeddings: bool
    name: str = ""
    mlp_activation: str = "silu"  # the gated MLP's activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    qk_norm: bool = False  # RMSNorm over each q and k head (head_dim weights) before RoPE
    post_norms: bool = False  # RMSNorm on the attention and MLP outputs before the residual add
    qkv_bias: bool = False  # q/k/v projections carry biases
    embed_scale: float = 1.0  # the embedding row is multiplied by this (Gemma: sqrt(d_model))
    query_scale: float = 0.0  # attention scores scale; 0 means head_dim ** -0.5
    sliding_window: int = 0  # local layers attend to the last `sliding_window` positions; 0: none
    sliding_window_pattern: int = 0  # layer i is local iff i % N < N - 1 (llama.cpp's swa pattern); 0: all local
    rope_local_theta: float = 0.0  # RoPE base of local (sliding-window) layers; 0 means rope_theta
    rope_scale: float = 1.0  # linear RoPE scaling of global layers: angle = position * rope_scale * freq
    rope_freq_factors: tuple[float, ...] = ()  # per-frequency divisors (Llama 3.x rope_freqs), [head_dim / 2]
    attn_softcap: float = 0.0  # scores -> cap * tanh(scores / cap) when > 0
    final_softcap: float = 0.0  # logits -> cap * tanh(logits / cap) when > 0

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(f"mlp_activation={self.mlp_activation!r}; supported: {MLP_ACTIVATIONS}")
        if self.rope_freq_factors and len(self.rope_freq_factors) != self.head_dim // 2:
            raise ValueError(f"rope_freq_factors has {len(self.rope_freq_factors)} entries, expected head_dim / 2")
        object.__setattr__(self, "rope_freq_factors", tuple(float(f) for f in self.rope_freq_factors))

    def is_local_layer(self, layer: int) -> bool:
        """Whether `layer` attends through the sliding window (llama.cpp's set_swa_pattern rule)."""
        if not self.sliding_window:
            return False
        n = self.sliding_window_pattern
        return n == 0 or layer % n < n - 1

    def layer_rope_theta(self, layer: int) -> float:
        return self.rope_local_theta if self.is_local_layer(layer) and self.rope_local_theta else self.rope_theta

    @property
    def attention_scale(self) -> float:
        return self.query_scale or self.head_dim ** -0.5

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelConfig":
        fields = dataclasses.fields(cls)
        required = {f.name for f in fields if f.default is dataclasses.MISSING}
        missing = required - set(data)
        if missing:
            raise StoreError(f"model config in manifest lacks {sorted(missing)}; re-convert the store")
        names = {f.name for f in fields}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
        return cls(**values)

    def num_params(self) -> int:
        per_layer = (
            (4 if self.post_norms else 2) * self.d_model  # norms
            + (2 * self.head_dim if self.qk_norm else 0)
            + ((self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0)
            + self.d_model * (self.q_dim + 2 * self.kv_dim)
            + self.q_dim * self.d_model
            + 3 * self.d_model * self.d_ff
        )
        head = 0 if self.tie_embeddings else self.d_model * self.vocab_size
        return self.vocab_size * self.d_model + self.num_layers * per_layer + self.d_model + head


def tiny_config(**overrides: Any) -> ModelConfig:
    """A small random-weight config for unit tests and demos (seconds to compile)."""
    base = dict(
        arch="llama", num_layers=2, d_model=64, d_ff=160, num_heads=4, num_kv_heads=2, head_dim=16,
        vocab_size=300, rope_theta=10000.0, norm_eps=1e-5, max_context=256, tie_embeddings=True,
        name="tiny-llama",
    )
    base.update(overrides)
    return ModelConfig(**base)


MLP_ACTIVATIONS = ("silu", "gelu_tanh")

# Linear ops grouped by the input they read: q/k/v share the normed attention input, gate/up the
# normed MLP input; o reads the attention output, down the SwiGLU product. One mask per group.
OP_GROUPS = ("qkv", "o", "gate_up", "down")
# the weight tensor of each op group, under "layers.<i>." (store names)
TENSOR_OF_OP = {"qkv": "attn.wqkv", "o": "attn.wo", "gate_up": "mlp.w_gate_up", "down": "mlp.w_down"}
# The groups whose input derives from the residual stream, so that an earlier layer predicts their
# active channels: the swapping runtime preloads them a layer group ahead; o and down load on demand.
PREDICTED_GROUPS = ("qkv", "gate_up")
MAX_SPARSITY = 0.95
MASK_POLICIES = ("threshold", "topk")
DECODE_KERNELS = ("auto", "native", "gather", "mask")
PREDICTOR_SCORES = ("residual_gain", "previous_input")  # sparse/predictor.py says what each scores


def op_input_dims(cfg: ModelConfig) -> tuple[int, ...]:
    """Input width of each op group, in OP_GROUPS order."""
    return (cfg.d_model, cfg.q_dim, cfg.d_model, cfg.d_ff)


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    """Contextual sparsity of every linear op (static: a jitted program is compiled per config).

    sparsity     fraction of input channels dropped per op, in [0, 0.95]; each op keeps a fixed
                 k = round((1 - sparsity) * in_dim) channels, so shapes never change.
    policy       "threshold": the top-k channels, minus those under the calibrated per-(layer, op)
                 threshold (TEAL's rule, capped at k); "topk": exactly the top-k by |x|.
    kernel       decode kernel: "native" (FFI CPU kernel reading the k active rows in place),
                 "gather" (XLA gathers the k rows, then multiplies), "mask" (dense matmul on the
                 masked input: same result, dense cost), or "auto" (native where it builds on the
                 CPU backend, else gather; resolved by the engine).
    dense_layers how many leading layers stay dense (the paper keeps layer 0 dense).
    op_sparsity  optional per-op-group allocation (OP_GROUPS order) that replaces `sparsity` for
                 each op; build it with `runtime/budget.allocated_sparsity`, which sets `sparsity` to the share of
                 a layer's weight bytes left unread, so figures compare with uniform settings.
                 Ops differ widely in how much dropping input channels costs (on SmolLM2 gate_up
                 is the costly one and down the cheap one; `sparse/allocate.py` finds the split).
    """

    sparsity: float
    policy: str = "threshold"
    kernel: str = "auto"
    dense_layers: int = 1
    straight_through: bool = False  # training only: mask in the forward pass, identity backward
    op_sparsity: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (0.0 <= s <= MAX_SPARSITY):
            raise InvalidArgumentError(f"sparsity must be a number in [0, {MAX_SPARSITY}], got {s!r}")
        object.__setattr__(self, "sparsity", round(float(s), 4))
        if self.policy not in MASK_POLICIES:
            raise InvalidArgumentError(f"policy must be one of {MASK_POLICIES}, got {self.policy!r}")
        if self.kernel not in DECODE_KERNELS:
            raise InvalidArgumentError(f"kernel must be one of {DECODE_KERNELS}, got {self.kernel!r}")
        if not isinstance(self.dense_layers, int) or self.dense_layers < 0:
            raise InvalidArgumentError(f"dense_layers must be an int >= 0, got {self.dense_layers!r}")
        if self.op_sparsity is not None:
            object.__setattr__(self, "op_sparsity", parse_op_sparsity(self.op_sparsity))

    def ks(self, cfg: ModelConfig) -> tuple[int, ...]:
        """Channels kept per op group (OP_GROUPS order)."""
        return kept_channels(cfg, self.op_levels())

    def op_levels(self) -> tuple[float, ...]:
        """The sparsity of each op group (OP_GROUPS order): the allocation, or `sparsity` for all."""
        return self.op_sparsity or (self.sparsity,) * len(OP_GROUPS)

    def is_sparse_layer(self, layer: int) -> bool:
        return self.sparsity > 0 and layer >= self.dense_layers


def kept_channels(cfg: ModelConfig, levels) -> tuple[int, ...]:
    """Channels each op group keeps at per-op sparsity `levels` (OP_GROUPS order): a static k."""
    return tuple(max(1, round((1.0 - s) * d)) for s, d in zip(levels, op_input_dims(cfg)))


def parse_op_sparsity(value) -> tuple[float, ...]:
    """A per-op allocation from a sequence in OP_GROUPS order, a {op: sparsity} dict, or text such
    as "qkv=0.4,o=0.45,gate_up=0.45,down=0.69"; every op group must be given once."""
    expected = ", ".join(f"{op}=S" for op in OP_GROUPS)
    given = value
    try:
        if isinstance(value, str):
            pairs = [item.split("=") for item in value.replace(" ", "").split(",") if item]
            if any(len(p) != 2 for p in pairs):
                raise ValueError
            value = {op: float(s) for op, s in pairs}
            if len(value) != len(pairs):
                raise ValueError
        if isinstance(value, dict):
            if sorted(value) != sorted(OP_GROUPS):
                raise ValueError
            value = [value[op] for op in OP_GROUPS]
        levels = tuple(round(float(s), 4) for s in value)
        if len(levels) != len(OP_GROUPS) or any(isinstance(s, bool) for s in value):
            raise ValueError
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"op sparsity must give each op group once, as {expected} "
                                   f"(each in [0, {MAX_SPARSITY}]), got {given!r}") from None
    if not all(0.0 <= s <= MAX_SPARSITY for s in levels):
        raise InvalidArgumentError(f"op sparsity must be in [0, {MAX_SPARSITY}] for every op, got {levels}")
    return levels


@dataclasses.dataclass(frozen=True)
class PredictionConfig:
    """Cross-layer prediction used to *restrict* the active sets (quality of predicted sets).

    For the residual-stream groups (qkv, gate_up) of layer j, the channels that can be active are
    the top (superset * k) by the predictor score computed at layer j - distance; channels the
    prediction missed are dropped (no on-demand load), which is the worst case for quality.
    o and down are not predicted (loaded on demand at run time), so they stay exact.
    """

    distance: int = 1
    superset: float = 1.5
    score: str = "residual_gain"

    def __post_init__(self) -> None:
        if not isinstance(self.distance, int) or self.distance < 1:
            raise InvalidArgumentError(f"prediction distance must be an int >= 1, got {self.distance!r}")
        if not (1.0 <= self.superset <= 4.0):
            raise InvalidArgumentError(f"superset must be in [1, 4] times k, got {self.superset!r}")
        if self.score not in PREDICTOR_SCORES:
            raise InvalidArgumentError(f"predictor score must be one of {PREDICTOR_SCORES}, got {self.score!r}")
