"""The DRAM-budget runtime's compiled programs: the model's own layers (models/llama.layer_forward)
with every linear op multiplied from a slot pool instead of a resident weight.

Device state, per op group (OP_GROUPS): a pool [slots + 1, row] of weight rows (f32, or quantized
rows as stored; the last row stays all-zero for padding), the channel-to-slot map [L, in] int32
(-1: not in DRAM) and the LFU counters [L, in] int32 of the hot-weight cache; all donated from
program to program, so they are updated in place.

One decoded token's op, inside the program (`PooledOps`):
    select the active channels (the same rule and ties as the all-in-DRAM kernels), look up their
    slots in the map, count them in the LFU counters; if any row is missing, one host callback
    (`jax.experimental.io_callback`, under `lax.cond`, so it costs nothing when every row is
    present) reads the missing rows from flash and picks their slots; the program scatters them
    into the pool and the map; then the gather-matvec multiplies straight from the pool.
Mispredicted rows are loaded from inside the program rather than at a sync per group: the
program needs them before the op can run, and a group-level sync would have to rerun the group
once the rows arrive (measured in the closing note of issue 23). The host never sees per-op
channel lists unless a row is missing.

A prefill chunk (T > 1) needs the union of its tokens' active rows, up to every row: the
callback returns the op's weight with the union's rows filled and the others zero, and the
product is the all-in-DRAM path's own masked product (bit for bit the same function).

Preloading: a group program may start by scattering staged rows (read by the host while the
previous group computed) into the pools and maps, and may end by predicting the channels of a
later group from the residual (the host reads that prediction: one sync per group).
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from activeflow_jax.config import OP_GROUPS, PREDICTED_GROUPS, ModelConfig
from activeflow_jax.models import llama
from activeflow_jax.quant import QRows, take_rows
from activeflow_jax.quant import matmul as quant_matmul
from activeflow_jax.sampling import sample_token
from activeflow_jax.sparse import kernels
from activeflow_jax.sparse import native as native_lib

# counters accumulated on the device (as int32; read once per pass):
COUNTERS = ("active_rows", "missed_rows", "predictable_active", "predicted_used", "fills")
_ACTIVE, _MISSED, _PREDICTABLE, _USED, _FILLS = range(len(COUNTERS))

_HOSTS: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()  # host id -> runtime


_next_host = iter(range(1, 2**31))


def register_host(runtime) -> int:
    """An id under which the programs' callbacks find `runtime` (its fill methods)."""
    host = next(_next_host)
    _HOSTS[host] = runtime
    return host


class PoolInfo(NamedTuple):
    """Static facts of one op group's pool."""

    in_dim: int
    out_dim: int
    trash: int  # index of the all-zero padding row (= slots)
    dtype: str  # float32, or the store's quantized dtype
    row_width: int  # elements of one held row


class Plan(NamedTuple):
    """Everything static about one compiled program (hashable: the jit cache key). The layers a
    program runs are arguments, not part of the plan: layer groups of the same shape share one
    compiled program (a model of 30 layers in groups of 4 compiles a handful, not 8+)."""

    cfg: ModelConfig
    kinds: tuple[int, ...]  # per layer run: a representative layer of its kind (kind_layer)
    ks: tuple[tuple[int, ...], ...]  # per layer run: channels per op group (in_dim = all)
    policy: str  # "topk" or "threshold"
    native: bool  # native attention, norms, dense products and head (engine's choice)
    native_select: bool  # native selection + gather-matvec for the pooled ops
    attn_len: int
    tokens: int
    embed: str  # "lookup" (tokens in), "rows" (embedding rows in), "none" (residual in)
    head: str  # "none", "logits", "all_logits" or "sample"
    install: bool  # scatter staged rows into the predicted ops' pools first
    predict: bool  # predict a later group's channels at the end (its norm gains are an argument)
    predict_n: tuple[int, ...]  # channels predicted per predicted op
    count_predicted: bool  # `predicted` holds this group's prediction: count its recall
    fills: bool  # rows may be missing (False once the pools hold every row: no callback to guard)
    pools: tuple[PoolInfo, ...]


def kind_layer(cfg: ModelConfig, layer: int) -> int:
    """The first layer of `layer`'s kind (sliding or global attention, RoPE base): what the
    decoder's static choices depend on, so layers of one kind share compiled code."""
    key = (cfg.is_local_layer(layer), cfg.layer_rope_theta(layer))
    return next(i for i in range(cfg.num_layers) if (cfg.is_local_layer(i), cfg.layer_rope_theta(i)) == key)


