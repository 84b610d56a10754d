"""Engine: load a flash store, then generate, stream and score text with the dense model.

Shapes are bucketed so a session compiles a handful of programs, not one per token:
    KV cache length   powers of two from 256 up to the model's context
    attention length  powers of two from 128 up to the cache length (cost follows the filled part)
    prefill chunk     powers of two from 16 up to 512 tokens
Compiled programs are also kept in JAX's persistent compilation cache (under
`activeflow_home()/jax_cache`), so a second process starts without recompiling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from activeflow_jax.buckets import MIN_ATTN_LEN, MIN_CACHE_LEN, MIN_PREFILL_BUCKET, PREFILL_CHUNK, _pow2_at_least
from activeflow_jax.config import ModelConfig, PredictionConfig, SparsityConfig
from activeflow_jax.errors import InvalidArgumentError, PromptTooLongError, StoreError
from activeflow_jax.eval.scoring import score_requests
from activeflow_jax.formats.tokenizer import StreamDecoder, Tokenizer
from activeflow_jax.models import llama
from activeflow_jax.models.embedding import q8_embedding_wanted, resident_table, resident_tensor
from activeflow_jax.paths import activeflow_home
from activeflow_jax.runtime import mappings
from activeflow_jax.runtime.budget import allocated_sparsity, peak_rss_bytes
from activeflow_jax.runtime.session import load_swapping, replan
from activeflow_jax.sampling import SamplingParams, sample_token
from activeflow_jax.sparse import native as native_lib
from activeflow_jax.sparse.kernels import resolve_kernel
from activeflow_jax.sparse.thresholds import store_thresholds
from activeflow_jax.store.reader import StoreReader


@functools.partial(jax.jit, static_argnames=("cfg", "attn_len", "sparse", "predict", "native"),
                   donate_argnames=("cache",))
def decode_and_sample(params, cache, token, pos, thresholds, key, temperature, top_p, *, cfg, attn_len: int,
                      sparse, predict, native: bool):
    """One decode step and the choice of the next token in one program: (next token, next key,
    cache). A separate sampling call costs a dispatch, a logits slice and a key split per token,
    ~0.2 ms on the 2-core reference machine (1-3% of a step); the tokens are the same."""
    logits, cache = llama.forward(params, cache, token, pos, 1, thresholds, cfg=cfg, attn_len=attn_len,
                                  all_logits=False, sparse=sparse, predict=predict, native=native)
    key, sub = jax.random.split(key)
    return sample_token(logits[0], sub, temperature, top_p), key, cache


def enable_compilation_cache() -> None:
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", os.path.join(activeflow_home(), "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@dataclasses.dataclass
class EngineStats:
    """Counters since load (or since `reset()`); throughput excludes compilation."""

    load_seconds: float = 0.0
    weight_bytes: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    compile_seconds: float = 0.0
    compiles: int = 0
    peak_rss_bytes: int = 0
    memory: dict | None = None  # DRAM budget breakdown (bytes), swapping engines only
    loader: dict | None = None  # flash loader counters (runtime.swap.SwapStats), swapping engines only

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def reset(self) -> None:
        keep = (self.load_seconds, self.weight_bytes, self.memory)
        self.__init__()
        self.load_seconds, self.weight_bytes, self.memory = keep

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["prefill_tokens_per_s"] = self.prefill_tokens_per_s
        out["decode_tokens_per_s"] = self.decode_tokens_per_s
        return out


class Engine:
    """A loaded model. Concurrent calls are serialized by a lock, taken per decode step by streams
    (see `_generate`), so an unfinished stream never blocks other calls."""

    def __init__(self, config: ModelConfig, params: llama.Params, tokenizer: Tokenizer | None,
                 *, store_path: str | None = None):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.store_path = store_path
        self.stats = EngineStats(weight_bytes=sum(x.nbytes for x in jax.tree.leaves(params)))
        self._compiled: dict[tuple, Any] = {}
        self._lock = threading.RLock()
        self.sparsity: SparsityConfig | None = None  # None: the dense reference path
        self.prediction: PredictionConfig | None = None
        self._thresholds: jax.Array | None = None
        self.swap = None  # runtime.swap.SwapRuntime when the engine runs under a DRAM budget
        self._native: bool | None = None  # one-token native kernels; resolved on first compile (builds them)
        self._closed = False  # close() frees the buffers; a stream still open then fails clearly

    @classmethod
    def load(cls, store_path: str | os.PathLike, *, sparsity: float | None = None, policy: str = "threshold",
             kernel: str = "auto", dense_layers: int = 1, dram_budget: Any = None, q8_embedding: Any = "auto",
             op_sparsity=None, **budget_options) -> "Engine":
        """Loads a store. Without `dram_budget` every weight goes into DRAM (all-in-DRAM engine);
        with one (bytes, "200MB", or a fraction of the model such as 0.5) the weights stay on
        flash and only active rows are swapped in: see `runtime.session.load_swapping` for the
        options (group_size, kv_tokens, cold, direct_io, superset, ...). `sparsity` (0..0.95)
        switches on contextual sparsity with the store's calibrated thresholds; see
        `configure_sparsity`. q8_embedding ("auto", True, False): hold a tied embedding as exact
        Q8_0 blocks (models/embedding.py: 3.6x fewer bytes, bit-identical logits); "auto" does
        where the table is exactly Q8_0 and the native CPU kernels run, True insists.
        op_sparsity: a per-op allocation instead of `sparsity`, see `configure_sparsity` (under a
        budget the planner then picks only the group size and the cache)."""
        enable_compilation_cache()
        if q8_embedding not in ("auto", True, False):
            raise InvalidArgumentError(f"q8_embedding must be 'auto', True or False, got {q8_embedding!r}")
        if op_sparsity is not None and sparsity:
            raise InvalidArgumentError("give either sparsity or op_sparsity, not both")
        # before any program compiles: a process at the mapping limit crashes inside XLA instead
        mappings.ensure_headroom(mappings.ENGINE_MAPPINGS if dram_budget is None else mappings.BUDGET_ENGINE_MAPPINGS,
                                 "loading this engine")
        if dram_budget is not None:
            return load_swapping(cls, store_path, dram_budget, sparsity=sparsity, policy=policy, kernel=kernel,
                                 dense_layers=dense_layers, q8_embedding=q8_embedding, op_sparsity=op_sparsity,
                                 **budget_options)
        if budget_options:
            raise InvalidArgumentError(f"{sorted(budget_options)} only apply with dram_budget=...")
        start = time.perf_counter()
        reader = StoreReader(store_path)
        cfg = reader.config
        shapes = llama.param_shapes(cfg)
        missing = sorted(set(shapes) - set(reader.tensor_names))
        if missing:
            raise StoreError(f"store {reader.path} lacks tensors {missing[:3]}...; re-convert it")
        q8 = q8_embedding_wanted(cfg, q8_embedding)
        # one tensor at a time onto the device, so the host never holds a second copy of the model
        flat = {"embed": resident_table(reader, q8, q8_embedding is True)}  # block by block, see there
        flat.update((name, resident_tensor(name, arr, q8, q8_embedding is True, reader.path))
                    for name, arr in reader.iter_held(n for n in shapes if n != "embed"))
        params = llama.params_from_flat(cfg, flat)
        tokenizer = Tokenizer.from_spec(reader.tokenizer_spec) if reader.tokenizer_spec else None
        engine = cls(cfg, params, tokenizer, store_path=reader.path)
        if sparsity or op_sparsity is not None:
            engine.configure_sparsity(sparsity or None, policy=policy, kernel=kernel, dense_layers=dense_layers,
                                      op_sparsity=op_sparsity)
        engine.stats.load_seconds = time.perf_counter() - start
        return engine

    def configure_sparsity(self, sparsity: float | None, *, policy: str = "threshold", kernel: str = "auto",
                           dense_layers: int = 1, prediction: PredictionConfig | None = None,
                           op_sparsity=None) -> None:
        """Switches contextual sparsity on (0 < sparsity <= 0.95) or off (None or 0) for later
        calls. The "threshold" policy needs the store's calibration for that level.

        op_sparsity: a per-op allocation instead of one level ({"qkv": 0.4, ...}, a sequence in
        OP_GROUPS order, or "qkv=0.4,o=0.45,gate_up=0.45,down=0.69"); `sparsity` must then be
        None, and becomes the allocation's share of weight bytes left unread."""
        if self.swap is not None:
            raise InvalidArgumentError("this engine runs under a DRAM budget, which was planned for its sparsity; "
                                       "load it again with Engine.load(store, dram_budget=..., sparsity=...)")
        options = dict(policy=policy, kernel=kernel, dense_layers=dense_layers)
        if op_sparsity is not None:
            if sparsity is not None:
                raise InvalidArgumentError("give either sparsity or op_sparsity, not both")
            config = resolve_kernel(allocated_sparsity(self.config, op_sparsity, **options))
        elif sparsity is None or sparsity == 0:
            config = None
            if sparsity == 0:
                SparsityConfig(0.0, **options)  # validates
        else:
            config = resolve_kernel(SparsityConfig(sparsity, **options))
        thresholds = None
        if config is not None and config.policy == "threshold":
            thresholds = jnp.asarray(store_thresholds(self.store_path, self.config, config))
        with self._lock:
            self.sparsity, self._thresholds = config, thresholds
            self.prediction = prediction if config is not None else None

    @contextlib.contextmanager
    def sparsity_scope(self):
        """Restores the sparsity settings on exit (for harnesses that try several)."""
        saved = (self.sparsity, self._thresholds, self.prediction)
        try:
            yield self
        finally:
            with self._lock:
                self.sparsity, self._thresholds, self.prediction = saved

    # ------------------------------------------------------------------------------------------
    # The compiled forward, one program per (cache length, chunk length, attention length).

    def _forward(self, cache: llama.KVCache, tokens: np.ndarray, start_pos: int, n_valid: int,
                 attn_len: int, all_logits: bool):
        if self.swap is not None:
            seconds, programs = self.swap.compile_clock()
            out = self.swap.forward(cache, tokens, start_pos, n_valid, attn_len, all_logits)
            jax.block_until_ready(out[0])
            after_seconds, after_programs = self.swap.compile_clock()
            self.stats.compile_seconds += after_seconds - seconds  # first-use stage compiles
            self.stats.compiles += after_programs - programs
            self.stats.loader = self.swap.stats.as_dict()
            self.stats.memory = self.swap.memory_breakdown()
            return out
        # one program per layer kind (llama.layer_program): a program over every layer took ~0.5 GB
        # to compile for each prompt bucket
        cfg, params, t = self.config, self.params, tokens.shape[0]
        tokens_a, start_a = jnp.asarray(tokens, jnp.int32), jnp.int32(start_pos)
        x = self._program(("embed", t), llama.embed_program, (params["embed"], tokens_a))(params["embed"], tokens_a)
        ks, vs = list(cache.k), list(cache.v)
        residuals = []
        for i, (kind, layer) in enumerate(llama.layer_programs(cfg, self.sparsity, self.prediction)):
            residuals.append(x)
            p = params["layers"][i]
            src = None
            if kind[3]:  # a predicted layer: the residual entering its source layer, and that layer's norms
                j = i - self.prediction.distance
                src = (residuals[j], {n: params["layers"][j][n] for n in ("attn_norm", "mlp_norm")})
            thresholds = None if self._thresholds is None or not kind[2] else self._thresholds[i:i + 1]
            args = (p, x, ks[i], vs[i], start_a, thresholds, src)
            program = self._program(("layer", kind, cache.max_len, t, attn_len, self.sparsity, self.prediction),
                                    llama.layer_program, args,
                                    layer=layer, attn_len=attn_len)
            x, ks[i], vs[i] = program(*args)
        head = {n: params[n] for n in ("embed", "final_norm", "lm_head") if n in params}
        args = (head, x, jnp.int32(n_valid))
        logits = self._program(("head", t, all_logits), llama.head_program, args, all_logits=all_logits)(*args)
        return logits, llama.KVCache(tuple(ks), tuple(vs))

    def _decode_step(self, cache: llama.KVCache, token: np.ndarray, pos: int, attn_len: int, key, temperature,
                     top_p) -> tuple[int, jax.Array, llama.KVCache]:
        """Decodes one token and samples the next: (next token, next key, cache)."""
        if self.swap is not None:  # the budget runtime's programs, the sampling inside the last one
            seconds, programs = self.swap.compile_clock()
            next_token, key, cache = self.swap.decode_and_sample(cache, token, pos, attn_len, key, temperature, top_p)
            after_seconds, after_programs = self.swap.compile_clock()
            self.stats.compile_seconds += after_seconds - seconds
            self.stats.compiles += after_programs - programs
            self.stats.loader = self.swap.stats.as_dict()
            return next_token, key, cache
        args = (self.params, cache, jnp.asarray(token, jnp.int32), jnp.int32(pos), self._thresholds, key, temperature,
                top_p)
        program_key = ("step", cache.max_len, attn_len, self.sparsity, self.prediction)
        next_token, key, cache = self._program(program_key, decode_and_sample, args, attn_len=attn_len)(*args)
        return int(next_token), key, cache

    def _program(self, key: tuple, fn, args: tuple, **static):
        """`fn` compiled for `args` with the engine's model, sparsity and native settings plus `static`;
        cached under `key`, its compile time counted apart from throughput."""
        compiled = self._compiled.get(key)
        if compiled is None:
            if self._native is None:  # resolved on first compile: this builds the native library
                self._native = native_lib.usable()
            t0 = time.perf_counter()
            compiled = fn.lower(*args, cfg=self.config, sparse=self.sparsity, predict=self.prediction,
                                native=self._native, **static).compile()
            self.stats.compile_seconds += time.perf_counter() - t0
            self.stats.compiles += 1
            self._compiled[key] = compiled
        return compiled

    def _new_cache(self, length: int) -> llama.KVCache:
        floor = MIN_CACHE_LEN if self.swap is None else min(MIN_CACHE_LEN, self.swap.memory.kv_tokens)
        size = min(_pow2_at_least(length, floor), _pow2_at_least(self.config.max_context, floor))
        if self.swap is not None:
            if size > self.swap.memory.kv_tokens:
                raise PromptTooLongError(
                    f"this request needs a KV cache of {size} positions but the DRAM budget reserves "
                    f"{self.swap.memory.kv_tokens} (kv_tokens); shorten the prompt or max_new_tokens, or load "
                    "with a larger kv_tokens")
            self.swap.new_sequence()  # context-level cache: frequency counters restart per sequence
            # always the reserved length: the budget holds it anyway, and one cache shape means
            # one set of programs (SwapRuntime.attention_length)
            size = min(self.swap.memory.kv_tokens, _pow2_at_least(self.config.max_context, floor))
        return llama.KVCache.zeros(self.config, size)

    def set_dram_budget(self, dram_budget: Any) -> None:
        """Re-plans the slot pools for a new budget between requests (no reload; the old pool
        buffers are freed before the new ones are allocated)."""
        if self.swap is None:
            raise InvalidArgumentError("this engine holds the whole model in DRAM; load it with "
                                       "Engine.load(store, dram_budget=...) to run under a budget")

        with self._lock:
            mappings.ensure_headroom(mappings.BUDGET_ENGINE_MAPPINGS, "a new DRAM budget")
            replan(self, dram_budget)
            self.stats.memory = self.swap.memory_breakdown()

    def close(self) -> None:
        """Frees the engine's device buffers now (instead of when it is garbage collected)."""
        with self._lock:
            self._closed = True
            if self.swap is not None:
                self.swap.close()
            for leaf in jax.tree.leaves(self.params):
                try:
                    leaf.delete()
                except Exception:
                    pass

    def _prefill(self, token_ids: np.ndarray, cache: llama.KVCache, all_logits: bool):
        """Runs the prompt in chunks; returns (logits, cache). Logits are [T, V] or [1, V]."""
        outputs = []
        total = len(token_ids)
        logits = None
        for start in range(0, total, PREFILL_CHUNK):
            chunk = token_ids[start:start + PREFILL_CHUNK]
            n = len(chunk)
            bucket = _pow2_at_least(n, MIN_PREFILL_BUCKET)
            padded = np.zeros(bucket, np.int32)
            padded[:n] = chunk
            attn_len = min(cache.max_len, _pow2_at_least(start + bucket, MIN_ATTN_LEN))
            last_chunk = start + PREFILL_CHUNK >= total
            logits, cache = self._forward(cache, padded, start, n, attn_len, all_logits or not last_chunk)
            if all_logits:
                outputs.append(np.asarray(logits[:n]))
        if all_logits:
            return np.concatenate(outputs, axis=0), cache
        return logits, cache

    def _cache_len_for(self, prompt_len: int, new_tokens: int) -> int:
        last_start = ((max(prompt_len, 1) - 1) // PREFILL_CHUNK) * PREFILL_CHUNK
        padded_end = last_start + _pow2_at_least(prompt_len - last_start, MIN_PREFILL_BUCKET)
        return max(prompt_len + new_tokens, padded_end)

    def _check_fits(self, prompt_len: int, new_tokens: int) -> None:
        ctx = self.config.max_context
        if prompt_len == 0:
            raise InvalidArgumentError("the prompt is empty: give at least one token")
        if prompt_len + new_tokens > ctx:
            raise PromptTooLongError(
                f"prompt of {prompt_len} tokens plus max_new_tokens={new_tokens} exceeds the model's context of "
                f"{ctx} tokens; shorten the prompt or lower max_new_tokens"
            )

    # ------------------------------------------------------------------------------------------
    # Public API.

    def logits(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Full-sequence next-token logits, float32 [T, vocab]; row t predicts token t+1."""
        ids = self._validate_ids(token_ids)
        self._check_fits(len(ids), 0)
        with self._lock:
            self._check_open()
            cache = self._new_cache(self._cache_len_for(len(ids), 0))
            t0, c0 = time.perf_counter(), self.stats.compile_seconds
            out, _ = self._prefill(ids, cache, all_logits=True)
            self._account_prefill(len(ids), t0, c0)
            return out

    def generate_ids(self, prompt_ids: Sequence[int] | np.ndarray, *, max_new_tokens: int = 128,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                     stop_ids: frozenset[int] | None = None) -> Iterator[int]:
        """Yields generated token ids one at a time (stops at a stop id, which is not yielded)."""
        ids = self._validate_ids(prompt_ids)
        sampling = SamplingParams(temperature, top_p, seed)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InvalidArgumentError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        self._check_fits(len(ids), max_new_tokens)
        if stop_ids is None:
            stop_ids = self.tokenizer.stop_ids if self.tokenizer else frozenset()
        return self._generate(ids, max_new_tokens, sampling, stop_ids)

    def _generate(self, ids: np.ndarray, max_new_tokens: int, sampling: SamplingParams,
                  stop_ids: frozenset[int]) -> Iterator[int]:
        # The lock is taken per step, never held across a yield: a stream its caller leaves
        # unfinished (neither exhausted nor closed) would otherwise block every other call on this
        # engine, from any thread, forever. The sequence's state (KV cache, key, position) belongs
        # to this generator, so streams may interleave and may be consumed from any thread.
        with self._lock:
            self._check_open()
            cache = self._new_cache(self._cache_len_for(len(ids), max_new_tokens))
            key = jax.random.key(sampling.seed)
            temperature, top_p = jnp.float32(sampling.temperature), jnp.float32(sampling.top_p)
            t0, c0 = time.perf_counter(), self.stats.compile_seconds
            logits, cache = self._prefill(ids, cache, all_logits=False)
            key, sub = jax.random.split(key)
            token = int(sample_token(logits[-1], sub, temperature, top_p))
            self._account_prefill(len(ids), t0, c0)
        pos = len(ids)
        step_tokens = np.zeros(1, np.int32)
        for i in range(max_new_tokens):
            if token in stop_ids:
                return
            yield token
            if i == max_new_tokens - 1:
                return
            with self._lock:
                self._check_open()
                t0 = time.perf_counter()
                step_tokens[0] = token
                attn_len = min(cache.max_len, _pow2_at_least(pos + 1, MIN_ATTN_LEN))
                c0 = self.stats.compile_seconds
                token, key, cache = self._decode_step(cache, step_tokens, pos, attn_len, key, temperature, top_p)
                pos += 1
                self.stats.decode_tokens += 1
                self.stats.decode_seconds += time.perf_counter() - t0 - (self.stats.compile_seconds - c0)
                self.stats.peak_rss_bytes = peak_rss_bytes()

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgumentError("this engine was closed (Engine.close); load the store again to use it")

    def _account_prefill(self, n_tokens: int, t0: float, compile_before: float) -> None:
        # compile time of programs first used here is excluded from the throughput figure
        self.stats.prefill_tokens += n_tokens
        elapsed = time.perf_counter() - t0 - (self.stats.compile_seconds - compile_before)
        self.stats.prefill_seconds += max(0.0, elapsed)
        self.stats.peak_rss_bytes = peak_rss_bytes()

    def _encode_prompt(self, prompt: str, chat: bool, system: str | None) -> np.ndarray:
        if self.tokenizer is None:
            raise InvalidArgumentError("this store has no tokenizer: pass token ids to generate_ids() instead")
        if not isinstance(prompt, str):
            raise InvalidArgumentError(f"prompt must be a str, got {type(prompt).__name__}")
        for what, text in (("prompt", prompt), ("system prompt", system or "")):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone surrogate: e.g. bytes on the command line that are not UTF-8
                raise InvalidArgumentError(
                    f"the {what} is not valid text: character {exc.start} is {text[exc.start]!r}, a lone surrogate "
                    "(on the command line: bytes that are not UTF-8); give it as UTF-8 text") from None
        ids = self.tokenizer.encode_chat(prompt, system=system) if chat else self.tokenizer.encode(prompt)
        return np.asarray(ids, np.int32)

    def stream(self, prompt: str, *, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
               seed: int = 0, chat: bool = False, system: str | None = None) -> Iterator[str]:
        """Yields the generated text piece by piece (whole UTF-8 characters only)."""
        ids = self._encode_prompt(prompt, chat, system)
        tokens = self.generate_ids(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                   seed=seed)
        return self._stream_text(tokens)

    def _stream_text(self, tokens: Iterator[int]) -> Iterator[str]:
        decoder = StreamDecoder(self.tokenizer)
        for token in tokens:
            piece = decoder.push(token)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail

    def generate(self, prompt: str, *, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, chat: bool = False, system: str | None = None) -> str:
        """The generated continuation (or chat answer) as one string."""
        return "".join(self.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                   seed=seed, chat=chat, system=system))

    def _validate_ids(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        try:
            ids = np.asarray(token_ids)
        except Exception:
            raise InvalidArgumentError("token_ids must be a sequence of ints") from None
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise InvalidArgumentError(f"token_ids must be a 1-D sequence of ints, got shape {ids.shape} {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise InvalidArgumentError(f"token ids must be in [0, {self.config.vocab_size}); got {ids.min()}..{ids.max()}")
        return ids.astype(np.int32)

    def score_continuations(self, context_ids: Sequence[int] | np.ndarray,
                            continuations: Sequence[Sequence[int] | np.ndarray]) -> list[np.ndarray]:
        """Log-probs (float64) of each continuation's tokens after `context_ids`: entry j, token t
        is log P(continuations[j][t] | context, continuations[j][:t]). The context is evaluated
        once and its KV cache reused for every continuation (batched; see eval/scoring.py, which
        also scores many contexts per call for task evaluation)."""
        return score_requests(self, [(context_ids, continuations)])[0]
