"""DRAM accounting of the swapping runtime: what a budget must hold and how it is split.

This is the one place that turns a budget into sizes. Everything the engine holds counts:

    baseline   the process before the model was loaded (Python, JAX, XLA's runtime); measured at
               load time, because a budget the process cannot keep is no budget, plus
               COMPILE_GROWTH_RESERVE for what compiling the runtime's programs will add
    resident   weights that stay in DRAM: the head (a tied embedding is the head: every token
               reads all of it; an untied model's lm_head) and the norms. Decoder layers, dense
               ones included, are streamed, and so is an untied input embedding: a token needs
               only its own row, read from flash with the token (runtime/swap.py).
    kv         the KV cache for `kv_tokens` positions
    staging    host copies of rows in flight from flash: one layer group's preload plus one
               op's on-demand rows
    pools      one slot buffer per op group (qkv, o, gate_up, down), shared by all sparse layers;
               a slot holds one row (one input channel of one layer). The slots beyond what the
               current token needs are the context-level hot-weight cache.

Every byte is the store's (`dtype`, default float32): a q8 / q4 store's rows are read from flash
and held in the pools as quantized rows (activeflow_jax/quant.py), so a row costs
quant.row_bytes(dtype, out) both on flash and in a pool; a float16 store's rows are read as f16
and held as f32 (`held_dtype`). Norms are f32 in every quantized store; a quantized store's
embedding/head is held quantized (q8 in a q4 store: quant.tensor_dtype decides every tensor's dtype).

Every pool must hold the k rows one op computes with (a prefill chunk's larger union is computed
in slices of k rows), and the predicted ops also one group's preloaded rows; that, with the
resident weights, the KV cache and the staging memory, is the minimum working set. What is left
is split between the pools so that o and down, whose misses are read on demand while the compute
waits, keep ONDEMAND_CACHE_WEIGHT times the share of their rows that qkv and gate_up keep.
"""

from __future__ import annotations

import dataclasses
import re
import resource
import sys

import numpy as np

from activeflow_jax.buckets import PREFILL_CHUNK
from activeflow_jax.config import (
    OP_GROUPS,
    PREDICTED_GROUPS,
    ModelConfig,
    SparsityConfig,
    kept_channels,
    op_input_dims,
    parse_op_sparsity,
)
from activeflow_jax.errors import InvalidArgumentError
from activeflow_jax.models.llama import param_shapes
from activeflow_jax.quant import is_quantized, row_bytes
from activeflow_jax.store.layout import stored_nbytes

