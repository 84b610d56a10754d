"""Where activeflow keeps downloads, converted stores and compiled programs."""

from __future__ import annotations

import os


def activeflow_home() -> str:
    """$ACTIVEFLOW_HOME, else ~/.cache/activeflow."""
    return os.path.abspath(os.environ.get("ACTIVEFLOW_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "activeflow"))


def default_calibration_text() -> str:
    """The shipped calibration corpus (model-written articles; see checkpoints/make_calibration_text.py),
    used by sparsity calibration and calibrated rounding; never the evaluation text."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "calibration.txt")
