"""Cold-flash helpers: page-cache eviction and read accounting."""

from __future__ import annotations

import os

import pytest

from activeflow_jax.errors import InvalidArgumentError
from activeflow_jax.runtime.iostats import drop_page_cache, process_read_bytes


def test_drop_page_cache_of_a_store(tiny_model):
    result = drop_page_cache(tiny_model.store_path)
    assert result["files"] > 3 and result["bytes"] > 0
    # the store still loads and reads the same after eviction
    from activeflow_jax.store.reader import StoreReader

    reader = StoreReader(tiny_model.store_path)
    assert reader.read("final_norm.weight").shape == (tiny_model.params["final_norm.weight"].shape[0],)


def test_drop_page_cache_bad_path(tmp_path):
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        drop_page_cache(tmp_path / "missing")


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="Linux only")
def test_process_read_bytes_is_monotonic():
    first = process_read_bytes()
    assert isinstance(first, int) and first >= 0
    assert process_read_bytes() >= first
