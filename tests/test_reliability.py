"""Reliability (issue 27): no hang, no data loss, repairs that repair, clear errors for every
user-caused failure. Tiny random stores, seconds each."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import activeflow_jax as af
from activeflow_jax.errors import ActiveFlowError, InvalidArgumentError


def run_cli(*args, timeout=300, env=None):
    argv = [a if isinstance(a, bytes) else str(a) for a in args]
    return subprocess.run([sys.executable, "-m", "activeflow_jax", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def assert_clean_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def _in_thread(fn, timeout=60.0):
    """fn() run on another thread; its result, or the exception it raised. Fails on a hang."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"call did not return within {timeout} s: the engine lock is held"
    if "error" in box:
        raise box["error"]
    return box["value"]


# -- 1. an unfinished stream never blocks the engine ------------------------------------------------

def test_unfinished_stream_does_not_block_other_threads(tiny_engine):
    expected = tiny_engine.generate("hello", max_new_tokens=6)
    stream = tiny_engine.stream("hello", max_new_tokens=20)
    next(stream)  # started, then left alone: neither exhausted nor closed
    assert _in_thread(lambda: tiny_engine.generate("hello", max_new_tokens=6)) == expected
    ids = tiny_engine.tokenizer.encode("hello")
    assert _in_thread(lambda: tiny_engine.logits(ids)).shape[0] == len(ids)
    del stream


def test_interleaved_streams_and_cross_thread_consumption(tiny_engine):
    prompts = ("the river", "a stone bridge")
    alone = [list(tiny_engine.generate_ids(tiny_engine.tokenizer.encode(p), max_new_tokens=8, stop_ids=frozenset()))
             for p in prompts]
    a, b = (tiny_engine.generate_ids(tiny_engine.tokenizer.encode(p), max_new_tokens=8, stop_ids=frozenset())
            for p in prompts)
    got_a, got_b = [], []
    for x, y in zip(a, b):  # one step of each in turn: each keeps its own KV cache
        got_a.append(x)
        got_b.append(y)
    assert [got_a, got_b] == alone
    c = tiny_engine.generate_ids(tiny_engine.tokenizer.encode(prompts[0]), max_new_tokens=8, stop_ids=frozenset())
    first = next(c)  # started here, finished on another thread
    assert [first] + _in_thread(lambda: list(c)) == alone[0]


def test_stream_of_a_closed_engine_fails_clearly(tiny_model):
    engine = af.Engine.load(tiny_model.store_path)
    stream = engine.stream("hello", max_new_tokens=10)
    next(stream)
    engine.close()
    with pytest.raises(InvalidArgumentError, match="closed"):
        list(stream)
    with pytest.raises(InvalidArgumentError, match="closed"):
        engine.generate("hello", max_new_tokens=2)


# -- 2. --overwrite replaces only a store ---------------------------------------------------------

def test_overwrite_refuses_a_folder_that_is_not_a_store(tiny_model, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_text("precious")
    assert_clean_error(run_cli("convert", tiny_model.gguf_path, folder, "--overwrite"), "not an activeflow store")
    assert (folder / "holiday.jpg").read_text() == "precious"
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".")]  # no temporary folder left either


def test_overwrite_refuses_the_folder_holding_the_source(tmp_path):
    from activeflow_jax.testing import write_tiny_gguf

    src = tmp_path / "models" / "tiny.gguf"
    src.parent.mkdir()
    write_tiny_gguf(src)
    assert_clean_error(run_cli("convert", src, src.parent, "--overwrite"), "holds", "being converted")
    for out in (tmp_path, src):  # an ancestor, the file itself
        with pytest.raises(InvalidArgumentError, match="being converted"):
            af.convert(src, out, overwrite=True, progress=False)
    assert src.is_file()


