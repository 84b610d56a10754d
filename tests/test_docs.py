"""The documents: docs/options.md is what the code says, and no document names a missing file."""

from __future__ import annotations

import glob
import importlib.util
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)
# a file named in backticks or in a command: has a folder part and a source-like extension
PATH = re.compile(r"(?<![\w./~$-])((?:[\w.-]+/)+[\w.-]+\.(?:py|md|cc|ipynb|toml|txt|raw|sh))(?![\w/])")
SEARCH_ROOTS = ("", "activeflow_jax")  # `runtime/swap.py` is a path inside the package
BARE_MD = re.compile(r"(?<![\w./-])([A-Za-z][\w-]*\.md)\b")  # DESIGN.md, results.md: beside the document or at the root


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_options", os.path.join(ROOT, "docs", "gen_options.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_options_md_is_generated_from_the_current_code():
    gen = _load_generator()
    with open(gen.OUTPUT, encoding="utf-8") as f:
        current = f.read()
    assert current == gen.render(), f"docs/options.md is out of date: run `{gen.COMMAND}` and commit the result"


def _documents() -> list[str]:
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def missing_references(path: str, text: str) -> list[str]:
    """Relative links and file paths in `text` (a Markdown file at `path`) that name nothing in the repo."""
    here = os.path.dirname(path)
    missing = []
    for target in LINK.findall(text):
        if re.match(r"^(https?:|mailto:|#)", target):
            continue
        target = target.split("#")[0]
        if target and not os.path.exists(os.path.normpath(os.path.join(here, target))):
            missing.append(target)
    for ref in PATH.findall(text):
        if ref.startswith(("results/", "OUT")):  # outputs a command writes, not files of the repo
            continue
        candidates = [os.path.join(ROOT, base, ref) for base in SEARCH_ROOTS] + [os.path.join(here, ref)]
        if not any(os.path.exists(c) for c in candidates):
            missing.append(ref)
    for name in BARE_MD.findall(text):
        if not any(os.path.exists(os.path.join(d, name)) for d in (ROOT, here, os.path.join(ROOT, "docs"))):
            missing.append(name)
    return list(dict.fromkeys(missing))


def test_readme_and_docs_name_only_files_that_exist():
    problems = {}
    for path in _documents():
        with open(path, encoding="utf-8") as f:
            missing = missing_references(path, f.read())
        if missing:
            problems[os.path.relpath(path, ROOT)] = sorted(set(missing))
    assert not problems, f"documents name files that do not exist: {problems}"


def test_the_reference_check_catches_a_missing_file():
    doc = os.path.join(ROOT, "docs", "x.md")
    text = ("See [options](options.md), [nowhere](nothere.md), `bench/swap.py`, `runtime/swap.py`, "
            "`bench/nothing.py`, DESIGN.md and [a site](https://example.org).\n")
    assert missing_references(doc, text) == ["nothere.md", "bench/nothing.py", "DESIGN.md"]


PLACEHOLDERS = {"N": "2", "T": "0.5", "P": "0.9", "S": "0.5", "K": "1", "B": "0.5", "DIR": "some_dir"}


def readme_cli_commands() -> list[str]:
    """Every `activeflow ...` command in README's code blocks (continuation lines joined, comments cut)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    commands, in_block = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        line = line.split("  #")[0].rstrip()
        if in_block and line.startswith("activeflow "):
            commands.append(line)
        elif in_block and line.startswith(" ") and commands and line.strip().startswith("["):
            commands[-1] += " " + line.strip()
    return commands


def test_readme_commands_parse_with_the_current_cli():
    """Flags renamed or removed in cli.py make this fail: README shows only commands that parse."""
    import shlex

    from activeflow_jax.cli import build_parser

    commands = readme_cli_commands()
    assert len(commands) >= 10
    for command in commands:
        words = [PLACEHOLDERS.get(w, w) for w in shlex.split(command.replace("[", " ").replace("]", " "))[1:]]
        words = [w.split("|")[0] if re.fullmatch(r"[a-z_]+(\|[a-z_]+)+", w) else w for w in words]
        try:
            build_parser().parse_args(words)
        except SystemExit as exc:
            assert exc.code == 0, f"README command does not parse: {command}"


def test_readme_support_matrix_lists_every_gguf_type_the_importer_takes():
    from activeflow_jax.formats.gguf_import import supported_tensor_types

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        row = next(line for line in f if line.startswith("| GGUF weight types |"))
    listed = set(re.findall(r"\b[A-Z][A-Z0-9_]*\d[A-Z0-9_]*\b", row.split("|")[2]))
    assert listed == set(supported_tensor_types()), "update README's support matrix (GGUF weight types)"
