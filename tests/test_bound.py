"""The flash-bytes lower bound against exhaustive search on tiny traces."""

import itertools

import numpy as np
import pytest

from activeflow_jax.errors import InvalidArgumentError
from activeflow_jax.runtime.bound import min_flash_bytes, next_request


def brute_force(active, sizes, capacity):
    """Fewest bytes over every whole-row caching policy (dynamic programming over cached subsets)."""
    n = active.shape[1]
    states = {frozenset(): 0.0}
    for t in range(active.shape[0]):
        need = {j for j in range(n) if active[t, j]}
        nxt = {}
        for cached, cost in states.items():
            cost = cost + sum(sizes[j] for j in need - cached)
            pool = sorted(cached | need)
            for r in range(len(pool) + 1):
                for keep in itertools.combinations(pool, r):
                    if sum(sizes[j] for j in keep) <= capacity + 1e-9:
                        key = frozenset(keep)
                        nxt[key] = min(nxt.get(key, np.inf), cost)
        states = nxt
    return min(states.values())


@pytest.mark.parametrize("seed", range(6))
def test_equal_rows_match_the_exhaustive_optimum(seed):
    rng = np.random.default_rng(seed)
    active = rng.random((7, 5)) < 0.5
    sizes = np.full(5, 3.0)
    for slots in range(0, 6):
        bound = min_flash_bytes(active, sizes, 3.0 * slots).sum()
        assert bound == pytest.approx(brute_force(active, sizes, 3.0 * slots))


@pytest.mark.parametrize("seed", range(6))
def test_unequal_rows_never_exceed_the_optimum_and_cover_first_reads(seed):
    rng = np.random.default_rng(100 + seed)
    active = rng.random((6, 5)) < 0.5
    sizes = rng.integers(1, 5, 5).astype(float)
    first_reads = sum(sizes[j] for j in range(5) if active[:, j].any())
    for capacity in (0.0, 2.0, 5.0, 9.0, sizes.sum()):
        bound = min_flash_bytes(active, sizes, capacity).sum()
        assert first_reads - 1e-9 <= bound <= brute_force(active, sizes, capacity) + 1e-9
    assert min_flash_bytes(active, sizes, sizes.sum()).sum() == pytest.approx(first_reads)
    assert min_flash_bytes(active, sizes, 0.0).sum() == pytest.approx(float((active * sizes).sum()))


def test_a_warm_cache_saves_its_bytes():
    active = np.ones((3, 2), bool)
    sizes = np.array([4.0, 4.0])
    assert min_flash_bytes(active, sizes, 8.0).tolist() == [8.0, 0.0, 0.0]
    assert min_flash_bytes(active, sizes, 8.0, cached=sizes).tolist() == [0.0, 0.0, 0.0]
    assert min_flash_bytes(active, sizes, 6.0).tolist() == [8.0, 2.0, 2.0]  # 6 of 8 bytes kept


def test_next_request():
    active = np.array([[1, 0], [0, 0], [1, 1]], bool)
    assert next_request(active).tolist() == [[2, 2], [2, 2], [3, 3]]


def test_bad_input_is_a_clear_error():
    with pytest.raises(InvalidArgumentError, match="row_bytes"):
        min_flash_bytes(np.ones((2, 3), bool), np.ones(2), 1.0)
    with pytest.raises(InvalidArgumentError, match="capacity"):
        min_flash_bytes(np.ones((2, 3), bool), np.ones(3), -1.0)


def test_reference_policies_read_at_least_the_bound():
    from activeflow_jax.runtime.bound import lru_flash_bytes, static_flash_bytes

    rng = np.random.default_rng(7)
    active = rng.random((40, 30)) < 0.3
    sizes = rng.integers(1, 4, 30).astype(float)
    for capacity in (0.0, 10.0, 25.0, sizes.sum()):
        bound = min_flash_bytes(active, sizes, capacity).sum()
        assert lru_flash_bytes(active, sizes, capacity).sum() >= bound - 1e-9
    cyclic = np.tile(np.eye(3, dtype=bool), (4, 1))  # rows 0,1,2,0,1,2,...: LRU with 2 slots always misses
    ones = np.ones(3)
    assert lru_flash_bytes(cyclic, ones, 2.0).sum() == 12
    assert min_flash_bytes(cyclic, ones, 2.0).sum() < 12
    assert static_flash_bytes(cyclic, ones, 2.0).sum() == 4  # rows 0 and 1 stay; row 2's four uses miss
    assert static_flash_bytes(active, sizes, sizes.sum()).sum() == 0
