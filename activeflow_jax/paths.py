"""Where activeflow keeps downloads, converted stores and compiled programs."""

from __future__ import annotations

import os


def activeflow_home() -> str:
    """$ACTIVEFLOW_HOME, else ~/.cache/activeflow."""
    return os.path.abspath(os.environ.get("ACTIVEFLOW_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "activeflow"))
