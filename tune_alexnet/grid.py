"""The study's grid: flags that pin its dimensions, and its run numbers.

The study numbers runs 1..108 in the nesting order of settings.DIMENSIONS, each
dimension's values in the order settings lists them; `run_number` gives that
number for any configuration on the study's grid and None for a user's own values.
"""

from __future__ import annotations

from .settings import DIMENSIONS, Grid

STUDY_VALUES = Grid().values()


def make_grid(**pins) -> Grid:
    """A flag left out (None) sweeps the study's values; one given pins that dimension."""
    unknown = set(pins) - set(DIMENSIONS)
    if unknown:
        raise ValueError(f"unknown grid dimension(s) {sorted(unknown)}; allowed: {', '.join(DIMENSIONS)}")
    chosen = {d: STUDY_VALUES[d] if pins.get(d) is None else tuple(pins[d]) for d in DIMENSIONS}
    for d, v in chosen.items():
        if not v:
            raise ValueError(f"grid dimension {d} has no values")
    return Grid(**chosen)


def run_number(config: dict) -> int | None:
    """The study's run number (1..108) of a configuration, or None if it is off the study's grid."""
    index = 0
    for d in DIMENSIONS:
        values = STUDY_VALUES[d]
        value = config[d]
        matches = [i for i, v in enumerate(values) if (abs(v - value) < 1e-12 if d == "lr" else v == value)]
        if not matches:
            return None
        index = index * len(values) + matches[0]
    return index + 1


def study_config(run: int) -> dict:
    """The configuration of the study's run number `run` (1..108)."""
    configs = Grid().configs()
    if not 1 <= run <= len(configs):
        raise ValueError(f"run {run} is not one of the study's runs; allowed: 1..{len(configs)}")
    return configs[run - 1]


def optimizer_order(values) -> list[str]:
    """Optimizers in the study's order; names off its grid follow, alphabetically."""
    study = STUDY_VALUES["optimizer"]
    return sorted(set(values), key=lambda o: (study.index(o) if o in study else len(study), o))


def full_config(config: dict) -> dict:
    """A trial's config with the five grid settings filled in from its study run number, where it has one
    (`--runs` sweeps over run numbers alone)."""
    if "run" in config and config["run"] is not None and any(d not in config for d in DIMENSIONS):
        return {**study_config(int(config["run"])), **config}
    return config