def test_overwrite_replaces_a_store_and_an_empty_folder(tiny_model, tmp_path):
    from activeflow_jax.store.reader import StoreReader
    from activeflow_jax.store.writer import is_store

    store = tmp_path / "s"
    store.mkdir()
    af.convert(tiny_model.gguf_path, store, dtype="float16", overwrite=True, progress=False)  # empty: replaced
    assert is_store(str(store))
    af.convert(tiny_model.gguf_path, store, dtype="float32", overwrite=True, progress=False)  # a store: replaced
    assert StoreReader(store).storage_dtype == "float32"


# -- 3. repairs that repair; verify --------------------------------------------------------------

def _flip_byte(path, offset=100):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_verify_lists_damage_and_convert_repairs_it(tmp_path):
    from activeflow_jax.testing import make_tiny_store

    tiny = make_tiny_store(tmp_path)
    assert af.verify_store(tiny.store_path).ok
    _flip_byte(os.path.join(tiny.store_path, "tensors", "layers.0.mlp.w_down", "c", "0", "0"))
    _flip_byte(os.path.join(tiny.store_path, "tensors", "layers.1.attn.wo", "c", "0", "0"))
    report = af.verify_store(tiny.store_path)
    assert not report.ok and report.tensors_damaged
    assert any("layers.0.mlp.w_down" in p for p in report.problems)
    assert any("layers.1.attn.wo" in p for p in report.problems)
    proc = run_cli("verify", "--store", tiny.store_path)
    assert proc.returncode == 1 and "DAMAGED" in proc.stdout and "layers.0.mlp.w_down" in proc.stdout
    assert "activeflow convert" in proc.stdout and "Traceback" not in proc.stderr
    # the advised repair repairs: the same source, the same dtype, but a damaged store -> converted again
    proc = run_cli("convert", tiny.gguf_path, tiny.store_path, "--overwrite")
    assert proc.returncode == 0 and "damaged" in proc.stderr, proc.stderr
    assert af.verify_store(tiny.store_path).ok
    assert run_cli("verify", "--store", tiny.store_path).returncode == 0


def test_verify_reports_a_damaged_manifest_and_missing_chunks(tmp_path):
    from activeflow_jax.testing import make_tiny_store

    tiny = make_tiny_store(tmp_path)
    os.remove(os.path.join(tiny.store_path, "tensors", "embed", "c", "0", "0"))
    report = af.verify_store(tiny.store_path)
    assert not report.ok and any("embed" in p and "missing" in p for p in report.problems)
    with open(os.path.join(tiny.store_path, "manifest.json"), "w") as f:
        f.write("{not json")
    report = af.verify_store(tiny.store_path)
    assert not report.ok and report.problems[0].startswith("manifest")
    assert_clean_error(run_cli("verify", "--store", tmp_path / "nothing"), "not found")


def test_verify_checks_streaming_layouts(tmp_path):
    from activeflow_jax.store.bundles import layout_dir, write_bundles
    from activeflow_jax.testing import make_tiny_store

    tiny = make_tiny_store(tmp_path)
    write_bundles(tiny.store_path, 2)
    report = af.verify_store(tiny.store_path)
    assert report.ok and report.layouts_checked == [2]
    shard = os.path.join(layout_dir(tiny.store_path, 2), "down", "g0", "c", "0", "0", "0")
    _flip_byte(shard, 40)
    report = af.verify_store(tiny.store_path)
    assert not report.ok and not report.tensors_damaged and "relayout" in report.problems[0]


