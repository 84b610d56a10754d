"""Sparsity-aware self-distillation on a tiny model: STE, loss goes down, resume, mesh, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import activeflow_jax as af
from activeflow_jax.distill import DistillConfig, distill
from activeflow_jax.errors import InvalidArgumentError, StoreError
from activeflow_jax.sparse import kernels

TEXT = ("The lighthouse keeper counted the sea birds every morning and wrote the numbers in a blue book. "
        "In winter the storms came from the north, and the ships waited in the harbour for days. ") * 20


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from activeflow_jax.testing import make_tiny_store

    root = tmp_path_factory.mktemp("distill")
    tiny = make_tiny_store(root)
    text = root / "text.txt"
    text.write_text(TEXT)
    af.calibrate(tiny.store_path, str(text), levels=(0.5,), progress=False)
    return tiny.store_path, str(text), root


SMALL = dict(sparsity=0.5, steps=4, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=1, save_every=1)


def _tensors(store):
    from activeflow_jax.store.reader import StoreReader

    reader = StoreReader(store)
    return reader.read_many(reader.tensor_names)


def test_straight_through_mask_forward_masks_backward_passes():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 16)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((16, 5)), jnp.float32)

    def f(x, ste):
        return jnp.sum(kernels.sparse_linear(x, w, k=6, threshold=0.0, policy="topk", kernel="mask",
                                             straight_through=ste))

    mask = kernels.active_mask(x, 6, 0.0, "topk")
    np.testing.assert_allclose(f(x, True), jnp.sum(jnp.where(mask, x, 0.0) @ w), rtol=1e-6)
    grad = jax.grad(f)(x, True)
    np.testing.assert_allclose(grad, jnp.broadcast_to(w.sum(1), x.shape), rtol=1e-6)  # identity through the mask
    assert not np.allclose(jax.grad(f)(x, False), grad)  # without STE, masked channels get no gradient


def test_distillation_lowers_kl_and_writes_a_new_calibrated_store(source, tmp_path):
    store, text, _ = source
    before = {k: v.copy() for k, v in _tensors(store).items()}
    cfg = DistillConfig(**{**SMALL, "steps": 12, "lr": 1e-3})
    result = distill(store, tmp_path / "out", cfg, text_path=text, progress=False)

    assert len(result.history) == 12 and all(np.isfinite(h["loss"]) for h in result.history)
    out = _tensors(result.out_store)
    assert not np.allclose(out["layers.1.mlp.w_down"], before["layers.1.mlp.w_down"])
    np.testing.assert_array_equal(out["embed"], before["embed"])  # frozen
    for name, value in _tensors(store).items():  # the source store is never modified
        np.testing.assert_array_equal(value, before[name])
    engine = af.Engine.load(result.out_store, sparsity=0.5)  # recalibrated thresholds came with it
    assert engine.sparsity.sparsity == 0.5


@pytest.mark.parametrize("mode,lr,ste", [("all", 1e-3, True), ("lora", 3e-3, True), ("all", 1e-3, False)])
def test_train_step_lowers_kl_on_a_batch(source, mode, lr, ste):
    from activeflow_jax.distill.train import batch_for_step, make_train_step, make_windows, split_trainable
    from activeflow_jax.sparse.thresholds import read_calibration

    store, text, _ = source
    engine = af.Engine.load(store)
    thresholds = jnp.asarray(read_calibration(store, engine.config).thresholds(0.5))
    cfg = DistillConfig(**{**SMALL, "steps": 15, "lr": lr, "trainable": mode, "lora_rank": 4, "straight_through": ste})
    windows = make_windows(np.asarray(engine.tokenizer.encode(TEXT), np.int32), cfg.seq_len, cfg.batch_size)
    batch = jnp.asarray(batch_for_step(windows, 0, cfg.batch_size, 0))
    trainable, frozen = split_trainable(engine.params, mode, cfg.lora_rank)
    trainable = jax.tree.map(jnp.copy, trainable)
    step, tx = make_train_step(engine.config, cfg, frozen, engine.params, thresholds)
    opt = tx.init(trainable)
    kls = []
    for _ in range(15):
        trainable, opt, metrics = step(trainable, opt, batch)
        kls.append(float(metrics["kl"]))
    assert kls[-1] < 0.7 * kls[0], kls


def test_hidden_matching_loss_is_zero_when_dense_and_trains_when_sparse(source):
    """The residual-stream loss: 0 where the student computes what the teacher does (sparsity 0,
    one step of lr ~0), positive under the mask, and lowered by training on it."""
    from activeflow_jax.distill.train import batch_for_step, make_train_step, make_windows, split_trainable
    from activeflow_jax.sparse.thresholds import read_calibration

    store, _, _ = source
    engine = af.Engine.load(store)
    windows = make_windows(np.asarray(engine.tokenizer.encode(TEXT), np.int32), 32, 2)
    batch = jnp.asarray(batch_for_step(windows, 0, 2, 0))

    def hidden_losses(sparsity, lr, steps):
        thresholds = jnp.asarray(read_calibration(store, engine.config).thresholds(0.5)) if sparsity else None
        cfg = DistillConfig(**{**SMALL, "sparsity": sparsity, "policy": "threshold" if sparsity else "topk",
                               "lr": lr, "hidden_weight": 1.0, "steps": steps})
        trainable, frozen = split_trainable(engine.params, "all")
        trainable = jax.tree.map(jnp.copy, trainable)
        step, tx = make_train_step(engine.config, cfg, frozen, engine.params, thresholds)
        opt, out = tx.init(trainable), []
        for _ in range(steps):
            trainable, opt, metrics = step(trainable, opt, batch)
            out.append(float(metrics["hidden"]))
        return out

    assert hidden_losses(0.0, 1e-12, 1)[0] < 1e-10
    sparse = hidden_losses(0.5, 3e-4, 30)
    assert sparse[0] > 1e-3 and sparse[-1] < 0.7 * sparse[0], sparse
    with pytest.raises(InvalidArgumentError, match="hidden_weight"):
        DistillConfig(hidden_weight=-1.0)


def test_killed_run_resumes_without_lost_or_repeated_steps(source, tmp_path):
    store, text, _ = source
    cfg = DistillConfig(**SMALL)
    straight = distill(store, tmp_path / "a", cfg, text_path=text, progress=False)
    partial = distill(store, tmp_path / "b", cfg, text_path=text, progress=False, stop_after=3)
    assert partial.steps == 3 and partial.out_store == ""
    resumed = distill(store, tmp_path / "b", cfg, text_path=text, progress=False)
    assert resumed.resumed_from == 3 and [h["step"] for h in resumed.history] == [4]
    np.testing.assert_allclose(resumed.history[-1]["loss"], straight.history[-1]["loss"], rtol=1e-5)
    a, b = _tensors(straight.out_store), _tensors(resumed.out_store)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6)


SHARDED_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
import activeflow_jax as af
from activeflow_jax.distill.train import (DistillConfig, make_train_step, split_trainable, data_mesh,
                                          make_windows, batch_for_step, step_shardings)
store, text = sys.argv[1], sys.argv[2]
assert jax.device_count() == 2, jax.devices()
e = af.Engine.load(store)
cfg = DistillConfig(sparsity=0.5, steps=3, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=1)
thr = jnp.asarray(af.calibrate.__globals__["read_calibration"](store, e.config).thresholds(0.5))
ids = np.asarray(e.tokenizer.encode(open(text).read()), np.int32)
windows = make_windows(ids, cfg.seq_len, cfg.batch_size)
out = {}
for name, devices, fsdp in (("single", jax.devices()[:1], False), ("sharded", jax.devices(), False),
                            ("fsdp", jax.devices(), True)):
    cfg = DistillConfig(sparsity=0.5, steps=3, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=1, fsdp=fsdp)
    trainable, frozen = split_trainable(e.params, cfg.trainable)
    trainable = jax.tree.map(jnp.copy, trainable)
    mesh = data_mesh(devices)
    step, tx = make_train_step(e.config, cfg, frozen, e.params, thr, mesh)
    opt = tx.init(trainable)
    train_sh, opt_sh, _ = step_shardings(mesh, cfg, trainable, tx)
    trainable, opt = jax.device_put(trainable, train_sh), jax.device_put(opt, opt_sh)
    losses = []
    for s in range(3):
        trainable, opt, m = step(trainable, opt, jnp.asarray(batch_for_step(windows, s, 2, 0)))
        losses.append(float(m["loss"]))
    w = trainable["layers"][1]["mlp"]["w_down"]
    out[name] = (losses, np.asarray(w), [list(sh.data.shape) for sh in w.addressable_shards])
record = {name: v[0] for name, v in out.items()}
record["max_param_diff"] = {name: float(np.max(np.abs(out["single"][1] - out[name][1]))) for name in out}
record["shard_shapes"] = {name: v[2] for name, v in out.items()}
record["full_shape"] = list(out["single"][1].shape)
print(json.dumps(record))
"""


