"""Fuzzing the GGUF importer and the store manifest reader (absl flags; a benchmark, not in CI).

    python bench/fuzz.py --seconds 180 --output /tmp/fuzz.json

Starts from a tiny random GGUF (F32 and Q8_0 tensors) and its converted store, and runs damaged
copies against the real code paths in a worker process:
    gguf       random truncations, bit flips and little-endian integer fields overwritten with
               edge values (0, -1, huge, random) in the header, metadata and tensor-info region;
               then `convert`, and for a store that converts, `Engine.load` and one `logits` call
    manifest   JSON fields of manifest.json set to edge values (0, negative, huge, NaN, strings,
               null, lists, missing), plus truncations and bit flips of its text; then
               `StoreReader`, `Engine.load` and one `logits` call

Every case must end as a clear error (an ActiveFlowError) or a correct store (converts, loads and
gives finite logits). Anything else is a finding: another exception type (a traceback for the
user), a crash of the worker, a hang (no answer within --case_timeout_s), or a store whose
logits are not finite. The record counts cases per outcome class and keeps examples of each
finding, with the seed that reproduces it.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("seconds", 180, "time budget for the whole run")
flags.DEFINE_integer("seed", 0, "seed of the mutations")
flags.DEFINE_float("case_timeout_s", 60.0, "a case taking longer than this is a hang")
flags.DEFINE_string("output", None, "write the JSON record here too")
flags.DEFINE_boolean("worker", False, "internal: run as the worker process")
flags.DEFINE_integer("examples", 5, "findings kept per outcome class")

EDGE_INTS = (0, 1, -1, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 63 - 1, 2 ** 64 - 1, 7, 1 << 40)
EDGE_JSON = (0, -1, -(2 ** 40), 2 ** 62, 1e308, float("nan"), float("inf"), 0.5, "", "x", None, [], {}, True,
             [0], [-1, 64])


# -- worker: runs one case per line of stdin, answers one JSON line ----------------------------------

def _check_store(store: str) -> dict:
    import numpy as np

    import activeflow_jax as af

    engine = af.Engine.load(store)
    try:
        ids = [3, 40, 41, 42][: max(1, min(4, engine.config.max_context))]
        ids = [i % engine.config.vocab_size for i in ids]
        logits = engine.logits(ids)
        if not np.isfinite(logits).all():
            return {"outcome": "nan_store", "detail": "logits not finite"}
        return {"outcome": "correct_store", "detail": ""}
    finally:
        engine.close()


def _run_case(case: dict) -> dict:
    from activeflow_jax.errors import ActiveFlowError

    try:
        if case["kind"] == "gguf":
            import activeflow_jax as af

            out = case["out"]
            af.convert(case["path"], out, overwrite=True, progress=False)
            return _check_store(out)
        from activeflow_jax.store.reader import StoreReader

        StoreReader(case["store"])
        return _check_store(case["store"])
    except ActiveFlowError as exc:
        return {"outcome": f"clear_error:{type(exc).__name__}", "detail": str(exc).splitlines()[0][:200]}
    except Exception as exc:  # noqa: BLE001 - what the fuzzer is looking for
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        return {"outcome": f"exception:{type(exc).__name__}",
                "detail": f"{str(exc)[:200]} at {os.path.basename(tb.filename)}:{tb.lineno} ({tb.name})"}


def worker_main() -> None:
    import logging

    logging.disable(logging.WARNING)
    for line in sys.stdin:
        case = json.loads(line)
        result = _run_case(case)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


# -- parent: makes the cases, drives the worker, classifies ------------------------------------------

class Worker:
    def __init__(self):
        self.proc = None

    def start(self):
        env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)

    def run(self, case: dict, timeout: float) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        try:
            self.proc.stdin.write(json.dumps(case) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.proc = None
            return {"outcome": "crash", "detail": "worker gone before the case"}
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            return {"outcome": "hang", "detail": f"no answer in {timeout:.0f} s"}
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self.proc = None
            return {"outcome": "crash", "detail": f"worker died (exit {code})"}
        return json.loads(line)

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def _header_end(path: str) -> int:
    """Offset where tensor data starts (mutations of integer fields aim before it)."""
    import gguf

    reader = gguf.GGUFReader(path)
    return int(min(t.data_offset for t in reader.tensors))


def mutate_bytes(data: bytes, rng: random.Random, header_end: int) -> tuple[bytes, str]:
    kind = rng.choice(("truncate", "bitflip", "intfield", "intfield", "bitflip_header"))
    buf = bytearray(data)
    if kind == "truncate":
        cut = rng.randrange(0, len(buf))
        return bytes(buf[:cut]), f"truncate at {cut}"
    if kind in ("bitflip", "bitflip_header"):
        hi = header_end if kind == "bitflip_header" else len(buf)
        flips = [rng.randrange(0, hi) for _ in range(rng.choice((1, 1, 2, 8)))]
        for pos in flips:
            buf[pos] ^= 1 << rng.randrange(8)
        return bytes(buf), f"{kind} at {flips[:4]}"
    width = rng.choice((1, 4, 8))
    pos = rng.randrange(0, max(1, header_end - width))
    value = rng.choice(EDGE_INTS) if rng.random() < 0.7 else rng.getrandbits(8 * width)
    buf[pos:pos + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    return bytes(buf), f"int{8 * width} at {pos} = {value}"


def _paths(obj, prefix=()):
    """Every (path) in a JSON tree, the tokenizer's long lists sampled, not walked."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list) and len(obj) <= 8:
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def mutate_manifest(manifest: dict, text: str, rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(("field", "field", "field", "delete", "truncate", "bitflip"))
    if kind == "truncate":
        cut = rng.randrange(0, len(text))
        return text[:cut], f"truncate at {cut}"
    if kind == "bitflip":
        raw = bytearray(text.encode())
        pos = rng.randrange(0, len(raw))
        raw[pos] ^= 1 << rng.randrange(8)
        return raw.decode(errors="replace"), f"bitflip at {pos}"
    m = json.loads(text)
    paths = [p for p in _paths(m) if p and p[0] != "tokenizer" or (p and rng.random() < 0.02)]
    path = rng.choice(paths)
    node = m
    for key in path[:-1]:
        node = node[key]
    if kind == "delete" and isinstance(node, dict):
        del node[path[-1]]
        return json.dumps(m), f"delete {'.'.join(map(str, path))}"
    value = rng.choice(EDGE_JSON)
    node[path[-1]] = value
    return json.dumps(m), f"set {'.'.join(map(str, path))} = {value!r}"


BAD = ("exception", "crash", "hang", "nan_store")


def main(argv):
    del argv
    if FLAGS.worker:
        worker_main()
        return
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from activeflow_jax.testing import make_tiny_store, write_tiny_gguf

    rng = random.Random(FLAGS.seed)
    work = tempfile.mkdtemp(prefix="af-fuzz-")
    seeds = []
    for qtype in ("F32", "Q8_0"):
        path = os.path.join(work, f"seed-{qtype}.gguf")
        write_tiny_gguf(path, qtype=qtype)
        with open(path, "rb") as f:
            seeds.append((qtype, f.read(), _header_end(path)))
    tiny = make_tiny_store(os.path.join(work, "base"))
    with open(os.path.join(tiny.store_path, "manifest.json")) as f:
        manifest_text = f.read()
    manifest = json.loads(manifest_text)
    fuzz_store = os.path.join(work, "fuzz-store")
    shutil.copytree(tiny.store_path, fuzz_store)
    worker = Worker()
    counts: dict[str, dict[str, int]] = {"gguf": {}, "manifest": {}}
    findings: dict[str, list] = {}
    start = time.perf_counter()
    n = 0
    try:
        while time.perf_counter() - start < FLAGS.seconds:
            case_seed = rng.getrandbits(32)
            case_rng = random.Random(case_seed)
            if n % 2 == 0:
                qtype, data, header_end = seeds[case_rng.randrange(len(seeds))]
                mutated, what = mutate_bytes(data, case_rng, header_end)
                path = os.path.join(work, "case.gguf")
                with open(path, "wb") as f:
                    f.write(mutated)
                case = {"kind": "gguf", "path": path, "out": os.path.join(work, "case-store")}
                what = f"{qtype}: {what}"
            else:
                text, what = mutate_manifest(manifest, manifest_text, case_rng)
                with open(os.path.join(fuzz_store, "manifest.json"), "w") as f:
                    f.write(text)
                case = {"kind": "manifest", "store": fuzz_store}
            result = worker.run(case, FLAGS.case_timeout_s)
            n += 1
            outcome = result["outcome"]
            counts[case["kind"]][outcome] = counts[case["kind"]].get(outcome, 0) + 1
            if outcome.split(":")[0] in BAD:
                examples = findings.setdefault(f"{case['kind']} {outcome}", [])
                if len(examples) < FLAGS.examples:
                    examples.append({"seed": case_seed, "mutation": what, "detail": result["detail"]})
                print(f"FINDING {case['kind']} {outcome}: {what} -> {result['detail']}", file=sys.stderr, flush=True)
    finally:
        worker.close()
        shutil.rmtree(work, ignore_errors=True)
    total_bad = sum(v for kind in counts.values() for k, v in kind.items() if k.split(":")[0] in BAD)
    record = {"seconds": round(time.perf_counter() - start, 1), "seed": FLAGS.seed, "cases": n,
              "cases_by_kind": {k: sum(v.values()) for k, v in counts.items()}, "outcomes": counts,
              "findings": findings, "bad_cases": total_bad}
    from common import emit  # bench/common.py: time and machine added, one JSON line, appended to --output

    emit(record, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
