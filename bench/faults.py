"""User-caused faults against the real `activeflow` command, one outcome class each (absl flags).

    python bench/faults.py --output /tmp/faults.json                  # this checkout
    python bench/faults.py --code_root /tmp/af_base --output b.json   # another copy of the package

Each fault is set up on a tiny random store in a fresh folder (ACTIVEFLOW_HOME points there, so
the real default model is never touched) and run as a subprocess. Outcome classes:
    clear_error   exit code 2, one `activeflow: error:` line, no traceback
    traceback     a Python traceback reached the user
    hang          no exit within --timeout_s
    ok            exit code 0 (what "ok" means for the fault is in its `check`)
plus, per fault, what it did to the data (`data`: kept / lost / damage_left / repaired, ...).
The file-system faults (read-only, full) mount small tmpfs folders and need root; they are
skipped otherwise. Not a test: tests/test_reliability.py keeps these as tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("code_root", None, "folder holding the activeflow_jax package to probe (default: this checkout)")
flags.DEFINE_string("only", None, "comma-separated fault names to run (default: all)")
flags.DEFINE_integer("timeout_s", 120, "a command running longer than this counts as a hang")
flags.DEFINE_string("output", None, "write the JSON record here too")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Probe:
    def __init__(self, work: str):
        self.work = work
        self.code_root = FLAGS.code_root or ROOT

    def run(self, *args, env=None, timeout=None) -> dict:
        argv = [sys.executable, "-m", "activeflow_jax", *[a if isinstance(a, bytes) else str(a) for a in args]]
        full_env = {**os.environ, "PYTHONPATH": self.code_root, "ACTIVEFLOW_HOME": os.path.join(self.work, "home"),
                    **(env or {})}
        start = time.perf_counter()
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=timeout or FLAGS.timeout_s, env=full_env,
                                  cwd=self.work)
        except subprocess.TimeoutExpired:
            return {"outcome": "hang", "rc": None, "seconds": round(time.perf_counter() - start, 1), "message": ""}
        err = proc.stderr.decode(errors="replace")
        if "Traceback" in err:
            outcome, message = "traceback", err.strip().splitlines()[-1][:300]
        elif proc.returncode == 0:
            outcome, message = "ok", proc.stdout.decode(errors="replace").strip()[-200:]
        elif proc.returncode == 2 and "error:" in err:
            outcome, message = "clear_error", err.strip().splitlines()[-1][:300]
        else:
            outcome, message = f"exit_{proc.returncode}", err.strip()[-300:]
        return {"outcome": outcome, "rc": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
                "message": message, "stdout": proc.stdout.decode(errors="replace")[-500:]}


def _tiny(work: str, name: str = "t"):
    sys.path.insert(0, FLAGS.code_root or ROOT)
    from activeflow_jax.testing import make_tiny_store

    return make_tiny_store(os.path.join(work, name))


def _mount_tmpfs(path: str, size: str) -> bool:
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path]).returncode == 0


def _umount(path: str) -> None:
    subprocess.run(["umount", "-l", path], capture_output=True)


def _damage_first_shard(store: str, tensor: str = "layers.0.mlp.w_down") -> None:
    shard = os.path.join(store, "tensors", tensor, "c", "0", "0")
    with open(shard, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))


def _edit_manifest(store: str, edit) -> None:
    path = os.path.join(store, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    edit(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)


def fault_overwrite_non_store(p: Probe) -> dict:
    tiny = _tiny(p.work)
    folder = os.path.join(p.work, "photos")
    os.makedirs(folder)
    with open(os.path.join(folder, "holiday.jpg"), "w") as f:
        f.write("precious")
    r = p.run("convert", tiny.gguf_path, folder, "--overwrite")
    r["data"] = "kept" if os.path.isfile(os.path.join(folder, "holiday.jpg")) else "lost"
    return r


def fault_overwrite_holding_source(p: Probe) -> dict:
    tiny = _tiny(p.work)
    r = p.run("convert", tiny.gguf_path, os.path.dirname(tiny.gguf_path), "--overwrite")
    r["data"] = "kept" if os.path.isfile(tiny.gguf_path) else "lost (the GGUF was deleted)"
    return r


def fault_damaged_chunk_then_convert(p: Probe) -> dict:
    tiny = _tiny(p.work)
    _damage_first_shard(tiny.store_path)
    r = p.run("convert", tiny.gguf_path, tiny.store_path, "--overwrite")
    after = p.run("generate", "hi", "--store", tiny.store_path, "--max-new-tokens", "2")
    r["data"] = "repaired" if after["outcome"] == "ok" else f"damage_left ({after['outcome']})"
    return r


def fault_damaged_chunk_then_fetch(p: Probe) -> dict:
    # the default store path under ACTIVEFLOW_HOME holding a converted tiny model cannot be "the default
    # model" (its source hash differs), so this fault is the verify command on a damaged store instead
    tiny = _tiny(p.work)
    _damage_first_shard(tiny.store_path)
    r = p.run("verify", "--store", tiny.store_path)
    r["data"] = "damage reported" if r["rc"] == 1 and "layers.0.mlp.w_down" in r["message"] + r.get("stdout", "") \
        else "not reported"
    return r


def fault_nan_weights(p: Probe) -> dict:
    sys.path.insert(0, FLAGS.code_root or ROOT)
    import numpy as np

    from activeflow_jax.testing import write_tiny_gguf

    path = os.path.join(p.work, "nan.gguf")
    write_tiny_gguf(path)
    import gguf

    reader = gguf.GGUFReader(path)
    tensor = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    offset = int(tensor.data_offset)
    with open(path, "r+b") as f:
        f.seek(offset + 4 * 7)
        f.write(np.float32("nan").tobytes())
    out = os.path.join(p.work, "nanstore")
    r = p.run("convert", path, out)
    r["data"] = "store written" if os.path.isdir(out) else "nothing written"
    return r


def fault_readonly_fs_convert(p: Probe) -> dict:
    tiny = _tiny(p.work)
    mnt = os.path.join(p.work, "ro")
    if not _mount_tmpfs(mnt, "8m"):
        return {"outcome": "skipped", "message": "needs root to mount a tmpfs"}
    try:
        subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)
        return p.run("convert", tiny.gguf_path, os.path.join(mnt, "store"))
    finally:
        _umount(mnt)


def fault_full_disk_convert(p: Probe) -> dict:
    tiny = _tiny(p.work)
    mnt = os.path.join(p.work, "full")
    if not _mount_tmpfs(mnt, "256k"):
        return {"outcome": "skipped", "message": "needs root to mount a tmpfs"}
    try:
        r = p.run("convert", tiny.gguf_path, os.path.join(mnt, "store"))
        left = [e for e in os.listdir(mnt)]
        r["data"] = f"left behind: {left}" if left else "nothing left behind"
        return r
    finally:
        _umount(mnt)


def fault_readonly_store_budget(p: Probe) -> dict:
    tiny = _tiny(p.work)
    mnt = os.path.join(p.work, "rostore")
    if not _mount_tmpfs(mnt, "64m"):
        return {"outcome": "skipped", "message": "needs root to mount a tmpfs"}
    try:
        store = os.path.join(mnt, "store")
        shutil.copytree(tiny.store_path, store)
        subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)
        return p.run("generate", "hello", "--store", store, "--max-new-tokens", "3", "--dram-budget", "2MB",
                     "--sparsity", "0.5", "--policy", "topk", "--group-size", "1", "--kv-tokens", "32")
    finally:
        _umount(mnt)


def fault_surrogate_prompt(p: Probe) -> dict:
    tiny = _tiny(p.work)
    return p.run("generate", b"caf\xe9 \xff", "--store", tiny.store_path, "--max-new-tokens", "2")


def _int_fault(*extra):
    def fault(p: Probe) -> dict:
        tiny = _tiny(p.work)
        return p.run("generate", "hi", "--store", tiny.store_path, *extra)

    return fault


def _manifest_fault(edit, command=("generate", "hi", "--max-new-tokens", "2")):
    def fault(p: Probe) -> dict:
        tiny = _tiny(p.work)
        _edit_manifest(tiny.store_path, edit)
        r = p.run(*command[:2], "--store", tiny.store_path, *command[2:])
        return r

    return fault


def _set_model(key, value):
    return lambda m: m["model"].__setitem__(key, value)


def _set_tensor(name, key, value):
    return lambda m: m["tensors"][name].__setitem__(key, value)


BUDGET = ("--dram-budget", "2MB", "--sparsity", "0.5", "--policy", "topk")
FAULTS = {
    "overwrite_non_store_folder": fault_overwrite_non_store,
    "overwrite_folder_holding_source": fault_overwrite_holding_source,
    "damaged_chunk_then_convert_overwrite": fault_damaged_chunk_then_convert,
    "damaged_chunk_verify": fault_damaged_chunk_then_fetch,
    "nan_weights_convert": fault_nan_weights,
    "readonly_fs_convert": fault_readonly_fs_convert,
    "full_disk_convert": fault_full_disk_convert,
    "readonly_store_under_budget": fault_readonly_store_budget,
    "surrogate_prompt": fault_surrogate_prompt,
    "max_new_tokens_huge": _int_fault("--max-new-tokens", str(10 ** 30)),
    "max_new_tokens_negative": _int_fault("--max-new-tokens", "-5"),
    "seed_negative": _int_fault("--seed", "-1", "--max-new-tokens", "2"),
    "seed_2_64": _int_fault("--seed", str(2 ** 64), "--max-new-tokens", "2"),
    "kv_tokens_huge": _int_fault(*BUDGET, "--group-size", "1", "--kv-tokens", str(10 ** 20), "--max-new-tokens", "2"),
    "group_size_huge": _int_fault(*BUDGET, "--group-size", str(10 ** 9), "--max-new-tokens", "2"),
    "group_size_negative": _int_fault(*BUDGET, "--group-size", "-3", "--max-new-tokens", "2"),
    "dense_tiny_store_planned": _int_fault("--dram-budget", "0.9", "--max-new-tokens", "2"),
    "manifest_d_model_zero": _manifest_fault(_set_model("d_model", 0)),
    "manifest_num_heads_zero": _manifest_fault(_set_model("num_heads", 0)),
    "manifest_vocab_negative": _manifest_fault(_set_model("vocab_size", -5)),
    "manifest_layers_more": _manifest_fault(_set_model("num_layers", 3)),
    "manifest_layers_fewer": _manifest_fault(_set_model("num_layers", 1)),
    "manifest_max_context_zero": _manifest_fault(_set_model("max_context", 0)),
    "manifest_shape_negative": _manifest_fault(_set_tensor("layers.0.attn.wo", "shape", [-64, 64])),
    "manifest_shape_wrong": _manifest_fault(_set_tensor("layers.0.attn.wo", "shape", [32, 64])),
    "manifest_chunk_rows_zero": _manifest_fault(_set_tensor("layers.0.attn.wo", "chunk_rows", 0)),
    "manifest_shard_rows_negative": _manifest_fault(_set_tensor("layers.0.attn.wo", "shard_rows", -8)),
    "manifest_dtype_unknown": _manifest_fault(lambda m: m.__setitem__("storage_dtype", "int3")),
    "manifest_norm_eps_string": _manifest_fault(_set_model("norm_eps", "small")),
}


def main(argv):
    del argv
    names = FLAGS.only.split(",") if FLAGS.only else list(FAULTS)
    results = {}
    for name in names:
        work = tempfile.mkdtemp(prefix=f"af-fault-{name}-")
        try:
            results[name] = FAULTS[name](Probe(work))
        except Exception as exc:  # the probe's own setup failed
            results[name] = {"outcome": "probe_failed", "message": f"{type(exc).__name__}: {exc}"}
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"{name:40s} {results[name]['outcome']:12s} {results[name].get('data', '')}  "
              f"{results[name].get('message', '')[:150]}", file=sys.stderr, flush=True)
    counts: dict[str, int] = {}
    for r in results.values():
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    record = {"code_root": FLAGS.code_root or ROOT, "faults": results, "outcome_counts": counts}
    from common import emit  # bench/common.py: time and machine added, one JSON line, appended to --output

    emit(record, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
