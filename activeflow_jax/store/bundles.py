"""The streaming layout of a store ("bundles"): rows of one channel for all layers of a group, together.

The swapping runtime reads rows, not tensors: when it preloads layer group g (N consecutive
layers) it wants channel c of op `qkv` for all N layers, and on a miss it wants channel c of one
layer. So, next to `tensors/` (which stays as it is), a store gets

    bundles/n<N>/bundles.json            group size N, first layer, groups, fingerprint of the store
    bundles/n<N>/<op>/g<j>/              one zarr3 array per (op group, layer group): [in, n, out]

sharded so that one shard file holds many channels; an inner chunk (with its crc32c) of a predicted
op (qkv, gate_up) holds one channel's rows for all n layers of the group ([1, n, out]; see
TARGET_CHUNK_BYTES): a group preload of a channel is one chunk, adjacent channels are adjacent
chunks (TensorStore merges them into one read), and an on-demand row costs one chunk read. o and
down are only ever read one layer at a time (on demand), so their chunks hold one layer's row
([1, 1, out]): an n-layer chunk made every such read fetch n times the bytes it asked for (1.6x
over a whole run of the default model at a 60% budget, layout version 1); their shard files hold
one layer each, so adjacent channels of a layer stay one byte range. No row is stored twice
within a layout. `activeflow relayout`
writes the layout for another N (atomically: a layout for the same N is replaced only once the new
one is complete); layouts for several N may coexist, so runs with different group sizes do not
rewrite each other's (`--remove-others` deletes the rest).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from activeflow_jax.config import OP_GROUPS, PREDICTED_GROUPS, TENSOR_OF_OP
from activeflow_jax.errors import ActiveFlowError, InvalidArgumentError, StoreCorruptError, StoreError
from activeflow_jax.quant import is_quantized
from activeflow_jax.store.files import new_temporary_dir, replace_dir, write_error, write_json_durably
from activeflow_jax.store.reader import StoreReader, read_manifest

BUNDLE_DIR = "bundles"
BUNDLE_MANIFEST = "bundles.json"
BUNDLE_VERSION = 2  # 2: o/down chunks hold one layer
TARGET_SHARD_BYTES = 4 << 20
# Inner chunk of a predicted op: whole channels x all n layers of the group, ~this many bytes
# (default: one channel, [1, n, out]; o/down chunks hold one layer, see the module docstring). bench/bundles.py: [1, 1, out] chunks made group reads 1.5-2.5x slower (per-chunk
# CPU cost in TensorStore); ~32 KiB multi-channel chunks read as fast as [1, n, out] but fetch 5-7x
# the bytes asked for on single-layer (on-demand) reads, taking bandwidth from the preloads.
TARGET_CHUNK_BYTES = int(os.environ.get("ACTIVEFLOW_BUNDLE_CHUNK_BYTES", 1))


def _ts():
    import tensorstore as ts

    return ts


def _fingerprint(manifest: dict[str, Any]) -> str:
    return f"{manifest.get('created', '')}|{manifest.get('source', {}).get('sha256', '')}"


def layer_groups(num_layers: int, group_size: int, first_layer: int) -> list[tuple[int, ...]]:
    return [tuple(range(s, min(num_layers, s + group_size))) for s in range(first_layer, num_layers, group_size)]


def _spec(path: str, shape: tuple[int, ...], dtype: str, shard_rows: int, *, create: bool,
          direct_io: bool = False, chunk_rows: int = 1, chunk_layers: int | None = None) -> dict[str, Any]:
    kvstore: dict[str, Any] = {"driver": "file", "path": path}
    if direct_io:
        kvstore["file_io_mode"] = {"mode": "direct"}
    spec: dict[str, Any] = {"driver": "zarr3", "kvstore": kvstore}
    if not create:
        # A missing shard file (or store) would otherwise read as zeros: the fill value.
        spec.update(open=True, fill_missing_data_reads=False)
        return spec
    layers = shape[1] if chunk_layers is None else chunk_layers  # per shard file and per inner chunk
    spec["metadata"] = {
        "shape": list(shape), "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard_rows, layers, shape[2]]}},
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [chunk_rows, layers, shape[2]],
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            "index_location": "end"}}],
    }
    spec.update(create=True, delete_existing=True, store_data_equal_to_fill_value=True)
    return spec


def layout_dir(store_dir: str | os.PathLike, group_size: int) -> str:
    return os.path.join(os.path.abspath(os.fspath(store_dir)), BUNDLE_DIR, f"n{group_size}")


def available_group_sizes(store_dir: str | os.PathLike) -> list[int]:
    root = os.path.join(os.fspath(store_dir), BUNDLE_DIR)
    sizes = [int(e[1:]) for e in os.listdir(root) if e.startswith("n") and e[1:].isdigit()] if os.path.isdir(root) else []
    return sorted(n for n in sizes if bundle_info(store_dir, n) is not None)


def bundle_info(store_dir: str | os.PathLike, group_size: int) -> dict[str, Any] | None:
    """The store's streaming layout record for groups of `group_size`, or None if it has none
    (or a stale one)."""
    path = os.path.join(layout_dir(store_dir, group_size), BUNDLE_MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("version") != BUNDLE_VERSION or info.get("fingerprint") != _fingerprint(read_manifest(store_dir)):
        return None
    return info


def layout_bytes(reader: StoreReader, first_layer: int = 0) -> int:
    """Bytes a streaming layout takes on disk: every decoder layer's weights once (whatever N)."""
    return sum(reader.nbytes(f"layers.{i}.{t}") for i in range(first_layer, reader.config.num_layers)
               for t in TENSOR_OF_OP.values())


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def write_bundles(store_dir: str | os.PathLike, group_size: int, *, first_layer: int = 0, overwrite: bool = True,
                  progress: bool = False, remove_others: bool | None = None) -> str:
    """Writes the streaming layout for layer groups of `group_size`; returns its directory. Reads
    one (op, group) at a time, so memory stays near N layers of one op.

    Each layout is a full copy of the decoder weights; with `progress` the size and the place are
    said before writing. remove_others: delete the layouts for other group sizes (after writing);
    None: only when disk space is short (less than twice the new layout free), and then first."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise InvalidArgumentError(f"group size must be an int >= 1, got {group_size!r}")
    reader = StoreReader(store_dir)
    cfg = reader.config
    if not isinstance(first_layer, int) or not 0 <= first_layer < cfg.num_layers:
        raise InvalidArgumentError(f"first layer must be in [0, {cfg.num_layers}), got {first_layer!r}")
    final = layout_dir(reader.path, group_size)
    if os.path.exists(final) and not overwrite:
        raise StoreError(f"{final} exists; pass overwrite=True to replace it")
    needed = layout_bytes(reader, first_layer)
    others = [n for n in available_group_sizes(reader.path) if n != group_size]
    free = shutil.disk_usage(reader.path).free if os.path.isdir(reader.path) else 0
    if remove_others is None and others and free < 2 * needed:
        freed = sum(_dir_bytes(layout_dir(reader.path, n)) for n in others)
        print(f"disk space is short ({free / 1e6:.0f} MB free, the new layout needs {needed / 1e6:.0f} MB): removing "
              f"the streaming layouts for groups of {others} ({freed / 1e6:.0f} MB) first, as "
              "`activeflow relayout --remove-others` would (--keep-others keeps them)", file=sys.stderr)
        for n in others:
            shutil.rmtree(layout_dir(reader.path, n), ignore_errors=True)
        free += freed
    if progress:
        kept = f"; the layouts for groups of {others} stay (remove them with --remove-others)" if others and \
            os.path.isdir(layout_dir(reader.path, others[0])) and not remove_others else ""
        print(f"writing a streaming layout for groups of {group_size}: {needed / 1e6:.0f} MB more on disk in {final} "
              f"({free / 1e6:.0f} MB free there){kept}", file=sys.stderr)
    if free and free < needed:
        raise StoreError(f"cannot write {final}: it needs {needed / 1e6:.0f} MB and only {free / 1e6:.0f} MB are "
                         "free there; free some space (or remove other layouts with `activeflow relayout "
                         "--remove-others`)")
    try:
        tmp = new_temporary_dir(final)
    except OSError as exc:
        raise write_error(final, exc) from None
    groups = layer_groups(cfg.num_layers, group_size, first_layer)
    quantized = is_quantized(reader.storage_dtype)  # rows as stored: uint8 rows of blocks (quant.py)
    zarr_dtype = "uint8" if quantized else reader.storage_dtype
    ts = _ts()
    arrays: dict[str, Any] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(groups) * len(OP_GROUPS), desc=f"relayout N={group_size}", unit="bundle")
    try:
        for j, layers in enumerate(groups):
            for op in OP_GROUPS:
                names = [f"layers.{i}.{TENSOR_OF_OP[op]}" for i in layers]
                # [in, n, out] ([in, n, row_bytes] uint8 for a quantized store)
                shape = (reader.shape(names[0])[0], len(layers), reader.row_bytes(names[0]) // np.dtype(zarr_dtype).itemsize)
                chunk_layers = shape[1] if op in PREDICTED_GROUPS else 1
                row_bytes = chunk_layers * reader.row_bytes(names[0])  # one channel's rows in a chunk
                chunk = max(1, min(shape[0], TARGET_CHUNK_BYTES // row_bytes))
                # o/down: a shard file holds one layer's channels, so a run of them is one byte range
                shard = chunk * max(1, TARGET_SHARD_BYTES // (chunk * row_bytes))
                shard = min(shard, -(-shape[0] // chunk) * chunk)
                path = os.path.join(tmp, op, f"g{j}")
                array = ts.open(_spec(path, shape, zarr_dtype, shard, create=True, chunk_rows=chunk,
                                      chunk_layers=chunk_layers)).result()
                # One shard's rows at a time (whole shards, so no shard is rewritten): memory stays at
                # a few shards whatever N and the model size; the next block is read while one is written.
                writing = None
                for start in range(0, shape[0], shard):
                    rows = np.arange(start, min(shape[0], start + shard))
                    block = np.stack([reader.read_rows_stored(name, rows) for name in names], axis=1)
                    if writing is not None:
                        writing.result()
                    writing = array[rows[0]:rows[-1] + 1].write(block.astype(zarr_dtype, copy=False))
                writing.result()
                arrays[f"{op}/g{j}"] = {"shape": list(shape), "shard_rows": shard, "chunk_rows": chunk,
                                        "chunk_layers": chunk_layers}
                if bar is not None:
                    bar.update(1)
        info = {"version": BUNDLE_VERSION, "group_size": group_size, "first_layer": first_layer,
                "groups": [list(g) for g in groups], "storage_dtype": reader.storage_dtype, "arrays": arrays,
                "fingerprint": _fingerprint(reader.manifest)}
        write_json_durably(os.path.join(tmp, BUNDLE_MANIFEST), info)
        replace_dir(tmp, final)
    except ActiveFlowError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (OSError, ValueError) as exc:  # TensorStore reports a failed file write as ValueError
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(final, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    if remove_others:
        for n in available_group_sizes(reader.path):
            if n != group_size:
                shutil.rmtree(layout_dir(reader.path, n), ignore_errors=True)
    return final


class _Handle:
    """A read in flight; `result()` gives float32 [channels, n_layers, out] ([channels, out] for one
    layer) -- for a quantized store the rows as stored, uint8 [..., row_bytes], which the runtime's
    pools hold as they are -- or raises StoreError / StoreCorruptError."""

    def __init__(self, reader: "BundleReader", future, where: str, channels: np.ndarray):
        self._reader, self._future, self._where, self._channels = reader, future, where, channels

    def add_done_callback(self, fn) -> None:
        self._future.add_done_callback(fn)

    def result(self) -> np.ndarray:
        try:
            data = self._future.result()
        except Exception as exc:
            raise self._reader._wrap(exc, self._where, self._channels) from None
        return np.asarray(data, dtype=self._reader.row_dtype)


class BundleReader:
    """Reads rows of the streaming layout (TensorStore, on its own I/O threads)."""

    def __init__(self, store_dir: str | os.PathLike, group_size: int, *, direct_io: bool = False,
                 io_concurrency: int = 32):
        self.path = os.path.abspath(os.fspath(store_dir))
        manifest = read_manifest(self.path)
        self.root = layout_dir(self.path, group_size)
        if not os.path.isfile(os.path.join(self.root, BUNDLE_MANIFEST)):
            raise StoreError(f"store {self.path} has no streaming layout for groups of {group_size}; run "
                             f"`activeflow relayout --store {self.path} --group-size {group_size}` "
                             "(Engine.load(..., dram_budget=...) does it for you)")
        info = bundle_info(self.path, group_size)
        if info is None:
            raise StoreError(f"the streaming layout of {self.path} is stale or damaged (the store changed since); "
                             f"run `activeflow relayout --store {self.path} --group-size {group_size}` again")
        self.info, self.direct_io = info, direct_io
        self.group_size: int = info["group_size"]
        self.first_layer: int = info["first_layer"]
        self.layer_groups: list[tuple[int, ...]] = [tuple(g) for g in info["groups"]]
        self.storage_dtype = info["storage_dtype"]
        self.quantized = is_quantized(self.storage_dtype)
        self.row_dtype = np.dtype(np.uint8 if self.quantized else np.float32)  # what reads return
        self._itemsize = 1 if self.quantized else np.dtype(self.storage_dtype).itemsize  # stored bytes per element
        self.num_layers = manifest["model"]["num_layers"]
        self._group_of = {layer: (j, p) for j, g in enumerate(self.layer_groups) for p, layer in enumerate(g)}
        self._context = _ts().Context({"cache_pool": {"total_bytes_limit": 0},
                                       "file_io_concurrency": {"limit": io_concurrency}})
        self._arrays: dict[str, Any] = {}
        self.bytes_requested = 0
        self.reads = 0

    def extents(self, op: str, group: int, channels: np.ndarray) -> tuple[int, int]:
        """(contiguous byte ranges, bytes) the storage must read for `channels` (sorted) of `op` in
        layer group `group`: adjacent channels are adjacent chunks, and a chunk is read whole (a
        predicted op's chunk holds the channel's rows for every layer of the group, so a one-layer
        read of it still reads all of them). What the achieved flash throughput is judged by."""
        if len(channels) == 0:
            return 0, 0
        entry = self.info["arrays"][f"{op}/g{group}"]
        chunk_bytes = entry.get("chunk_layers", entry["shape"][1]) * entry["shape"][2] * self._itemsize
        runs = 1 + int(np.count_nonzero(np.diff(np.asarray(channels)) != 1))
        return runs, len(channels) * chunk_bytes

    def group_of(self, layer: int) -> tuple[int, int]:
        """(group index, position inside the group) of a layer."""
        try:
            return self._group_of[layer]
        except KeyError:
            raise InvalidArgumentError(f"layer {layer!r} is not in the streaming layout (layers "
                                       f"{self.first_layer}..{self.num_layers - 1})") from None

    def _array(self, op: str, group: int):
        if op not in TENSOR_OF_OP:
            raise InvalidArgumentError(f"unknown op group {op!r}; expected one of {OP_GROUPS}")
        if not isinstance(group, (int, np.integer)) or not 0 <= group < len(self.layer_groups):
            raise InvalidArgumentError(f"layer group {group!r} out of range [0, {len(self.layer_groups)})")
        key = f"{op}/g{group}"
        if key not in self._arrays:
            entry = self.info["arrays"][key]
            spec = _spec(os.path.join(self.root, op, f"g{group}"), tuple(entry["shape"]),
                         "uint8" if self.quantized else self.storage_dtype, entry["shard_rows"], create=False,
                         direct_io=self.direct_io)
            try:
                self._arrays[key] = _ts().open(spec, context=self._context).result()
            except Exception as exc:
                raise self._wrap(exc, f"{op} of layers {self.layer_groups[group]}", None) from None
        return self._arrays[key]

    def _channels(self, array, channels: Sequence[int] | np.ndarray) -> np.ndarray:
        ch = np.asarray(channels)
        if ch.ndim != 1 or (ch.size and not np.issubdtype(ch.dtype, np.integer)):
            raise InvalidArgumentError("channels must be a 1-D array of ints")
        ch = ch.astype(np.int64)
        if ch.size and (ch[0] < 0 or ch[-1] >= array.shape[0] or np.any(np.diff(ch) <= 0)):
            raise InvalidArgumentError(f"channels must be sorted, unique and in [0, {array.shape[0]})")
        return ch

    def _wrap(self, exc: Exception, where: str, channels: np.ndarray | None) -> StoreError:
        text = str(exc)
        rows = "" if channels is None or len(channels) == 0 else f", channels {channels[0]}..{channels[-1]}"
        shard = re.search(r'local file "([^"]+)"', text)  # TensorStore names the failing shard file
        if shard:
            rows += f" (shard file {os.path.relpath(shard.group(1), self.path)})"
        if not os.path.isdir(self.path):
            return StoreError(f"store {self.path} was removed while in use; restore it or load another store")
        damage = ("failed its checksum" if "DATA_LOSS" in text or "checksum" in text.lower() or "crc32c" in text.lower()
                  else "is missing" if "NOT_FOUND" in text else None)
        if damage:
            return StoreCorruptError(f"store {self.path}: streaming layout, {where}{rows} {damage}; the layout is "
                                     f"damaged: run `activeflow relayout --store {self.path} --group-size "
                                     f"{self.group_size}` (the tensors themselves are separate)")
        return StoreError(f"store {self.path}: reading the streaming layout, {where}{rows} failed: "
                          f"{text.splitlines()[0] if text else type(exc).__name__}; run `activeflow relayout` if "
                          "the layout is damaged")

    def read_group_async(self, op: str, group: int, channels) -> _Handle:
        """Starts reading channels (sorted) of `op` for every layer of `group`."""
        array = self._array(op, group)
        ch = self._channels(array, channels)
        where = f"{op} of layers {self.layer_groups[group]}"
        ts = _ts()
        try:
            with ts.Batch() as batch:  # lets TensorStore merge reads of adjacent chunks
                future = array.oindex[ch].read(batch=batch)
        except Exception as exc:
            raise self._wrap(exc, where, ch) from None
        self.reads += 1
        self.bytes_requested += len(ch) * array.shape[1] * array.shape[2] * self._itemsize
        return _Handle(self, future, where, ch)

    def read_group(self, op: str, group: int, channels) -> np.ndarray:
        return self.read_group_async(op, group, channels).result()

    def read_layer(self, op: str, layer: int, channels) -> np.ndarray:
        """Rows (channels, sorted) of one layer's `op` as float32 [len(channels), out]."""
        return self.read_layer_async(op, layer, channels).result()

    def read_layer_async(self, op: str, layer: int, channels) -> _Handle:
        """Starts reading channels (sorted) of one layer's `op`; `result()` gives [len(channels), out]."""
        group, position = self.group_of(layer)
        array = self._array(op, group)
        ch = self._channels(array, channels)
        ts = _ts()
        try:
            with ts.Batch() as batch:
                future = array.oindex[ch, position].read(batch=batch)
        except Exception as exc:
            raise self._wrap(exc, f"{op} of layer {layer}", ch) from None
        self.reads += 1
        self.bytes_requested += len(ch) * array.shape[2] * self._itemsize
        return _Handle(self, future, f"{op} of layer {layer}", ch)
