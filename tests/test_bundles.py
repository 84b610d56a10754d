"""The streaming flash layout (store/bundles.py): exact rows, async reads, atomic relayout, damage."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from activeflow_jax.config import OP_GROUPS, PREDICTED_GROUPS, tiny_config
from activeflow_jax.errors import InvalidArgumentError, StoreCorruptError, StoreError
from activeflow_jax.store.bundles import (
    TENSOR_OF_OP,
    BundleReader,
    available_group_sizes,
    bundle_info,
    layer_groups,
    layout_dir,
    write_bundles,
)
from activeflow_jax.store.reader import StoreReader
from activeflow_jax.testing import make_tiny_store

NUM_LAYERS = 5  # groups of 2 and 3 over layers 1..4 are uneven


@pytest.fixture(scope="module")
def tiny5(tmp_path_factory):
    return make_tiny_store(tmp_path_factory.mktemp("tiny5"), tiny_config(num_layers=NUM_LAYERS)).store_path


@pytest.fixture
def store(tiny5, tmp_path):
    """A private copy for tests that write or damage the store."""
    return str(shutil.copytree(tiny5, tmp_path / "store", ignore=shutil.ignore_patterns("bundles")))


def _tree_digest(store: str) -> str:
    h = hashlib.sha256()
    paths = sorted(os.path.relpath(os.path.join(d, f), store) for d, _, files in os.walk(store) for f in files)
    for path in paths:
        if path.split(os.sep)[0] != "bundles":
            h.update(path.encode() + b"\0" + Path(store, path).read_bytes())
    return h.hexdigest()


def _shard_files(store: str, group_size: int, op: str, group: int) -> list[str]:
    root = os.path.join(layout_dir(store, group_size), op, f"g{group}", "c")
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)


def test_layer_groups():
    assert layer_groups(5, 2, 1) == [(1, 2), (3, 4)]
    assert layer_groups(5, 3, 1) == [(1, 2, 3), (4,)]
    assert layer_groups(5, 4, 0) == [(0, 1, 2, 3), (4,)]


@pytest.mark.parametrize("group_size", [1, 2, 3])
@pytest.mark.parametrize("first_layer", [0, 1])
def test_rows_equal_the_tensor_rows(store, group_size, first_layer):
    write_bundles(store, group_size, first_layer=first_layer)
    tensors, bundles = StoreReader(store), BundleReader(store, group_size)
    assert bundles.group_size == group_size and bundles.first_layer == first_layer
    assert bundles.layer_groups == layer_groups(NUM_LAYERS, group_size, first_layer)
    assert [layer for g in bundles.layer_groups for layer in g] == list(range(first_layer, NUM_LAYERS))
    rng = np.random.default_rng(group_size)
    for op in OP_GROUPS:
        for j, layers in enumerate(bundles.layer_groups):
            full = [tensors.read(f"layers.{layer}.{TENSOR_OF_OP[op]}") for layer in layers]
            n_in = full[0].shape[0]
            for channels in (np.arange(n_in), np.sort(rng.choice(n_in, n_in // 3, replace=False)), np.array([n_in - 1])):
                rows = bundles.read_group(op, j, channels)
                assert rows.dtype == np.float32 and rows.shape == (len(channels), len(layers), full[0].shape[1])
                for p, layer in enumerate(layers):
                    assert bundles.group_of(layer) == (j, p)
                    np.testing.assert_array_equal(rows[:, p], full[p][channels])
                    np.testing.assert_array_equal(bundles.read_layer(op, layer, channels), full[p][channels])


def test_shards_are_channel_major(tiny5):
    """The layout relies on TensorStore writing a shard's inner chunks in C order of the inner chunk
    grid, so channel c+1 follows channel c in the file and a run of channels is one byte range."""
    write_bundles(tiny5, 2, first_layer=1)
    info = bundle_info(tiny5, 2)
    for op in OP_GROUPS:
        entry = info["arrays"][f"{op}/g0"]
        meta = json.loads(Path(layout_dir(tiny5, 2), op, "g0", "zarr.json").read_text())
        inner = meta["codecs"][0]["configuration"]["chunk_shape"]
        # a predicted op's inner chunk holds all layers of its channels; o/down's one layer (they are
        # only read one layer at a time), and their shard files one layer each
        layers = entry["shape"][1] if op in PREDICTED_GROUPS else 1
        assert inner[1:] == [layers, entry["shape"][2]]
        assert meta["chunk_grid"]["configuration"]["chunk_shape"][1] == layers
        chunks = -(-entry["shard_rows"] // inner[0])
        data = Path(_shard_files(tiny5, 2, op, 0)[0]).read_bytes()
        index = np.frombuffer(data[-(16 * chunks + 4):-4], dtype="<u8").reshape(chunks, 2)
        written = index[index[:, 0] != np.iinfo(np.uint64).max]
        assert np.all(np.diff(written[:, 0].astype(np.int64)) > 0)
        assert np.all(written[1:, 0] == written[:-1, 0] + written[:-1, 1])  # back to back


def test_async_reads_in_flight_together(tiny5):
    write_bundles(tiny5, 2, first_layer=1)
    tensors, bundles = StoreReader(tiny5), BundleReader(tiny5, 2)
    channels = np.array([0, 1, 2, 10, 11, 40])
    before_reads, before_bytes = bundles.reads, bundles.bytes_requested
    handles = [(op, j, bundles.read_group_async(op, j, channels)) for op in OP_GROUPS for j in range(2)]
    layer_handle = bundles.read_layer_async("down", 3, channels)
    for op, j, handle in reversed(handles):
        rows = handle.result()
        for p, layer in enumerate(bundles.layer_groups[j]):
            np.testing.assert_array_equal(rows[:, p], tensors.read(f"layers.{layer}.{TENSOR_OF_OP[op]}")[channels])
    np.testing.assert_array_equal(layer_handle.result(), tensors.read("layers.3.mlp.w_down")[channels])
    assert bundles.reads - before_reads == len(handles) + 1
    expected = sum(len(channels) * 2 * tensors.shape(f"layers.1.{TENSOR_OF_OP[op]}")[1] * 4 for op in OP_GROUPS) * 2
    expected += len(channels) * tensors.shape("layers.3.mlp.w_down")[1] * 4
    assert bundles.bytes_requested - before_bytes == expected


def test_relayout_replaces_same_size_keeps_others_and_never_touches_the_store(store):
    Path(store, "calibration.json").write_text(json.dumps({"marker": 1}))
    before = _tree_digest(store)
    write_bundles(store, 2)
    marker = os.path.join(layout_dir(store, 2), "marker")
    open(marker, "w").close()
    write_bundles(store, 2)  # the same N again: a fresh directory, swapped in once complete
    assert not os.path.exists(marker)
    write_bundles(store, 3)
    assert available_group_sizes(store) == [2, 3]
    write_bundles(store, 1, remove_others=True)
    assert available_group_sizes(store) == [1]
    assert not [e for e in os.listdir(os.path.join(store, "bundles")) if e.startswith(".")]  # no temporaries left
    assert _tree_digest(store) == before
    with pytest.raises(StoreError, match="exists"):
        write_bundles(store, 1, overwrite=False)


def test_leftovers_of_an_interrupted_relayout(store):
    root = os.path.join(store, "bundles")
    dead, live = os.path.join(root, ".n2.tmp-999999999-abcdef"), os.path.join(root, ".n3.tmp-1-abcdef")
    os.makedirs(dead)
    os.makedirs(live)  # pid 1 is alive: another process's relayout in progress
    write_bundles(store, 2)
    assert not os.path.exists(dead) and os.path.isdir(live)
    assert available_group_sizes(store) == [2]  # a temporary is never taken for a layout


def test_missing_and_stale_layouts(store):
    assert bundle_info(store, 2) is None
    with pytest.raises(StoreError, match=r"activeflow relayout --store .* --group-size 2"):
        BundleReader(store, 2)
    write_bundles(store, 2)
    reader = BundleReader(store, 2)
    path = Path(store, "manifest.json")
    manifest = json.loads(path.read_text())
    manifest["created"] = "2000-01-01T00:00:00Z"  # as if the store were converted again
    path.write_text(json.dumps(manifest))
    assert bundle_info(store, 2) is None
    with pytest.raises(StoreError, match="stale"):
        BundleReader(store, 2)
    assert reader.read_group("qkv", 0, [0]).shape[0] == 1  # an open reader is not affected


def test_corrupted_shard_then_restored(store):
    write_bundles(store, 2, first_layer=1)
    reader = BundleReader(store, 2)
    channels = np.arange(0, 40, 3)
    good_group, good_layer = reader.read_group("gate_up", 1, channels), reader.read_layer("gate_up", 4, channels)
    path = Path(_shard_files(store, 2, "gate_up", 1)[0])
    saved = path.read_bytes()
    damaged = bytearray(saved)
    for i in range(0, len(damaged) // 2, 101):  # the data part: inner chunks come first, the index last
        damaged[i] ^= 0xFF
    path.write_bytes(bytes(damaged))
    shard = os.path.relpath(path, store)
    with pytest.raises(StoreCorruptError, match=r"gate_up of layers \(3, 4\), channels 0\.\.39") as err:
        reader.read_group("gate_up", 1, channels)
    assert shard in str(err.value) and "relayout" in str(err.value)
    with pytest.raises(StoreCorruptError, match=r"gate_up of layer 4"):
        reader.read_layer_async("gate_up", 4, channels).result()
    np.testing.assert_array_equal(reader.read_group("qkv", 1, channels)[:, 1],  # other arrays still read
                                  StoreReader(store).read("layers.4.attn.wqkv")[channels])
    path.write_bytes(saved)
    np.testing.assert_array_equal(reader.read_group("gate_up", 1, channels), good_group)
    np.testing.assert_array_equal(reader.read_layer("gate_up", 4, channels), good_layer)


def test_missing_shard_file_is_an_error_not_zeros(store):
    write_bundles(store, 2)
    reader = BundleReader(store, 2)
    path = _shard_files(store, 2, "down", 0)[0]
    os.rename(path, path + ".away")
    with pytest.raises(StoreCorruptError, match="down of layers .* is missing"):
        reader.read_group("down", 0, [0, 1])
    os.rename(path + ".away", path)
    assert np.any(reader.read_group("down", 0, [0, 1]) != 0)


def test_store_removed_while_open(store):
    write_bundles(store, 2)
    reader = BundleReader(store, 2)
    reader.read_group("o", 0, [0])
    shutil.rmtree(store)
    with pytest.raises(StoreError, match="removed"):
        reader.read_group("o", 0, [0, 1])
    with pytest.raises(StoreError, match="removed"):
        reader.read_layer("qkv", 2, [0])


def test_bad_arguments(tiny5):
    for bad in (0, -1, True, 1.5):
        with pytest.raises(InvalidArgumentError, match="group size"):
            write_bundles(tiny5, bad)
    for bad in (-1, NUM_LAYERS):
        with pytest.raises(InvalidArgumentError, match="first layer"):
            write_bundles(tiny5, 2, first_layer=bad)
    write_bundles(tiny5, 2, first_layer=1)
    reader = BundleReader(tiny5, 2)
    d = StoreReader(tiny5).config.d_model
    for bad in ([3, 1], [0, 0], [-1], [d], [[1]], [0.5]):
        with pytest.raises(InvalidArgumentError, match="channels"):
            reader.read_layer("qkv", 1, bad)
        with pytest.raises(InvalidArgumentError, match="channels"):
            reader.read_group_async("qkv", 0, bad)
    with pytest.raises(InvalidArgumentError, match="op group"):
        reader.read_layer("ffn", 1, [1])
    for layer in (0, NUM_LAYERS, -1):  # layer 0 is dense (not bundled) when first_layer=1
        with pytest.raises(InvalidArgumentError, match="layer"):
            reader.read_layer("qkv", layer, [1])
    with pytest.raises(InvalidArgumentError, match="layer group"):
        reader.read_group("qkv", 2, [1])
    assert reader.read_group("qkv", 0, []).shape[0] == 0


def test_relayout_cli(store, capsys):
    from activeflow_jax.cli import main

    assert main(["relayout", "--store", store, "--group-size", "3"]) == 0
    out = capsys.readouterr().out
    assert layout_dir(store, 3) in out and "layer groups of 3" in out
    assert BundleReader(store, 3).layer_groups == [(0, 1, 2), (3, 4)]
    assert main(["relayout", "--store", store, "--group-size", "0"]) == 2
    assert "group size" in capsys.readouterr().err
    assert main(["relayout", "--store", os.path.join(store, "nope"), "--group-size", "2"]) == 2


def test_extents_count_contiguous_ranges_of_whole_chunks(tiny5):
    write_bundles(tiny5, 2, first_layer=1)
    tensors, bundles = StoreReader(tiny5), BundleReader(tiny5, 2)
    channels = np.array([0, 1, 2, 10, 11, 40])
    out_qkv = tensors.shape("layers.1.attn.wqkv")[1]
    out_down = tensors.shape("layers.1.mlp.w_down")[1]
    # a predicted op's chunk holds the channel's rows for both layers of the group
    assert bundles.extents("qkv", 0, channels) == (3, 6 * 2 * out_qkv * 4)
    assert bundles.extents("down", 0, channels) == (3, 6 * out_down * 4)  # one layer per chunk
    assert bundles.extents("down", 0, np.array([], np.int64)) == (0, 0)


def test_flash_use_judges_each_kind_at_its_read_size():
    from activeflow_jax.runtime.bandwidth import Bandwidths, flash_use

    bw = Bandwidths(dram_bps=1e10, flash_bps_by_chunk=((4096, 1e8), (65536, 8e8)))
    loader = {"ondemand_extents": 100, "ondemand_extent_bytes": 409600, "ondemand_seconds": 0.008,
              "preload_extents": 0, "preload_extent_bytes": 0, "preload_seconds": 0.0}
    use = flash_use(loader, bw)
    assert set(use) == {"ondemand"}
    assert use["ondemand"]["mean_extent_bytes"] == 4096
    assert use["ondemand"]["achieved_bps"] == pytest.approx(409600 / 0.008)
    assert use["ondemand"]["share"] == pytest.approx(409600 / 0.008 / 1e8)
