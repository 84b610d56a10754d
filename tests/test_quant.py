"""Quantized stores (q8 / q4 rows with f16 block scales): format, kernels, engine, bad input."""

from __future__ import annotations

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import activeflow_jax as af
from activeflow_jax import quant
from activeflow_jax.config import SparsityConfig, tiny_config
from activeflow_jax.models import llama
from activeflow_jax.sparse import native
from activeflow_jax.store import StoreReader, layout
from activeflow_jax.store.writer import convert
from activeflow_jax.testing import make_tiny_store

# out dims that are not multiples of the 32-value block: d 48 (1.5 blocks), ff 72 (gate_up 144)
ODD = tiny_config(d_model=48, head_dim=12, d_ff=72)
needs_native = pytest.mark.skipif(not native.usable(), reason="native kernels unavailable here")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A tiny f32 store (odd dims) and its q8 / q4 conversions of the same GGUF."""
    directory = tmp_path_factory.mktemp("quant")
    tiny = make_tiny_store(directory, ODD)
    out = {"float32": tiny.store_path}
    for dtype in ("q8", "q4"):
        out[dtype] = convert(tiny.gguf_path, os.path.join(directory, f"tiny-{dtype}"), dtype=dtype, progress=False)
    return tiny, out


@pytest.mark.parametrize("dtype", ["q8", "q4"])
@pytest.mark.parametrize("cols", [32, 50, 960])
def test_row_format_round_trip(dtype, cols):
    rng = np.random.default_rng(cols)
    w = rng.normal(size=(9, cols)).astype(np.float32) * 0.05
    data = quant.quantize_rows(w, dtype)
    assert data.dtype == np.uint8 and data.shape == (9, quant.row_bytes(dtype, cols))
    back = quant.dequantize_np(data, dtype, cols)
    step = np.ptp(w) / (254 if dtype == "q8" else 15)  # worst-case half step of the coarsest block, loosely
    assert np.abs(back - w).max() <= step
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda d: quant.dequantize(d, dtype, cols))(data)), back)
    # a row is self-contained: quantizing one row alone gives the same bytes
    np.testing.assert_array_equal(quant.quantize_rows(w[3:4], dtype), data[3:4])


def _q4_min_max(w: np.ndarray) -> np.ndarray:
    """GGML Q4_1's plain min/max quantization of [rows, 32k] (blocks along the row), widened: the
    reference the q4 search must not lose to."""
    x = w.reshape(w.shape[0], -1, 32)
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    d = ((hi - lo) / 15).astype(np.float16).astype(np.float32)
    m = lo.astype(np.float16).astype(np.float32)
    q = np.clip(np.rint((x - m) / np.where(d > 0, d, 1)), 0, 15)
    return (q * d + m).reshape(w.shape)


@pytest.mark.parametrize("dist", ["normal", "laplace", "uniform"])
def test_q4_search_beats_min_max(dist):
    """Every block's squared error (as stored: f16 d and m) is at most min/max's, and the total is
    well below it; constant blocks stay exact."""
    rng = np.random.default_rng(7)
    w = getattr(rng, dist)(size=(64, 1024)).astype(np.float32) * 0.05
    w[5, 64:96] = 0.25  # a constant block
    got = quant.dequantize_np(quant.quantize_rows(w, "q4"), "q4", 1024)
    err = ((got - w) ** 2).reshape(64, 32, 32).sum(-1)
    ref = ((_q4_min_max(w) - w) ** 2).reshape(64, 32, 32).sum(-1)
    assert (err <= ref).all()
    assert err.sum() < 0.85 * ref.sum()  # measured: 0.77-0.80 on these distributions
    np.testing.assert_array_equal(got[5, 64:96], w[5, 64:96])


def test_q4_weights_beyond_f16_are_refused_clearly():
    w = np.zeros((2, 64), np.float32)
    w[0, 3] = -1e5  # the block's minimum does not fit an f16
    with pytest.raises(af.InvalidArgumentError, match="does not fit an f16.*65,000 for q4"):
        quant.quantize_rows(w, "q4")


def test_q8_of_an_exact_q8_0_table_is_lossless():
    rng = np.random.default_rng(0)
    d = rng.uniform(0.001, 0.01, size=(4, 2)).astype(np.float16).astype(np.float32)
    q = rng.integers(-127, 128, size=(4, 2, 32)).astype(np.float32)
    q[:, :, 0] = 127  # GGML's Q8_0: the largest |code| of a block is 127
    w = (q * d[..., None]).reshape(4, 64)
    np.testing.assert_array_equal(quant.dequantize_np(quant.quantize_rows(w, "q8"), "q8", 64), w)


@needs_native
@pytest.mark.parametrize("dtype", ["q8", "q4"])
@pytest.mark.parametrize("cols", [48, 144, 960])
def test_native_kernels_match_xla(dtype, cols):
    rng = np.random.default_rng(1)
    rows = 200
    w = jax.device_put(quant.quantize(rng.normal(size=(rows, cols)).astype(np.float32) * 0.05, dtype))
    x = jnp.asarray(rng.normal(size=(rows,)).astype(np.float32))
    wide = quant.as_f32(w)

    def close(a, b):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()

    close(jax.jit(native.q_matvec)(x, w), x @ wide)  # dense decode
    close(jax.jit(lambda x, w: quant.matmul(x[None], w, native=False))(x, w)[0], x @ wide)
    idx = jnp.asarray(np.sort(rng.choice(rows, 77, replace=False)), jnp.int32)
    close(jax.jit(native.q_gather_matvec)(x[idx], idx, w), x[idx] @ quant.take_rows(w, idx))
    from activeflow_jax.sparse.kernels import gather_linear

    for policy, thr in (("topk", 0.0), ("threshold", 0.5)):
        got = jax.jit(lambda x, w, t=thr, p=policy: gather_linear(x[None], w, 90, t, p, native=True))(x, w)
        ref = jax.jit(lambda x, w, t=thr, p=policy: gather_linear(x[None], w, 90, t, p, native=False))(x, w)
        close(got, ref)
    xc = jnp.asarray(rng.normal(size=(cols,)).astype(np.float32))
    close(jax.jit(native.q_rows_dot)(xc, w), wide @ xc)  # the head on a quantized table


@pytest.mark.parametrize("dtype", ["q8", "q4"])
def test_store_holds_quantized_rows(stores, dtype):
    tiny, paths = stores
    manifest = af.store.read_manifest(paths[dtype])
    assert manifest["storage_dtype"] == dtype and manifest["layout_version"] == layout.layout_version(dtype)
    entry = manifest["tensors"]["layers.0.mlp.w_gate_up"]
    assert entry["shape"] == [48, 144] and entry["dtype"] == dtype
    assert entry["stored_shape"] == [48, quant.row_bytes(dtype, 144)]
    assert manifest["tensors"]["layers.0.attn_norm.weight"].get("dtype") == "float32"  # norms stay f32
    reader = StoreReader(paths[dtype])
    f32 = StoreReader(paths["float32"])
    assert reader.nbytes("embed") == 300 * quant.row_bytes("q8", 48) < f32.nbytes("embed") / 2  # q8 in a q4 store too
    assert reader.tensor_dtype("embed") == "q8" and manifest["tensors"]["embed"]["dtype"] == "q8"
    assert reader.row_bytes("layers.1.mlp.w_down") == quant.row_bytes(dtype, 48)
    # reads widen to f32, row reads equal whole-tensor reads, stored rows are the raw bytes
    whole = reader.read("layers.1.mlp.w_down")
    np.testing.assert_array_equal(reader.read_rows("layers.1.mlp.w_down", [0, 5, 71]), whole[[0, 5, 71]])
    raw = reader.read_rows_stored("layers.1.mlp.w_down", [5])
    np.testing.assert_array_equal(quant.dequantize_np(raw, dtype, 48), whole[[5]])
    tol = 0.01 if dtype == "q8" else 0.1
    assert np.abs(whole - tiny.params["layers.1.mlp.w_down"]).max() <= tol * np.abs(whole).max()


@pytest.mark.parametrize("dtype", ["q8", "q4"])
def test_engine_holds_quantized_weights_and_matches_their_f32_values(stores, dtype):
    """The quantized engine (native or XLA kernels) equals an f32 engine holding the widened
    weights within 1e-5, dense and sparse; and stays near the unquantized model."""
    _, paths = stores
    engine = af.Engine.load(paths[dtype])
    assert isinstance(engine.params["layers"][0]["mlp"]["w_down"], quant.QRows)
    assert isinstance(engine.params["embed"], quant.QRows)
    f32_engine = af.Engine.load(paths["float32"])
    assert engine.stats.weight_bytes < f32_engine.stats.weight_bytes / 2.5
    reader = StoreReader(paths[dtype])
    widened = af.Engine(reader.config, llama.params_from_flat(reader.config, reader.read_many(reader.tensor_names)),
                        None, store_path=reader.path)
    ids = np.arange(5, 45, dtype=np.int32)
    ref = widened.logits(ids)
    np.testing.assert_allclose(engine.logits(ids), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    # decode steps (one token: the native kernels where usable) and sparse decode
    assert list(engine.generate_ids(ids[:6], max_new_tokens=6)) == list(widened.generate_ids(ids[:6],
                                                                                            max_new_tokens=6))
    cfg, cache_len = reader.config, 64
    for sparse in (None, SparsityConfig(0.5, policy="topk", kernel="gather"),
                   SparsityConfig(0.5, policy="topk", kernel="native")):
        if sparse is not None and sparse.kernel == "native" and not native.usable():
            continue
        outs = []
        for params, use_native in ((engine.params, native.usable()), (engine.params, False), (widened.params, False)):
            cache = llama.KVCache.zeros(cfg, cache_len)
            logits, _ = llama.forward(params, cache, jnp.asarray(ids[:1]), 3, 1, None, cfg=cfg, attn_len=cache_len,
                                      all_logits=False, sparse=sparse, native=use_native)
            outs.append(np.asarray(logits))
        for out in outs[:2]:
            np.testing.assert_allclose(out, outs[2], rtol=0, atol=1e-5 * np.abs(outs[2]).max())
    full = f32_engine.logits(ids)
    rel = np.abs(engine.logits(ids) - full).max() / np.abs(full).max()
    assert rel < (0.05 if dtype == "q8" else 0.5)  # random tiny weights: q4 is coarse on them


def _shard(store, tensor):
    files = sorted(glob.glob(os.path.join(store, "tensors", tensor, "c", "**", "*"), recursive=True))
    return next(f for f in files if os.path.isfile(f))


def test_truncated_quantized_chunk_is_caught(tmp_path):
    tiny = make_tiny_store(tmp_path, ODD, dtype="q4")
    shard = _shard(tiny.store_path, "layers.1.mlp.w_gate_up")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 7)
    with pytest.raises(af.StoreCorruptError, match=r"layers\.1\.mlp\.w_gate_up.*c/0/0.*checksum"):
        StoreReader(tiny.store_path).read_rows("layers.1.mlp.w_gate_up", [0, 1])
    with pytest.raises(af.StoreCorruptError, match=r"layers\.1\.mlp\.w_gate_up.*checksum"):
        af.Engine.load(tiny.store_path)


def test_unknown_dtype_and_older_reader_are_refused(stores, tmp_path, monkeypatch):
    import shutil

    _, paths = stores
    store = str(tmp_path / "copy")
    shutil.copytree(paths["q4"], store)
    # an older reader (layout version 1 only) refuses a q4 store clearly
    monkeypatch.setattr(layout, "READABLE_LAYOUT_VERSIONS", (1,))
    with pytest.raises(af.StoreError, match="layout version 3.*re-convert"):
        StoreReader(store)
    monkeypatch.undo()
    manifest_path = os.path.join(store, layout.MANIFEST)
    with open(manifest_path) as f:
        manifest = json.load(f)
    original = json.dumps(manifest)

    def write(edit):
        edited = json.loads(original)
        edit(edited)
        with open(manifest_path, "w") as f:
            json.dump(edited, f)

    # a q4 store of layout version 2 held its embedding as q4: refused with what to do
    write(lambda m: m.__setitem__("layout_version", 2))
    with pytest.raises(af.StoreError, match="older activeflow_jax.*q8.*activeflow convert --overwrite --dtype q4"):
        af.Engine.load(store)
    # a tensor recorded in another dtype than the rule gives (an edited manifest) is named
    write(lambda m: m["tensors"]["embed"].__setitem__("dtype", "q4"))
    with pytest.raises(af.StoreError, match="'embed' is recorded as 'q4'.*holds it as 'q8'"):
        af.Engine.load(store)
    manifest["storage_dtype"] = "q3"
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(af.StoreError, match="storage dtype 'q3'"):
        af.Engine.load(store)


def test_convert_rejects_unknown_dtype_and_accepts_aliases(stores, tmp_path):
    tiny, _ = stores
    with pytest.raises(af.InvalidArgumentError, match="q8, q4"):
        convert(tiny.gguf_path, tmp_path / "x", dtype="int3", progress=False)
    assert not os.path.exists(tmp_path / "x")
    path = convert(tiny.gguf_path, tmp_path / "f16", dtype="f16", progress=False)
    assert StoreReader(path).storage_dtype == "float16"


SWAP_Q_CFG = tiny_config(num_layers=16, d_model=128, d_ff=320, num_heads=4, num_kv_heads=2, head_dim=32,
                         vocab_size=300, name="tiny-swap-q")
PROMPT = [5, 17, 33, 2, 90, 41, 7, 250, 12, 64]


@pytest.fixture(scope="module")
def swap_stores(tmp_path_factory):
    directory = tmp_path_factory.mktemp("swapq")
    tiny = make_tiny_store(directory, SWAP_Q_CFG)
    out = {"float32": tiny.store_path}
    for dtype in ("q8", "q4"):
        out[dtype] = convert(tiny.gguf_path, os.path.join(directory, f"swap-{dtype}"), dtype=dtype, progress=False)
    return out


def _decode_read_bytes(engine) -> float:
    loader = engine.stats.loader
    return (loader["preload_bytes"] + loader["ondemand_bytes"]) / max(1, loader["tokens"])


@pytest.mark.parametrize("dtype", ["q8", "q4"])
def test_budget_runtime_on_quantized_store_equals_all_in_dram(swap_stores, dtype):
    """Pools hold the store's quantized rows; tokens and logits equal the all-in-DRAM sparse
    engine on the same store; flash bytes per token fall with the dtype."""
    from activeflow_jax.runtime.budget import model_weight_bytes

    store = swap_stores[dtype]
    ref = af.Engine.load(store, sparsity=0.5, policy="topk")
    ref_logits, ref_tokens = ref.logits(PROMPT), list(ref.generate_ids(PROMPT, max_new_tokens=8))
    opts = dict(sparsity=0.5, policy="topk", group_size=1, kv_tokens=32, plan=False, progress=False)
    reads = {}
    for budget in (1.0, 0.6):
        engine = af.Engine.load(store, dram_budget=budget, **opts)
        assert engine.swap._dev_pools[0].dtype == jnp.uint8
        pools = engine.stats.memory["pools"]
        rb = quant.row_bytes(dtype, SWAP_Q_CFG.q_dim + 2 * SWAP_Q_CFG.kv_dim)
        assert pools["qkv"] == (engine.swap.pools["qkv"].slots + 1) * rb
        got = engine.logits(PROMPT)
        np.testing.assert_allclose(got, ref_logits, rtol=1e-5, atol=1e-5 * np.abs(ref_logits).max())
        engine.swap.reset_stats()
        assert list(engine.generate_ids(PROMPT, max_new_tokens=8)) == ref_tokens
        reads[budget] = _decode_read_bytes(engine)
        engine.close()
    f32 = af.Engine.load(swap_stores["float32"], dram_budget=0.6, **opts)
    list(f32.generate_ids(PROMPT, max_new_tokens=8))
    f32.swap.reset_stats()
    list(f32.generate_ids(PROMPT, max_new_tokens=8))
    assert model_weight_bytes(SWAP_Q_CFG, dtype) < model_weight_bytes(SWAP_Q_CFG) / 3
    assert 0 < reads[0.6] < _decode_read_bytes(f32) / 2.5  # 60% of a smaller model, its rows smaller


def test_calibration_scoring_and_distillation_on_a_quantized_store(stores, tmp_path):
    """Calibration, cached-prefix scoring (tasks) and sparse distillation run on a q8 store; the
    student is trained in f32 and written as q8."""
    import shutil

    from activeflow_jax.distill import DistillConfig, distill
    from activeflow_jax.testing import CALIBRATION_PROSE

    _, paths = stores
    store = str(tmp_path / "q8")
    shutil.copytree(paths["q8"], store)
    text = tmp_path / "text.txt"
    text.write_text(CALIBRATION_PROSE)
    calibration = af.calibrate(store, str(text), levels=(0.5,), progress=False)
    assert 0.5 in calibration.levels
    engine = af.Engine.load(store, sparsity=0.5)
    ctx, conts = [5, 9, 40, 41], [[7, 8], [100]]
    got = engine.score_continuations(ctx, conts)
    for cont, lp in zip(conts, got):  # cached-prefix scoring == the full sequence's logits
        full = engine.logits(ctx + cont)
        logp = full - np.log(np.exp(full - full.max(-1, keepdims=True)).sum(-1, keepdims=True)) - full.max(-1,
                                                                                                           keepdims=True)
        want = [logp[len(ctx) - 1 + t, tok] for t, tok in enumerate(cont)]
        np.testing.assert_allclose(lp, want, rtol=1e-4, atol=1e-4)
    result = distill(store, tmp_path / "student", DistillConfig(sparsity=0.5, steps=2, batch_size=2, seq_len=32,
                                                                lr=3e-3, warmup_steps=1, save_every=1),
                     text_path=str(text), progress=False)
    student, source = StoreReader(result.out_store), StoreReader(store)
    assert student.storage_dtype == "q8" and student.tensor_dtype("layers.1.mlp.w_down") == "q8"
    # frozen tensors survive the f32 round trip bit for bit (q8 re-quantizes its own values exactly)
    np.testing.assert_array_equal(student.read_rows_stored("embed", np.arange(300)),
                                  source.read_rows_stored("embed", np.arange(300)))
    assert not np.array_equal(student.read("layers.1.mlp.w_down"), source.read("layers.1.mlp.w_down"))
    assert isinstance(af.Engine.load(result.out_store).params["embed"], quant.QRows)


def test_cli_convert_dtype(stores, tmp_path, capsys):
    from activeflow_jax import cli

    tiny, _ = stores
    assert cli.main(["convert", tiny.gguf_path, str(tmp_path / "s4"), "--dtype", "q4"]) == 0
    assert StoreReader(capsys.readouterr().out.strip()).storage_dtype == "q4"
    with pytest.raises(SystemExit):  # argparse refuses an unknown dtype before anything is written
        cli.main(["convert", tiny.gguf_path, str(tmp_path / "s3"), "--dtype", "q3"])
    assert not os.path.exists(tmp_path / "s3")


def test_real_model_q8_store_is_close_to_f32(real_gguf_path, real_engine, tmp_path):
    """SmolLM2-135M as a q8 store: 3.2x fewer weight bytes in DRAM, its embedding (Q8_0 in the GGUF)
    kept bit for bit, and its next-token distribution close to the f32 store's."""
    store = convert(real_gguf_path, tmp_path / "q8", dtype="q8", progress=False)
    engine = af.Engine.load(store)
    assert engine.stats.weight_bytes < real_engine.stats.weight_bytes / 2.8
    np.testing.assert_array_equal(StoreReader(store).read_rows("embed", [0, 1000, 49151]),
                                  StoreReader(real_engine.store_path).read_rows("embed", [0, 1000, 49151]))
    ids = engine.tokenizer.encode("The capital of France is Paris. The river that runs through the city is the")
    ref, got = real_engine.logits(ids), engine.logits(ids)
    p = np.exp(ref - ref.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    logq = got - got.max(-1, keepdims=True)
    logq -= np.log(np.exp(logq).sum(-1, keepdims=True))
    logp = np.log(np.maximum(p, 1e-30))
    kl = float(np.mean(np.sum(p * (logp - logq), axis=-1)))
    assert kl < 0.01 and np.mean(ref.argmax(-1) == got.argmax(-1)) >= 0.9
    prompt = ids[:8]
    assert list(engine.generate_ids(prompt, max_new_tokens=8))[:4] == list(real_engine.generate_ids(prompt,
                                                                                                   max_new_tokens=8))[:4]