def test_fetch_verifies_and_reconverts_a_damaged_default_store(tmp_path, monkeypatch):
    """fetch_default_model(verify=True) (what `activeflow fetch` runs) repairs a damaged store; the
    tiny GGUF stands in for the downloaded default model."""
    from activeflow_jax import fetch
    from activeflow_jax.formats.gguf_import import file_sha256
    from activeflow_jax.testing import write_tiny_gguf

    gguf_path = str(tmp_path / "tiny.gguf")
    write_tiny_gguf(gguf_path)
    monkeypatch.setenv("ACTIVEFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(fetch, "DEFAULT_MODEL", dataclasses_replace(fetch.DEFAULT_MODEL, gguf_sha256=file_sha256(gguf_path)))
    monkeypatch.setattr(fetch, "fetch_default_gguf", lambda *a, **k: gguf_path)
    store = fetch.fetch_default_model(quiet=True)
    _flip_byte(os.path.join(store, "tensors", "layers.1.mlp.w_gate_up", "c", "0", "0"))
    assert fetch.fetch_default_model(quiet=True) == store and not af.verify_store(store).ok  # a plain load: fast
    fetch.fetch_default_model(quiet=True, verify=True)
    assert af.verify_store(store).ok


def dataclasses_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


# -- 4. non-finite weights ------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["nan", "inf"])
def test_conversion_refuses_non_finite_weights(tmp_path, value):
    import gguf

    from activeflow_jax.errors import NonFiniteWeightsError
    from activeflow_jax.testing import write_tiny_gguf

    path = str(tmp_path / "bad.gguf")
    write_tiny_gguf(path)
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.1.ffn_down.weight")
    with open(path, "r+b") as f:
        f.seek(int(tensor.data_offset) + 4 * 7)
        f.write(np.float32(value).tobytes())
    with pytest.raises(NonFiniteWeightsError, match="layers.1.mlp.w_down"):
        af.convert(path, tmp_path / "s", progress=False)
    assert not os.path.exists(tmp_path / "s")
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".")]
    assert_clean_error(run_cli("convert", path, tmp_path / "s2"), "non-finite", "layers.1.mlp.w_down")


def test_float16_overflow_is_refused(tmp_path):
    from activeflow_jax.errors import NonFiniteWeightsError
    from activeflow_jax.store.writer import write_store
    from activeflow_jax.config import tiny_config

    with pytest.raises(NonFiniteWeightsError, match="float16"):
        write_store(tmp_path / "s", tiny_config(), {}, [("embed", np.full((4, 4), 1e6, np.float32))], dtype="float16")


# -- 5. file-system faults, bad text, bad numbers, tampered manifests: clear errors ----------------

