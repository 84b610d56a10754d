"""The embedding held as exact Q8_0 blocks: detection, kernels, and engines that use it."""

from __future__ import annotations

import numpy as np
import pytest

import jax.numpy as jnp
from conftest import require_native


def _q8_table(rng, v: int, d: int) -> np.ndarray:
    """A table with exactly GGML Q8_0's values: per block of 32, an f16 scale times int8 codes."""
    import gguf

    x = rng.standard_normal((v, d)).astype(np.float32)
    raw = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0).astype(np.float32)


def test_q8_exact_recovers_ggml_q8_0_and_refuses_anything_else():
    from activeflow_jax.models.embedding import as_f32, lookup, q8_exact, to_q8

    rng = np.random.default_rng(0)
    table = _q8_table(rng, 300, 96)
    table[7, :32] = 0.0  # an all-zero block
    q, scale = q8_exact(table, rows_per_chunk=64)
    assert q.dtype == np.int8 and scale.shape == (300, 3)
    np.testing.assert_array_equal(np.repeat(scale, 32, axis=1) * q.astype(np.float32), table)
    t = to_q8(table)
    np.testing.assert_array_equal(np.asarray(as_f32(t)), table)
    tokens = jnp.asarray([0, 7, 299, 7])
    np.testing.assert_array_equal(np.asarray(lookup(t, tokens)), table[[0, 7, 299, 7]])
    assert t.nbytes == 300 * 3 * 34  # q8 rows: per block an f16 scale and 32 codes

    assert q8_exact(rng.standard_normal((40, 64)).astype(np.float32)) is None  # plain f32 values
    off = table.copy()
    off[3, 5] = np.nextafter(off[3, 5], np.float32(np.inf))  # one value one ulp away
    assert q8_exact(off) is None
    assert q8_exact(table[:, :80].copy()) is None  # d not a multiple of 32
    assert q8_exact(table.astype(np.float64)) is None


def test_q8_head_kernel_is_bit_identical_to_the_f32_kernel():
    from activeflow_jax.models.embedding import to_q8
    from activeflow_jax.sparse import native

    require_native()
    rng = np.random.default_rng(1)
    for v, d in ((301, 64), (49152 // 8, 576)):  # an odd row count (scalar tail); a threaded size
        table = _q8_table(rng, v, d)
        x = jnp.asarray(rng.standard_normal(d).astype(np.float32))
        want = np.asarray(native.rows_dot(x, jnp.asarray(table)))
        got = np.asarray(native.q_rows_dot(x, to_q8(table)))
        np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def q8_tiny(tmp_path_factory):
    from activeflow_jax.testing import make_tiny_store

    return make_tiny_store(tmp_path_factory.mktemp("tiny_q8"), qtype="Q8_0")


def test_engine_with_q8_embedding_equals_the_f32_engine(q8_tiny):
    """Dense and sparse, prefill logits and decoded tokens: holding the embedding as Q8 blocks
    changes nothing but its bytes."""
    import activeflow_jax as af
    from activeflow_jax.models.embedding import Q8Table

    q8 = af.Engine.load(q8_tiny.store_path)
    f32 = af.Engine.load(q8_tiny.store_path, q8_embedding=False)
    assert isinstance(q8.params["embed"], Q8Table) and not isinstance(f32.params["embed"], Q8Table)
    assert f32.stats.weight_bytes - q8.stats.weight_bytes == f32.params["embed"].nbytes - q8.params["embed"].nbytes
    ids = np.arange(3, 40, dtype=np.int32)
    np.testing.assert_array_equal(q8.logits(ids), f32.logits(ids))
    for sparsity in (None, 0.5):
        for engine in (q8, f32):
            engine.configure_sparsity(sparsity, policy="topk")
        a = list(q8.generate_ids(ids, max_new_tokens=12, stop_ids=frozenset()))
        b = list(f32.generate_ids(ids, max_new_tokens=12, stop_ids=frozenset()))
        assert a == b


def test_q8_embedding_option_errors(tiny_model):
    import activeflow_jax as af
    from activeflow_jax.errors import InvalidArgumentError
    from activeflow_jax.models.embedding import Q8Table

    auto = af.Engine.load(tiny_model.store_path)  # random f32 weights: not Q8_0, so it stays f32
    assert not isinstance(auto.params["embed"], Q8Table)
    with pytest.raises(InvalidArgumentError, match="not exactly Q8_0"):
        af.Engine.load(tiny_model.store_path, q8_embedding=True)
    with pytest.raises(InvalidArgumentError, match="q8_embedding must be"):
        af.Engine.load(tiny_model.store_path, q8_embedding="yes")


def test_real_model_embedding_is_held_as_q8(real_engine):
    from activeflow_jax.models.embedding import Q8Table

    table = real_engine.params["embed"]
    assert isinstance(table, Q8Table)  # SmolLM2's token_embd is Q8_0 in its GGUF
    assert table.nbytes * 3.5 < real_engine.config.vocab_size * real_engine.config.d_model * 4


def test_q8_table_is_built_block_by_block_without_reading_the_whole_f32_table(q8_tiny, tiny_model, monkeypatch):
    """Loading converts the table block by block (never the whole f32 table in memory beside the
    q8 rows); a table that is not exactly Q8_0 falls back to reading it whole as f32."""
    from activeflow_jax.models.embedding import Q8Table, resident_table, to_q8
    from activeflow_jax.store.reader import StoreReader

    reader = StoreReader(q8_tiny.store_path)
    whole = reader.read("embed")
    blocks = list(reader.iter_row_blocks("embed", block_bytes=7 * whole.shape[1] * 4))
    assert len(blocks) > 2 and [len(b) for _, b in blocks[:-1]] == [7] * (len(blocks) - 1)
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), whole)

    def whole_read(*args, **kwargs):
        raise AssertionError("read the whole f32 table")

    monkeypatch.setattr(StoreReader, "read_aligned", whole_read)
    table = resident_table(reader, q8=True, insist=True)
    assert isinstance(table, Q8Table)
    np.testing.assert_array_equal(np.asarray(table.data), np.asarray(to_q8(whole).data))
    assert table.data.unsafe_buffer_pointer() % 64 == 0
    monkeypatch.undo()

    plain = StoreReader(tiny_model.store_path)  # random f32 weights: not Q8_0
    table = resident_table(plain, q8=True, insist=False)
    assert not isinstance(table, Q8Table)
    np.testing.assert_array_equal(np.asarray(table), plain.read("embed"))
    from activeflow_jax.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="not exactly Q8_0"):
        resident_table(plain, q8=True, insist=True)
