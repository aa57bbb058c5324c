import csv
from importlib import resources

import pytest

from tune_alexnet.grid import Grid, make_grid, run_number


def reference_rows():
    with resources.files("tune_alexnet").joinpath("reference/seed_results.csv").open() as f:
        return list(csv.DictReader(f))


def test_full_grid_is_the_studys_108_runs_in_its_order():
    grid = make_grid()
    assert len(grid) == 108 and len(grid.configs()) == 108
    for config, row in zip(grid.configs(), reference_rows()):
        assert config == {
            "optimizer": row["optimizer"],
            "lr": float(row["lr"]),
            "batch_size": int(row["batch_size"]),
            "dropout": row["dropout"] == "true",
            "batchnorm": row["batchnorm"] == "true",
        }
        assert run_number(config) == int(row["run"])


@pytest.mark.parametrize(
    "pins,size",
    [
        ({}, 108),
        ({"optimizer": ("sgd",)}, 36),
        ({"optimizer": ("sgd", "adam", "rmsprop")}, 108),
        ({"optimizer": ("adam",), "lr": (0.01,)}, 12),
        ({"batchnorm": (True,)}, 54),
        ({"optimizer": ("sgd",), "lr": (0.001,), "batch_size": (32,), "dropout": (False,), "batchnorm": (True,)}, 1),
    ],
)
def test_pinned_flags_shrink_the_grid(pins, size):
    assert len(make_grid(**pins)) == size


def test_run_numbers_for_pinned_flags_follow_the_study():
    runs = [run_number(c) for c in make_grid(optimizer=("sgd",), lr=(0.01,), batchnorm=(True,)).configs()]
    assert runs == [2, 4, 6, 8, 10, 12]
    single = make_grid(optimizer=("sgd",), lr=(0.001,), batch_size=(32,), dropout=(False,), batchnorm=(True,))
    assert [run_number(c) for c in single.configs()] == [16]  # the study's best run
    assert [run_number(c) for c in make_grid(optimizer=("rmsprop",)).configs()] == list(range(73, 109))


def test_values_off_the_studys_grid_have_no_run_number():
    assert run_number({"optimizer": "sgd", "lr": 0.05, "batch_size": 32, "dropout": True, "batchnorm": False}) is None
    assert run_number({"optimizer": "sgd", "lr": 0.01, "batch_size": 256, "dropout": True, "batchnorm": False}) is None


def test_unknown_dimension_is_refused():
    with pytest.raises(ValueError, match="momentum"):
        make_grid(momentum=(0.9,))
    assert isinstance(make_grid(), Grid)