def test_sharded_step_equals_single_device_step(source, tmp_path):
    store, text, _ = source
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, store, text], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("sharded", "fsdp"):  # data parallel and FSDP: the same losses and weights as one device
        np.testing.assert_allclose(record[name], record["single"], rtol=1e-5)
        assert record["max_param_diff"][name] < 1e-5, record["max_param_diff"]
    rows, cols = record["full_shape"]
    assert record["shard_shapes"]["sharded"] == [[rows, cols]] * 2  # replicated: each device holds it whole
    halves = record["shard_shapes"]["fsdp"]  # FSDP: each device holds half of the weight
    assert len(halves) == 2 and all(r * c * 2 == rows * cols for r, c in halves), halves


# ------------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs(source, tmp_path):
    store, text, root = source
    cfg = DistillConfig(**SMALL)
    exists = tmp_path / "exists"
    exists.mkdir()
    with pytest.raises(InvalidArgumentError, match="exists"):
        distill(store, exists, cfg, text_path=text, progress=False)
    with pytest.raises(InvalidArgumentError, match="differ from the source"):
        distill(store, store, cfg, text_path=text, progress=False)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(InvalidArgumentError, match="too little text"):
        distill(store, tmp_path / "o1", cfg, text_path=str(short), progress=False)
    with pytest.raises(InvalidArgumentError, match="steps"):
        DistillConfig(steps=0)
    with pytest.raises(InvalidArgumentError, match="no thresholds|calibrated levels"):
        distill(store, tmp_path / "o2", DistillConfig(**{**SMALL, "sparsity": 0.7}), text_path=text, progress=False)


