"""The package from Python: the command line's settings and checks, and what a user needs next."""

import pytest

from tune_alexnet import api


def test_flags_from_python_pass_the_command_lines_checks():
    s = api.settings(optimizer=["sgd"], lr=0.01, batch_size=[32, 64], dropout=True, epochs=2, width=0.125)
    assert s.grid.optimizer == ("sgd",) and s.grid.batch_size == (32, 64) and s.grid.dropout == (True,)
    assert s.epochs == 2 and s.trial["width"] == 0.125
    with pytest.raises(ValueError, match=r"^tune-alexnet sweep: error: argument --epochs: invalid value '0'; allowed"):
        api.settings(epochs=0)
    with pytest.raises(ValueError, match="--runs picks whole runs of the study"):
        api.settings(runs=[2], optimizer="sgd")
    assert api.settings(tf32=False).runtime["tf32"] is False  # a switch turned off: its --no- twin
    assert api.settings(tf32=True).runtime["tf32"] is True and "tf32" not in api.settings().runtime


@pytest.mark.slow
def test_a_sweep_from_python_returns_the_result_grid_and_the_table(ray_local, synthetic_dir, tmp_path):
    results, table = api.sweep(runs=[6, 4], epochs=1, width=0.125, data_dir=str(synthetic_dir),
                               storage=str(tmp_path), name="api")  # fmt: skip
    assert list(table["run"]) == [4, 6] and set(table["status"]) == {"terminated"}
    assert (tmp_path / "api" / "results.parquet").exists() and (tmp_path / "api" / "report.md").exists()
    best = results.get_best_result()  # the study's metric and mode are set
    assert round(best.metrics["best_val_acc"], 2) == api.best_run(table)["final_accuracy"]
    model = api.load_model(api.best_run(table)["best_checkpoint"])
    assert api.predict_proba(model, __import__("numpy").zeros((2, 32, 32, 3), "uint8")).shape == (2, 10)
    out = tmp_path / "elsewhere"
    assert [p.rsplit("/", 1)[-1] for p in api.report(tmp_path / "api", out)] == ["report.md", "report.html"]
    assert (out / "report.md").is_file() and (out / "report.html").stat().st_size > 1e6
