"""Calibrated rounding of q4 stores (activeflow_jax/calibrated_rounding.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import activeflow_jax as af
from activeflow_jax import quant
from activeflow_jax.calibrated_rounding import calibrated_rows, calibration_tokens
from activeflow_jax.store import layout
from activeflow_jax.store.writer import convert
from activeflow_jax.testing import make_tiny_store


def _rounded(w):
    return quant.dequantize_np(quant.quantize_rows(w, "q4"), "q4", w.shape[1])


def _output_error(w, q, gram):
    """E|x (W - Q)|^2 over inputs with second moment `gram`: what rounding costs the op's output."""
    d = (w - q).astype(np.float64)
    return float(np.trace(d.T @ gram @ d))


def test_calibrated_rows_cut_the_output_error_of_rounding():
    rng = np.random.default_rng(0)
    n_in, n_out = 96, 64
    w = (rng.normal(size=(n_in, n_out)) * 0.05).astype(np.float32)
    # correlated inputs with a few loud channels, as activations are (a low-rank part plus noise)
    x = rng.normal(size=(2000, 12)) @ rng.normal(size=(12, n_in)) + 0.3 * rng.normal(size=(2000, n_in))
    x[:, :4] *= 8
    gram = x.T @ x / len(x)
    plain = _output_error(w, _rounded(w), gram)
    calibrated = _output_error(w, _rounded(calibrated_rows(w, gram)), gram)
    assert calibrated < 0.8 * plain
    # a channel never active (zero statistics) is rounded plainly and breaks nothing
    gram[7, :] = gram[:, 7] = 0
    out = calibrated_rows(w, gram)
    assert out.shape == w.shape and out.dtype == np.float32 and np.isfinite(out).all()


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rounding")
    tiny = make_tiny_store(directory)
    paths = {r: convert(tiny.gguf_path, os.path.join(directory, f"q4-{r}"), dtype="q4", rounding=r, progress=False)
             for r in ("plain", "calibrated")}
    return tiny, paths


def test_q4_convert_rounds_calibrated_by_default_and_records_it(tiny_q4, tmp_path):
    tiny, paths = tiny_q4
    manifests = {r: af.store.read_manifest(p) for r, p in paths.items()}
    assert manifests["calibrated"]["rounding"] == "calibrated" and manifests["plain"]["rounding"] == "plain"
    assert manifests["calibrated"]["layout_version"] == layout.Q4_LAYOUT_VERSION
    # the default for q4 is calibrated: converting again without saying so finds the store up to date
    before = os.path.getmtime(os.path.join(paths["calibrated"], layout.MANIFEST))
    assert convert(tiny.gguf_path, paths["calibrated"], dtype="q4", progress=False) == paths["calibrated"]
    assert os.path.getmtime(os.path.join(paths["calibrated"], layout.MANIFEST)) == before
    # a q8 store rounds plainly
    q8 = convert(tiny.gguf_path, str(tmp_path / "q8"), dtype="q8", progress=False)
    assert af.store.read_manifest(q8)["rounding"] == "plain"


def test_calibrated_q4_is_closer_to_the_f32_model_on_the_calibration_text(tiny_q4):
    tiny, paths = tiny_q4
    reference = af.Engine.load(tiny.store_path)
    windows = calibration_tokens(af.store.read_manifest(tiny.store_path)["tokenizer"])[:4, :128]
    ref = [reference.logits(w) for w in windows]
    errors = {}
    for rounding, path in paths.items():
        engine = af.Engine.load(path)
        errors[rounding] = float(np.mean([np.mean((engine.logits(w) - r) ** 2) for w, r in zip(windows, ref)]))
        engine.close()
    assert errors["calibrated"] < errors["plain"]


def test_rounding_bad_input_is_refused_before_writing(tiny_q4, tmp_path):
    tiny, _ = tiny_q4
    with pytest.raises(af.InvalidArgumentError, match="rounding must be one of"):
        convert(tiny.gguf_path, tmp_path / "a", dtype="q4", rounding="stochastic", progress=False)
    with pytest.raises(af.InvalidArgumentError, match="calibrated rounding is for q4"):
        convert(tiny.gguf_path, tmp_path / "b", dtype="q8", rounding="calibrated", progress=False)
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")
    with pytest.raises(af.InvalidArgumentError, match="tokenizer"):
        calibration_tokens({})


def test_cli_convert_takes_the_rounding(tiny_q4, tmp_path, capsys):
    from activeflow_jax.cli import main

    tiny, _ = tiny_q4
    out = str(tmp_path / "cli")
    assert main(["convert", tiny.gguf_path, out, "--dtype", "q4", "--rounding", "plain"]) == 0
    with open(os.path.join(out, layout.MANIFEST)) as f:
        assert json.load(f)["rounding"] == "plain"


def test_a_distilled_student_is_rounded_as_its_source_store(tiny_q4, tmp_path, monkeypatch):
    """distill() trains in f32 and writes the student in the source's dtype and rounding: a
    calibrated q4 source gets a calibrated student (statistics from the student's own weights),
    a plain one a plain student."""
    from activeflow_jax.distill import DistillConfig, distill
    from activeflow_jax.distill import train
    from activeflow_jax.testing import CALIBRATION_PROSE

    _, paths = tiny_q4
    text = tmp_path / "text.txt"
    text.write_text(CALIBRATION_PROSE)
    calls = []

    def recording(cfg, spec, flat, dtype, progress=False):
        calls.append((dtype, np.array(flat["layers.1.mlp.w_down"])))
        return original(cfg, spec, flat, dtype, progress)

    original = train.calibrated_tensors
    monkeypatch.setattr(train, "calibrated_tensors", recording)
    for rounding, path in paths.items():
        result = distill(path, tmp_path / f"student-{rounding}",
                         DistillConfig(sparsity=0.5, steps=2, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=1,
                                       save_every=1, policy="topk"),
                         text_path=str(text), progress=False, recalibrate=False)
        manifest = af.store.read_manifest(result.out_store)
        assert manifest["storage_dtype"] == "q4" and manifest["rounding"] == rounding
    assert [dtype for dtype, _ in calls] == ["q4"]  # the calibrated source only
    # the student's weights went through it: the rows it wrote are the calibrated rounding of them
    student = af.store.StoreReader(tmp_path / "student-calibrated")
    trained = calls[0][1]
    stored = student.read("layers.1.mlp.w_down")
    assert not np.array_equal(stored, _rounded(trained))  # plain rounding of the student would be this
