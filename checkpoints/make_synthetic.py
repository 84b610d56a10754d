"""A synthetic Llama-shaped model with random weights, written straight into a flash store.

For memory and I/O scaling only (its text is noise): it lets the swapping runtime be measured on a
model far larger than the default one. The store has no tokenizer; drive it with token ids
(`engine.generate_ids`, `engine.logits`).

    python checkpoints/make_synthetic.py                       # 4gb preset -> ~/.cache/activeflow/stores/synthetic-4gb
    python checkpoints/make_synthetic.py --preset tiny --out /tmp/syn --overwrite
    python checkpoints/make_synthetic.py --preset tiny --num_layers 22 --out /tmp/syn22
    python checkpoints/make_synthetic.py --gguf    # also <out>.gguf for llama.cpp; the store converted from it

Presets: `4gb` is TinyLlama-1.1B-shaped (22 layers, d 2048, ff 5632, 32 heads, 4 KV heads of 64,
vocab 32000, untied head): 1.1 B parameters, 4.4 GB in f32. `tiny` is a few MB, for tests. Shape
flags (--num_layers, --d_model, ...) override the preset.

Tensors are generated and written one at a time (a generator handed to `write_store`), so peak
memory is a small multiple of the largest tensor (the 262 MB embedding / head), not the model.
Weights are scaled like a real init (normal * in_dim**-0.5 for every [in, out] matrix, norms 1,
embedding normal * 0.02), so activations stay finite through all layers.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PRESETS: dict[str, dict[str, Any]] = {
    "4gb": dict(num_layers=22, d_model=2048, d_ff=5632, num_heads=32, num_kv_heads=4, head_dim=64, vocab_size=32000,
                max_context=2048, tie_embeddings=False),
    "tiny": dict(num_layers=4, d_model=128, d_ff=384, num_heads=4, num_kv_heads=2, head_dim=32, vocab_size=512,
                 max_context=2048, tie_embeddings=False),
}
SHAPE_FIELDS = tuple(PRESETS["4gb"])
EMBED_SCALE = 0.02
PIECE_BYTES = 64 << 20  # random numbers are drawn in pieces of this size, straight into the tensor


def synthetic_config(preset: str = "tiny", **overrides: Any):
    """The ModelConfig of a preset with shape overrides (None values are ignored)."""
    from activeflow_jax.config import ModelConfig
    from activeflow_jax.errors import InvalidArgumentError

    if preset not in PRESETS:
        raise InvalidArgumentError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(overrides) - set(SHAPE_FIELDS))
    if unknown:
        raise InvalidArgumentError(f"unknown shape overrides {unknown}; choose among {list(SHAPE_FIELDS)}")
    shape = {**PRESETS[preset], **overrides}
    for key, value in shape.items():
        if key != "tie_embeddings" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidArgumentError(f"{key} must be a positive integer, got {value!r}")
    try:
        return ModelConfig(arch="llama", rope_theta=10000.0, norm_eps=1e-5, name=f"synthetic-llama-{preset}",
                           **{**shape, "tie_embeddings": bool(shape["tie_embeddings"])})
    except ValueError as exc:  # e.g. num_heads not a multiple of num_kv_heads
        raise InvalidArgumentError(f"invalid synthetic shape: {exc}") from None


def _tensors(cfg, seed: int):
    """(name, array) pairs in `param_shapes` order, one freshly generated tensor at a time."""
    from activeflow_jax.models.llama import param_shapes

    rng = np.random.default_rng(seed)
    for name, shape in param_shapes(cfg).items():
        if len(shape) == 1:  # RMSNorm weights
            yield name, np.ones(shape, np.float32)
            continue
        scale = EMBED_SCALE if name == "embed" else shape[0] ** -0.5  # [in, out]: keeps activations O(1)
        array = np.empty(shape, np.float32)
        step = max(1, PIECE_BYTES // (4 * int(np.prod(shape[1:]))))
        for start in range(0, shape[0], step):  # in place: the generator never holds a second copy
            piece = array[start:start + step]
            rng.standard_normal(piece.shape, dtype=np.float32, out=piece)
            piece *= np.float32(scale)
        yield name, array
        del array  # let the written tensor go before the next one is allocated


def make_synthetic_store(out: str | os.PathLike, preset: str = "tiny", seed: int = 0, overwrite: bool = False, *,
                         dtype: str = "float32", progress: bool = False, **shape_overrides: Any) -> str:
    """Writes a random-weight store at `out` (atomically) and returns its absolute path.

    `shape_overrides` (num_layers, d_model, d_ff, num_heads, num_kv_heads, head_dim, vocab_size,
    max_context, tie_embeddings) replace the preset's values. An existing `out` is refused with a
    StoreError unless `overwrite`. Same preset, overrides and seed give the same weights.
    """
    from activeflow_jax.errors import InvalidArgumentError, StoreError
    from activeflow_jax.store import layout

    out = os.path.abspath(os.path.expanduser(os.fspath(out)))
    if os.path.exists(out) and not overwrite:  # fail before anything is generated
        raise StoreError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    if dtype not in layout.STORAGE_DTYPES:
        raise InvalidArgumentError(f"storage dtype '{dtype}' is not supported; choose one of {layout.STORAGE_DTYPES}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InvalidArgumentError(f"seed must be an integer >= 0, got {seed!r}")
    cfg = synthetic_config(preset, **shape_overrides)

    from activeflow_jax.models.llama import param_shapes
    from activeflow_jax.store.writer import write_store

    source = {"synthetic": True, "seed": int(seed), "preset": preset,
              "overrides": {k: v for k, v in shape_overrides.items() if v is not None},
              "init": f"normal * in_dim**-0.5; norms 1; embed normal * {EMBED_SCALE}"}
    return write_store(out, cfg, {}, _tensors(cfg, int(seed)), dtype=dtype, source=source, overwrite=overwrite,
                       progress=progress, total=len(param_shapes(cfg)))


def _gguf_tensors(cfg, seed: int):
    """The weights of `_tensors(cfg, seed)` in GGUF's names and layout ([out, in], q/k rows permuted
    for llama.cpp's RoPE, q|k|v and gate|up split): (name, float32 array) one at a time."""
    from activeflow_jax.testing import permute_for_gguf

    for name, array in _tensors(cfg, seed):
        if name == "embed":
            yield "token_embd.weight", array
        elif name == "final_norm.weight":
            yield "output_norm.weight", array
        elif name == "lm_head":
            yield "output.weight", np.ascontiguousarray(array.T)
        else:
            _, layer, *rest = name.split(".")
            block, leaf = f"blk.{layer}.", ".".join(rest)
            if leaf == "attn_norm.weight":
                yield block + "attn_norm.weight", array
            elif leaf == "mlp_norm.weight":
                yield block + "ffn_norm.weight", array
            elif leaf == "attn.wqkv":
                wq, wk, wv = np.split(array.T, [cfg.q_dim, cfg.q_dim + cfg.kv_dim], axis=0)
                yield block + "attn_q.weight", np.ascontiguousarray(permute_for_gguf(wq, cfg.num_heads))
                yield block + "attn_k.weight", np.ascontiguousarray(permute_for_gguf(wk, cfg.num_kv_heads))
                yield block + "attn_v.weight", np.ascontiguousarray(wv)
            elif leaf == "attn.wo":
                yield block + "attn_output.weight", np.ascontiguousarray(array.T)
            elif leaf == "mlp.w_gate_up":
                gate, up = np.split(array.T, 2, axis=0)
                yield block + "ffn_gate.weight", np.ascontiguousarray(gate)
                yield block + "ffn_up.weight", np.ascontiguousarray(up)
            elif leaf == "mlp.w_down":
                yield block + "ffn_down.weight", np.ascontiguousarray(array.T)
            else:
                raise AssertionError(f"no GGUF name for {name}")


