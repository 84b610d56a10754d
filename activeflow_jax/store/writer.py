"""Writing flash stores: atomic (temporary directory, rename at the end) and idempotent."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from activeflow_jax.calibrated_rounding import calibrated_tensors, check_rounding
from activeflow_jax.config import ModelConfig
from activeflow_jax.errors import ActiveFlowError, GGUFError, InvalidArgumentError, NonFiniteWeightsError, StoreError
from activeflow_jax.formats.gguf_import import file_sha256, open_gguf
from activeflow_jax.quant import canonical_dtype, is_quantized, quantize_rows
from activeflow_jax.store import layout
from activeflow_jax.store.files import new_temporary_dir, replace_dir, write_error, write_json_durably
from activeflow_jax.store.reader import read_manifest
from activeflow_jax.store.verify import verify_store


def _ts():
    import tensorstore as ts

    return ts


def write_store(store_dir: str | os.PathLike, config: ModelConfig, tokenizer_spec: dict[str, Any],
                tensors: Iterable[tuple[str, np.ndarray]], *, dtype: str = "float32",
                source: dict[str, Any] | None = None, overwrite: bool = False, progress: bool = False,
                total: int | None = None, chunk_rows: int | None = None, rounding: str = "plain") -> str:
    """Writes a complete store at `store_dir`, atomically.

    Tensors go into a hidden temporary directory beside the target; the manifest is written
    last and the directory renamed into place, so an interrupted write never leaves a store
    that loads (a leftover `.<name>.tmp-*` directory is ignored and cleaned up next time).
    """
    dtype = canonical_dtype(dtype)
    store_dir = os.path.abspath(os.fspath(store_dir))
    if os.path.exists(store_dir) and not overwrite:
        raise StoreError(f"{store_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    check_replaceable(store_dir, keep=[source["path"]] if source and source.get("path") else [])
    base = os.path.basename(store_dir)
    try:
        tmp = new_temporary_dir(store_dir)
    except OSError as exc:
        raise write_error(store_dir, exc) from None
    ts = _ts()
    entries: dict[str, Any] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"convert -> {base}", unit="tensor")
    try:
        os.makedirs(os.path.join(tmp, layout.TENSOR_DIR))
        for name, array in tensors:
            shape = tuple(np.shape(array))
            stored_shape, zarr_dtype, tensor_dtype = layout.stored_form(name, shape, dtype)
            if is_quantized(tensor_dtype):  # quantized from the importer's f32, row by row (quant.py)
                array = np.asarray(array, np.float32)
                check_finite(name, array, tensor_dtype)
                array = quantize_rows(array, tensor_dtype)  # contiguous uint8 rows
            else:  # checked as stored: a float16 overflow shows as Inf here
                array = np.ascontiguousarray(array, dtype=np.dtype(zarr_dtype))
                check_finite(name, array, tensor_dtype)
            chunk, shard = layout.chunking(stored_shape, np.dtype(zarr_dtype).itemsize, chunk_rows)
            spec = layout.zarr_spec(layout.tensor_path(tmp, name), stored_shape, zarr_dtype, chunk, shard, create=True)
            try:
                ts.open(spec).result().write(array).result()
            except Exception as exc:  # TensorStore reports a failed file write as ValueError
                raise write_error(store_dir, exc) from None
            entries[name] = {"shape": list(shape), "chunk_rows": chunk, "shard_rows": shard}
            if is_quantized(dtype):
                entries[name].update(dtype=tensor_dtype, stored_shape=list(stored_shape))
            if bar is not None:
                bar.update(1)
        manifest = {
            "format": layout.FORMAT_NAME,
            "layout_version": layout.layout_version(dtype),
            "storage_dtype": dtype,
            "rounding": rounding,  # how quantized rows were rounded (calibrated_rounding.py); convert/fetch compare it
            "model": config.to_json(),
            "tokenizer": tokenizer_spec,
            "tensors": entries,
            "source": source or {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_json_durably(os.path.join(tmp, layout.MANIFEST), manifest)
        replace_dir(tmp, store_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(store_dir, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return store_dir


def check_finite(name: str, array: np.ndarray, dtype: str) -> None:
    """Refuses a tensor holding NaN or Inf: such a store generates nothing and scores `nan`."""
    if np.isfinite(array).all():
        return
    bad = np.size(array) - int(np.count_nonzero(np.isfinite(array)))
    raise NonFiniteWeightsError(
        f"tensor '{name}' holds {bad} non-finite value(s) (NaN or Inf) as {dtype}; the source file is damaged "
        + ("or its values overflow float16 (convert with --dtype float32)" if dtype == "float16" else
           "(download it again, or re-export the model)") + "; nothing was written")


def is_store(path: str) -> bool:
    """Whether `path` is one of our stores (of any layout version), recognised by its manifest; one
    whose manifest is damaged counts when it holds nothing but a store's own entries."""
    try:
        with open(os.path.join(path, layout.MANIFEST)) as f:
            manifest = json.load(f)
        return isinstance(manifest, dict) and manifest.get("format") == layout.FORMAT_NAME
    except (OSError, ValueError):
        pass
    try:
        entries = set(os.listdir(path))
    except OSError:
        return False
    own = {layout.MANIFEST, layout.TENSOR_DIR, layout.CALIBRATION, "bundles"}
    return layout.MANIFEST in entries and layout.TENSOR_DIR in entries and entries <= own


