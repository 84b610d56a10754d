"""The DRAM-flash swapping runtime: a model runs in a fixed DRAM budget with its weights on flash.

The layers run as compiled programs (runtime/pooled.py: the model's own layer function with its
weights multiplied from slot pools). Per decoded token, with layer groups g = 0..G-1:

    P_embed: embedding, and the predicted channels of group 1 (from the residual entering group 0)
    for each group g:
        host: read the prediction the previous program made for group g+1 (one sync), reserve
              slots for its missing rows and start reading them (TensorStore's own threads) into
              a staging buffer -- that read overlaps the compute of group g
        host: wait for group g's staged rows (read while group g-1 computed)
        P_g:  scatter group g's staged rows into the pools (donated), run its layers (a missing
              row is read by a callback from inside the program), predict group g+2's channels;
              the last group ends with the head and the sampling of the next token
When the pools hold every row of the model (a budget that covers the weights) there is nothing
to preload: one program per token (embedding, every layer, head, sampling).

A tied embedding stays resident (it is the head: every token reads all of it); an untied one
stays on flash and each pass reads the rows of its own tokens (one row per decoded token).

Only qkv and gate_up are predicted (their inputs derive from the residual stream); o and down
are loaded on demand and kept by the hot-weight cache. Because every active row is present
before its op runs, the result equals the all-in-DRAM sparse path at any budget.

Without sparsity (`sparsity=None`) the same machinery streams whole layers (each op's active
set is every channel; the next group is preloaded exactly): the "dense layer streaming at the
same budget" baseline, a stronger one than mmap since it caches by frequency and overlaps reads.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from activeflow_jax.aligned import aligned_array
from activeflow_jax.buckets import BUDGET_MIN_ATTN_LEN
from activeflow_jax.config import OP_GROUPS, PREDICTED_GROUPS, TENSOR_OF_OP, ModelConfig, SparsityConfig, op_input_dims
from activeflow_jax.errors import StoreError
from activeflow_jax.models import llama
from activeflow_jax.quant import is_quantized
from activeflow_jax.runtime import heap, iostats, pooled
from activeflow_jax.runtime.budget import (DEFAULT_PRELOAD_SUPERSET, MemoryPlan, current_rss, held_dtype,
                                           op_output_dims, scope_in_words)
from activeflow_jax.runtime.pool import SlotPool
from activeflow_jax.sparse import native as native_lib
from activeflow_jax.store.bundles import BundleReader
from activeflow_jax.store.reader import StoreReader

# Layers per prefill program. One program over every layer (as until stop 31) took XLA 15 s and
# ~590 MB of transient memory to compile for the default model (RSS 467 -> 1,054 MB), most of a
# budget engine's peak; programs of a few layers compile in about a second each, serve every
# group of their shape (the layer index is traced), and cost a dispatch per group per prompt chunk.
# One layer per program (bench/prefill.py, q8, 60%, two runs alternating with 4 and 2): load and
# first token 12.2 / 12.3 s -> 7.9 / 7.2 s, peak RSS 558 / 539 -> 494 / 505 MB, cold prefill tok/s
# 63.5-64.8 against 53.8-66.4 (the spread of the machine); Gemma 3's growth 489 -> 435 MB.
PREFILL_LAYERS = 1

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


class _CompileClock:
    """Seconds JAX spent compiling (its monitoring events), so that the stage programs' first-use
    compiles can be kept out of throughput figures like the engine's own programs are."""

    seconds = 0.0
    programs = 0
    _registered = False

    @classmethod
    def ensure_registered(cls) -> None:
        if not cls._registered:
            jax.monitoring.register_event_duration_secs_listener(cls._on_event)
            cls._registered = True

    @classmethod
    def _on_event(cls, event: str, duration: float, **_) -> None:
        if event in _COMPILE_EVENTS:
            cls.seconds += duration
            cls.programs += event.endswith("backend_compile_duration")


