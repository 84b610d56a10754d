"""Tiny random models for tests, demos and notebooks (no download needed).

`write_tiny_gguf` writes a real GGUF file the way llama.cpp's converter would (q/k rows
permuted for interleaved RoPE, byte-level BPE tokenizer in the metadata, optional
quantization), so the whole import path is exercised on a model that compiles in seconds.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from activeflow_jax.config import ModelConfig, tiny_config

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny test model<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tiny_vocab(vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level BPE vocabulary of exactly vocab_size."""
    tokens = list(SPECIAL_TOKENS) + _byte_level_alphabet()
    types = [3] * len(SPECIAL_TOKENS) + [1] * 256
    merges: list[str] = []
    candidates = ["Ġ t", "h e", "i n", "Ġ a", "e r", "o n", "Ġt he", "r e", "a t", "e n", "Ġ s", "Ġ o", "o r",
                  "Ġ w", "e s", "Ġ c", "i s", "a n", "i t", "Ġ b", "Ġ f", "Ġ p", "a l", "a r", "Ġ m", "e d",
                  "Ġ d", "l e", "o u", "i c", "Ġ h", "Ġ i", "Ġ in", "Ġ l", "n d", "Ġ the", "Ġ n", "a s", "o m"]
    for merge in candidates:
        if len(tokens) >= vocab_size:
            break
        left, right = merge.split(" ")
        if left in tokens and right in tokens and left + right not in tokens:
            merges.append(merge)
            tokens.append(left + right)
            types.append(1)
    while len(tokens) < vocab_size:
        tokens.append(f"<|unused{len(tokens)}|>")
        types.append(5)  # unused
    return tokens[:vocab_size], types[:vocab_size], merges


def permute_for_gguf(w_out_in: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert's permute: rotate-half rows -> interleaved-pair rows."""
    out = w_out_in.shape[0]
    return w_out_in.reshape(n_heads, 2, out // n_heads // 2, *w_out_in.shape[1:]).swapaxes(1, 2).reshape(w_out_in.shape)


def write_tiny_gguf(path: str | os.PathLike, cfg: ModelConfig | None = None, *, qtype: str = "F32", seed: int = 0,
                    arch: str = "llama", truncate_to: int | None = None) -> dict[str, np.ndarray]:
    """Writes a random Llama GGUF; returns the float32 params in our layout (pre-quantization)."""
    import gguf

    from activeflow_jax.models.llama import flatten_params, init_params

    cfg = cfg or tiny_config()
    if cfg.vocab_size < 259:
        raise ValueError("the tiny byte-level tokenizer needs vocab_size >= 259")
    flat = {k: np.asarray(v, np.float32) for k, v in flatten_params(init_params(cfg, seed)).items()}
    quant = gguf.GGMLQuantizationType[qtype]
    writer = gguf.GGUFWriter(os.fspath(path), arch)
    writer.add_name(f"tiny-{arch}-{qtype}")
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.max_context)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    tokens, types, merges = tiny_vocab(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)

    def add(name: str, arr: np.ndarray, quantize: bool) -> None:
        arr = np.ascontiguousarray(arr, np.float32)
        if quantize and quant != gguf.GGMLQuantizationType.F32:
            if quant == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(name, arr.astype(np.float16))
            else:
                writer.add_tensor(name, gguf.quants.quantize(arr, quant), raw_dtype=quant)
        else:
            writer.add_tensor(name, arr)

    add("token_embd.weight", flat["embed"], True)
    for i in range(cfg.num_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        wqkv = flat[p + "attn.wqkv"].T  # [out, in], HF layout
        wq, wk, wv = np.split(wqkv, [cfg.q_dim, cfg.q_dim + cfg.kv_dim], axis=0)
        gate, up = np.split(flat[p + "mlp.w_gate_up"].T, 2, axis=0)
        add(b + "attn_norm.weight", flat[p + "attn_norm.weight"], False)
        add(b + "attn_q.weight", permute_for_gguf(wq, cfg.num_heads), True)
        add(b + "attn_k.weight", permute_for_gguf(wk, cfg.num_kv_heads), True)
        add(b + "attn_v.weight", wv, True)
        add(b + "attn_output.weight", flat[p + "attn.wo"].T, True)
        add(b + "ffn_norm.weight", flat[p + "mlp_norm.weight"], False)
        add(b + "ffn_gate.weight", gate, True)
        add(b + "ffn_up.weight", up, True)
        add(b + "ffn_down.weight", flat[p + "mlp.w_down"].T, True)
    add("output_norm.weight", flat["final_norm.weight"], False)
    if not cfg.tie_embeddings:
        add("output.weight", flat["lm_head"].T, True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if truncate_to is not None:
        with open(path, "r+b") as f:
            f.truncate(truncate_to)
    return flat


@dataclasses.dataclass(frozen=True)
class TinyModel:
    gguf_path: str
    store_path: str
    params: dict[str, np.ndarray]


def make_tiny_store(directory: str | os.PathLike, cfg: ModelConfig | None = None, *, qtype: str = "F32",
                    dtype: str = "float32", seed: int = 0) -> TinyModel:
    """A tiny GGUF and its converted store under `directory`."""
    from activeflow_jax.store.writer import convert

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    gguf_path = os.path.join(directory, f"tiny-{qtype}.gguf")
    params = write_tiny_gguf(gguf_path, cfg, qtype=qtype, seed=seed)
    store = convert(gguf_path, os.path.join(directory, f"tiny-{qtype}-{dtype}"), dtype=dtype, progress=False)
    return TinyModel(gguf_path=gguf_path, store_path=store, params=params)


# English prose for calibrating tiny test models (never evaluation text).
CALIBRATION_PROSE = ("The river runs past the old mill and under the stone bridge, where children fish in summer "
                     "and the baker sells bread to travellers. In 1874 a flood carried the wooden bridge away; "
                     "the town rebuilt it in stone within two years. ") * 12


def make_calibrated_tiny(directory: str | os.PathLike, levels=(0.3, 0.5, 0.7)):
    """A tiny store under `directory` with thresholds calibrated at `levels` on CALIBRATION_PROSE
    (written beside it): (TinyModel, its all-in-DRAM engine, the Calibration, the text's path)."""
    import activeflow_jax as af
    from activeflow_jax.sparse.calibrate import calibrate

    tiny = make_tiny_store(directory)
    text = os.path.join(os.fspath(directory), "calib.txt")
    with open(text, "w") as f:
        f.write(CALIBRATION_PROSE)
    engine = af.Engine.load(tiny.store_path)
    calibration = calibrate(engine, text, levels=levels, progress=False)
    return tiny, engine, calibration, text
