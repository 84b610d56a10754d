"""Dense model on tiny random configs: import, reference equality, caching, buckets, sampling."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import activeflow_jax as af
from activeflow_jax.config import tiny_config
from activeflow_jax.engine import Engine
from activeflow_jax.models import llama
from activeflow_jax.testing import make_tiny_store, write_tiny_gguf
from reference_numpy import load_reference_weights, reference_logits


def test_param_shapes_come_from_one_place():
    cfg = tiny_config()
    shapes = llama.param_shapes(cfg)
    assert shapes["layers.0.attn.wqkv"] == (cfg.d_model, cfg.q_dim + 2 * cfg.kv_dim)
    assert shapes["layers.1.mlp.w_down"] == (cfg.d_ff, cfg.d_model)
    assert shapes["embed"] == (cfg.vocab_size, cfg.d_model)
    assert sum(int(np.prod(s)) for s in shapes.values()) == cfg.num_params()


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_1"])
def test_tiny_gguf_logits_match_float64_reference(tmp_path, qtype):
    # The reference applies interleaved RoPE to the GGUF weights as stored; the engine un-permutes
    # q/k and applies rotate-half. Agreement checks both the import and the RoPE layout.
    tiny = make_tiny_store(tmp_path, qtype=qtype)
    engine = Engine.load(tiny.store_path)
    ids = np.random.default_rng(0).integers(0, engine.config.vocab_size, 40)
    ours = engine.logits(ids)
    ref = reference_logits(load_reference_weights(tiny.gguf_path), ids)
    assert ours.dtype == np.float32 and ours.shape == (40, engine.config.vocab_size)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_wrong_rope_layout_is_detected(tmp_path):
    # Guard for the test above: skipping the un-permutation must break agreement.
    from activeflow_jax.formats import gguf_import

    tiny = make_tiny_store(tmp_path / "a")
    ref = reference_logits(load_reference_weights(tiny.gguf_path), np.arange(3, 35))
    original = gguf_import._unpermute_rope_rows
    try:
        gguf_import._unpermute_rope_rows = lambda w, n: w
        wrong = make_tiny_store(tmp_path / "b")
    finally:
        gguf_import._unpermute_rope_rows = original
    ours = Engine.load(wrong.store_path).logits(np.arange(3, 35))
    assert np.abs(ours - ref).max() > 1e-2


def test_cached_decode_equals_full_forward(tiny_engine):
    ids = np.random.default_rng(1).integers(0, tiny_engine.config.vocab_size, 30)
    full = tiny_engine.logits(ids)
    # greedy-generate from a prefix; the logits that picked each token are the full forward's rows
    prefix = 10
    generated = list(tiny_engine.generate_ids(ids[:prefix], max_new_tokens=20, stop_ids=frozenset()))
    seq = np.concatenate([ids[:prefix], generated])
    full_seq = tiny_engine.logits(seq)
    assert generated[0] == int(np.argmax(full[prefix - 1]))
    for i, tok in enumerate(generated):
        assert tok == int(np.argmax(full_seq[prefix - 1 + i]))


def test_decode_step_logits_equal_full_forward(tiny_model):
    cfg = af.Engine.load(tiny_model.store_path).config
    params = llama.params_from_flat(cfg, {k: jnp.asarray(v) for k, v in tiny_model.params.items()})
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, 24).astype(np.int32)
    full, _ = llama.forward(params, llama.KVCache.zeros(cfg, 64), jnp.asarray(ids), 0, 24, cfg=cfg, attn_len=64,
                            all_logits=True)
    cache = llama.KVCache.zeros(cfg, 64)
    for pos, tok in enumerate(ids):
        step, cache = llama.forward(params, cache, jnp.asarray([tok]), pos, 1, cfg=cfg, attn_len=32,
                                    all_logits=False)
        np.testing.assert_allclose(np.asarray(step[0]), np.asarray(full[pos]), atol=2e-5, rtol=1e-5)


def test_chunked_prefill_and_padding_do_not_change_logits(tiny_engine, monkeypatch):
    ids = np.random.default_rng(3).integers(0, tiny_engine.config.vocab_size, 75)
    whole = tiny_engine.logits(ids)
    monkeypatch.setattr("activeflow_jax.engine.PREFILL_CHUNK", 16)
    chunked = tiny_engine.logits(ids)
    np.testing.assert_allclose(chunked, whole, atol=2e-5, rtol=1e-5)


def test_no_recompilation_per_token(tiny_engine):
    prompt = np.arange(5, 25)
    list(tiny_engine.generate_ids(prompt, max_new_tokens=40, stop_ids=frozenset()))
    compiles = tiny_engine.stats.compiles
    list(tiny_engine.generate_ids(prompt[:-3], max_new_tokens=60, stop_ids=frozenset()))
    assert tiny_engine.stats.compiles == compiles


def test_attention_length_follows_filled_part(tiny_engine):
    # a short generation in a long context window compiles only small attention buckets
    tiny_engine._compiled.clear()
    list(tiny_engine.generate_ids(np.arange(5, 15), max_new_tokens=5, stop_ids=frozenset()))
    keys = list(tiny_engine._compiled)  # ("layer", kind, cache, T, attn_len, ...) / ("step", cache, attn_len, ...)
    attn_lens = {key[4] for key in keys if key[0] == "layer"} | {key[2] for key in keys if key[0] == "step"}
    assert attn_lens and max(attn_lens) <= 128


def test_sampling_is_seeded_and_greedy_is_argmax(tiny_engine):
    prompt = np.arange(5, 15)
    kw = dict(max_new_tokens=12, stop_ids=frozenset())
    a = list(tiny_engine.generate_ids(prompt, temperature=1.0, top_p=0.9, seed=7, **kw))
    b = list(tiny_engine.generate_ids(prompt, temperature=1.0, top_p=0.9, seed=7, **kw))
    c = list(tiny_engine.generate_ids(prompt, temperature=1.0, top_p=0.9, seed=8, **kw))
    greedy = list(tiny_engine.generate_ids(prompt, **kw))
    tiny_p = list(tiny_engine.generate_ids(prompt, temperature=1.0, top_p=1e-6, seed=3, **kw))
    assert a == b and a != c
    assert tiny_p == greedy  # nucleus of (almost) zero mass keeps only the top token


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_p=0.0),
                                    dict(top_p=1.5), dict(max_new_tokens=0), dict(seed="x")])
def test_invalid_sampling_parameters(tiny_engine, kwargs):
    with pytest.raises(af.InvalidArgumentError):
        list(tiny_engine.generate_ids([5, 6, 7], **kwargs))


def test_prompt_longer_than_context(tiny_engine):
    ctx = tiny_engine.config.max_context
    with pytest.raises(af.PromptTooLongError, match="context"):
        list(tiny_engine.generate_ids(np.zeros(ctx - 2, np.int32), max_new_tokens=5))
    with pytest.raises(af.PromptTooLongError):
        tiny_engine.logits(np.zeros(ctx + 1, np.int32))
    with pytest.raises(af.InvalidArgumentError, match="token ids"):
        tiny_engine.logits([5, tiny_engine.config.vocab_size])


def test_text_api_and_stats(tiny_engine):
    pieces = list(tiny_engine.stream("the cat", max_new_tokens=8))
    text = tiny_engine.generate("the cat", max_new_tokens=8)
    assert "".join(pieces) == text
    chat = tiny_engine.generate("hi", chat=True, max_new_tokens=4)
    assert isinstance(chat, str)
    stats = tiny_engine.stats
    assert stats.decode_tokens > 0 and stats.decode_tokens_per_s > 0 and stats.peak_rss_bytes > 0
    assert stats.prefill_tokens_per_s > 0 and stats.compiles > 0 and stats.compile_seconds > 0
    assert set(stats.as_dict()) >= {"decode_tokens_per_s", "prefill_tokens_per_s", "compile_seconds"}


def test_untied_head(tmp_path):
    cfg = dataclasses.replace(tiny_config(), tie_embeddings=False)
    tiny = make_tiny_store(tmp_path, cfg)
    engine = Engine.load(tiny.store_path)
    assert not engine.config.tie_embeddings
    ids = np.arange(3, 20)
    np.testing.assert_allclose(engine.logits(ids), reference_logits(load_reference_weights(tiny.gguf_path), ids),
                               atol=1e-4, rtol=1e-4)


def test_first_argmax_is_argmax():
    """The greedy choice: the first maximum, the first NaN where there is one (jnp.argmax's rule)."""
    import jax.numpy as jnp

    from activeflow_jax.sampling import first_argmax

    rng = np.random.default_rng(3)
    cases = [rng.standard_normal(1000).astype(np.float32), np.array([1.0, 3.0, 3.0, 2.0], np.float32),
             np.array([-np.inf, -np.inf], np.float32), np.array([0.0, np.nan, 5.0, np.nan], np.float32),
             np.array([7.0], np.float32)]
    for x in cases:
        assert int(first_argmax(jnp.asarray(x))) == int(jnp.argmax(jnp.asarray(x)))
