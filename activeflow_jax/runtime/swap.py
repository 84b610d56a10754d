"""The DRAM-flash swapping runtime: a model runs in a fixed DRAM budget with its weights on flash.

Per decoded token (host orchestration between jitted stages, see stages.py):

    embed -> for each layer group g:
        at its first layer: wait for the rows preloaded for g (started one group earlier) and
        scatter them into the pools; predict the active channels of group g+1 from the
        residual entering g and start reading their missing rows (TensorStore's own threads,
        not inside jitted code) -- that read overlaps the compute of group g
        -> per op: the stage before it selected the exact active channels; rows the pools lack
        are loaded on demand, then the op runs on the pool (fixed-size slot buffer)
    -> head

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

from activeflow_jax.config import OP_GROUPS, PREDICTED_GROUPS, ModelConfig, SparsityConfig, op_input_dims
from activeflow_jax.errors import StoreError
from activeflow_jax.models import llama
from activeflow_jax.runtime import heap, iostats, stages
from activeflow_jax.quant import QRows, is_quantized
from activeflow_jax.runtime.budget import DEFAULT_PRELOAD_SUPERSET, MemoryPlan, held_dtype, op_output_dims
from activeflow_jax.runtime.pool import SlotPool, padded_source
from activeflow_jax.store.reader import StoreReader

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


class _Preload:
    """Rows of one layer group being read from flash for one op group."""

    def __init__(self, group: int, op: str, predicted: np.ndarray, read: np.ndarray, handle):
        self.group, self.op, self.predicted, self.read, self.handle = group, op, predicted, read, handle
        self.issued = time.perf_counter()
        self.done_at: float | None = None
        if handle is not None and hasattr(handle, "add_done_callback"):
            handle.add_done_callback(self._mark_done)

    def _mark_done(self, _future) -> None:
        self.done_at = time.perf_counter()


class SwapRuntime:
    """Resident weights (embedding, norms) + slot pools + loader for one store and memory plan."""

    def __init__(self, store_path: str, cfg: ModelConfig, sparsity: SparsityConfig | None,
                 thresholds: np.ndarray | None, memory: MemoryPlan, *, group_size: int,
                 superset: float = DEFAULT_PRELOAD_SUPERSET,
                 direct_io: bool = False, embed, process: int = 0):
        """embed: the resident embedding of a tied model, already loaded before planning (its size
        is part of the plan): session.resident_embedding, f32 or a Q8 table; None for an untied
        model, whose embedding rows are read from flash with their tokens. process: the process
        outside the model (RSS at load plus the compile reserve), reported beside a budget that
        does not cover it."""
        from activeflow_jax.store.bundles import BundleReader

        self.cfg, self.sparsity, self.memory, self.superset = cfg, sparsity, memory, superset
        self.process = process
        self.store_path = store_path
        from activeflow_jax.sparse import native

        self.native = sparsity.kernel == "native" if sparsity is not None else native.usable()
        # rows an op computes with at once; dense layers (and prefill unions) run in slices of it
        self.slice = dict(zip(OP_GROUPS, sparsity.ks(cfg) if sparsity is not None else op_input_dims(cfg)))
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
        self._thr = [[jnp.float32(thr[i, g]) for g in range(len(OP_GROUPS))] for i in range(cfg.num_layers)]
        self.pools = self._make_pools(memory)
        self._sels = [{op: self._make_sel(i, op) for op in OP_GROUPS} for i in range(cfg.num_layers)]
        self._host_norms = {name: np.abs(np.asarray(a)) for name, a in self.resident.items() if "norm" in name}
        self.stats = SwapStats()
        self._pending: dict[str, _Preload] = {}
        self._preloaded: dict[tuple[str, int], np.ndarray] = {}  # (op, layer) -> predicted channel mask
        self._lock = threading.Lock()
        self._syncs = 0  # blocking device-to-host reads (see _to_host)
        _CompileClock.ensure_registered()

    # -- setup ---------------------------------------------------------------------------------

    def _load_resident(self, store_path: str, embed) -> None:
        cfg = self.cfg
        reader = StoreReader(store_path)
        names = ["final_norm.weight"] + ([] if cfg.tie_embeddings else ["lm_head"])
        names += [f"layers.{i}.{n}.weight" for i in range(cfg.num_layers) for n in ("attn_norm", "mlp_norm")]
        # one tensor at a time, into aligned buffers that device_put adopts without a copy
        # (a quantized store's untied head stays quantized, as the all-in-DRAM engine holds it)
        self.resident = {name: jax.device_put(reader.read_held(name) if is_quantized(reader.tensor_dtype(name))
                                              else reader.read_aligned(name)) for name in names}
        if embed is not None:
            self.resident["embed"] = embed
        self.resident_bytes = sum(a.nbytes for a in self.resident.values())
        self._embed_reader = None if embed is not None else StoreReader(store_path, direct_io=self.bundles.direct_io)

    def _make_pools(self, memory: MemoryPlan) -> dict[str, SlotPool]:
        dtype = held_dtype(self.bundles.storage_dtype)  # quantized rows stay quantized in the pools
        return {g: SlotPool(g, self.cfg.num_layers, i, o, s, dtype)
                for g, i, o, s in zip(OP_GROUPS, op_input_dims(self.cfg), op_output_dims(self.cfg), memory.pool_slots)}

    def replan(self, memory: MemoryPlan) -> None:
        """New pool sizes (runtime budget change): the old buffers are freed first."""
        with self._lock:
            for pool in self.pools.values():
                pool.release()
            self.pools = {}
            self._pending.clear()
            self._preloaded.clear()
            self.memory = memory
            self.pools = self._make_pools(memory)

    def memory_breakdown(self) -> dict[str, Any]:
        pools = {g: p.nbytes for g, p in self.pools.items()}
        return {"budget": self.memory.budget, "resident": self.resident_bytes, "kv": self.memory.kv,
                "kv_tokens": self.memory.kv_tokens, "staging": self.memory.staging, "pools": pools,
                "cache_rows_resident": {g: p.resident_rows for g, p in self.pools.items()},
                "total": self.resident_bytes + self.memory.kv + self.memory.staging + sum(pools.values()),
                **self.process_accounting()}

    def process_accounting(self) -> dict[str, Any]:
        """Whether the budget covers the whole process, the process outside the model and the RSS now."""
        from activeflow_jax.runtime.budget import current_rss, scope_in_words

        covers = self.memory.baseline > 0
        process = self.memory.baseline if covers else self.process
        rss = current_rss()
        return {"budget_covers_process": covers, "process_baseline": process, "process_rss": rss,
                "scope": scope_in_words(covers, process, rss)}

    def close(self) -> None:
        for pool in self.pools.values():
            pool.release()
        self.pools = {}

    def reset_stats(self) -> None:
        self.stats = SwapStats()

    def new_sequence(self) -> None:
        for pool in self.pools.values():
            pool.reset_counters()

    # -- the forward pass ----------------------------------------------------------------------

    def _sel(self, layer: int, op: str) -> stages.Select | None:
        return self._sels[layer][op]

    def _make_sel(self, layer: int, op: str) -> stages.Select | None:
        sp = self.sparsity
        if sp is None or not sp.is_sparse_layer(layer):
            return None
        return stages.Select(sp.ks(self.cfg)[OP_GROUPS.index(op)], sp.policy)

    def _norm(self, layer: int, which: str):
        return self.resident[f"layers.{layer}.{which}.weight"]

    @staticmethod
    def compile_clock() -> tuple[float, int]:
        """(seconds, programs) compiled by JAX so far in this process."""
        return _CompileClock.seconds, _CompileClock.programs

    def forward(self, cache: llama.KVCache, tokens: np.ndarray, start_pos: int, n_valid: int, attn_len: int,
                all_logits: bool):
        """Same contract as `llama.forward`: (logits, new cache)."""
        with self._lock:
            read0 = iostats.process_read_bytes() or 0
            for pool in self.pools.values():
                pool.pin_until[:] = -1  # pins live within one pass (they name layers of this pass)
            compiled = _CompileClock.programs
            if self._layout_files is not None:
                iostats.drop_files(self._layout_files, sync=False)  # read-only while loaded
            decode = tokens.shape[0] == 1
            dispatches0, syncs0, cpu0 = stages.DispatchCounter.calls, self._syncs, time.thread_time()
            try:
                return self._forward(cache, tokens, start_pos, n_valid, attn_len, all_logits)
            finally:
                if decode:
                    self.stats.dispatches += stages.DispatchCounter.calls - dispatches0
                    self.stats.host_syncs += self._syncs - syncs0
                    self.stats.host_cpu_seconds += time.thread_time() - cpu0
                self._pending.clear()  # an interrupted pass must not leave reads for the next one
                self.stats.device_read_bytes += (iostats.process_read_bytes() or 0) - read0
                if _CompileClock.programs != compiled:
                    heap.trim()

    def _forward(self, cache, tokens, start_pos, n_valid, attn_len, all_logits):
        cfg, eps, r = self.cfg, self.cfg.norm_eps, self.resident
        t = tokens.shape[0]
        decode = t == 1
        tok = jnp.asarray(tokens, jnp.int32)
        start_pos, n_valid_a = jnp.int32(start_pos), jnp.int32(n_valid)
        q = OP_GROUPS.index
        embed = r.get("embed")
        if embed is None:  # untied: this pass's rows from flash, looked up by position
            embed, tok = self._embed_rows(tokens, decode), jnp.arange(t, dtype=jnp.int32)
        x, hm, union = stages.start(embed, tok, self._norm(0, "attn_norm"), self._thr[0][q("qkv")], n_valid_a,
                                    eps=eps, sel=self._sel(0, "qkv"), native=self.native)
        ks, vs = list(cache.k), list(cache.v)
        logits = None
        for layer in range(cfg.num_layers):
            if decode:
                group, position = self.bundles.group_of(layer)
                if position == 0:
                    self._begin_group(group, x)
            # Each weight source is built inside the call that uses it, so no name keeps the previous
            # op's transient assembled weight (up to a whole [in, out] matrix) alive next to it.
            hm, union, ks[layer], vs[layer] = stages.qkv_stage(
                hm, self._source(layer, "qkv", union, hm, t), ks[layer], vs[layer], start_pos,
                self._thr[layer][q("o")], n_valid_a, cfg=cfg, sel=self._sel(layer, "o"), native=self.native,
                attn_len=attn_len)
            x, hm, union = stages.o_stage(x, hm, self._source(layer, "o", union, hm, t), self._norm(layer, "mlp_norm"),
                                          self._thr[layer][q("gate_up")], n_valid_a, eps=eps,
                                          sel=self._sel(layer, "gate_up"), native=self.native)
            hm, union = stages.gate_up_stage(hm, self._source(layer, "gate_up", union, hm, t),
                                             self._thr[layer][q("down")], n_valid_a, sel=self._sel(layer, "down"),
                                             native=self.native)
            if layer + 1 < cfg.num_layers:
                x, hm, union = stages.down_stage(x, hm, self._source(layer, "down", union, hm, t),
                                                 self._norm(layer + 1, "attn_norm"), self._thr[layer + 1][q("qkv")],
                                                 n_valid_a, eps=eps, sel=self._sel(layer + 1, "qkv"),
                                                 native=self.native)
            else:
                logits = stages.last_stage(x, hm, self._source(layer, "down", union, hm, t), r["final_norm.weight"],
                                           r.get("embed"), r.get("lm_head"), n_valid_a, eps=eps, native=self.native,
                                           all_logits=all_logits)
        if decode:
            self.stats.tokens += 1
        return logits, llama.KVCache(tuple(ks), tuple(vs))

    def _to_host(self, array) -> np.ndarray:
        """A device array on the host: the host waits for the program computing it (one sync)."""
        self._syncs += 1
        return np.asarray(array)

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

    def _source(self, layer: int, op: str, union, hm, t: int) -> dict:
        """The op's weight source with every active row in DRAM. A decoded token's sparse op has
        at most k active rows, multiplied straight from the pool. A prefill chunk's union (or a
        dense layer's all rows) can exceed what the pool may hold at once: it passes through the
        pool in slices of k rows into a transient [in, out] weight (see stages.py)."""
        pool = self.pools[op]
        cols = np.flatnonzero(self._to_host(union)).astype(np.int32)
        k = self.slice[op]
        decode = t == 1
        if decode and self._sel(layer, op) is not None and self.native:
            return padded_source(pool, cols, self._ensure(pool, op, layer, cols, decode), k)
        w = stages.empty_weight(shape=(pool.in_dim, pool.row_width), dtype=pool.buffer.dtype.name)
        for begin in range(0, len(cols), k):
            part = cols[begin:begin + k]
            src = padded_source(pool, part, self._ensure(pool, op, layer, part, decode), k, pad_col=pool.in_dim)
            w = stages.assemble_rows(w, pool.held(), src["cols"], src["slots"])
        return {"w": QRows(w, pool.dtype, pool.out_dim) if pool.quantized else w}

    def _ensure(self, pool: SlotPool, op: str, layer: int, cols: np.ndarray, decode: bool) -> np.ndarray:
        """Slots of (layer, cols), loading the rows the pool lacks from flash now (on demand).
        Rates count decode only; prefill reads are counted apart."""
        slots = pool.lookup(layer, cols)
        missing = slots < 0
        st = self.stats
        if decode:
            st.active_rows += len(cols)
            st.hit_rows += int(len(cols) - missing.sum())
            predicted = self._preloaded.pop((op, layer), None)
            if predicted is not None:
                st.predictable_active += len(cols)
                st.predicted_used += int(predicted[cols].sum())
        if missing.any():
            want = cols[missing]
            t0 = time.perf_counter()
            rows = self.bundles.read_layer(op, layer, want)
            if decode:
                st.ondemand_seconds += time.perf_counter() - t0
                st.ondemand_rows += len(want)
                st.ondemand_bytes += rows.nbytes
                extents, extent_bytes = self.bundles.extents(op, self.bundles.group_of(layer)[0], want)
                st.ondemand_extents += extents
                st.ondemand_extent_bytes += extent_bytes
            else:
                st.prefill_bytes += rows.nbytes
                st.prefill_read_seconds += time.perf_counter() - t0
            slots = slots.copy()
            slots[missing] = pool.install(np.full(len(want), layer, np.int32), want, rows, current_layer=layer,
                                          protect=slots[~missing])
        pool.touch(layer, cols)
        return slots

    # -- cross-layer preloading ----------------------------------------------------------------

    def _begin_group(self, group: int, x) -> None:
        """At the first layer of `group`: install its preloaded rows, start reading group+1's."""
        layers = self.bundles.layer_groups[group]
        for op in PREDICTED_GROUPS:
            pre = self._pending.pop(op, None)
            if pre is not None and pre.group == group:
                self._install_preload(pre, layers)
        if group + 1 >= len(self.bundles.layer_groups):
            return
        nxt = self.bundles.layer_groups[group + 1]
        residual = np.abs(self._to_host(x)[-1])
        for op in PREDICTED_GROUPS:
            channels = self._predict(op, nxt, residual)
            pool = self.pools[op]
            have = pool.slot_of[list(nxt)][:, channels] >= 0  # [n_layers, n]
            read = channels[~have.all(axis=0)]
            handle = self.bundles.read_group_async(op, group + 1, read) if len(read) else None
            if handle is not None:
                extents, extent_bytes = self.bundles.extents(op, group + 1, read)
                self.stats.preload_extents += extents
                self.stats.preload_extent_bytes += extent_bytes
            self._pending[op] = _Preload(group + 1, op, channels, read, handle)

    def _predict(self, op: str, layers: tuple[int, ...], residual: np.ndarray) -> np.ndarray:
        """Channels of `op` predicted active in `layers`: the top (superset x k) of |residual| x the
        layers' mean norm gain (the op's input is the normed residual); sorted."""
        dim = self.pools[op].in_dim
        sel = self._sel(layers[0], op)
        if sel is None:
            return np.arange(dim, dtype=np.int32)
        which = "attn_norm" if op == "qkv" else "mlp_norm"
        gain = np.mean([self._host_norms[f"layers.{i}.{which}.weight"] for i in layers], axis=0)
        n = min(dim, int(round(self.superset * sel.k)))
        top = np.argpartition(-(residual * gain), n - 1)[:n] if n < dim else np.arange(dim)
        return np.sort(top).astype(np.int32)

    def _install_preload(self, pre: _Preload, layers: tuple[int, ...]) -> None:
        st = self.stats
        pool = self.pools[pre.op]
        last = layers[-1]
        if pre.handle is not None:
            t0 = time.perf_counter()
            rows = pre.handle.result()  # [n_read, n_layers, out]
            now = time.perf_counter()
            st.preload_wait_seconds += now - t0
            st.preload_seconds += (pre.done_at or now) - pre.issued
            st.preload_rows_read += rows.shape[0] * rows.shape[1]
            st.preload_bytes += rows.nbytes
            for position, layer in enumerate(layers):
                slots = pool.slot_of[layer, pre.read]
                need = slots < 0
                if need.any():
                    pool.install(np.full(int(need.sum()), layer, np.int32), pre.read[need], rows[:, position],
                                 current_layer=layers[0], protect=np.zeros(0, np.int64), pin_until=last,
                                 take=np.flatnonzero(need))
        predicted = np.zeros(pool.in_dim, bool)  # one mask for the group: read-only below
        predicted[pre.predicted] = True
        for layer in layers:
            slots = pool.slot_of[layer, pre.predicted]
            pool.pin_until[slots[slots >= 0]] = last  # predicted rows stay until their layer ran
            self._preloaded[(pre.op, layer)] = predicted
            st.predicted_rows += len(pre.predicted)

