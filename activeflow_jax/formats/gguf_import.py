"""GGUF import: Llama-family metadata -> `ModelConfig`, tensors -> our [in, out] float32 layout.

GGUF (as written by llama.cpp's converter) stores attn_q / attn_k with their rows permuted for
llama.cpp's interleaved-pair RoPE. We undo that permutation here, once, so that the rest of the
engine uses the Hugging Face layout with rotate-half RoPE. (Using one layout with the other RoPE
gives fluent-looking text at ~10x the perplexity; tests/test_real_model.py guards against it.)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from activeflow_jax.config import ModelConfig
from activeflow_jax.errors import GGUFError, UnsupportedModelError

SUPPORTED_ARCHS = ("llama",)


def _gguf():
    import gguf  # imported lazily: the package is only needed for conversion

    return gguf


@functools.lru_cache(maxsize=1)
def supported_tensor_types() -> tuple[str, ...]:
    """Names of GGML tensor types we can dequantize (whatever the gguf package implements)."""
    gguf = _gguf()
    names = ["F32", "F16", "BF16"]
    for qtype in gguf.GGMLQuantizationType:
        if qtype.name in names:
            continue
        try:
            gguf.quants.dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
        except Exception:
            continue
        names.append(qtype.name)
    return tuple(names)


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
        for ours, sources in _tensor_map(cfg):
            parts = []
            for theirs in sources:
                if theirs not in by_name:
                    raise GGUFError(f"{self.path}: tensor '{theirs}' is missing; the file is incomplete")
                arr = _dequantize(by_name[theirs], self.path)
                if theirs.endswith(("attn_q.weight", "attn_k.weight")):
                    heads = cfg.num_heads if theirs.endswith("attn_q.weight") else cfg.num_kv_heads
                    arr = _unpermute_rope_rows(arr, heads)
                if arr.ndim == 2 and ours != "embed":
                    arr = arr.T  # GGUF linear weights are [out, in]; we store rows = input channels
                parts.append(arr)
            arr = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
            yield ours, np.ascontiguousarray(arr, dtype=np.float32)


def _tensor_map(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...]]]:
    """(our parameter name, the GGUF tensors it is made of); names as models.llama.param_shapes."""
    pairs = [("embed", ("token_embd.weight",))]
    for i in range(cfg.num_layers):
        ours, b = f"layers.{i}.", f"blk.{i}."
        pairs += [
            (ours + "attn_norm.weight", (b + "attn_norm.weight",)),
            (ours + "attn.wqkv", (b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight")),
            (ours + "attn.wo", (b + "attn_output.weight",)),
            (ours + "mlp_norm.weight", (b + "ffn_norm.weight",)),
            (ours + "mlp.w_gate_up", (b + "ffn_gate.weight", b + "ffn_up.weight")),
            (ours + "mlp.w_down", (b + "ffn_down.weight",)),
        ]
    pairs.append(("final_norm.weight", ("output_norm.weight",)))
    if not cfg.tie_embeddings:
        pairs.append(("lm_head", ("output.weight",)))
    return pairs


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
    except NotImplementedError:
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


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def open_gguf(path: str | os.PathLike) -> GGUFModel:
    """Opens and validates a GGUF file; raises GGUFError / UnsupportedModelError with advice."""
    from activeflow_jax.formats.tokenizer import tokenizer_spec_from_gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GGUFError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    gguf = _gguf()
    from activeflow_jax.formats.gguf_check import check_gguf_structure

    check_gguf_structure(path)  # counts and lengths checked against the file before the gguf package trusts them
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the gguf package raises ValueError/IndexError/OSError on damage
        raise GGUFError(
            f"{path} could not be parsed as GGUF ({type(exc).__name__}: {exc}); the file is probably "
            "truncated or damaged: download it again"
        ) from None
    arch = _field(reader, "general.architecture", required=True)
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(
            f"{path}: architecture '{arch}' is not supported; supported: {', '.join(SUPPORTED_ARCHS)}"
        )
    p = arch + "."
    d_model = int(_field(reader, p + "embedding_length", required=True))
    num_heads = int(_field(reader, p + "attention.head_count", required=True))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    head_dim = int(_field(reader, p + "attention.key_length", d_model // num_heads))
    config = ModelConfig(
        arch=arch,
        num_layers=int(_field(reader, p + "block_count", required=True)),
        d_model=d_model,
        d_ff=int(_field(reader, p + "feed_forward_length", required=True)),
        num_heads=num_heads,
        num_kv_heads=int(_field(reader, p + "attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        vocab_size=int(_field(reader, p + "vocab_size", len(tokens) if tokens else 0)),
        rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
        norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        max_context=int(_field(reader, p + "context_length", 2048)),
        tie_embeddings="output.weight" not in names,
        name=str(_field(reader, "general.name", os.path.basename(path))),
    )
    supported = supported_tensor_types()
    for tensor in reader.tensors:
        if tensor.tensor_type.name not in supported:
            raise UnsupportedModelError(
                f"{path}: tensor '{tensor.name}' has type {tensor.tensor_type.name}, which cannot be dequantized; "
                f"supported types: {', '.join(supported)}. Re-quantize the model (e.g. llama-quantize ... Q8_0) "
                "or export it as F16."
            )
    rope_dims = _field(reader, p + "rope.dimension_count", head_dim)
    if int(rope_dims) != head_dim:
        raise UnsupportedModelError(f"{path}: partial RoPE ({rope_dims} of {head_dim} dims) is not supported")
    if _field(reader, p + "rope.scaling.type") not in (None, "none"):
        raise UnsupportedModelError(f"{path}: RoPE scaling is not supported yet")
    if _field(reader, p + "expert_count", 0):
        raise UnsupportedModelError(f"{path}: mixture-of-experts Llama models are not supported yet")
    return GGUFModel(path=path, config=config, tokenizer_spec=tokenizer_spec_from_gguf(reader), reader=reader)
