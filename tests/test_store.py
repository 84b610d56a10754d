"""Flash store: layout, round trip, atomic + idempotent conversion, and damage detection."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest

import activeflow_jax as af
from activeflow_jax.formats import gguf_import
from activeflow_jax.store import StoreReader, layout
from activeflow_jax.testing import make_tiny_store, write_tiny_gguf


def test_round_trip_channel_major(tiny_model):
    reader = StoreReader(tiny_model.store_path)
    for name, expected in tiny_model.params.items():
        got = reader.read(name)
        assert got.shape == expected.shape
        # F32 GGUF: exact up to the q/k permutation round trip, which is exact
        np.testing.assert_array_equal(got, expected)
    rows = [0, 3, 4, 100, 159]
    np.testing.assert_array_equal(reader.read_rows("layers.1.mlp.w_down", rows),
                                  tiny_model.params["layers.1.mlp.w_down"][rows])


def test_layout_is_sharded_with_checksums(tiny_model):
    meta = json.load(open(os.path.join(tiny_model.store_path, "tensors", "layers.0.mlp.w_gate_up", "zarr.json")))
    codec = meta["codecs"][0]
    assert codec["name"] == "sharding_indexed"
    inner = codec["configuration"]
    assert inner["chunk_shape"][0] < meta["shape"][0] or meta["shape"][0] <= inner["chunk_shape"][0]
    assert {"name": "crc32c"} in [{"name": c["name"]} for c in inner["codecs"]]
    assert {"name": "crc32c"} in [{"name": c["name"]} for c in inner["index_codecs"]]
    manifest = af.store.read_manifest(tiny_model.store_path)
    assert manifest["layout_version"] == layout.LAYOUT_VERSION
    assert manifest["model"]["num_layers"] == 2 and manifest["tokenizer"]


def test_chunking_gives_small_inner_chunks_for_real_shapes():
    chunk, shard = layout.chunking((576, 3072), 4)  # one row is 12 KiB: one row per chunk
    assert chunk == 1 and shard % chunk == 0 and shard * 3072 * 4 <= layout.TARGET_SHARD_BYTES
    chunk, shard = layout.chunking((1536, 576), 4)  # w_down: 2.25 KiB rows
    assert chunk * 576 * 4 <= layout.TARGET_CHUNK_BYTES < 2 * chunk * 576 * 4 and shard % chunk == 0
    chunk, shard = layout.chunking((49152, 576), 4)
    assert 1 < chunk and shard * 576 * 4 <= 2 * layout.TARGET_SHARD_BYTES


def test_float16_storage(tmp_path):
    tiny = make_tiny_store(tmp_path, dtype="float16")
    reader = StoreReader(tiny.store_path)
    assert reader.storage_dtype == "float16"
    w = tiny.params["layers.0.attn.wo"]
    np.testing.assert_array_equal(reader.read("layers.0.attn.wo"), w.astype(np.float16).astype(np.float32))
    assert os.path.getsize(glob.glob(os.path.join(tiny.store_path, "tensors", "embed", "c", "*", "*"))[0]) < \
        tiny.params["embed"].nbytes


def test_convert_is_idempotent(tmp_path):
    tiny = make_tiny_store(tmp_path)
    manifest = os.path.join(tiny.store_path, "manifest.json")
    before = os.stat(manifest).st_mtime_ns
    assert af.convert(tiny.gguf_path, tiny.store_path, progress=False) == tiny.store_path
    assert os.stat(manifest).st_mtime_ns == before
    with pytest.raises(af.StoreError, match="overwrite"):
        af.convert(tiny.gguf_path, tiny.store_path, dtype="float16", progress=False)
    af.convert(tiny.gguf_path, tiny.store_path, dtype="float16", overwrite=True, progress=False)
    assert StoreReader(tiny.store_path).storage_dtype == "float16"


def test_interrupted_conversion_leaves_nothing_that_loads(tmp_path, monkeypatch):
    gguf_path = str(tmp_path / "m.gguf")
    write_tiny_gguf(gguf_path)
    original = gguf_import.GGUFModel.iter_tensors

    def dies_midway(self):
        for i, item in enumerate(original(self)):
            if i == 5:
                raise KeyboardInterrupt  # e.g. Ctrl-C during conversion
            yield item

    monkeypatch.setattr(gguf_import.GGUFModel, "iter_tensors", dies_midway)
    store = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        af.convert(gguf_path, store, progress=False)
    assert not store.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".store")]
    with pytest.raises(af.StoreError, match="not found"):
        af.Engine.load(store)
    # a killed process leaves a temporary directory; it never loads and is cleaned up next time
    os.makedirs(tmp_path / ".store.tmp-999999-deadbeef" / "tensors")
    monkeypatch.setattr(gguf_import.GGUFModel, "iter_tensors", original)
    af.convert(gguf_path, store, progress=False)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".store")]
    af.Engine.load(store)


def test_store_without_manifest_is_refused(tmp_path):
    tiny = make_tiny_store(tmp_path)
    os.remove(os.path.join(tiny.store_path, "manifest.json"))
    with pytest.raises(af.StoreError, match="interrupted conversion"):
        af.Engine.load(tiny.store_path)


def test_other_layout_version_is_refused(tmp_path):
    tiny = make_tiny_store(tmp_path)
    path = os.path.join(tiny.store_path, "manifest.json")
    manifest = json.load(open(path))
    manifest["layout_version"] = 999
    json.dump(manifest, open(path, "w"))
    with pytest.raises(af.StoreError, match="layout version 999.*re-convert"):
        af.Engine.load(tiny.store_path)


def _shard_files(store, tensor):
    return sorted(glob.glob(os.path.join(store, "tensors", tensor, "c", "**", "*"), recursive=True))


def test_corrupted_chunk_names_the_tensor(tmp_path):
    tiny = make_tiny_store(tmp_path)
    shard = [f for f in _shard_files(tiny.store_path, "layers.1.mlp.w_down") if os.path.isfile(f)][0]
    data = bytearray(open(shard, "rb").read())
    data[200] ^= 0x55
    open(shard, "wb").write(bytes(data))
    with pytest.raises(af.StoreCorruptError, match=r"layers\.1\.mlp\.w_down.*checksum"):
        af.Engine.load(tiny.store_path)
    with pytest.raises(af.StoreCorruptError, match="checksum"):
        StoreReader(tiny.store_path).read_rows("layers.1.mlp.w_down", [0, 1])


def test_missing_chunk_is_detected(tmp_path):
    tiny = make_tiny_store(tmp_path)
    shard = [f for f in _shard_files(tiny.store_path, "layers.0.attn.wqkv") if os.path.isfile(f)][0]
    os.remove(shard)
    with pytest.raises(af.StoreCorruptError, match=r"layers\.0\.attn\.wqkv.*missing chunk"):
        af.Engine.load(tiny.store_path)


def test_missing_gguf(tmp_path):
    with pytest.raises(af.GGUFError, match="not found"):
        af.convert(tmp_path / "nope.gguf", tmp_path / "s", progress=False)


def test_not_a_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(af.GGUFError, match="not a GGUF"):
        af.convert(path, tmp_path / "s", progress=False)


def test_truncated_gguf(tmp_path):
    path = tmp_path / "t.gguf"
    full = write_tiny_gguf(path)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(af.GGUFError, match="truncated|damaged|incomplete"):
        af.convert(path, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()
    assert full  # the model was really written before truncation


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "g.gguf"
    write_tiny_gguf(path, arch="falcon")
    with pytest.raises(af.UnsupportedModelError, match="architecture 'falcon'.*supported: llama, gemma3, qwen2"):
        af.convert(path, tmp_path / "s", progress=False)


def test_unsupported_tensor_type(tmp_path, monkeypatch):
    import gguf

    path = tmp_path / "f64.gguf"
    original = gguf.GGUFWriter.add_tensor

    def f64_for_down(self, name, tensor, *args, **kwargs):
        if name.endswith("ffn_down.weight"):
            tensor = tensor.astype(np.float64)
        return original(self, name, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", f64_for_down)
    write_tiny_gguf(path)
    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", original)
    with pytest.raises(af.UnsupportedModelError, match="F64.*supported types"):
        af.convert(path, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_bad_storage_dtype(tmp_path):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path)
    with pytest.raises(af.InvalidArgumentError, match="float16"):
        af.convert(path, tmp_path / "s", dtype="int3", progress=False)
