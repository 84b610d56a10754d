"""The synthetic-model generator (checkpoints/make_synthetic.py) on its tiny preset.

The 4gb preset is never generated or loaded whole here: only its config is checked.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import activeflow_jax as af
from activeflow_jax.errors import InvalidArgumentError, StoreError
from activeflow_jax.store.reader import StoreReader

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "checkpoints", "make_synthetic.py")


@functools.cache
def _module():
    spec = importlib.util.spec_from_file_location("make_synthetic", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_4gb_preset_shape_is_tinyllama_like():
    cfg = _module().synthetic_config("4gb")
    assert (cfg.num_layers, cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (
        22, 2048, 5632, 32, 4, 64, 32000)
    assert not cfg.tie_embeddings and cfg.name == "synthetic-llama-4gb"
    assert 4.0e9 < 4 * cfg.num_params() < 4.8e9  # f32 bytes


def test_tiny_synthetic_store_runs_and_swaps(tmp_path):
    mod = _module()
    path = mod.make_synthetic_store(str(tmp_path / "syn"), "tiny", seed=3)
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    assert manifest["model"]["name"] == "synthetic-llama-tiny"
    assert manifest["source"]["synthetic"] is True and manifest["source"]["seed"] == 3
    assert manifest["source"]["preset"] == "tiny"
    engine = af.Engine.load(path)
    assert engine.tokenizer is None and engine.config.name == "synthetic-llama-tiny"
    logits = engine.logits([1, 2, 3, 4, 5])
    assert np.isfinite(logits).all() and logits.std() > 0.1
    assert len(list(engine.generate_ids([1, 2, 3], max_new_tokens=4))) == 4
    swapped = af.Engine.load(path, sparsity=0.5, policy="topk", dram_budget="5MB", kv_tokens=32, plan=False,
                             group_size=2, progress=False)
    reference = af.Engine.load(path, sparsity=0.5, policy="topk")
    assert list(swapped.generate_ids([1, 2, 3], max_new_tokens=6)) == list(reference.generate_ids([1, 2, 3],
                                                                                                   max_new_tokens=6))


def test_activations_stay_finite_through_22_layers(tmp_path):
    """The 4gb preset's depth on the tiny width: the init keeps the residual stream O(1)."""
    path = _module().make_synthetic_store(tmp_path / "deep", "tiny", seed=1, num_layers=22, d_ff=352)
    engine = af.Engine.load(path)
    assert engine.config.num_layers == 22 and engine.config.d_ff == 352
    logits = engine.logits(list(range(1, 17)))
    assert np.isfinite(logits).all() and 0.05 < logits.std() < 100
    ids = list(engine.generate_ids([1, 2, 3], max_new_tokens=4))
    assert len(ids) == 4 and all(0 <= i < engine.config.vocab_size for i in ids)


def test_weights_are_scaled_and_reproducible(tmp_path):
    mod = _module()
    a = StoreReader(mod.make_synthetic_store(tmp_path / "a", "tiny", seed=5))
    b = StoreReader(mod.make_synthetic_store(tmp_path / "b", "tiny", seed=5, dtype="float16"))
    c = StoreReader(mod.make_synthetic_store(tmp_path / "c", "tiny", seed=6))
    assert a.manifest["storage_dtype"] == "float32" and b.manifest["storage_dtype"] == "float16"
    down = a.read("layers.0.mlp.w_down")  # [d_ff, d_model]
    assert abs(down.std() * down.shape[0] ** 0.5 - 1) < 0.05
    assert abs(a.read("embed").std() - 0.02) < 0.002
    np.testing.assert_array_equal(a.read("layers.1.attn_norm.weight"), 1.0)
    np.testing.assert_allclose(np.asarray(b.read("layers.0.mlp.w_down"), np.float32), down, rtol=1e-3, atol=1e-4)
    assert not np.array_equal(c.read("layers.0.mlp.w_down"), down)


def test_overwrite_semantics(tmp_path):
    mod = _module()
    path = mod.make_synthetic_store(tmp_path / "syn", "tiny", seed=0)
    before = StoreReader(path).read("layers.0.attn.wo")
    with pytest.raises(StoreError, match="overwrite"):
        mod.make_synthetic_store(path, "tiny", seed=1)
    np.testing.assert_array_equal(StoreReader(path).read("layers.0.attn.wo"), before)  # untouched
    assert mod.make_synthetic_store(path, "tiny", seed=1, overwrite=True) == path
    assert StoreReader(path).manifest["source"]["seed"] == 1
    assert not np.array_equal(StoreReader(path).read("layers.0.attn.wo"), before)


def test_bad_arguments_are_activeflow_errors(tmp_path):
    mod = _module()
    with pytest.raises(InvalidArgumentError, match="preset"):
        mod.make_synthetic_store(tmp_path / "x", "huge")
    with pytest.raises(InvalidArgumentError, match="num_kv_heads"):
        mod.make_synthetic_store(tmp_path / "x", "tiny", num_heads=4, num_kv_heads=3)
    with pytest.raises(InvalidArgumentError, match="unknown shape"):
        mod.make_synthetic_store(tmp_path / "x", "tiny", n_layers=3)
    assert not os.path.exists(tmp_path / "x")


def test_cli_refuses_existing_path_without_traceback(tmp_path):
    out = tmp_path / "cli"

    def run(*flags):
        return subprocess.run([sys.executable, SCRIPT, "--preset", "tiny", "--out", str(out), "--num_layers", "2",
                               *flags], capture_output=True, text=True, timeout=300)

    first = run()
    assert first.returncode == 0, first.stderr
    assert str(out) in first.stdout and "peak RSS" in first.stdout
    refused = run()
    assert refused.returncode == 2
    assert "error:" in refused.stderr and "--overwrite" in refused.stderr and "Traceback" not in refused.stderr
    replaced = run("--overwrite", "--seed", "4")
    assert replaced.returncode == 0, replaced.stderr
    assert StoreReader(out).manifest["source"]["seed"] == 4
    assert StoreReader(out).config.num_layers == 2


def test_synthetic_gguf_holds_the_store_weights(tmp_path):
    """The synthetic model's GGUF (for llama.cpp, the peer) converts to exactly the synthetic store."""
    from activeflow_jax.store.writer import convert

    make_synthetic_store, write_synthetic_gguf = _module().make_synthetic_store, _module().write_synthetic_gguf

    gguf_path = write_synthetic_gguf(tmp_path / "syn.gguf", "tiny", seed=3, num_layers=2)
    converted = StoreReader(convert(gguf_path, tmp_path / "from-gguf", progress=False))
    direct = StoreReader(make_synthetic_store(tmp_path / "direct", "tiny", seed=3, num_layers=2))
    assert converted.config.num_layers == direct.config.num_layers == 2
    assert sorted(converted.tensor_names) == sorted(direct.tensor_names)
    for name in direct.tensor_names:
        np.testing.assert_array_equal(converted.read(name), direct.read(name), err_msg=name)
    assert converted.tokenizer_spec  # llama.cpp needs a vocabulary; so does text generation here