def _held(pool: jax.Array, info: PoolInfo):
    return QRows(pool, info.dtype, info.out_dim) if info.dtype != "float32" else pool


class _State:
    """The device state threaded through one trace (pools, maps, LFU counters, counters)."""

    def __init__(self, pools, maps, freqs, counters):
        self.pools, self.maps, self.freqs = list(pools), list(maps), list(freqs)
        self._counters = counters
        self._terms: list[list] = [[] for _ in COUNTERS]

    def count(self, which: int, value) -> None:
        self._terms[which].append(jnp.asarray(value, jnp.int32))

    @property
    def counters(self):
        """The counters with this program's counts added: one add at the end (a scatter per
        count cost ~5 small XLA operations per op, ~600 per token)."""
        if not any(self._terms):
            return self._counters
        sums = [functools.reduce(jnp.add, terms) if terms else jnp.int32(0) for terms in self._terms]
        return self._counters + jnp.stack(sums)


def _select_xla(x0, k: int, threshold, policy: str):
    """(channels [k], values [k], active count) by kernels.select_rows' rule; k >= in: all."""
    if k >= x0.shape[0]:
        return jnp.arange(x0.shape[0], dtype=jnp.int32), x0, jnp.int32(x0.shape[0])
    candidates = jnp.abs(x0) >= kernels.selection_cut(x0, k, threshold, policy)[0]
    idx = jnp.nonzero(candidates, size=k, fill_value=0)[0].astype(jnp.int32)
    count = jnp.minimum(jnp.sum(candidates), k).astype(jnp.int32)
    valid = jnp.arange(k) < count
    return idx, jnp.where(valid, x0[idx], 0.0), count


def _apply_updates(pool, slot_map, rows, put, clear_owner, clear_slot, set_flat, set_slot):
    """rows into pool slots `put`; map entries of evicted owners cleared where they still name
    the evicted slot; `set_flat` entries pointed at `set_slot`. Out-of-range indices are padding."""
    pool = pool.at[put].set(rows, mode="drop")
    flat = slot_map.reshape(-1)
    current = flat.at[clear_owner].get(mode="fill", fill_value=-2)
    flat = flat.at[clear_owner].set(jnp.where(current == clear_slot, -1, current), mode="drop")
    flat = flat.at[set_flat].set(set_slot, mode="drop")
    return pool, flat.reshape(slot_map.shape)