def test_store_without_thresholds(tmp_path):
    from activeflow_jax.testing import make_tiny_store

    tiny = make_tiny_store(tmp_path / "raw")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    with pytest.raises(InvalidArgumentError, match="activeflow calibrate"):
        distill(tiny.store_path, tmp_path / "o", DistillConfig(**SMALL), text_path=str(text), progress=False)


def test_mismatched_or_corrupt_checkpoint(source, tmp_path):
    store, text, _ = source
    ckpt = tmp_path / "ckpt"
    distill(store, tmp_path / "a", DistillConfig(**SMALL), text_path=text, checkpoint_dir=str(ckpt), progress=False,
            stop_after=2)
    other = DistillConfig(**{**SMALL, "lr": 1e-3})
    with pytest.raises(InvalidArgumentError, match="another run"):
        distill(store, tmp_path / "a", other, text_path=text, checkpoint_dir=str(ckpt), progress=False)
    changed = tmp_path / "changed.txt"  # same settings, other training text: resuming would mix two runs
    changed.write_text(open(text).read() + " and one more sentence.")
    with pytest.raises(InvalidArgumentError, match="another run"):
        distill(store, tmp_path / "a", DistillConfig(**SMALL), text_path=str(changed), checkpoint_dir=str(ckpt),
                progress=False)
    # damage the latest checkpoint's files
    step_dir = max((p for p in ckpt.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    for root, _, files in os.walk(step_dir):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    with pytest.raises(StoreError, match="cannot be restored"):
        distill(store, tmp_path / "a", DistillConfig(**SMALL), text_path=text, checkpoint_dir=str(ckpt),
                progress=False)


def test_lora_trains_only_adapters_and_merges_them(source, tmp_path):
    from activeflow_jax.distill.train import split_trainable, student_params

    store, text, _ = source
    params = af.Engine.load(store).params
    trainable, frozen = split_trainable(params, "lora", lora_rank=4, seed=0)
    pair = trainable["lora"][0]["mlp"]["w_down"]
    assert pair["a"].shape[1] == 4 and pair["b"].shape[0] == 4
    merged = student_params(frozen, trainable)  # b = 0 at the start: the student is the teacher
    np.testing.assert_array_equal(merged["layers"][0]["mlp"]["w_down"], params["layers"][0]["mlp"]["w_down"])

    before = _tensors(store)
    cfg = DistillConfig(**{**SMALL, "steps": 6, "lr": 3e-3, "trainable": "lora", "lora_rank": 4})
    result = distill(store, tmp_path / "lora", cfg, text_path=text, progress=False)
    assert all(np.isfinite(h["kl"]) for h in result.history)
    out = _tensors(result.out_store)
    assert not np.allclose(out["layers.1.mlp.w_down"], before["layers.1.mlp.w_down"])  # adapters merged in
    np.testing.assert_array_equal(out["layers.1.attn_norm.weight"], before["layers.1.attn_norm.weight"])


def test_merge_writes_the_interpolation_and_auto_picks_the_least_heldout_kl(source, tmp_path):
    from activeflow_jax.distill.train import MERGE_GRID
    from activeflow_jax.eval.quality import QualitySetting, evaluate_quality

    store, text, _ = source
    cfg = DistillConfig(**{**SMALL, "policy": "topk", "steps": 6})
    ckpt = str(tmp_path / "ckpt")
    for bad in (0, 1.5, "half", True):
        with pytest.raises(InvalidArgumentError, match="merge"):
            distill(store, tmp_path / "bad", cfg, text_path=text, checkpoint_dir=ckpt, progress=False, merge=bad)
    full = distill(store, tmp_path / "full", cfg, text_path=text, checkpoint_dir=ckpt, progress=False,
                   recalibrate=False)
    assert full.merge_alpha == 1.0 and full.merge_kl == []
    # the finished run is written again, not trained again
    half = distill(store, tmp_path / "half", cfg, text_path=text, checkpoint_dir=ckpt, progress=False,
                   recalibrate=False, merge=0.5)
    assert half.resumed_from == cfg.steps and half.history == []
    teacher, trained, merged = _tensors(store), _tensors(full.out_store), _tensors(half.out_store)
    name = "layers.1.mlp.w_gate_up"
    assert not np.allclose(trained[name], teacher[name])
    np.testing.assert_allclose(merged[name], (teacher[name] + trained[name]) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(merged["embed"], teacher["embed"])

    auto = distill(store, tmp_path / "auto", cfg, text_path=text, checkpoint_dir=ckpt, progress=False,
                   recalibrate=False, merge="auto", merge_text=text)
    kls = {row["alpha"]: row["kl"] for row in auto.merge_kl}
    assert sorted(kls) == sorted(MERGE_GRID) and auto.merge_alpha == min(kls, key=kls.get)
    # the alpha = 1 entry is the quality harness's KL of the trained student on the same windows
    report = evaluate_quality(af.Engine.load(full.out_store), text, [QualitySetting("s", 0.5, "topk")], ctx=32,
                              reference=af.Engine.load(store))
    assert kls[1.0] == pytest.approx(report.rows[-1].kl_mean, rel=1e-4)
    manifest = json.load(open(os.path.join(auto.out_store, "manifest.json")))
    assert manifest["source"]["merge_alpha"] == auto.merge_alpha


def test_unseen_windows_are_exactly_those_no_batch_trained_on_and_serve_the_merge(source, tmp_path):
    from activeflow_jax.distill.train import batch_for_step, make_windows, unseen_windows

    windows = make_windows(np.arange(1000, dtype=np.int32), 32, 2)  # 31 distinct windows
    cfg = DistillConfig(**{**SMALL, "steps": 5, "seed": 2})
    for members in (1, 2):
        trained = {int(row[0]) // 32 for m in range(members) for step in range(cfg.steps)
                   for row in batch_for_step(windows, step, cfg.batch_size, cfg.seed + m)}
        unseen = unseen_windows(len(windows), cfg, members)
        assert set(unseen) == set(range(len(windows))) - trained and len(unseen) > 0
    # more steps than one epoch leave nothing held out
    assert unseen_windows(len(windows), DistillConfig(**{**SMALL, "steps": 16}), 1) == []

    store, text, _ = source
    cfg = DistillConfig(**{**SMALL, "policy": "topk", "steps": 3})
    got = distill(store, tmp_path / "out", cfg, text_path=text, progress=False, recalibrate=False, merge="auto",
                  merge_text="unseen")
    assert len(got.merge_kl) == 6 and got.merge_alpha == min(got.merge_kl, key=lambda r: r["kl"])["alpha"]
    manifest = json.load(open(os.path.join(got.out_store, "manifest.json")))
    assert manifest["source"]["merge_text"] == "unseen"
    # the merge text is the unseen windows' own tokens, one paragraph each
    engine = af.Engine.load(store)
    windows = make_windows(np.asarray(engine.tokenizer.encode(TEXT), np.int32), cfg.seq_len, cfg.batch_size)
    unseen = unseen_windows(len(windows), cfg)
    paragraphs = open(tmp_path / "out.ckpt" / "merge_unseen.txt", encoding="utf-8").read().split("\n\n")
    assert 0 < len(paragraphs) <= 24
    assert paragraphs[0] == engine.tokenizer.decode(windows[unseen[0]][:cfg.seq_len].tolist())
    # a run that trains on every window is refused before it trains
    with pytest.raises(InvalidArgumentError, match="none would be held out"):
        distill(store, tmp_path / "all", DistillConfig(**{**SMALL, "policy": "topk", "steps": 1000}), text_path=text,
                progress=False, merge="auto", merge_text="unseen")
    assert not os.path.exists(tmp_path / "all.ckpt")


def test_batched_teacher_generation_equals_one_at_a_time(source):
    """Each sequence of a batch sits at its own position: near-zero temperature must reproduce the
    engine's greedy decode of each prompt, whatever the other prompts' lengths."""
    from activeflow_jax.distill.corpus import generate_batch

    store, _, _ = source
    engine = af.Engine.load(store)
    prompts = [[5, 17, 299, 41], [9] * 11, [260, 3]]
    batched = generate_batch(engine, prompts, max_new_tokens=12, temperature=1e-6, min_p=0.5, seed=3)
    for prompt, got in zip(prompts, batched):
        want = list(engine.generate_ids(prompt, max_new_tokens=12, temperature=0.0, stop_ids=frozenset()))
        stops = engine.tokenizer.stop_ids
        want = want[:next((j for j, t in enumerate(want) if t in stops), len(want))]
        assert got == want
    sampled = generate_batch(engine, prompts, max_new_tokens=12, temperature=1.0, min_p=0.01, seed=3)
    assert generate_batch(engine, prompts, max_new_tokens=12, temperature=1.0, min_p=0.01, seed=3) == sampled
    with pytest.raises(InvalidArgumentError):
        generate_batch(engine, [[]], max_new_tokens=4)
    with pytest.raises(InvalidArgumentError):
        generate_batch(engine, prompts, max_new_tokens=4, min_p=0.0)


def test_soup_averages_the_single_runs_of_its_seeds_and_resumes(source, tmp_path):
    store, text, _ = source
    cfg = DistillConfig(**{**SMALL, "policy": "topk", "steps": 3, "seed": 5})
    singles = [distill(store, tmp_path / f"single{s}", DistillConfig(**{**SMALL, "policy": "topk", "steps": 3,
                                                                          "seed": s}),
                       text_path=text, progress=False, recalibrate=False) for s in (5, 6)]
    # killed in the second member's first step range, then resumed: no lost or repeated step
    partial = distill(store, tmp_path / "soup", cfg, text_path=text, progress=False, recalibrate=False, members=2,
                      stop_after=4)
    assert partial.out_store == "" and partial.steps == 4
    assert [(h["member"], h["step"]) for h in partial.history] == [(0, 1), (0, 2), (0, 3), (1, 1)]
    soup = distill(store, tmp_path / "soup", cfg, text_path=text, progress=False, recalibrate=False, members=2)
    assert soup.members == 2 and soup.steps == 6 and soup.resumed_from == 4
    assert [(h["member"], h["step"]) for h in soup.history] == [(1, 2), (1, 3)]
    a, b, mixed, teacher = (_tensors(singles[0].out_store), _tensors(singles[1].out_store), _tensors(soup.out_store),
                            _tensors(store))
    name = "layers.1.attn.wqkv"
    assert not np.allclose(a[name], b[name])  # the seeds drew different batches
    for n in teacher:
        np.testing.assert_allclose(mixed[n], (a[n] + b[n]) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(mixed["embed"], teacher["embed"])
    manifest = json.load(open(os.path.join(soup.out_store, "manifest.json")))
    assert manifest["source"]["distill_members"] == 2
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(InvalidArgumentError, match="members"):
            distill(store, tmp_path / "bad", cfg, text_path=text, progress=False, members=bad)


# ------------------------------------------------------------------------------------------------
# Gemma 3 (GeGLU, q/k norms, post-norms, sliding window, embedding scale) through the same pipeline


@pytest.fixture(scope="module")
def gemma_source(tmp_path_factory):
    """A tiny Gemma 3-like store as f16 (so that the student's dtype is checked) with TEAL thresholds."""
    from activeflow_jax.testing import CALIBRATION_PROSE, tiny_gemma3_config, write_tiny_gguf

    root = tmp_path_factory.mktemp("gemma_distill")
    gguf_path = str(root / "gemma.gguf")
    write_tiny_gguf(gguf_path, tiny_gemma3_config(), pre_tokenizer="default")
    store = af.convert(gguf_path, str(root / "gemma-f16"), dtype="float16", progress=False)
    text = root / "calib.txt"
    text.write_text(CALIBRATION_PROSE)
    calibration = af.calibrate(store, str(text), levels=(0.3, 0.5), progress=False)
    return store, str(text), calibration


def test_gemma_thresholds_cut_each_op_input_at_its_level(gemma_source):
    # every op group's input (o reads heads x head_dim = 128 wide, down the GeGLU product) falls
    # below its threshold with the calibrated share: at least the level at the threshold, less
    # one histogram bin (1/64 octave) lower
    from activeflow_jax.config import OP_GROUPS
    from activeflow_jax.models.llama import forward_with_taps
    from activeflow_jax.sparse.calibrate import BINS_PER_OCTAVE, CALIBRATION_WINDOW

    store, text, calibration = gemma_source
    engine = af.Engine.load(store)
    ids = np.asarray(engine.tokenizer.encode(open(text).read()), np.int32)
    windows = [ids[i:i + CALIBRATION_WINDOW] for i in range(0, len(ids) - CALIBRATION_WINDOW + 1, CALIBRATION_WINDOW)]
    taps = [forward_with_taps(engine.params, jnp.asarray(w), cfg=engine.config)[1] for w in windows]
    assert taps[0]["o"].shape[-1] == 128 and taps[0]["down"].shape[-1] == engine.config.d_ff
    for level in (0.3, 0.5):
        thresholds = calibration.thresholds(level)
        assert thresholds.shape == (3, len(OP_GROUPS)) and np.all(thresholds > 0)
        for g, group in enumerate(OP_GROUPS):
            x = np.abs(np.concatenate([np.asarray(t[group]) for t in taps], axis=1))  # [L, tokens, width]
            for layer in range(3):
                below = np.mean(x[layer] < thresholds[layer, g])
                below_one_bin_lower = np.mean(x[layer] < thresholds[layer, g] * 2.0 ** (-1 / BINS_PER_OCTAVE))
                assert below >= level - 1e-6 and below_one_bin_lower < level, (group, layer, level)


def test_gemma_distillation_lowers_sparse_kl_and_keeps_the_store_dtype(gemma_source, tmp_path):
    from activeflow_jax.eval.quality import WindowKL
    from activeflow_jax.store.reader import StoreReader

    store, text, _ = gemma_source
    teacher = af.Engine.load(store)
    # on the text it trains on: a random tiny model's student does not generalise to other text
    # (neither does the Llama one's); ctx 64 > the window 4, so the sliding layers differ from global
    kl_of = WindowKL(teacher, text, ctx=64, windows=4)
    teacher.configure_sparsity(0.5, policy="threshold")
    kl_before = kl_of(teacher)
    assert kl_before > 1e-2  # sparsity changes the function

    cfg = DistillConfig(**{**SMALL, "steps": 12, "lr": 1e-3, "seq_len": 64})
    result = distill(store, tmp_path / "student", cfg, text_path=text, progress=False)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 12 and np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses

    reader = StoreReader(result.out_store)
    assert reader.manifest["storage_dtype"] == "float16"
    assert {reader.tensor_dtype(name) for name in reader.tensor_names} == {"float16"}
    student_tensors = reader.read_many(reader.tensor_names)  # widened to f32 when read: f16 values
    for name, value in student_tensors.items():
        np.testing.assert_array_equal(value.astype(np.float16).astype(np.float32), value, err_msg=name)
    source = _tensors(store)
    assert not np.array_equal(student_tensors["layers.0.attn.q_norm.weight"], source["layers.0.attn.q_norm.weight"])
    assert not np.array_equal(student_tensors["layers.1.post_mlp_norm.weight"],
                              source["layers.1.post_mlp_norm.weight"])
    student = af.Engine.load(result.out_store, sparsity=0.5)  # thresholds calibrated again for it
    assert student.config == teacher.config
    # the teacher's dense log-probabilities against the sparse student on the same windows
    kl_after = kl_of(student)
    assert kl_after < 0.9 * kl_before


def test_gemma_norms_mode_trains_every_norm_including_q_k_and_post_norms(gemma_source):
    from activeflow_jax.distill.train import (batch_for_step, make_train_step, make_windows, split_trainable,
                                              student_params)
    from activeflow_jax.models.llama import flatten_params

    store, text, calibration = gemma_source
    engine = af.Engine.load(store)
    trainable, frozen = split_trainable(engine.params, "norms")
    names, trained = set(flatten_params(engine.params)), set(flatten_params(trainable))
    assert trained == {n for n in names if n.startswith("layers.") and "norm" in n}
    assert "layers.2.attn.k_norm.weight" in trained and "layers.2.post_attn_norm.weight" in trained
    assert trained.isdisjoint(flatten_params(frozen)) and trained | set(flatten_params(frozen)) == names
    cfg = DistillConfig(**{**SMALL, "trainable": "norms", "lr": 1e-2, "seq_len": 64})
    windows = make_windows(np.asarray(engine.tokenizer.encode(open(text).read()), np.int32), 64, 2)
    step, tx = make_train_step(engine.config, cfg, frozen, engine.params, jnp.asarray(calibration.thresholds(0.5)))
    trainable = jax.tree.map(jnp.copy, trainable)
    opt, kls = tx.init(trainable), []
    for _ in range(8):
        trainable, opt, metrics = step(trainable, opt, jnp.asarray(batch_for_step(windows, 0, 2, 0)))
        kls.append(float(metrics["kl"]))
    assert kls[-1] < kls[0], kls
    q_norm = flatten_params(student_params(frozen, trainable))["layers.0.attn.q_norm.weight"]
    assert not np.allclose(q_norm, flatten_params(engine.params)["layers.0.attn.q_norm.weight"])
