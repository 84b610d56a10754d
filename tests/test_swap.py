"""The swapping runtime (DRAM budget, slot pools, hot cache, preloading) against the all-in-DRAM path."""

from __future__ import annotations

import os
import shutil
import threading

import numpy as np
import pytest

import activeflow_jax as af
from activeflow_jax.config import tiny_config
from activeflow_jax.errors import InvalidArgumentError, StoreCorruptError, StoreError
from activeflow_jax.runtime.budget import BudgetTooSmallError, model_weight_bytes, parse_budget
from conftest import require_native

# more layers than the default tiny model, so that budgets of 25-50% of the weights leave room
# for a cache beyond the minimum working set (which includes the KV cache and the embedding)
SWAP_CFG = tiny_config(num_layers=20, d_model=128, d_ff=512, num_heads=4, num_kv_heads=2, head_dim=32,
                       vocab_size=300, name="tiny-swap")
PROMPT = [5, 17, 33, 2, 90, 41, 7, 250, 12, 64]
OPTS = dict(group_size=1, kv_tokens=32, plan=False, progress=False)


@pytest.fixture(scope="module")
def swap_store(tmp_path_factory):
    from activeflow_jax.testing import make_tiny_store

    return make_tiny_store(tmp_path_factory.mktemp("swap"), SWAP_CFG).store_path


@pytest.fixture(scope="module")
def reference(swap_store):
    """All-in-DRAM logits and greedy tokens, dense and at 50% top-k sparsity."""
    out = {}
    for sparsity in (None, 0.5):
        engine = af.Engine.load(swap_store, sparsity=sparsity, policy="topk")
        out[sparsity] = (engine.logits(PROMPT), list(engine.generate_ids(PROMPT, max_new_tokens=8)))
    return out


def _assert_same(engine, reference):
    logits, tokens = reference
    got = engine.logits(PROMPT)
    np.testing.assert_allclose(got, logits, rtol=1e-5, atol=1e-5 * np.abs(logits).max())
    assert list(engine.generate_ids(PROMPT, max_new_tokens=8)) == tokens


@pytest.mark.parametrize("budget", [1.0, 0.5, 0.25])
def test_sparse_swapping_equals_all_in_dram(swap_store, reference, budget):
    engine = af.Engine.load(swap_store, sparsity=0.5, policy="topk", dram_budget=budget, **OPTS)
    _assert_same(engine, reference[0.5])
    memory = engine.stats.memory
    assert memory["total"] <= parse_budget(budget, SWAP_CFG)
    loader = engine.stats.loader
    assert loader["active_rows"] > 0 and 0 < loader["hit_rate"] <= 1
    if budget < 1.0:
        assert loader["ondemand_rows"] + loader["preload_rows_read"] > 0  # rows really came from flash
        assert loader["ondemand_extent_bytes"] + loader["preload_extent_bytes"] >= loader["bytes_requested"]
        assert (loader["ondemand_extents"] > 0) == (loader["ondemand_rows"] > 0)
        # the callbacks' time holds their reads, and is counted only where callbacks ran
        assert loader["fill_seconds"] >= loader["ondemand_seconds"]
        assert (loader["fill_seconds"] > 0) == (loader["fills"] > 0)
    engine.close()


@pytest.mark.parametrize("budget", [1.0, 0.5])
def test_dense_layer_streaming_equals_all_in_dram(swap_store, reference, budget):
    engine = af.Engine.load(swap_store, dram_budget=budget, **OPTS)
    _assert_same(engine, reference[None])


def test_group_preloading_with_larger_groups(swap_store, reference):
    engine = af.Engine.load(swap_store, sparsity=0.5, policy="topk", dram_budget=0.6,
                            **{**OPTS, "group_size": 3})
    _assert_same(engine, reference[0.5])
    loader = engine.stats.loader
    assert loader["predicted_rows"] > 0 and 0 < loader["preload_recall"] <= 1


def test_budget_below_minimum_states_it(swap_store):
    with pytest.raises(BudgetTooSmallError, match=r"minimum working set of [0-9.]+ MB"):
        af.Engine.load(swap_store, sparsity=0.5, policy="topk", dram_budget="200KB", **OPTS)


