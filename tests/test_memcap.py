"""The memory cgroup helper: a process over its cap is killed and reported; under it, it finishes."""

from __future__ import annotations

import sys

import pytest

from activeflow_jax.runtime import memcap

REASON = memcap.available()


@pytest.mark.skipif(REASON is not None, reason=f"no memory cgroup here: {REASON}")
def test_capped_process_is_killed_over_the_cap_and_runs_under_it():
    grab = "import sys; b = bytearray(int(sys.argv[1])); b[::4096] = b'x' * len(b[::4096]); print('ok')"
    small = memcap.run_capped([sys.executable, "-c", grab, str(40 << 20)], 200 << 20, timeout=60, cold=False)
    assert small.returncode == 0 and "ok" in small.stdout and not small.oom_killed
    assert small.peak_bytes is not None and (40 << 20) <= small.peak_bytes <= (200 << 20)
    big = memcap.run_capped([sys.executable, "-c", grab, str(400 << 20)], 200 << 20, timeout=60, cold=False)
    assert big.returncode != 0 and big.oom_killed


def test_unavailable_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(memcap, "available", lambda: "creating a memory cgroup needs root")
    with pytest.raises(memcap.CgroupUnavailableError, match="needs root"):
        memcap.MemoryCgroup(100 << 20)


@pytest.mark.skipif(REASON is not None, reason=f"no memory cgroup here: {REASON}")
def test_capped_run_reports_bytes_read_from_storage(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"\1" * (8 << 20))
    from activeflow_jax.runtime.iostats import drop_page_cache

    drop_page_cache(path)
    run = memcap.run_capped([sys.executable, "-c", f"open({str(path)!r}, 'rb').read()"], 300 << 20, timeout=60,
                            cold=False)
    assert run.returncode == 0
    assert run.read_bytes >= (8 << 20) - (1 << 20)
    assert run.max_rss_bytes > 0
