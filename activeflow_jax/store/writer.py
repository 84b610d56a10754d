"""Writing flash stores: atomic (temporary directory, rename at the end) and idempotent."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np

from activeflow_jax.config import ModelConfig
from activeflow_jax.errors import InvalidArgumentError, StoreError
from activeflow_jax.quant import canonical_dtype, is_quantized, quantize_rows
from activeflow_jax.store import layout


def _ts():
    import tensorstore as ts

    return ts


def write_store(store_dir: str | os.PathLike, config: ModelConfig, tokenizer_spec: dict[str, Any],
                tensors: Iterable[tuple[str, np.ndarray]], *, dtype: str = "float32",
                source: dict[str, Any] | None = None, overwrite: bool = False, progress: bool = False,
                total: int | None = None, chunk_rows: int | None = None) -> str:
    """Writes a complete store at `store_dir`, atomically.

    Tensors go into a hidden temporary directory beside the target; the manifest is written
    last and the directory renamed into place, so an interrupted write never leaves a store
    that loads (a leftover `.<name>.tmp-*` directory is ignored and cleaned up next time).
    """
    dtype = canonical_dtype(dtype)
    store_dir = os.path.abspath(os.fspath(store_dir))
    if os.path.exists(store_dir) and not overwrite:
        raise StoreError(f"{store_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    base = os.path.basename(store_dir)
    tmp = new_temporary_dir(store_dir)
    os.makedirs(os.path.join(tmp, layout.TENSOR_DIR))
    ts = _ts()
    entries: dict[str, Any] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"convert -> {base}", unit="tensor")
    try:
        for name, array in tensors:
            shape = tuple(np.shape(array))
            stored_shape, zarr_dtype, tensor_dtype = layout.stored_form(shape, dtype)
            if is_quantized(tensor_dtype):  # quantized from the importer's f32, row by row (quant.py)
                array = quantize_rows(np.asarray(array, np.float32), tensor_dtype)
            array = np.ascontiguousarray(array, dtype=np.dtype(zarr_dtype))
            chunk, shard = layout.chunking(stored_shape, np.dtype(zarr_dtype).itemsize, chunk_rows)
            spec = layout.zarr_spec(layout.tensor_path(tmp, name), stored_shape, zarr_dtype, chunk, shard, create=True)
            ts.open(spec).result().write(array).result()
            entries[name] = {"shape": list(shape), "chunk_rows": chunk, "shard_rows": shard}
            if is_quantized(dtype):
                entries[name].update(dtype=tensor_dtype, stored_shape=list(stored_shape))
            if bar is not None:
                bar.update(1)
        manifest = {
            "format": layout.FORMAT_NAME,
            "layout_version": layout.layout_version(dtype),
            "storage_dtype": dtype,
            "model": config.to_json(),
            "tokenizer": tokenizer_spec,
            "tensors": entries,
            "source": source or {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_json_durably(os.path.join(tmp, layout.MANIFEST), manifest)
        replace_dir(tmp, store_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return store_dir


def new_temporary_dir(final: str) -> str:
    """A fresh hidden path beside `final` to build it in (`.<name>.tmp-<pid>-<random>`), after
    removing what interrupted writes of the same name left (unless their process still runs)."""
    parent, base = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temporaries(parent, base)
    return os.path.join(parent, f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def replace_dir(tmp: str, final: str) -> None:
    """Moves the complete directory `tmp` to `final`; an old `final` is renamed away first and
    deleted last, so `final` is at every moment either the old or the new one, never half of each."""
    if os.path.exists(final):
        parent, base = os.path.split(final)
        trash = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex[:8]}")
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)


def write_json_durably(path: str, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _remove_stale_temporaries(parent: str, base: str) -> None:
    for entry in os.listdir(parent):
        if entry.startswith(f".{base}.tmp-") or entry.startswith(f".{base}.old-"):
            pid = entry.split("-")[1] if ".tmp-" in entry else None
            if pid and pid.isdigit() and _pid_alive(int(pid)):
                continue  # another process is converting right now
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def convert(gguf_path: str | os.PathLike, store_path: str | os.PathLike, dtype: str = "float32", *,
            overwrite: bool = False, progress: bool = True) -> str:
    """Converts a GGUF file into a flash store; returns the store path.

    Idempotent: if `store_path` already holds a complete store converted from the same file
    (by sha256) with the same dtype, nothing is done.
    """
    from activeflow_jax.formats.gguf_import import file_sha256, open_gguf

    dtype = canonical_dtype(dtype)
    model = open_gguf(gguf_path)  # validates before anything is written
    sha = file_sha256(gguf_path)
    store_path = os.path.abspath(os.fspath(store_path))
    if os.path.exists(os.path.join(store_path, layout.MANIFEST)):
        from activeflow_jax.store.reader import read_manifest

        try:
            manifest = read_manifest(store_path)
        except StoreError:
            manifest = None
        if manifest and manifest["source"].get("sha256") == sha and manifest["storage_dtype"] == dtype:
            return store_path
    if os.path.exists(store_path) and not overwrite:
        raise StoreError(
            f"{store_path} exists and was not converted from {os.fspath(gguf_path)} as {dtype}; "
            "pass overwrite=True (--overwrite) or choose another path"
        )
    return write_store(
        store_path, model.config, model.tokenizer_spec, model.iter_tensors(), dtype=dtype,
        source={"path": os.path.abspath(os.fspath(gguf_path)), "sha256": sha, "format": "gguf"},
        overwrite=True, progress=progress, total=len(model.tensor_names()),
    )
