"""Tiny random models for tests, demos and notebooks (no download needed).

`write_tiny_gguf` writes a real GGUF file the way llama.cpp's converter would (q/k rows
permuted for interleaved RoPE, byte-level BPE tokenizer in the metadata, optional
quantization), so the whole import path is exercised on a model that compiles in seconds.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

import activeflow_jax as af
from activeflow_jax.config import ModelConfig, tiny_config
from activeflow_jax.models.families import family
from activeflow_jax.models.llama import flatten_params, init_params
from activeflow_jax.sparse.calibrate import calibrate
from activeflow_jax.store.writer import convert

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


def tiny_gemma3_config(**overrides) -> ModelConfig:
    """A tiny Gemma 3-like config with each of the family's features: GeGLU, q/k norms, post-norms,
    embedding scale, sliding-window layers (window 4, every 2nd layer global, its own RoPE base),
    one KV head, and heads x head_dim (128) != d_model (64)."""
    base = dict(arch="gemma3", name="tiny-gemma3", num_layers=3, d_model=64, d_ff=128, num_heads=4,
                num_kv_heads=1, head_dim=32, vocab_size=320, rope_theta=1e6, norm_eps=1e-6,
                mlp_activation="gelu_tanh", qk_norm=True, post_norms=True, embed_scale=8.0,
                query_scale=32**-0.5, sliding_window=4, sliding_window_pattern=2, rope_local_theta=10000.0)
    return tiny_config(**{**base, **overrides})


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


# every character of a piece is itself a token, as in any SentencePiece vocabulary
SPM_PIECES = ("\u2581", "e", "t", "a", "o", "n", "h", "s", "r", "i", "d", "w", "b", "c", "f", "m", "p", "\u2581t", "he", "in", "\u2581the", "er", "an",
              "\u2581a", "re", "on", "\u2581s", "at", "en", "nd", "\u2581o", "es", "\u2581w", "or", "is",
              "\u2581th", "\u2581in", "ed", "it", "ar", "\u2581b", "\u2581c", "\u2581f", "\u2581m", "\u2581p")


def tiny_spm_vocab(vocab_size: int) -> tuple[list[str], list[int], list[float]]:
    """(tokens, token types, scores) of a SentencePiece-style vocabulary as Gemma's GGUF holds it:
    <pad> <eos> <bos> <unk>, "\n" (user-defined), 256 <0xXX> byte tokens, scored pieces, unused."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "\n"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [3, 3, 3, 2, 4] + [6] * 256
    scores = [0.0] * len(tokens)
    for rank, piece in enumerate(SPM_PIECES):
        tokens.append(piece)
        types.append(1)
        scores.append(-float(rank))
    while len(tokens) < vocab_size:
        tokens.append(f"<unused{len(tokens)}>")
        types.append(5)
        scores.append(-1e9)
    if len(tokens) > vocab_size:
        raise ValueError(f"the tiny SentencePiece tokenizer needs vocab_size >= {len(tokens)}")
    return tokens, types, scores


