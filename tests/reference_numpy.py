"""Independent float64 NumPy reference implementation of the Llama architecture.

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


def _tensor_f64(t):
    """Dequantize a GGUF tensor to a float64 array with NumPy shape = reversed(ne)."""
    data = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(data, dtype=np.float64).reshape(tuple(int(d) for d in reversed(t.shape)))


def load_reference_weights(gguf_path) -> dict:
    """Read hyper-parameters and all weights (float64) from a llama GGUF file."""
    reader = gguf.GGUFReader(str(gguf_path))
    meta = lambda key: reader.fields[key].contents()
    tensors = {t.name: t for t in reader.tensors}
    w = {
        "n_layer": int(meta("llama.block_count")),
        "n_embd": int(meta("llama.embedding_length")),
        "n_ff": int(meta("llama.feed_forward_length")),
        "n_head": int(meta("llama.attention.head_count")),
        "n_head_kv": int(meta("llama.attention.head_count_kv")),
        "rope_base": float(meta("llama.rope.freq_base")),
        "eps": float(meta("llama.attention.layer_norm_rms_epsilon")),
    }
    w["token_embd"] = _tensor_f64(tensors["token_embd.weight"])            # [vocab, n_embd]
    w["output_norm"] = _tensor_f64(tensors["output_norm.weight"])          # [n_embd]
    if "output.weight" in tensors:
        w["output"] = _tensor_f64(tensors["output.weight"])                # [vocab, n_embd]
    else:
        w["output"] = w["token_embd"]                                      # tied embeddings
    w["layers"] = [
        {name: _tensor_f64(tensors[f"blk.{i}.{name}.weight"]) for name in _LAYER_TENSORS}
        for i in range(w["n_layer"])
    ]
    return w


def rms_norm(x, weight, eps):
    """x: [T, d]. x / sqrt(mean(x^2) + eps) * weight."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope_adjacent_pairs(x, base):
    """x: [T, n_heads, head_dim]. Rotate pairs (x[2i], x[2i+1]) by pos * base^(-2i/head_dim)."""
    T, _, head_dim = x.shape
    i = np.arange(head_dim // 2, dtype=np.float64)
    theta = base ** (-2.0 * i / head_dim)                                  # [head_dim/2]
    angle = np.arange(T, dtype=np.float64)[:, None] * theta[None, :]       # [T, head_dim/2]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]        # [T, 1, head_dim/2]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def silu(x):
    return x / (1.0 + np.exp(-x))


def attention(x, layer, w):
    """Causal multi-head attention with grouped-query KV heads. x: [T, n_embd]."""
    T = x.shape[0]
    n_head, n_head_kv = w["n_head"], w["n_head_kv"]
    head_dim = w["n_embd"] // n_head
    q = (x @ layer["attn_q"].T).reshape(T, n_head, head_dim)
    k = (x @ layer["attn_k"].T).reshape(T, n_head_kv, head_dim)
    v = (x @ layer["attn_v"].T).reshape(T, n_head_kv, head_dim)
    q = rope_adjacent_pairs(q, w["rope_base"])
    k = rope_adjacent_pairs(k, w["rope_base"])
    group = n_head // n_head_kv
    causal = np.tril(np.ones((T, T), dtype=bool))
    out = np.zeros((T, n_head, head_dim))
    for h in range(n_head):
        kv = h // group
        scores = (q[:, h, :] @ k[:, kv, :].T) / np.sqrt(head_dim)          # [T, T]
        scores = np.where(causal, scores, -np.inf)
        scores = scores - scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs = probs / probs.sum(axis=-1, keepdims=True)
        out[:, h, :] = probs @ v[:, kv, :]
    return out.reshape(T, n_head * head_dim) @ layer["attn_output"].T


def mlp(x, layer):
    """SwiGLU: down(silu(gate x) * up x)."""
    return (silu(x @ layer["ffn_gate"].T) * (x @ layer["ffn_up"].T)) @ layer["ffn_down"].T


def reference_logits(weights, token_ids) -> np.ndarray:
    """Full-sequence logits [T, vocab] (float64) for token_ids, positions 0..T-1."""
    w = weights
    x = w["token_embd"][np.asarray(token_ids, dtype=np.int64)]             # [T, n_embd]
    for layer in w["layers"]:
        x = x + attention(rms_norm(x, layer["attn_norm"], w["eps"]), layer, w)
        x = x + mlp(rms_norm(x, layer["ffn_norm"], w["eps"]), layer)
    x = rms_norm(x, w["output_norm"], w["eps"])
    return x @ w["output"].T


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
