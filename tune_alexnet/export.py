"""An experiment folder (local or s3://, finished, half-finished or live) -> one table, one row per trial.

Reads only what Tune wrote (experiment state, each trial's result.json and
error file) and never unpickles a file of ours; nothing is re-run and Ray need
not be running. Local tables are written to a temporary file and renamed, so a
crash never leaves a truncated one; in a bucket each file is one upload.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .grid import full_config, optimizer_order, run_number
from .settings import DIMENSIONS, EPOCHS, read_settings
from .storage import experiment_uri, is_remote, storage_uri

TABLE_NAME = "results"  # results.parquet and results.csv
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
    "gpus_granted": "float64",
    "node_id": "string",
    "checkpoint_kind": "string",
    "checkpoint_dir_name": "string",
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


class ExportError(Exception):
    """The folder is not something we can read as an experiment; one line for the command line."""


@dataclass
class Experiment:
    path: str
    table: pd.DataFrame  # one row per trial, TABLE_SCHEMA
    epochs: pd.DataFrame  # one row per reported epoch, EPOCH_SCHEMA
    settings: dict  # the sweep's settings record (empty for a folder written by other code)
    notes: list[str] = field(default_factory=list)  # what could not be read, for the user


def load_experiment(source) -> Experiment:
    """`source`: an experiment folder (path, ~path or URI) or a local tune.ResultGrid (a ResultGrid of a
    bucket forgets its URI's scheme: pass the URI). Tune's experiment state is read as plain JSON, never
    unpickled (Ray's own reader unpickles parts of it), so a folder from a shared bucket runs no code here."""
    path = storage_uri(str(getattr(source, "experiment_path", source)))
    if not is_remote(path) and not Path(path).is_dir():
        raise ExportError(f"{path} is not a folder; allowed: an experiment folder written by 'tune-alexnet sweep'")
    notes: list[str] = []
    try:
        trials = _trials_from_state(path)
        if trials is None:
            trials = _trials_on_disk(path)
            if not trials:
                raise FileNotFoundError("no experiment state and no trial folders")
            notes.append(
                f"the experiment state in {path} is missing or unreadable; the table is rebuilt from the "
                f"{len(trials)} trial folders, and trials that did not end say 'unknown'"
            )
    except OSError as exc:  # an absent folder in a bucket, a typo, no access
        raise ExportError(
            f"{path} holds no readable Tune experiment ({_first_line(exc)}); allowed: an experiment folder such "
            f"as ray_results/<name> or s3://BUCKET/PATH/<name>"
        ) from None
    rows, epoch_frames = [], []
    for trial in trials:
        epochs = _read_results(trial)
        row = _trial_row(trial, pd.DataFrame() if epochs is None else epochs, path)
        if epochs is None and trial.status != "PENDING":  # it ran, but what it reported is gone
            row.update(
                status="lost",
                error=f"{trial.storage.trial_dir_name}/result.json is missing or unreadable: "
                "its epochs and accuracy are unknown",
            )
        epochs = pd.DataFrame() if epochs is None else epochs
        rows.append(row)
        if len(epochs):
            epochs.insert(0, "trial_id", trial.trial_id)
            for col in ("run", *DIMENSIONS, "seed"):
                epochs[col] = row[col]
            epoch_frames.append(epochs)
    # Study order; trials off the study's grid (no run number) follow in creation order.
    table = (
        typed(pd.DataFrame(rows, columns=COLUMNS), TABLE_SCHEMA)
        .sort_values(["run", "trial_id"], na_position="last", kind="stable")
        .reset_index(drop=True)
    )
    epochs = typed(pd.concat(epoch_frames, ignore_index=True) if epoch_frames else pd.DataFrame(), EPOCH_SCHEMA)
    epochs = epochs.sort_values(["run", "trial_id", "epoch"], na_position="last", kind="stable").reset_index(drop=True)
    return Experiment(path, table, epochs, read_settings(path) or {}, notes)


@dataclass
class _TrialFolder:
    """What the table needs of a trial, read from its own folder when Tune's experiment state is unreadable."""

    trial_id: str
    config: dict
    status: str
    storage: object


@dataclass
class _FolderStorage:
    storage_filesystem: object
    trial_fs_path: str
    trial_dir_name: str


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def _trials_from_state(path: str) -> list[_TrialFolder] | None:
    """The trials of Tune's newest experiment_state-*.json, from its JSON fields alone; None if it is missing
    or unreadable (a full disk may have cut it short)."""
    import pyarrow.fs

    fs, base = pyarrow.fs.FileSystem.from_uri(path)
    states = sorted(
        i.path for i in fs.get_file_info(pyarrow.fs.FileSelector(base))
        if i.base_name.startswith("experiment_state-") and i.base_name.endswith(".json")
    )  # fmt: skip
    if not states:
        return None
    try:
        with fs.open_input_stream(states[-1]) as f:
            entries = json.loads(f.readall().decode())["trial_data"]
        trials = []
        for entry in entries:
            t = json.loads(entry[0])
            folder = t["relative_logdir"]
            trials.append(_TrialFolder(t["trial_id"], t["config"], t["status"],
                                       _FolderStorage(fs, f"{base}/{folder}", folder)))  # fmt: skip
        return trials
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def _trials_on_disk(path: str) -> list[_TrialFolder]:
    import pyarrow.fs

    fs, base = pyarrow.fs.FileSystem.from_uri(path)
    trials = []
    for info in fs.get_file_info(pyarrow.fs.FileSelector(base)):
        if info.type != pyarrow.fs.FileType.Directory or not info.base_name.startswith("train_cifar_"):
            continue
        storage = _FolderStorage(fs, info.path, info.base_name)
        try:
            with fs.open_input_stream(f"{info.path}/params.json") as f:
                config = json.loads(f.readall().decode())
        except (OSError, ValueError):
            continue
        epochs = _read_results(_TrialFolder("", config, "", storage))
        last = epochs.iloc[-1] if epochs is not None and len(epochs) else None
        ended = last is not None and (last["checkpoint_kind"] == "final" or bool(last["diverged"]))
        trials.append(
            _TrialFolder(
                info.base_name.split("_")[2] + "_" + info.base_name.split("_")[3],
                config,
                "TERMINATED" if ended else "UNKNOWN",
                storage,
            )
        )
    return trials


def typed(df: pd.DataFrame, schema: dict) -> pd.DataFrame:
    """`df` with exactly the schema's columns, in its order and types (missing columns all null)."""
    out = pd.DataFrame(index=df.index)
    for col, dtype in schema.items():
        values = df[col] if col in df else pd.Series([None] * len(df), index=df.index, dtype="object")
        if dtype in ("string", "boolean"):
            values = values.astype("object").where(values.notna(), None)
        out[col] = values.astype(dtype)
    return out


def _read_results(trial) -> pd.DataFrame | None:
    """Every epoch the trial reported, tolerating a half-written last line of a running trial; None if its
    result.json is gone or unreadable."""
    fs = trial.storage.storage_filesystem
    result_file = Path(trial.storage.trial_fs_path, "result.json").as_posix()
    try:
        with fs.open_input_stream(result_file) as f:
            text = f.readall().decode("utf-8", "replace")
    except (FileNotFoundError, OSError):
        return None
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # a trial still running may be mid-write
        if record.get("epoch") is not None:
            # A restarted trial replays from its last resume state: what the dead attempt reported from there
            # on is superseded, even where the replay has not reached yet.
            records = [r for r in records if r["epoch"] < record["epoch"]]
            records.append(record)
    keep = [c for c in EPOCH_SCHEMA if c not in _GRID_TYPES and c != "trial_id"]
    return pd.DataFrame([{k: r.get(k) for k in keep} for r in records], columns=keep)


def _trial_row(trial, epochs: pd.DataFrame, exp_path: str) -> dict:
    config = full_config(trial.config)
    last = epochs.iloc[-1] if len(epochs) else None
    diverged = bool(last is not None and last["diverged"])
    status = "diverged" if diverged and trial.status == "TERMINATED" else STATUS.get(trial.status, trial.status.lower())
    best_epoch = int(last["best_epoch"]) if last is not None and last["best_epoch"] else None
    best_ckpt = None
    missing = None
    if best_epoch:  # every checkpoint holds the best weights so far, so the newest one is the best model
        names = epochs["checkpoint_dir_name"].dropna()
        if len(names):
            found = _checkpoint_exists(trial, names.iloc[-1])
            best_ckpt = experiment_uri(exp_path, f"{trial.storage.trial_dir_name}/{names.iloc[-1]}") if found else None
            if not found:
                missing = f"best checkpoint {trial.storage.trial_dir_name}/{names.iloc[-1]} is missing"
    max_epochs = int(config.get("epochs", EPOCHS))
    epochs_run = int(last["epoch"]) if last is not None else 0
    return {
        "run": run_number(config),
        **{d: config[d] for d in DIMENSIONS},
        "seed": config.get("seed"),
        "final_accuracy": round(float(last["best_val_acc"]), 2) if best_epoch else None,
        "epochs_run": epochs_run,
        "best_epoch": best_epoch,
        "max_epochs": max_epochs,
        "stopped_early": status == "terminated" and epochs_run < max_epochs,
        "status": status,
        "error": _error_line(trial) if trial.status == "ERROR" else missing,
        "train_time_s": float(last["train_time_s"]) if last is not None else 0.0,
        "eval_time_s": last["eval_time_s"] if last is not None else None,
        "trial_id": trial.trial_id,
        "node_id": last["node_id"] if last is not None else None,
        "best_checkpoint": best_ckpt,
    }


def _checkpoint_exists(trial, name: str) -> bool:
    from pyarrow.fs import FileType

    info = trial.storage.storage_filesystem.get_file_info(
        Path(trial.storage.trial_fs_path, name, "model.pt").as_posix()
    )
    return info.type == FileType.File


def _error_line(trial) -> str:
    fs = trial.storage.storage_filesystem
    error_file = Path(trial.storage.trial_fs_path, "error.txt").as_posix()
    try:
        with fs.open_input_stream(error_file) as f:
            lines = [ln.strip() for ln in f.readall().decode("utf-8", "replace").splitlines() if ln.strip()]
    except (FileNotFoundError, OSError):
        return "error (no error.txt)"
    # The exception's own line is the last one of the traceback.
    return lines[-1][:500] if lines else "error"


def original_tables(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The study's per-optimiser CSVs: its exact columns, accuracy written like 85.36%."""
    out = {}
    for opt in optimizer_order(table["optimizer"]):
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
    meta = provenance(exp)
    originals = original_tables(exp.table)
    with output_dir(out_dir) as out:
        out.put(f"{TABLE_NAME}.parquet", lambda p: write_parquet(exp.table, p, meta))
        out.put(f"{TABLE_NAME}.csv", lambda p: exp.table.to_csv(p, index=False))
        out.put(f"{EPOCHS_NAME}.parquet", lambda p: write_parquet(exp.epochs, p, meta))
        for opt, df in originals.items():
            out.put(f"results_{opt}.csv", lambda p, df=df: df.to_csv(p, index=False))
        # The original merged its per-optimiser CSVs into this one.
        merged = (
            pd.concat(originals.values(), ignore_index=True) if originals else pd.DataFrame(columns=ORIGINAL_COLUMNS)
        )
        out.put("merged_results.csv", lambda p: merged.to_csv(p, index=False))
    return out.written


def provenance(exp: Experiment) -> dict:
    """What made these tables: versions and the sweep's settings, kept in the Parquet files' metadata."""
    import ray
    import torch

    from . import __version__

    return {
        "tune_alexnet": __version__,
        "ray": ray.__version__,
        "torch": torch.__version__,
        "experiment": exp.path,
        "settings": exp.settings,
    }


def write_parquet(df: pd.DataFrame, path, meta: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    metadata = {**(table.schema.metadata or {}), b"tune_alexnet": json.dumps(meta, default=str).encode()}
    pq.write_table(table.replace_schema_metadata(metadata), path)


@dataclass
class Output:
    """Files go into `local` (atomically); for a remote destination they are uploaded on leaving."""

    uri: str
    local: Path
    written: list[str]

    def put(self, name: str, write) -> None:
        try:
            atomic_write(self.local / name, write)
        except OSError as exc:
            free = shutil.disk_usage(self.local).free if self.local.exists() else 0
            raise ExportError(
                f"cannot write {self.local / name} ({exc.strerror}; {free / 1e6:.0f} MB free there); "
                f"allowed: a folder you can write with room for the tables"
            ) from None
        if not is_remote(self.uri):
            self.written.append(str(self.local / name))


@contextmanager
def output_dir(out: str | os.PathLike):
    out = storage_uri(os.fspath(out))
    if not is_remote(out):
        try:
            Path(out).mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=out, prefix=".tune-alexnet-write-test-")
            probe.close()
        except OSError as exc:
            raise ExportError(
                f"cannot write into {out} ({exc.strerror}); allowed: a folder you can write (--out DIR)"
            ) from None
        yield Output(out, Path(out), [])
        return
    import pyarrow.fs

    tmp = Path(tempfile.mkdtemp(prefix="tune-alexnet-out-"))
    try:
        output = Output(out, tmp, [])
        yield output
        try:
            fs, base = pyarrow.fs.FileSystem.from_uri(out)
            fs.create_dir(base, recursive=True)
            for f in sorted(tmp.iterdir()):
                pyarrow.fs.copy_files(
                    str(f),
                    f"{base}/{f.name}",
                    source_filesystem=pyarrow.fs.LocalFileSystem(),
                    destination_filesystem=fs,
                )
                output.written.append(experiment_uri(out, f.name))
        except OSError as exc:
            raise ExportError(
                f"cannot write into {out} ({_first_line(exc)}); allowed: a bucket path your "
                f"credentials can write, or a local folder (--out DIR)"
            ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write(path: Path, write) -> Path:
    """`write(tmp_path)` then rename over `path`: readers see the old file or the whole new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the user's usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def export(source, out_dir: str | os.PathLike | None = None) -> tuple[Experiment, list[str]]:
    """Tables of an experiment, written into `out_dir` (default: the experiment folder, local or remote)."""
    exp = load_experiment(source)
    return exp, write_tables(exp, out_dir or exp.path)
