"""Writes docs/options.md from the code: the Python API's options (signatures and docstrings) and
every flag of the `activeflow` command (argparse). Run from the repository root:

    python docs/gen_options.py            # rewrite docs/options.md
    python docs/gen_options.py --check    # exit 1 if docs/options.md is out of date

tests/test_docs.py fails when the file differs from what this script writes.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(ROOT, "docs", "options.md")
COMMAND = "python docs/gen_options.py"


def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _python_section(title: str, fn, skip: tuple[str, ...] = ()) -> list[str]:
    signature = inspect.signature(fn)
    lines = [f"### `{title}`", ""]
    doc = inspect.getdoc(fn)
    if doc:
        lines += ["```text", doc, "```", ""]
    params = [p for name, p in signature.parameters.items() if name not in ("self", "cls") + skip
              and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    if params:
        lines += ["| option | type | default |", "|---|---|---|"]
        for p in params:
            annotation = "" if p.annotation is p.empty else (p.annotation if isinstance(p.annotation, str)
                                                               else getattr(p.annotation, "__name__", p.annotation))
            default = "required" if p.default is p.empty else f"`{p.default!r}`"
            lines.append(f"| `{p.name}` | {_cell(annotation)} | {_cell(default)} |")
        lines.append("")
    return lines


def python_api() -> list[str]:
    import activeflow_jax as af
    from activeflow_jax.runtime.session import load_swapping

    lines = ["## Python API", ""]
    lines += _python_section("Engine.load(store, ...)", af.Engine.load, skip=("store_path",))
    lines += [("Options that apply only with `dram_budget` (passed through `**budget_options` to "
               "`runtime.session.load_swapping`):"), ""]
    lines += _python_section("Engine.load(store, dram_budget=..., ...)", load_swapping,
                             skip=("engine_cls", "store_path", "dram_budget", "sparsity", "policy", "kernel",
                                   "dense_layers", "q8_embedding", "op_sparsity"))
    for name in ("generate", "stream", "generate_ids", "logits", "score_continuations", "configure_sparsity",
                 "set_dram_budget", "close"):
        lines += _python_section(f"Engine.{name}", getattr(af.Engine, name))
    lines += _python_section("af.fetch_default_model", af.fetch_default_model)
    lines += _python_section("af.convert", af.convert)
    lines += _python_section("af.calibrate", af.calibrate)
    return lines


def _flag_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| argument | default | choices | help |", "|---|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = ", ".join(action.option_strings) or action.dest
        if action.nargs == 0 or isinstance(action, argparse._VersionAction):
            default = "off" if not isinstance(action, argparse._VersionAction) else ""
        elif action.required or not action.option_strings:
            default = "required"
        else:
            default = f"`{action.default}`" if action.default is not None else "none"
        choices = ", ".join(map(str, action.choices)) if action.choices else ""
        text = action.help or ""
        try:
            text = text % {**vars(action), "prog": parser.prog}
        except (KeyError, TypeError, ValueError):
            pass
        rows.append(f"| `{name}` | {_cell(default)} | {_cell(choices)} | {_cell(text)} |")
    return rows + [""]


def command_line() -> list[str]:
    from activeflow_jax.cli import build_parser

    parser = build_parser()
    lines = ["## Command line: `activeflow`", "", "Global flags:", ""] + _flag_rows(parser)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, subparser in sub.choices.items():
        lines += [f"### `activeflow {name}`", "", _cell(helps.get(name, "")), ""] + _flag_rows(subparser)
    return lines


def render() -> str:
    lines = ["# Options", "",
             (f"Generated from the code by `{COMMAND}`; do not edit by hand (tests/test_docs.py checks that "
              "this file is current)."), ""]
    return "\n".join(lines + python_api() + command_line()).rstrip() + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        current = ""
        if os.path.exists(OUTPUT):
            with open(OUTPUT, encoding="utf-8") as f:
                current = f.read()
        if current != text:
            print(f"{OUTPUT} is out of date: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    with open(OUTPUT, "w", encoding="utf-8") as f:
        f.write(text)
    print(OUTPUT)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main(sys.argv[1:]))