@dataclasses.dataclass
class SwapStats:
    """Loader counters since load or `reset()` (rows are (layer, channel) weight rows)."""

    tokens: int = 0
    active_rows: int = 0  # rows ops needed
    hit_rows: int = 0  # ... of which were already in DRAM (cache or preload)
    ondemand_rows: int = 0
    ondemand_bytes: int = 0
    ondemand_seconds: float = 0.0  # the compute waited for all of it
    ondemand_extents: int = 0  # contiguous byte ranges the storage read for them
    ondemand_extent_bytes: int = 0  # ... and their bytes (whole chunks: bundles.extents)
    preload_rows_read: int = 0
    preload_bytes: int = 0
    preload_seconds: float = 0.0  # issue -> data in hand, summed over group reads
    preload_wait_seconds: float = 0.0  # of which the compute waited
    preload_extents: int = 0
    preload_extent_bytes: int = 0
    predicted_rows: int = 0  # (layer, channel) pairs predicted for qkv/gate_up
    predicted_used: int = 0  # ... that turned out active
    predictable_active: int = 0  # active qkv/gate_up rows of layers that had a prediction
    device_read_bytes: int = 0  # /proc/self/io read_bytes during forward passes
    prefill_bytes: int = 0  # rows read for prefill chunks (not in the rates above)
    prefill_read_seconds: float = 0.0
    embed_bytes: int = 0  # an untied embedding's rows read for decoded tokens (the compute waits)
    embed_seconds: float = 0.0
    # decode-only orchestration counters (prefill passes are not counted): jitted programs
    # dispatched, blocking device-to-host reads by the host, and the calling thread's CPU time
    dispatches: int = 0
    host_syncs: int = 0
    host_cpu_seconds: float = 0.0
    fills: int = 0  # callbacks from inside the programs for rows the pools lacked (decode)
    fill_seconds: float = 0.0  # the programs' time inside those callbacks, reads (ondemand_seconds) included

    @property
    def dispatches_per_token(self) -> float:
        return self.dispatches / self.tokens if self.tokens else 0.0

    @property
    def host_syncs_per_token(self) -> float:
        return self.host_syncs / self.tokens if self.tokens else 0.0

    @property
    def host_cpu_seconds_per_token(self) -> float:
        return self.host_cpu_seconds / self.tokens if self.tokens else 0.0

    @property
    def bytes_requested(self) -> int:
        return self.ondemand_bytes + self.preload_bytes + self.embed_bytes

    @property
    def hit_rate(self) -> float:
        return self.hit_rows / self.active_rows if self.active_rows else 0.0

    @property
    def preload_precision(self) -> float:
        return self.predicted_used / self.predicted_rows if self.predicted_rows else 0.0

    @property
    def preload_recall(self) -> float:
        return self.predicted_used / self.predictable_active if self.predictable_active else 0.0

    @property
    def io_wait_seconds(self) -> float:
        return self.ondemand_seconds + self.preload_wait_seconds + self.embed_seconds

    @property
    def io_hidden_share(self) -> float:
        """Share of the time spent reading flash during which the compute did not wait."""
        total = self.ondemand_seconds + self.preload_seconds + self.embed_seconds
        return 1.0 - self.io_wait_seconds / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("dispatches_per_token", "host_syncs_per_token", "host_cpu_seconds_per_token",
                     "bytes_requested", "hit_rate", "preload_precision", "preload_recall", "io_wait_seconds",
                     "io_hidden_share"):
            out[name] = getattr(self, name)
        return out



class _Staged:
    """Rows of one layer group being read from flash for one predicted op, and where they go."""

    def __init__(self, op: str, layers: tuple[int, ...], read: np.ndarray, need: np.ndarray, slots: np.ndarray,
                 evicted: np.ndarray, handle):
        self.op, self.layers, self.read, self.need, self.slots, self.evicted = op, layers, read, need, slots, evicted
        self.handle = handle
        self.issued = time.perf_counter()
        self.done_at: float | None = None
        if handle is not None:
            handle.add_done_callback(self._mark_done)

    def _mark_done(self, _future) -> None:
        self.done_at = time.perf_counter()