@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, read_only=False) -> a fresh tmpfs folder (root only; skips otherwise)."""
    mounted = []

    def mount(size: str, read_only: bool = False, fill=None) -> str:
        if os.geteuid() != 0:
            pytest.skip("needs root to mount a small tmpfs (a full or read-only file system)")
        path = str(tmp_path / f"mnt{len(mounted)}")
        os.makedirs(path)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path]).returncode:
            pytest.skip("cannot mount a tmpfs here")
        mounted.append(path)
        if fill is not None:
            fill(path)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", path], check=True)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", path], capture_output=True)


def test_convert_onto_a_read_only_file_system(tiny_model, tmpfs):
    ro = tmpfs("1m", read_only=True)
    assert_clean_error(run_cli("convert", tiny_model.gguf_path, os.path.join(ro, "s")), "read-only")


def test_convert_onto_a_full_file_system_leaves_nothing(tiny_model, tmpfs):
    full = tmpfs("256k")
    proc = run_cli("convert", tiny_model.gguf_path, os.path.join(full, "s"))
    assert_clean_error(proc, "full", "nothing was written")
    assert os.listdir(full) == []  # no hidden temporary folder left behind


def test_read_only_store_under_a_budget(tiny_model, tmpfs):
    from activeflow_jax.store.bundles import write_bundles

    import shutil

    def copy(path):
        shutil.copytree(tiny_model.store_path, os.path.join(path, "s"))

    ro = tmpfs("16m", read_only=True, fill=copy)
    store = os.path.join(ro, "s")
    with pytest.raises(af.StoreError, match="read-only"):
        af.Engine.load(store, dram_budget="2MB", sparsity=0.5, policy="topk", group_size=1, kv_tokens=32, progress=False)
    proc = run_cli("generate", "hi", "--store", store, "--dram-budget", "2MB", "--sparsity", "0.5", "--policy", "topk",
                   "--group-size", "1", "--max-new-tokens", "2")
    assert_clean_error(proc, "read-only", "relayout")

    def copy_with_layout(path):
        copy(path)
        write_bundles(os.path.join(path, "s"), 2)

    ro2 = tmpfs("16m", read_only=True, fill=copy_with_layout)  # a layout it already has: used instead
    engine = af.Engine.load(os.path.join(ro2, "s"), dram_budget="2MB", sparsity=0.5, policy="topk", kv_tokens=32,
                            plan=False, progress=False)
    assert engine._swap_settings["group_size"] == 2
    assert engine.generate("hi", max_new_tokens=3) == af.Engine.load(tiny_model.store_path).generate("hi", max_new_tokens=3)


def test_write_errors_are_named_without_root(tiny_model, tmp_path, monkeypatch):
    """The same errors where mounting is not allowed: os-level failures injected."""
    import errno

    from activeflow_jax.store import writer

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "write_json_durably", no_space)
    with pytest.raises(af.StoreError, match="full"):
        af.convert(tiny_model.gguf_path, tmp_path / "s", progress=False)
    assert os.listdir(tmp_path) == []

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(writer, "new_temporary_dir", read_only)
    with pytest.raises(af.StoreError, match="read-only"):
        af.convert(tiny_model.gguf_path, tmp_path / "s", progress=False)


def test_prompts_that_are_not_valid_text(tiny_engine, tiny_model):
    with pytest.raises(InvalidArgumentError, match="lone surrogate"):
        tiny_engine.generate("caf\udcff", max_new_tokens=2)
    with pytest.raises(InvalidArgumentError, match="system prompt"):
        tiny_engine.generate("hi", chat=True, system="\ud800", max_new_tokens=2)
    proc = run_cli("generate", b"caf\xe9 \xff", "--store", tiny_model.store_path, "--max-new-tokens", "2")
    assert_clean_error(proc, "not valid text")


@pytest.mark.parametrize("args,needle", [
    (("--seed", str(2 ** 64)), "seed"),
    (("--max-new-tokens", str(10 ** 30)), "max_new_tokens"),
    (("--max-new-tokens", "0"), "max_new_tokens"),
    (("--dram-budget", "0.9", "--sparsity", "0.5", "--policy", "topk", "--group-size", "1", "--kv-tokens",
      str(10 ** 20)), "kv_tokens"),
    (("--dram-budget", "0.9", "--sparsity", "0.5", "--policy", "topk", "--group-size", str(10 ** 9)), "group"),
    (("--dram-budget", "0.9", "--sparsity", "0.5", "--policy", "topk", "--group-size", "-2"), "group"),
])
def test_out_of_range_integer_arguments(tiny_model, args, needle):
    assert_clean_error(run_cli("generate", "hi", "--store", tiny_model.store_path, *args), needle)


MANIFEST_EDITS = {
    "d_model zero": lambda m: m["model"].__setitem__("d_model", 0),
    "num_heads zero": lambda m: m["model"].__setitem__("num_heads", 0),
    "vocab negative": lambda m: m["model"].__setitem__("vocab_size", -5),
    "more layers": lambda m: m["model"].__setitem__("num_layers", 3),
    "huge layer count": lambda m: m["model"].__setitem__("num_layers", 2 ** 62),
    "fewer layers": lambda m: m["model"].__setitem__("num_layers", 1),
    "max_context zero": lambda m: m["model"].__setitem__("max_context", 0),
    "norm_eps text": lambda m: m["model"].__setitem__("norm_eps", "small"),
    "rope_theta negative": lambda m: m["model"].__setitem__("rope_theta", -1.0),
    "shape negative": lambda m: m["tensors"]["layers.0.attn.wo"].__setitem__("shape", [-64, 64]),
    "shape wrong": lambda m: m["tensors"]["layers.0.attn.wo"].__setitem__("shape", [32, 64]),
    "chunk rows zero": lambda m: m["tensors"]["layers.0.attn.wo"].__setitem__("chunk_rows", 0),
    "shard rows negative": lambda m: m["tensors"]["layers.0.attn.wo"].__setitem__("shard_rows", -8),
    "dtype unknown": lambda m: m.__setitem__("storage_dtype", "int3"),
    "tensors not a record": lambda m: m.__setitem__("tensors", [1, 2]),
}


@pytest.fixture
def fresh_store(tmp_path, tiny_model):
    import shutil

    path = str(tmp_path / "store")
    shutil.copytree(tiny_model.store_path, path)
    return path


def _edit_manifest(store, edit):
    import json

    path = os.path.join(store, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    edit(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)


@pytest.mark.parametrize("case", sorted(MANIFEST_EDITS))
def test_tampered_manifests_are_refused(fresh_store, case):
    _edit_manifest(fresh_store, MANIFEST_EDITS[case])
    with pytest.raises(af.StoreError, match="re-convert"):
        af.Engine.load(fresh_store)
    report = af.verify_store(fresh_store)
    assert not report.ok and report.problems[0].startswith("manifest")


def test_tampered_manifest_on_the_command_line(fresh_store):
    _edit_manifest(fresh_store, MANIFEST_EDITS["fewer layers"])
    assert_clean_error(run_cli("generate", "hi", "--store", fresh_store, "--max-new-tokens", "2"), "layers")


# -- 6. budget accounting users can trust ----------------------------------------------------------

CAPPED_CHILD = r"""
import json, sys
import activeflow_jax as af
engine = af.Engine.load(sys.argv[1], dram_budget=float(sys.argv[2]) if "." in sys.argv[2] else int(sys.argv[2]), sparsity=0.5, policy="topk", group_size=1,
                        kv_tokens=64, progress=False, **({"budget_includes_process": True} if sys.argv[3] == "1" else {}))
