"""The on-disk layout of a flash store: one definition used by the writer and the reader.

A store is a directory:
    manifest.json            format, layout version, model config, tokenizer, storage dtype,
                             per-tensor shape and chunking, source checksum; written last
    tensors/<name>/          one zarr3 array per parameter (TensorStore)
    calibration.json         optional: sparsity thresholds per (layer, op group) and level,
                             written atomically by `activeflow calibrate`; never touches tensors

Every 2-D weight is stored channel-major, [in, out], so one input channel is one contiguous row
(the embedding is [vocab, d]: one token per row). Arrays are sharded: a shard file holds
`shard_rows` rows and is made of inner chunks of `chunk_rows` rows, each with a crc32c, plus a
crc32c-protected index; a row block can be read without reading the rest of the tensor.

Storage dtypes: float32, float16, and the quantized q8 (layout version 2) / q4 (version 3): a
quantized store keeps each 2-D weight as uint8 rows of blocks (activeflow_jax/quant.py), so a row
is still one contiguous read; its manifest entry records the logical shape, the stored shape and
the dtype, which quant.tensor_dtype decides (norms f32; a q4 store's embedding/head q8).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from activeflow_jax.quant import is_quantized, row_bytes, tensor_dtype

FORMAT_NAME = "activeflow-store"
LAYOUT_VERSION = 1  # float32 / float16 stores (unchanged since version 1)
QUANT_LAYOUT_VERSION = 2  # q8 stores: readers before version 2 refuse them (they check the version)
Q4_LAYOUT_VERSION = 3  # q4 stores, whose embedding/head are q8 rows (quant.tensor_dtype); a version-2 q4 store
# held them as q4 and is refused (re-convert): every byte count follows the rule, not the manifest
READABLE_LAYOUT_VERSIONS = (LAYOUT_VERSION, QUANT_LAYOUT_VERSION, Q4_LAYOUT_VERSION)
MANIFEST = "manifest.json"
TENSOR_DIR = "tensors"
CALIBRATION = "calibration.json"
CALIBRATION_VERSION = 1
STORAGE_DTYPES = ("float32", "float16", "q8", "q4")  # q8 / q4: quantized rows, see activeflow_jax/quant.py
TARGET_CHUNK_BYTES = 8 << 10  # inner chunk: small, so sparse row reads fetch little extra
TARGET_SHARD_BYTES = 2 << 20  # shard file: large, so dense reads are few big reads


def _pow2_floor(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def chunking(shape: tuple[int, ...], itemsize: int, chunk_rows: int | None = None) -> tuple[int, int]:
    """(chunk_rows, shard_rows) for an array; 1-D arrays are a single chunk."""
    if len(shape) == 1:
        return shape[0], shape[0]
    row_bytes = shape[1] * itemsize
    rows = shape[0]
    chunk = chunk_rows or min(rows, _pow2_floor(max(1, TARGET_CHUNK_BYTES // row_bytes)))
    shard = chunk * max(1, TARGET_SHARD_BYTES // (chunk * row_bytes))
    return chunk, min(shard, -(-rows // chunk) * chunk)


def layout_version(dtype: str) -> int:
    """The layout version a store of `dtype` is written with."""
    if dtype == "q4":
        return Q4_LAYOUT_VERSION
    return QUANT_LAYOUT_VERSION if is_quantized(dtype) else LAYOUT_VERSION


def stored_form(name: str, shape: tuple[int, ...], dtype: str) -> tuple[tuple[int, ...], str, str]:
    """(stored shape, zarr data type, tensor dtype) of tensor `name` of logical `shape` in a store
    of `dtype`: a quantized tensor (quant.tensor_dtype) as uint8 rows [rows, row_bytes] (quant.py),
    anything else as an array of its own dtype."""
    own = tensor_dtype(dtype, name, tuple(shape))
    if is_quantized(own):
        return (shape[0], row_bytes(own, shape[1])), "uint8", own
    return tuple(shape), own, own


def stored_nbytes(name: str, shape: tuple[int, ...], dtype: str) -> int:
    """Bytes of tensor `name` as a store of `dtype` holds it (and as it is held in DRAM)."""
    stored_shape, zarr_dtype, _ = stored_form(name, shape, dtype)
    return int(np.prod(stored_shape)) * np.dtype(zarr_dtype).itemsize


def tensor_path(store_dir: str | os.PathLike, name: str) -> str:
    return os.path.join(os.fspath(store_dir), TENSOR_DIR, name)


def zarr_spec(path: str, shape: tuple[int, ...], dtype: str, chunk_rows: int, shard_rows: int,
              *, create: bool, direct_io: bool = False) -> dict[str, Any]:
    kvstore: dict[str, Any] = {"driver": "file", "path": path}
    if direct_io:
        kvstore["file_io_mode"] = {"mode": "direct"}
    spec: dict[str, Any] = {"driver": "zarr3", "kvstore": kvstore}
    if create:
        inner = [chunk_rows] + list(shape[1:])
        spec["metadata"] = {
            "shape": list(shape),
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard_rows] + list(shape[1:])}},
            "codecs": [{
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": inner,
                    "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                    "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                    "index_location": "end",
                },
            }],
        }
        spec["create"] = True
        spec["delete_existing"] = True
        # Write every chunk, even all-zero ones: a missing shard file then always means damage.
        spec["store_data_equal_to_fill_value"] = True
    else:
        spec["open"] = True
    return spec


def shard_keys(shape: tuple[int, ...], shard_rows: int) -> list[str]:
    """Relative paths of the shard files of an array (zarr3 default chunk key encoding)."""
    count = -(-shape[0] // shard_rows)
    trailing = "/0" * (len(shape) - 1)
    return [f"c/{i}{trailing}" for i in range(count)]