def check_replaceable(store_dir: str, keep: Iterable[str] = ()) -> None:
    """Refuses to replace `store_dir` unless it is absent, an empty folder or one of our stores,
    and never when it is or holds one of `keep` (e.g. the GGUF being converted): overwriting may
    replace a store, never anything else."""
    if not os.path.lexists(store_dir):
        return
    real = os.path.realpath(store_dir)
    for path in keep:
        inner = os.path.realpath(os.fspath(path))
        if inner == real or inner.startswith(real.rstrip(os.sep) + os.sep):
            raise InvalidArgumentError(f"{store_dir} holds {path}, the file being converted; choose another "
                                       "output folder (it would be deleted)")
    if not os.path.isdir(store_dir) or os.path.islink(store_dir):
        raise InvalidArgumentError(f"{store_dir} exists and is not a folder; choose another output path "
                                   "(--overwrite replaces only an activeflow store)")
    if os.listdir(store_dir) and not is_store(store_dir):
        raise InvalidArgumentError(
            f"{store_dir} is not an activeflow store (no {layout.MANIFEST} of one), so --overwrite will not delete "
            "it; choose another output folder, or remove it yourself if you mean to")


def convert(gguf_path: str | os.PathLike, store_path: str | os.PathLike, dtype: str = "float32", *,
            overwrite: bool = False, progress: bool = True, rounding: str | None = None) -> str:
    """Converts a GGUF file into a flash store; returns the store path.

    rounding (q4 stores): "calibrated" (the default for q4) rounds each linear op's rows with their
    error carried by the op's input statistics on the shipped calibration text
    (activeflow_jax/calibrated_rounding.py: a few minutes, the whole model in memory as f32);
    "plain" rounds each row on its own (seconds, streamed). Other dtypes round plainly.

    Idempotent: if `store_path` already holds a complete store converted from the same file
    (by sha256) with the same dtype and rounding, and every chunk passes its checksum
    (store/verify.py), nothing is done; a damaged one is converted again.
    """
    dtype = canonical_dtype(dtype)
    rounding = default_rounding(dtype) if rounding is None else check_rounding(rounding)
    if rounding == "calibrated" and dtype != "q4":
        raise InvalidArgumentError(f"calibrated rounding is for q4 stores; a {dtype} store rounds plainly "
                                   "(leave rounding unset)")
    try:
        model = open_gguf(gguf_path)  # validates before anything is written
    except ActiveFlowError:
        raise
    except Exception as exc:  # a damaged field that the gguf package decodes lazily (bench/fuzz.py)
        raise _damaged_gguf(gguf_path, exc) from None
    sha = file_sha256(gguf_path)
    store_path = os.path.abspath(os.fspath(store_path))
    if os.path.exists(os.path.join(store_path, layout.MANIFEST)):
        try:
            manifest = read_manifest(store_path)
        except StoreError:
            manifest = None
        if (manifest and manifest["source"].get("sha256") == sha and manifest["storage_dtype"] == dtype
                and manifest.get("rounding", "plain") == rounding):
            report = verify_store(store_path, layouts=False)  # up to date only if every chunk is intact
            if report.ok:
                return store_path
            import sys

            print(f"{store_path} was converted from this file but is damaged ({report.problems[0]}"
                  f"{f' and {len(report.problems) - 1} more' if len(report.problems) > 1 else ''}); converting "
                  "it again", file=sys.stderr)
            overwrite = True  # our own store, damaged: replacing it is the repair
    if os.path.exists(store_path) and not overwrite:
        raise StoreError(
            f"{store_path} exists and was not converted from {os.fspath(gguf_path)} as {dtype}; "
            "pass overwrite=True (--overwrite) or choose another path"
        )
    tensors = _guarded(model.iter_tensors(), gguf_path)
    if rounding == "calibrated":  # needs every tensor at once: the model runs on the calibration text
        tensors = calibrated_tensors(model.config, model.tokenizer_spec, dict(tensors), dtype, progress).items()
    return write_store(
        store_path, model.config, model.tokenizer_spec, tensors, dtype=dtype,
        source={"path": os.path.abspath(os.fspath(gguf_path)), "sha256": sha, "format": "gguf"},
        overwrite=True, progress=progress, total=len(model.tensor_names()), rounding=rounding,
    )


def default_rounding(dtype: str) -> str:
    """How a store of `dtype` is rounded unless the caller says: calibrated for q4 (module doc of
    calibrated_rounding.py), plain for the rest."""
    return "calibrated" if dtype == "q4" else "plain"


def _damaged_gguf(path, exc: Exception) -> GGUFError:
    return GGUFError(f"{os.fspath(path)} could not be read as GGUF ({type(exc).__name__}: {str(exc)[:200]}); the file "
                     "is probably truncated or damaged: download it again")


def _guarded(tensors: Iterable[tuple[str, np.ndarray]], path) -> Iterable[tuple[str, np.ndarray]]:
    """The GGUF's tensors, with a failure to decode one said as a damaged file (not a traceback)."""
    iterator = iter(tensors)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except ActiveFlowError:
            raise
        except Exception as exc:
            raise _damaged_gguf(path, exc) from None
        yield item