text = engine.generate("the river runs past the old mill", max_new_tokens=24)
m = engine.stats.memory
print(json.dumps({"budget": m["budget"], "process_baseline": m["process_baseline"], "covers": m["budget_covers_process"],
                  "scope": m["scope"], "explanation": engine.plan_explanation, "peak_rss": engine.stats.peak_rss_bytes,
                  "tokens": engine.stats.decode_tokens}))
"""


@pytest.fixture(scope="module")
def mid_store(tmp_path_factory):
    """A random model of ~16 MB (4 layers, d=256, vocab 4096): big enough that the budget matters."""
    from activeflow_jax.config import tiny_config
    from activeflow_jax.testing import make_tiny_store

    cfg = tiny_config(num_layers=4, d_model=256, d_ff=704, num_heads=4, num_kv_heads=2, head_dim=64, vocab_size=4096)
    return make_tiny_store(tmp_path_factory.mktemp("mid"), cfg).store_path


def test_every_budget_report_says_what_it_covers(mid_store):
    engine = af.Engine.load(mid_store, dram_budget=0.9, sparsity=0.5, policy="topk", group_size=1, kv_tokens=64,
                            progress=False)
    engine.generate("hello", max_new_tokens=3)
    m = engine.stats.memory
    assert m["budget_covers_process"] is False and m["process_baseline"] > 100e6 and m["process_rss"] > 0
    assert "NOT the process" in m["scope"] and "NOT the process" in engine.plan_explanation
    proc = run_cli("generate", "hi", "--store", mid_store, "--dram-budget", "0.9", "--sparsity", "0.5", "--policy",
                   "topk", "--group-size", "1", "--kv-tokens", "64", "--max-new-tokens", "2", "--stats")
    assert proc.returncode == 0 and "NOT the process" in proc.stderr and "process RSS now" in proc.stderr, proc.stderr
    from activeflow_jax.runtime.budget import current_rss

    # the whole process: this pytest process may already hold GBs of earlier tests' models
    whole = af.Engine.load(mid_store, dram_budget=current_rss() + 900_000_000, sparsity=0.5, policy="topk",
                           group_size=1, kv_tokens=64, progress=False, budget_includes_process=True)
    assert whole.stats.memory["budget_covers_process"] and "covers the whole process" in whole.plan_explanation


@pytest.mark.parametrize("whole_process", [False, True])
def test_engine_runs_in_a_cgroup_capped_at_budget_plus_reported_process(mid_store, whole_process):
    import json

    from activeflow_jax.runtime import memcap

    reason = memcap.available()
    if reason is not None:
        pytest.skip(reason)
    argv = [sys.executable, "-c", CAPPED_CHILD, mid_store, "0.9", "1" if whole_process else "0"]
    if whole_process:  # the budget is the whole process: give it room for that, then cap at the budget alone
        argv[4] = str(900_000_000)
    first = subprocess.run(argv, capture_output=True, text=True, timeout=300)  # uncapped: what it reports
    assert first.returncode == 0, first.stderr[-2000:]
    report = json.loads(first.stdout.strip().splitlines()[-1])
    cap = report["budget"] + (0 if report["covers"] else report["process_baseline"])
    run = memcap.run_capped(argv, cap, timeout=300)
    assert not run.oom_killed and run.returncode == 0, (cap, run.peak_bytes, run.stderr[-2000:])
    capped = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"cap {cap / 1e6:.0f} MB, cgroup peak {run.peak_bytes / 1e6:.0f} MB, child peak RSS {capped['peak_rss'] / 1e6:.0f} MB")
    assert capped["tokens"] == 23 and run.peak_bytes <= cap


# -- 7. a new streaming layout says its size; short of disk, the others go first -------------------

def test_new_layout_is_announced_and_others_removed_when_space_is_short(tmp_path, monkeypatch, capsys):
    import collections

    from activeflow_jax.store import bundles
    from activeflow_jax.testing import make_tiny_store

    store = make_tiny_store(tmp_path).store_path
    bundles.write_bundles(store, 1, progress=True)
    err = capsys.readouterr().err
    needed = bundles.layout_bytes(bundles.StoreReader(store))
    assert f"{needed / 1e6:.0f} MB more on disk in {bundles.layout_dir(store, 1)}" in err
    bundles.write_bundles(store, 2)  # plenty of space: both stay
    assert bundles.available_group_sizes(store) == [1, 2]
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(bundles.shutil, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9, int(1.5 * needed)))
    bundles.write_bundles(store, 4)
    assert "disk space is short" in capsys.readouterr().err
    assert bundles.available_group_sizes(store) == [4]
    bundles.write_bundles(store, 1, remove_others=False)  # asked to keep them: kept
    assert bundles.available_group_sizes(store) == [1, 4]
    monkeypatch.setattr(bundles.shutil, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9, needed // 2))
    with pytest.raises(af.StoreError, match="free"):
        bundles.write_bundles(store, 2, remove_others=False)
    assert bundles.available_group_sizes(store) == [1, 4]


# -- what bench/fuzz.py found ------------------------------------------------------------------------

def test_damaged_gguf_array_count_is_refused_fast(tmp_path):
    """A flipped high bit in a metadata array's count made the gguf package parse for hours."""
    import struct
    import time

    from activeflow_jax.errors import GGUFError
    from activeflow_jax.testing import write_tiny_gguf

    path = str(tmp_path / "t.gguf")
    write_tiny_gguf(path)
    data = bytearray(open(path, "rb").read())
    key = b"tokenizer.ggml.tokens"
    pos = data.index(key) + len(key) + 4 + 4  # key, value type (array), element type (string), then the count
    assert struct.unpack_from("<Q", data, pos)[0] == 300
    struct.pack_into("<Q", data, pos, 300 + (1 << 54))
    open(path, "wb").write(bytes(data))
    start = time.perf_counter()
    with pytest.raises(GGUFError, match="array count"):
        af.convert(path, tmp_path / "s", progress=False)
    assert time.perf_counter() - start < 30


