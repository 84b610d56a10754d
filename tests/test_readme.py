"""README's two commands are the ones CI runs and the ones that work."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands() -> list[str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = re.search(r"```\n(.*?)```", text, re.S)
    assert block, "README.md must start with a code block of commands"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_starts_with_setup_and_test_commands():
    setup, tests = readme_commands()[:2]
    assert "pip install -e" in setup and "activeflow generate" in setup
    assert "pytest" in tests


def test_ci_runs_exactly_the_readme_test_command():
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().strip().splitlines()
    assert ci[-1].strip() == readme_commands()[1].strip()