class PooledOps:
    """llama.layer_forward's `ops` for one layer of the budget runtime: (group, x, w=None) -> y."""

    def __init__(self, plan: Plan, state: _State, thresholds, layer, ks: tuple[int, ...], predicted, n_valid, host):
        """layer: the layer's index, traced (a program serves every group of its shape); host: the
        runtime's id (traced too: engines of one shape share programs), which the callbacks use."""
        self.plan, self.state, self.thresholds, self.layer, self.ks, self.host = plan, state, thresholds, layer, ks, host
        self.predicted = predicted  # this group's predicted channels per predicted op, or None
        self.n_valid = n_valid

    def __call__(self, group: str, x: jax.Array, w=None) -> jax.Array:
        g = OP_GROUPS.index(group)
        if x.shape[0] == 1:
            return self._decode(g, group, x)
        return self._prefill(g, x)

    # -- one decoded token -------------------------------------------------------------------

    def _decode(self, g: int, group: str, x: jax.Array) -> jax.Array:
        plan, st, layer = self.plan, self.state, self.layer
        info = plan.pools[g]
        k = min(self.ks[g], info.in_dim)
        sparse = k < info.in_dim
        threshold = self.thresholds[layer, g]
        if plan.native_select:
            idx, xk, slots, counts, st.freqs[g] = native_lib.pool_select(
                x[0], threshold, st.maps[g], st.freqs[g], layer, k=k,
                use_threshold=plan.policy == "threshold" and sparse, trash=info.trash)
            count, missing = counts[0], counts[1]
        else:
            idx, xk, count = _select_xla(x[0], k, threshold, plan.policy if sparse else "topk")
            valid = jnp.arange(k) < count
            slots = jnp.where(valid, st.maps[g][layer][idx], info.trash)
            missing = jnp.sum(valid & (slots < 0)).astype(jnp.int32)
            st.freqs[g] = st.freqs[g].at[layer, idx].add(valid.astype(jnp.int32))
        st.count(_ACTIVE, count)
        st.count(_MISSED, missing)
        if group in PREDICTED_GROUPS and self.predicted is not None:
            predicted = self.predicted[PREDICTED_GROUPS.index(group)]
            mask = jnp.zeros(info.in_dim, bool).at[predicted].set(True)
            st.count(_PREDICTABLE, count)
            st.count(_USED, jnp.sum(mask[idx] & (jnp.arange(k) < count)))
        fill_shapes = (jax.ShapeDtypeStruct((k, info.row_width), np.dtype(np.uint8 if info.dtype != "float32"
                                                                                 else np.float32)),
                       *(jax.ShapeDtypeStruct((k,), jnp.int32) for _ in range(5)))
        callback = functools.partial(_fill_decode, g)

        def fill(operands):
            pool, slot_map, slots = operands
            rows, put, clear_owner, clear_slot, new_slots, set_flat = io_callback(
                callback, fill_shapes, self.host, layer, idx, slots, count, st.freqs[g], ordered=False)
            pool, slot_map = _apply_updates(pool, slot_map, rows, put, clear_owner, clear_slot, set_flat, new_slots)
            return pool, slot_map, new_slots

        if plan.fills:
            st.pools[g], st.maps[g], slots = jax.lax.cond(missing > 0, fill, lambda operands: operands,
                                                          (st.pools[g], st.maps[g], slots))
            st.count(_FILLS, missing > 0)
        held = _held(st.pools[g], info)
        if plan.native_select:
            matvec = native_lib.q_gather_matvec if isinstance(held, QRows) else native_lib.gather_matvec
            return matvec(xk, slots, held, count)[None]
        return (xk @ take_rows(held, slots, rows_sorted=False))[None]

    # -- a prefill chunk ---------------------------------------------------------------------

    def _prefill(self, g: int, x: jax.Array) -> jax.Array:
        plan, layer = self.plan, self.layer
        info = plan.pools[g]
        k = self.ks[g]
        t = x.shape[0]
        if k < info.in_dim:
            threshold = self.thresholds[layer, g]
            selected_from = jax.lax.stop_gradient(x)
            if plan.native_select:
                mask = native_lib.active_mask(selected_from, k, threshold, plan.policy == "threshold")
            else:
                mask = kernels.active_mask(selected_from, k, threshold, plan.policy)
            real = (jnp.arange(t) < self.n_valid)[:, None]
            union = jnp.any(mask & real, axis=0)
            x = jnp.where(mask, x, 0.0)
        else:
            union = jnp.ones(info.in_dim, bool)
        row_type = np.dtype(np.uint8 if info.dtype != "float32" else np.float32)
        shapes = (jax.ShapeDtypeStruct((info.in_dim, info.row_width), row_type),
                  *(jax.ShapeDtypeStruct((info.in_dim,), jnp.int32) for _ in range(5)))
        st = self.state
        w, put, clear_owner, clear_slot, set_flat, set_slot = io_callback(
            functools.partial(_fill_prefill, g), shapes, self.host, layer, union, ordered=False)
        # rows the pool holds come from it (the callback read only the others); rows read from
        # flash are kept in free slots, so a prompt warms the hot-weight cache for decoding
        held_slots = st.maps[g][layer]
        from_pool = st.pools[g].at[jnp.where(held_slots >= 0, held_slots, info.trash)].get(mode="promise_in_bounds")
        w = jnp.where((union & (held_slots >= 0))[:, None], from_pool, w)
        st.pools[g], st.maps[g] = _apply_updates(st.pools[g], st.maps[g], w, put, clear_owner, clear_slot, set_flat,
                                                 set_slot)
        return quant_matmul(x, _held(w, info), plan.native)


def _fill_decode(g: int, host, layer, idx, slots, count, freq):
    return _HOSTS[int(host)].fill_decode(g, int(layer), np.asarray(idx), np.asarray(slots), int(count), freq)


def _fill_prefill(g: int, host, layer, union):
    return _HOSTS[int(host)].fill_prefill(g, int(layer), np.asarray(union))