def test_gguf_whose_strings_do_not_decode(tmp_path):
    from activeflow_jax.errors import GGUFError
    from activeflow_jax.testing import write_tiny_gguf

    path = str(tmp_path / "t.gguf")
    write_tiny_gguf(path)
    data = bytearray(open(path, "rb").read())
    pos = data.index(b"tiny-llama-F32")  # general.name's text
    data[pos] = 0xDC  # not UTF-8
    open(path, "wb").write(bytes(data))
    with pytest.raises((GGUFError, af.UnsupportedModelError)):
        af.convert(path, tmp_path / "s", progress=False)


@pytest.mark.parametrize("edit", [
    lambda m: m["model"].__setitem__("name", [-1, 64]),
    lambda m: m["model"].__setitem__("tie_embeddings", [0]),
    lambda m: m["model"].__setitem__("arch", 5),
    lambda m: m["tokenizer"].pop("merges"),
    lambda m: m.__setitem__("tokenizer", -1),
])
def test_fuzzed_manifests_give_clear_errors(fresh_store, edit):
    _edit_manifest(fresh_store, edit)
    with pytest.raises(ActiveFlowError):
        af.Engine.load(fresh_store)


REAL_CHILD = r"""
import json, sys
import activeflow_jax as af
from activeflow_jax.store.bundles import available_group_sizes
have = available_group_sizes(sys.argv[1])
engine = af.Engine.load(sys.argv[1], dram_budget=0.5, group_size=have[0] if have else 1, progress=False)
engine.generate("The history of the river town", max_new_tokens=8)
m = engine.stats.memory
print(json.dumps({"budget": m["budget"], "process_baseline": m["process_baseline"], "peak_rss": engine.stats.peak_rss_bytes}))
"""


