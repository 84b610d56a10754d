"""Same-memory peer benchmark: llama.cpp (mmap) against our engine on the same weights, each process
alone in a Linux memory cgroup with the same kind of cap (page cache counted), caches dropped first.

    python bench/peer.py --llama_cpp_bin PATH/TO/llama.cpp/build/bin
    python bench/peer.py --pairs F32:default --caps 1.0,0.6,0.4,0.25 --decode_tokens 32 --output results/peer.jsonl

A pair `TYPE:STORE` compares llama.cpp on a GGUF of TYPE (made from the default model's GGUF with
llama-quantize where it is not the shipped type; F32 is its exact dequantization) with our engine
on STORE (a store directory, or `default` for the default model's store). Caps are fractions of
the GGUF's tensor bytes, plus each process's own measured baseline (its memory besides the
weights: for llama.cpp the uncapped peak minus the file it maps, for ours the uncapped peak minus
what its DRAM budget accounts for). Per run: decode tok/s, the cgroup's peak memory, bytes read
from storage, whether the kernel killed it, and the first greedy tokens as text.

Our engine runs in each capped cgroup with `dram_budget=cap, budget_includes_process=True` (the
budget is the whole process), sparsity --sparsity, cold, O_DIRECT reads (no page cache); at a cap
of 1.0 also all in DRAM. llama.cpp runs with its defaults (mmap) and --threads.
Needs root for the cgroup (the benchmark says so and stops where it cannot make one).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("llama_cpp_bin", os.environ.get("ACTIVEFLOW_LLAMA_CPP_BIN"),
                    "directory holding llama.cpp's llama-completion and llama-quantize (built from the "
                    "llama-cpp-python sdist's vendor/llama.cpp); default $ACTIVEFLOW_LLAMA_CPP_BIN, then PATH")
flags.DEFINE_list("pairs", ["F32:default"], "TYPE:STORE pairs: llama.cpp on the default model's GGUF as TYPE (or "
                  "on a GGUF file given by path) : our store ('default' = the default model's store)")
flags.DEFINE_list("caps", ["1.0", "0.6", "0.4", "0.25"], "caps: fractions of the GGUF's weight bytes (each "
                  "process's measured baseline is added), or absolute sizes such as 1GiB / 1500MB (the whole "
                  "process, the same for both), or 'dram' (no cap, warm page cache: decode speed with everything "
                  "in DRAM)")
flags.DEFINE_list("dram_sparsities", ["0", "0.5"], "our sparsities measured at the 'dram' cap (all in DRAM)")
flags.DEFINE_float("sparsity", 0.5, "our engine's contextual sparsity under a cap")
flags.DEFINE_integer("decode_tokens", 32, "greedy tokens decoded per run")
flags.DEFINE_integer("threads", 2, "llama.cpp threads")
flags.DEFINE_string("prompt", "The history of the Roman Empire begins", "prompt (plain text, no chat template)")
flags.DEFINE_integer("timeout", 900, "seconds before a run is killed and reported as such")
flags.DEFINE_string("output", None, "append JSON records to this file as well (JSON lines)")
flags.DEFINE_bool("ours_in_dram", True, "at cap 1.0 also run our all-in-DRAM sparse engine")
# child role (internal): run our engine once and print one JSON line
flags.DEFINE_enum("role", "parent", ["parent", "ours", "llama"],
                  "internal: parent, or the child that runs our engine / llama.cpp through llama-cpp-python")
flags.DEFINE_enum("llama_runner", "auto", ["auto", "python", "binary"],
                  "how llama.cpp runs: through llama-cpp-python (the [peer] extra), its llama-completion binary, or "
                  "auto (the Python package where it imports, else the binary)")
flags.DEFINE_string("gguf", None, "internal (child): GGUF for llama.cpp")
flags.DEFINE_integer("group_size", None, "our layer-group size under a cap (default: the planner's choice; give one "
                     "whose streaming layout the store already has, or the first capped run writes it)")
flags.DEFINE_string("store", None, "internal (child): store")
flags.DEFINE_integer("budget_bytes", 0, "internal (child): dram budget in bytes; 0 = all in DRAM")
flags.DEFINE_bool("whole_process", True, "internal (child): the budget covers the whole process")

_EVAL_RE = re.compile(r"eval time =\s*([\d.]+) ms /\s*(\d+) runs.*?([\d.]+) tokens per second")


def _child_ours() -> None:
    import activeflow_jax as af
    from activeflow_jax.runtime.iostats import process_read_bytes

    options = {}
    if FLAGS.budget_bytes:
        options = dict(dram_budget=FLAGS.budget_bytes, budget_includes_process=FLAGS.whole_process, cold=True,
                       direct_io=True, group_size=FLAGS.group_size)
    engine = af.Engine.load(FLAGS.store, sparsity=FLAGS.sparsity or None, policy="topk", **options)
    ids = engine.tokenizer.encode(FLAGS.prompt)
    out = list(engine.generate_ids(ids, max_new_tokens=FLAGS.decode_tokens, stop_ids=frozenset()))
    st = engine.stats
    memory = st.memory or {}
    print(json.dumps({"decode_tokens_per_s": st.decode_tokens_per_s, "decode_tokens": st.decode_tokens,
                      "prefill_tokens_per_s": st.prefill_tokens_per_s, "compile_seconds": st.compile_seconds,
                      "peak_rss_bytes": st.peak_rss_bytes, "read_bytes": process_read_bytes(),
                      "budget_accounted_bytes": memory.get("total"), "plan": getattr(engine, "plan_explanation", None),
                      "tokens": out, "text": engine.tokenizer.decode(out)}))


def _child_llama() -> None:
    """llama.cpp through llama-cpp-python: mmap (its default), greedy, timing each decoded token."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=FLAGS.gguf, n_ctx=512, n_threads=FLAGS.threads, n_threads_batch=FLAGS.threads,
                          use_mmap=True, verbose=False)
    prompt = llm.tokenize(FLAGS.prompt.encode(), add_bos=True)
    out, stamps = [], []
    start = time.perf_counter()
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        stamps.append(time.perf_counter())
        out.append(int(token))
        if len(out) == FLAGS.decode_tokens:
            break
    # the first token comes with the prompt's evaluation; the decode rate is over the rest
    decode = (len(out) - 1) / (stamps[-1] - stamps[0]) if len(out) > 1 else 0.0
    print(json.dumps({"decode_tokens_per_s": decode, "prefill_seconds": stamps[0] - start, "tokens": out,
                      "text": llm.detokenize(out).decode("utf-8", "replace")}))