F32 = 4
# Predicted channels preloaded per op, in multiples of k. Measured (stop 12, 24 cold tokens of the
# default model at 50% sparsity): 1.0x beat 1.5x by 10-22% at a 60% budget (N=1) and by 15% at
# 40% (N=2), and 2.0x was slower still: on a disk this slow the unused part of a superset costs
# more reads than the misses it saves.
DEFAULT_PRELOAD_SUPERSET = 1.0
# Cache share of the ops read on demand (o, down) relative to the preloaded ones (qkv, gate_up):
# their misses stall the compute, the preloaded ops' misses mostly do not. Measured with the
# compiled runtime (stop 31, bench/swap_settings.py, q8 store, groups of 2, 16 cold tokens, 16
# and 4 alternating twice per budget): 16 read 29% / 15% / 3% fewer rows on demand at 60% / 50%
# / 40% and 7% / 3.5% / 0.4% fewer device bytes; tok/s 1.15x / 1.10x / 0.94x (sums of two
# pairs, busy machine; 40% within noise), equal at 100% where the pools hold every o/down row.
# The stage runtime it replaced preferred 4 (stop 12); its pools did not hold two groups' preloads.
ONDEMAND_CACHE_WEIGHT = 16.0
# What the process grows by when it first compiles and runs the runtime's programs, reserved when
# a budget counts the whole process (budget_includes_process) and reported beside a budget that
# does not: jaxlib code pages the compiler faults in, heap the compiles leave grown and fragmented,
# and the transients of the prefill programs (one op's [in, out] weight from its callback, the rows
# taken from the pool). Measured (stop 31; peak RSS minus RSS before load minus the budget's
# accounted bytes, 50% budget, groups of 2, an 8-token prompt and 8 tokens): with prefill in
# programs of one layer (swap.PREFILL_LAYERS, stop 32) SmolLM2 f32 dense 273 MB, Gemma 3 270M f32
# top-k 435 MB (its 262k-entry head); in programs of 4 layers 281 and 489 (stop 31: SmolLM2 f32
# top-k 280, q8 top-k 284). With one prefill program over all layers (until stop 31) SmolLM2 f32
# dense grew 669 MB, more than the 490 MB reserved then.
# The largest measured plus ~10%: the peak is what counts. Every program compiled stays in the
# process (4-16 MB each for SmolLM2), so the growth also depends on how many a session compiles:
# until stop 33 a varied session (prompts of 10-450 tokens, bench/session_growth.py, q8, 50%, kv
# 512) compiled 44 programs and grew 486 MB, past the reserve (programs per attention length and
# per cache length; more with a larger kv_tokens); with one cache length and attention length per
# engine and one layer program per prompt-chunk length (SwapRuntime.attention_length) the same
# session compiles 39 smaller ones and grows 382 MB.
COMPILE_GROWTH_RESERVE = 480_000_000
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def current_rss() -> int:
    """The process's resident set size now (bytes; 0 where /proc is missing)."""
    import os

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def scope_in_words(covers_process: bool, process_bytes: int, rss: int) -> str:
    """What a budget covers, in words, with the process figures beside it: the one wording that
    the plan, `--stats` and `stats.memory` all give. process_bytes: the process outside the model
    (measured before loading, plus COMPILE_GROWTH_RESERVE)."""
    if covers_process:
        return (f"the budget covers the whole process (its {process_bytes / 1e6:.0f} MB outside the model, measured "
                f"at load plus a compile reserve, are counted in it); process RSS now {rss / 1e6:.0f} MB")
    return (f"the budget covers the model's weights, KV cache and buffers only, NOT the process itself: add about "
            f"{process_bytes / 1e6:.0f} MB for Python, JAX and the compiled programs (process RSS now "
            f"{rss / 1e6:.0f} MB); load with budget_includes_process=True (--whole-process) for a budget that covers "
            "everything")


def scope_sentence(covers_process: bool, process_bytes: int, rss: int) -> str:
    """scope_in_words as a sentence (capitalized, with its full stop), for the plan's explanation."""
    scope = scope_in_words(covers_process, process_bytes, rss)
    return scope[0].upper() + scope[1:] + "."


class BudgetTooSmallError(InvalidArgumentError):
    """The DRAM budget is below the minimum working set."""


def op_output_dims(cfg: ModelConfig) -> tuple[int, ...]:
    """Row width (floats) of each op group's weight, OP_GROUPS order."""
    return (cfg.q_dim + 2 * cfg.kv_dim, cfg.d_model, 2 * cfg.d_ff, cfg.d_model)


def held_dtype(dtype: str) -> str:
    """How a store's rows are held in DRAM by the runtime: quantized rows as they are, float rows as f32."""
    return dtype if is_quantized(dtype) else "float32"


def op_row_bytes(cfg: ModelConfig, dtype: str = "float32") -> tuple[int, ...]:
    """Bytes of one row (input channel) of each op group's weight in a store of `dtype`."""
    return tuple(row_bytes(dtype, out) for out in op_output_dims(cfg))


def layer_op_bytes(cfg: ModelConfig, dtype: str = "float32") -> tuple[int, ...]:
    """Bytes of one layer's weight per op group."""
    return tuple(i * r for i, r in zip(op_input_dims(cfg), op_row_bytes(cfg, dtype)))


def allocation_mean(cfg: ModelConfig, op_sparsity) -> float:
    """Share of one layer's linear-weight bytes that a per-op allocation leaves unread."""
    sizes = layer_op_bytes(cfg)
    ks = kept_channels(cfg, parse_op_sparsity(op_sparsity))
    kept = sum(k / d * b for k, d, b in zip(ks, op_input_dims(cfg), sizes))
    return round(1.0 - kept / sum(sizes), 4)


def allocated_sparsity(cfg: ModelConfig, op_sparsity, **options) -> SparsityConfig:
    """A SparsityConfig with a per-op allocation; its `sparsity` is the allocation's byte mean."""
    levels = parse_op_sparsity(op_sparsity)
    if max(levels) == 0:
        raise InvalidArgumentError("an op sparsity allocation needs at least one op above 0")
    return SparsityConfig(allocation_mean(cfg, levels), op_sparsity=levels, **options)