@pytest.mark.real_model
def test_default_model_runs_in_a_cgroup_capped_at_budget_plus_reported_process(real_store):
    """The issue's case: the default model at dram_budget=0.5 (weights-only budget) inside a cgroup
    capped at the budget plus the process figure the engine reports beside it."""
    import json

    from activeflow_jax.runtime import memcap

    reason = memcap.available()
    if reason is not None:
        pytest.skip(reason)
    argv = [sys.executable, "-c", REAL_CHILD, real_store]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    report = json.loads(first.stdout.strip().splitlines()[-1])
    cap = report["budget"] + report["process_baseline"]
    run = memcap.run_capped(argv, cap, timeout=600)
    assert not run.oom_killed and run.returncode == 0, (cap, run.peak_bytes, run.stderr[-2000:])


def test_mappings_of_this_process_are_counted_on_linux():
    from activeflow_jax.runtime import mappings

    if not os.path.exists("/proc/self/maps"):
        pytest.skip("no /proc: the check is skipped on this platform")
    count, limit = mappings.mapping_count(), mappings.mapping_limit()
    assert 100 < count < limit


def test_load_near_the_mapping_limit_is_a_clear_error_not_a_crash(tiny_model, monkeypatch):
    """Compiling at vm.max_map_count crashes inside XLA (stop 29's CI); loading refuses first."""
    from activeflow_jax.runtime import mappings

    cleared = []
    monkeypatch.setattr(mappings, "mapping_limit", lambda: 65530)
    monkeypatch.setattr(mappings, "mapping_count", lambda: 65000)
    monkeypatch.setattr(mappings.jax, "clear_caches", lambda: cleared.append(True))
    with pytest.warns(RuntimeWarning, match="dropping JAX's cached compiled programs"):
        with pytest.raises(af.MappingLimitError, match="vm.max_map_count") as err:
            af.Engine.load(tiny_model.store_path, dram_budget="2MB", kv_tokens=64)
    assert cleared == [True] and "65,000" in str(err.value) and "sysctl" in str(err.value)

    counts = iter([65000, 2000])  # room after the caches are dropped: loads, with the warning
    monkeypatch.setattr(mappings, "mapping_count", lambda: next(counts))
    with pytest.warns(RuntimeWarning, match="near the kernel's limit"):
        engine = af.Engine.load(tiny_model.store_path)
    assert engine.generate("hi", max_new_tokens=2) is not None
    engine.close()