def permute_for_gguf(w_out_in: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert's permute: rotate-half rows -> interleaved-pair rows."""
    out = w_out_in.shape[0]
    return w_out_in.reshape(n_heads, 2, out // n_heads // 2, *w_out_in.shape[1:]).swapaxes(1, 2).reshape(w_out_in.shape)


def add_hparams(writer, cfg: ModelConfig, arch: str) -> None:
    """A model's hyper-parameters as GGUF metadata (what formats/gguf_import.py reads back)."""
    import gguf

    spec = family(cfg.arch)
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.max_context)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.sliding_window:
        writer.add_sliding_window(cfg.sliding_window)
        if cfg.sliding_window_pattern != spec.sliding_window_pattern:
            writer.add_uint32(f"{arch}.attention.sliding_window_pattern", cfg.sliding_window_pattern)
    if cfg.final_softcap:
        writer.add_final_logit_softcapping(cfg.final_softcap)
    if cfg.attn_softcap:
        writer.add_attn_logit_softcapping(cfg.attn_softcap)
    if cfg.rope_scale != 1.0:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(1.0 / cfg.rope_scale)


def add_byte_bpe_vocab(writer, vocab_size: int, pre_tokenizer: str = "smollm", chat: bool = True) -> None:
    """A tiny byte-level BPE vocabulary (GGUF `gpt2`) of vocab_size tokens, ids 1/2 as BOS/EOS."""
    tokens, types, merges = tiny_vocab(vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    if chat:
        writer.add_chat_template(CHATML_TEMPLATE)


def write_tiny_gguf(path: str | os.PathLike, cfg: ModelConfig | None = None, *, qtype: str = "F32", seed: int = 0,
                    arch: str | None = None, truncate_to: int | None = None,
                    pre_tokenizer: str = "smollm", tokenizer: str | None = None,
                    add_space_prefix: bool = False) -> dict[str, np.ndarray]:
    """Writes a random GGUF of cfg's family (cfg.arch) the way llama.cpp's converter would;
    returns the float32 params in our layout (pre-quantization). arch: the architecture name
    written into the file (default cfg.arch; another name makes an unsupported file).
    qtype: the type of the linear weights and the embedding, any that `gguf.quants` can write,
    or a K-quant (Q2_K..Q6_K), written as random blocks (gguf cannot quantize to those): the
    returned params then hold the block values as dequantized. tokenizer: "gpt2" (byte-level BPE
    with `pre_tokenizer`) or "llama" (SentencePiece with scores); default: the family's own."""
    import gguf

    cfg = cfg or tiny_config()
    spec = family(cfg.arch)
    arch = arch or cfg.arch
    spm = tokenizer == "llama" if tokenizer else "gpt2" not in spec.tokenizers  # SentencePiece vocabulary
    if cfg.vocab_size < (261 + len(SPM_PIECES) if spm else 259):
        raise ValueError("the tiny tokenizer needs a larger vocab_size")
    flat = {k: np.asarray(v, np.float32) for k, v in flatten_params(init_params(cfg, seed)).items()}
    if cfg.arch != "llama":  # norm weights away from 1, so that a missed or doubled "1 + w" shows
        rng = np.random.default_rng(seed + 1)
        for name in flat:
            if name.endswith("norm.weight"):
                flat[name] = (1.0 + 0.3 * rng.standard_normal(flat[name].shape)).astype(np.float32)
    quant = gguf.GGMLQuantizationType[qtype]
    writer = gguf.GGUFWriter(os.fspath(path), arch)
    writer.add_name(f"tiny-{arch}-{qtype}")
    add_hparams(writer, cfg, arch)
    if spm:
        tokens, types, scores = tiny_spm_vocab(cfg.vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_scores(scores)
        writer.add_bos_token_id(2)
        writer.add_eos_token_id(1)
        writer.add_unk_token_id(3)
        writer.add_add_bos_token(True)
        writer.add_add_space_prefix(add_space_prefix)
    else:
        add_byte_bpe_vocab(writer, cfg.vocab_size, pre_tokenizer)
    rng = np.random.default_rng(seed + 2)

    def add(name: str, arr: np.ndarray, quantize: bool) -> np.ndarray:
        """Writes arr; returns the values the file holds (after quantization), [out, in]."""
        arr = np.ascontiguousarray(arr, np.float32)
        if not quantize or quant == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, arr)
            return arr
        if quant == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, arr.astype(np.float16))
            return arr
        if qtype in K_QUANT_SCALE_OFFSETS:
            blocks = random_k_quant_blocks(rng, quant, arr.shape)
            writer.add_tensor(name, blocks, raw_dtype=quant)
            return gguf.quants.dequantize(blocks, quant).reshape(arr.shape).astype(np.float32)
        data = gguf.quants.quantize(arr, quant)
        writer.add_tensor(name, data, raw_dtype=quant)
        return arr

    def linear(name: str, w_in_out: np.ndarray, heads: int = 0) -> np.ndarray:
        """Writes a linear weight given in our [in, out] layout (q/k permuted for llama); returns
        the [in, out] values the file holds, in our layout."""
        w = w_in_out.T
        if heads and spec.gguf_qk_permuted:
            held = add(name, permute_for_gguf(w, heads), True)
            return unpermute_from_gguf(held, heads).T
        return add(name, w, True).T

    flat["embed"] = add("token_embd.weight", flat["embed"], True)
    for i in range(cfg.num_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        wq, wk, wv = np.split(flat[p + "attn.wqkv"], [cfg.q_dim, cfg.q_dim + cfg.kv_dim], axis=1)  # [in, out]
        gate, up = np.split(flat[p + "mlp.w_gate_up"], 2, axis=1)
        add(b + "attn_norm.weight", flat[p + "attn_norm.weight"], False)
        flat[p + "attn.wqkv"] = np.concatenate([linear(b + "attn_q.weight", wq, cfg.num_heads),
                                                linear(b + "attn_k.weight", wk, cfg.num_kv_heads),
                                                linear(b + "attn_v.weight", wv)], axis=1)
        flat[p + "attn.wo"] = linear(b + "attn_output.weight", flat[p + "attn.wo"])
        add(b + "ffn_norm.weight", flat[p + "mlp_norm.weight"], False)
        flat[p + "mlp.w_gate_up"] = np.concatenate([linear(b + "ffn_gate.weight", gate),
                                                    linear(b + "ffn_up.weight", up)], axis=1)
        flat[p + "mlp.w_down"] = linear(b + "ffn_down.weight", flat[p + "mlp.w_down"])
        if cfg.qkv_bias:
            bq, bk, bv = np.split(flat[p + "attn.bqkv"], [cfg.q_dim, cfg.q_dim + cfg.kv_dim])
            if spec.gguf_qk_permuted:
                bq, bk = permute_for_gguf(bq, cfg.num_heads), permute_for_gguf(bk, cfg.num_kv_heads)
            for n, v in (("attn_q.bias", bq), ("attn_k.bias", bk), ("attn_v.bias", bv)):
                add(b + n, v, False)
        if cfg.qk_norm:
            add(b + "attn_q_norm.weight", flat[p + "attn.q_norm.weight"], False)
            add(b + "attn_k_norm.weight", flat[p + "attn.k_norm.weight"], False)
        if cfg.post_norms:
            add(b + "post_attention_norm.weight", flat[p + "post_attn_norm.weight"], False)
            add(b + "post_ffw_norm.weight", flat[p + "post_mlp_norm.weight"], False)
    add("output_norm.weight", flat["final_norm.weight"], False)
    if cfg.rope_freq_factors:
        add("rope_freqs.weight", np.asarray(cfg.rope_freq_factors, np.float32), False)
    if not cfg.tie_embeddings:
        flat["lm_head"] = add("output.weight", flat["lm_head"].T, True).T
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if truncate_to is not None:
        with open(path, "r+b") as f:
            f.truncate(truncate_to)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}


# Byte offsets of the f16 scale fields ("d", and "dmin" where present) inside one 256-value block
# of each K-quant (ggml-common.h block_q2_K .. block_q6_K); the other bytes are codes and sub-scales.
K_QUANT_SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_k_quant_blocks(rng: np.random.Generator, quant, shape: tuple[int, ...]) -> np.ndarray:
    """Random K-quant blocks for a tensor of `shape` (last dim a multiple of 256): random codes and
    sub-scales, the f16 super-block scales set to small values so the weights stay O(0.1)."""
    import gguf

    block_values, block_bytes = gguf.GGML_QUANT_SIZES[quant]
    if shape[-1] % block_values:
        raise ValueError(f"{quant.name} needs rows of a multiple of {block_values} values, got {shape}")
    n_blocks = int(np.prod(shape)) // block_values
    blocks = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
    for offset in K_QUANT_SCALE_OFFSETS[quant.name]:
        scale = (rng.uniform(0.002, 0.01, n_blocks)).astype(np.float16)
        blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(*shape[:-1], shape[-1] // block_values * block_bytes)


def unpermute_from_gguf(w_out_in: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of permute_for_gguf."""
    out = w_out_in.shape[0]
    return w_out_in.reshape(n_heads, out // n_heads // 2, 2, *w_out_in.shape[1:]).swapaxes(1, 2).reshape(w_out_in.shape)


@dataclasses.dataclass(frozen=True)
class TinyModel:
    gguf_path: str
    store_path: str
    params: dict[str, np.ndarray]


def make_tiny_store(directory: str | os.PathLike, cfg: ModelConfig | None = None, *, qtype: str = "F32",
                    dtype: str = "float32", seed: int = 0) -> TinyModel:
    """A tiny GGUF and its converted store under `directory`."""
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
    tiny = make_tiny_store(directory)
    text = os.path.join(os.fspath(directory), "calib.txt")
    with open(text, "w") as f:
        f.write(CALIBRATION_PROSE)
    engine = af.Engine.load(tiny.store_path)
    calibration = calibrate(engine, text, levels=levels, progress=False)
    return tiny, engine, calibration, text