def test_parse_budget():
    total = model_weight_bytes(SWAP_CFG)
    assert parse_budget("200MB", SWAP_CFG) == 200_000_000
    assert parse_budget("1.5GiB", SWAP_CFG) == int(1.5 * (1 << 30))
    assert parse_budget(0.5, SWAP_CFG) == int(0.5 * total)
    assert parse_budget("50%", SWAP_CFG) == int(0.5 * total)
    assert parse_budget(123456, SWAP_CFG) == 123456
    for bad in ("lots", -1, 0, True, "12 parsecs", 1.5):
        with pytest.raises(InvalidArgumentError):
            parse_budget(bad, SWAP_CFG)


def test_runtime_budget_change(swap_store, reference):
    engine = af.Engine.load(swap_store, sparsity=0.5, policy="topk", dram_budget=1.0, **OPTS)
    _assert_same(engine, reference[0.5])
    old_buffers = list(engine.swap._dev_pools)
    big = engine.stats.memory["pools"]
    engine.set_dram_budget(0.3)
    small = engine.stats.memory["pools"]
    assert sum(small.values()) < sum(big.values())
    assert all(b.is_deleted() for b in old_buffers)  # the memory was handed back, not kept
    _assert_same(engine, reference[0.5])
    with pytest.raises(BudgetTooSmallError):
        engine.set_dram_budget("100KB")
    _assert_same(engine, reference[0.5])  # a refused change leaves the engine as it was


def test_cold_and_direct_io(swap_store, reference, monkeypatch):
    from activeflow_jax.runtime import iostats

    engine = af.Engine.load(swap_store, sparsity=0.5, policy="topk", dram_budget=0.5, cold=True, direct_io=True,
                            **OPTS)
    dropped = []  # under O_DIRECT the layout leaves the page cache before every pass (whole-file reads)
    real_drop = iostats.drop_files
    monkeypatch.setattr(iostats, "drop_files", lambda paths, **kw: dropped.append(tuple(paths)) or real_drop(paths, **kw))
    _assert_same(engine, reference[0.5])
    assert len(dropped) >= 8 and set(dropped) == {tuple(iostats.files_under(engine.swap.bundles.root))}


def _bundle_shards(store):
    root = os.path.join(store, "bundles", "n1")
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                  if "/c/" in os.path.join(d, f))


def test_corrupted_chunk_mid_generation_then_repaired(swap_store, reference, tmp_path):
    store = shutil.copytree(swap_store, tmp_path / "store")
    engine = af.Engine.load(store, sparsity=0.5, policy="topk", dram_budget=0.3, **OPTS)
    _assert_same(engine, reference[0.5])
    shards = _bundle_shards(store)
    saved = {p: open(p, "rb").read() for p in shards}
    for path in shards:  # damage every row: whatever the next token needs is damaged
        data = bytearray(saved[path])
        for i in range(0, len(data) - 64, 97):
            data[i] ^= 0xFF
        open(path, "wb").write(bytes(data))
    engine.set_dram_budget(0.3)  # empty the cache, so rows must be read again
    with pytest.raises(StoreCorruptError, match=r"(qkv|o|gate_up|down)"):
        list(engine.generate_ids(PROMPT, max_new_tokens=8))
    for path, data in saved.items():
        open(path, "wb").write(data)
    _assert_same(engine, reference[0.5])  # usable again once the store is repaired


def test_store_removed_while_loaded(swap_store, tmp_path):
    store = shutil.copytree(swap_store, tmp_path / "store")
    engine = af.Engine.load(store, sparsity=0.5, policy="topk", dram_budget=0.3, **OPTS)
    shutil.rmtree(store)
    with pytest.raises(StoreError):
        list(engine.generate_ids(PROMPT, max_new_tokens=8))


def test_two_threads_are_serialized(swap_store, reference):
    engine = af.Engine.load(swap_store, sparsity=0.5, policy="topk", dram_budget=0.4, **OPTS)
    results, errors = [None, None], []

    def run(i):
        try:
            results[i] = list(engine.generate_ids(PROMPT, max_new_tokens=8))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results[0] == results[1] == reference[0.5][1]