def _use_python_llama() -> bool:
    if FLAGS.llama_runner == "binary":
        return False
    try:
        import llama_cpp  # noqa: F401
        return True
    except ImportError:
        if FLAGS.llama_runner == "python":
            raise SystemExit("llama-cpp-python is not installed: pip install -e '.[peer]' (builds llama.cpp, "
                             "~10 min on 2 cores), or use --llama_runner=binary with --llama_cpp_bin") from None
        return False


def _tool(name: str) -> str:
    candidates = [os.path.join(FLAGS.llama_cpp_bin, name)] if FLAGS.llama_cpp_bin else []
    found = shutil.which(name)
    candidates += [found] if found else []
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise SystemExit(f"llama.cpp's {name} was not found (looked in --llama_cpp_bin / $ACTIVEFLOW_LLAMA_CPP_BIN "
                     f"{FLAGS.llama_cpp_bin!r} and PATH); build it from the llama-cpp-python sdist: see BUILD.md")


def _gguf_of_type(source: str, qtype: str) -> str:
    """The default model's GGUF as `qtype` (the shipped file where it already is that type)."""
    import gguf

    reader = gguf.GGUFReader(source)
    types = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
    if types == {qtype}:
        return source
    from activeflow_jax.paths import activeflow_home

    out = os.path.join(activeflow_home(), "peer", f"{os.path.basename(source).rsplit('.', 1)[0]}-{qtype}.gguf")
    if not os.path.isfile(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        subprocess.run([_tool("llama-quantize"), "--allow-requantize", source, out + ".tmp", qtype], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.replace(out + ".tmp", out)
    return out


def _absolute_cap(text: str) -> int | None:
    """Bytes of a cap given with a unit (1GiB, 1500MB), None for a fraction."""
    match = re.fullmatch(r"\s*([\d.]+)\s*(KB|MB|GB|KiB|MiB|GiB)\s*", text)
    if not match:
        return None
    unit = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[match.group(2)]
    return int(float(match.group(1)) * unit)


def _tensor_bytes(path: str) -> int:
    import gguf

    return int(sum(t.n_bytes for t in gguf.GGUFReader(path).tensors))


def _run_llama(gguf_path: str, cap: int, cold: bool = True):
    from activeflow_jax.runtime import memcap

    if _use_python_llama():
        argv = [sys.executable, os.path.abspath(__file__), "--role=llama", f"--gguf={gguf_path}",
                f"--threads={FLAGS.threads}", f"--decode_tokens={FLAGS.decode_tokens}", f"--prompt={FLAGS.prompt}"]
        run = memcap.run_capped(argv, cap, timeout=FLAGS.timeout, cold=cold)
        return run, _child_result(run)
    argv = [_tool("llama-completion"), "-m", gguf_path, "-p", FLAGS.prompt, "-n", str(FLAGS.decode_tokens),
            "-t", str(FLAGS.threads), "--temp", "0", "-no-cnv", "--ignore-eos", "-c", "512"]
    run = memcap.run_capped(argv, cap, timeout=FLAGS.timeout, cold=cold)
    match = None
    for match in _EVAL_RE.finditer(run.stderr):
        pass  # the last "eval time" line is the decode (the one before is the prompt)
    text = run.stdout.split(FLAGS.prompt, 1)[-1].strip() if run.returncode == 0 else ""
    return run, {"decode_tokens_per_s": float(match.group(3)) if match and run.returncode == 0 else 0.0,
                 "text": text, "error": None if run.returncode == 0 else run.stderr[-400:]}


def _child_result(run) -> dict:
    result = {"decode_tokens_per_s": 0.0, "text": "", "error": None}
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode == 0 and lines:
        result.update(json.loads(lines[-1]))
    else:
        tail = run.stderr.strip().splitlines()
        result["error"] = tail[-1][-400:] if tail else f"rc {run.returncode}"
        if run.oom_killed:
            result["error"] = "killed by the kernel at the memory cap (OOM)"
    return result


def _run_ours(store: str, cap: int, budget_bytes: int, whole_process: bool, sparsity: float | None = None,
              cold: bool = True):
    from activeflow_jax.runtime import memcap

    argv = [sys.executable, os.path.abspath(__file__), "--role=ours", f"--store={store}",
            f"--budget_bytes={budget_bytes}", f"--whole_process={whole_process}",
            *([f"--group_size={FLAGS.group_size}"] if FLAGS.group_size else []),
            f"--sparsity={FLAGS.sparsity if sparsity is None else sparsity}",
            f"--decode_tokens={FLAGS.decode_tokens}", f"--prompt={FLAGS.prompt}"]
    run = memcap.run_capped(argv, cap, timeout=FLAGS.timeout, cold=cold)
    return run, _child_result(run)


def _record(kind: str, label: str, frac, cap: int, run, result: dict) -> dict:
    return {"engine": kind, "setting": label, "cap_fraction": frac, "cap_bytes": cap,
            "decode_tokens_per_s": result.get("decode_tokens_per_s", 0.0), "cgroup_peak_bytes": run.peak_bytes,
            "max_rss_bytes": run.max_rss_bytes,
            "read_bytes": run.read_bytes, "oom_killed": run.oom_killed, "returncode": run.returncode,
            "seconds": round(run.seconds, 1), "text": result.get("text", ""), "error": result.get("error"),
            **{k: result[k] for k in ("plan", "compile_seconds", "prefill_tokens_per_s") if k in result}}


def _run_all(runs, frac, pair, weight_bytes, llama_base, ours_base, records) -> None:
    for kind, label, cap, go in runs:
        run, result = go(cap)
        rec = _record(kind, label, frac, cap, run, result)
        rec.update(pair=pair, weight_bytes=weight_bytes, baseline_bytes=llama_base if kind == "llama.cpp"
                   else ours_base)
        records.append(rec)
        where = "no cap" if frac == "dram" else f"cap {frac:.2f} ({cap / 1e6:.0f} MB)"
        print(f"  {where} {kind:9s} {label}: "
              f"{rec['decode_tokens_per_s']:.2f} tok/s, peak {(run.peak_bytes or 0) / 1e6:.0f} MB, "
              f"RSS {run.max_rss_bytes / 1e6:.0f} MB, read {run.read_bytes / 1e6:.0f} MB"
              f"{', OOM-killed' if run.oom_killed else ''}{'' if rec['error'] is None else ', error: ' + str(rec['error'])[:160]}", file=sys.stderr)


def main(argv) -> None:
    del argv
    if FLAGS.role == "ours":
        _child_ours()
        return
    if FLAGS.role == "llama":
        _child_llama()
        return
    from activeflow_jax.fetch import fetch_default_gguf, fetch_default_model
    from activeflow_jax.runtime import memcap

    reason = memcap.available()
    if reason is not None:
        raise SystemExit(f"bench/peer.py needs a Linux memory cgroup and cannot make one: {reason}")
    from common import emit

    source = fetch_default_gguf(quiet=True)
    big = 16 << 30  # "uncapped": far above anything these runs use
    records = []
    for pair in FLAGS.pairs:
        qtype, _, store = pair.rpartition(":") if pair.count(":") > 1 or ".gguf:" in pair else pair.partition(":")
        store = fetch_default_model(quiet=True) if store in ("", "default") else store
        gguf_path = qtype if qtype.endswith(".gguf") else _gguf_of_type(source, qtype)
        weight_bytes = _tensor_bytes(gguf_path)
        llama_base = ours_base = 0
        if any(c != "dram" for c in FLAGS.caps):
            # baselines: everything a process holds besides its weights, measured uncapped and cold
            run, _ = _run_llama(gguf_path, big)
            llama_base = max(0, (run.peak_bytes or 0) - os.path.getsize(gguf_path))
            run, res = _run_ours(store, big, weight_bytes, whole_process=False)
            ours_base = max(0, (run.peak_bytes or 0) - int(res.get("budget_accounted_bytes") or 0))
        print(f"{pair}: weights {weight_bytes / 1e6:.0f} MB, baseline llama.cpp {llama_base / 1e6:.0f} MB, "
              f"ours {ours_base / 1e6:.0f} MB", file=sys.stderr)
        for cap_text in FLAGS.caps:
            if cap_text == "dram":  # uncapped and warm: both engines' in-DRAM decode, same weights
                runs = [("llama.cpp", f"{os.path.basename(gguf_path)} in DRAM", big,
                         lambda cap: _run_llama(gguf_path, cap, cold=False))]
                for sp in (float(x) for x in FLAGS.dram_sparsities):
                    runs.append(("ours", f"{os.path.basename(store)} sparsity {sp} all in DRAM", big,
                                 lambda cap, sp=sp: _run_ours(store, cap, 0, whole_process=False, sparsity=sp,
                                                              cold=False)))
                _run_all(runs, "dram", pair, weight_bytes, llama_base, ours_base, records)
                continue
            absolute = _absolute_cap(cap_text)
            frac = float(cap_text) if absolute is None else round(absolute / weight_bytes, 3)
            llama_cap = absolute or int(frac * weight_bytes) + llama_base
            ours_cap = absolute or int(frac * weight_bytes) + ours_base
            runs = [("llama.cpp", f"{os.path.basename(gguf_path)} mmap", llama_cap,
                     lambda cap: _run_llama(gguf_path, cap))]
            runs.append(("ours", f"{os.path.basename(store)} sparsity {FLAGS.sparsity} budget=cap",
                         ours_cap, lambda cap: _run_ours(store, cap, cap, whole_process=True)))
            if frac >= 1.0 and FLAGS.ours_in_dram:
                runs.append(("ours", f"{os.path.basename(store)} sparsity {FLAGS.sparsity} all in DRAM", ours_cap,
                             lambda cap: _run_ours(store, cap, 0, whole_process=False)))
            _run_all(runs, frac, pair, weight_bytes, llama_base, ours_base, records)
    emit({"benchmark": "peer", "prompt": FLAGS.prompt, "decode_tokens": FLAGS.decode_tokens,
          "threads": FLAGS.threads, "runs": records, "date": time.strftime("%Y-%m-%d")}, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