def model_weight_bytes(cfg: ModelConfig, dtype: str = "float32") -> int:
    """The model's weight bytes in a store of `dtype` (what budget fractions are fractions of)."""
    return sum(stored_nbytes(name, shape, dtype) for name, shape in param_shapes(cfg).items())


def embedding_bytes(cfg: ModelConfig, q8_embed: bool = False, dtype: str = "float32") -> int:
    """The embedding table in DRAM: f32, exact Q8_0 blocks (models/embedding.py), or a quantized
    store's rows."""
    if is_quantized(dtype):
        return stored_nbytes("embed", (cfg.vocab_size, cfg.d_model), dtype)
    if q8_embed:
        return cfg.vocab_size * row_bytes("q8", cfg.d_model)
    return cfg.vocab_size * cfg.d_model * F32


def head_bytes(cfg: ModelConfig, q8_embed: bool = False, dtype: str = "float32") -> int:
    """What the lm head reads per token: the tied embedding, or its own [d, V] (f32, or quantized
    rows in a quantized store)."""
    if cfg.tie_embeddings:
        return embedding_bytes(cfg, q8_embed, dtype)
    return stored_nbytes("lm_head", (cfg.d_model, cfg.vocab_size), dtype) if is_quantized(dtype) else \
        cfg.vocab_size * cfg.d_model * F32


def resident_bytes(cfg: ModelConfig, q8_embed: bool = False, dtype: str = "float32") -> int:
    """The head and the norms (an untied input embedding is not resident: embedding_rows_bytes)."""
    per_layer = (4 if cfg.post_norms else 2) * cfg.d_model + (2 * cfg.head_dim if cfg.qk_norm else 0)
    norms = (cfg.num_layers * per_layer + cfg.d_model) * F32
    return head_bytes(cfg, q8_embed, dtype) + norms


def embedding_rows_bytes(cfg: ModelConfig) -> int:
    """Host memory for the embedding rows of one prefill chunk read from flash (untied models),
    twice: TensorStore's copy and ours."""
    return 0 if cfg.tie_embeddings else 2 * PREFILL_CHUNK * cfg.d_model * F32


def kv_bytes(cfg: ModelConfig, tokens: int) -> int:
    return 2 * cfg.num_layers * tokens * cfg.kv_dim * F32


