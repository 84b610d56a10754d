"""The swapping runtime under DRAM budgets, next to its baselines, all in one run.

    python bench/swap.py --output results/swap.jsonl --plot results/swap.png
    python bench/swap.py --budgets 0.6,0.4 --sparsity 0.5 --group_size 2 --decode_tokens 32
    python bench/swap.py --store DISTILLED --policy topk --op_sparsity qkv=0.36,o=0.5,gate_up=0.48,down=0.64

For each budget (a fraction of the model's weight bytes, or a size such as 200MB):
    ours             Engine.load(store, dram_budget=b): the planner picks sparsity and group size
                     unless --sparsity/--group_size fix them
    dense_streaming  the same runtime without sparsity: whole layers streamed from flash through
                     the same budget (what mmap does when the model does not fit, plus caching and
                     read-ahead of the next layer group)
and once: dense_all_in_dram, the reference every ratio is taken against.

Each setting runs in its own process, so peak RSS is that setting's own. Timings follow a
warm-up that compiles every program; then the pools are emptied (set_dram_budget) and, with
--cold, the store is dropped from the page cache, so the measured tokens start from flash.
--direct_io reads with O_DIRECT: nothing is served from the page cache at all. Perplexity is that
of the chosen sparsity on WikiText-2 windows (computed all-in-DRAM: the swapped path computes the
same function, see tests/test_swap.py).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("store", None, "store directory; default: the default model")
flags.DEFINE_list("budgets", ["1.0", "0.6", "0.4", "0.25"], "DRAM budgets: fractions of the weight bytes or sizes")
flags.DEFINE_string("sparsity", "", "fix the sparsity of 'ours' (default: the planner's choice)")
flags.DEFINE_string("op_sparsity", "", "a per-op allocation for 'ours' instead (qkv=0.36,o=0.5,gate_up=0.48,"
                    "down=0.64; `activeflow allocate`); the planner then picks only the group size")
flags.DEFINE_integer("group_size", 0, "fix the layer-group size of 'ours' (0: the planner's choice)")
flags.DEFINE_integer("stream_group_size", 1, "layer-group size of the dense streaming baseline")
flags.DEFINE_integer("prompt_len", 64, "prompt tokens (from the WikiText-2 test text)")
flags.DEFINE_integer("decode_tokens", 32, "tokens decoded in the timed run")
flags.DEFINE_integer("kv_tokens", 128, "KV positions reserved in the budget")
flags.DEFINE_bool("cold", True, "drop the store from the page cache before the timed run")
flags.DEFINE_bool("direct_io", True, "read flash with O_DIRECT (no page cache)")
flags.DEFINE_bool("budget_includes_process", False,
                  "count the process's own memory before loading (Python, JAX: ~0.2 GB) inside the budget")
flags.DEFINE_enum("policy", "threshold", ["threshold", "topk"], "mask policy (topk for uncalibrated stores)")
flags.DEFINE_bool("baselines", True, "also run dense layer streaming at each budget")
flags.DEFINE_integer("ppl_windows", 4, "WikiText-2 windows for the perplexity of each sparsity (0: skip)")
flags.DEFINE_string("text", None, "evaluation text (default: ../shared/data/wiki.test.raw)")
flags.DEFINE_string("output", None, "append JSON lines here")
flags.DEFINE_string("plot", None, "write a Pareto plot (tokens/s against DRAM, coloured by PPL) here")
flags.DEFINE_string("child", None, "internal: run one setting (JSON) and print its result")

HERE = os.path.dirname(os.path.abspath(__file__))


def _default_text() -> str:
    return FLAGS.text or os.path.join(HERE, "..", "..", "shared", "data", "wiki.test.raw")


def _store() -> str:
    if FLAGS.store:
        return FLAGS.store
    from activeflow_jax.fetch import fetch_default_model

    return fetch_default_model(quiet=True)


def _prompt(engine, n: int) -> list[int]:
    from activeflow_jax.eval.perplexity import read_text

    if engine.tokenizer is None:  # synthetic models: token ids only
        import numpy as np

        return np.random.default_rng(0).integers(0, engine.config.vocab_size, n).tolist()
    path = _default_text()
    text = read_text(path) if os.path.exists(path) else "The history of the city begins in the year 1200. " * 50
    return engine.tokenizer.encode(text[:20000])[100:100 + n]


def run_setting(spec: dict) -> dict:
    """One setting in this process: load, warm up, (cold) timed decode, counters."""
    import resource

    import activeflow_jax as af
    from activeflow_jax.errors import ActiveFlowError
    from activeflow_jax.runtime.bandwidth import flash_use, get_bandwidths
    from activeflow_jax.runtime.iostats import drop_page_cache

    store = spec["store"]
    t0 = time.perf_counter()
    try:
        if spec["kind"] == "dense_all_in_dram":
            engine = af.Engine.load(store)
        elif spec["kind"] == "sparse_all_in_dram":  # the budget runtime's target: the same sparsity in DRAM
            engine = af.Engine.load(store, sparsity=float(spec["sparsity"]), policy=spec["policy"])
        else:
            options = dict(kv_tokens=spec["kv_tokens"], direct_io=spec["direct_io"], progress=False,
                           budget_includes_process=spec["budget_includes_process"])
            if spec["kind"] == "dense_streaming":
                options.update(plan=False, group_size=spec["stream_group_size"])
                engine = af.Engine.load(store, dram_budget=spec["budget"], **options)
            else:
                sparsity = float(spec["sparsity"]) if spec["sparsity"] else None
                engine = af.Engine.load(store, dram_budget=spec["budget"], sparsity=sparsity, policy=spec["policy"],
                                        group_size=spec["group_size"] or None, op_sparsity=spec["op_sparsity"] or None,
                                        **options)
    except ActiveFlowError as exc:
        return {"feasible": False, "reason": str(exc)}
    load_s = time.perf_counter() - t0
    prompt = _prompt(engine, spec["prompt_len"])
    list(engine.generate_ids(prompt, max_new_tokens=4))  # compiles every program
    if engine.swap is not None:
        engine.set_dram_budget(spec["budget"])  # empty pools: the timed run starts from flash
        engine.swap.reset_stats()
    if spec["cold"]:
        drop_page_cache(store)
    engine.stats.reset()
    tokens = list(engine.generate_ids(prompt, max_new_tokens=spec["decode_tokens"]))
    stats = engine.stats.as_dict()
    out = {
        "feasible": True, "load_seconds": load_s, "decode_tokens_per_s": stats["decode_tokens_per_s"],
        "prefill_tokens_per_s": stats["prefill_tokens_per_s"], "decode_tokens": stats["decode_tokens"],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "generated": tokens[:8], "sparsity": engine.sparsity.sparsity if engine.sparsity else 0.0,
        "op_sparsity": list(engine.sparsity.op_sparsity) if engine.sparsity and engine.sparsity.op_sparsity else None,
    }
    if engine.swap is not None:
        loader = stats["loader"]
        n = max(1, loader["tokens"])
        out.update(
            group_size=engine.swap.bundles.group_size, memory=stats["memory"], loader=loader,
            plan=getattr(engine, "plan_explanation", ""),
            bytes_requested_per_token=loader["bytes_requested"] / n,
            device_bytes_read_per_token=loader["device_read_bytes"] / n,
            hit_rate=loader["hit_rate"], preload_precision=loader["preload_precision"],
            preload_recall=loader["preload_recall"], io_hidden_share=loader["io_hidden_share"],
            io_wait_seconds_per_token=loader["io_wait_seconds"] / n,
            dispatches_per_token=loader["dispatches_per_token"], host_syncs_per_token=loader["host_syncs_per_token"],
            host_cpu_seconds_per_token=loader["host_cpu_seconds_per_token"],
            flash_use=flash_use(loader, get_bandwidths(store)),
        )
    return out


def ppl_of(store: str, sparsity: float, windows: int, op_sparsity=None) -> float:
    import activeflow_jax as af
    from activeflow_jax.eval.perplexity import engine_perplexity

    engine = af.Engine.load(store, sparsity=None if op_sparsity else sparsity or None, policy=FLAGS.policy,
                            op_sparsity=op_sparsity)
    return float(engine_perplexity(engine, _default_text(), max_windows=windows).ppl)


def engine_has_tokenizer(store: str) -> bool:
    from activeflow_jax.store.reader import read_manifest

    return bool(read_manifest(store).get("tokenizer"))


def _child(spec: dict) -> dict:
    from common import run_child

    result, error = run_child(__file__, spec)
    return result if result is not None else {"feasible": False, "reason": f"child failed ({error[-1500:]})"}


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = [r for r in rows if r["result"].get("feasible")]
    ppl = [r.get("ppl") or 0 for r in pts]
    sc = ax.scatter([r["result"]["peak_rss_bytes"] / 1e6 for r in pts],
                    [r["result"]["decode_tokens_per_s"] for r in pts], c=ppl, cmap="viridis_r", s=60)
    for r in pts:
        ax.annotate(f"{r['kind']} {r['budget']}", (r["result"]["peak_rss_bytes"] / 1e6,
                                                   r["result"]["decode_tokens_per_s"]), fontsize=7)
    fig.colorbar(sc, label="WikiText-2 PPL")
    ax.set_xlabel("peak RSS (MB)")
    ax.set_ylabel("decode tokens/s (cold flash)")
    ax.set_yscale("log")
    ax.set_title("activeflow-jax under a DRAM budget")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    del argv
    if FLAGS.child:
        from common import serve_child

        serve_child(FLAGS.child, run_setting)
        return
    from common import budget_arg, emit

    store = _store()
    base = dict(store=store, prompt_len=FLAGS.prompt_len, decode_tokens=FLAGS.decode_tokens, cold=FLAGS.cold,
                direct_io=FLAGS.direct_io, kv_tokens=FLAGS.kv_tokens, sparsity=FLAGS.sparsity,
                group_size=FLAGS.group_size, stream_group_size=FLAGS.stream_group_size, policy=FLAGS.policy,
                op_sparsity=FLAGS.op_sparsity,
                budget_includes_process=FLAGS.budget_includes_process)
    settings = [dict(base, kind="dense_all_in_dram", budget=None)]
    if FLAGS.sparsity:
        settings.append(dict(base, kind="sparse_all_in_dram", budget=None))
    for b in FLAGS.budgets:
        budget = budget_arg(b)
        settings.append(dict(base, kind="ours", budget=budget))
        if FLAGS.baselines:
            settings.append(dict(base, kind="dense_streaming", budget=budget))
    rows = []
    for spec in settings:
        result = _child(spec)
        rows.append({"kind": spec["kind"], "budget": spec["budget"], "result": result})
        print(f"{spec['kind']:>18} budget={spec['budget']}: "
              + (f"{result['decode_tokens_per_s']:.2f} tok/s" if result.get("feasible") else result["reason"][:200])
              + (f", {result['dispatches_per_token']:.0f} dispatches / {result['host_syncs_per_token']:.0f} syncs / "
                 f"{1e3 * result['host_cpu_seconds_per_token']:.1f} ms host CPU per token"
                 if result.get("feasible") and "dispatches_per_token" in result else ""),
              file=sys.stderr)
    dense = rows[0]["result"].get("decode_tokens_per_s") or float("nan")
    ppls: dict[tuple, float] = {}
    for row in rows:
        res = row["result"]
        if not res.get("feasible"):
            continue
        res["vs_dense_all_in_dram"] = res["decode_tokens_per_s"] / dense
        sparse = next((r for r in rows if r["kind"] == "sparse_all_in_dram"), None)
        if sparse is not None and sparse["result"].get("feasible"):
            res["vs_sparse_all_in_dram"] = res["decode_tokens_per_s"] / sparse["result"]["decode_tokens_per_s"]
        if FLAGS.ppl_windows and engine_has_tokenizer(store):
            key = (res["sparsity"], tuple(res.get("op_sparsity") or ()))
            if key not in ppls:
                ppls[key] = ppl_of(store, key[0], FLAGS.ppl_windows, key[1] or None)
            row["ppl"] = ppls[key]
    for b in FLAGS.budgets:
        ours = next((r for r in rows if r["kind"] == "ours" and str(r["budget"]) == str(b)), None)
        stream = next((r for r in rows if r["kind"] == "dense_streaming" and str(r["budget"]) == str(b)), None)
        if ours and stream and ours["result"].get("feasible") and stream["result"].get("feasible"):
            ours["result"]["vs_dense_streaming"] = (ours["result"]["decode_tokens_per_s"]
                                                    / stream["result"]["decode_tokens_per_s"])
    emit({"bench": "swap", "flags": {k: v for k, v in base.items() if k != "store"}, "store": store,
          "dense_all_in_dram_tokens_per_s": dense, "ppl_windows": FLAGS.ppl_windows, "rows": rows}, FLAGS.output)
    if FLAGS.plot:
        plot(rows, FLAGS.plot)


if __name__ == "__main__":
    app.run(main)
