"""The planner (cost model, greedy choice) and the cached bandwidth measurement."""

from __future__ import annotations

import json

import pytest

from activeflow_jax.config import ModelConfig
from activeflow_jax.errors import InvalidArgumentError
from activeflow_jax.runtime import bandwidth, planner
from activeflow_jax.runtime.budget import BudgetTooSmallError, parse_budget

SMOL = ModelConfig(arch="llama", num_layers=30, d_model=576, d_ff=1536, num_heads=9, num_kv_heads=3, head_dim=64,
                   vocab_size=49152, rope_theta=1e5, norm_eps=1e-5, max_context=8192, tie_embeddings=True)
LEVELS = [0.1 * i for i in range(1, 10)]


def _bw(flash_scale: float = 1.0) -> bandwidth.Bandwidths:
    points = ((4096, 35e6), (16384, 240e6), (65536, 560e6), (1 << 20, 690e6))
    return bandwidth.Bandwidths(14.5e9, tuple((c, r * flash_scale) for c, r in points))


def test_bigger_budgets_never_need_more_sparsity():
    chosen = [planner.plan(SMOL, parse_budget(f, SMOL), _bw(), levels=LEVELS, kv_tokens=128)
              for f in (1.0, 0.6, 0.4, 0.25)]
    assert all(a.sparsity <= b.sparsity for a, b in zip(chosen, chosen[1:]))
    assert all(p.memory.total <= p.budget for p in chosen)
    assert chosen[-1].capped and "higher sparsity" in chosen[-1].explain()
    text = chosen[1].explain()
    assert "Chose sparsity" in text and "groups of" in text and "tok/s" in text


def test_fast_flash_never_predicts_slower():
    for frac in (0.6, 0.4):
        slow = planner.plan(SMOL, parse_budget(frac, SMOL), _bw(1.0), levels=LEVELS, kv_tokens=128)
        fast = planner.plan(SMOL, parse_budget(frac, SMOL), _bw(10.0), levels=LEVELS, kv_tokens=128)
        assert fast.chosen.t_decode <= slow.chosen.t_decode


def test_fixed_choices_and_bad_input():
    p = planner.plan(SMOL, parse_budget(0.6, SMOL), _bw(), levels=LEVELS, sparsity=0.4, group_size=2, kv_tokens=128)
    assert (p.sparsity, p.group_size) == (0.4, 2)
    with pytest.raises(BudgetTooSmallError, match=r"minimum working set of [0-9.]+ MB"):
        planner.plan(SMOL, 50_000_000, _bw(), levels=LEVELS)
    with pytest.raises(InvalidArgumentError):
        planner.plan(SMOL, -5, _bw(), levels=LEVELS)
    with pytest.raises(InvalidArgumentError):
        planner.plan(SMOL, 10**9, _bw(), levels=[1.5])
    with pytest.raises(InvalidArgumentError):
        planner.plan(SMOL, 10**9, _bw(), levels=LEVELS, group_size=0)


def test_bandwidths_are_cached_not_remeasured(tmp_path, monkeypatch):
    calls = []

    def fake_flash(directory, *a, **k):
        calls.append(directory)
        return [{"chunk_kib": 4, "bytes": 4096, "seconds": 1e-4}, {"chunk_kib": 1024, "bytes": 1 << 20, "seconds": 1e-3}]

    monkeypatch.setattr(bandwidth, "measure_flash", fake_flash)
    monkeypatch.setattr(bandwidth, "measure_dram", lambda: 1e10)
    monkeypatch.setenv("ACTIVEFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ACTIVEFLOW_BANDWIDTH_FILE", raising=False)
    store = tmp_path / "store"
    (store / "tensors").mkdir(parents=True)
    first = bandwidth.get_bandwidths(str(store))
    second = bandwidth.get_bandwidths(str(store))
    assert first == second and len(calls) == 1
    bandwidth.get_bandwidths(str(store), remeasure=True)
    assert len(calls) == 2
    assert abs(first.flash_bps(64 << 10) - first.flash_bps(64 << 10)) == 0
    assert first.flash_bps(4096) < first.flash_bps(1 << 20)
    # measured while other processes kept the cores busy: used, but not cached
    monkeypatch.setattr(bandwidth, "others_share", lambda *a: 0.9)
    busy_store = tmp_path / "other" / "store"
    (busy_store / "tensors").mkdir(parents=True)
    monkeypatch.setattr(bandwidth, "_key", lambda d: str(d))  # another device: nothing cached for it
    n = len(calls)
    busy = bandwidth.get_bandwidths(str(busy_store))
    assert busy.flash_bps_by_chunk == first.flash_bps_by_chunk
    bandwidth.get_bandwidths(str(busy_store))
    assert len(calls) == n + 2  # measured again: the busy figures were not kept
    monkeypatch.setattr(bandwidth, "others_share", lambda *a: 0.1)
    bandwidth.get_bandwidths(str(busy_store))
    bandwidth.get_bandwidths(str(busy_store))
    assert len(calls) == n + 3  # quiet: measured once more, then cached