def write_synthetic_gguf(path: str | os.PathLike, preset: str = "tiny", seed: int = 0, **shape_overrides: Any) -> str:
    """The synthetic model as an F32 Llama GGUF with a byte-level BPE vocabulary, written one tensor
    at a time (so llama.cpp can run the same weights: `convert` of this file gives the store).
    Memory: one tensor plus its transposed copy."""
    import gguf

    from activeflow_jax.testing import add_byte_bpe_vocab, add_hparams

    cfg = synthetic_config(preset, **shape_overrides)
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    writer = gguf.GGUFWriter(path + ".tmp", "llama")
    writer.add_name(cfg.name)
    add_hparams(writer, cfg, "llama")
    add_byte_bpe_vocab(writer, cfg.vocab_size, chat=False)
    # shapes first (the header lists every tensor before any data), from a pass that keeps none
    for name, shape in _gguf_shapes(cfg):
        writer.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, array in _gguf_tensors(cfg, seed):
        writer.write_tensor_data(array)
    writer.close()
    os.replace(path + ".tmp", path)
    return path


def _gguf_shapes(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF name, shape) in the order `_gguf_tensors` yields them (param_shapes order)."""
    from activeflow_jax.models.llama import param_shapes

    parts = {"attn_norm.weight": [("attn_norm.weight", (cfg.d_model,))],
             "mlp_norm.weight": [("ffn_norm.weight", (cfg.d_model,))],
             "attn.wqkv": [("attn_q.weight", (cfg.q_dim, cfg.d_model)), ("attn_k.weight", (cfg.kv_dim, cfg.d_model)),
                           ("attn_v.weight", (cfg.kv_dim, cfg.d_model))],
             "attn.wo": [("attn_output.weight", (cfg.d_model, cfg.q_dim))],
             "mlp.w_gate_up": [("ffn_gate.weight", (cfg.d_ff, cfg.d_model)), ("ffn_up.weight", (cfg.d_ff, cfg.d_model))],
             "mlp.w_down": [("ffn_down.weight", (cfg.d_model, cfg.d_ff))]}
    out = []
    for name, shape in param_shapes(cfg).items():
        if name == "embed":
            out.append(("token_embd.weight", tuple(shape)))
        elif name == "final_norm.weight":
            out.append(("output_norm.weight", tuple(shape)))
        elif name == "lm_head":
            out.append(("output.weight", tuple(shape[::-1])))
        else:
            _, layer, *rest = name.split(".")
            out += [(f"blk.{layer}.{n}", s) for n, s in parts[".".join(rest)]]
    return out


def _du_bytes(path: str) -> int:
    """Bytes allocated on disk (what `du` counts)."""
    return sum(os.stat(os.path.join(d, n)).st_blocks * 512 for d, _, names in os.walk(path) for n in names)


def main(argv):
    del argv
    from absl import flags

    from activeflow_jax.errors import ActiveFlowError
    from activeflow_jax.paths import activeflow_home

    f = flags.FLAGS
    out = f.out or os.path.join(activeflow_home(), "stores", f"synthetic-{f.preset}")
    overrides = {name: getattr(f, name) for name in SHAPE_FIELDS}
    t0 = time.perf_counter()
    try:
        if f.gguf:  # the GGUF first, then the store converted from it: the same weights for both engines
            if os.path.exists(out) and not f.overwrite:
                raise ActiveFlowError(f"{out} already exists; pass --overwrite to replace it")
            gguf_path = write_synthetic_gguf(out + ".gguf", f.preset, f.seed, **overrides)
            print(f"{gguf_path}: {os.path.getsize(gguf_path) / 2**30:.2f} GiB (F32 GGUF, for llama.cpp)")
            from activeflow_jax.store.writer import convert

            path = convert(gguf_path, out, f.dtype, overwrite=f.overwrite)
        else:
            path = make_synthetic_store(out, f.preset, f.seed, f.overwrite, dtype=f.dtype, progress=True,
                                        **overrides)
    except ActiveFlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    from activeflow_jax.config import ModelConfig
    from activeflow_jax.store.reader import read_manifest

    cfg = ModelConfig.from_json(read_manifest(path)["model"])
    size = _du_bytes(path)
    size_text = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
    print(f"{path}\n  {cfg.name}: {cfg.num_params() / 1e6:.1f} M params, {f.dtype}, {size_text} on disk; "
          f"written in {seconds:.1f} s; peak RSS {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("out", None, "store path (default: $ACTIVEFLOW_HOME/stores/synthetic-<preset>, "
                                     "i.e. ~/.cache/activeflow/stores/synthetic-4gb)")
    flags.DEFINE_enum("preset", "4gb", sorted(PRESETS), "model shape")
    flags.DEFINE_integer("seed", 0, "random seed")
    flags.DEFINE_bool("overwrite", False, "replace an existing store")
    flags.DEFINE_bool("gguf", False, "also write the model as an F32 GGUF at <out>.gguf (for llama.cpp, e.g. "
                      "bench/peer.py) and convert the store from it, so both hold the same weights")
    flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "storage dtype")
    for _name in SHAPE_FIELDS:
        if _name == "tie_embeddings":
            flags.DEFINE_bool(_name, None, "override the preset's tie_embeddings (lm_head shares the embedding)")
        else:
            flags.DEFINE_integer(_name, None, f"override the preset's {_name}")
    app.run(main)
