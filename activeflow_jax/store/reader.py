"""Reading flash stores: manifest validation and (row-block) tensor reads via TensorStore.

This is the one place that talks to TensorStore for reading. Its errors are turned into
`StoreError` / `StoreCorruptError` naming the tensor and the rows, never raw TensorStore
tracebacks.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from activeflow_jax.aligned import aligned_array
from activeflow_jax.config import ModelConfig
from activeflow_jax.errors import StoreCorruptError, StoreError
from activeflow_jax.models.llama import param_shapes
from activeflow_jax.quant import QRows, dequantize_np, is_quantized
from activeflow_jax.store import layout


def read_manifest(store_dir: str | os.PathLike) -> dict[str, Any]:
    store_dir = os.fspath(store_dir)
    path = os.path.join(store_dir, layout.MANIFEST)
    if not os.path.isdir(store_dir):
        raise StoreError(f"store not found: {store_dir} (create one with `activeflow convert` or `activeflow fetch`)")
    if not os.path.isfile(path):
        raise StoreError(
            f"{store_dir} is not a complete store (no {layout.MANIFEST}); it may be an interrupted "
            "conversion: convert again"
        )
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path} is unreadable ({exc}); convert the store again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != layout.FORMAT_NAME:
        raise StoreError(f"{path} is not an activeflow store manifest")
    version = manifest.get("layout_version")
    if version not in layout.READABLE_LAYOUT_VERSIONS:
        raise StoreError(
            f"{store_dir} has store layout version {version}, this activeflow_jax reads versions "
            f"{list(layout.READABLE_LAYOUT_VERSIONS)}; re-convert it from its GGUF with "
            "`activeflow convert --overwrite` (or use the activeflow_jax that wrote it)"
        )
    for key in ("model", "tokenizer", "tensors", "storage_dtype"):
        if key not in manifest:
            raise StoreError(f"{path} lacks '{key}'; convert the store again")
    dtype = manifest["storage_dtype"]
    if dtype == "q4" and version == layout.QUANT_LAYOUT_VERSION:
        raise StoreError(
            f"{store_dir} is a q4 store written by an older activeflow_jax (layout version {version}: its "
            "embedding is 4-bit); q4 stores now keep the embedding and head as q8 (layout version "
            f"{layout.Q4_LAYOUT_VERSION}, a better model). Re-convert it: `activeflow convert --overwrite "
            "--dtype q4 <model.gguf> <store>` (or `activeflow fetch <model> --dtype q4` for a fetched one)"
        )
    if dtype not in layout.STORAGE_DTYPES or layout.layout_version(dtype) != version:
        raise StoreError(
            f"{store_dir} has storage dtype {dtype!r} (layout version {version}), which this activeflow_jax "
            f"cannot read (it reads {list(layout.STORAGE_DTYPES)}); re-convert the store with "
            "`activeflow convert --overwrite --dtype q8|q4|f16|f32`"
        )
    return manifest


_POSITIVE_INT_FIELDS = ("num_layers", "d_model", "d_ff", "num_heads", "num_kv_heads", "head_dim", "vocab_size",
                        "max_context")
_EDITED = "the manifest is damaged or was edited: re-convert the store (`activeflow convert --overwrite`)"


def config_from_manifest(manifest: dict[str, Any], store_dir: str) -> ModelConfig:
    """The model config of a manifest, its fields checked (a zero, negative or non-numeric size
    would otherwise surface as a traceback deep inside JAX, or as wrong text)."""
    model = manifest["model"]
    if not isinstance(model, dict):
        raise StoreError(f"store {store_dir}: the model config is not a record; {_EDITED}")
    for key in _POSITIVE_INT_FIELDS:
        value = model.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise StoreError(f"store {store_dir}: model field '{key}' is {value!r}, not a positive integer; {_EDITED}")
    for key in ("rope_theta", "norm_eps"):
        value = model.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise StoreError(f"store {store_dir}: model field '{key}' is {value!r}, not a positive number; {_EDITED}")
    import dataclasses

    kinds = {"str": str, "int": int, "float": (int, float), "bool": bool}
    for field in dataclasses.fields(ModelConfig):
        kind = kinds.get(field.type) if isinstance(field.type, str) else None
        value = model.get(field.name)
        if kind is not None and field.name in model and (not isinstance(value, kind) or
                                                         (kind is not bool and isinstance(value, bool))):
            raise StoreError(f"store {store_dir}: model field '{field.name}' is {value!r:.60}, not a {field.type}; "
                             f"{_EDITED}")
    try:
        cfg = ModelConfig.from_json(model)
        hash(cfg)
        return cfg
    except (TypeError, ValueError) as exc:
        raise StoreError(f"store {store_dir}: the model config is inconsistent ({exc}); {_EDITED}") from None


def check_manifest_tensors(manifest: dict[str, Any], cfg: ModelConfig, store_dir: str) -> None:
    """The manifest's tensor records agree with its model config: sizes and chunking are positive
    integers, the layers the tensors name are those the config counts, and every tensor the model
    needs has the shape it needs (records of a kind this check does not know are left alone)."""
    tensors = manifest["tensors"]  # (the storage dtype was checked by read_manifest)
    if not isinstance(tensors, dict):
        raise StoreError(f"store {store_dir}: the tensor list is not a record; {_EDITED}")
    layers = {name.split(".")[1] for name in tensors if name.startswith("layers.")}
    named = sorted(int(x) for x in layers if x.isdigit())
    if len(layers) != cfg.num_layers or named != list(range(cfg.num_layers)):  # the count first: it may be huge
        raise StoreError(f"store {store_dir}: the model config counts {cfg.num_layers} layers but the tensors are of "
                         f"{len(named)} layers ({named[0] if named else '-'}..{named[-1] if named else '-'}); {_EDITED}")
    expected = param_shapes(cfg)
    for name, entry in tensors.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        fields = [shape, [entry.get("chunk_rows"), entry.get("shard_rows")] if shape is not None else None]
        if not all(isinstance(f, list) and f and all(type(x) is int and x >= 1 for x in f) for f in fields):
            raise StoreError(f"store {store_dir}: tensor '{name}' has a shape or chunking that is not positive "
                             f"integers ({entry!r:.120}); {_EDITED}")
        if entry["shard_rows"] % entry["chunk_rows"]:
            raise StoreError(f"store {store_dir}: tensor '{name}' has shard_rows not a multiple of chunk_rows; {_EDITED}")
        recorded, rule = entry.get("dtype"), layout.stored_form(name, tuple(shape), manifest["storage_dtype"])[2]
        if recorded is not None and recorded != rule:
            raise StoreError(f"store {store_dir}: tensor '{name}' is recorded as {recorded!r}, but a "
                             f"{manifest['storage_dtype']} store holds it as {rule!r}; {_EDITED}")
        if name in expected and set(entry) <= {"shape", "chunk_rows", "shard_rows"} and tuple(shape) != expected[name]:
            raise StoreError(f"store {store_dir}: tensor '{name}' has shape {tuple(shape)} but the model config needs "
                             f"{expected[name]}; {_EDITED}")


def _ts():
    import tensorstore as ts

    return ts


class StoreReader:
    """An opened store: config, tokenizer spec, and reads of whole tensors or row sets."""

    def __init__(self, store_dir: str | os.PathLike, *, direct_io: bool = False, check_files: bool = True):
        self.path = os.path.abspath(os.fspath(store_dir))
        self.manifest = read_manifest(self.path)
        self.config = config_from_manifest(self.manifest, self.path)
        check_manifest_tensors(self.manifest, self.config, self.path)
        self.tokenizer_spec: dict[str, Any] = self.manifest["tokenizer"]
        self.storage_dtype: str = self.manifest["storage_dtype"]
        self.direct_io = direct_io
        ts = _ts()
        # No TensorStore chunk cache: our own buffers hold what we keep, so nothing is held twice.
        self._context = ts.Context({
            "cache_pool": {"total_bytes_limit": 0},
            "file_io_concurrency": {"limit": 16},
        })
        self._arrays: dict[str, Any] = {}
        if check_files:
            self.check_files()

    def check_files(self) -> None:
        """Every shard file the manifest implies must exist (a missing one would read as zeros)."""
        for name, entry in self.manifest["tensors"].items():
            base = layout.tensor_path(self.path, name)
            for key in layout.shard_keys(tuple(entry["shape"]), entry["shard_rows"]):
                if not os.path.isfile(os.path.join(base, key)):
                    raise StoreCorruptError(
                        f"store {self.path}: tensor '{name}' is missing chunk file {key}; the store is "
                        "incomplete or damaged: re-convert it (`activeflow convert --overwrite`)"
                    )

    @property
    def tensor_names(self) -> list[str]:
        return list(self.manifest["tensors"])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def nbytes(self, name: str) -> int:
        """Bytes of the tensor as stored (and as held in DRAM, for quantized weights)."""
        return layout.stored_nbytes(name, self.shape(name), self.storage_dtype)

    def tensor_dtype(self, name: str) -> str:
        """The tensor's own dtype (quant.tensor_dtype): the store's, except for the f32 norms of a
        quantized store and the q8 embedding/head of a q4 store."""
        return self._stored(name)[2]

    def row_bytes(self, name: str) -> int:
        """Bytes of one stored row (input channel) of a 2-D tensor: what a row read costs."""
        stored = self._stored(name)
        return int(np.prod(stored[0][1:])) * np.dtype(stored[1]).itemsize

    def _stored(self, name: str) -> tuple[tuple[int, ...], str, str]:
        return layout.stored_form(name, self.shape(name), self.storage_dtype)

    def _as_f32(self, name: str, data) -> np.ndarray:
        """Stored values -> float32 in the logical shape (quantized rows are widened, quant.py)."""
        dtype = self.tensor_dtype(name)
        if is_quantized(dtype):
            return dequantize_np(np.asarray(data), dtype, self.shape(name)[1])
        return np.asarray(data, dtype=np.float32)

    def read_held(self, name: str):
        """The tensor as the all-in-DRAM engine holds it: a QRows (numpy data) for a quantized
        weight, float32 otherwise."""
        dtype = self.tensor_dtype(name)
        if not is_quantized(dtype):
            return self.read(name)
        try:
            data = np.asarray(self._array(name).read().result(), np.uint8)
        except Exception as exc:
            raise self._wrap(exc, name, None) from None
        return QRows(data, dtype, self.shape(name)[1])

    def iter_held(self, names: Iterable[str]) -> Iterator[tuple[str, Any]]:
        """(name, read_held(name)) for each name, one tensor at a time."""
        if not is_quantized(self.storage_dtype):
            yield from self.iter_many(names)
            return
        for name in names:
            yield name, self.read_held(name)

    def read_rows_stored(self, name: str, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows of a 2-D tensor as stored ([len(rows), row_bytes] uint8 for quantized weights)."""
        rows = np.asarray(rows, dtype=np.int64)
        try:
            return np.asarray(self._array(name).oindex[rows].read().result())
        except Exception as exc:
            raise self._wrap(exc, name, rows.tolist()) from None

    def _entry(self, name: str) -> dict[str, Any]:
        try:
            return self.manifest["tensors"][name]
        except KeyError:
            raise StoreError(f"tensor '{name}' is not in store {self.path}") from None

    def _array(self, name: str):
        if name not in self._arrays:
            entry = self._entry(name)
            path = layout.tensor_path(self.path, name)
            stored_shape, zarr_dtype, _ = self._stored(name)
            spec = layout.zarr_spec(path, stored_shape, zarr_dtype, entry["chunk_rows"],
                                    entry["shard_rows"], create=False, direct_io=self.direct_io)
            try:
                self._arrays[name] = _ts().open(spec, context=self._context).result()
            except Exception as exc:
                raise self._wrap(exc, name, None) from None
        return self._arrays[name]

    def _wrap(self, exc: Exception, name: str, rows: Sequence[int] | None) -> StoreError:
        where = "" if rows is None or len(rows) == 0 else f" rows {rows[0]}..{rows[-1]}"
        text = str(exc)
        if not os.path.isdir(self.path):
            return StoreError(f"store {self.path} was removed while in use; restore it or load another store")
        if "DATA_LOSS" in text or "checksum" in text.lower() or "crc32c" in text.lower():
            chunk_rows = self._entry(name)["shard_rows"]
            shard = f" (shard file c/{rows[0] // chunk_rows}/0)" if rows is not None and len(rows) else ""
            return StoreCorruptError(
                f"store {self.path}: tensor '{name}'{where}{shard} failed its checksum; the store is "
                "damaged: re-convert it (`activeflow convert --overwrite`)"
            )
        return StoreError(f"store {self.path}: reading tensor '{name}'{where} failed: {text.splitlines()[0]}")

    def read(self, name: str) -> np.ndarray:
        """The whole tensor as float32."""
        return self.read_many([name])[name]

    def read_many(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        """Whole tensors as float32, with reads in flight concurrently."""
        return dict(self.iter_many(names))

    def iter_many(self, names: Iterable[str], *, in_flight: int = 8) -> Iterator[tuple[str, np.ndarray]]:
        """Yields (name, float32 array) in order with at most `in_flight` reads outstanding, so a
        caller that moves each tensor elsewhere holds only a few host copies at a time."""
        names = list(names)
        pending: collections.deque = collections.deque()
        for name in names:
            pending.append((name, self._array(name).read()))
            if len(pending) >= in_flight:
                yield self._finish(*pending.popleft())
        while pending:
            yield self._finish(*pending.popleft())

    def _finish(self, name: str, future) -> tuple[str, np.ndarray]:
        try:
            return name, self._as_f32(name, future.result())
        except Exception as exc:
            raise self._wrap(exc, name, None) from None

    def iter_row_blocks(self, name: str, block_bytes: int = 16 << 20) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 rows) of a tensor in blocks of about `block_bytes` (as f32), so a
        caller that converts or moves each block holds one block of temporaries, not the tensor."""
        array = self._array(name)
        shape = self.shape(name)
        quantized = is_quantized(self.tensor_dtype(name))
        row_bytes = max(1, int(np.prod(shape[1:])) * 4)
        step = max(1, block_bytes // row_bytes)
        for start in range(0, shape[0], step):
            stop = min(shape[0], start + step)
            try:
                block = array[start:stop].read().result()
                block = self._as_f32(name, block) if quantized else np.asarray(block, np.float32)
            except Exception as exc:
                raise self._wrap(exc, name, [start, stop - 1]) from None
            yield start, block

    def read_aligned(self, name: str, block_bytes: int = 16 << 20) -> np.ndarray:
        """The whole tensor as float32 in a 64-byte-aligned buffer filled block by block: on the
        CPU, `jax.device_put` then adopts the buffer instead of copying it, so a resident tensor
        costs its own size once, not twice (the caller must not reuse the buffer afterwards)."""
        out = aligned_array(self.shape(name), np.float32)
        for start, block in self.iter_row_blocks(name, block_bytes):
            out[start:start + len(block)] = block
        return out

    def read_rows(self, name: str, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows (input channels) of a 2-D tensor as float32 [len(rows), out]; rows sorted ascending."""
        rows = np.asarray(rows, dtype=np.int64)
        try:
            data = self._array(name).oindex[rows].read().result()
        except Exception as exc:
            raise self._wrap(exc, name, rows.tolist()) from None
        return self._as_f32(name, data)
