"""Independent float64 NumPy reference implementation of the Llama, Gemma 3 and Qwen2 architectures.

This module is the test oracle for the activeflow_jax engine. It is deliberately
independent of activeflow_jax: it must NOT import activeflow_jax, and it reads the
GGUF file directly with the ``gguf`` package. It is written straight from the
architecture definition, favouring obvious correctness over speed.

Conventions:
  * GGUF lists tensor dims in ggml "ne" order (fastest first), so the NumPy shape is
    the reversed ``t.shape``; a linear layer with ne=[in, out] becomes W[out, in] and
    y = W @ x.
  * llama.cpp's convert_hf_to_gguf permutes the rows of attn_q / attn_k so that
    llama.cpp's "normal" RoPE applies: within each head, ADJACENT pairs
    (x[2i], x[2i+1]) are rotated by angle pos * base^(-2i/head_dim). We use exactly
    that on the weights as stored (no un-permuting). Positions start at 0.
    Llama 3.x: the angle of pair i is divided by rope_freqs[i] when the file has that tensor.
  * Gemma 3 and Qwen2 use llama.cpp's "NEOX" RoPE on unpermuted weights: pairs
    (x[i], x[i + head_dim/2]).
  * Gemma 3 (llama.cpp src/models/gemma3.cpp, HF modeling_gemma3): embedding times
    sqrt(n_embd); RMSNorm on each q and k head before RoPE; q times 1/sqrt(head_dim)
    (not the 62-layer 27B, not covered here); post-attention and post-FFN RMSNorms
    before each residual add; GELU (tanh form) gate times up; layers with
    il % N < N-1 (N = attention.sliding_window_pattern, default 6) use a sliding window
    (key p0 hidden from query p1 when p1 - p0 >= window) and RoPE base 10000 (or
    rope.freq_base_swa); the other layers are global with rope.freq_base. The norm
    weights in the GGUF already hold Gemma's 1 + w (the converter adds 1), so they
    are applied as stored. Optional final logit soft-capping.
  * Qwen2: q/k/v biases.

CLI: ``python tests/reference_numpy.py GGUF_PATH [TOKEN_ID ...]`` prints the model
hyper-parameters, the time taken, the greedy next token after each position and the
mean next-token NLL / perplexity of the given ids.
"""
import sys
import time

import numpy as np
import gguf

_LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                  "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
_OPTIONAL_TENSORS = ("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_q_norm.weight", "attn_k_norm.weight",
                     "post_attention_norm.weight", "post_ffw_norm.weight")


def _tensor_f64(t):
    """Dequantize a GGUF tensor to a float64 array with NumPy shape = reversed(ne)."""
    data = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(data, dtype=np.float64).reshape(tuple(int(d) for d in reversed(t.shape)))


