"""Shared fixtures: tiny random models (seconds) and the real default model (fetched once)."""

from __future__ import annotations

import gc
import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for reference_numpy


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
    """Every XLA:CPU executable keeps its JIT code in memory mappings of its own (measured: ~3.7
    for a small jitted function, ~160 for a budget-runtime program), and JAX's caches keep every
    executable alive: the whole suite in one process compiled enough to
    reach the kernel's mapping limit (vm.max_map_count, 65530), and the next compile segfaulted
    inside XLA (stop 29's CI: 59.7k mappings, 20k of them executable, at the crash). The programs
    of one test module are dropped when it ends; later modules recompile what they use."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from activeflow_jax.testing import make_tiny_store

    return make_tiny_store(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_engine(tiny_model):
    import activeflow_jax as af

    return af.Engine.load(tiny_model.store_path)


@pytest.fixture(scope="session")
def real_gguf_path():
    from activeflow_jax.errors import FetchError
    from activeflow_jax.fetch import fetch_default_gguf

    try:
        return fetch_default_gguf(quiet=True)
    except FetchError as exc:  # no network and no cached copy
        if os.environ.get("CI"):
            raise
        pytest.skip(f"default model unavailable: {exc}")


@pytest.fixture(scope="session")
def real_store(real_gguf_path):
    from activeflow_jax.fetch import fetch_default_model

    return fetch_default_model(quiet=True)


@pytest.fixture(scope="session")
def real_engine(real_store):
    import activeflow_jax as af

    return af.Engine.load(real_store)


@pytest.fixture(scope="session")
def wiki_test_path():
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.environ.get("ACTIVEFLOW_WIKITEXT"), os.path.join(here, "data", "wiki.test.lf.raw"),
                      os.path.join(here, "..", "..", "shared", "data", "wiki.test.lf.raw")):
        if candidate and os.path.isfile(candidate):
            return candidate
    pytest.skip("WikiText-2 test file not found (set ACTIVEFLOW_WIKITEXT)")


def require_native() -> None:
    """Skips a test of the native kernels themselves where they are not built (no C++ compiler, or
    ACTIVEFLOW_NATIVE=0: CI's second pass over the swap and sparse tests); the XLA path every
    engine falls back to is what those runs test instead."""
    from activeflow_jax.sparse import native

    if not native.available():
        pytest.skip("native kernels not built here (ACTIVEFLOW_NATIVE=0 or no C++ compiler)")
