"""An experiment folder (local or s3://, finished, half-finished or live) -> one table, one row per trial.

Reads only what Tune wrote (experiment state, each trial's result.json and
error file) and never unpickles a file of ours; nothing is re-run and Ray need
not be running. Local tables are written to a temporary file and renamed, so a
crash never leaves a truncated one; in a bucket each file is one upload.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import io
import json
import math
import os
import re
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .cluster import open_to_all, others_on_the_way
from .data import check_record
from .grid import full_config, optimizer_order, run_number
from .settings import (
    BOUNDS,
    DIMENSIONS,
    EPOCHS,
    PRECISIONS,
    SETTINGS_FILE,
    Bound,
    Grid,
    RedactedError,
    escaped,
    expand_user,
    from_record,
    is_uri,
    path_problem,
    read_settings,
    redacted,
    say,
    without_credentials,
)
from .storage import (
    ERROR_LIMIT,
    JSON_LIMIT,
    REACH_TIMEOUT_S,
    RESULT_FILE,
    RESULT_LIMIT,
    RESULT_LINES,
    STATE_LIMIT,
    STATE_TRIALS,
    TEXT_LIMIT,
    RefusedFile,
    as_given,
    check_file,
    existing_parent,
    experiment_uri,
    first_line,
    is_remote,
    last_name,
    list_folder,
    make_folders,
    missing_folders,
    open_file,
    parse_json,
    plain_name,
    reach,
    read_bytes,
    read_json,
    remove_empty,
    scheme_problem,
    shown,
    stalled,
    storage_uri,
    upload_limit,
    within,
)

TABLE_NAME = "results"  # results.parquet and results.csv
# The report, and the bytes of its start that hold the line naming its experiment: after its title and the sentence
# on what ran, each of which may hold a path as long as the system allows, escaped (& as 5 bytes).
REPORT_NAME, REPORT_HEAD = "report.md", 2**16
EPOCHS_NAME = "epochs"  # epochs.parquet: every reported epoch of every trial
_GRID_TYPES = {
    "run": "Int64",
    "optimizer": "string",
    "lr": "float64",
    "batch_size": "Int64",
    "dropout": "boolean",
    "batchnorm": "boolean",
    "seed": "Int64",
}
# Where a row came from, in both tables, so that the tables of many experiments concatenated still tell their rows
# apart: the experiment's name, the network's width, the train images per class (null: all of them), and the
# fingerprint of the pixels it trained on (null where the folder has no record of its data).
_PROVENANCE = {"experiment": "string", "width": "float64", "subset": "Int64", "data_fingerprint": "string"}
# Column -> pandas dtype: the same in every experiment (a column without errors is still a string column,
# integers with gaps are nullable), so tables of many experiments read as one dataset.
TABLE_SCHEMA = {
    **_GRID_TYPES,
    "final_accuracy": "float64",
    "epochs_run": "Int64",
    "best_epoch": "Int64",
    "max_epochs": "Int64",
    "stopped_early": "boolean",
    "status": "string",
    "error": "string",
    "train_time_s": "float64",
    "eval_time_s": "float64",
    "trial_id": "string",
    "node_id": "string",
    "best_checkpoint": "string",
    "precision": "string",  # what the trial computed in (fp32, bf16); as configured where it reported nothing
    **_PROVENANCE,
}
EPOCH_SCHEMA = {
    "trial_id": "string",
    **_GRID_TYPES,
    "epoch": "Int64",
    "train_loss": "float64",
    "train_acc": "float64",
    "val_loss": "float64",
    "val_acc": "float64",
    "best_val_acc": "float64",
    "best_epoch": "Int64",
    "epochs_since_best": "Int64",
    "train_s": "float64",
    "eval_s": "float64",
    "train_time_s": "float64",
    "eval_time_s": "float64",
    "checkpoint_s": "float64",
    "report_s": "float64",
    "diverged": "boolean",
    "images_per_s": "float64",
    "device": "string",
    "precision": "string",
    # How the epoch ran: results replay exactly whatever these were, except TF32 (a speed setting that rounds)
    "step_mode": "string",
    "channels_last": "boolean",
    "tf32": "boolean",
    "augment_chunk": "Int64",
    "gpus_granted": "float64",
    "node_id": "string",
    "checkpoint_kind": "string",
    "checkpoint_dir_name": "string",
    **_PROVENANCE,
}
COLUMNS = list(TABLE_SCHEMA)
ORIGINAL_COLUMNS = ["Run", "Optimizer", "LR", "Batch Size", "Dropout", "Batch Norm", "Final Accuracy"]
STATUS = {
    "PENDING": "pending",
    "RUNNING": "running",
    "PAUSED": "paused",
    "TERMINATED": "terminated",
    "ERROR": "errored",
}


INTERRUPTED = "interrupted"  # a trial that was running or paused when its sweep stopped (--resume continues it)
LOST = "lost"  # a trial whose result.json is gone: what it reported is unknown
DAMAGED = "damaged"  # a trial whose config, folder or results are not what Tune and this package write
TRIAL_PREFIX = "train_cifar_"  # Tune's trial folders: <trainable>_<trial id>_<index>_<its settings>_<date>
_TRIAL_FOLDER = re.compile(re.escape(TRIAL_PREFIX) + r"([0-9a-f]+_[0-9]+)(_.*)?", re.DOTALL)
STUDY_RUNS = len(Grid())
ERROR_LINE = 500  # characters of a trial's error line kept in the table
# Bounds of what a result line holds (a config's are settings.BOUNDS): epoch counts never above the most epochs a
# sweep may run, accuracies in percent, times and rates >= 0; a loss may be any size >= 0, or NaN once diverged.
_EPOCH_COUNT = Bound(0, BOUNDS["epochs"].high, whole=True)
_PERCENT = Bound(0, 100)
_AMOUNT = Bound(0, math.inf)
_ACCURACIES = ("train_acc", "val_acc", "best_val_acc")
_LOSSES = ("train_loss", "val_loss")
RESULT_COLUMNS = [c for c in EPOCH_SCHEMA if c not in _GRID_TYPES and c not in _PROVENANCE and c != "trial_id"]
# What the table holds of a trial's results: unknown (null) for a lost or damaged trial.
_RESULT_FIELDS = ("final_accuracy", "epochs_run", "best_epoch", "stopped_early", "train_time_s", "eval_time_s",
                  "node_id", "best_checkpoint")  # fmt: skip


def best_key(accuracy: float, run, trial_id) -> tuple:
    """The order of the one best-run rule, smallest first: the highest best accuracy (as the tables show it, to
    0.01 points), then the lowest study run number (a run off the study's grid after every run on it), then the
    earliest trial (the lowest trial id: Tune numbers trials as it creates them)."""
    return (-score(accuracy, run, trial_id), str(trial_id or ""))


SCORE_STEP_RUN, SCORE_STEP_TRIAL = 1e-5, 1e-10  # (STUDY_RUNS + 1) runs and 99,999 trials stay below 0.01 point


def score(accuracy, run, trial_id) -> float:
    """The one best-run rule as one number, highest best: the accuracy as the tables show it, less a tie-breaker
    below 0.01 point (the run number, then the trial's index within its experiment). Trials report it as
    `score`, the metric Tune ranks by, so that Ray's own `get_best_result`, which keeps the first of equal
    values in its own order, names the same run as the tables. NaN for a trial with no accuracy."""
    if accuracy is None or pd.isna(accuracy):
        return math.nan
    rank = STUDY_RUNS + 1 if run is None or pd.isna(run) else int(run)
    index = str(trial_id or "").rsplit("_", 1)[-1]
    index = min(int(index), 99_999) if index.isascii() and index.isdigit() else 0  # not '²', a digit int() refuses
    return round(float(accuracy), 2) - rank * SCORE_STEP_RUN - index * SCORE_STEP_TRIAL


BEST_COLUMNS = ("final_accuracy", "run", "trial_id")  # what best_key ranks by


def best_run(table: pd.DataFrame) -> pd.Series | None:
    """The best run of a results table (TABLE_SCHEMA) by the one rule of `best_key`; None when no run has an
    accuracy. The console's progress line and summary, the report and the tables all pick with this rule."""
    table = table.table if isinstance(table, Experiment) else table
    if not isinstance(table, pd.DataFrame):
        raise ExportError(f"{escaped(repr(table), 80)} is not a results table; allowed: {TABLE_ALLOWED}")
    columns = table.columns
    if columns.nlevels != 1 or not columns.is_unique:
        raise ExportError(f"a DataFrame with repeated or nested column names is not a results table; allowed: "
                          f"{TABLE_ALLOWED}")  # fmt: skip
    if not set(BEST_COLUMNS) <= set(columns) or not all(_real_numbers(table[c]) for c in BEST_COLUMNS[:2]):
        named = ", ".join(f"{c} ({table[c].dtype if c in columns else 'missing'})" for c in BEST_COLUMNS)
        raise ExportError(f"a DataFrame with {named} is not a results table; allowed: {TABLE_ALLOWED}")
    scored = table[table["final_accuracy"].notna()]
    if scored.empty:
        return None
    rows = scored[list(BEST_COLUMNS)].itertuples(index=False)
    try:
        at = min(enumerate(rows), key=lambda r: best_key(*r[1]))[0]
    except (TypeError, ValueError, OverflowError) as exc:  # an infinite run, a trial id that is NA or no text
        raise ExportError(
            f"a DataFrame holding a value no results table holds ({first_line(exc)}); allowed: {TABLE_ALLOWED}"
        ) from None
    return scored.iloc[at]  # by position: tables joined with pd.concat repeat their index


def _real_numbers(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_complex_dtype(column)


TABLE_ALLOWED = (
    "a DataFrame with numeric final_accuracy and run columns and a trial_id column (table(), or "
    "load_experiment(...).table)"
)


class ExportError(RedactedError):
    """The folder is not something we can read as an experiment; one line for the command line."""


@dataclass
class Experiment:
    path: str
    table: pd.DataFrame  # one row per trial, TABLE_SCHEMA
    epochs: pd.DataFrame  # one row per reported epoch, EPOCH_SCHEMA
    settings: dict  # the sweep's settings record (empty for a folder written by other code)
    notes: list[str] = field(default_factory=list)  # what could not be read, for the user
    generation: int | None = None  # newest change of the files read (ns), taken before reading; None: unknown
    seen: tuple | None = None  # those files as they were then (_generation): a change since, within a tick, too


def sweep_holds(path: str) -> bool:
    """Whether a sweep holds this local experiment now (its lock file beside the folder is locked); a bucket's
    lock is on the machine that runs it, so there the answer is yes: its trials may well be running."""
    if is_remote(path):
        return True
    folder = Path(path)
    lock = folder.parent / f".{folder.name}.lock"
    import fcntl

    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False  # released (the file is removed) or never there
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def load_experiment(source, ended: bool | None = None) -> Experiment:
    """`source`: an experiment folder (path, ~path or URI) or a local tune.ResultGrid (a ResultGrid of a
    bucket forgets its URI's scheme: pass the URI). Tune's experiment state is read as plain JSON, never
    unpickled (Ray's own reader unpickles parts of it), so a folder from a shared bucket runs no code here.

    Nothing in the folder is trusted: every file is read through storage.read_bytes (inside the folder, no link
    followed, size-bounded) and every value is checked. A bad trial among good ones becomes a row marked
    `damaged` (or `lost` when its result.json is gone) whose error names the file and field; a problem with the
    folder as a whole raises ExportError.

    `ended`: the sweep is over (None: over unless a sweep holds the folder now); then a trial that Tune's state
    leaves running or paused says `interrupted`."""

    source = getattr(source, "experiment_path", source)
    if why := path_problem(source):  # as the command line's experiment argument: str(None) would be a folder name
        raise ExportError(f"experiment: {why} (or a tune.ResultGrid)")
    path = storage_uri(os.fspath(source))
    if not is_remote(path) and not os.path.isdir(path):  # (os.path: False for a name too long, as for none)
        raise ExportError(f"{path} is not a folder; allowed: an experiment folder written by 'tune-alexnet sweep'")
    if scheme_problem(path):
        raise ExportError(f"{path}: {scheme_problem(path)}")
    notes: list[str] = []
    generation, seen = (None, None) if is_remote(path) else _generation(path) or (None, None)
    before, fs = len(stalled), None  # (_answered_all)
    try:
        fs, base = reach(path)
        settings = _settings(path)
        entries = list_folder(fs, base)
        trials, why = _trials_from_state(fs, base, [name for name, _ in entries])
        if trials is None:
            trials = _trials_on_disk(fs, base, entries)
            if not trials:
                raise FileNotFoundError(f"{why}, and no trial folders")
            notes.append(
                f"the experiment state in {path} is missing or unreadable ({why}); the table is rebuilt from the "
                f"{len(trials)} trial folders, and trials that did not end say 'unknown'"
            )
        else:
            trials += _trials_left_out(fs, base, entries, trials, path, notes)
    except (OSError, ValueError, TimeoutError) as exc:  # an absent folder in a bucket, no access, no answer
        if isinstance(exc, TimeoutError) and fs is not None:  # it answered at first
            raise _unanswered(path, first_line(exc)) from None
        raise ExportError(
            f"{path} holds no readable Tune experiment ({first_line(exc)}); allowed: an experiment folder such "
            f"as ray_results/<name> or s3://BUCKET/PATH/<name>"
        ) from None
    rows, epoch_frames = [], []
    origin = origin_columns(path, settings)
    _answered_all(path, before)
    for trial in trials:
        try:
            row, records = _read_trial(fs, base, trial, path)
        except TimeoutError as exc:
            raise _unanswered(path, first_line(exc)) from None
        _answered_all(path, before)
        row.update(origin)
        rows.append(row)
        if records:
            epoch_frames.append(epoch_frame(records, row))
    if ended if ended is not None else not sweep_holds(path):
        for row in rows:
            if row["status"] in ("running", "paused"):
                row["status"] = INTERRUPTED
    # Study order; trials off the study's grid (no run number) follow in creation order.
    table = (
        typed(pd.DataFrame(rows, columns=COLUMNS), TABLE_SCHEMA)
        .sort_values(["run", "trial_id"], na_position="last", kind="stable")
        .reset_index(drop=True)
    )
    epochs = typed(pd.concat(epoch_frames, ignore_index=True) if epoch_frames else pd.DataFrame(), EPOCH_SCHEMA)
    epochs = epochs.sort_values(["run", "trial_id", "epoch"], na_position="last", kind="stable").reset_index(drop=True)
    return Experiment(path, table, epochs, settings, notes, generation, seen)


def _answered_all(path: str, before: int) -> None:
    """Each call on a bucket given up on since `before` was taken where it happened as a file missing: its trials
    would look lost, and good tables would be replaced by such; the read is refused whole instead."""
    if len(stalled) > before:
        raise _unanswered(path, f"a call gave no answer within {REACH_TIMEOUT_S:g} s")


def _unanswered(path: str, why: str) -> ExportError:
    return ExportError(
        f"{path} stopped answering while it was read ({why}); nothing was written, as its trials would have looked "
        "lost; try again once it answers"
    )


def _generation(path: str) -> tuple[int, tuple] | None:
    """The newest modification time (ns) of what a table is read from (Tune's experiment state and each trial's
    result.json, looked at without following links), and each of those files' inode, size and time. Taken before
    they are read, so a table is never newer than it says; tables of an older read never replace those of a newer
    one (write_tables). The sizes tell a change within one tick of the file system's clock (a few ms, or 1 to 2 s
    on some), which the newest time alone does not: a trial's epoch appended in the tick of the last read."""
    found = []
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                name = entry.name
                with contextlib.suppress(OSError):
                    if name.startswith("experiment_state-") and name.endswith(".json"):
                        found.append((name, entry.stat(follow_symlinks=False)))
                    elif name.startswith(TRIAL_PREFIX) and entry.is_dir(follow_symlinks=False):
                        found.append((name, os.lstat(os.path.join(entry.path, RESULT_FILE))))
    except OSError:
        return None
    files = tuple(sorted((name, st.st_ino, st.st_size, st.st_mtime_ns) for name, st in found))
    return max((f[3] for f in files), default=0), files


@dataclass
class _Trial:
    """A trial as its experiment state (or, where that is unreadable, its own folder) names it, not yet trusted."""

    trial_id: str | None
    config: object  # as read; checked when its row is built
    status: str  # Tune's status; UNKNOWN when rebuilt from its folder
    folder: str | None  # its folder's name inside the experiment; None where none can be used
    source: str  # the file its config came from, for error lines
    problem: str | None = None  # why it is damaged before anything of it is read


def origin_columns(path: str, settings: dict) -> dict:
    """The provenance columns an experiment shares by all its rows (the width is each trial's own)."""
    data = settings.get("data") if isinstance(settings.get("data"), dict) else {}
    return {
        "experiment": last_name(path),
        "subset": settings.get("subset"),
        "data_fingerprint": data.get("fingerprint"),
    }


def _settings(path: str) -> dict:
    """The sweep's settings record, checked as --resume checks it; {} for a folder without one (other code)."""
    try:
        record = read_settings(path, strict=True)
        if record is not None:
            from_record(record)
            if "data" in record:
                record["data"] = check_record(record["data"])
    except (OSError, ValueError, TypeError) as exc:
        raise ExportError(
            f"{path}/{SETTINGS_FILE} is damaged: {first_line(exc)} (move the file away to read the folder without it)"
        ) from None
    return record or {}


def _trials_from_state(fs, base: str, names: list[str]) -> tuple[list[_Trial] | None, str]:
    """The trials of Tune's newest experiment_state-*.json, from its JSON fields alone; (None, why) where it is
    missing or unreadable as a whole (a full disk may have cut it short, or it is not a regular file)."""
    states = sorted(n for n in names if n.startswith("experiment_state-") and n.endswith(".json"))
    if not states:
        return None, "no experiment_state-*.json"
    name = states[-1]
    try:
        entries = read_json(fs, base, name, STATE_LIMIT)["trial_data"]
        if len(entries) > STATE_TRIALS:
            raise ValueError(f"{name} holds {len(entries):,} trials, more than {STATE_TRIALS:,}")
        return _one_folder_each([_state_trial(name, parse_json(entry[0])) for entry in entries], name), ""
    except (OSError, ValueError, LookupError, TypeError, RecursionError) as exc:
        why = first_line(exc)
        return None, why if name in why else f"{name}: {type(exc).__name__}: {why}"


def _one_folder_each(trials: list[_Trial], state: str) -> list[_Trial]:
    """Tune gives each trial a folder of its own: a state naming one folder for several (an edited one) makes
    every trial after the first damaged, so the folder is read once and its row is not repeated."""
    owner: dict[str, str | None] = {}
    for i, t in enumerate(trials):
        if t.folder is not None and t.problem is None and t.folder in owner:
            why = f"relative_logdir {shown(t.folder)} is trial {owner[t.folder]}'s folder; allowed: a folder of its own"
            trials[i] = dataclasses.replace(t, folder=None, problem=f"{state}: {why}")
        elif t.folder is not None:
            owner[t.folder] = t.trial_id
    return trials


def _state_trial(state: str, t) -> _Trial:
    """One trial of the experiment state. A bad field makes it damaged; a folder name that is not one plain name
    (no '/', no '..') is never joined to a path."""
    if not isinstance(t, dict):
        raise TypeError(f"a trial entry holds {shown(t)}")
    trial_id, status, folder = t.get("trial_id"), t.get("status"), t.get("relative_logdir")
    good_id, good_status = plain_name(trial_id), isinstance(status, str) and status in STATUS
    good_folder = folder is None or plain_name(folder)  # a trial not started yet may have none
    problem = (
        (None if good_id else f"trial_id is {shown(trial_id)}; allowed: a Tune trial id")
        or (None if good_status else f"status is {shown(status)}; allowed: {', '.join(STATUS)}")
        or (None if good_folder else f"relative_logdir is {shown(folder)}; allowed: a folder name in the experiment")
    )
    return _Trial(
        trial_id if good_id else None,
        t.get("config"),
        status if good_status else "UNKNOWN",
        folder if good_folder else None,
        state,
        f"{state}: {problem}" if problem else None,
    )


def _trials_left_out(fs, base: str, entries: list, trials: list[_Trial], path: str, notes: list[str]) -> list[_Trial]:
    """Trial folders that the experiment state does not name (an edited or foreign state): their rows too, so that
    no finished trial is silently absent from the table."""
    named = {t.folder for t in trials}
    others = [e for e in entries if e[1] and e[0].startswith(TRIAL_PREFIX) and e[0] not in named]
    ids = {t.trial_id for t in trials}
    extra = [t for t in _trials_on_disk(fs, base, others) if t.trial_id is None or t.trial_id not in ids]
    if extra:
        notes.append(
            f"{len(extra)} trial folder(s) in {path} are not in its experiment state; their rows are rebuilt from "
            "the folders"
        )
    return extra


def _trials_on_disk(fs, base: str, entries: list[tuple[str, bool]]) -> list[_Trial]:
    """The trials of the experiment's trial folders, each from its params.json (a folder without one is not a
    trial's); one whose name is not Tune's or whose params.json cannot be trusted is damaged."""
    trials = []
    for name, is_folder in entries:
        if not (is_folder and name.startswith(TRIAL_PREFIX)):
            continue
        if not plain_name(name):  # not UTF-8 (spelled out here), or not printable
            spelled = str(os.fsencode(name))[2:-1]
            problem = f"trial folder '{spelled}' is not a plain name; allowed: Tune's trial folder names"
            trials.append(_Trial(None, None, "UNKNOWN", None, spelled, problem))
            continue
        config, problem = None, None
        try:
            config = read_json(fs, base, f"{name}/params.json", JSON_LIMIT)
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            problem = first_line(exc)
        match = _TRIAL_FOLDER.fullmatch(name)
        if match is None:
            problem = f"trial folder {name!r} is not named like Tune's ({TRIAL_PREFIX}<id>_<number>_...)"
        folder = name if match and not problem else None
        trials.append(_Trial(match and match[1], config, "UNKNOWN", folder, f"{name}/params.json", problem))
    return trials


def _read_trial(fs, base: str, trial: _Trial, exp_path: str) -> tuple[dict, list[dict]]:
    """A trial's row and its epochs. A trial whose config, folder or results cannot be trusted is damaged, one whose
    result.json is gone is lost; either keeps its checked config and nothing of what it reported."""
    config, problem = checked_config(trial.config)
    problem = trial.problem or (problem and f"{trial.source}: {problem}")
    records, lost = [], None
    if problem is None and trial.folder is None:
        lost = "its folder is not named in the experiment state: its epochs and accuracy are unknown"
    elif problem is None:
        try:
            records = _read_results(fs, base, trial.folder)
        except RefusedFile as exc:
            problem = first_line(exc)
        except TimeoutError:  # no answer from a bucket: not a lost trial (load_experiment gives up)
            raise
        except OSError:  # gone, or no access
            lost = f"{trial.folder}/result.json is missing or unreadable: its epochs and accuracy are unknown"
        except ValueError as exc:
            problem = first_line(exc)
    row = _trial_row(fs, base, trial, config, records, exp_path)
    if problem:
        return {**row, **dict.fromkeys(_RESULT_FIELDS), "status": DAMAGED, "error": problem}, []
    if lost and trial.status != "PENDING":  # a pending trial has reported nothing yet
        return {**row, **dict.fromkeys(_RESULT_FIELDS), "status": LOST, "error": lost}, []
    return row, records


def checked_config(config) -> tuple[dict, str | None]:
    """The config fields the table uses, each checked against its type and settings.BOUNDS; a bad one is left out
    (None) and the first is named. A --runs trial's config names its study run, which fills in the grid's."""
    if not isinstance(config, dict):
        return {}, f"the config is {shown(config)}; allowed: a JSON object of the trial's settings"
    run = config.get("run")
    if run is not None:
        if not Bound(1, STUDY_RUNS, whole=True).allows(run):
            return {}, f"'run' is {shown(run)}; allowed: a run number 1..{STUDY_RUNS}"
        config = full_config({**config, "run": int(run)})
    checked, problems = {}, []
    for key in (*DIMENSIONS, "seed", "epochs", "width", "precision"):
        problem = _config_value_problem(key, config.get(key))
        checked[key] = None if problem else config.get(key)
        problems += [problem] if problem else []
    return checked, (problems[0] if problems else None)


def _config_value_problem(key: str, value) -> str | None:
    if value is None:  # seed and epochs may be absent (defaults), a grid setting may not
        return f"{key!r} is missing" if key in DIMENSIONS else None
    if key == "optimizer":  # it names a file, results_<optimizer>.csv
        ok = isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value) is not None
        allowed = "a name of at most 64 letters, digits, '.', '_' or '-'"
    elif key in ("dropout", "batchnorm"):
        ok, allowed = isinstance(value, bool), "true or false"
    elif key == "precision":
        ok, allowed = value in PRECISIONS, ", ".join(PRECISIONS)
    else:
        ok, allowed = BOUNDS[key].allows(value), BOUNDS[key].text()
    return None if ok else f"{key!r} is {shown(value)}; allowed: {allowed}"


def typed(df: pd.DataFrame, schema: dict) -> pd.DataFrame:
    """`df` with exactly the schema's columns, in its order and types (missing columns all null)."""
    out = pd.DataFrame(index=df.index)
    for col, dtype in schema.items():
        values = df[col] if col in df else pd.Series([None] * len(df), index=df.index, dtype="object")
        if dtype in ("string", "boolean"):
            values = values.astype("object").where(values.notna(), None)
        out[col] = values.astype(dtype)
    return out


def _read_results(fs, base: str, folder: str) -> list[dict]:
    """Every epoch the trial reported, each line checked, tolerating a half-written last line of a running trial.
    FileNotFoundError: result.json is gone; RefusedFile or ValueError (naming the line and field): untrusted."""
    name = f"{folder}/result.json"
    text = read_bytes(fs, base, name, RESULT_LIMIT).decode("utf-8", "replace")
    if text.count("\n") > RESULT_LINES:  # each a dict in memory: GBs for a file within RESULT_LIMIT
        raise ValueError(f"{name} holds more than {RESULT_LINES:,} lines; a trial writes one an epoch")
    records: list[dict] = []
    for number, line in enumerate(text.split("\n"), 1):  # JSON Lines: splitlines() splits at \r and 7 more
        try:
            record = parse_json(line)
        except json.JSONDecodeError:
            continue  # half-written: a running trial's last line, or a killed attempt's before its restart's lines
        except (ValueError, RecursionError) as exc:  # an integer beyond 64 bits, nesting beyond Python's stack
            raise ValueError(f"{name} line {number}: {first_line(exc)}") from None
        if problem := line_problem(record):
            raise ValueError(f"{name} line {number}: {problem}")
        if record.get("epoch") is None:
            if records and record.get("checkpoint_dir_name"):  # a state saved inside the next epoch (a stop, a
                # spot notice): it holds the best weights as of this epoch, and Tune may have removed the older one
                records[-1] = {**records[-1], "checkpoint_dir_name": record["checkpoint_dir_name"]}
            continue
        # A restarted trial replays from its last resume state: what the dead attempt reported from there on is
        # superseded, even where the replay has not reached yet (records stay in increasing epoch order).
        while records and records[-1]["epoch"] >= record["epoch"]:
            records.pop()
        records.append({c: record.get(c) for c in RESULT_COLUMNS})
    return records


def _column_check(col: str):
    """(test, what is allowed) of one result column's non-null values."""
    kind = EPOCH_SCHEMA[col]
    if col == "augment_chunk":
        return BOUNDS[col].allows, BOUNDS[col].text()
    if kind == "Int64":  # every other integer a result line holds is an epoch count
        return _EPOCH_COUNT.allows, _EPOCH_COUNT.text()
    if col in _LOSSES:
        return (lambda v: _AMOUNT.allows(v) or (isinstance(v, float) and (v != v or v >= 0))), "a number >= 0, NaN"
    if kind == "float64":
        bound = _PERCENT if col in _ACCURACIES else _AMOUNT
        return bound.allows, bound.text()
    if kind == "boolean":
        return (lambda v: isinstance(v, bool)), "true or false"
    if col == "checkpoint_dir_name":
        return plain_name, "a folder name inside the trial's folder"
    return (
        (lambda v: isinstance(v, str) and len(v) <= TEXT_LIMIT and v.isprintable()),
        f"a string of at most {TEXT_LIMIT} printable characters",
    )


_RESULT_CHECKS = {col: _column_check(col) for col in RESULT_COLUMNS}


def line_problem(record) -> str | None:
    if not isinstance(record, dict):
        return f"it holds {shown(record)}; allowed: a JSON object of one epoch's results"
    for col, (test, allowed) in _RESULT_CHECKS.items():
        value = record.get(col)
        if value is not None and not test(value):
            return f"{col!r} is {shown(value)}; allowed: {allowed}"
    return None


def _trial_row(fs, base: str, trial: _Trial, config: dict, records: list[dict], exp_path: str) -> dict:
    last = records[-1] if records else {}
    diverged = bool(last.get("diverged"))
    tune_status = trial.status
    if tune_status == "UNKNOWN" and (last.get("checkpoint_kind") == "final" or diverged):
        tune_status = "TERMINATED"  # rebuilt from its folder: its last result says it ended
    status = "diverged" if diverged and tune_status == "TERMINATED" else STATUS.get(tune_status, tune_status.lower())
    best_ckpt, missing = (
        _best_checkpoint(fs, base, trial.folder, records, exp_path) if last.get("best_epoch") else (None, None)
    )
    error = _error_line(fs, base, trial.folder) if tune_status == "ERROR" and trial.folder else missing
    return row_of(config, records, status, trial.trial_id, error, best_ckpt)


def row_of(config: dict, records: list[dict], status: str, trial_id: str, error, best_checkpoint) -> dict:
    """A trial's row of TABLE_SCHEMA from its config, its epochs and how it ended: export's from the folder, the
    study page's from a running sweep's reports (live_page.py)."""
    last = records[-1] if records else {}
    best_epoch = last.get("best_epoch") or None
    max_epochs = config.get("epochs") or EPOCHS
    epochs_run = last.get("epoch", 0)
    accuracy = last.get("best_val_acc")
    return {
        "run": run_number(config) if all(config.get(d) is not None for d in DIMENSIONS) else None,
        **{d: config.get(d) for d in DIMENSIONS},
        "seed": config.get("seed"),
        "final_accuracy": round(accuracy, 2) if best_epoch and accuracy is not None else None,
        "epochs_run": epochs_run,
        "best_epoch": best_epoch,
        "max_epochs": max_epochs,
        "stopped_early": status == "terminated" and epochs_run < max_epochs,
        "status": status,
        "error": error,
        "train_time_s": last.get("train_time_s") if records else 0.0,
        "eval_time_s": last.get("eval_time_s"),
        "trial_id": trial_id,
        "node_id": last.get("node_id"),
        "best_checkpoint": best_checkpoint,
        "precision": last.get("precision") or config.get("precision"),
        "width": config.get("width"),
    }


def _best_checkpoint(fs, base: str, folder: str, records: list[dict], exp_path: str) -> tuple[str | None, str | None]:
    """The trial's newest checkpoint (each holds the best weights so far, so the newest is the best model) and,
    where it cannot be used, why: its weights and arguments must be regular files inside the experiment."""
    from .checkpoint import MODEL_ARGS_FILE, MODEL_FILE

    names = [r["checkpoint_dir_name"] for r in records if r.get("checkpoint_dir_name")]
    if not names:
        return None, None
    where = f"{folder}/{names[-1]}"
    try:
        for name in (MODEL_FILE, MODEL_ARGS_FILE):
            check_file(fs, base, f"{where}/{name}")
    except FileNotFoundError:
        return None, f"best checkpoint {where} is missing"
    except OSError as exc:
        return None, f"best checkpoint {where} is not used: {first_line(exc)}"
    where = experiment_uri(exp_path, where)
    return (without_credentials(where) if is_uri(where) else where), None  # the tables travel; credentials do not


def _error_line(fs, base: str, folder: str) -> str:
    """The exception's own line: the last one of the traceback in error.txt (of which only the tail is read)."""
    try:
        text = read_bytes(fs, base, f"{folder}/error.txt", ERROR_LIMIT, tail=True).decode("utf-8", "replace")
    except FileNotFoundError:
        return "error (no error.txt)"
    except OSError as exc:
        return f"error ({first_line(exc)})"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return escaped(lines[-1], ERROR_LINE) if lines else "error"  # a table, a page or a terminal shows it


def epoch_frame(records: list[dict], row: dict) -> pd.DataFrame:
    epochs = pd.DataFrame(records, columns=RESULT_COLUMNS)
    epochs.insert(0, "trial_id", row["trial_id"])
    for col in ("run", *DIMENSIONS, "seed", *_PROVENANCE):
        epochs[col] = row[col]
    return epochs


def original_tables(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The study's per-optimizer CSVs: its exact columns, accuracy written like 85.36%."""
    out = {}
    for opt in optimizer_order(table["optimizer"].dropna()):
        part = table[table["optimizer"] == opt]
        out[opt] = pd.DataFrame(
            {
                "Run": part["run"],
                "Optimizer": part["optimizer"],
                "LR": part["lr"],
                "Batch Size": part["batch_size"],
                "Dropout": part["dropout"],
                "Batch Norm": part["batchnorm"],
                "Final Accuracy": [f"{a:.2f}%" if pd.notna(a) else "" for a in part["final_accuracy"]],
            },
            columns=ORIGINAL_COLUMNS,
        )
    return out


def write_tables(exp: Experiment, out_dir: str | os.PathLike) -> list[str]:
    """results.parquet/.csv, epochs.parquet and results_<optimizer>.csv, each written whole or not at all."""
    meta = {**provenance(exp), "generation": exp.generation}
    originals = original_tables(exp.table)
    # The original merged its per-optimizer CSVs into this one.
    merged = pd.concat(originals.values(), ignore_index=True) if originals else pd.DataFrame(columns=ORIGINAL_COLUMNS)
    writers = {
        f"{TABLE_NAME}.parquet": lambda f: write_parquet(exp.table, f, meta),
        f"{TABLE_NAME}.csv": lambda f: write_csv(exp.table, f),
        f"{EPOCHS_NAME}.parquet": lambda f: write_parquet(exp.epochs, f, meta),
        **{f"results_{opt}.csv": lambda f, df=df: write_csv(df, f) for opt, df in originals.items()},
        "merged_results.csv": lambda f: write_csv(merged, f),
    }
    files = {name: _rendered(write) for name, write in writers.items()}  # sized before anything is written
    check_room(out_dir, {name: len(data) for name, data in files.items()}, "the tables")
    with output_dir(out_dir, exp) as out:
        if out.newer_than(exp):
            exp.notes.append(
                f"the tables in {out.uri} were written from a newer read of {exp.path}; they are left as they are"
            )
            return []
        for name, data in files.items():
            out.put(name, data)
    return out.written


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet takes a cell for a formula by


def write_csv(df: pd.DataFrame, f) -> None:
    """`df` as CSV, each text cell that a spreadsheet would run as a formula (an error line can hold anything)
    kept as text by a leading apostrophe, as OWASP advises; numbers and the Parquet tables stay as they are."""
    out = df.copy()
    for col in out.columns:
        if out[col].dtype == object or pd.api.types.is_string_dtype(out[col]):
            out[col] = out[col].map(lambda v: f"'{v}" if isinstance(v, str) and v.startswith(FORMULA_START) else v)
    out.to_csv(f, index=False)


def _rendered(write) -> bytes:
    buffer = io.BytesIO()
    write(buffer)
    return buffer.getvalue()


def provenance(exp: Experiment) -> dict:
    """What made these tables: versions and the sweep's settings, kept in the Parquet files' metadata."""
    import ray
    import torch

    from . import __version__

    return {
        "tune_alexnet": __version__,
        "ray": ray.__version__,
        "torch": torch.__version__,
        "experiment": shown_path(exp.path),  # a bucket URI's ?secret_key= never goes with the tables
        "settings": {
            k: shown_path(v) if k in ("storage", "mlflow") and isinstance(v, str) else v
            for k, v in exp.settings.items()
        },  # also a record written before these were stored redacted
    }


def shown_path(path: str) -> str:
    """An experiment's path as the tables and the report name it: a URI with its secrets hidden, a local path whole
    (it is what tells one experiment's files from another's)."""
    return redacted(path) if is_uri(path) else path


def one_line(text: str) -> str:
    """`text` as report.md's experiment line holds it: a newline there would end the line that names it."""
    return text.replace("\n", " ")


def write_parquet(df: pd.DataFrame, path, meta: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    metadata = {**(table.schema.metadata or {}), b"tune_alexnet": json.dumps(meta, default=str).encode()}
    pq.write_table(table.replace_schema_metadata(metadata), path)


@dataclass
class Output:
    """Files go into `local` (atomically), through `folder`, a descriptor of it (open_folder); for a remote
    destination they are uploaded on leaving."""

    uri: str
    local: Path
    written: list[str]
    folder: int

    def newer_than(self, exp: Experiment) -> bool:
        """Whether the experiment changed since `exp` was read and the results.parquet here was written from a
        later read (the folder's own lock, held by output_dir, makes this check and the writes that follow one
        step). A read of an experiment that has not changed since is the newest there is, whatever came before."""
        if exp.generation is None or is_remote(self.uri) or _generation(exp.path) == (exp.generation, exp.seen):
            return False
        written = self.table_metadata().get("generation")  # none yet, or not ours: ours replaces it
        # (a read with the same newest time as the one written here may be the older: those tables stay, and the
        # next read of the changed experiment, the sweep's own at its end included, replaces them)
        return isinstance(written, int) and written >= exp.generation

    def table_metadata(self) -> dict:
        """What the results.parquet here says of itself ({} where there is none, or it is unreadable or not ours),
        read as every file of an experiment is: no link followed, no FIFO opened (which would block for ever)."""
        import pyarrow.fs
        import pyarrow.parquet as pq

        try:
            fs, base = reach(self.uri) if is_remote(self.uri) else (pyarrow.fs.LocalFileSystem(), str(self.local))
            with open_file(fs, base, f"{TABLE_NAME}.parquet", None) as (f, _):
                meta = pq.read_schema(f).metadata or {}
            found = json.loads(meta.get(b"tune_alexnet", b"{}"))
        except Exception:  # noqa: BLE001 - not ours: pyarrow's errors of a damaged file, JSON nested past the stack
            return {}
        return found if isinstance(found, dict) else {}

    def tables_of(self) -> str | None:
        """The experiment whose tables or report this folder (local, or in a bucket: read as every bucket read is,
        bounded) holds, as their Parquet metadata or report.md's first lines name it; None where it holds none of
        ours (none yet, unreadable, or of a version that did not name it)."""
        import pyarrow.fs

        found = self.table_metadata().get("experiment")
        if found is None:  # a report alone (report --out): its opening lines name the experiment
            try:
                fs, base = reach(self.uri) if is_remote(self.uri) else (pyarrow.fs.LocalFileSystem(), str(self.local))
                with open_file(fs, base, REPORT_NAME, None) as (f, _):
                    head = f.read(REPORT_HEAD)
            except (OSError, ValueError):
                head = b""
            found = _named_in_report(head)
        return found if isinstance(found, str) else None

    def check_holds_no_other(self, exp: Experiment) -> None:
        """ExportError naming both experiments where this folder holds another experiment's tables."""
        if (self.uri == exp.path) if is_remote(self.uri) else os.path.realpath(self.uri) == os.path.realpath(exp.path):
            return
        other, shown = self.tables_of(), shown_path(exp.path)
        if other is not None and other not in (shown, one_line(shown)):  # a report alone names it in one line
            raise ExportError(
                f"{self.uri} holds the tables of experiment {redacted(other)}, not of {redacted(exp.path)}; allowed: "
                "an --out folder that is empty or holds this experiment's tables (pick another folder, or remove "
                "the other experiment's tables first)"
            )

    def put(self, name: str, data: bytes) -> None:
        try:
            atomic_write(self.folder, name, data)
        except OSError as exc:
            free = shutil.disk_usage(self.local).free if self.local.exists() else 0
            needs = f", and it needs {_mb(len(data))}"
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise ExportError(
                f"cannot write {self.local / name} ({exc.strerror}"
                + (
                    f"; {_mb(free)} free there{needs}); allowed: a folder with room for"
                    if full
                    else "); allowed: a folder you can write, for"
                )
                + " the tables and the report (--out DIR)"
            ) from None
        if not is_remote(self.uri):
            self.written.append(str(self.local / name))


WRITE_LOCK_WAIT_S = 30.0  # the longest an export, a report or the study page waits for another writer
# In a local --out folder: the file whose flock makes one writer of the folder at a time. This user's own, mode
# 0600: a lock on the folder itself, or on a file anyone may make, could be taken by any user who can open it.
WRITE_LOCK_NAME = ".tune-alexnet-write.lock"


def _open_write_lock(folder: int, out: str) -> int:
    """The folder's lock file, made private (0600) by this user or refused with one line: a link, something
    other than a regular file, a file of several names or one owned by someone else is no lock of ours."""
    path = os.path.join(out, WRITE_LOCK_NAME)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(WRITE_LOCK_NAME, flags, 0o600, dir_fd=folder)
    except OSError as exc:
        try:
            mode = os.stat(WRITE_LOCK_NAME, dir_fd=folder, follow_symlinks=False).st_mode
        except OSError:
            mode = None
        kind = (
            "a symbolic link" if mode is not None and stat.S_ISLNK(mode)
            else "not a regular file" if mode is not None and not stat.S_ISREG(mode)
            else None
        )  # fmt: skip
        if kind is None:
            raise ExportError(f"cannot open the lock file {path} ({exc.strerror}); allowed: a folder you can write "
                              "(--out DIR)") from None  # fmt: skip
    else:
        st = os.fstat(fd)
        kind = (
            "not a regular file" if not stat.S_ISREG(st.st_mode)
            else f"owned by user id {st.st_uid}, not by you" if st.st_uid != os.getuid()
            else f"a file with {st.st_nlink} names" if st.st_nlink != 1
            else None
        )  # fmt: skip
        if kind is None:
            if stat.S_IMODE(st.st_mode) != 0o600:
                os.fchmod(fd, 0o600)  # ours, made open to others by hand: private again
            return fd
        os.close(fd)
    raise ExportError(
        f"the lock file {path} is {kind}, which tune-alexnet never makes; remove it, or pick another folder (--out DIR)"
    )


def _lock_within(fd: int, folder: int, out: str, wait_s: float) -> None:
    """The folder's write lock, waited for at most `wait_s`: another process holding it longer is named in one
    line, never a hang. A lock file replaced while we waited is no lock: refused, not trusted."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise ExportError(
                    f"another process has held {out} for writing for more than {wait_s:g} s; allowed: a folder no "
                    "other process is writing (--out DIR)"
                ) from None
            time.sleep(0.1)
    path = os.path.join(out, WRITE_LOCK_NAME)
    try:
        same = os.stat(WRITE_LOCK_NAME, dir_fd=folder, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except OSError:
        same = False
    if not same:
        raise ExportError(f"the lock file {path} was removed or replaced while this process waited for it; run again")


def check_out_dir(out_dir) -> None:
    """A Python API's `out_dir`, checked before anything is read, as the command line checks --out."""
    if out_dir is not None and (why := path_problem(out_dir)):
        raise ExportError(f"out_dir: {why}")


def check_room(out: str | os.PathLike, sizes: dict[str, int], what: str) -> None:
    """Refuse, before a folder is made or a file written, a local `out` where a folder has one of the names in
    `sizes` (bytes by name), or without room for those files, each rounded up to whole blocks as the disk counts
    them. Written whole or not at all, one at a time (atomic_write), each new file needs its full size beside the
    one it replaces."""
    out = storage_uri(os.fspath(out))
    if is_remote(out):
        return
    for name in sizes:  # a folder of that name takes no file: the set would be left half-written
        path = os.path.join(out, name)
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(os.lstat(path).st_mode):
                raise ExportError(
                    f"cannot write {path}: a folder has that name; allowed: an --out folder where the names of "
                    f"{what} are free or files (remove that folder, or --out DIR)"
                )
    try:
        disk = os.statvfs(existing_parent(out))
    except OSError:  # output_dir names what is wrong with the folder
        return
    if disk.f_blocks == 0:  # /proc, /sys: a filesystem that counts no room holds no files; output_dir says why
        return
    block = disk.f_frsize or 4096
    need = sum(-(-size // block) * block for size in sizes.values()) + block * len(missing_folders(out))
    free = disk.f_bavail * disk.f_frsize
    if need > free:
        raise ExportError(
            f"{out} has {_mb(free)} free, but {what} need about {_mb(need)}; allowed: a folder with that much room "
            "(--out DIR)"
        )


def _mb(size: int) -> str:
    return f"{size / 1e6:,.2f} MB"


def _named_in_report(head: bytes) -> str | None:
    """The experiment a report's opening line names in its code span (report.code_span), read in one pass over each
    line: a regular expression with a back-reference took hours over a line of 64 KiB of backticks."""
    for line in head.split(b"\n"):
        if not line.startswith(b"Experiment `"):
            continue
        span = line[len(b"Experiment ") :]
        width = len(span) - len(span.lstrip(b"`"))
        end = span.find(b"`" * width + b":", width + 1)
        if end > width:
            found = span[width:end].decode("utf-8", "replace")
            return found[1:-1] if width > 1 else found  # a longer fence has a space inside
    return None


@contextmanager
def output_dir(out: str | os.PathLike, exp: Experiment | None = None):
    """A folder to write `exp`'s tables, report or page into, held for this writer alone. A local folder it had to
    make is removed again if nothing was written in it. A local folder that holds the tables of another experiment
    is refused (ExportError naming both): its files and ours would be read as one experiment's, and the other's are
    nobody's to replace unasked. The experiment's own folder is always its own, whatever path its tables were
    written from."""
    given = os.fspath(out)
    out = storage_uri(given)
    if not is_remote(out):  # its links resolved once a process: see open_folder
        # the path as given, not made normal (a/link/.. and a/. are two places), its links kept: whoever owns one of
        # them chose where the tables go
        given = as_given(expand_user(given))
        out = _real.setdefault(given, out)
        _check_path_to(given, warn=False)
        made = missing_folders(out)
        folder = fd = None
        try:
            try:
                make_folders(out)
                _check_path_to(given)  # with the folders made meanwhile
                folder = open_folder(out)
                _probe(folder)
            except OSError as exc:
                raise ExportError(
                    f"cannot write into {out} ({exc.strerror}); allowed: a folder you can write (--out DIR)"
                ) from None
            fd = _open_write_lock(folder, out)
            _lock_within(fd, folder, out, WRITE_LOCK_WAIT_S)  # one writer of this folder's tables at a time
            output = Output(out, Path(out), [], folder)
            if exp is not None:
                output.check_holds_no_other(exp)
            yield output
        except BaseException:
            if made and folder is not None:  # a folder this call made holds nothing of anyone's but our lock file
                with contextlib.suppress(OSError):
                    os.unlink(WRITE_LOCK_NAME, dir_fd=folder)
            remove_empty(made)
            raise
        finally:
            for opened in (fd, folder):
                if opened is not None:
                    os.close(opened)
        return
    import pyarrow.fs

    if scheme_problem(out):
        raise ExportError(f"--out {out}: {scheme_problem(out)}")
    tmp = Path(tempfile.mkdtemp(prefix="tune-alexnet-out-"))
    folder = open_folder(os.path.realpath(tmp))
    try:
        output = Output(out, tmp, [], folder)
        if exp is not None:
            output.check_holds_no_other(exp)
        yield output
        try:
            fs, base = reach(out)
            within(REACH_TIMEOUT_S, lambda: fs.create_dir(base, recursive=True))
            for f in sorted(tmp.iterdir()):  # each bounded too, at a pace no bucket that answers falls below
                copy = functools.partial(pyarrow.fs.copy_files, str(f), f"{base}/{f.name}",
                                         source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)  # fmt: skip
                within(upload_limit(f.stat().st_size), copy)
                output.written.append(experiment_uri(out, f.name))
        except (OSError, ValueError, TimeoutError) as exc:
            raise ExportError(
                f"cannot write into {out} ({first_line(exc)}); allowed: a bucket path your "
                f"credentials can write, or a local folder (--out DIR)"
            ) from None
    finally:
        os.close(folder)
        shutil.rmtree(tmp, ignore_errors=True)


_warned: set[str] = set()  # folders said to be shared, once a process: the live page rewrites every 30 s


def _check_path_to(out: str, warn: bool = True) -> None:
    """The writers below reopen their temporary files by name: in a folder on the way that all users can write
    without the sticky bit, another user could swap one for a link to a file of yours, which would be overwritten.
    One a group may write, or another user owns, is said, as for a sweep's storage."""
    if shared := open_to_all(Path(out)):
        raise ExportError(
            f"cannot write into {out}: {shared[0]}, so anyone could swap the files written there for links to files of "
            f"yours; allowed: a folder on a path not open to all ({shared[1]})"
        )
    if warn and out not in _warned and (others := others_on_the_way(Path(out))):
        _warned.add(out)
        say(f"tune-alexnet: warning: {out} lies in {others[0]}, which {others[1]}, so they could swap what is "
            "written there")  # fmt: skip


# Each local --out as given -> its links resolved, the first time in this process. The check of the path names
# any link of another user's on it then; a link swapped in later (the live page rewrites every 30 s) is refused by
# open_folder, not followed.
_real: dict[str, str] = {}


def open_folder(real: str) -> int:
    """A descriptor of the folder at `real` (a path without links), for every write into it: what is written
    through it lands there, whatever another user renames or swaps on the way meanwhile. The folder is reached one
    component at a time, following no link."""
    flags = os.O_RDONLY | getattr(os, "O_PATH", 0) | os.O_DIRECTORY | os.O_CLOEXEC  # O_PATH: search rights do
    fd = os.open("/", flags)
    try:
        for part in Path(real).parts[1:]:
            fd, parent = os.open(part, flags | os.O_NOFOLLOW, dir_fd=fd), fd
            os.close(parent)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _new_file(folder: int, prefix: str) -> tuple[int, str]:
    """A new file in `folder` (O_EXCL: never one that was there, nor a link), and its name; of the mode the user's
    umask gives, as any file they make (the kernel applies it: reading the umask would set it meanwhile, for every
    thread of the process)."""
    for _ in range(100):
        name = f"{prefix}{os.urandom(6).hex()}.tmp"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            return os.open(name, flags, 0o666, dir_fd=folder), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name")


def _probe(folder: int) -> None:
    """OSError where a file cannot be made in `folder`: said before anything is read or written."""
    fd, name = _new_file(folder, ".tune-alexnet-write-test-")
    os.close(fd)
    os.unlink(name, dir_fd=folder)


def atomic_write(folder: int, name: str, data: bytes) -> None:
    """`data` into a new file, then renamed over `name` in `folder` (a descriptor, open_folder): readers see the
    old file or the whole new one, never half. Written through the descriptors of the file made and of its folder,
    never reopened by a path, which another user who may write on the way could swap for a link meanwhile."""
    fd, tmp = _new_file(folder, f".{name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=folder)
        raise


def export(source, out_dir: str | os.PathLike | None = None, ended: bool | None = None) -> tuple[Experiment, list[str]]:
    """Tables of an experiment, written into `out_dir` (default: the experiment folder, local or remote)."""
    check_out_dir(out_dir)
    exp = load_experiment(source, ended)
    return exp, write_tables(exp, out_dir or exp.path)