def load_reference_weights(gguf_path) -> dict:
    """Read hyper-parameters and all weights (float64) from a llama GGUF file."""
    reader = gguf.GGUFReader(str(gguf_path))
    arch = reader.fields["general.architecture"].contents()
    assert arch in ("llama", "gemma3", "qwen2"), arch

    def meta(key, default=None):
        field = reader.fields.get(f"{arch}.{key}")
        return default if field is None else field.contents()

    tensors = {t.name: t for t in reader.tensors}
    n_embd, n_head = int(meta("embedding_length")), int(meta("attention.head_count"))
    n_layer = int(meta("block_count"))
    w = {
        "arch": arch,
        "n_layer": n_layer,
        "n_embd": n_embd,
        "n_ff": int(meta("feed_forward_length")),
        "n_head": n_head,
        "n_head_kv": int(meta("attention.head_count_kv")),
        "head_dim": int(meta("attention.key_length", n_embd // n_head)),
        "rope_base": float(meta("rope.freq_base")),
        "eps": float(meta("attention.layer_norm_rms_epsilon")),
        "final_softcap": float(meta("final_logit_softcapping", 0.0) or 0.0),
        "attn_softcap": float(meta("attn_logit_softcapping", 0.0) or 0.0),
        # linear RoPE scaling (llama.cpp freq_scale = 1 / factor): the angle is pos / factor
        "rope_pos_scale": 1.0 / float(meta("rope.scaling.factor", 1.0))
        if meta("rope.scaling.type") == "linear" else 1.0,
        "rope_neox": arch != "llama",
    }
    w["rope_base_layer"] = [w["rope_base"]] * n_layer
    w["window_layer"] = [0] * n_layer
    window = int(meta("attention.sliding_window", 0) or 0)
    if arch == "gemma3" and window:
        pattern = int(meta("attention.sliding_window_pattern", 6))
        for il in range(n_layer):
            if il % pattern < pattern - 1:
                w["window_layer"][il] = window
                w["rope_base_layer"][il] = float(meta("rope.freq_base_swa", 10000.0))
    w["rope_freqs"] = _tensor_f64(tensors["rope_freqs.weight"]) if "rope_freqs.weight" in tensors else None
    w["token_embd"] = _tensor_f64(tensors["token_embd.weight"])            # [vocab, n_embd]
    w["output_norm"] = _tensor_f64(tensors["output_norm.weight"])          # [n_embd]
    if "output.weight" in tensors:
        w["output"] = _tensor_f64(tensors["output.weight"])                # [vocab, n_embd]
    else:
        w["output"] = w["token_embd"]                                      # tied embeddings
    w["layers"] = []
    for i in range(w["n_layer"]):
        layer = {name: _tensor_f64(tensors[f"blk.{i}.{name}.weight"]) for name in _LAYER_TENSORS}
        for name in _OPTIONAL_TENSORS:
            if f"blk.{i}.{name}" in tensors:
                layer[name] = _tensor_f64(tensors[f"blk.{i}.{name}"])
        w["layers"].append(layer)
    return w


def rms_norm(x, weight, eps):
    """x: [T, d]. x / sqrt(mean(x^2) + eps) * weight."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope_adjacent_pairs(x, base, freq_divisors=None, pos_scale=1.0):
    """x: [T, n_heads, head_dim]. Rotate pairs (x[2i], x[2i+1]) by pos * base^(-2i/head_dim)
    (divided by freq_divisors[i] when given)."""
    T, _, head_dim = x.shape
    i = np.arange(head_dim // 2, dtype=np.float64)
    theta = base ** (-2.0 * i / head_dim)                                  # [head_dim/2]
    if freq_divisors is not None:
        theta = theta / freq_divisors
    angle = pos_scale * np.arange(T, dtype=np.float64)[:, None] * theta[None, :]  # [T, head_dim/2]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]        # [T, 1, head_dim/2]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def rope_neox(x, base):
    """x: [T, n_heads, head_dim]. Rotate pairs (x[i], x[i + head_dim/2]) by pos * base^(-2i/head_dim)."""
    T, _, head_dim = x.shape
    half = head_dim // 2
    theta = base ** (-2.0 * np.arange(half, dtype=np.float64) / head_dim)
    angle = np.arange(T, dtype=np.float64)[:, None] * theta[None, :]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    x0, x1 = x[..., :half], x[..., half:]
    return np.concatenate([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)


def silu(x):
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def attention(x, layer, w, il=0):
    """Causal multi-head attention with grouped-query KV heads. x: [T, n_embd]."""
    T = x.shape[0]
    n_head, n_head_kv = w["n_head"], w["n_head_kv"]
    head_dim = w["head_dim"]
    q = x @ layer["attn_q"].T + layer.get("attn_q.bias", 0.0)
    k = x @ layer["attn_k"].T + layer.get("attn_k.bias", 0.0)
    v = x @ layer["attn_v"].T + layer.get("attn_v.bias", 0.0)
    q, k, v = q.reshape(T, n_head, head_dim), k.reshape(T, n_head_kv, head_dim), v.reshape(T, n_head_kv, head_dim)
    if "attn_q_norm.weight" in layer:
        q = rms_norm(q, layer["attn_q_norm.weight"], w["eps"])
        k = rms_norm(k, layer["attn_k_norm.weight"], w["eps"])
    base = w["rope_base_layer"][il]
    if w["rope_neox"]:
        q, k = rope_neox(q, base), rope_neox(k, base)
    else:
        q = rope_adjacent_pairs(q, base, w["rope_freqs"], w["rope_pos_scale"])
        k = rope_adjacent_pairs(k, base, w["rope_freqs"], w["rope_pos_scale"])
    group = n_head // n_head_kv
    causal = np.tril(np.ones((T, T), dtype=bool))
    window = w["window_layer"][il]
    if window:
        pos = np.arange(T)
        causal &= (pos[:, None] - pos[None, :]) < window
    out = np.zeros((T, n_head, head_dim))
    for h in range(n_head):
        kv = h // group
        scores = (q[:, h, :] @ k[:, kv, :].T) / np.sqrt(head_dim)          # [T, T]
        if w["attn_softcap"]:
            scores = w["attn_softcap"] * np.tanh(scores / w["attn_softcap"])
        scores = np.where(causal, scores, -np.inf)
        scores = scores - scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs = probs / probs.sum(axis=-1, keepdims=True)
        out[:, h, :] = probs @ v[:, kv, :]
    return out.reshape(T, n_head * head_dim) @ layer["attn_output"].T


def mlp(x, layer, act=silu):
    """SwiGLU: down(silu(gate x) * up x); GeGLU with act=gelu_tanh."""
    return (act(x @ layer["ffn_gate"].T) * (x @ layer["ffn_up"].T)) @ layer["ffn_down"].T


def reference_logits(weights, token_ids) -> np.ndarray:
    """Full-sequence logits [T, vocab] (float64) for token_ids, positions 0..T-1."""
    w = weights
    gemma = w["arch"] == "gemma3"
    x = w["token_embd"][np.asarray(token_ids, dtype=np.int64)]             # [T, n_embd]
    if gemma:
        x = x * np.sqrt(w["n_embd"])
    for il, layer in enumerate(w["layers"]):
        h = attention(rms_norm(x, layer["attn_norm"], w["eps"]), layer, w, il)
        if gemma:
            h = rms_norm(h, layer["post_attention_norm.weight"], w["eps"])
        x = x + h
        h = mlp(rms_norm(x, layer["ffn_norm"], w["eps"]), layer, gelu_tanh if gemma else silu)
        if gemma:
            h = rms_norm(h, layer["post_ffw_norm.weight"], w["eps"])
        x = x + h
    x = rms_norm(x, w["output_norm"], w["eps"])
    logits = x @ w["output"].T
    if w["final_softcap"]:
        logits = w["final_softcap"] * np.tanh(logits / w["final_softcap"])
    return logits


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    w = load_reference_weights(argv[1])
    ids = [int(a) for a in argv[2:]] or [1, 2, 3, 4, 5, 6, 7, 8]
    print({k: v for k, v in w.items() if not isinstance(v, (np.ndarray, list))})
    t0 = time.perf_counter()
    logits = reference_logits(w, ids)
    print(f"reference_logits: T={len(ids)} in {time.perf_counter() - t0:.2f}s")
    print("greedy next token per position:", logits.argmax(-1).tolist())
    if len(ids) > 1:
        z = logits - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        nll = -np.mean(logp[np.arange(len(ids) - 1), ids[1:]])
        print(f"mean NLL of ids[1:] = {nll:.4f}  (perplexity {np.exp(nll):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
