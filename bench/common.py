"""Shared pieces of the benchmark binaries: machine facts, bandwidth probe, JSON output, one setting
per child process."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }


def summarize(samples: list[float]) -> dict[str, float]:
    arr = np.asarray(samples, dtype=np.float64)
    return {"median": float(np.median(arr)), "p10": float(np.percentile(arr, 10)),
            "p90": float(np.percentile(arr, 90)), "n": int(arr.size)}


def memory_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> dict[str, float]:
    """Measured DRAM read bandwidth, bytes/s: a numpy copy (one thread, counts read + write)
    and a jitted XLA sum over the buffer (XLA's own threads, read only). The larger is the
    roofline we compare against: it is what our own XLA program could stream."""
    host = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(host)
    copy = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, host)
        copy.append(time.perf_counter() - t0)
    del dst
    dev = jnp.asarray(host)
    del host
    summ = jax.jit(lambda x: jnp.sum(x.reshape(64, -1), axis=1))
    summ(dev).block_until_ready()
    reads = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        summ(dev).block_until_ready()
        reads.append(time.perf_counter() - t0)
    return {
        "numpy_copy_bytes_per_s": 2 * nbytes / min(copy),
        "xla_read_bytes_per_s": nbytes / min(reads),
        "roofline_bytes_per_s": max(2 * nbytes / min(copy), nbytes / min(reads)),
    }


def emit(record: dict[str, Any], output: str | None) -> None:
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine_info(), **record}
    line = json.dumps(record)
    print(line)
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "a") as f:
            f.write(line + "\n")


def budget_arg(text: str) -> float | str:
    """A --budget flag as Engine.load takes it: a number ("0.6") as a float, a size ("200MB",
    "50%") as given."""
    return float(text) if text.replace(".", "", 1).isdigit() else text


def float_model(store: str | None):
    """(store path, StoreReader, every tensor as f32, Tokenizer) of a float (f32/f16) store of the
    model, default the default model's f32 store (which holds the GGUF's weights exactly): what the
    q4 benchmarks re-round in memory. A quantized store is refused."""
    import activeflow_jax as af
    from activeflow_jax import quant
    from activeflow_jax.formats.tokenizer import Tokenizer
    from activeflow_jax.store.reader import StoreReader

    store = store or af.fetch_default_model(dtype="f32", quiet=True)
    reader = StoreReader(store)
    if quant.is_quantized(reader.storage_dtype):
        raise SystemExit(f"{store} is a {reader.storage_dtype} store; give a float (f32/f16) store of the model")
    return store, reader, reader.read_many(reader.tensor_names), Tokenizer.from_spec(reader.tokenizer_spec)


def flat_perplexity(cfg, tensors: dict, tokenizer, text: str, windows: int, ctx: int = 512) -> float:
    """Perplexity on the first `windows` windows of `text` of an all-in-DRAM engine holding
    `tensors` ({store name: f32 array})."""
    import activeflow_jax as af
    from activeflow_jax.eval.perplexity import engine_perplexity
    from activeflow_jax.models import llama

    engine = af.Engine(cfg, llama.params_from_flat(cfg, tensors), tokenizer)
    try:
        return engine_perplexity(engine, text, ctx=ctx, max_windows=windows).ppl
    finally:
        engine.close()


def restart_cold(engine, store: str, budget) -> None:
    """Empties a budget engine's pools, zeroes its loader and engine counters and drops the store
    from the page cache: the next pass starts from flash and is counted alone."""
    from activeflow_jax.runtime.iostats import drop_page_cache

    engine.set_dram_budget(budget)
    engine.swap.reset_stats()
    drop_page_cache(store)
    engine.stats.reset()


RESULT_PREFIX = "RESULT "


def serve_child(spec_json: str, run) -> None:
    """The child side of `run_child`: `run(spec)` on the JSON spec it was given, its result printed
    as the line `run_child` looks for in its output."""
    print(RESULT_PREFIX + json.dumps(run(json.loads(spec_json))), flush=True)


def run_child(script: str, spec: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """`script --child=<spec as JSON>` in a fresh process (one setting per process: compiled
    programs, caches and the heap do not carry over between settings). Returns its result, or None
    and the end of its stderr."""
    proc = subprocess.run([sys.executable, os.path.abspath(script), f"--child={json.dumps(spec)}"], check=False,
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):]), ""
    return None, f"rc {proc.returncode}: {proc.stderr[-2000:]}"
