"""Per-op sparsity allocations on a tiny model: config, thresholds, kernels, harness, search."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import activeflow_jax as af
from activeflow_jax.config import OP_GROUPS, SparsityConfig, op_input_dims, parse_op_sparsity, tiny_config
from activeflow_jax.errors import InvalidArgumentError
from activeflow_jax.models import llama
from activeflow_jax.runtime.budget import allocated_sparsity, allocation_mean, layer_op_bytes
from activeflow_jax.testing import make_calibrated_tiny

ALLOC = (0.3, 0.5, 0.3, 0.7)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    tiny, engine, _, text = make_calibrated_tiny(tmp_path_factory.mktemp("alloc"))
    return tiny, engine, text


def test_parse_forms_agree_and_bad_ones_are_clear():
    text = "qkv=0.3,o=0.5,gate_up=0.3,down=0.7"
    assert parse_op_sparsity(text) == parse_op_sparsity(dict(zip(OP_GROUPS, ALLOC))) == ALLOC
    for bad in ("qkv=0.3,o=0.5", "qkv=0.3,o=0.5,gate_up=0.3,down=x", "qkv=0.3,qkv=0.3,o=0.5,gate_up=0.3",
                (0.1, 0.2), {"qkv": 0.1, "o": 0.1, "gate_up": 0.1, "mlp": 0.1}, "qkv=0.3,o=0.5,gate_up=0.3,down=0.99"):
        with pytest.raises(InvalidArgumentError, match="op sparsity"):
            parse_op_sparsity(bad)
    with pytest.raises(InvalidArgumentError, match="above 0"):
        allocated_sparsity(tiny_config(), (0, 0, 0, 0))


def test_the_headline_sparsity_is_the_share_of_bytes_left_unread():
    cfg = tiny_config()
    sp = allocated_sparsity(cfg, ALLOC, policy="topk")
    ks, dims, sizes = sp.ks(cfg), op_input_dims(cfg), layer_op_bytes(cfg)
    assert ks == tuple(round((1 - s) * d) for s, d in zip(ALLOC, dims))
    kept = sum(k / d * b for k, d, b in zip(ks, dims, sizes)) / sum(sizes)
    assert sp.sparsity == pytest.approx(1 - kept, abs=1e-4) == allocation_mean(cfg, ALLOC)
    assert sp.op_levels() == ALLOC and SparsityConfig(0.4).op_levels() == (0.4,) * 4


def test_threshold_columns_come_from_each_ops_level(calibrated):
    tiny, engine, _ = calibrated
    from activeflow_jax.sparse.thresholds import read_calibration, store_thresholds

    calib = read_calibration(tiny.store_path, engine.config)
    got = store_thresholds(tiny.store_path, engine.config, allocated_sparsity(engine.config, ALLOC))
    for g, s in enumerate(ALLOC):
        np.testing.assert_array_equal(got[:, g], calib.thresholds(s)[:, g])
    with pytest.raises(InvalidArgumentError, match="calibrate"):
        store_thresholds(tiny.store_path, engine.config, allocated_sparsity(engine.config, (0.3, 0.5, 0.3, 0.6)))


@pytest.mark.parametrize("policy", ["topk", "threshold"])
def test_every_kernel_computes_the_same_allocated_model(calibrated, policy):
    tiny, engine, _ = calibrated
    cfg = engine.config
    from activeflow_jax.sparse import native
    from activeflow_jax.sparse.thresholds import store_thresholds

    prompt = np.arange(3, 30, dtype=np.int32)
    outs = {}
    for kernel in ("gather", "mask") + (("native",) if native.available() else ()):
        sp = allocated_sparsity(cfg, ALLOC, policy=policy, kernel=kernel)
        thr = jnp.asarray(store_thresholds(tiny.store_path, cfg, sp))
        cache = llama.KVCache.zeros(cfg, 64)
        prefill, cache = llama.forward(engine.params, cache, jnp.asarray(prompt), 0, len(prompt), thr, cfg=cfg,
                                       attn_len=64, all_logits=True, sparse=sp)
        step, _ = llama.forward(engine.params, cache, jnp.asarray([7], jnp.int32), len(prompt), 1, thr, cfg=cfg,
                                attn_len=64, all_logits=False, sparse=sp)
        outs[kernel] = np.concatenate([np.asarray(prefill), np.asarray(step)])
    for out in outs.values():
        np.testing.assert_allclose(out, outs["mask"], rtol=1e-5, atol=1e-5 * np.abs(outs["mask"]).max())
    uniform = SparsityConfig(0.5, policy=policy, kernel="mask")
    thr = jnp.asarray(store_thresholds(tiny.store_path, cfg, uniform))
    other, _ = llama.forward(engine.params, llama.KVCache.zeros(cfg, 64), jnp.asarray(prompt), 0, len(prompt), thr,
                             cfg=cfg, attn_len=64, all_logits=True, sparse=uniform)
    assert not np.allclose(np.asarray(other), outs["mask"][:-1], atol=1e-4)  # the allocation is really used


def test_engine_and_harness_take_an_allocation(calibrated):
    tiny, engine, text = calibrated
    from activeflow_jax.eval.quality import QualitySetting, evaluate_quality

    with pytest.raises(InvalidArgumentError, match="not both"):
        engine.configure_sparsity(0.5, op_sparsity=ALLOC)
    report = evaluate_quality(engine, str(text), [QualitySetting("dense"), QualitySetting("a", policy="topk",
                                                                                          op_sparsity=ALLOC)],
                              ctx=64, max_windows=2)
    dense, row = report.rows
    assert dense.kl_mean == 0 and row.kl_mean > 0
    assert row.sparsity == allocation_mean(engine.config, ALLOC)
    for g, s in zip(OP_GROUPS, ALLOC):
        assert row.kept_fraction[g] == pytest.approx(1 - s, abs=0.02)
    assert engine.sparsity is None
    loaded = af.Engine.load(tiny.store_path, op_sparsity="qkv=0.3,o=0.5,gate_up=0.3,down=0.7", policy="topk")
    assert loaded.sparsity.op_sparsity == ALLOC
    # under a DRAM budget: the same outputs as all in DRAM, with each op's own k (thresholds too)
    ids = [5, 17, 33, 2, 90, 41]
    for policy in ("topk", "threshold"):
        dram = af.Engine.load(tiny.store_path, op_sparsity=ALLOC, policy=policy)
        budgeted = af.Engine.load(tiny.store_path, op_sparsity=ALLOC, policy=policy, dram_budget="2MB", group_size=1,
                                  kv_tokens=32, plan=False, progress=False)
        assert budgeted.sparsity.op_sparsity == ALLOC and budgeted.sparsity.ks(engine.config) == dram.sparsity.ks(
            engine.config)
        want = dram.logits(ids)
        np.testing.assert_allclose(budgeted.logits(ids), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        assert list(budgeted.generate_ids(ids, max_new_tokens=6)) == list(dram.generate_ids(ids, max_new_tokens=6))
    with pytest.raises(InvalidArgumentError, match="not both"):
        af.Engine.load(tiny.store_path, sparsity=0.5, op_sparsity=ALLOC, dram_budget=1.0)


def test_planner_takes_an_allocation():
    from activeflow_jax.runtime import bandwidth, planner
    from activeflow_jax.runtime.budget import parse_budget

    cfg = tiny_config(num_layers=20, d_model=128, d_ff=512, vocab_size=300)
    bw = bandwidth.Bandwidths(14.5e9, ((4096, 35e6), (65536, 560e6), (1 << 20, 690e6)))
    chosen = planner.plan(cfg, parse_budget(0.5, cfg), bw, levels=[0.5], kv_tokens=32, op_sparsity=ALLOC)
    assert chosen.sparsity == allocation_mean(cfg, ALLOC) and chosen.chosen.op_sparsity == ALLOC
    assert {c.sparsity for c in chosen.candidates} == {chosen.sparsity}  # only the group size is chosen
    uniform = planner.plan(cfg, parse_budget(0.5, cfg), bw, levels=[0.5], kv_tokens=32, sparsity=0.5,
                           group_size=chosen.group_size)
    assert chosen.memory.min_pool_slots != uniform.memory.min_pool_slots  # each op's own k
    assert "allocated: qkv 30%" in chosen.explain()


def test_transfers_keep_the_byte_share():
    from activeflow_jax.sparse.allocate import transfers

    cfg = tiny_config()
    start = (0.5,) * 4
    moves = transfers(cfg, start, 0.5, 0.04)
    assert moves and len(set(moves)) == len(moves)
    for m in moves:
        assert allocation_mean(cfg, m) >= 0.5 - 1e-4
        assert sum(a != b for a, b in zip(m, start)) == 2


def test_search_lowers_kl_at_the_same_bytes(calibrated):
    _, engine, text = calibrated
    from activeflow_jax.sparse.allocate import allocate

    result = allocate(engine, 0.5, text_path=str(text), windows=1, ctx=64, step=0.08, min_step=0.04,
                      max_evaluations=40)
    assert result.sparsity >= 0.5 - 1e-4
    assert result.kl <= result.uniform_kl
    assert result.history[0]["levels"] == [0.5] * 4 and result.evaluations <= 40
    assert result.flag().startswith("qkv=")
    assert engine.sparsity is None
    with pytest.raises(InvalidArgumentError, match="target"):
        allocate(engine, 1.5, text_path=str(text))
