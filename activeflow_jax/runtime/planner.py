"""Choosing sparsity, layer-group size and cache size for a DRAM budget: the paper's cost model.

ActiveFlow (DESIGN.md section 2) predicts a decoded token's time as

    T_decode = T_load + T_onload + max(T_preload, T_comp) + T_comp

We take its terms per layer group, the way our runtime (swap.py) runs a token: at the first layer
of group g the residual predicts the qkv/gate_up channels of group g+1, whose missing rows are
read while group g computes; group 0 has no prediction, and rows found missing when an op runs
are read on demand, the compute waiting. So, with G groups and C_g the compute of group g:

    T_decode = T_load + T_onload + sum_{g < G-1} max(P_{g+1}, C_g) + C_{G-1} + C_head

    T_comp    sum of C_g + C_head: bytes computed / DRAM bandwidth -- the dense lm_head (every
              token reads all of it), each layer's active rows (all rows of dense layers) and half
              the reserved KV cache (attention over a cache that fills up) -- plus the runtime's
              fixed cost per op (a host round trip between jitted stages, OVERHEAD_PER_OP_S)
    P_g       the preload of group g: the predicted qkv/gate_up channels (superset x k, all for a
              dense group) whose rows are not all in the cache; T_preload is their sum
    T_load    group 0's qkv/gate_up rows not in the cache, read on demand (nothing predicts them)
    T_onload  every other read on demand: o/down rows not in the cache, and the active
              qkv/gate_up rows the predictor missed ((1 - recall) of them) that the cache lacks

Reads are priced by how the streaming layout (store/bundles.py) stores rows: per (op, group) an
array [in, N, out] whose inner chunk (~32 KiB) holds a few channels with their N layers' rows.
Any row costs its whole chunk, a channel is needed with probability p (so a chunk of c channels
with 1 - (1 - p)^c), adjacent needed chunks are read as one run (expected length 1 / (1 - q) for
a chunk needed with probability q, at most a shard), and the time is bytes / flash bandwidth at
that run's size (bandwidth.py measures it by read size: 4 KiB reads are ~20x slower per byte than
1 MiB ones here). The paper prices on-demand rows at the single-row size and preloads at the N-row
bundle size; on our layout that is what a sparse read and a dense one come to.

Cache hit rates (the LFU cache is what the pools hold beyond the working set; counters reset per
sequence): rows of dense layers are used by every token, so the LFU keeps them first,
hit = min(1, c / d) for a cache share c (pool slots / the op's rows) and dense-row share d. The
sparse layers' rows share the rest c_s: hit = c_s ** (f ** K) with f = k / in, the share one token
uses. Without locality (f = 1, every row used) this is c; the tighter the active set, the hotter
the cache. K = 1.27 puts hit = 0.75 at c = f = 0.5, the paper's context-level 74-77% with a 50%
cache (then 1.5x k preloaded x 0.5 x 25% missed = 19% of the weights read per token: the paper's
18%). A caller with measured hit rates passes `hit_rate_fn(op, cache_share, keep_fraction)`. A
preloaded channel is skipped only if all N of its rows are cached (hit ** N: the reader fetches
whole bundles). Predictor recall comes from our SmolLM2 measurements at 1.5x k (README: distance 1:
0.909 qkv / 0.889 gate_up; 2: 0.86; 4: 0.82), log-linear in the distance, clamped beyond 4
(optimistic for groups of 8); group g+1's layers sit N..2N-1 layers after the predicting residual.

Search: the paper's greedy rule starts from sp = 1 - budget / model and grows N until preloading
hides behind compute. Here every (sparsity, N) is cheap to price, so all are: sparsity 0 (dense
streaming) and the store's calibrated levels, N in 1, 2, 4, 8; a candidate must fit the budget
(budget.plan_memory, whose leftover becomes the cache). The fastest wins, among sparsities up to
`max_sparsity` (quality: above 50% the 135M model's PPL grows fast); within 5% of it, the lowest
sparsity, then the smallest N whose preload hides behind compute. If nothing under the cap fits,
the lowest sparsity that fits is taken and the explanation says so.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from activeflow_jax.config import MAX_SPARSITY, OP_GROUPS, ModelConfig, SparsityConfig, op_input_dims
from activeflow_jax.errors import InvalidArgumentError
from activeflow_jax.runtime import budget as budget_mod
from activeflow_jax.runtime.bandwidth import Bandwidths

GROUP_SIZES = (1, 2, 4, 8)
PREDICTED = ("qkv", "gate_up")  # residual-stream inputs: preloaded one group ahead (swap.py)
TIE = 0.05  # predicted times this close count as equal: take the lower sparsity
# Predictor recall at a 1.5x k superset, by layer distance (README, SmolLM2-135M).
RECALL_BY_DISTANCE = {"qkv": ((1, 0.909), (2, 0.86), (4, 0.82)), "gate_up": ((1, 0.889), (2, 0.86), (4, 0.82))}
HIT_EXPONENT = math.log(math.log(0.75) / math.log(0.5)) / math.log(0.5)  # hit(c=0.5, f=0.5) = 0.75
# Host work per op and token in the swapping runtime (selection readback, pool lookup, dispatch of
# the next jitted stage), measured on this project's 2-core machine: see the README's planner notes.
OVERHEAD_PER_OP_S = 0.2e-3

HitRateFn = Callable[[str, float, float], float]


def predictor_recall(op: str, distance: float, table: Mapping | None = None) -> float:
    """Share of an op's active channels a residual `distance` layers earlier predicts."""
    points = (table or RECALL_BY_DISTANCE)[op]
    d, r = zip(*sorted(points))
    return float(np.interp(math.log2(max(1.0, distance)), np.log2(d), r))