def parse_budget(value, cfg: ModelConfig, dtype: str = "float32") -> int:
    """Bytes from 200_000_000, "200MB", "1.5GiB", or a fraction of the model's weight bytes in
    its store's dtype (0 < value <= 1, or "50%")."""
    if isinstance(value, bool):
        raise InvalidArgumentError(f"dram_budget must be bytes, a size such as '200MB' or a fraction; got {value!r}")
    if isinstance(value, (int, np.integer)) and value > 1:
        return int(value)
    if isinstance(value, (float, int)):
        if 0 < value <= 1:
            return int(value * model_weight_bytes(cfg, dtype))
        raise InvalidArgumentError(f"dram_budget as a number is a fraction in (0, 1] of the model or bytes > 1; "
                                   f"got {value!r}")
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if text.endswith("%"):
            try:
                return parse_budget(float(text[:-1]) / 100, cfg, dtype)
            except ValueError:
                pass
        match = re.fullmatch(r"([0-9]*\.?[0-9]+)([a-z]*)", text)
        if match and match.group(2) in _UNITS:
            number = float(match.group(1))
            if match.group(2) == "" and number <= 1:
                return parse_budget(number, cfg, dtype)
            return int(number * _UNITS[match.group(2)])
    raise InvalidArgumentError(f"cannot read dram_budget {value!r}: give bytes, a size such as '200MB' or "
                               "'1.5GiB', or a fraction of the model such as 0.5 or '50%'")


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """How a budget is spent (bytes). `pool_slots[g]` rows of op group g fit in its pool."""

    budget: int
    baseline: int
    resident: int
    kv: int
    kv_tokens: int
    staging: int
    pool_slots: tuple[int, ...]
    row_bytes: tuple[int, ...]  # a pool row, as held
    min_pool_slots: tuple[int, ...]
    flash_row_bytes: tuple[int, ...] | None = None  # a row as read from the store (None: = row_bytes)
    # The embedding/head table held resident, part of `resident` (head_bytes): a tied embedding is the
    # head; an untied model's lm_head (its input embedding is streamed). Named apart because a large
    # vocabulary makes it most of a small model (262k x 640 is ~72% of Gemma 3 270M's bytes).
    embedding: int = 0

    @property
    def read_row_bytes(self) -> tuple[int, ...]:
        return self.row_bytes if self.flash_row_bytes is None else self.flash_row_bytes

    @property
    def pools(self) -> int:
        return sum((s + 1) * r for s, r in zip(self.pool_slots, self.row_bytes))  # +1: the padding row

    @property
    def cache(self) -> int:
        """Pool bytes beyond the minimum working set: the hot-weight cache."""
        return sum((s - m) * r for s, m, r in zip(self.pool_slots, self.min_pool_slots, self.row_bytes))

    @property
    def total(self) -> int:
        return self.baseline + self.resident + self.kv + self.staging + self.pools

    @property
    def minimum(self) -> int:
        """The minimum working set of this setting (what plan_memory refuses a budget below)."""
        return self.total - self.cache

    def breakdown(self) -> dict[str, dict[str, float]]:
        """Where the plan's bytes go: {part: {"bytes", "share" of the total}}, the embedding/head
        named apart from the norms."""
        parts = {"baseline": self.baseline, "embedding": self.embedding, "norms": self.resident - self.embedding,
                 "kv": self.kv, "staging": self.staging, "pools": self.pools}
        return {k: {"bytes": v, "share": v / self.total if self.total else 0.0} for k, v in parts.items()}

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(pools=self.pools, cache=self.cache, total=self.total, minimum=self.minimum,
                   breakdown=self.breakdown(),
                   pool_bytes={g: s * r for g, s, r in zip(OP_GROUPS, self.pool_slots, self.row_bytes)})
        return out


def staging_bytes(cfg: ModelConfig, group_size: int, preload_channels: tuple[int, int], ks: tuple[int, ...],
                  dtype: str = "float32") -> int:
    """Host memory for rows in flight -- a group's preload of qkv and gate_up rows plus the largest
    single on-demand read (k rows of one op: prefill reads its union in slices of k rows), each
    twice: TensorStore holds the bytes it read until it has copied them into the array it returns
    -- and the compute buffer of one op's assembled weight (prefill chunks and dense layers) with
    the k-row slice gathered from the pool while it is assembled; for an untied model also the
    embedding rows of one prefill chunk. Rows in flight are the store's bytes; the assembled
    weight and the slice gathered into it are held rows (held_dtype)."""
    rb = op_row_bytes(cfg, dtype)
    preload = group_size * (preload_channels[0] * rb[0] + preload_channels[1] * rb[2])
    ondemand = max(k * r for k, r in zip(ks, rb))
    held = held_dtype(dtype)
    ondemand_held = max(k * r for k, r in zip(ks, op_row_bytes(cfg, held)))
    return 2 * (preload + ondemand) + max(layer_op_bytes(cfg, held)) + ondemand_held + embedding_rows_bytes(cfg)


def min_pool_slots(cfg: ModelConfig, group_size: int, preload_channels: tuple[int, int],
                   ks: tuple[int, ...]) -> tuple[int, ...]:
    """Per op: the k rows an op computes with at once, plus, for the predicted ops, two groups'
    preloaded rows: the next group's are reserved (and being read) before the current group's
    program, whose own preloaded rows are still pending, is dispatched (runtime/swap.py)."""
    layers = cfg.num_layers
    slots = list(ks)
    slots[OP_GROUPS.index("qkv")] += 2 * group_size * preload_channels[0]
    slots[OP_GROUPS.index("gate_up")] += 2 * group_size * preload_channels[1]
    return tuple(min(m, d * layers) for m, d in zip(slots, op_input_dims(cfg)))