def test_bad_options(swap_store):
    with pytest.raises(InvalidArgumentError):
        af.Engine.load(swap_store, dram_budget=0.5, group_size=0)
    with pytest.raises(InvalidArgumentError):
        af.Engine.load(swap_store, dram_budget=0.5, kv_tokens=3)
    with pytest.raises(InvalidArgumentError):
        af.Engine.load(swap_store, group_size=2)  # budget options without a budget
    engine = af.Engine.load(swap_store, sparsity=0.5, policy="topk", dram_budget=1.0, **OPTS)
    with pytest.raises(InvalidArgumentError, match="kv_tokens|KV cache"):
        list(engine.generate_ids(PROMPT, max_new_tokens=40))  # needs more KV than the budget reserved
    with pytest.raises(InvalidArgumentError):
        engine.configure_sparsity(0.3)


# -- the streaming layout -------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [1, 3])
def test_bundles_hold_exactly_the_tensor_rows(swap_store, group_size):
    from activeflow_jax.store.bundles import TENSOR_OF_OP, BundleReader, write_bundles
    from activeflow_jax.store.reader import StoreReader

    write_bundles(swap_store, group_size)
    reader, bundles = StoreReader(swap_store), BundleReader(swap_store, group_size)
    assert [len(g) for g in bundles.layer_groups][-1] == (SWAP_CFG.num_layers % group_size or group_size)  # uneven last group
    channels = np.array([0, 3, 4, 5, 60, 127])
    for op, tensor in TENSOR_OF_OP.items():
        for j, layers in enumerate(bundles.layer_groups):
            rows = bundles.read_group(op, j, channels)
            for p, layer in enumerate(layers):
                full = reader.read(f"layers.{layer}.{tensor}")
                np.testing.assert_array_equal(rows[:, p], full[channels])
                np.testing.assert_array_equal(bundles.read_layer(op, layer, channels), full[channels])


def test_relayout_cli_and_store_untouched(swap_store, tmp_path, capsys):
    import hashlib

    from activeflow_jax.cli import main
    from activeflow_jax.store.bundles import available_group_sizes

    store = str(shutil.copytree(swap_store, tmp_path / "store"))

    def digest():
        h = hashlib.sha256()
        for d, _, files in sorted(os.walk(store)):
            if "bundles" in d:
                continue
            for f in sorted(files):
                h.update(open(os.path.join(d, f), "rb").read())
        return h.hexdigest()

    before = digest()
    assert main(["relayout", "--store", store, "--group-size", "3"]) == 0
    assert "layer groups of 3" in capsys.readouterr().out
    assert 3 in available_group_sizes(store)
    assert main(["relayout", "--store", store, "--group-size", "2", "--remove-others"]) == 0
    assert available_group_sizes(store) == [2]
    assert digest() == before  # tensors, manifest and calibration are never modified
    assert main(["relayout", "--store", store, "--group-size", "0"]) != 0  # clear error, no traceback