class SwapRuntime:
    """Resident weights (embedding, norms) + slot pools + loader for one store and memory plan."""

    def __init__(self, store_path: str, cfg: ModelConfig, sparsity: SparsityConfig | None,
                 thresholds: np.ndarray | None, memory: MemoryPlan, *, group_size: int,
                 superset: float = DEFAULT_PRELOAD_SUPERSET,
                 direct_io: bool = False, embed, process: int = 0, native: bool | None = None):
        """embed: the resident embedding of a tied model, already loaded before planning (its size
        is part of the plan): session.resident_embedding, f32 or a quantized table; None for an
        untied model, whose embedding rows are read from flash with their tokens. process: the
        process outside the model (RSS at load plus the compile reserve), reported beside a budget
        that does not cover it. native: the engine's choice of native attention, norms and head
        (None: where usable), which every decode path of an engine must share."""
        self.cfg, self.sparsity, self.memory, self.superset = cfg, sparsity, memory, superset
        self.process = process
        self.store_path = store_path
        self.native = native_lib.usable() if native is None else native
        # the pooled ops select and multiply natively where the all-in-DRAM sparse path does
        self.native_select = (sparsity.kernel == "native") if sparsity is not None else self.native
        self.bundles = BundleReader(store_path, group_size, direct_io=direct_io)
        # TensorStore's direct mode still serves a read of a whole shard file (a dense layer, a
        # prefill union, dense streaming) from the page cache when it is read again (measured: 0
        # device bytes the second time), so under O_DIRECT the layout's pages are also dropped
        # before every pass: what is read is really read (~1 ms per pass for the default model).
        self._layout_files = iostats.files_under(self.bundles.root) if direct_io else None
        if self._layout_files is not None:
            iostats.drop_files(self._layout_files)  # once with fdatasync: a fresh layout may be dirty
        if self.bundles.first_layer != 0:
            raise StoreError(
                f"store {store_path} is laid out for groups of {self.bundles.group_size} from layer "
                f"{self.bundles.first_layer}; run `activeflow relayout --store {store_path} --group-size {group_size}` "
                "(which lays out every layer)")
        self._load_resident(store_path, embed)
        thr = np.zeros((cfg.num_layers, len(OP_GROUPS)), np.float32) if thresholds is None else thresholds
        self._thresholds = jnp.asarray(np.asarray(thr, np.float32).reshape(cfg.num_layers, len(OP_GROUPS)))
        ks = sparsity.ks(cfg) if sparsity is not None else op_input_dims(cfg)
        self._ks = tuple(tuple(ks) if sparsity is not None and sparsity.is_sparse_layer(i) else op_input_dims(cfg)
                         for i in range(cfg.num_layers))
        self._predict_n = tuple(min(cfg.d_model, int(round(superset * self._ks[-1][OP_GROUPS.index(op)])))
                                for op in PREDICTED_GROUPS)
        self.stats = SwapStats()
        self._gain_cache: dict[tuple[int, ...], tuple[jax.Array, ...]] = {}
        self._lock = threading.Lock()  # one pass at a time
        self._host_lock = threading.Lock()  # the host maps: the main thread's reservations vs fill callbacks
        self._host = pooled.register_host(self)
        self._make_pools(memory)
        _CompileClock.ensure_registered()

    # -- setup ---------------------------------------------------------------------------------

    def _load_resident(self, store_path: str, embed) -> None:
        """Every tensor but the four op weights of each layer (and an untied embedding), as the
        nested parameter dict llama.layer_forward / final_logits read."""
        cfg = self.cfg
        reader = StoreReader(store_path)
        streamed = set(TENSOR_OF_OP.values())
        names = [n for n in llama.param_shapes(cfg)
                 if n != "embed" and not (n.startswith("layers.") and n.split(".", 2)[2] in streamed)]
        resident: dict[str, Any] = {"layers": {i: {} for i in range(cfg.num_layers)}}
        self.resident_bytes = 0
        for name in names:
            # one tensor at a time, into aligned buffers that device_put adopts without a copy
            # (a quantized store's untied head stays quantized, as the all-in-DRAM engine holds it)
            value = jax.device_put(reader.read_held(name) if is_quantized(reader.tensor_dtype(name))
                                   else reader.read_aligned(name))
            self.resident_bytes += value.nbytes if hasattr(value, "nbytes") else value.data.nbytes
            node = resident
            *parents, leaf = [int(p) if p.isdigit() else p for p in name.split(".")]
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        if embed is not None:
            resident["embed"] = embed
            self.resident_bytes += embed.nbytes if hasattr(embed, "nbytes") else embed.data.nbytes
        self.resident = resident
        self._embed_reader = None if embed is not None else StoreReader(store_path, direct_io=self.bundles.direct_io)

    def _make_pools(self, memory: MemoryPlan) -> None:
        cfg = self.cfg
        dtype = held_dtype(self.bundles.storage_dtype)  # quantized rows stay quantized in the pools
        self.pools = {g: SlotPool(g, cfg.num_layers, i, o, s, dtype)
                      for g, i, o, s in zip(OP_GROUPS, op_input_dims(cfg), op_output_dims(cfg), memory.pool_slots)}
        self._pool_info = tuple(pooled.PoolInfo(p.in_dim, p.out_dim, p.trash, p.dtype, p.row_width)
                                for p in self.pools.values())
        self._dev_pools = tuple(jnp.zeros((p.slots + 1, p.row_width), p.np_dtype) for p in self.pools.values())
        self._dev_maps = tuple(jnp.full((cfg.num_layers, p.in_dim), -1, jnp.int32) for p in self.pools.values())
        self._zero_freqs()
        self._counters = jnp.zeros(len(pooled.COUNTERS), jnp.int32)
        self._counted = np.zeros(len(pooled.COUNTERS), np.int64)
        # Preloading pays only when the pools cannot hold every row: then a pass is one program
        # per layer group (plus the embedding's), else one program per token.
        groups = self.bundles.layer_groups
        self.resident_mode = all(p.holds_every_row for p in self.pools.values())
        self.groups = [tuple(range(cfg.num_layers))] if self.resident_mode or len(groups) == 1 else groups
        # staging: one group's preloaded rows per predicted op, double-buffered (the program that
        # scatters one buffer may still run while the next group's rows arrive in the other)
        n_layers = max(len(g) for g in groups)
        self._staging = {op: [aligned_array((n * n_layers, self.pools[op].row_width), self.pools[op].np_dtype, zeros=True)
                              for _ in range(2)]
                         for op, n in zip(PREDICTED_GROUPS, self._predict_n)} if not self.resident_mode else {}
        self._staging_rows = {op: n * n_layers for op, n in zip(PREDICTED_GROUPS, self._predict_n)}
        self._staged: dict[int, dict[str, _Staged | None]] = {}
        self._flip = 0

    def complete_pools(self) -> None:
        """Where the pools can hold every row (resident mode), read the rows no pass has needed
        yet, so that no row can be missing any more and the decode programs drop their fill
        branch (one op then costs one selection and one product, as all in DRAM). Once per load
        or budget change; the reads are counted with prefill's."""
        if not self.resident_mode or self._complete():
            return
        with self._host_lock:
            for g, (op, pool) in enumerate(self.pools.items()):
                for layer in range(self.cfg.num_layers):
                    cols = np.flatnonzero(pool.slot_of[layer] < 0)
                    if not len(cols):
                        continue
                    t0 = time.perf_counter()
                    rows = self.bundles.read_layer(op, layer, cols)
                    self.stats.prefill_bytes += len(cols) * self._stored_row_bytes(op)
                    self.stats.prefill_read_seconds += time.perf_counter() - t0
                    slots, _ = pool.allocate(len(cols), layer, np.zeros(0, np.int64), lambda: None)
                    pool.assign(np.full(len(cols), layer, np.int32), cols, slots)
                    pools, maps = list(self._dev_pools), list(self._dev_maps)
                    pools[g], maps[g] = pooled.install(pools[g], maps[g], rows, slots,
                                                       (layer * pool.in_dim + cols).astype(np.int32), slots)
                    self._dev_pools, self._dev_maps = tuple(pools), tuple(maps)

    def _complete(self) -> bool:
        """Whether the pools hold every row of the model (then no row can be missing)."""
        return all(p.resident_rows == p.map_size for p in self.pools.values())

    def _zero_freqs(self) -> None:
        self._dev_freqs = tuple(jnp.zeros((self.cfg.num_layers, p.in_dim), jnp.int32) for p in self.pools.values())

    def replan(self, memory: MemoryPlan) -> None:
        """New pool sizes (runtime budget change): the old buffers are freed first."""
        with self._lock:
            self._release()
            self.memory = memory
            self._make_pools(memory)

    def _release(self) -> None:
        for array in (*getattr(self, "_dev_pools", ()), *getattr(self, "_dev_maps", ()),
                      *getattr(self, "_dev_freqs", ())):
            try:
                array.delete()
            except Exception:
                pass
        self._dev_pools = self._dev_maps = self._dev_freqs = ()
        self._staged = {}

    def memory_breakdown(self) -> dict[str, Any]:
        pools = {g: p.nbytes for g, p in self.pools.items()}
        return {"budget": self.memory.budget, "resident": self.resident_bytes, "kv": self.memory.kv,
                "kv_tokens": self.memory.kv_tokens, "staging": self.memory.staging, "pools": pools,
                "cache_rows_resident": {g: p.resident_rows for g, p in self.pools.items()},
                "total": self.resident_bytes + self.memory.kv + self.memory.staging + sum(pools.values()),
                **self.process_accounting()}

    def process_accounting(self) -> dict[str, Any]:
        """Whether the budget covers the whole process, the process outside the model and the RSS now."""
        covers = self.memory.baseline > 0
        process = self.memory.baseline if covers else self.process
        rss = current_rss()
        return {"budget_covers_process": covers, "process_baseline": process, "process_rss": rss,
                "scope": scope_in_words(covers, process, rss)}

    def close(self) -> None:
        self._release()

    def reset_stats(self) -> None:
        self.stats = SwapStats()

    def new_sequence(self) -> None:
        """A new sequence: the LFU counts of the hot-weight cache restart (rows stay)."""
        with self._lock:
            for pool in self.pools.values():
                pool.new_sequence()
            self._zero_freqs()

    @staticmethod
    def compile_clock() -> tuple[float, int]:
        """(seconds, programs) compiled by JAX so far in this process."""
        return _CompileClock.seconds, _CompileClock.programs

    # -- passes --------------------------------------------------------------------------------

    @staticmethod
    def attention_length(attn_len: int, cache: llama.KVCache) -> int:
        """The attention length the programs are compiled for: the engine's bucket, but at least
        buckets.BUDGET_MIN_ATTN_LEN (or the whole cache, if shorter). Every distinct length is
        another set of programs, each of which the process keeps (~4-16 MB apiece for the default
        model), and a budget that covers the process must hold them all: with the engine's buckets
        (128, 256, 512) and cache lengths (256, 512) a session compiled a set per pair; with these,
        for kv_tokens <= 512, one set of decode programs and, per prompt-chunk length, one layer
        program per layer kind plus the small embedding and head programs. Attending over masked
        positions costs little next to the weights (~1 ms per token at 512 for SmolLM2)."""
        return min(cache.max_len, max(attn_len, BUDGET_MIN_ATTN_LEN))

    def forward(self, cache: llama.KVCache, tokens: np.ndarray, start_pos: int, n_valid: int, attn_len: int,
                all_logits: bool):
        """Same contract as `llama.forward`: (logits, new cache)."""
        head = "all_logits" if all_logits else "logits"
        attn_len = self.attention_length(attn_len, cache)
        with self._pass(decode=tokens.shape[0] == 1):
            out, cache = self._run(cache, tokens, start_pos, n_valid, attn_len, head, None)
            if tokens.shape[0] > 1:
                self.complete_pools()  # after a prompt: the rest of the model, where it fits
        return out["logits"], cache

    def decode_and_sample(self, cache: llama.KVCache, token: np.ndarray, pos: int, attn_len: int, key, temperature,
                          top_p) -> tuple[int, jax.Array, llama.KVCache]:
        """One decoded token and the choice of the next, the sampling inside the last program:
        (next token, next key, cache)."""
        attn_len = self.attention_length(attn_len, cache)
        with self._pass(decode=True):
            out, cache = self._run(cache, token, pos, 1, attn_len, "sample", (key, temperature, top_p))
            next_token = self._to_host(out["token"])  # the one sync every token needs
        return int(next_token), out["key"], cache

    class _PassScope:
        def __init__(self, runtime: "SwapRuntime", decode: bool):
            self.rt, self.decode = runtime, decode

        def __enter__(self):
            rt = self.rt
            rt._lock.acquire()
            self.read0 = iostats.process_read_bytes() or 0
            self.compiled = _CompileClock.programs
            self.dispatches0, self.syncs0, self.cpu0 = pooled.DispatchCounter.calls, rt._syncs, time.thread_time()
            for pool in rt.pools.values():
                pool.new_pass()
            if rt._layout_files is not None:
                iostats.drop_files(rt._layout_files, sync=False)  # read-only while loaded
            rt._decoding = self.decode
            return self

        def __exit__(self, *exc):
            rt = self.rt
            try:
                st = rt.stats
                if self.decode:
                    st.tokens += 1
                    st.dispatches += pooled.DispatchCounter.calls - self.dispatches0
                    st.host_syncs += rt._syncs - self.syncs0
                    st.host_cpu_seconds += time.thread_time() - self.cpu0
                rt._staged = {}  # an interrupted pass must not leave reads for the next one
                if exc[0] is None:
                    rt._collect_counters(self.decode)
                else:
                    # The pass stopped between programs or inside one: donated buffers may be gone
                    # and reservations never reached the device. Start from empty pools (the cache
                    # refills from flash) and raise what a callback raised, not XLA's wrapper of it.
                    error, rt._callback_error = rt._callback_error, None
                    rt._release()
                    rt._make_pools(rt.memory)
                    if error is not None:
                        raise error from None
                st.device_read_bytes += (iostats.process_read_bytes() or 0) - self.read0
                if _CompileClock.programs != self.compiled:
                    heap.trim()
            finally:
                rt._lock.release()

    _syncs = 0
    _decoding = False
    _callback_error: BaseException | None = None

    def _pass(self, decode: bool) -> "_PassScope":
        return SwapRuntime._PassScope(self, decode)

    def _to_host(self, array) -> np.ndarray:
        """A device array on the host: the host waits for the program computing it (one sync)."""
        self._syncs += 1
        return np.asarray(array)

    def _collect_counters(self, decode: bool) -> None:
        """The device's counters (the pass's programs have finished: a copy, not a wait)."""
        now = np.asarray(self._counters).astype(np.int64)
        delta, self._counted = now - self._counted, now
        if not decode:
            return
        st = self.stats
        st.active_rows += int(delta[pooled._ACTIVE])
        st.hit_rows += int(delta[pooled._ACTIVE] - delta[pooled._MISSED])
        st.predictable_active += int(delta[pooled._PREDICTABLE])
        st.predicted_used += int(delta[pooled._USED])
        st.fills += int(delta[pooled._FILLS])

    def _plan(self, layers, tokens: int, attn_len: int, embed: str, head: str, install: bool,
              predict: tuple[int, ...], count_predicted: bool) -> pooled.Plan:
        return pooled.Plan(cfg=self.cfg, kinds=tuple(pooled.kind_layer(self.cfg, i) for i in layers),
                           ks=tuple(self._ks[i] for i in layers),
                           policy=self.sparsity.policy if self.sparsity is not None else "topk", native=self.native,
                           native_select=self.native_select, attn_len=attn_len, tokens=tokens, embed=embed, head=head,
                           install=install, predict=bool(predict), predict_n=self._predict_n,
                           count_predicted=count_predicted, pools=self._pool_info,
                           fills=not (tokens == 1 and self._complete()))

    def _call(self, plan: pooled.Plan, layers, ks, vs, x_in, pos, n_valid, install, predicted, predict, sample):
        pooled.DispatchCounter.calls += 1
        layers = tuple(layers)
        r = self.resident
        head = {name: r[name] for name in ("embed", "final_norm", "lm_head") if name in r}
        (self._dev_pools, self._dev_maps, self._dev_freqs, kc, vc, self._counters, out) = pooled.run(
            np.int32(self._host), head, tuple(r["layers"][i] for i in layers), np.asarray(layers, np.int32), self._dev_pools,
            self._dev_maps, self._dev_freqs, tuple(ks[i] for i in layers), tuple(vs[i] for i in layers),
            self._counters, x_in, pos, n_valid, self._thresholds, install, predicted,
            self._gains(predict) if predict else None, sample, plan=plan)
        for j, layer in enumerate(layers):
            ks[layer], vs[layer] = kc[j], vc[j]
        return out

    def _run(self, cache: llama.KVCache, tokens: np.ndarray, start_pos: int, n_valid: int, attn_len: int,
             head: str, sample):
        t = tokens.shape[0]
        decode = t == 1
        ks, vs = list(cache.k), list(cache.v)
        pos, n_valid_a = jnp.int32(start_pos), jnp.int32(n_valid)
        if self._embed_reader is None:
            x_in, embed = jnp.asarray(tokens, jnp.int32), "lookup"
        else:  # untied: this pass's rows from flash
            x_in, embed = self._embed_rows(tokens, decode), "rows"
        if not decode:
            # A prompt chunk, no preloading: the embedding, the layers in programs of PREFILL_LAYERS,
            # the head, each its own program, so that a chunk length compiles one layer program
            # per layer kind (plus two small ones) rather than three (first, middle, last layer):
            # compiled programs stay in the process (see attention_length).
            n = self.cfg.num_layers
            chunks = [tuple(range(i, min(n, i + PREFILL_LAYERS))) for i in range(0, n, PREFILL_LAYERS)]
            out = self._call(self._plan((), t, attn_len, embed, "none", False, (), False), (), ks, vs, x_in, pos,
                             n_valid_a, None, None, (), None)
            for layers in chunks:
                plan = self._plan(layers, t, attn_len, "none", "none", False, (), False)
                out = self._call(plan, layers, ks, vs, out["x"], pos, n_valid_a, None, None, (), None)
            out = self._call(self._plan((), t, attn_len, "none", head, False, (), False), (), ks, vs, out["x"], pos,
                             n_valid_a, None, None, (), sample)
            return out, llama.KVCache(tuple(ks), tuple(vs))
        groups = self.groups
        if len(groups) == 1:
            plan = self._plan(groups[0], t, attn_len, embed, head, False, (), False)
            out = self._call(plan, groups[0], ks, vs, x_in, pos, n_valid_a, None, None, (), sample)
            return out, llama.KVCache(tuple(ks), tuple(vs))
        # P_embed: the embedding and the prediction for group 1
        plan = self._plan((), 1, attn_len, embed, "none", False, groups[1], False)
        out = self._call(plan, (), ks, vs, x_in, pos, n_valid_a, None, None, groups[1], None)
        x, predictions = out["x"], {1: out["predicted"]}
        for g, layers in enumerate(groups):
            install = self._install(g) if g > 0 else None  # waits for group g's reads
            last = g + 1 == len(groups)
            predict = groups[g + 2] if g + 2 < len(groups) else ()
            if g + 1 < len(groups):
                # Group g+1's reads start before group g's program is dispatched: XLA:CPU runs a
                # program with host callbacks on the dispatching thread, so anything issued after
                # the dispatch would not overlap it (measured: the preload wait was 0.1-0.2 s per
                # token that way). The pools hold two groups' preloads (budget.min_pool_slots).
                freqs = {op: np.array(self._dev_freqs[OP_GROUPS.index(op)]) for op in PREDICTED_GROUPS}
                self._reserve(g + 1, groups[g + 1], self._to_host_tuple(predictions[g + 1]), freqs)
            plan = self._plan(layers, 1, attn_len, "none", head if last else "none", g > 0, predict, g > 0)
            out = self._call(plan, layers, ks, vs, x, pos, n_valid_a, install,
                             predictions.get(g) if g > 0 else None, predict, sample if last else None)
            with self._host_lock:
                for op in PREDICTED_GROUPS:  # the scatter is dispatched: those slots are no longer pending
                    staged = self._staged.get(g, {}).get(op)
                    if staged is not None:
                        self.pools[op].pending[staged.slots] = False
                self._staged.pop(g, None)
            if predict:
                predictions[g + 2] = out["predicted"]
            if not last:
                x = out["x"]
        return out, llama.KVCache(tuple(ks), tuple(vs))

    def _gains(self, layers: tuple[int, ...]) -> tuple[jax.Array, ...]:
        """Per predicted op, the mean |norm weight| of `layers` (the predictor's gain), cached."""
        cached = self._gain_cache.get(layers)
        if cached is None:
            cached = tuple(jnp.mean(jnp.stack([jnp.abs(self.resident["layers"][i][norm]["weight"]) for i in layers]),
                                    axis=0) for norm in ("attn_norm", "mlp_norm"))
            self._gain_cache[layers] = cached
        return cached

    def _to_host_tuple(self, arrays) -> tuple[np.ndarray, ...]:
        self._syncs += 1  # one wait for the program that made them
        return tuple(np.asarray(a) for a in arrays)

    def _embed_rows(self, tokens: np.ndarray, decode: bool) -> jax.Array:
        """[T, d] embedding rows of the tokens, read from the store (each distinct token once)."""
        t0 = time.perf_counter()
        ids, where = np.unique(np.asarray(tokens, np.int64), return_inverse=True)
        rows = self._embed_reader.read_rows("embed", ids)
        read = len(ids) * self._embed_reader.row_bytes("embed")  # the store's bytes (rows arrive widened)
        if decode:
            self.stats.embed_bytes += read
            self.stats.embed_seconds += time.perf_counter() - t0
        else:
            self.stats.prefill_bytes += read
            self.stats.prefill_read_seconds += time.perf_counter() - t0
        return jnp.asarray(rows[where.reshape(-1)])

    # -- cross-layer preloading ----------------------------------------------------------------

    def _reserve(self, group: int, layers: tuple[int, ...], predicted: tuple[np.ndarray, ...],
                 freqs: dict[str, np.ndarray]) -> None:
        """Slots for the predicted rows of `group` that the pools lack, and their reads started.
        Runs while the group before computes (its fill callbacks share the host maps: the lock);
        freqs: LFU counts copied before that program took the device's."""
        with self._host_lock:
            self._reserve_locked(group, layers, predicted, freqs)

    def _reserve_locked(self, group, layers, predicted, freqs) -> None:
        staged: dict[str, _Staged | None] = {}
        self.stats.predicted_rows += sum(len(p) for p in predicted) * len(layers)
        for op, channels in zip(PREDICTED_GROUPS, predicted):
            pool = self.pools[op]
            have = pool.slot_of[list(layers)][:, channels] >= 0  # [n_layers, n]
            read_mask = ~have.all(axis=0)
            if not read_mask.any():
                staged[op] = None
                continue
            read = channels[read_mask]
            need = ~have[:, read_mask].T  # [n_read, n_layers]: rows to install
            rows_at, layer_at = np.nonzero(need)
            slots, evicted = pool.allocate(len(rows_at), layers[0], np.zeros(0, np.int64), lambda op=op: freqs[op])
            layer_ids = np.asarray(layers, np.int32)[layer_at]
            pool.assign(layer_ids, read[rows_at], slots, pin_until=layers[-1])
            pool.pending[slots] = True
            pool.pending_clear[slots] = evicted
            handle = self.bundles.read_group_async(op, group, read)
            extents, extent_bytes = self.bundles.extents(op, group, read)
            self.stats.preload_extents += extents
            self.stats.preload_extent_bytes += extent_bytes
            staged[op] = _Staged(op, layers, read, need, slots, evicted, handle)
        self._staged[group] = staged

    def _install(self, group: int):
        """Group `group`'s staged rows as the program's install arguments (waits for the reads)."""
        st = self.stats
        self._flip ^= 1
        out = []
        for op in PREDICTED_GROUPS:
            pool = self.pools[op]
            size = self._staging_rows[op]
            staging = self._staging[op][self._flip]
            put = np.full(size, pool.trash + 1, np.int32)  # out of range: dropped
            clear_owner = np.full(size, pool.map_size, np.int32)
            clear_slot = np.full(size, -1, np.int32)
            set_flat = np.full(size, pool.map_size, np.int32)
            set_slot = np.full(size, -1, np.int32)
            staged = self._staged.get(group, {}).get(op)
            if staged is not None:
                t0 = time.perf_counter()
                rows = staged.handle.result()  # [n_read, n_layers, row]
                now = time.perf_counter()
                st.preload_wait_seconds += now - t0
                st.preload_seconds += (staged.done_at or now) - staged.issued
                n_read, n_layers = rows.shape[:2]
                st.preload_rows_read += n_read * n_layers
                st.preload_bytes += n_read * n_layers * self._stored_row_bytes(op)
                flat_rows = rows.reshape(n_read * n_layers, -1)
                staging[:len(flat_rows)] = flat_rows  # the one copy between TensorStore's output and the pool
                rows_at, layer_at = np.nonzero(staged.need)
                where = rows_at * n_layers + layer_at
                m = len(where)
                put[where] = staged.slots
                clear_owner[:m] = np.where(staged.evicted >= 0, staged.evicted, pool.map_size)
                clear_slot[:m] = staged.slots
                layer_ids = np.asarray(staged.layers, np.int64)[layer_at]
                set_flat[:m] = layer_ids * pool.in_dim + staged.read[rows_at]
                set_slot[:m] = staged.slots
                with self._host_lock:  # the group before may still run fill callbacks
                    # a pending slot filled early by a callback has cleared its old owner already
                    done = pool.pending_clear[staged.slots] < 0
                    clear_owner[:m][done] = pool.map_size
                    pool.pending_clear[staged.slots] = -1
            out.append((staging, put, clear_owner, clear_slot, set_flat, set_slot))
        return tuple(out)

    def _stored_row_bytes(self, op: str) -> int:
        """Bytes of one row as the store holds it (f16 rows arrive widened to f32)."""
        pool = self.pools[op]
        if pool.quantized:
            return pool.row_width
        return pool.out_dim * (2 if self.bundles.storage_dtype == "float16" else 4)

    # -- callbacks from inside the programs ----------------------------------------------------

    def fill_decode(self, g: int, layer: int, idx: np.ndarray, slots: np.ndarray, count: int, freq):
        """Rows of one decoded token's op that the pool lacks (slots < 0): read from flash and
        given slots. Returns (rows [k, row], put [k], clear_owner [k], clear_slot [k], slots [k],
        set_flat [k]) for pooled._apply_updates."""
        t0 = time.perf_counter()
        try:
            with self._host_lock:
                return self._fill_decode_locked(g, layer, idx, slots, count, freq)
        except Exception as exc:  # surfaces from the program as XLA's error: the pass re-raises this
            self._callback_error = exc
            raise
        finally:
            if self._decoding:
                self.stats.fill_seconds += time.perf_counter() - t0

    def _fill_decode_locked(self, g, layer, idx, slots, count, freq):
        op = OP_GROUPS[g]
        pool = self.pools[op]
        k = len(idx)
        rows = np.zeros((k, pool.row_width), pool.np_dtype)
        put = np.full(k, pool.trash + 1, np.int32)
        clear_owner = np.full(k, pool.map_size, np.int32)
        clear_slot = np.full(k, -1, np.int32)
        set_flat = np.full(k, pool.map_size, np.int32)
        new_slots = slots.astype(np.int32).copy()
        positions = np.flatnonzero(slots[:count] < 0)
        channels = idx[positions]
        host = pool.slot_of[layer, channels]
        # a row the host placed and the device already holds (no read), one whose preload is
        # still pending (read now, written into its reserved slot), or one with no slot yet
        present = (host >= 0) & ~pool.pending[np.maximum(host, 0)]
        early = (host >= 0) & ~present
        absent = host < 0
        read_pos = positions[early | absent]
        new_slots[positions[present]] = host[present]
        if absent.any():
            protect = np.concatenate([slots[:count][slots[:count] >= 0], host[present]])
            fresh, evicted = pool.allocate(int(absent.sum()), layer, protect, lambda: np.asarray(freq))
            pool.assign(np.full(len(fresh), layer, np.int32), channels[absent], fresh)
            new_slots[positions[absent]] = fresh
            clear_owner[positions[absent]] = np.where(evicted >= 0, evicted, pool.map_size)
            clear_slot[positions[absent]] = fresh
        if early.any():
            reserved = host[early]
            old = pool.pending_clear[reserved]
            new_slots[positions[early]] = reserved
            clear_owner[positions[early]] = np.where(old >= 0, old, pool.map_size)
            clear_slot[positions[early]] = reserved
            pool.pending_clear[reserved] = -1
        set_flat[positions] = layer * pool.in_dim + channels
        if len(read_pos):
            want = idx[read_pos]  # ascending: positions are
            t0 = time.perf_counter()
            data = self.bundles.read_layer(op, layer, want)
            rows[read_pos] = data
            put[read_pos] = new_slots[read_pos]
            st = self.stats
            if self._decoding:
                st.ondemand_seconds += time.perf_counter() - t0
                st.ondemand_rows += len(want)
                st.ondemand_bytes += len(want) * self._stored_row_bytes(op)
                extents, extent_bytes = self.bundles.extents(op, self.bundles.group_of(layer)[0], want)
                st.ondemand_extents += extents
                st.ondemand_extent_bytes += extent_bytes
        return rows, put, clear_owner, clear_slot, new_slots, set_flat

    def fill_prefill(self, g: int, layer: int, union: np.ndarray):
        try:
            return self._fill_prefill(g, layer, union)
        except Exception as exc:  # see fill_decode
            self._callback_error = exc
            raise

    def _fill_prefill(self, g: int, layer: int, union: np.ndarray):
        """One op's weight for a prefill chunk: the rows of `union` the device pool lacks, read from
        flash (the program takes the others from the pool), zero elsewhere -- the all-in-DRAM
        masked product's own weight; the rows read are also given free slots (no eviction: a
        prompt's rows carry no decode frequency yet). Returns (w [in, row], put, clear_owner,
        clear_slot, set_flat, set_slot), each [in], for pooled._apply_updates."""
        with self._host_lock:
            op = OP_GROUPS[g]
            pool = self.pools[op]
            n = pool.in_dim
            w = np.zeros((n, pool.row_width), pool.np_dtype)
            put = np.full(n, pool.trash + 1, np.int32)
            clear_owner = np.full(n, pool.map_size, np.int32)
            clear_slot = np.full(n, -1, np.int32)
            set_flat = np.full(n, pool.map_size, np.int32)
            set_slot = np.full(n, -1, np.int32)
            host = pool.slot_of[layer]
            present = (host >= 0) & ~pool.pending[np.maximum(host, 0)]
            cols = np.flatnonzero(union & ~present)
            if len(cols):
                t0 = time.perf_counter()
                w[cols] = self.bundles.read_layer(op, layer, cols)
                self.stats.prefill_bytes += len(cols) * self._stored_row_bytes(op)
                self.stats.prefill_read_seconds += time.perf_counter() - t0
                keep = cols[host[cols] < 0][:pool.free_slots]
                if len(keep):
                    slots, _ = pool.allocate(len(keep), layer, np.zeros(0, np.int64), lambda: None)
                    pool.assign(np.full(len(keep), layer, np.int32), keep, slots)
                    put[keep] = slots
                    set_flat[keep] = layer * n + keep
                    set_slot[keep] = slots
            return w, put, clear_owner, clear_slot, set_flat, set_slot
