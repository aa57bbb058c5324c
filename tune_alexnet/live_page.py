"""The study page while a sweep runs: a Tune callback that writes report.html when the sweep starts and again
at least every `every_s` seconds, from what the trials report to the driver.

A page already open in a browser re-reads the report-data.js written beside it and keeps the reader's sort,
brush and highlight (page.js). On --resume the epochs reported before the restart come from the experiment folder
(export's reader), the new ones from this callback. Writing the page is a convenience: a failure is logged into
the experiment's driver.log and the sweep goes on.
"""

from __future__ import annotations

import logging
import os
import time

import pandas as pd
from ray import tune

from .console import Pace
from .export import (
    EPOCH_SCHEMA,
    RESULT_COLUMNS,
    STATUS,
    TABLE_SCHEMA,
    Experiment,
    checked_config,
    epoch_frame,
    load_experiment,
    origin_columns,
    row_of,
    typed,
)
from .grid import run_number
from .page import write_page
from .settings import DIMENSIONS, EPOCHS, clipped, read_settings
from .storage import is_remote

EVERY_S = 30.0  # as often as the console's progress line
# A child of Ray's logger: console.RayLines keeps every line of it in the experiment's driver.log.
log = logging.getLogger("ray.tune_alexnet.page")


class LivePage(tune.Callback):
    """Pickled with the experiment like console.Console: it keeps only where to write and how often."""

    def __init__(self, exp_uri: str, every_s: float = EVERY_S):
        self.exp_uri, self.every_s = exp_uri, every_s
        self.__setstate__({})

    def __getstate__(self) -> dict:
        return {"exp_uri": self.exp_uri, "every_s": self.every_s}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.started: float | None = None
        self.last_write = 0.0
        self.failures = 0
        self.records: dict[str, list[dict]] = {}  # trial id -> the epochs it reported to this driver
        self.earlier: dict[str, tuple[dict, list[dict]]] | None = None  # trial id -> (row, epochs) from the folder
        self.settings: dict | None = None
        self.pace = Pace()

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if result.get("epoch") is None:
            return
        records = self.records.setdefault(trial.trial_id, [])
        while records and records[-1]["epoch"] >= result["epoch"]:  # a restarted trial replays its epochs
            records.pop()
        records.append({c: result.get(c) for c in RESULT_COLUMNS})

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if self.started is None:
            self.started = time.monotonic()
        self.pace.update(_snapshot(trials))
        if time.monotonic() - self.last_write >= self.every_s:
            self.write(trials, live=True)

    def on_experiment_end(self, trials: list, **info) -> None:
        self.write(trials, live=False)

    def write(self, trials: list, live: bool) -> None:
        self.last_write = time.monotonic()
        try:
            exp = self.experiment(trials)
            write_page(exp, self.exp_uri, live=self.live_state(trials) if live else None)
        except Exception as exc:  # never stop a sweep for its page
            self.failures += 1
            # a storage gone read-only: the disk guard's line says so, with the way on
            shut = not is_remote(self.exp_uri) and os.path.isdir(self.exp_uri) and not os.access(self.exp_uri, os.W_OK)
            level = logging.WARNING if self.failures == 1 and not shut else logging.INFO
            log.log(level, "the study page was not written: %s: %s", type(exc).__name__, clipped(str(exc), 300))

    def experiment(self, trials: list) -> Experiment:
        """The tables as export would write them now, from the trials' reports (and, on --resume, the folder)."""
        if self.earlier is None:
            self.earlier = _from_folder(self.exp_uri)
        if self.settings is None:
            self.settings = read_settings(self.exp_uri) or {}
        rows, frames = [], []
        for t in trials:
            row, records = self.earlier.get(t.trial_id, (None, []))
            live = self.records.get(t.trial_id, [])
            if live:
                records = [r for r in records if r["epoch"] < live[0]["epoch"]] + live
            row = {**_row(t, records, row), **origin_columns(self.exp_uri, self.settings)}
            rows.append(row)
            if records:
                frames.append(epoch_frame(records, row))
        table = typed(pd.DataFrame(rows, columns=list(TABLE_SCHEMA)), TABLE_SCHEMA)
        table = table.sort_values(["run", "trial_id"], na_position="last", kind="stable").reset_index(drop=True)
        epochs = typed(pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(), EPOCH_SCHEMA)
        return Experiment(self.exp_uri, table, epochs, self.settings, [])

    def live_state(self, trials: list) -> dict:
        snapshot = _snapshot(trials)
        running = []
        for t in trials:
            if t.status != "RUNNING":
                continue
            config, _ = checked_config(t.config)
            r = t.last_result or {}
            running.append(
                {
                    "run": run_number(config) if all(config.get(d) is not None for d in DIMENSIONS) else None,
                    **{d: config.get(d) for d in DIMENSIONS},
                    "epoch": r.get("epoch"),
                    "max_epochs": config.get("epochs") or EPOCHS,
                    "acc": r.get("val_acc"),
                    "best": r.get("best_val_acc"),
                }
            )
        running.sort(key=lambda r: (r["run"] is None, r["run"] or 0))
        return {
            "running": running,
            "pending": sum(t.status == "PENDING" for t in trials),
            "left_s": self.pace.left(snapshot),
            "elapsed_s": time.monotonic() - (self.started or time.monotonic()),
        }


def _snapshot(trials: list) -> list[tuple]:
    return [(t.status, t.config, dict(t.last_result or {})) for t in trials]


def _from_folder(exp_uri: str) -> dict[str, tuple[dict, list[dict]]]:
    """What the experiment folder already holds (a resumed sweep's earlier epochs); nothing for a new one."""
    try:
        exp = load_experiment(exp_uri)
    except Exception:  # a new experiment has no trials yet; an unreadable one is the end-of-sweep export's to say
        return {}
    out = {}
    for row in exp.table.to_dict("records"):
        part = exp.epochs[exp.epochs["trial_id"] == row["trial_id"]]
        records = part[RESULT_COLUMNS].astype(object).where(part[RESULT_COLUMNS].notna(), None).to_dict("records")
        out[row["trial_id"]] = (row, records)
    return out


def _row(trial, records: list[dict], earlier: dict | None) -> dict:
    """A trial's row of the table (export.TABLE_SCHEMA) from its status and epochs."""
    config, _ = checked_config(trial.config)
    last = records[-1] if records else {}
    diverged = bool(last.get("diverged"))
    status = "diverged" if diverged and trial.status == "TERMINATED" else STATUS.get(trial.status, "unknown")
    error = None
    if trial.status == "ERROR":
        error = (earlier or {}).get("error") or _error_line(trial)
    return row_of(config, records, status, trial.trial_id, error, None)


def _error_line(trial) -> str:
    try:
        error = trial.get_error()
    except Exception:
        error = None
    lines = [ln.strip() for ln in str(error or "").splitlines() if ln.strip()]
    return clipped(lines[-1], 500) if lines else "error"
