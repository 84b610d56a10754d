"""Loading an engine under a DRAM budget: plan, lay out the store for streaming, build the runtime.

Kept apart from engine.py so that the all-in-DRAM engine does not import the runtime.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np

from activeflow_jax.config import SparsityConfig
from activeflow_jax.errors import InvalidArgumentError, StoreError
from activeflow_jax.formats.tokenizer import Tokenizer
from activeflow_jax.models.embedding import Q8Table, q8_embedding_wanted, resident_table
from activeflow_jax.quant import is_quantized
from activeflow_jax.runtime import budget as budget_mod
from activeflow_jax.runtime import heap, planner
from activeflow_jax.runtime.bandwidth import get_bandwidths
from activeflow_jax.runtime.iostats import drop_page_cache
from activeflow_jax.runtime.swap import SwapRuntime
from activeflow_jax.sparse.kernels import resolve_kernel
from activeflow_jax.sparse.thresholds import read_calibration, store_thresholds
from activeflow_jax.store import bundles
from activeflow_jax.store.reader import StoreReader

DEFAULT_GROUP_SIZE = 4
DEFAULT_KV_TOKENS = 512


def resident_embedding(reader: StoreReader, option: Any, kernel: str):
    """The store's tied embedding as it will stay in DRAM: a Q8 table where `option` (Engine.load's
    q8_embedding) allows and the table is exactly Q8_0, else the f32 array (adopted by JAX); None
    for an untied embedding, which stays on flash (a token reads only its own row).
    Read before planning, since its size is part of every plan."""
    wanted = q8_embedding_wanted(reader.config, option) and kernel not in ("gather", "mask")
    if not reader.config.tie_embeddings:  # after the check above, which refuses q8_embedding=True here
        return None

    if option is True and not wanted and not is_quantized(reader.tensor_dtype("embed")):
        raise InvalidArgumentError(f"q8_embedding=True needs the native kernels; kernel={kernel!r} does not use them")
    return resident_table(reader, wanted, option is True)


def load_swapping(engine_cls, store_path, dram_budget: Any, *, sparsity: float | None, policy: str, kernel: str,
                  dense_layers: int, group_size: int | None = None, kv_tokens: int = DEFAULT_KV_TOKENS,
                  superset: float = budget_mod.DEFAULT_PRELOAD_SUPERSET, cold: bool = False, direct_io: bool = False,
                  budget_includes_process: bool = False, relayout: bool = True, plan: bool = True,
                  progress: bool = True, q8_embedding: Any = "auto", op_sparsity=None):
    """An Engine whose weights stay on flash; see Engine.load.

    group_size   layers per preload group (and the store's bundle layout); None: the planner's
    kv_tokens    KV cache positions the budget reserves (longer requests are refused)
    superset     channels preloaded per predicted op, as a multiple of k
    cold         drop the store from the page cache first, so reads come from the device
    direct_io    read with O_DIRECT, and drop the streaming layout from the page cache before every
                 forward pass (TensorStore serves repeated whole-file reads from it even so):
                 what is read is really read
    budget_includes_process  count the process's memory before loading (Python, JAX) too, and
                 reserve budget.COMPILE_GROWTH_RESERVE for what compiling will add
    relayout     write the streaming layout for group_size if the store lacks it
    plan         with sparsity None, let the planner pick sparsity and group size
    op_sparsity  a per-op allocation (budget.allocated_sparsity) instead of one sparsity level
    """

    start = time.perf_counter()
    reader = StoreReader(store_path)
    cfg = reader.config

    dtype = reader.storage_dtype
    budget = budget_mod.parse_budget(dram_budget, cfg, dtype)
    heap.limit_retention()
    if not isinstance(kv_tokens, int) or kv_tokens < 16:
        raise InvalidArgumentError(f"kv_tokens must be an int >= 16, got {kv_tokens!r}")
    kv_tokens = 1 << (kv_tokens.bit_length() - 1)  # KV caches come in powers of two
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise InvalidArgumentError(f"group_size must be an int >= 1, got {group_size!r}")
    # built before the process is measured: a large vocabulary's tokenizer (Gemma 3: 262k tokens,
    # ~515k merges) takes ~130 MB that the budget must count when it covers the process
    tokenizer = Tokenizer.from_spec(reader.tokenizer_spec) if reader.tokenizer_spec else None
    process = budget_mod.current_rss() + budget_mod.COMPILE_GROWTH_RESERVE  # the process outside the model
    baseline = process if budget_includes_process else 0

    embed = resident_embedding(reader, q8_embedding, kernel)
    q8 = isinstance(embed, Q8Table)
    options = dict(policy=policy, kernel=kernel, dense_layers=dense_layers)
    allocation = None
    if op_sparsity is not None:
        allocation = budget_mod.allocated_sparsity(cfg, op_sparsity, **options)
        sparsity = allocation.sparsity
    if group_size is None and relayout and not os.access(reader.path, os.W_OK):
        # a read-only store cannot take a new streaming layout: plan for one it already has
        have = [n for n in bundles.available_group_sizes(reader.path)
                if (bundles.bundle_info(reader.path, n) or {}).get("first_layer") == 0]
        if have:
            group_size = have[0]
            if progress:
                print(f"{reader.path} is read-only: using its streaming layout for groups of {group_size}",
                      file=sys.stderr)
    chosen = _choose(reader, cfg, budget, sparsity, group_size, kv_tokens, superset, baseline, plan, q8,
                     allocation.op_sparsity if allocation is not None else None, process, dtype)
    sparsity, group_size, explanation = chosen
    if not explanation:  # not planned: still say what the budget covers
        scope = budget_mod.scope_sentence(budget_includes_process, process, budget_mod.current_rss())
        explanation = (f"Budget {budget / 1e6:.0f} MB with the sparsity and layer groups ({group_size}) given, "
                       f"not planned. {scope}")
    config = None
    if allocation is not None:
        config = resolve_kernel(allocation)
    elif sparsity:
        config = resolve_kernel(SparsityConfig(sparsity, **options))
    memory = budget_mod.memory_for(cfg, budget, config, baseline=baseline, kv_tokens=kv_tokens, group_size=group_size,
                        superset=superset, q8_embed=q8, dtype=dtype)
    thresholds = None
    if config is not None and config.policy == "threshold":
        thresholds = np.asarray(store_thresholds(reader.path, cfg, config))
    info = bundles.bundle_info(reader.path, group_size)
    if info is None or info.get("first_layer") != 0:
        if not relayout:
            raise InvalidArgumentError(f"store {reader.path} has no streaming layout for groups of {group_size}; "
                                       f"run `activeflow relayout --store {reader.path} --group-size {group_size}`")
        if not os.access(reader.path, os.W_OK):
            have = bundles.available_group_sizes(reader.path)
            raise StoreError(
                f"store {reader.path} is read-only and has no streaming layout for groups of {group_size}, which "
                "running under a DRAM budget reads; run `activeflow relayout --store "
                f"{reader.path} --group-size {group_size}` where it is writable, copy the store to a writable "
                "folder, or load it without a budget" + (f", or with group_size one of {have}" if have else ""))
        if progress:
            print(f"laying out {reader.path} for streaming in groups of {group_size} layers (once)", file=sys.stderr)
        bundles.write_bundles(reader.path, group_size, first_layer=0, progress=progress)
    if cold:
        drop_page_cache(reader.path)
    runtime = SwapRuntime(reader.path, cfg, config, thresholds, memory, group_size=group_size, superset=superset,
                          direct_io=direct_io, embed=embed, process=process)
    del embed
    engine = engine_cls(cfg, {}, tokenizer, store_path=reader.path)
    engine.swap = runtime
    engine.sparsity, engine.plan_explanation = config, explanation
    engine._swap_settings = dict(group_size=group_size, kv_tokens=kv_tokens, superset=superset, baseline=baseline,
                                 q8_embed=q8, dtype=dtype)
    engine.stats.weight_bytes = runtime.resident_bytes
    engine.stats.memory = runtime.memory_breakdown()
    engine.stats.load_seconds = time.perf_counter() - start
    return engine


def _choose(reader, cfg, budget, sparsity, group_size, kv_tokens, superset, baseline, plan, q8_embed,
            op_sparsity=None, process=0, dtype: str = "float32"):
    """(sparsity, group_size, explanation): the planner's choice where not given."""
    if not plan or (sparsity is not None and group_size is not None):
        return sparsity, group_size or DEFAULT_GROUP_SIZE, ""

    calibration = read_calibration(reader.path, cfg)
    levels = sorted(calibration.levels) if calibration is not None else []
    chosen = planner.plan(cfg, budget, get_bandwidths(reader.path), levels=levels, kv_tokens=kv_tokens,
                          superset=superset, sparsity=sparsity, group_size=group_size, baseline=baseline,
                          q8_embed=q8_embed, op_sparsity=op_sparsity, process=process, dtype=dtype)
    return chosen.sparsity or None, chosen.group_size, chosen.explain()


def replan(engine, dram_budget: Any) -> None:
    """New pool sizes for a new budget, same sparsity and layout."""
    s = engine._swap_settings
    cfg = engine.config
    dtype = s.get("dtype", "float32")
    budget = budget_mod.parse_budget(dram_budget, cfg, dtype)
    engine.swap.replan(budget_mod.memory_for(cfg, budget, engine.sparsity, baseline=s["baseline"], kv_tokens=s["kv_tokens"],
                                  group_size=s["group_size"], superset=s["superset"], q8_embed=s["q8_embed"],
                                  dtype=dtype))