def _predict(plan: Plan, gains, x: jax.Array):
    """Channels of each predicted op likely active in a later group: the top n of |residual| x
    that group's mean norm gain per op (`gains`; the op's input is the normed residual), ascending."""
    residual = jnp.abs(x[-1])
    out = []
    for n, gain in zip(plan.predict_n, gains):
        score = residual * gain
        if n >= score.shape[0]:
            out.append(jnp.arange(score.shape[0], dtype=jnp.int32))
            continue
        if plan.native:
            mask = native_lib.active_mask(score[None], n, 0.0, False)[0]
        else:
            mask = kernels.active_mask(score, n, 0.0, "topk")
        out.append(jnp.nonzero(mask, size=n, fill_value=0)[0].astype(jnp.int32))
    return tuple(out)


@functools.partial(jax.jit, static_argnames=("plan",), donate_argnames=("pools", "maps", "freqs", "kc", "vc",
                                                                        "counters"))
def run(host, head, layer_params, layer_ids, pools, maps, freqs, kc, vc, counters, x_in, pos, n_valid, thresholds, install,
        predicted, gains, sample, *, plan: Plan):
    """One program of the budget runtime: (embedding) -> layers -> (prediction) -> (head).

    host: the runtime's id (register_host) for the callbacks; head: the embedding (tied; or None), final norm and untied head; layer_params: the small
    parameters (norms, biases) of each layer run, layer_ids [N] int32 their indices; pools/maps/
    freqs: the four op groups' device state; kc/vc: the KV caches of the layers run; x_in: tokens
    [T], embedding rows [T, d] or the residual [T, d]; thresholds [L, 4]; install: per predicted
    op (rows, put, clear_owner, clear_slot, set_flat, set_slot) or None; predicted: this group's
    predicted channels per predicted op (for the recall counter) or None; gains: per predicted op
    the norm gain of the group to predict, or None; sample: (key, temperature, top_p) or None.
    Returns (pools, maps, freqs, kc, vc, counters, out) with out holding "x" (the residual),
    "predicted" (per predicted op), "logits", or "token" and "key"."""
    cfg = plan.cfg
    st = _State(pools, maps, freqs, counters)
    if plan.embed == "lookup":
        x = llama.embed_tokens(cfg, head["embed"], x_in)
    elif plan.embed == "rows":
        x = llama.scale_embedding(cfg, x_in)
    else:
        x = x_in
    if plan.install:
        for op, update in zip(PREDICTED_GROUPS, install):
            g = OP_GROUPS.index(op)
            st.pools[g], st.maps[g] = _apply_updates(st.pools[g], st.maps[g], *update)
    biases = llama.attention_biases(cfg, pos, plan.tokens, plan.attn_len)
    kc, vc = list(kc), list(vc)
    for j, (kind, ks) in enumerate(zip(plan.kinds, plan.ks)):
        ops = PooledOps(plan, st, thresholds, layer_ids[j], ks, predicted if plan.count_predicted else None, n_valid,
                        host)
        with jax.named_scope(f"layer{j}"):
            x, kc[j], vc[j] = llama.layer_forward(cfg, layer_params[j], x, kc[j], vc[j], pos, biases,
                                                  attn_len=plan.attn_len, ops=ops, native=plan.native, layer=kind)
    out: dict[str, Any] = {}
    if plan.predict:
        out["predicted"] = _predict(plan, gains, x)
    if plan.head == "sample":
        key, temperature, top_p = sample
        logits = llama.final_logits(cfg, head, x, n_valid, all_logits=False, native=plan.native)
        key, sub = jax.random.split(key)
        out["token"], out["key"] = sample_token(logits[0], sub, temperature, top_p), key
    elif plan.head in ("logits", "all_logits"):
        out["logits"] = llama.final_logits(cfg, head, x, n_valid, all_logits=plan.head == "all_logits",
                                           native=plan.native)
    else:
        out["x"] = x
    return tuple(st.pools), tuple(st.maps), tuple(st.freqs), tuple(kc), tuple(vc), st.counters, out


@functools.partial(jax.jit, donate_argnames=("pool", "slot_map"))
def install(pool, slot_map, rows, put, set_flat, set_slot):
    """Rows into free slots and the map (no evictions): runtime.SwapRuntime.complete_pools."""
    none = jnp.full(put.shape, slot_map.size, jnp.int32)
    return _apply_updates(pool, slot_map, rows, put, none, none, set_flat, set_slot)


class DispatchCounter:
    """Programs dispatched by the budget runtime (its dispatches per token)."""

    calls = 0