def test_bundle_reader_errors(swap_store, tmp_path):
    import json

    from activeflow_jax.store.bundles import BundleReader, layout_dir, write_bundles

    store = str(shutil.copytree(swap_store, tmp_path / "store"))
    with pytest.raises(StoreError, match="relayout"):
        BundleReader(store, 7)  # no layout for that group size
    write_bundles(store, 2)
    reader = BundleReader(store, 2)
    for bad in ([3, 1], [0, 0], [-1], [128], [[1]]):
        with pytest.raises(InvalidArgumentError):
            reader.read_layer("qkv", 0, bad)
    with pytest.raises(InvalidArgumentError):
        reader.read_layer("ffn", 0, [1])
    with pytest.raises(InvalidArgumentError):
        reader.read_layer("qkv", 99, [1])
    manifest_path = os.path.join(store, "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["created"] = "another time"
    json.dump(manifest, open(manifest_path, "w"))
    with pytest.raises(StoreError, match="stale"):
        BundleReader(store, 2)
    assert os.path.isdir(layout_dir(store, 2))


def test_scoring_under_a_budget_equals_all_in_dram(swap_store):
    # task evaluation (`activeflow tasks --dram-budget`) goes through the same runtime
    from activeflow_jax.eval.scoring import score_requests

    requests = [([5, 17, 33, 2], [[90, 41], [7]]), ([250, 12], [[64, 3, 9]])]
    reference = score_requests(af.Engine.load(swap_store, sparsity=0.5, policy="topk"), requests)
    engine = af.Engine.load(swap_store, sparsity=0.5, policy="topk", dram_budget=0.4, **OPTS)
    got = score_requests(engine, requests)
    for ref_row, row in zip(reference, got):
        for a, b in zip(ref_row, row):
            np.testing.assert_allclose(b, a, atol=1e-4)


def test_q8_embedding_under_a_budget(tmp_path_factory):
    """A store whose embedding is exactly Q8_0 keeps it as Q8 blocks under a budget too: the same
    outputs as the all-in-DRAM engine, and the budget counts the smaller table (more left for
    the pools than with the f32 table)."""
    from activeflow_jax.models.embedding import Q8Table
    from activeflow_jax.testing import make_tiny_store

    require_native()  # the table is held as Q8 blocks only where the native head reads it ("auto")
    store = make_tiny_store(tmp_path_factory.mktemp("swap_q8"), SWAP_CFG, qtype="Q8_0").store_path
    dram = af.Engine.load(store, sparsity=0.5, policy="topk")
    assert isinstance(dram.params["embed"], Q8Table)
    reference = (dram.logits(PROMPT), list(dram.generate_ids(PROMPT, max_new_tokens=8)))
    q8 = af.Engine.load(store, sparsity=0.5, policy="topk", dram_budget=0.5, **OPTS)
    f32 = af.Engine.load(store, sparsity=0.5, policy="topk", dram_budget=0.5, q8_embedding=False, **OPTS)
    assert isinstance(q8.swap.resident["embed"], Q8Table)
    _assert_same(q8, reference)
    _assert_same(f32, reference)
    assert q8.stats.memory["resident"] < f32.stats.memory["resident"]
    assert q8.stats.memory["total"] <= parse_budget(0.5, SWAP_CFG)
    assert sum(q8.swap.memory.pool_slots) > sum(f32.swap.memory.pool_slots)
    with pytest.raises(InvalidArgumentError, match="native kernels"):
        af.Engine.load(store, sparsity=0.5, policy="topk", kernel="gather", dram_budget=0.5, q8_embedding=True,
                       **OPTS)


def test_untied_embedding_stays_on_flash(tmp_path_factory):
    """An untied model's input embedding is not resident under a budget (a token reads only its
    own row from flash): same outputs as all in DRAM, the resident bytes exclude the table, and
    the rows read for decoded tokens are counted."""
    import dataclasses

    from activeflow_jax.runtime.budget import resident_bytes
    from activeflow_jax.testing import make_tiny_store

    cfg = dataclasses.replace(SWAP_CFG, tie_embeddings=False, name="tiny-swap-untied")
    store = make_tiny_store(tmp_path_factory.mktemp("swap_untied"), cfg).store_path
    dram = af.Engine.load(store, sparsity=0.5, policy="topk")
    reference = (dram.logits(PROMPT), list(dram.generate_ids(PROMPT, max_new_tokens=8)))
    for budget in (1.0, 0.4):
        engine = af.Engine.load(store, sparsity=0.5, policy="topk", dram_budget=budget, **OPTS)
        assert "embed" not in engine.swap.resident and "lm_head" in engine.swap.resident
        assert engine.stats.memory["resident"] == resident_bytes(cfg)
        assert resident_bytes(cfg) < cfg.vocab_size * cfg.d_model * 4 * 2  # head, not head + embedding
        _assert_same(engine, reference)
        assert engine.stats.memory["total"] <= parse_budget(budget, cfg)
        loader = engine.stats.loader
        assert loader["embed_bytes"] == loader["tokens"] * cfg.d_model * 4 > 0
        engine.close()
    streaming = af.Engine.load(store, dram_budget=0.5, **OPTS)  # dense layer streaming, same path
    dense = af.Engine.load(store)
    np.testing.assert_allclose(streaming.logits(PROMPT), dense.logits(PROMPT), rtol=1e-5, atol=1e-5)


def test_budget_including_the_process_reserves_its_growth(swap_store):
    """With budget_includes_process the plan counts the process as measured at load plus the
    reserve for what compiling will add; a budget that cannot hold both is refused, naming them."""
    from activeflow_jax.runtime.budget import COMPILE_GROWTH_RESERVE
    from activeflow_jax.runtime.budget import current_rss

    rss = current_rss()  # the whole test session's process: grows with the tests run before
    budget = int(rss + COMPILE_GROWTH_RESERVE + 300e6)
    engine = af.Engine.load(swap_store, sparsity=0.5, policy="topk", dram_budget=budget,
                            budget_includes_process=True, **OPTS)
    assert engine.swap.memory.baseline >= rss - 50e6 + COMPILE_GROWTH_RESERVE  # (load may trim the heap)
    assert engine.stats.memory["total"] + engine.swap.memory.baseline <= budget
    with pytest.raises(BudgetTooSmallError, match="process baseline"):
        af.Engine.load(swap_store, sparsity=0.5, policy="topk", dram_budget=int(rss + COMPILE_GROWTH_RESERVE // 2),
                       budget_includes_process=True, **OPTS)


def test_process_baseline_is_measured_after_the_tokenizer(swap_store, monkeypatch):
    """The tokenizer (Gemma 3's: ~130 MB) is part of the process the budget counts: it is built
    before the process is measured, not after the plan."""
    from activeflow_jax.formats.tokenizer import Tokenizer
    from activeflow_jax.runtime import budget as budget_mod

    events = []
    build, measure = Tokenizer.from_spec.__func__, budget_mod.current_rss
    monkeypatch.setattr(Tokenizer, "from_spec", classmethod(lambda cls, spec: events.append("tokenizer") or build(cls, spec)))
    monkeypatch.setattr(budget_mod, "current_rss", lambda: events.append("measure") or measure())
    engine = af.Engine.load(swap_store, sparsity=0.5, policy="topk", dram_budget=0.5, **OPTS)
    assert engine.tokenizer is not None
    assert "measure" in events and events.index("tokenizer") < events.index("measure")


def test_orchestration_counters(swap_store, reference):
    """Per decoded token: one compiled program per layer group plus the embedding's, one sync per
    group (the prediction the host reads) and the token itself; one program and one sync when the
    pools hold every row (issue 23's figures)."""
    engine = af.Engine.load(swap_store, sparsity=0.5, policy="topk", dram_budget=0.5, **{**OPTS, "group_size": 4})
    assert list(engine.generate_ids(PROMPT, max_new_tokens=8)) == reference[0.5][1]
    loader = engine.stats.loader
    groups = -(-SWAP_CFG.num_layers // 4)
    assert loader["tokens"] == 7
    assert loader["dispatches_per_token"] == groups + 1
    assert loader["host_syncs_per_token"] == groups
    assert loader["host_cpu_seconds_per_token"] > 0
    engine.close()
    engine = af.Engine.load(swap_store, sparsity=0.5, policy="topk", dram_budget="64MB", **OPTS)
    assert engine.swap.resident_mode
    assert list(engine.generate_ids(PROMPT, max_new_tokens=8)) == reference[0.5][1]
    loader = engine.stats.loader
    assert loader["dispatches_per_token"] == 1 and loader["host_syncs_per_token"] == 1
    assert loader["hit_rate"] > 0.9  # the prompt warmed the cache
    engine.close()


def test_programs_do_not_multiply_with_the_context(swap_store, reference):
    """Every compiled program stays in the process, and a budget that covers the process must hold
    them all: under a budget the KV cache is always the reserved length and attention at least
    min(buckets.BUDGET_MIN_ATTN_LEN, cache), so prompts of several lengths and a decode that crosses the engine's
    attention buckets (128 -> 256) compile one attention length, and a prompt-chunk length one
    layer program per layer kind (the embedding and head run in small programs of their own)."""
    engine = af.Engine.load(swap_store, sparsity=0.5, policy="topk", dram_budget=0.5, **{**OPTS, "kv_tokens": 256})
    plans = []
    plan = engine.swap._plan
    engine.swap._plan = lambda *args, **kw: plans.append(plan(*args, **kw)) or plans[-1]
    assert list(engine.generate_ids(PROMPT, max_new_tokens=8)) == reference[0.5][1]
    for prompt_len, new_tokens in ((40, 3), (3, 150)):
        assert len(list(engine.generate_ids(list(range(1, prompt_len + 1)), max_new_tokens=new_tokens,
                                            stop_ids=frozenset()))) == new_tokens
    assert {p.attn_len for p in plans} == {256}
    layer_programs = {p for p in plans if p.tokens > 1 and p.kinds}
    assert {p.tokens for p in layer_programs} == {16, 64}
    kinds = {(p.kinds, p.ks) for p in layer_programs}  # here the dense first layer and the sparse ones
    assert len(kinds) == 2 and len(layer_programs) == 2 * len(kinds)
    engine.close()