def modelled_hit_rate(cache_share: float, keep_fraction: float) -> float:
    """Share of a token's active rows (keep_fraction of all) found in a cache holding cache_share
    of all rows; see the module docstring."""
    c = min(1.0, max(0.0, cache_share))
    return float(c ** (min(1.0, max(keep_fraction, 1e-9)) ** HIT_EXPONENT))


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One priced (sparsity, group size); `feasible` False if it does not fit (then only
    `minimum_bytes` is set). Times in seconds per decoded token."""

    sparsity: float
    group_size: int
    feasible: bool
    minimum_bytes: int
    t_comp: float = 0.0
    t_preload: float = 0.0
    t_onload: float = 0.0
    t_load: float = 0.0
    t_decode: float = 0.0
    preload_hidden: bool = False  # every group's preload takes at most its predecessor's compute
    group_preload: float = 0.0  # the longest P_g
    group_comp: float = 0.0  # the C_g it overlaps with
    flash_bytes: float = 0.0  # read per token
    hit_rates: tuple[float, ...] = ()  # per op group, sparse-layer rows
    cache_shares: tuple[float, ...] = ()  # per op group: share of its rows the pool holds
    memory: budget_mod.MemoryPlan | None = None

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.t_decode if self.t_decode > 0 else 0.0

    @property
    def io_exposed(self) -> float:
        """Flash time the compute waits for."""
        return max(0.0, self.t_decode - self.t_comp)

    def as_dict(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "memory"}
        out["tokens_per_s"] = self.tokens_per_s
        return out


@dataclasses.dataclass(frozen=True)
class Plan:
    """The planner's choice for a budget, with its predicted times (seconds per token) and every
    candidate it priced."""

    sparsity: float
    group_size: int
    memory: budget_mod.MemoryPlan
    t_comp: float
    t_preload: float
    t_onload: float
    t_load: float
    t_decode: float
    candidates: tuple[Candidate, ...]
    chosen: Candidate
    budget: int
    model_bytes: int
    levels: tuple[float, ...]
    max_sparsity: float
    capped: bool  # nothing under max_sparsity fit: a higher sparsity was taken
    fixed_sparsity: bool = False
    fixed_group_size: bool = False
    paper_start: float = 0.0  # the paper's starting sparsity, 1 - budget / model, rounded up to a level

    @property
    def tokens_per_s(self) -> float:
        return self.chosen.tokens_per_s

    def as_dict(self) -> dict:
        return {"sparsity": self.sparsity, "group_size": self.group_size, "budget": self.budget,
                "model_bytes": self.model_bytes, "t_comp": self.t_comp, "t_preload": self.t_preload,
                "t_onload": self.t_onload, "t_load": self.t_load, "t_decode": self.t_decode,
                "tokens_per_s": self.tokens_per_s, "capped": self.capped, "levels": list(self.levels),
                "memory": self.memory.as_dict(), "candidates": [c.as_dict() for c in self.candidates],
                "explanation": self.explain()}

    def explain(self) -> str:
        c, m = self.chosen, self.memory
        ms = 1e3
        out = [f"Budget {_mb(self.budget)} of a {_mb(self.model_bytes)} model ({self.budget / self.model_bytes:.0%}).",
               f"Resident: embedding and norms {_mb(m.resident)}, KV cache for {m.kv_tokens} tokens {_mb(m.kv)}, "
               f"rows in flight {_mb(m.staging)}" + (f", process baseline {_mb(m.baseline)}" if m.baseline else "")
               + f"; the rest, {_mb(m.pools)}, holds weight rows."]
        out.append(self._why_sparsity())
        if c.preload_hidden:
            out.append(f"Layer groups of {c.group_size}, so that preloading ({c.group_preload * ms:.1f} ms per group) "
                       f"hides behind compute ({c.group_comp * ms:.1f} ms).")
        else:
            out.append(f"Layer groups of {c.group_size}: preloading ({c.group_preload * ms:.1f} ms per group) does not "
                       f"fully hide behind compute ({c.group_comp * ms:.1f} ms)"
                       + ("." if self.fixed_group_size else "; no group size that fits does better."))
        shares = ", ".join(f"{g} {s:.0%}" for g, s in zip(OP_GROUPS, c.cache_shares))
        hits = ", ".join(f"{h:.0%}" for h in c.hit_rates)
        out.append(f"The remaining {_mb(m.cache)} are a hot-weight cache: the pools hold {shares} of each op's rows "
                   f"(modelled hit rates {hits}).")
        bound = "flash-bound" if c.io_exposed > c.t_comp else "compute-bound"
        out.append(f"Predicted ~{c.tokens_per_s:.1f} tok/s, {bound}: compute {c.t_comp * ms:.1f} ms, waiting for flash "
                   f"{c.io_exposed * ms:.1f} ms (on demand {(c.t_load + c.t_onload) * ms:.1f} ms, preload not hidden "
                   f"{max(0.0, c.io_exposed - c.t_load - c.t_onload) * ms:.1f} ms), {_mb(c.flash_bytes)} read per token.")
        if not self.levels:
            out.append("The store has no calibrated sparsity levels, so only dense streaming was considered: run "
                       "`activeflow calibrate` to allow sparsity.")
        return "\n".join(out)

    def _why_sparsity(self) -> str:
        c = self.chosen
        name = "no sparsity (dense layer streaming)" if not c.sparsity else f"sparsity {c.sparsity:g}"
        if self.fixed_sparsity:
            return f"Sparsity {c.sparsity:g} as asked."
        feasible = [x for x in self.candidates if x.feasible]
        lower = [x for x in feasible if x.sparsity < c.sparsity]
        start = f" (the paper's rule, 1 - budget / model, would start at {self.paper_start:g})"
        if self.capped:
            need = min(x.minimum_bytes for x in self.candidates if x.sparsity <= self.max_sparsity)
            return (f"Chose {name}{start}: nothing at or below the quality cap of {self.max_sparsity:g} fits (that "
                    f"needs at least {_mb(need)}); expect a large quality loss (see `activeflow eval`).")
        if c.sparsity and not lower:
            need = min(x.minimum_bytes for x in self.candidates if x.sparsity < c.sparsity)
            reason = f"lower sparsities do not fit (they need at least {_mb(need)})"
        elif lower:
            best_lower = max(lower, key=lambda x: x.tokens_per_s)
            reason = (f"lower sparsities are predicted slower ({best_lower.sparsity:g}: "
                      f"{best_lower.tokens_per_s:.1f} tok/s against {c.tokens_per_s:.1f})")
        else:
            reason = "it fits, and no sparsity is predicted more than 5% faster"
        faster = [x for x in feasible if x.sparsity > self.max_sparsity and x.t_decode < c.t_decode / (1 + TIE)]
        if faster:
            best = min(faster, key=lambda x: x.t_decode)
            reason += (f"; sparsity {best.sparsity:g} would be faster ({best.tokens_per_s:.1f} tok/s) but is above the "
                       f"quality cap of {self.max_sparsity:g}")
        return f"Chose {name}{start if c.sparsity else ''} because {reason}."


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.0f} MB" if abs(nbytes) >= 10e6 else f"{nbytes / 1e6:.1f} MB"


def minimum_bytes(memory: budget_mod.MemoryPlan) -> int:
    """The minimum working set of the setting `memory` was planned for (what budget.plan_memory
    requires): everything but the cache."""
    return memory.total - memory.cache


def _read_seconds(bw: Bandwidths, channels: int, p_need: float, channel_bytes: int) -> tuple[float, float]:
    """(seconds, bytes) to read the needed channels of one [in, N, out] bundle array when each of
    its `channels` is needed with probability p_need (see the module docstring)."""
    from activeflow_jax.store.bundles import TARGET_CHUNK_BYTES, TARGET_SHARD_BYTES

    p = min(1.0, max(0.0, p_need))
    if p <= 0 or channels <= 0:
        return 0.0, 0.0
    per_chunk = max(1, min(channels, TARGET_CHUNK_BYTES // channel_bytes))
    chunks = -(-channels // per_chunk)
    chunk_bytes = per_chunk * channel_bytes
    q = 1.0 - (1.0 - p) ** per_chunk  # a chunk is needed
    nbytes = chunks * q * chunk_bytes
    run = chunks if q >= 1.0 else min(chunks, 1.0 / (1.0 - q))
    run_bytes = max(chunk_bytes, min(run * chunk_bytes, TARGET_SHARD_BYTES))
    return nbytes / bw.flash_bps(run_bytes), nbytes


def compute_seconds(cfg: ModelConfig, bw: Bandwidths, config: SparsityConfig | None, kv_tokens: int
                    ) -> tuple[list[float], float]:
    """(per layer, head): DRAM time of the bytes a decoded token computes with, plus the runtime's
    fixed cost per op. Attention reads half the reserved KV cache on average (it fills up)."""
    ks, ins, rb = _op_ks(cfg, config), op_input_dims(cfg), budget_mod.op_row_bytes(cfg)
    kv = budget_mod.kv_bytes(cfg, kv_tokens) / cfg.num_layers / 2
    layers = []
    for i in range(cfg.num_layers):
        dense = config is None or not config.is_sparse_layer(i)
        weights = sum((ins[g] if dense else ks[g]) * rb[g] for g in range(len(OP_GROUPS)))
        layers.append((weights + kv) / bw.dram_bps + len(OP_GROUPS) * OVERHEAD_PER_OP_S)
    return layers, cfg.vocab_size * cfg.d_model * budget_mod.F32 / bw.dram_bps


def _op_ks(cfg: ModelConfig, config: SparsityConfig | None) -> tuple[int, ...]:
    from activeflow_jax.runtime.session import op_ks

    return op_ks(cfg, config)


def _hit_rates(cfg: ModelConfig, memory: budget_mod.MemoryPlan, ks: tuple[int, ...], dense: list[bool],
               hit_rate_fn: HitRateFn | None) -> tuple[list[float], list[float], list[float]]:
    """(cache shares, hit rates of sparse-layer rows, of dense-layer rows) per op group."""
    layers, ins = cfg.num_layers, op_input_dims(cfg)
    dense_share = sum(dense) / layers
    shares, hits, dense_hits = [], [], []
    for g, op in enumerate(OP_GROUPS):
        share = memory.pool_slots[g] / (ins[g] * layers)
        shares.append(share)
        dense_hits.append(min(1.0, share / dense_share) if dense_share else 1.0)  # used by every token: kept first
        if dense_share >= 1:
            hits.append(dense_hits[-1])
            continue
        rest, keep = max(0.0, share - dense_share) / (1 - dense_share), ks[g] / ins[g]
        hits.append(float(hit_rate_fn(op, rest, keep)) if hit_rate_fn else modelled_hit_rate(rest, keep))
    return shares, hits, dense_hits


def evaluate(cfg: ModelConfig, budget: int, bw: Bandwidths, sparsity: float, group_size: int, *,
             dense_layers: int = 1, kv_tokens: int = 512, superset: float = 1.5, baseline: int = 0,
             hit_rate_fn: HitRateFn | None = None, recall_table: Mapping | None = None) -> Candidate:
    """Prices one (sparsity, group size) under `budget` bytes."""
    from activeflow_jax.runtime.session import preload_channels
    from activeflow_jax.store.bundles import layer_groups

    config = SparsityConfig(sparsity, dense_layers=dense_layers) if sparsity else None
    ks = _op_ks(cfg, config)
    pre = preload_channels(cfg, config, superset)
    settings = dict(baseline=baseline, kv_tokens=kv_tokens, group_size=group_size, preload_channels=pre, ks=ks)
    minimum = minimum_bytes(budget_mod.plan_memory(cfg, 1 << 62, **settings))
    if budget < minimum:
        return Candidate(sparsity, group_size, False, minimum)
    memory = budget_mod.plan_memory(cfg, budget, **settings)
    ins, rb = op_input_dims(cfg), memory.row_bytes
    dense = [config is None or not config.is_sparse_layer(i) for i in range(cfg.num_layers)]
    shares, hits, dense_hits = _hit_rates(cfg, memory, ks, dense, hit_rate_fn)
    layer_comp, head = compute_seconds(cfg, bw, config, kv_tokens)
    groups = layer_groups(cfg.num_layers, group_size, 0)
    comp = [sum(layer_comp[i] for i in grp) for grp in groups]
    t_load = t_onload = flash_bytes = 0.0
    preload = [0.0] * len(groups)
    for j, grp in enumerate(groups):
        n = len(grp)
        for g, op in enumerate(OP_GROUPS):
            channel_bytes = n * rb[g]  # one channel's rows of the group's n layers: the layout's unit
            keep = [1.0 if dense[i] else ks[g] / ins[g] for i in grp]
            hit = [dense_hits[g] if dense[i] else hits[g] for i in grp]
            if op in PREDICTED and j > 0:  # preloaded during group j-1 (as its first layer selects)
                share = 1.0 if dense[grp[0]] else min(1.0, pre[PREDICTED.index(op)] / ins[g])
                seconds, nbytes = _read_seconds(bw, ins[g], share * (1 - hit[0] ** n), channel_bytes)
                preload[j] += seconds
                flash_bytes += nbytes
                for pos, i in enumerate(grp):  # active rows the prediction missed, on demand
                    recall = share if dense[grp[0]] or dense[i] else predictor_recall(op, n + pos, recall_table)
                    seconds, nbytes = _read_seconds(bw, ins[g], keep[pos] * (1 - recall) * (1 - hit[pos]),
                                                    channel_bytes)
                    t_onload += seconds
                    flash_bytes += nbytes
                continue
            for pos in range(n):  # o/down, and group 0's qkv/gate_up (nothing predicts them)
                seconds, nbytes = _read_seconds(bw, ins[g], keep[pos] * (1 - hit[pos]), channel_bytes)
                if op in PREDICTED:
                    t_load += seconds
                else:
                    t_onload += seconds
                flash_bytes += nbytes
    overlapped = sum(max(preload[j + 1], comp[j]) for j in range(len(groups) - 1))
    t_decode = t_load + t_onload + overlapped + comp[-1] + head
    worst = max(range(1, len(groups)), key=lambda j: preload[j] - comp[j - 1], default=None)
    return Candidate(
        sparsity, group_size, True, minimum, t_comp=sum(comp) + head, t_preload=sum(preload), t_onload=t_onload,
        t_load=t_load, t_decode=t_decode,
        preload_hidden=all(preload[j + 1] <= comp[j] for j in range(len(groups) - 1)),
        group_preload=preload[worst] if worst else 0.0, group_comp=comp[worst - 1] if worst else comp[0],
        flash_bytes=flash_bytes, hit_rates=tuple(hits), cache_shares=tuple(shares), memory=memory)


def plan(cfg: ModelConfig, budget_bytes: int, bandwidths: Bandwidths, *, levels: Sequence[float],
         dense_layers: int = 1, kv_tokens: int = 512, superset: float = 1.5, max_sparsity: float = 0.5,
         sparsity: float | None = None, group_size: int | None = None, baseline: int = 0,
         hit_rate_fn: HitRateFn | None = None, recall_table: Mapping | None = None) -> Plan:
    """The fastest (sparsity, group size) that fits `budget_bytes`, see the module docstring.

    levels        the store's calibrated sparsities (sparse/calibrate.py); 0 (dense) is always a candidate
    sparsity, group_size   fix either (a fixed sparsity need not be calibrated: topk needs no thresholds)
    baseline      process bytes the budget must also hold (budget.plan_memory)
    hit_rate_fn   (op, cache_share, keep_fraction) -> hit rate, replacing the modelled one
    recall_table  {op: ((distance, recall), ...)} for qkv and gate_up, replacing our measurements
    Raises BudgetTooSmallError (stating the smallest minimum) if no candidate fits."""
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, np.integer)) or budget_bytes <= 0:
        raise InvalidArgumentError(f"the DRAM budget must be a positive number of bytes, got {budget_bytes!r} "
                                   "(budget.parse_budget reads '200MB', '50%', 0.5)")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise InvalidArgumentError(f"group_size must be an int >= 1, got {group_size!r}")
    for name, value in (("sparsity", sparsity), ("max_sparsity", max_sparsity)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value <= MAX_SPARSITY):
            raise InvalidArgumentError(f"{name} must be a number in [0, {MAX_SPARSITY}], got {value!r}")
    try:
        levels = tuple(sorted({round(float(x), 4) for x in levels}))
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"levels must be sparsities in (0, {MAX_SPARSITY}], got {levels!r}") from None
    if any(not 0 < x <= MAX_SPARSITY for x in levels):
        raise InvalidArgumentError(f"levels must be calibrated sparsities in (0, {MAX_SPARSITY}], got {list(levels)}")
    if not isinstance(kv_tokens, int) or kv_tokens < 1 or superset < 1:
        raise InvalidArgumentError(f"kv_tokens must be an int >= 1 and superset >= 1, got {kv_tokens!r}, {superset!r}")

    options = (0.0,) + levels
    model = budget_mod.model_weight_bytes(cfg)
    paper_start = next((s for s in options if s >= 1 - budget_bytes / model - 1e-9), options[-1])
    sparsities = [round(float(sparsity), 4)] if sparsity is not None else list(options)
    sizes = [group_size] if group_size is not None else [n for n in GROUP_SIZES if n <= cfg.num_layers]
    candidates = tuple(
        evaluate(cfg, int(budget_bytes), bandwidths, s, n, dense_layers=dense_layers, kv_tokens=kv_tokens,
                 superset=superset, baseline=baseline, hit_rate_fn=hit_rate_fn, recall_table=recall_table)
        for s in sparsities for n in sizes)
    feasible = [c for c in candidates if c.feasible]
    if not feasible:
        smallest = min(candidates, key=lambda c: c.minimum_bytes)
        cfg_sp = SparsityConfig(smallest.sparsity, dense_layers=dense_layers) if smallest.sparsity else None
        from activeflow_jax.runtime.session import op_ks, preload_channels

        try:  # budget.py's own message, for the candidate that needs the least
            budget_mod.plan_memory(cfg, int(budget_bytes), baseline=baseline, kv_tokens=kv_tokens,
                                   group_size=smallest.group_size, ks=op_ks(cfg, cfg_sp),
                                   preload_channels=preload_channels(cfg, cfg_sp, superset))
        except budget_mod.BudgetTooSmallError as exc:
            hint = "" if sparsity is not None or levels else " (the store has no calibrated sparsity: `activeflow calibrate`)"
            raise budget_mod.BudgetTooSmallError(
                f"{exc}; that is the smallest of every setting considered (sparsity {smallest.sparsity:g}, "
                f"layer groups of {smallest.group_size}){hint}") from None
    capped_pool = [c for c in feasible if c.sparsity <= max_sparsity + 1e-9]
    capped = not capped_pool and sparsity is None
    if capped_pool or sparsity is not None:
        pool = capped_pool or feasible
    else:
        lowest = min(c.sparsity for c in feasible)
        pool = [c for c in feasible if c.sparsity == lowest]
    best = min(c.t_decode for c in pool)
    near = [c for c in pool if c.t_decode <= best * (1 + TIE)]
    sp = min(c.sparsity for c in near)
    near = [c for c in near if c.sparsity == sp]
    hidden = [c for c in near if c.preload_hidden]
    chosen = min(hidden, key=lambda c: c.group_size) if hidden else min(near, key=lambda c: c.t_decode)
    return Plan(chosen.sparsity, chosen.group_size, chosen.memory, chosen.t_comp, chosen.t_preload, chosen.t_onload,
                chosen.t_load, chosen.t_decode, candidates, chosen, int(budget_bytes), model, levels,
                float(max_sparsity), capped, sparsity is not None, group_size is not None, paper_start)