def plan_memory(cfg: ModelConfig, budget: int, *, baseline: int, kv_tokens: int,
                group_size: int, preload_channels: tuple[int, int], ks: tuple[int, ...],
                q8_embed: bool = False, dtype: str = "float32") -> MemoryPlan:
    """Splits `budget` bytes; raises BudgetTooSmallError (stating the minimum) if it cannot hold
    the minimum working set. preload_channels: channels predicted per layer for (qkv, gate_up);
    ks: channels each op computes with per token (op_input_dims for a dense model); q8_embed: the
    embedding is held as Q8_0 blocks; dtype: the store's (pools hold held_dtype(dtype) rows)."""
    resident = resident_bytes(cfg, q8_embed, dtype)
    embedding = head_bytes(cfg, q8_embed, dtype)
    row_bytes = op_row_bytes(cfg, held_dtype(dtype))
    total_rows = tuple(d * cfg.num_layers for d in op_input_dims(cfg))
    min_slots = min_pool_slots(cfg, group_size, preload_channels, ks)
    staging = staging_bytes(cfg, group_size, preload_channels, ks, dtype)
    padding_rows = sum(row_bytes)  # each pool's extra all-zero row (padding target)
    fixed = baseline + resident + kv_bytes(cfg, kv_tokens) + staging + padding_rows
    minimum = fixed + sum(m * r for m, r in zip(min_slots, row_bytes))
    if budget < minimum:
        raise BudgetTooSmallError(
            f"a DRAM budget of {budget / 1e6:.1f} MB is below the minimum working set of {minimum / 1e6:.1f} MB "
            f"for this model and setting ("
            + (f"process baseline {baseline / 1e6:.0f} MB" if baseline else "the process itself not counted: "
               "the budget covers the model only") + f", resident embedding/head"
            f" {embedding / 1e6:.1f} MB and norms {(resident - embedding) / 1e6:.1f} MB, KV cache for {kv_tokens} tokens "
            f"{kv_bytes(cfg, kv_tokens) / 1e6:.1f} MB, the active rows of one layer and one group's preload "
            f"{(minimum - fixed + staging) / 1e6:.1f} MB); raise the budget, raise the sparsity, lower kv_tokens "
            "or use a smaller layer group"
        )
    # The rest becomes cache. The ops read on demand (o, down) get ONDEMAND_CACHE_WEIGHT times the
    # share of their remaining rows that the preloaded ops get (capped at all of them).
    spare = budget - minimum
    extra_rows = [t - m for t, m in zip(total_rows, min_slots)]
    weights = [1.0 if op in PREDICTED_GROUPS else ONDEMAND_CACHE_WEIGHT for op in OP_GROUPS]

    def cached(share: float) -> float:
        return sum(e * r * min(1.0, w * share) for e, r, w in zip(extra_rows, row_bytes, weights))

    lo, hi = 0.0, 1.0
    if cached(hi) <= spare:
        lo = hi
    else:
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cached(mid) <= spare else (lo, mid)
    slots = tuple(m + int(e * min(1.0, w * lo)) for m, e, w in zip(min_slots, extra_rows, weights))
    return MemoryPlan(budget=budget, baseline=baseline, resident=resident,
                      kv=kv_bytes(cfg, kv_tokens), kv_tokens=kv_tokens, staging=staging, pool_slots=slots,
                      row_bytes=row_bytes, min_pool_slots=min_slots,
                      flash_row_bytes=op_row_bytes(cfg, dtype), embedding=embedding)


def op_ks(cfg, sparsity: SparsityConfig | None) -> tuple[int, ...]:
    return sparsity.ks(cfg) if sparsity is not None else op_input_dims(cfg)


def preload_channels(cfg, sparsity: SparsityConfig | None, superset: float) -> tuple[int, int]:
    """Channels predicted per layer for (qkv, gate_up)."""
    if sparsity is None:
        return cfg.d_model, cfg.d_model
    ks = sparsity.ks(cfg)
    return tuple(min(cfg.d_model, int(round(superset * k))) for k in (ks[0], ks[2]))


def memory_for(cfg, budget: int, sparsity: SparsityConfig | None, *, baseline: int, kv_tokens: int,
               group_size: int, superset: float, q8_embed: bool = False,
               dtype: str = "float32") -> MemoryPlan:
    """The memory plan of one setting (what load, a budget change and the planner all size by);
    dtype: the store's."""
    return plan_memory(cfg, budget, baseline=baseline, kv_tokens=kv_tokens, group_size=group_size,
                       preload_channels=preload_channels(cfg, sparsity, superset), ks=op_ks(cfg, sparsity),
                       q8_embed=q8_embed, dtype=dtype)
