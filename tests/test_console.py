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


def trial(status, result, run=4):
    from types import SimpleNamespace

    from tune_alexnet.grid import study_config

    return SimpleNamespace(status=status, config={**study_config(run), "epochs": 3}, last_result=result)


# What train.py reports: a state saved inside the first epoch (a stop), and an epoch that diverged at once.
SAVED_IN_FIRST_EPOCH = {"saved_for": "stop", "saved_in_epoch": 1, "saved_at_step": 3, "best_val_acc": 0.0,
                        "best_epoch": 0, "epochs_since_best": 0, "checkpoint_kind": "resume"}  # fmt: skip
DIVERGED_AT_ONCE = {"epoch": 1, "val_acc": 10.0, "best_val_acc": 0.0, "best_epoch": 0, "diverged": True}


def test_no_accuracy_is_shown_for_a_trial_without_a_finished_epoch(capsys):
    from tune_alexnet.console import Console

    console = Console(every_s=0)
    console.on_step_end(1, [trial("RUNNING", SAVED_IN_FIRST_EPOCH), trial("PENDING", {}, run=6)])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("   4 "))
    assert row.split()[-2:] == ["-", "-"] and "0.00" not in out and "best: none yet" in out
    console = Console(every_s=0)  # a sweep whose every run diverged at once
    console.on_step_end(1, [trial("TERMINATED", DIVERGED_AT_ONCE), trial("TERMINATED", DIVERGED_AT_ONCE, 6)])
    out = capsys.readouterr().out
    assert "2/2 done" in out and "%" not in out and "best: none (no run has an accuracy)" in out


def test_no_progress_line_follows_the_stops_line(capsys, monkeypatch):
    """Tune's stop notice, said in our words, or our own stop (stopping.py): the progress lines end there."""
    import logging
    from types import SimpleNamespace

    from tune_alexnet import stopping
    from tune_alexnet.console import Console, RayLines

    running = [trial("RUNNING", {"epoch": 1, "val_acc": 20.0, "best_val_acc": 20.0, "best_epoch": 1})]
    with RayLines(quiet=False):
        console = Console(every_s=0)
        console.on_step_end(1, running)
        assert "0/1 done, 1 running" in capsys.readouterr().out
        logging.getLogger("ray.tune.tune").warning(
            "Stop signal received (e.g. via SIGINT/Ctrl+C), ending Ray Tune run."
        )
        console.on_step_end(2, running)
        console.on_experiment_end(running)
        out, err = capsys.readouterr()
        assert "tune-alexnet: stopping:" in err and out == ""
    with RayLines(quiet=False):  # a new sweep of this process speaks again, until its own stop
        console = Console(every_s=0)
        console.on_step_end(1, running)
        assert "0/1 done" in capsys.readouterr().out
        monkeypatch.setattr(stopping, "_active", SimpleNamespace(requested_at=1.0))  # stopping.SaveFirst said it
        console.on_step_end(2, running)
        console.on_experiment_end(running)
        assert capsys.readouterr().out == ""


def test_tunes_traceback_for_a_state_it_could_not_save_to_a_full_disk_is_left_to_the_guards_line(tmp_path):
    import logging

    from tune_alexnet.console import RayLines

    def shown(error: Exception) -> bool:
        message = f"Saving experiment state to storage at '{tmp_path}' failed with exception: "
        record = logging.LogRecord("ray.tune", logging.ERROR, __file__, 1, message, (), (type(error), error, None))
        return RayLines(quiet=False).filter(record)  # Tune logs it with logger.exception: the error in exc_info

    assert not shown(OSError(28, "Error writing bytes to file. Detail: [errno 28] No space left on device"))
    assert shown(RuntimeError("something else"))  # a writable folder with room: Tune's own words are shown


def test_a_stopped_workers_ignored_exit_stays_off_the_console_and_in_driver_log(capsys):
    """A worker stopped while it started up (before the trial's own quiet exit was in place) printed Python's
    'Exception ignored' block for the SystemExit of Ray's SIGTERM handler: a traceback on the console."""
    from tune_alexnet.console import RayLines

    block = ["Exception ignored in: <function WeakSet.__init__.<locals>._remove at 0x7f>", "Traceback (most recent "
             "call last):", '  File "weakref.py", line 38, in _remove', "    def _remove(item, selfref=ref(self)):",
             '  File "worker.py", line 1, in sigterm_handler', "    sys.exit(signal.SIGTERM)", "SystemExit: 15"]  # fmt: skip
    lines = RayLines(quiet=False)
    err = {"pid": 7, "task_name": "train_cifar", "is_err": True}
    lines.worker_lines({**err, "lines": ["before", *block[:3]]})
    lines.worker_lines({**err, "is_err": False, "lines": ["", "on stdout meanwhile"]})  # the other stream, between
    note = "[2026-12-06 14:17:50,001 I 7 7] core_worker.cc:1: Exit signal received"  # Ray's, hidden, meanwhile
    lines.worker_lines({**err, "lines": [*block[3:5], note, *block[5:], "after"]})
    out, err_out = capsys.readouterr()
    assert "meanwhile" in out and "before" in err_out and "after" in err_out, err_out
    assert "Traceback" not in out + err_out and "SystemExit" not in out + err_out, err_out
    assert sum("SystemExit: 15" in line for line in lines.kept) == 1  # driver.log keeps it
    other = [*block[:-1], "ValueError: a worker's own error"]
    lines.worker_lines({"lines": other, "pid": 8, "task_name": "train_cifar"})
    assert capsys.readouterr().out.count("\n") == len(other)  # another error is shown whole
