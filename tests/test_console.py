"""What a person reads while a sweep runs: the time left, and Ray's own lines."""

import time

import pytest

from tune_alexnet.console import HIDDEN, Pace


def snapshot(*trials):
    """(status, config, last result) per trial, as the console keeps them."""
    return [(status, {}, {"epoch": epoch} if epoch else {}) for status, epoch in trials]


def test_no_time_left_is_promised_before_a_trial_has_finished(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    pace = Pace()
    for t, epochs in ((100, 0), (110, 2), (120, 4)):
        clock[0] = t
        pace.update(snapshot(("RUNNING", epochs // 2), ("RUNNING", epochs // 2), ("PENDING", 0)))
    assert pace.left(snapshot(("RUNNING", 2), ("RUNNING", 2), ("PENDING", 0))) is None  # run length unknown


def test_time_left_comes_from_work_done_and_falls_while_nothing_moves(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    pace = Pace()
    steps = [(0, [("RUNNING", 0), ("RUNNING", 0), ("PENDING", 0), ("PENDING", 0)]),
             (10, [("RUNNING", 2), ("RUNNING", 2), ("PENDING", 0), ("PENDING", 0)]),
             (20, [("TERMINATED", 4), ("RUNNING", 4), ("RUNNING", 0), ("PENDING", 0)])]  # fmt: skip
    for t, trials in steps:
        clock[0] = t
        pace.update(snapshot(*trials))
    now = snapshot(*steps[-1][1])
    # 8 epochs in 20 s; a run takes 4: 0 left for the running one at 4, 4 for the one at 0, 4 for the pending one.
    assert pace.left(now) == pytest.approx(8 / (8 / 20))
    left = []
    for t in (25, 30, 35):  # nothing reported: the estimate only falls
        clock[0] = t
        pace.update(now)
        left.append(pace.left(now))
    assert left == sorted(left, reverse=True) and left[0] < 20


RAY_LINES = """
import logging, sys
from tune_alexnet.console import HIDDEN, RayLines
with RayLines(sys.argv[1] == "quiet") as lines:
    lines.keep_in(sys.argv[2])
    tune_log = logging.getLogger("ray.tune.tune")
    for hidden in HIDDEN:
        tune_log.warning(hidden + ": something of Ray's own")
    tune_log.warning("Stop signal received (e.g. via SIGINT/Ctrl+C), ending Ray Tune run.")
    tune_log.warning("a warning of Ray's worth seeing")
    tune_log.error("an error of Ray's")
    tune_log.info("an informational line")
"""


@pytest.mark.parametrize("quiet", [False, True])
def test_ray_lines_are_kept_whole_and_shown_only_where_they_add_to_ours(quiet, tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", RAY_LINES, "quiet" if quiet else "loud", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    err = out.stderr
    assert not any(hidden in err for hidden in HIDDEN) and "Stop signal received" not in err
    assert ("a warning of Ray's worth seeing" in err) is not quiet
    assert "an error of Ray's" in err and "an informational line" not in err
    assert ("tune-alexnet: stopping: running trials keep their last checkpoints" in err) is not quiet
    kept = (tmp_path / "driver.log").read_text()
    for line in (*HIDDEN, "Stop signal received", "worth seeing", "an error of Ray's", "an informational line"):
        assert line in kept


def test_one_best_run_rule_for_the_progress_line_the_summary_the_report_and_the_tables():
    """Runs 6 and 4 tie at 17.50% (run 6 reported first) and an off-grid trial ties too: every place names run 4."""
    import pandas as pd

    from tune_alexnet.console import Console, summary
    from tune_alexnet.export import COLUMNS, TABLE_SCHEMA, best_run, typed
    from tune_alexnet.grid import study_config
    from tune_alexnet.report import per_optimizer

    trials = [("t_00000", study_config(6), 17.5), ("t_00001", {**study_config(4), "lr": 0.05}, 17.5),
              ("t_00002", study_config(4), 17.5), ("t_00003", study_config(6), 17.5), ("t_00004", study_config(1), 9.0)]  # fmt: skip
    console = Console()
    console.snapshot = [("TERMINATED", c, {"best_val_acc": acc + 0.001, "trial_id": t}) for t, c, acc in trials]
    assert "best 17.50% (run 4:" in console.progress()

    rows = [{**c, "run": [6, None, 4, 6, 1][i], "final_accuracy": acc, "trial_id": t, "status": "terminated"}
            for i, (t, c, acc) in enumerate(trials)]  # fmt: skip
    table = typed(pd.DataFrame(rows, columns=COLUMNS), TABLE_SCHEMA)
    assert best_run(table)["trial_id"] == "t_00002"
    assert best_run(table.iloc[::-1])["trial_id"] == "t_00002"  # whatever the order of the rows
    written = ["/x/results.parquet", "/x/report.md"]
    assert "  best:   17.50% (run 4:" in summary(table, "/x", written)
    assert per_optimizer(table)["best_config"][0].startswith("run 4:")


def test_chosen_runs_are_created_in_run_order():
    from tune_alexnet.settings import SweepSettings
    from tune_alexnet.sweep import trial_space

    assert trial_space(SweepSettings(runs=(16, 12, 38)))["run"] == {"grid_search": [12, 16, 38]}