def test_others_share_counts_other_processes_only():
    assert bandwidth.others_share(None, (1.0, 0.0), 2.0) == 0.0
    assert bandwidth.others_share((0.0, 0.0), (3.0, 1.0), 0.1) == 0.0  # too short to tell
    import os

    cores = os.cpu_count() or 1
    assert bandwidth.others_share((0.0, 0.0), (2.0 * cores + 1.0, 1.0), 2.0) == 1.0
    assert bandwidth.others_share((10.0, 5.0), (11.0, 6.0), 2.0) == 0.0  # all of it was ours


def test_plan_cli(tiny_model, tmp_path, monkeypatch, capsys):
    from activeflow_jax.cli import main

    path = tmp_path / "bw.json"
    path.write_text(json.dumps(_bw().to_json()))
    monkeypatch.setenv("ACTIVEFLOW_BANDWIDTH_FILE", str(path))
    assert main(["plan", "--store", tiny_model.store_path, "--dram-budget", "4MB", "--kv-tokens", "32"]) == 0
    out = capsys.readouterr().out
    assert "Budget 4 MB" in out and "calibrate" in out  # the tiny store has no calibration: dense only
    assert main(["plan", "--store", tiny_model.store_path, "--dram-budget", "lots"]) != 0


@pytest.mark.parametrize("dtype,q8_embed", [("float32", False), ("float32", True), ("q4", False)])
def test_the_plan_names_the_embedding_and_its_minimum_holds_it(dtype, q8_embed):
    # a small model with Gemma 3's 262k vocabulary: the tied embedding is most of its bytes
    import dataclasses

    from activeflow_jax.config import tiny_config
    from activeflow_jax.quant import row_bytes

    big = tiny_config(num_layers=4, d_model=64, d_ff=128, vocab_size=262144)
    small = dataclasses.replace(big, vocab_size=1024)
    table = {"float32": 64 * 4, "q4": row_bytes("q8", 64)}[dtype] if not q8_embed else row_bytes("q8", 64)  # q4 store: q8 table

    def fixed(cfg, budget):
        return planner.plan(cfg, budget, _bw(), levels=LEVELS, sparsity=0.5, group_size=2, kv_tokens=64,
                            q8_embed=q8_embed, dtype=dtype)

    plans = {cfg.vocab_size: fixed(cfg, 10**9) for cfg in (big, small)}
    memory = plans[262144].memory
    assert memory.embedding == 262144 * table
    parts = memory.breakdown()
    assert parts["embedding"]["bytes"] == memory.embedding
    assert sum(p["bytes"] for p in parts.values()) == memory.total
    assert parts["embedding"]["share"] == pytest.approx(memory.embedding / memory.total)
    assert memory.as_dict()["breakdown"]["embedding"]["bytes"] == memory.embedding
    # the minimum working set holds the whole table: exactly the vocabulary's difference in rows
    assert memory.minimum - plans[1024].memory.minimum == (262144 - 1024) * table
    assert fixed(big, memory.minimum).memory.cache == 0
    with pytest.raises(BudgetTooSmallError, match=rf"embedding/head {memory.embedding / 1e6:.1f} MB"):
        fixed(big, memory.minimum - 1)
    text = plans[262144].explain()
    share = 262144 * 64 / big.num_params()
    assert share > 0.98 and f"embedding/head {memory.embedding / 1e6:.1f} MB ({share:.0%} of the model's" in text


def test_gemma_norms_are_counted_resident():
    # four norms a layer (post-norms) and the q/k norms: every norm parameter stays in DRAM
    import numpy as np

    from activeflow_jax.models.llama import param_shapes
    from activeflow_jax.runtime.budget import head_bytes, resident_bytes
    from activeflow_jax.testing import tiny_gemma3_config

    cfg = tiny_gemma3_config()
    norms = sum(int(np.prod(shape)) for name, shape in param_shapes(cfg).items() if "norm" in name)
    assert norms == 3 * (4 * 64 + 2 * 32) + 64
    assert resident_bytes(cfg) - head_bytes(cfg) == 4 * norms
