"""Contextual sparsity on tiny models: kernels equal masked dense, calibration, bad input."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import activeflow_jax as af
from activeflow_jax.config import OP_GROUPS, PredictionConfig, SparsityConfig, op_input_dims
from activeflow_jax.errors import InvalidArgumentError, StoreError
from activeflow_jax.models import llama
from activeflow_jax.sparse import kernels
from activeflow_jax.sparse.calibrate import calibrate
from activeflow_jax.sparse.thresholds import read_calibration
from activeflow_jax.testing import CALIBRATION_PROSE, make_calibrated_tiny
from conftest import require_native



@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    return make_calibrated_tiny(tmp_path_factory.mktemp("sparse"))


@pytest.mark.parametrize("policy", ["topk", "threshold"])
def test_gather_kernel_equals_masked_dense(policy):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 96)).astype(np.float32)
    w = rng.standard_normal((96, 40)).astype(np.float32)
    k, thr = 48, 0.5
    got = np.asarray(kernels.gather_linear(jnp.asarray(x), jnp.asarray(w), k, thr, policy))
    a = np.abs(x[0])
    keep = a >= np.sort(a)[::-1][k - 1]
    if policy == "threshold":
        keep &= a >= thr
    want = (x * keep) @ w  # an independent masked dense product in NumPy
    assert keep.sum() <= k
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_native_kernel_builds_and_matches():
    from activeflow_jax.sparse import native

    require_native()
    rng = np.random.default_rng(5)
    w = rng.standard_normal((300, 70)).astype(np.float32)
    rows = np.sort(rng.choice(300, 37, replace=False)).astype(np.int32)
    xk = rng.standard_normal(37).astype(np.float32)
    xk[-3:] = 0.0  # padding entries contribute nothing
    got = np.asarray(native.gather_matvec(jnp.asarray(xk), jnp.asarray(rows), jnp.asarray(w)))
    np.testing.assert_allclose(got, xk @ w[rows], rtol=1e-5, atol=1e-5)
    big = rng.standard_normal((576, 3072)).astype(np.float32)  # large enough to use the thread pool
    rows = np.arange(0, 576, 2, dtype=np.int32)
    xk = rng.standard_normal(288).astype(np.float32)
    np.testing.assert_allclose(np.asarray(native.gather_matvec(jnp.asarray(xk), jnp.asarray(rows), jnp.asarray(big))),
                               xk @ big[rows], rtol=1e-4, atol=1e-4)


def test_native_head_kernel_matches_and_reads_thresholds_from_the_table():
    from activeflow_jax.sparse import native

    require_native()
    rng = np.random.default_rng(6)
    for v, d in ((301, 37), (49152 // 8, 576)):  # odd shapes (row and lane tails); a threaded size
        e = rng.standard_normal((v, d)).astype(np.float32)
        x = rng.standard_normal(d).astype(np.float32)
        np.testing.assert_allclose(np.asarray(native.rows_dot(jnp.asarray(x), jnp.asarray(e))), e @ x,
                                   rtol=1e-4, atol=1e-4)
    # the decode kernel takes the whole threshold table and an index: same result as the scalar
    w = rng.standard_normal((64, 20)).astype(np.float32)
    x = rng.standard_normal(64).astype(np.float32)
    table = np.abs(rng.standard_normal((3, 4))).astype(np.float32)
    for index in (0, 7, 11):
        got = native.topk_matvec(jnp.asarray(x), jnp.asarray(w), 40, jnp.asarray(table), True, index=index)
        want = native.topk_matvec(jnp.asarray(x), jnp.asarray(w), 40, float(table.reshape(-1)[index]), True)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="outside"):
        native.topk_matvec(jnp.asarray(x), jnp.asarray(w), 40, jnp.asarray(table), True, index=12)


@pytest.mark.parametrize("heads,kv_heads,head_dim,attn_len,pos,cache_len", [
    (4, 2, 16, 16, 0, 64), (4, 2, 16, 16, 15, 64), (9, 3, 64, 512, 300, 512),  # SmolLM2's heads, threaded size
])
def test_native_one_token_attention_equals_xla(heads, kv_heads, head_dim, attn_len, pos, cache_len):
    """The native attention of one decoded token computes llama.attend (RoPE, cache write at pos,
    attention over [0, pos]); it writes the new k/v into the donated caches in place."""
    import dataclasses

    from activeflow_jax.models import llama
    from activeflow_jax.sparse import native
    from activeflow_jax.testing import tiny_config

    require_native()
    cfg = dataclasses.replace(tiny_config(), num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                              rope_theta=100000.0)
    rng = np.random.default_rng(pos)
    qkv = jnp.asarray(rng.standard_normal((1, cfg.q_dim + 2 * cfg.kv_dim)), jnp.float32)
    caches = [rng.standard_normal((kv_heads, cache_len, head_dim)).astype(np.float32) for _ in range(2)]
    bias = llama.causal_bias(pos, 1, attn_len)
    want = jax.jit(lambda q, k, v: llama.attend(cfg, q, k, v, pos, bias, attn_len))(
        qkv, jnp.asarray(caches[0]), jnp.asarray(caches[1]))
    native_attend = jax.jit(lambda q, k, v, p: llama.attend(cfg, q, k, v, p, bias, attn_len, native=True),
                            donate_argnums=(1, 2))
    k_in, v_in = jnp.asarray(caches[0]), jnp.asarray(caches[1])
    got = native_attend(qkv, k_in, v_in, jnp.int32(pos))
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-5, atol=1e-5)
    for g, w, before in zip(got[1:], want[1:], caches):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)
        changed = np.any(np.asarray(g) != before, axis=(0, 2))
        assert changed[pos] and changed.sum() == 1  # only this token's position was written
    assert k_in.is_deleted() and v_in.is_deleted()  # donated: the outputs alias them, so no cache copy


def test_native_one_token_rms_norm_equals_xla():
    from activeflow_jax.models import llama
    from activeflow_jax.sparse import native

    require_native()
    rng = np.random.default_rng(2)
    for d in (64, 576, 37):  # the tail of a non-multiple of the 8 lanes too
        x = jnp.asarray(rng.standard_normal((1, d)) * 3, jnp.float32)
        w = jnp.asarray(rng.standard_normal(d), jnp.float32)
        want = llama.rms_norm(x, w, 1e-5)
        got = jax.jit(lambda x, w: llama.rms_norm(x, w, 1e-5, native=True))(x, w)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    x2 = jnp.asarray(rng.standard_normal((3, 37)), jnp.float32)  # several tokens: the XLA path, unchanged
    np.testing.assert_array_equal(np.asarray(llama.rms_norm(x2, w, 1e-5, native=True)),
                                  np.asarray(llama.rms_norm(x2, w, 1e-5)))


def test_active_mask_counts():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((7, 50)), jnp.float32)
    assert (np.asarray(kernels.active_mask(x, 20, 0.0, "topk")).sum(-1) == 20).all()
    m = np.asarray(kernels.active_mask(x, 20, 1.0, "threshold"))
    assert (m.sum(-1) <= 20).all() and (np.abs(np.asarray(x))[m] >= 1.0).all()


@pytest.mark.parametrize("policy", ["topk", "threshold"])
def test_sparse_decode_gather_equals_mask_kernel(calibrated, policy):
    tiny, engine, calib, _ = calibrated
    cfg = engine.config
    thresholds = jnp.asarray(calib.thresholds(0.5))
    prompt = np.arange(3, 40, dtype=np.int32)
    from activeflow_jax.sparse import native

    outs = {}
    kernels_to_test = ("gather", "mask") + (("native",) if native.available() else ())
    for kernel in kernels_to_test:
        sparse = SparsityConfig(0.5, policy=policy, kernel=kernel)
        cache = llama.KVCache.zeros(cfg, 64)
        prefill, cache = llama.forward(engine.params, cache, jnp.asarray(prompt), 0, len(prompt), thresholds,
                                       cfg=cfg, attn_len=64, all_logits=True, sparse=sparse)
        steps = [np.asarray(prefill)]  # the prefill's masks too (native: selected by the native kernel)
        for i, tok in enumerate([5, 77, 123]):
            logits, cache = llama.forward(engine.params, cache, jnp.asarray([tok], jnp.int32), len(prompt) + i, 1,
                                          thresholds, cfg=cfg, attn_len=64, all_logits=False, sparse=sparse)
            steps.append(np.asarray(logits))
        outs[kernel] = np.concatenate(steps)
    for kernel in kernels_to_test:
        np.testing.assert_allclose(outs[kernel], outs["mask"], rtol=1e-5, atol=1e-5 * np.abs(outs["mask"]).max())


def test_sparsity_zero_is_exactly_dense(calibrated):
    _, engine, _, _ = calibrated
    ids = np.arange(5, 45)
    dense = engine.logits(ids)
    engine.configure_sparsity(0.0)
    try:
        assert engine.sparsity is None
        np.testing.assert_array_equal(engine.logits(ids), dense)
    finally:
        engine.configure_sparsity(None)


def test_sparse_prefill_then_decode_equals_full_sparse_forward(calibrated):
    # the decode path (gather kernel) must continue exactly what the masked full forward computes
    _, engine, _, _ = calibrated
    engine.configure_sparsity(0.5)
    try:
        prompt = list(range(10, 30))
        generated = list(engine.generate_ids(prompt, max_new_tokens=10, stop_ids=frozenset()))
        full = engine.logits(prompt + generated[:-1])
        assert full[len(prompt) - 1:].argmax(-1).tolist() == generated
    finally:
        engine.configure_sparsity(None)


def test_sparsity_changes_the_function_and_more_sparsity_moves_further(calibrated):
    _, engine, _, _ = calibrated
    ids = np.arange(5, 60)
    dense = engine.logits(ids)
    diffs = []
    for s in (0.3, 0.7):
        engine.configure_sparsity(s)
        diffs.append(np.abs(engine.logits(ids) - dense).mean())
    engine.configure_sparsity(None)
    assert 0 < diffs[0] < diffs[1]


def test_calibrated_thresholds_hit_the_target_fraction(calibrated):
    tiny, engine, calib, _ = calibrated
    ids = np.asarray(engine.tokenizer.encode(CALIBRATION_PROSE)[:512], np.int32)
    _, taps = llama.forward_with_taps(engine.params, jnp.asarray(ids), cfg=engine.config)
    for s in (0.3, 0.5, 0.7):
        thr = calib.thresholds(s)
        for g, name in enumerate(OP_GROUPS):
            a = np.abs(np.asarray(taps[name]))  # [L, T, d]
            below = (a < thr[:, g, None, None]).mean()
            assert abs(below - s) < 0.05, (s, name, below)
    assert (calib.thresholds(0.3) <= calib.thresholds(0.5)).all()
    assert (calib.thresholds(0.5) <= calib.thresholds(0.7)).all()


def test_calibration_is_saved_atomically_and_merged(calibrated, tmp_path):
    tiny, engine, _, text = calibrated
    again = calibrate(engine, str(text), levels=(0.4,), progress=False)
    assert again.available == [0.3, 0.4, 0.5, 0.7]
    loaded = read_calibration(tiny.store_path, engine.config)
    assert loaded.available == [0.3, 0.4, 0.5, 0.7]
    np.testing.assert_allclose(loaded.thresholds(0.5), again.thresholds(0.5))
    assert loaded.source["tokens"] >= 1024


def test_predicted_superset_covering_everything_is_exact(calibrated):
    _, engine, _, _ = calibrated
    ids = np.arange(5, 60)
    engine.configure_sparsity(0.5)
    exact = engine.logits(ids)
    engine.configure_sparsity(0.5, prediction=PredictionConfig(distance=1, superset=2.0))  # 2 x k = all channels
    assert np.array_equal(engine.logits(ids), exact)
    engine.configure_sparsity(0.5, prediction=PredictionConfig(distance=1, superset=1.0))
    assert not np.allclose(engine.logits(ids), exact)
    engine.configure_sparsity(None)


def test_ks_are_static_per_op_group():
    from activeflow_jax.config import tiny_config

    cfg = tiny_config()
    ks = SparsityConfig(0.5).ks(cfg)
    assert ks == tuple(round(d / 2) for d in op_input_dims(cfg))


# ------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("bad", [-0.1, 0.96, 1.0, "0.5", True, float("nan")])
def test_sparsity_out_of_range(bad):
    with pytest.raises(InvalidArgumentError, match="sparsity must be"):
        SparsityConfig(bad)


def test_store_without_thresholds(tmp_path):
    from activeflow_jax.testing import make_tiny_store

    tiny = make_tiny_store(tmp_path)
    with pytest.raises(InvalidArgumentError, match="activeflow calibrate"):
        af.Engine.load(tiny.store_path, sparsity=0.5)
    engine = af.Engine.load(tiny.store_path, sparsity=0.5, policy="topk")  # top-k needs no thresholds
    assert engine.sparsity.sparsity == 0.5


def test_uncalibrated_level_lists_the_available_ones(calibrated):
    tiny, _, _, _ = calibrated
    with pytest.raises(InvalidArgumentError, match=r"calibrated levels: 0\.3, .*0\.5.*calibrate"):
        af.Engine.load(tiny.store_path, sparsity=0.65)


def test_calibration_text_too_short(calibrated, tmp_path):
    _, engine, _, _ = calibrated
    short = tmp_path / "short.txt"
    short.write_text("Too short to calibrate anything.")
    with pytest.raises(InvalidArgumentError, match="too short"):
        calibrate(engine, str(short), progress=False)
    with pytest.raises(InvalidArgumentError, match="levels"):
        calibrate(engine, str(short), levels=(0.0,), progress=False)
    with pytest.raises(InvalidArgumentError, match="not found"):
        calibrate(engine, str(tmp_path / "missing.txt"), progress=False)


def test_damaged_calibration_file_is_a_clear_error(tmp_path):
    from activeflow_jax.store import layout
    from activeflow_jax.testing import make_tiny_store

    tiny = make_tiny_store(tmp_path)
    path = f"{tiny.store_path}/{layout.CALIBRATION}"
    with open(path, "w") as f:
        f.write('{"version": 1, "op_groups": ["qkv"')
    with pytest.raises(StoreError, match="damaged.*calibrate again"):
        af.Engine.load(tiny.store_path, sparsity=0.5)
    with open(path, "w") as f:
        json.dump({"version": 1, "op_groups": list(OP_GROUPS), "levels": {"0.5": [[1.0]]}}, f)
    with pytest.raises(StoreError, match="damaged"):
        af.Engine.load(tiny.store_path, sparsity=0.5)


def test_kth_largest_is_exact():
    rng = np.random.default_rng(3)
    a = np.abs(rng.standard_normal((9, 301))).astype(np.float32)
    a[0, :5] = 0.0
    a[1] = 2.5  # all tied
    for k in (1, 7, 150, 301):
        got = np.asarray(kernels.kth_largest(jnp.asarray(a), k))
        np.testing.assert_array_equal(got, -np.sort(-a, axis=-1)[:, k - 1])


def test_ties_pick_lowest_indices_in_both_kernels():
    x = jnp.asarray(np.array([[1.0, -2.0, 2.0, 2.0, 0.5, -2.0]], np.float32))
    w = jnp.asarray(np.arange(36, dtype=np.float32).reshape(6, 6))
    mask = np.asarray(kernels.active_mask(x, 3, 0.0, "topk"))
    assert mask.tolist() == [[False, True, True, True, False, False]]
    np.testing.assert_allclose(np.asarray(kernels.gather_linear(x, w, 3, 0.0, "topk")),
                               np.asarray(kernels.masked_linear(x, w, mask)))


def test_quality_harness_pairs_settings_with_dense(calibrated, tmp_path):
    from activeflow_jax.eval.quality import QualitySetting, default_settings, evaluate_quality

    _, engine, _, text = calibrated
    settings = default_settings((0.3, 0.7), ("threshold", "topk"), PredictionConfig(distance=1, superset=1.5))
    report = evaluate_quality(engine, str(text), settings, ctx=64, max_windows=3)
    rows = {r.label: r for r in report.rows}
    dense = rows["dense"]
    assert dense.kl_mean == 0 and dense.top1_agreement == 1 and dense.ppl_increase_pct == 0
    assert rows["TEAL 70%"].kl_mean > rows["TEAL 30%"].kl_mean > 0
    assert rows["top-k 70%"].kl_mean > rows["top-k 30%"].kl_mean > 0
    # the threshold policy keeps at most k, usually fewer; top-k keeps exactly k
    kept = rows["TEAL 30%"].kept_fraction
    assert all(0 < v <= 0.7 + 1e-6 for v in kept.values())
    assert abs(rows["top-k 30%"].kept_fraction["down"] - 0.7) < 0.01
    assert rows["TEAL 30% predicted"].kl_mean >= rows["TEAL 30%"].kl_mean
    assert engine.sparsity is None  # settings restored
    assert "| TEAL 70% |" in report.table()
    # the same windows as the perplexity protocol: dense PPL equals engine_perplexity's
    from activeflow_jax.eval.perplexity import engine_perplexity

    assert abs(engine_perplexity(engine, str(text), ctx=64, max_windows=3).ppl - dense.ppl) < 1e-6 * dense.ppl
    assert isinstance(settings[0], QualitySetting)


def test_quality_against_a_reference_model(calibrated, tmp_path):
    """A distilled store is judged against its teacher: KL, agreement and 'vs dense' use the
    reference's dense logits; the evaluated model's own dense row is then a setting like others."""
    import dataclasses

    from activeflow_jax.eval.quality import default_settings, evaluate_quality
    from activeflow_jax.testing import make_tiny_store

    _, engine, _, text = calibrated
    settings = default_settings((0.5,), ("threshold",))
    own = evaluate_quality(engine, str(text), settings, ctx=64, max_windows=2)
    same = evaluate_quality(engine, str(text), settings, ctx=64, max_windows=2, reference=engine)
    for a, b in zip(own.rows, same.rows):  # the model itself as reference: nothing changes
        assert (a.ppl, a.kl_mean, a.top1_agreement) == (b.ppl, b.kl_mean, b.top1_agreement)
    assert same.reference_ppl == pytest.approx(own.rows[0].ppl, rel=1e-9)

    other = af.Engine.load(make_tiny_store(tmp_path / "other", seed=7).store_path)
    report = evaluate_quality(engine, str(text), settings, ctx=64, max_windows=2, reference=other)
    dense = report.rows[0]
    assert dense.kl_mean > 0 and dense.top1_agreement < 1 and dense.ppl == pytest.approx(own.rows[0].ppl, rel=1e-9)
    assert report.reference == other.store_path and report.reference_ppl != pytest.approx(dense.ppl)
    assert dense.ppl_increase_pct == pytest.approx(100 * (dense.ppl / report.reference_ppl - 1))

    from activeflow_jax.testing import tiny_config

    small_vocab = dataclasses.replace(tiny_config(), vocab_size=280)
    mismatched = af.Engine.load(make_tiny_store(tmp_path / "vocab", small_vocab).store_path)
    with pytest.raises(InvalidArgumentError, match="tokenizer"):
        evaluate_quality(engine, str(text), settings, ctx=64, max_windows=2, reference=mismatched)


def test_perturbation_spread_measures_a_setting_and_restores_the_engine(calibrated):
    from activeflow_jax.eval.perplexity import engine_perplexity
    from activeflow_jax.eval.quality import QualitySetting, evaluate_quality, perturbation_spread

    _, engine, _, text = calibrated
    embed = engine.params["embed"]
    dense = perturbation_spread(engine, str(text), QualitySetting("dense"), seeds=2, ctx=64, max_windows=2)
    assert dense["ppl"] == pytest.approx(engine_perplexity(engine, str(text), ctx=64, max_windows=2).ppl, rel=1e-9)
    assert len(dense["perturbed"]) == 2 and dense["ppl"] == pytest.approx(dense["mean"], rel=1e-3)
    topk = QualitySetting("top-k 70%", 0.7, "topk")
    moved = perturbation_spread(engine, str(text), topk, seeds=2, eps=0.05, ctx=64, max_windows=2)
    report = evaluate_quality(engine, str(text), [QualitySetting("dense"), topk], ctx=64, max_windows=2)
    assert moved["ppl"] == pytest.approx(report.rows[1].ppl, rel=1e-6)  # as stored: the harness's figure
    assert all(p != moved["ppl"] for p in moved["perturbed"]) and moved["min"] <= moved["mean"] <= moved["max"]
    assert engine.params["embed"] is embed and engine.sparsity is None  # weights and settings restored
    for bad in (dict(seeds=0), dict(eps=0.0), dict(eps=float("nan"))):
        with pytest.raises(InvalidArgumentError):
            perturbation_spread(engine, str(text), topk, ctx=64, max_windows=2, **bad)


def test_predictor_measurement_on_tiny_model(calibrated):
    from activeflow_jax.eval.prediction import measure_prediction

    _, engine, _, text = calibrated
    result = measure_prediction(engine, str(text), sparsity=0.5, distances=(1,), supersets=(1.0, 2.0), ctx=64,
                                max_windows=2, warmup_tokens=4)
    rows = result["rows"]
    assert {r["group"] for r in rows} == set(OP_GROUPS)
    for r in rows:
        assert 0.0 <= r["recall"] <= 1.0
        if r["superset"] == 2.0 and r["group"] in ("qkv", "gate_up"):
            assert r["recall"] == pytest.approx(1.0)  # 2 x k covers every channel at 50%


def test_prefill_layer_programs_equal_the_one_program_forward(calibrated):
    # the engine runs a prompt one program per layer kind (llama.layer_program); the model's one
    # program over every layer (model_forward, what decode and training trace) is the reference
    from activeflow_jax.models import llama

    _, engine, _, _ = calibrated
    cfg, ids = engine.config, np.arange(5, 60)
    padded = np.zeros(64, np.int32)
    padded[:len(ids)] = ids
    settings = [(None, None), (0.5, None), (0.5, PredictionConfig(distance=1, superset=1.0))]
    try:
        for sparsity, prediction in settings:
            engine.configure_sparsity(sparsity, prediction=prediction)
            got = engine.logits(ids)
            ref, _ = llama.forward(engine.params, llama.KVCache.zeros(cfg, 64), jnp.asarray(padded), jnp.int32(0),
                                   jnp.int32(len(ids)), engine._thresholds, cfg=cfg, attn_len=64, all_logits=True,
                                   sparse=engine.sparsity, predict=engine.prediction, native=bool(engine._native))
            np.testing.assert_allclose(got, np.asarray(ref)[:len(ids)], rtol=1e-5, atol=1e-5,
                                       err_msg=f"sparsity={sparsity} prediction={prediction}")
    finally:
        engine.configure_sparsity(None)
