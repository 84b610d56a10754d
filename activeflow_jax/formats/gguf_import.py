"""GGUF import: metadata -> `ModelConfig` (through the family spec of the file's architecture,
models/families.py), tensors -> our [in, out] float32 layout.

For the "llama" architecture, llama.cpp's converter stores attn_q / attn_k with their rows
permuted for llama.cpp's interleaved-pair RoPE (the other families use rotate-half, "NEOX", and
are stored unpermuted). We undo that permutation here, once, so that the rest of the engine uses
the Hugging Face layout with rotate-half RoPE everywhere. (Using one layout with the other RoPE
gives fluent-looking text at ~10x the perplexity; tests/test_real_model.py guards against it.)

Every tensor type that the `gguf` package dequantizes imports (F32, F16, BF16, Q4_0/Q4_1/Q5_0/
Q5_1/Q8_0, the K-quants Q2_K..Q6_K, the IQ and TQ types): see `supported_tensor_types` (formats/gguf_check.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from activeflow_jax.config import ModelConfig
from activeflow_jax.errors import GGUFError, UnsupportedModelError
from activeflow_jax.formats.gguf_check import check_gguf_structure, supported_tensor_types
from activeflow_jax.formats.tokenizer import tokenizer_spec_from_gguf
from activeflow_jax.models.families import SUPPORTED_ARCHS, config_from_gguf, family, tensor_map


def _gguf():
    import gguf  # imported lazily: the package is only needed for conversion

    return gguf


@dataclasses.dataclass(frozen=True)
class GGUFModel:
    """An opened GGUF checkpoint: config, tokenizer spec and a way to read its tensors."""

    path: str
    config: ModelConfig
    tokenizer_spec: dict[str, Any]
    reader: Any  # gguf.GGUFReader

    def tensor_names(self) -> list[str]:
        return [name for name, _ in _tensor_map(self.config)]

    def iter_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yields (our parameter name, float32 array in our [in, out] layout), one at a time.
        Ops that share an input are fused column-wise (q|k|v, gate|up) as the model expects."""
        by_name = {t.name: t for t in self.reader.tensors}
        cfg = self.config
        permuted = family(cfg.arch).gguf_qk_permuted
        for ours, sources in _tensor_map(cfg):
            parts = []
            for theirs in sources:
                if theirs not in by_name:
                    raise GGUFError(f"{self.path}: tensor '{theirs}' is missing; the file is incomplete")
                arr = _dequantize(by_name[theirs], self.path)
                if permuted and theirs.endswith(("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")):
                    heads = cfg.num_heads if ".attn_q." in theirs else cfg.num_kv_heads
                    arr = _unpermute_rope_rows(arr, heads)
                if arr.ndim == 2 and ours != "embed":
                    arr = arr.T  # GGUF linear weights are [out, in]; we store rows = input channels
                parts.append(arr)
            arr = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
            yield ours, np.ascontiguousarray(arr, dtype=np.float32)


def _tensor_map(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...]]]:
    """(our parameter name, the GGUF tensors it is made of): the family's (models/families.py)."""
    return tensor_map(cfg)


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's convert permute: interleaved-pair rows -> rotate-half rows."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(tensor: Any, path: str) -> np.ndarray:
    gguf = _gguf()
    qtype = tensor.tensor_type
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF ne order is reversed
    try:
        if qtype == gguf.GGMLQuantizationType.F32:
            arr = np.asarray(tensor.data, dtype=np.float32)
        elif qtype == gguf.GGMLQuantizationType.F16:
            arr = np.asarray(tensor.data, dtype=np.float16).astype(np.float32)
        else:
            arr = gguf.quants.dequantize(tensor.data, qtype)
    except (NotImplementedError, KeyError, ValueError):
        raise UnsupportedModelError(
            f"{path}: tensor '{tensor.name}' has type {qtype.name}, which cannot be dequantized; "
            f"supported types: {', '.join(supported_tensor_types())}. Re-quantize the model "
            "(e.g. llama-quantize ... Q8_0) or export it as F16."
        ) from None
    if arr.size != int(np.prod(shape)):
        raise GGUFError(f"{path}: tensor '{tensor.name}' holds {arr.size} values, expected shape {shape}")
    return arr.reshape(shape).astype(np.float32, copy=False)


def _field(reader: Any, key: str, default: Any = None, *, required: bool = False) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise GGUFError(f"GGUF metadata key '{key}' is missing")
        return default
    return field.contents()


def _tensor_type_name(tensor: Any) -> str:
    qtype = tensor.tensor_type
    return getattr(qtype, "name", f"unknown type {int(qtype)}")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def open_gguf(path: str | os.PathLike) -> GGUFModel:
    """Opens and validates a GGUF file; raises GGUFError / UnsupportedModelError with advice."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GGUFError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    gguf = _gguf()
    check_gguf_structure(path)  # counts and lengths checked against the file before the gguf package trusts them
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the gguf package raises ValueError/IndexError/OSError on damage
        if "GGMLQuantizationType" in str(exc):  # a tensor type newer than this gguf package
            raise UnsupportedModelError(
                f"{path} holds a tensor of a type this gguf package does not know ({exc}); supported types: "
                f"{', '.join(supported_tensor_types())}. Upgrade the gguf package, or re-quantize the model "
                "(e.g. llama-quantize ... Q8_0)") from None
        raise GGUFError(
            f"{path} could not be parsed as GGUF ({type(exc).__name__}: {exc}); the file is probably "
            "truncated or damaged: download it again"
        ) from None
    arch = _field(reader, "general.architecture", required=True)
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(
            f"{path}: architecture '{arch}' is not supported; supported: {', '.join(SUPPORTED_ARCHS)}"
        )
    spec = family(arch)
    names = {t.name for t in reader.tensors}
    supported = supported_tensor_types()
    for tensor in reader.tensors:
        if _tensor_type_name(tensor) not in supported:
            raise UnsupportedModelError(
                f"{path}: tensor '{tensor.name}' has type {_tensor_type_name(tensor)}, which cannot be dequantized; "
                f"supported types: {', '.join(supported)}. Re-quantize the model (e.g. llama-quantize ... Q8_0) "
                "or export it as F16."
            )
    rope_freqs: tuple[float, ...] = ()
    if "rope_freqs.weight" in names:  # Llama 3.x: per-frequency divisors written by the converter
        tensor = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        rope_freqs = tuple(float(f) for f in _dequantize(tensor, path).reshape(-1))
    try:
        config = spec_config(spec, reader, names, name=str(_field(reader, "general.name", os.path.basename(path))),
                             rope_freqs=rope_freqs)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"{path}: {exc}") from None
    except ValueError as exc:  # the config's own consistency checks (head counts, sizes)
        raise GGUFError(f"{path}: inconsistent {arch} metadata: {exc}") from None
    return GGUFModel(path=path, config=config, tokenizer_spec=tokenizer_spec_from_gguf(reader, spec.tokenizers),
                     reader=reader)


def spec_config(spec, reader: Any, names: set[str], *, name: str, rope_freqs: tuple[float, ...] = ()) -> ModelConfig:
    def field(key: str, default: Any = None, *, required: bool = False) -> Any:
        return _field(reader, key, default, required=required)

    return config_from_gguf(spec, field, names, name=name, rope_freqs=rope_freqs)
