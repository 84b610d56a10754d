"""Shape buckets: the few lengths programs are compiled for, so a session compiles a handful of
programs, not one per token (engine.py, eval/scoring.py, distill/corpus.py and the swapping
runtime all bucket by these).

    KV cache length   powers of two from MIN_CACHE_LEN up to the model's context
    attention length  powers of two from MIN_ATTN_LEN up to the cache length
    prefill chunk     powers of two from MIN_PREFILL_BUCKET up to PREFILL_CHUNK tokens
    under a budget    the KV cache always kv_tokens long, attention at least BUDGET_MIN_ATTN_LEN
                      (runtime/swap.py, SwapRuntime.attention_length)
"""

from __future__ import annotations

PREFILL_CHUNK = 512
MIN_CACHE_LEN = 256
MIN_ATTN_LEN = 128
MIN_PREFILL_BUCKET = 16
BUDGET_MIN_ATTN_LEN = 512


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << max(0, int(n - 1).bit_length()))
