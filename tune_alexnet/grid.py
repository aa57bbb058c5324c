"""The study's grid: its five dimensions, flags that pin them, and its run numbers.

The study numbers runs 1..108 in the nesting order optimizer, lr, batch size,
dropout (true first), batch norm (false first); `run_number` gives that number
for any configuration on the study's grid and None for a user's own values.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

OPTIMIZERS = ("sgd", "adam", "rmsprop")
LRS = (0.01, 0.001, 0.0001)
BATCH_SIZES = (32, 64, 128)
DROPOUTS = (True, False)
BATCHNORMS = (False, True)

# Order matters: it is the study's nesting order (outermost first).
DIMENSIONS = ("optimizer", "lr", "batch_size", "dropout", "batchnorm")
STUDY_VALUES = dict(zip(DIMENSIONS, (OPTIMIZERS, LRS, BATCH_SIZES, DROPOUTS, BATCHNORMS)))


@dataclass(frozen=True)
class Grid:
    """Values swept along each dimension; a pinned dimension holds the user's values."""

    optimizer: tuple[str, ...] = OPTIMIZERS
    lr: tuple[float, ...] = LRS
    batch_size: tuple[int, ...] = BATCH_SIZES
    dropout: tuple[bool, ...] = DROPOUTS
    batchnorm: tuple[bool, ...] = BATCHNORMS

    def values(self) -> dict[str, tuple]:
        return {d: getattr(self, d) for d in DIMENSIONS}

    def configs(self) -> list[dict]:
        """Every configuration, in the study's order."""
        vals = self.values()
        return [dict(zip(DIMENSIONS, combo)) for combo in itertools.product(*(vals[d] for d in DIMENSIONS))]

    def __len__(self) -> int:
        n = 1
        for v in self.values().values():
            n *= len(v)
        return n


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
