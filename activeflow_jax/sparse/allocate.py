"""Per-op sparsity allocation: how to split one byte budget between qkv, o, gate_up and down.

Dropping half the input channels costs very different amounts per op. On SmolLM2-135M, top-k at
50% on gate_up alone gives KL 0.32 on the calibration text; on down alone 0.03, on o 0.04, on
qkv 0.10, while gate_up holds half of a layer's bytes, down a quarter. A uniform level wastes
quality: the same bytes read per token buy less error when down and o give up more channels and
gate_up fewer (TEAL does a greedy search of this kind per block; this one is per op group, shared
by all layers, so the kernels keep one static k per op).

Search: start from the uniform allocation, then repeatedly try every transfer of sparsity from
one op to another that keeps the share of weight bytes left unread at least the target (raise op
b by `step`, lower op a by the bytes that frees), keep the transfer that lowers the mean
KL(dense || sparse) on the calibration text the most, and halve the step when none helps. The
objective is measured on the shipped calibration corpus (never the evaluation text).
"""

from __future__ import annotations

import dataclasses
import math
import time

from activeflow_jax.config import MAX_SPARSITY, OP_GROUPS
from activeflow_jax.errors import InvalidArgumentError
from activeflow_jax.eval.quality import WindowKL
from activeflow_jax.paths import default_calibration_text
from activeflow_jax.runtime.budget import allocation_mean, layer_op_bytes

LEVEL_GRID = 0.01  # allocations stay on a 1% grid, so calibrating them for the threshold policy is tidy


@dataclasses.dataclass
class AllocationResult:
    levels: tuple[float, ...]  # OP_GROUPS order
    sparsity: float  # share of a layer's weight bytes left unread
    kl: float  # mean KL(dense || sparse) on the search windows
    uniform_kl: float  # the same for the uniform allocation at the target
    evaluations: int
    seconds: float
    history: list[dict]

    def flag(self) -> str:
        """The allocation as `--op-sparsity` takes it."""
        return ",".join(f"{op}={s:g}" for op, s in zip(OP_GROUPS, self.levels))


def _grid(x: float) -> float:
    return round(round(x / LEVEL_GRID) * LEVEL_GRID, 4)


def _floor_grid(x: float) -> float:
    return round(math.floor(x / LEVEL_GRID + 1e-9) * LEVEL_GRID, 4)


def transfers(cfg, levels: tuple[float, ...], target: float, step: float) -> list[tuple[float, ...]]:
    """Every allocation one transfer away: op b up by `step`, op a down by at most the bytes that
    frees (rounded down to the grid, so the byte share stays >= target)."""
    sizes = layer_op_bytes(cfg)
    out = []
    for b in range(len(OP_GROUPS)):
        if levels[b] + step > MAX_SPARSITY + 1e-9:
            continue
        for a in range(len(OP_GROUPS)):
            if a == b:
                continue
            down = _floor_grid(step * sizes[b] / sizes[a])
            if down <= 0 or levels[a] - down < -1e-9:
                continue
            cand = list(levels)
            cand[b], cand[a] = _grid(levels[b] + step), _grid(levels[a] - down)
            # the k rounding can leave the byte share a hair under the target: take back grid steps
            while allocation_mean(cfg, cand) < target - 1e-4 and cand[a] + LEVEL_GRID <= levels[a] + 1e-9:
                cand[a] = _grid(cand[a] + LEVEL_GRID)
            if allocation_mean(cfg, cand) >= target - 1e-4 and tuple(cand) != tuple(levels):
                out.append(tuple(cand))
    return out


def allocate(engine, target: float, *, policy: str = "topk", text_path: str | None = None, windows: int = 4,
             ctx: int = 512, step: float = 0.04, min_step: float = 0.01, max_evaluations: int = 200,
             progress: bool = False) -> AllocationResult:
    """Searches a per-op allocation whose byte share is >= `target` with the least KL to dense."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= MAX_SPARSITY:
        raise InvalidArgumentError(f"target sparsity must be in (0, {MAX_SPARSITY}], got {target!r}")
    if not (LEVEL_GRID <= min_step <= step <= 0.5):
        raise InvalidArgumentError(f"need {LEVEL_GRID} <= min_step <= step <= 0.5, got {min_step!r}, {step!r}")
    cfg = engine.config
    t0 = time.perf_counter()
    objective = WindowKL(engine, text_path or default_calibration_text(), ctx=ctx, windows=windows)
    with engine.sparsity_scope():
        seen: dict[tuple[float, ...], float] = {}

        def kl(levels: tuple[float, ...]) -> float:
            if levels not in seen:
                engine.configure_sparsity(None, policy=policy, op_sparsity=levels)
                seen[levels] = objective(engine)
            return seen[levels]

        current = (_grid(target),) * len(OP_GROUPS)
        uniform = best = kl(current)
        history = [{"levels": list(current), "kl": best, "step": step}]
        while step >= min_step - 1e-9 and len(seen) < max_evaluations:
            candidates = transfers(cfg, current, target, step)
            scores = [(kl(c), c) for c in candidates if len(seen) < max_evaluations or c in seen]
            improved = [(s, c) for s, c in scores if s < best - 1e-6]
            if improved:
                best, current = min(improved)
                history.append({"levels": list(current), "kl": best, "step": step})
                if progress:
                    print(f"allocate: {dict(zip(OP_GROUPS, current))} KL {best:.4f} (step {step:g})", flush=True)
            else:
                step = _grid(step / 2) if step / 2 >= LEVEL_GRID - 1e-9 else 0.0
    return AllocationResult(levels=current, sparsity=allocation_mean(cfg, current), kl=best, uniform_kl=uniform,
                            evaluations=len(seen), seconds=time.perf_counter() - t0, history=history)


__all__ = ["AllocationResult", "allocate", "transfers"]
