"""Choosing sparsity, layer-group size and cache size for a DRAM budget (the paper's cost model).

Per decoded token, with the bandwidths measured on this machine (runtime/bandwidth.py):

    T_comp     bytes computed / DRAM bandwidth (the resident head + every op's active rows), plus the
               runtime's per-op orchestration cost (4 host round trips per layer, measured ~0.2 ms)
    T_preload  per layer group: the predicted qkv/gate_up rows of the next group the cache lacks,
               read as bundles of N rows per channel
    T_onload   rows read on demand: mispredicted qkv/gate_up rows and every o/down row the cache
               lacks, each also a read of its channel's N-row chunk
               (a read costs the whole flash blocks it touches, at the bandwidth measured for
               reads of that size: `read_seconds`)
    T_decode   = T_onload + sum over groups of max(T_preload(g+1), T_comp(g))

That is the paper's T_load + T_onload + max(T_preload, T_comp) + T_comp with its terms taken per
group: preloading group g+1 overlaps computing group g, on-demand loads do not overlap anything.
The cache hit rate of an op is modelled from the share of its rows the pools can hold (c) and the
sparsity: h = c ** a, a falling with sparsity (a hot set concentrates the use more when fewer
channels are active), fitted to the best fixed hot set of a real trace (bench/swap_bound.py); the
paper reports 74-77% hits at context level. (Until stop 12: h = min(1, c / f) ** 0.7, which
predicted 1.00 where 0.72-0.78 was measured.) Recall of the cross-layer predictor comes from our measurement on SmolLM2
(README: 0.74 at distance 1, 0.68 at 2, 0.62 at 4 for the default 1.0x k; 0.90 / 0.86 / 0.82
for 1.5x k).

Greedy search as the paper's: candidates are sparsity 0 (dense) and the store's calibrated
levels up to `max_sparsity` (quality: above 50% the 135M model's PPL grows fast), and groups of
1, 2, 4, 8 layers; every candidate must fit the budget (budget.plan_memory), what is left is cache.
The fastest wins; within 5%, the lower sparsity. If nothing fits under the cap, the cap is
lifted and the explanation says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from activeflow_jax.config import (
    OP_GROUPS,
    PREDICTED_GROUPS,
    ModelConfig,
    SparsityConfig,
    op_input_dims,
    parse_op_sparsity,
)
from activeflow_jax.errors import InvalidArgumentError
from activeflow_jax.runtime import budget as budget_mod
from activeflow_jax.runtime.bandwidth import Bandwidths

GROUP_SIZES = (1, 2, 4, 8)
# Recall of the predicted set (qkv and gate_up averaged, TEAL 50%; README's predictor table) by
# set size in multiples of k, then distance in layers; distance 8 is extrapolated, not measured.
RECALL = {1.0: ((1, 0.739), (2, 0.677), (4, 0.617), (8, 0.55)),
          1.25: ((1, 0.831), (2, 0.776), (4, 0.723), (8, 0.65)),
          1.5: ((1, 0.899), (2, 0.859), (4, 0.820), (8, 0.75)),
          2.0: ((1, 1.0), (2, 1.0), (4, 1.0), (8, 1.0))}
OVERHEAD_PER_OP_S = 0.2e-3
# Flash is read in whole blocks (O_DIRECT needs them; the page cache reads whole pages), and a
# chunk of the streaming layout starts anywhere in a block: reading c bytes touches 1 + (c - 1) /
# BLOCK blocks on average. Rows of a 4-bit or 8-bit store are far smaller than a block, so this,
# not the row bytes, is what a read costs (measured stop 31: ~2 blocks per on-demand extent).
FLASH_BLOCK = 4096


def read_seconds(chunk_bytes: float, reads: float, bw: Bandwidths) -> float:
    """Seconds to read `reads` separate chunks of `chunk_bytes` each from flash."""
    device = FLASH_BLOCK * (1.0 + max(0.0, chunk_bytes - 1.0) / FLASH_BLOCK)
    return reads * device / bw.flash_bps(device)


def predictor_recall(distance: float, superset: float = budget_mod.DEFAULT_PRELOAD_SUPERSET) -> float:
    sizes = sorted(RECALL)
    by_size = [float(np.interp(distance, *zip(*RECALL[s]))) for s in sizes]
    return float(np.interp(superset, sizes, by_size))


# Hit rate of a cache holding a share c of an op's rows, h = c ** a, with the exponent a by
# sparsity fitted to the best fixed hot set of a real trace (bench/swap_bound.py, SmolLM2, TEAL
# masks, budgets 25-60%; within 0.03 of every point; our LFU measured 0.72-0.85 where this gives
# 0.76). Dense: every row every token, so h = c.
HIT_EXPONENT_BY_SPARSITY = ((0.0, 1.0), (0.3, 0.84), (0.4, 0.78), (0.5, 0.70), (0.6, 0.60), (0.7, 0.41),
                            (0.95, 0.15))


def modelled_hit_rate(cache_share: float, active_share: float) -> float:
    if cache_share >= 1.0:
        return 1.0
    a = float(np.interp(1.0 - active_share, *zip(*HIT_EXPONENT_BY_SPARSITY)))
    return float(max(cache_share, 0.0) ** a)


@dataclasses.dataclass(frozen=True)
class Candidate:
    sparsity: float
    group_size: int
    feasible: bool
    t_comp: float = 0.0
    t_preload: float = 0.0
    t_onload: float = 0.0
    t_decode: float = 0.0
    hit_rates: tuple[float, ...] = ()
    cache_shares: tuple[float, ...] = ()  # per op: share of its rows the pools can hold
    memory: budget_mod.MemoryPlan | None = None
    reason: str = ""
    op_sparsity: tuple[float, ...] | None = None  # a per-op allocation (OP_GROUPS order), if given

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.t_decode if self.t_decode else 0.0


@dataclasses.dataclass(frozen=True)
class Plan:
    sparsity: float
    group_size: int
    chosen: Candidate
    candidates: tuple[Candidate, ...]
    budget: int
    model_bytes: int
    capped: bool
    max_sparsity: float = 0.5
    process: int = 0  # the process outside the model as the loader measured it (0: measure when explaining)
    embedding_params_share: float = 0.0  # the embedding/head table's share of the model's parameters

    @property
    def memory(self) -> budget_mod.MemoryPlan:
        return self.chosen.memory

    def explain(self) -> str:
        c, m = self.chosen, self.chosen.memory
        mb = 1e6
        pools = sum((s + 1) * r for s, r in zip(m.pool_slots, m.row_bytes))
        shares = c.cache_shares
        sp = "no sparsity (dense)" if not c.sparsity else f"sparsity {c.sparsity:.0%}"
        if c.op_sparsity is not None:
            sp += " (allocated: " + ", ".join(f"{g} {x:.0%}" for g, x in zip(OP_GROUPS, c.op_sparsity)) + ")"
        bound = "flash-bound" if c.t_onload + max(0.0, c.t_preload - c.t_comp) > c.t_comp else "compute-bound"
        lines = [
            f"Budget {self.budget / mb:.0f} MB for a {self.model_bytes / mb:.0f} MB model "
            f"({self.budget / self.model_bytes:.0%}).",
            f"Resident: embedding/head {m.embedding / mb:.1f} MB ({self.embedding_params_share:.0%} of the model's "
            f"parameters, {m.embedding / m.total:.0%} of the plan), norms {(m.resident - m.embedding) / mb:.1f} MB, "
            f"KV cache {m.kv / mb:.1f} MB for {m.kv_tokens} "
            f"tokens, staging {m.staging / mb:.1f} MB; slot pools {pools / mb:.1f} MB.",
            f"Chose {sp} with layer groups of {c.group_size}: predicted {c.tokens_per_s:.1f} tok/s "
            f"(compute {c.t_comp * 1e3:.0f} ms, preload {c.t_preload * 1e3:.0f} ms of which "
            f"{min(c.t_preload, c.t_comp) * 1e3:.0f} ms hidden behind compute, on-demand loads "
            f"{c.t_onload * 1e3:.0f} ms per token; {bound}).",
            f"The pools hold {', '.join(f'{g} {s:.0%}' for g, s in zip(OP_GROUPS, shares))} of each op's rows "
            f"(cache {m.cache / mb:.1f} MB beyond the working set); modelled hit rates "
            f"{', '.join(f'{h:.2f}' for h in c.hit_rates)}.",
        ]
        rss = budget_mod.current_rss()
        process = m.baseline or self.process or rss + budget_mod.COMPILE_GROWTH_RESERVE
        lines.append(budget_mod.scope_sentence(m.baseline > 0, process, rss))
        if self.capped:
            lines.append("Nothing fits at or below the sparsity cap, so a higher sparsity was taken: expect a "
                         "large quality loss (see `activeflow eval`).")
        others = sorted((x for x in self.candidates if x.feasible and x is not c
                         and (self.capped or x.sparsity <= self.max_sparsity)), key=lambda x: x.t_decode)[:2]
        if others:
            lines.append("Next best: " + "; ".join(
                f"sparsity {x.sparsity:.0%}, groups of {x.group_size}: {x.tokens_per_s:.1f} tok/s" for x in others) + ".")
        return "\n".join(lines)


def evaluate(cfg: ModelConfig, budget: int, bw: Bandwidths, sparsity: float, group_size: int, *, kv_tokens: int,
             superset: float, baseline: int, hit_rate_fn: Callable | None = None, q8_embed: bool = False,
             op_sparsity: tuple[float, ...] | None = None, dtype: str = "float32") -> Candidate:
    """The cost model for one (sparsity, group size); op_sparsity: a per-op allocation whose byte
    mean is `sparsity`; dtype: the store's (bytes computed and read are the store's)."""
    config = SparsityConfig(sparsity, op_sparsity=op_sparsity) if sparsity else None
    ks = budget_mod.op_ks(cfg, config)
    pre = budget_mod.preload_channels(cfg, config, superset)
    try:
        memory = budget_mod.memory_for(cfg, budget, config, baseline=baseline, kv_tokens=kv_tokens,
                                       group_size=group_size, superset=superset, q8_embed=q8_embed, dtype=dtype)
    except budget_mod.BudgetTooSmallError as exc:
        return Candidate(sparsity, group_size, False, reason=str(exc))
    layers, ins, rb = cfg.num_layers, op_input_dims(cfg), memory.read_row_bytes
    hits, shares = [], []
    for g, op in enumerate(OP_GROUPS):
        share = memory.pool_slots[g] / (ins[g] * layers)
        shares.append(share)
        hits.append(hit_rate_fn(op, share, ks[g] / ins[g]) if hit_rate_fn else modelled_hit_rate(share, ks[g] / ins[g]))
    head = budget_mod.head_bytes(cfg, q8_embed, dtype)
    active = sum(layers * k * r for k, r in zip(ks, rb))
    t_comp = (head + active) / bw.dram_bps + 4 * layers * OVERHEAD_PER_OP_S
    groups = -(-layers // group_size)
    recall = predictor_recall(1.5 * group_size - 0.5, superset) if config is not None else 1.0
    onload = preload_group = 0.0
    for g, op in enumerate(OP_GROUPS):
        missed = layers * ks[g] * (1 - hits[g])  # active rows per token the pools lack
        chunk = group_size * rb[g]  # a read takes the channel's whole chunk: its rows for all layers of the group
        if op in PREDICTED_GROUPS:
            onload += read_seconds(chunk, missed * (1 - recall), bw)
            preload_group += read_seconds(chunk, pre[PREDICTED_GROUPS.index(op)] * (1 - hits[g]), bw)
        else:
            onload += read_seconds(chunk, missed, bw)
    t_comp_group = t_comp / groups
    t_decode = onload + t_comp_group + (groups - 1) * max(preload_group, t_comp_group)
    return Candidate(sparsity, group_size, True, t_comp, preload_group * (groups - 1), onload, t_decode,
                     tuple(hits), tuple(shares), memory, op_sparsity=op_sparsity)


def plan(cfg: ModelConfig, budget: int, bw: Bandwidths, *, levels: Sequence[float], kv_tokens: int = 512,
         superset: float = budget_mod.DEFAULT_PRELOAD_SUPERSET, max_sparsity: float = 0.5,
         sparsity: float | None = None,
         group_size: int | None = None, baseline: int = 0, hit_rate_fn: Callable | None = None,
         q8_embed: bool = False, op_sparsity: Sequence[float] | None = None, process: int = 0,
         dtype: str = "float32") -> Plan:
    """The fastest feasible setting; op_sparsity: a per-op allocation, fixed (with `sparsity` its
    byte mean, see budget.allocated_sparsity): only the group size and the cache are chosen."""
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget <= 0:
        raise InvalidArgumentError(f"budget must be a positive number of bytes, got {budget!r}")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise InvalidArgumentError(f"group_size must be an int >= 1, got {group_size!r}")
    levels = sorted({round(float(x), 4) for x in levels})
    if any(not 0 < x <= 0.95 for x in levels):
        raise InvalidArgumentError(f"sparsity levels must be in (0, 0.95], got {levels}")
    if op_sparsity is not None:
        op_sparsity = parse_op_sparsity(op_sparsity)
        sparsity = budget_mod.allocation_mean(cfg, op_sparsity)
    sparsities = [sparsity] if sparsity is not None else [0.0] + levels
    sizes = [group_size] if group_size is not None else list(GROUP_SIZES)
    cands = tuple(evaluate(cfg, budget, bw, s, n, kv_tokens=kv_tokens, superset=superset, baseline=baseline,
                           hit_rate_fn=hit_rate_fn, q8_embed=q8_embed, op_sparsity=op_sparsity, dtype=dtype)
                  for s in sparsities for n in sizes if n <= cfg.num_layers)
    feasible = [c for c in cands if c.feasible]
    if not feasible:
        smallest = min((c for c in cands), key=lambda c: _minimum_of(c.reason))
        raise budget_mod.BudgetTooSmallError(
            smallest.reason + ("" if sparsity is not None else "; no calibrated sparsity level fits either"
                               + ("" if levels else " (the store has none: run `activeflow calibrate`)")))
    capped_pool = [c for c in feasible if c.sparsity <= max_sparsity + 1e-9]
    capped = not capped_pool
    pool = capped_pool or feasible
    best = min(c.t_decode for c in pool)
    chosen = min((c for c in pool if c.t_decode <= 1.05 * best), key=lambda c: (c.sparsity, c.t_decode))
    return Plan(chosen.sparsity, chosen.group_size, chosen, cands, int(budget), budget_mod.model_weight_bytes(cfg, dtype),
                capped and sparsity is None, max_sparsity, process,
                cfg.vocab_size * cfg.d_model / cfg.num_params())


def _minimum_of(reason: str) -> float:
    import re

    match = re.search(r"minimum working set of ([0-9.]+) MB", reason)
    return float(match.group(1)) if match else float("inf")
