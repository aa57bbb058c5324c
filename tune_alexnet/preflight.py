"""Every reason to refuse a sweep, checked once, in one pass, before a trial starts; and the plan that pass fixes.

`prepare` walks the user's settings to a `Plan`: the numbers within bounds, the
storage and the experiment's URI fixed (on --resume the experiment's own
settings), the experiment held by a lock, the trackers reachable, the data loaded
and, on --resume, the data it started on, Ray connected and the trial's resources
known to fit, the storage reachable from every node with room for what the sweep
keeps. Each refusal is one PreflightError line; nothing is written before the
last check but the lock. sweep.py then only builds and fits the Tuner.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import http.client
import importlib.util
import io
import itertools
import logging
import os
import pickletools
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from urllib.parse import urlparse, urlunparse

from . import cluster, settings, spot, tracking
from .data import Cifar, DataError, check_record, check_same_data, load_cifar10
from .plan import Plan
from .resume import (
    CHECKPOINT_FOLDER,
    EXPERIMENT_STATE,
    SEARCH_STATE,
    STATE_COPIES,
    cut_search_state,
    end_cut_result_lines,
    point_at_kept_checkpoints,
    put_back_whole_state,
    state_is_whole,
    tune_state_problem,
)
from .settings import (
    DEFAULT_GPU_SHARE,
    REDACTED,
    SETTINGS_FILE,
    TRIAL_DEFAULTS,
    RedactedError,
    SweepSettings,
    read_settings,
    redacted,
)
from .storage import (
    DRIVER_LOG,
    REACH_TIMEOUT_S,
    RESERVE_BYTES,
    RESERVE_NAME,
    RESULT_FILE,
    RESULT_LIMIT,
    RESULT_LINES,
    SCHEMES,
    as_given,
    checkpoint_room,
    existing_parent,
    experiment_uri,
    first_line,
    is_remote,
    locale_note,
    make_folders,
    missing_folders,
    not_utf8,
    remove_empty,
    room_needed,
    scheme_problem,
    storage_uri,
    within,
)

log = logging.getLogger("tune_alexnet.preflight")
TRACKER_TIMEOUT_S = 5.0  # and a tracking server
TRIAL_PATH_ROOM = 400  # characters a trial adds below the experiment folder (its folder, checkpoint, files)
STORAGE_ALLOWED = f"a local folder you can write, or a {' or '.join(s + '://BUCKET/PATH' for s in SCHEMES)} URI"


class PreflightError(RedactedError):
    """A reason not to start (or resume) a sweep, as one line for the command line."""


def prepare(s: SweepSettings, data: Cifar | None = None, quiet: bool = True) -> Plan:
    """The one preflight pass, in the order that writes nothing before the last refusal but the lock."""
    try:
        settings.check(s)
    except ValueError as exc:
        raise PreflightError(f"a setting is out of bounds: {exc}") from None
    check_retired_variables()
    if why := spot.endpoint_problem():
        raise PreflightError(why)
    root = storage_uri(s.storage)
    check_scheme(root, "--storage")
    # The path as given, its links kept: whoever owns one of them chose where the experiment goes
    given = as_given(settings.expand_user(s.storage)) if not is_remote(root) else root
    if not is_remote(root):  # before the storage is read, or the lock file made through it
        if spelled := not_utf8(given):  # (the command line refuses it first; the Python API here)
            raise PreflightError(f"--storage {spelled}: allowed: a path in UTF-8{locale_note()}")
        check_path_to(given, warn=False)
    name = s.name or (latest_experiment(root) if s.resume else time.strftime("alexnet-%Y%m%d-%H%M%S"))
    check_path_length(root, experiment_uri(root, name))
    made = [] if is_remote(root) else missing_folders(root)  # removed again if the sweep is refused
    try:
        lock = lock_experiment(root, name)
    except BaseException:
        remove_empty(made)
        raise
    started = False
    try:
        exp_uri = experiment_uri(root, name)
        if not is_remote(root):  # again, with the folders made meanwhile; before a resume reads anything of it
            check_path_to(given)
        s = resume_settings(s, root, name) if s.resume else dataclasses.replace(s, name=name)
        if check_storage(root, exp_uri, s.resume, name):
            made.insert(0, exp_uri)  # removed again if the sweep is refused
        made[:0] = check_trackers(s)  # (a folder made for W&B, removed again too)
        if s.mlflow is not None:
            s = dataclasses.replace(s, mlflow=absolute_store(s.mlflow))
        address = s.address if s.address is not None else os.environ.get("RAY_ADDRESS") or "local"
        given_as = "--address" if s.address is not None or address == "local" else "RAY_ADDRESS"
        import ray

        if not ray.is_initialized():  # (a Ray this process joined already is the caller's); before a download
            check_ray_settings(address, given_as)
        if data is None:
            data = load_cifar10(s.data_dir, s.subset, s.download_root, progress=not quiet)
        check_resume_data(s, exp_uri, data)
        if s.resume:  # a finished experiment is said to be so before Ray starts
            check_unfinished(exp_uri)
        started, dashboard = connect(address, quiet, given_as)
        per_trial, keep_free = check_resources(s, root)
        if s.resume:  # every check that could refuse the resume has passed: a refused one writes nothing
            mend_for_resume(exp_uri, name)
        return Plan(s, root, exp_uri, data, per_trial, keep_free, lock, started, dashboard)
    except BaseException:
        if started:
            import ray

            ray.shutdown()
        lock.release()
        remove_empty(made)
        raise


# --- the storage and the experiment's name ----------------------------------------------------------------


def check_scheme(uri: str, flag: str) -> None:
    problem = scheme_problem(uri)
    if problem:
        raise PreflightError(f"{flag} {uri}: {problem}")


def check_storage(root: str, exp_path: str, resume: bool, name: str) -> bool:
    """The storage can be written, local or remote, with room for trial paths, and no other user can put a folder
    of theirs in the experiment's place; a new experiment's name is free. Whether this call made the (local)
    experiment folder: made here, at once, no other user can make it first in a shared storage."""

    if is_remote(root):
        _check_remote(root)
    else:
        _check_local(root, exp_path)
    if not resume and _can_restore(exp_path, f"allowed: a --name that is not taken in {root}") \
            and not never_started(exp_path):  # fmt: skip
        raise PreflightError(
            f"an experiment named {name!r} already exists in "
            f"{root}; continue it with --resume, or start a new one with another --name"
        )
    if is_remote(exp_path):
        return False
    made = False
    if not resume:
        try:
            os.mkdir(exp_path, 0o775)  # the user's umask applies, but never writable by all
            made = True
        except FileExistsError:
            pass
        except OSError as exc:  # a full disk or quota: room for the lock file's name, not a folder's
            raise PreflightError(
                f"--storage {root} cannot hold the experiment's folder ({exc.strerror}); allowed: {STORAGE_ALLOWED}, "
                "with room for the sweep"
            ) from None
    if not os.path.lexists(exp_path):
        return made
    if os.path.islink(exp_path) or not Path(exp_path).is_dir():
        kind = "a symbolic link" if os.path.islink(exp_path) else "a file"
        raise PreflightError(f"{exp_path} is {kind}; allowed: a --name that is not taken in {root}")
    if not resume and not made and (theirs := _not_yours(exp_path)):  # (a resume says so with what it would do)
        raise PreflightError(f"{theirs}, so whoever else can write it could send the sweep's writes elsewhere; "
                             f"allowed: a --name that is not taken in {root}")  # fmt: skip
    if not resume and any(Path(exp_path).iterdir()) and not never_started(exp_path):
        raise PreflightError(f"{exp_path} already exists and is not empty; pick another --name")
    return made


def check_path_to(root: str, warn: bool = True) -> None:
    """No user on the machine can rename the experiment away and put a folder of theirs in its place (a resume
    unpickles Tune's files, which can run any code; a sweep writes through what it finds): no folder on the way to
    the storage is writable by all without the sticky bit, as /tmp has. One a group may write (a team's project
    folder), or another user owns, is said (unless not `warn`), not refused, as a group may write the experiment
    itself."""
    if open_to_all := cluster.open_to_all(Path(root)):
        raise PreflightError(
            f"--storage {root}: {open_to_all[0]}, so anyone could put a folder of theirs in place of the "
            f"experiment's, whose files a sweep writes through and a resume runs; allowed: a storage on a path not "
            f"open to all ({open_to_all[1]})"
        )
    if not warn:
        return
    if others := cluster.others_on_the_way(Path(root)):
        settings.say(
            f"tune-alexnet: warning: --storage {root} lies in {others[0]}, which {others[1]}, so they could put a "
            "folder of theirs in place of the experiment's: resume only where you trust them"
        )


def _check_local(root: str, exp_path: str) -> None:
    try:
        make_folders(root)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".tune-alexnet-write-test-"):
            pass
    except OSError as exc:
        raise PreflightError(f"--storage {root} is not writable ({exc.strerror}); allowed: {STORAGE_ALLOWED}") from None


def check_path_length(root: str, exp_path: str) -> None:
    """Trial folders and checkpoints lie up to TRIAL_PATH_ROOM characters below the experiment: a storage path
    that leaves them no room would fail every trial with 'File name too long'."""
    if is_remote(root):
        return
    limit = 4096
    with contextlib.suppress(OSError):
        limit = os.pathconf(existing_parent(root), "PC_PATH_MAX")
    longest = len(os.fsencode(exp_path)) + TRIAL_PATH_ROOM
    if longest > limit:
        allowed = limit - TRIAL_PATH_ROOM - (len(os.fsencode(exp_path)) - len(os.fsencode(root)))
        raise PreflightError(
            f"--storage {settings.clipped(root, 40, '...')} is {len(os.fsencode(root))} characters long, so trial files below it would "
            f"pass the file system's {limit}-character path limit; allowed: a --storage path of at most {allowed} "
            "characters"
        )


def never_started(exp_path: str) -> bool:
    """A folder of ours that a sweep left before Tune saved any state or any trial reported: nothing in it is a
    result, so a fresh sweep may take the name over (and --resume says so)."""
    if is_remote(exp_path) or os.path.islink(exp_path) or not os.path.isdir(exp_path):
        return False
    folder = Path(exp_path)
    try:
        names = {p.name for p in folder.iterdir()}
    except OSError:
        return False
    ours = names <= {DRIVER_LOG, RESERVE_NAME}  # killed before Tune's files or the record (or the data's download)
    if not ((folder / SETTINGS_FILE).is_file() or ours) or any(folder.glob("experiment_state-*.json")):
        return False
    if any(p.is_file() for p in folder.glob("*/result.json")):
        return False
    return _not_a_sweeps_file(exp_path) is None  # last, as it walks the folder: no link to write through, no FIFO


def _check_remote(root: str) -> None:
    def probe() -> None:
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(root)
        probe_file = f"{path.rstrip('/')}/.tune-alexnet-write-test-{os.getpid()}"
        with fs.open_output_stream(probe_file) as f:  # reading is not enough: trials write here
            f.write(b"ok")
        fs.delete_file(probe_file)

    try:
        within(REACH_TIMEOUT_S, probe)
    except Exception as exc:  # pyarrow raises OSError, ValueError or ArrowInvalid depending on the failure
        reason = first_line(exc)
        raise PreflightError(
            f"--storage {root} cannot be reached ({reason}); allowed: a bucket URI your "
            f"credentials can read and write, or a local folder"
        ) from None


def lock_experiment(root: str, name: str) -> ExperimentLock:
    """Hold the experiment for this process: a second sweep or resume of it is refused, naming the holder.

    An flock on a file beside the experiment (for a bucket: in the user's cache, so it guards this machine
    only); the kernel drops it when the process ends, however it ends, so a killed sweep leaves no stale lock.
    The file is opened without following links: a link planted in a shared storage redirects no write.
    """
    if is_remote(root):
        from .data import user_cache_dir

        folder = user_cache_dir() / "locks"
        path = folder / (hashlib.sha256(experiment_uri(root, name).encode()).hexdigest()[:20] + ".lock")
    else:
        folder = Path(root)
        path = folder / f".{name}.lock"
    where = f"--storage {root}" if not is_remote(root) else f"the lock folder {folder}"
    try:
        make_folders(folder)
        try:
            fd, made = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644), True
        except FileExistsError:
            fd, made = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK), False
    except OSError as exc:
        if os.path.islink(path):
            raise PreflightError(
                f"the lock file {path} is a symbolic link, which tune-alexnet never makes; remove it, or use "
                "another --name"
            ) from None
        raise PreflightError(f"{where} is not writable ({exc.strerror}); allowed: {STORAGE_ALLOWED}") from None
    st = os.fstat(fd)
    if not made and st.st_uid != os.geteuid():  # another user's: they could remove it while we hold it, and lock anew
        os.close(fd)
        raise PreflightError(f"the lock file {path} belongs to another user (uid {st.st_uid}); ask them to remove "
                             "it, or use another --name")  # fmt: skip
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:  # a hard link would carry our write to another name
        os.close(fd)
        kind = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"a file with {st.st_nlink} names"
        raise PreflightError(f"the lock file {path} is {kind}, which tune-alexnet never makes; remove it, or use "
                             "another --name")  # fmt: skip
    handle = os.fdopen(fd, "r+", errors="replace")  # its text is anyone's to write: bytes of any encoding
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not path.exists() or os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino:
            raise BlockingIOError  # the holder ended and removed this file between our open and our lock
    except BlockingIOError:
        holder = (handle.read(500).strip().splitlines() or ["another sweep"])[0]  # the file is anyone's to write
        handle.close()
        raise PreflightError(
            f"experiment {name!r} in {root} is in use by {holder}; wait for it to end, or use another --name"
        ) from None
    try:
        handle.truncate(0)
        handle.write(
            f"a sweep (pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})"
        )
        handle.flush()
    except OSError as exc:  # a full disk takes the name but not the line: leave neither
        ExperimentLock(path, handle).release()
        free = shutil.disk_usage(folder).free if folder.is_dir() else 0
        raise PreflightError(
            f"{where} cannot hold even the experiment's lock file ({exc.strerror}; {free / 1e6:,.1f} MB free); "
            f"allowed: {STORAGE_ALLOWED}, with room for the sweep"
        ) from None
    return ExperimentLock(path, handle)


class ExperimentLock:
    """Released (its file removed, then unlocked) on leaving a `with` block or when the process ends."""

    def __init__(self, path: Path, handle):
        self.path, self.handle = path, handle

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self.handle.closed:
            return
        try:
            self.path.unlink()  # while still locked: a waiting opener then sees another inode and backs off
        except OSError:
            pass
        try:
            self.handle.close()
        except OSError:  # a line it could not write (a full disk) fails its flush; the file is closed all the same
            pass


# --- resuming: the experiment's own settings, on the data it started on --------------------------------------


def latest_experiment(root: str) -> str:
    """The newest experiment in `root` that has not finished (its table says so, or it has none yet)."""
    from ray import tune

    if is_remote(root) or not Path(root).is_dir():
        raise PreflightError(
            f"--resume without --name needs a local --storage folder that holds experiments; got {root}"
        )
    found, theirs = [], {}
    for p in Path(root).iterdir():
        try:
            if p.is_dir() and not p.is_symlink() and tune.Tuner.can_restore(str(p)):
                found.append(p)
        except OSError as exc:  # another user's folder, closed to this one
            theirs[p.name] = f"{p} cannot be looked into ({_reason(exc)})"
    theirs |= {p.name: why for p in found if (why := _not_yours(str(p)))}  # never picked: a resume unpickles it
    found = [p for p in found if p.name not in theirs]
    others = f" (passed over, not yours alone: {', '.join(sorted(theirs))})" if theirs else ""
    for name, why in sorted(theirs.items()):
        settings.say(f"tune-alexnet: --resume passes over experiment {name!r}: {why}")
    if not found:
        raise PreflightError(f"--resume: {root} holds no experiment of yours to resume{others}; start one without "
                             "--resume")  # fmt: skip
    unfinished = [p for p in found if not _finished(p)]
    if not unfinished:
        names = ", ".join(sorted(p.name for p in found))
        raise PreflightError(
            f"--resume: every experiment in {root} has finished ({names}){others}; pass --name "
            f"to resume one anyway (its errored trials are retried)"
        )
    return max(unfinished, key=lambda p: p.stat().st_mtime).name


def _finished(exp_dir: Path) -> bool:
    import pandas as pd

    from .export import TABLE_NAME

    try:
        status = pd.read_parquet(exp_dir / f"{TABLE_NAME}.parquet", columns=["status"])["status"]
    except Exception:  # no table yet, or a damaged one: treat it as unfinished
        return False
    return bool(status.isin(["terminated", "diverged"]).all())


def resume_settings(s: SweepSettings, root: str, name: str) -> SweepSettings:
    """The interrupted sweep's own settings; of them the cluster address, the data's location, a GPU share
    given again and the flags on how trials run (--device, --resume-every, ...) may change."""
    exp_uri = experiment_uri(root, name)
    _check_restorable(exp_uri, root, name)
    try:
        record = read_settings(exp_uri, strict=True)
    except (OSError, ValueError) as exc:
        raise PreflightError(f"--resume: {exp_uri}/{SETTINGS_FILE} is damaged: {exc}") from None
    if record is None:
        if not s.allow_data_change:
            raise PreflightError(
                f"--resume: {exp_uri}/{SETTINGS_FILE} is missing, so neither the sweep's settings nor "
                f"its data can be checked; pass --allow-data-change to resume it with the flags given now"
            )
        if given := [f"--{flag}" for flag in ("mlflow", "wandb") if getattr(s, flag) is not None]:
            raise PreflightError(
                f"--resume: {exp_uri}/{SETTINGS_FILE} is missing, so {' and '.join(given)} cannot be checked against "
                f"the trackers the experiment started with (a resume logs to those alone); drop "
                f"{'it' if len(given) == 1 else 'them'}, or start a new experiment with another --name"
            )
        return dataclasses.replace(s, name=name)
    try:
        saved = settings.from_record(record)
        if "data" in record:  # the tables at the end need it whole, whatever --allow-data-change says
            check_record(record["data"])
    except ValueError as exc:
        raise PreflightError(f"--resume: {exp_uri}/{SETTINGS_FILE} is damaged: {exc}") from None
    data_flags = {"subset": s.subset} if s.subset is not None and not s.allow_data_change else {}
    check_unchanged({**s.asked, **data_flags}, saved)
    check_resumed_trackers(s, saved)
    keep = {"mlflow": _resumed_mlflow(s.mlflow, saved.mlflow)} if s.mlflow or saved.mlflow else {}
    keep |= {
        "address": s.address,
        "shared_storage": s.shared_storage,
        "allow_data_change": s.allow_data_change,
        "runtime": {**saved.runtime, **s.runtime},
        "storage": s.storage,
        "name": name,
        "resume": True,
    }
    if s.gpus_per_trial is not None:
        keep["gpus_per_trial"] = s.gpus_per_trial
    if s.data_dir is not None:  # the data may have moved since
        keep["data_dir"] = s.data_dir
    if s.download_root is not None:
        keep["download_root"] = s.download_root
    if s.subset is not None:  # a deliberate change of data: check_resume_data refuses it without the flag
        keep["subset"] = s.subset
    return dataclasses.replace(saved, **keep)


def _resumed_mlflow(given: str | None, recorded: str | None) -> str | None:
    """The tracking URI a resumed sweep logs to: the one given again (--mlflow), else the recorded one. A URI
    with a secret is recorded redacted (settings.write_settings): it must then be given again, or be in
    MLFLOW_TRACKING_URI, whole."""
    if given is not None:
        return given
    if REDACTED not in (recorded or ""):
        return recorded
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and redacted(env) == recorded:
        return env
    raise PreflightError(
        f"--resume: the experiment logs to MLflow at {recorded}, whose secret is not stored with it; pass "
        f"--mlflow with the whole URI again, or set MLFLOW_TRACKING_URI to it"
    )


class NothingToResume(PreflightError):
    """--resume of an experiment whose every trial has ended: said at once, without starting Ray."""


def check_unfinished(exp_uri: str) -> None:
    from .export import ExportError, load_experiment

    if not is_remote(exp_uri) and not state_is_whole(exp_uri):  # read from the trial folders, the trials that never
        return  # started would be missed: the resume puts the kept state back, and Tune says what is left

    try:
        status = load_experiment(exp_uri, ended=True).table["status"]
    except ExportError:
        return  # Tune's restore names what is wrong with it
    if len(status) and status.isin(["terminated", "diverged"]).all():
        raise NothingToResume(
            f"experiment {exp_uri} has finished: {len(status)}/{len(status)} trials done, nothing to resume; "
            f"its tables and report are in that folder"
        )


def check_unchanged(asked: dict, saved: SweepSettings) -> None:
    """Flags that define a trial may be given again with --resume (the same command, --resume added), but only
    with the experiment's own values: a resume cannot change what its trials are. Every changed flag is named at
    once, so that one retry is enough."""
    changed = []
    for flag, new in asked.items():
        if flag in settings.DIMENSIONS:
            old, same = getattr(saved.grid, flag), set(new) == set(getattr(saved.grid, flag)) and not saved.runs
        elif flag == "runs":
            old, same = saved.runs, set(new) == set(saved.runs)
        elif flag in settings.TRIAL_DEFAULTS and flag not in ("epochs", "patience", "seed"):
            old = saved.trial.get(flag, settings.TRIAL_DEFAULTS[flag])
            same = new == old
        else:
            old = getattr(saved, flag)
            same = new == old
        if flag == "subset" and not same:  # a change of data: allowed on purpose only
            old = f"{'all images' if old is None else old} (--allow-data-change resumes on other data)"
        if not same:
            shown_new, shown_old = (",".join(map(_plain, v)) if isinstance(v, tuple) else _plain(v) for v in (new, old))
            changed.append(f"--{flag.replace('_', '-')} {shown_new} differs from the experiment's own "
                           f"{shown_old or '(all runs of its grid)'}")  # fmt: skip
    if changed:
        raise PreflightError(
            f"--resume: {'; '.join(changed)}; a resume continues its trials as they started: drop "
            f"{'the flag' if len(changed) == 1 else 'those flags'} or give the same values, or start a new experiment "
            "with another --name"
        )


def check_resumed_trackers(given: SweepSettings, saved: SweepSettings) -> None:
    """A resume keeps the trackers its experiment started with: one added now would hold only the epochs after it,
    and Tune restores the experiment's own callbacks, so a tracker given now would be silently left out. The
    MLflow URI may be given again (it must be, where its secret was not stored), pointing where the server is now."""
    added = [
        f"--{flag} {redacted(new) if flag == 'mlflow' else new} (the experiment "
        f"{'logs to W&B project ' + old if old else 'was started without it'})"
        for flag, new, old in (("mlflow", given.mlflow, saved.mlflow), ("wandb", given.wandb, saved.wandb))
        if new is not None and (not old if flag == "mlflow" else new != old)
    ]
    if added:
        raise PreflightError(
            f"--resume: {'; '.join(added)}; a resume logs to the trackers its experiment started with: drop "
            f"{'the flag' if len(added) == 1 else 'those flags'}, or start a new experiment with another --name"
        )


def _plain(value) -> str:
    return str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)


def _can_restore(exp_path: str, allowed: str) -> bool:
    """tune.Tuner.can_restore, in one line where the folder cannot be looked into (another user's, closed to
    this one: pyarrow raises PermissionError), or a bucket does not answer: pyarrow's call holds the main thread
    in C++, where no stop signal is heard, for minutes (gs:// without credentials: for good)."""
    from ray import tune

    try:
        if not is_remote(exp_path):
            return tune.Tuner.can_restore(exp_path)
        return within(REACH_TIMEOUT_S, lambda: tune.Tuner.can_restore(exp_path))
    except TimeoutError as exc:
        raise PreflightError(
            f"{redacted(exp_path)} cannot be reached ({exc}); allowed: a bucket URI your "
            "credentials can read and write, or a local folder"
        ) from None
    except OSError as exc:
        raise PreflightError(f"{exp_path} cannot be looked into ({_reason(exc)}); {allowed}") from None


def _reason(exc: OSError) -> str:
    """An OSError's reason in a few words: pyarrow's carry a long text in place of the system's words."""
    if isinstance(exc, PermissionError):
        return "Permission denied"
    return settings.clipped((str(exc.strerror or exc).splitlines() or [""])[0], 200)


def _check_restorable(exp_uri: str, root: str, name: str) -> None:
    from ray.tune.impl.tuner_internal import _TUNER_PKL

    if never_started(exp_uri):
        raise PreflightError(
            f"--resume: experiment {name!r} in {root} stopped before its first trial reported, so there is nothing "
            f"to resume; run the same command without --resume to start it afresh under this name"
        )
    restorable = _can_restore(exp_uri, "allowed: an experiment folder of yours")
    if not restorable and not is_remote(exp_uri) and os.path.isdir(exp_uri):
        from .export import TABLE_NAME

        tables = os.path.join(exp_uri, f"{TABLE_NAME}.parquet")
        held = f"; the tables of what it held are in {tables}" if os.path.isfile(tables) else ""
        raise PreflightError(
            f"--resume: experiment {name!r} in {root} cannot be continued: Tune's own record of it is gone (the "
            f"folder deleted while it ran, or never a sweep's){held}; start it afresh with the same command and "
            "another --name"
        )
    if not restorable:
        raise PreflightError(
            f"--resume: no experiment named {name!r} in {root}; start it without --resume, or pass the --name of one "
            f"that exists"
        )
    entries = [] if is_remote(exp_uri) else list(_entries(exp_uri))  # one walk of the folder for the checks below
    theirs = None if is_remote(exp_uri) else _not_yours(exp_uri, entries)
    if theirs:  # before anything of it is read: Tune's restore unpickles its files, which can run any code
        raise PreflightError(
            f"--resume: {theirs}, and resuming unpickles Tune's files in it and appends to its trials' files, so "
            f"whoever else can write them could run code as you or send your writes elsewhere; allowed: an "
            f"experiment only you can write (what finished is in 'tune-alexnet export {exp_uri}')"
        )
    odd = None if is_remote(exp_uri) else _not_a_sweeps_file(exp_uri, entries)
    if odd:  # Tune would follow it, or block on it for ever (a FIFO)
        raise PreflightError(
            f"--resume: {odd}, which a sweep never makes; what finished is in 'tune-alexnet export {exp_uri}'; "
            f"{_what_is_left(exp_uri, name)}"
        )
    unreadable = None if is_remote(exp_uri) else _unreadable(exp_uri, entries)
    if unreadable:  # Tune's restore fails on it with a traceback, or loses what it holds
        raise PreflightError(
            f"--resume: {unreadable} cannot be read (its mode, or its owner, keeps you out); once it can, the same "
            f"command continues experiment {name!r}"
        )
    shut = None if is_remote(exp_uri) else _unwritable(exp_uri, entries)
    if shut:  # Tune would fail each trial in it at every try, with a traceback each
        raise PreflightError(
            f"--resume: {shut} cannot be written (read-only or immutable); once it can, the same command continues "
            f"experiment {name!r}"
        )
    torn = None if is_remote(exp_uri) else _torn_pickle(os.path.join(exp_uri, _TUNER_PKL))
    if torn:  # Tune's restore unpickles it after Ray has started, with a traceback; before any mending
        raise PreflightError(
            f"--resume: {os.path.join(exp_uri, _TUNER_PKL)}, Tune's record of the sweep's settings, is damaged "
            f"({torn}); what finished is in 'tune-alexnet export {exp_uri}'; {_what_is_left(exp_uri, name)}"
        )
    cut = None if is_remote(exp_uri) else cut_search_state(exp_uri)
    if cut:  # Tune's restore would start the search afresh, with trials of empty configs failing at every try
        raise PreflightError(
            f"--resume: {cut}, Tune's record of its search, is damaged (cut short, and no whole copy was kept); what "
            f"finished is in 'tune-alexnet export {exp_uri}'; {_what_is_left(exp_uri, name)}"
        )
    wrong = None if is_remote(exp_uri) else tune_state_problem(exp_uri)
    if wrong:  # whole, but not what Tune writes: a traceback, trials of empty configs, or a trial written outside
        raise PreflightError(
            f"--resume: the experiment's state is damaged: {wrong}; what finished is in 'tune-alexnet export "
            f"{exp_uri}'; {_what_is_left(exp_uri, name)}"
        )


def mend_for_resume(exp_uri: str, name: str) -> None:
    """What a kill left half-done, mended, once every check that could refuse the resume has passed (a refused
    resume writes nothing); then Tune's state checked as Tune reads it."""
    from ray import tune

    if not is_remote(exp_uri):  # what a W&B run left when a second Ctrl-C cut the sweep's end short
        from .export import TRIAL_PREFIX

        tracking.remove_wandb_links(
            str(p) for p in Path(exp_uri).glob(f"{TRIAL_PREFIX}*") if p.is_dir() and not p.is_symlink()
        )
    for mend in (put_back_whole_state, end_cut_result_lines):
        try:
            mended = None if is_remote(exp_uri) else mend(exp_uri)
        except OSError as exc:  # changed since the checks (a race): one line, as they would have said
            raise PreflightError(
                f"--resume: {exc.filename or exp_uri} cannot be read or written ({exc.strerror or exc}); once it "
                f"can, the same command continues experiment {name!r}"
            ) from None
        if mended:
            settings.say(f"tune-alexnet: {mended}")
    try:
        repointed = None if is_remote(exp_uri) else point_at_kept_checkpoints(exp_uri)
    except Exception:  # a damaged state: said just below
        repointed = None
    if repointed:
        settings.say(f"tune-alexnet: {repointed}")
    try:
        tune.ExperimentAnalysis(exp_uri)
    except Exception as exc:  # Tune's restore would start trials with empty configs and write a newer state
        raise PreflightError(
            f"--resume: the experiment state of {name!r} is damaged ({type(exc).__name__}); what finished is in "
            f"'tune-alexnet export {exp_uri}'; {_what_is_left(exp_uri, name)}"
        ) from None


RESTORE_FAILED = "Failed to restore the run state."  # Tune's line, after which it starts the experiment afresh


@contextlib.contextmanager
def no_fresh_start(exp_uri: str, name: str):
    """Where Tune's restore fails on what the checks above could not foresee, Tune logs so and starts the
    experiment afresh: every trial trained again, and a state of new trials written over the one it could not
    read. Raised from that log line, the restore stops there, before Tune has written anything."""

    def refuse(record: logging.LogRecord) -> bool:
        if record.getMessage() != RESTORE_FAILED:
            return True
        raise restore_refused(exp_uri, name, record.exc_info[1] if record.exc_info else None) from None

    logger = logging.getLogger("ray.tune.execution.tune_controller")
    logger.addFilter(refuse)
    try:
        yield
    finally:
        logger.removeFilter(refuse)


def restore_refused(exp_uri: str, name: str, exc: BaseException | None) -> PreflightError:
    """The one line for a resume whose state Tune cannot restore (Tuner.restore, or the run state in fit)."""
    cause = settings.clipped(f"{type(exc).__name__}: {exc}", 200) if exc is not None else "see driver.log"
    return PreflightError(
        f"--resume: Tune could not restore experiment {name!r} from its state ({cause}); its state and tables are "
        f"left as they were; what finished is in 'tune-alexnet export {exp_uri}'; {_what_is_left(exp_uri, name)}"
    )


ENTRIES_LIMIT = 100_000  # files and folders in an experiment folder: a 108-run study's hold a few thousand


def _entries(exp_path: str, limit: int = ENTRIES_LIMIT):
    """(path, lstat) of what the experiment folder holds, at any depth, links not followed. Past `limit`, a
    refusal: the checks that walk it must see all of it (a FIFO past a silent limit blocked a resume for ever).
    Folder by folder, not os.walk, which recurses once a level."""
    folders, seen = [exp_path], 0
    while folders:
        top = folders.pop()
        try:
            names = os.listdir(top)
        except OSError:  # gone meanwhile, or closed: the checks that need it say so
            continue
        for name in names:
            path = os.path.join(top, name)
            try:
                st = os.lstat(path)
            except OSError:  # gone meanwhile
                continue
            seen += 1
            if seen > limit:
                raise PreflightError(
                    f"{exp_path} holds more than {limit:,} files and folders, which no sweep makes (a 108-run "
                    f"study's hold a few thousand), and each would be checked; allowed: an experiment folder as a "
                    f"sweep left it (what finished is in 'tune-alexnet export {exp_path}')"
                )
            yield path, st
            if stat.S_ISDIR(st.st_mode):
                folders.append(path)


def _not_yours(exp_path: str, entries: list | None = None) -> str | None:
    """Why the experiment is not this user's alone: anything in it is writable by every user, or what a resume
    reads or writes in place (`_resume_uses`) belongs to another user; None where neither. A resume unpickles
    Tune's files, which can run any code, and appends to the trials' files, which another user could swap for
    links to files of their choosing. (Writable by a group of the user's alone is allowed: many systems' umask
    makes it; by a group shared with others, it is not: any of them could have the resume run their code.)"""
    uid, unpickled = os.geteuid(), (exp_path, os.path.join(exp_path, STATE_COPIES))  # where Tune's own files lie
    try:  # the folder as named (a link to it is the user's own choice)
        top = [(exp_path, os.stat(exp_path))]
    except OSError:
        return None  # gone: the checks after this one say so
    for path, st in itertools.chain(top, _entries(exp_path) if entries is None else entries):
        tunes = path == unpickled[1] or (os.path.dirname(path) in unpickled and path.endswith((".pkl", ".json")))
        if stat.S_ISLNK(st.st_mode) and tunes:
            return f"{path} is a symbolic link, which a sweep never makes"
        if st.st_uid != uid and _resume_uses(exp_path, path, st):
            return f"{path} belongs to another user (uid {st.st_uid})"
        if stat.S_ISLNK(st.st_mode):  # a link's own mode means nothing
            continue
        if st.st_mode & stat.S_IWOTH:
            return (
                f"{path} can be written by every user (mode {stat.S_IMODE(st.st_mode):04o}; if it is yours: chmod o-w)"
            )
        if cluster.others_can_write(st):
            return (
                f"{path} can be written by group {st.st_gid}, which other users share (mode "
                f"{stat.S_IMODE(st.st_mode):04o}; if it is yours: chmod -R g-w {exp_path})"
            )
    return None


def _resume_uses(exp_path: str, path: str, st: os.stat_result) -> bool:
    """Whether a resume reads or writes `path` in place, so that whose it is matters: every folder but a W&B run's,
    Tune's files at the top and their kept copies, and a trial's own files and its checkpoints'. Not the tables,
    report and page, which a teammate's export may have written and a sweep replaces whole, nor W&B's runs."""
    parts = os.path.relpath(path, exp_path).split(os.sep)
    if len(parts) >= 3 and parts[1] == "wandb":
        return False
    if stat.S_ISDIR(st.st_mode) or parts[0] == STATE_COPIES:
        return True
    if len(parts) == 1:
        return parts[0].endswith(".pkl") or parts[0].startswith(TUNE_STATES)
    return len(parts) == 2 or (len(parts) == 3 and bool(CHECKPOINT_FOLDER.fullmatch(parts[1])))


def _unreadable(exp_path: str, entries: list) -> str | None:
    """The first file or folder of the experiment that this user cannot read (a folder: list and enter); Tune's
    restore fails on it with a traceback, or passes over it and loses what it holds."""
    for path, st in itertools.chain([(exp_path, None)], entries):
        is_dir = st is None or stat.S_ISDIR(st.st_mode)
        if (st is None or not stat.S_ISLNK(st.st_mode)) and not os.access(path, os.R_OK | (os.X_OK if is_dir else 0)):
            return path
    return None


def _torn_pickle(path: str) -> str | None:
    """Why the pickle at `path` is cut or garbled, read op by op without running any of it; None where it is
    whole (or absent: Tune says so itself)."""
    try:
        with open(path, "rb") as f:
            for _ in pickletools.genops(f):
                pass
    except FileNotFoundError:
        return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    except Exception as exc:  # pickletools' ValueError for a cut stream, others for garbage
        return str(exc) or type(exc).__name__
    return None


def _unwritable(exp_path: str, entries: list) -> str | None:
    """The first of the experiment folder, its kept states, its trial folders and what they hold two levels down
    that this user cannot write (a resume appends to a trial's files and deletes its checkpoints); W&B's old runs
    are only ever read. None where all can be."""
    from .export import TRIAL_PREFIX

    for path, st in itertools.chain([(exp_path, None)], entries):
        parts = os.path.relpath(path, exp_path).split(os.sep)
        written = path == exp_path or parts[0] == STATE_COPIES or parts[0].startswith(TRIAL_PREFIX)
        if not written or len(parts) > 3 or (len(parts) == 3 and parts[1] == "wandb"):
            continue
        if (st is None or not stat.S_ISLNK(st.st_mode)) and not os.access(path, os.W_OK, follow_symlinks=False):
            return path
    return None


TUNE_STATES = (EXPERIMENT_STATE, SEARCH_STATE)  # Tune's own state files at an experiment's top
FILE_SUFFIXES = (".json", ".pkl", ".csv", ".parquet", ".pt", ".txt")  # what a sweep keeps as files, never folders


def _not_a_sweeps_file(exp_path: str, entries: list | None = None) -> str | None:
    """The first thing in the experiment folder that a sweep never makes: a link (symbolic, or a file with another
    name elsewhere), a FIFO, a device, a folder named as one of its files; said in words, None where there is none.
    Tune and Ray would write through it, block on it, or fail on it with a traceback."""
    from .export import TRIAL_PREFIX

    for path, st in _entries(exp_path) if entries is None else entries:
        name = os.path.basename(path)
        parts = os.path.relpath(path, exp_path).split(os.sep)
        if stat.S_ISLNK(st.st_mode) and len(parts) >= 3 and parts[1] == "wandb" and parts[0].startswith(TRIAL_PREFIX):
            continue  # W&B's own, inside a run (its core's log): removed, never followed, once the checks have passed
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            return f"{path} is a file with {st.st_nlink} names (a hard link)"
        if stat.S_ISREG(st.st_mode) and CHECKPOINT_FOLDER.fullmatch(name):  # Tune would make that folder
            return f"{path} is a file named as a checkpoint folder"
        if not stat.S_ISDIR(st.st_mode) and parts == [STATE_COPIES]:  # no whole copy of a state could be kept
            return f"{path} is a file named as the folder of kept states"
        if stat.S_ISDIR(st.st_mode) and name.endswith(FILE_SUFFIXES):
            return f"{path} is a folder named as a file"
        if stat.S_ISREG(st.st_mode) and name in (RESULT_FILE, "progress.csv") and st.st_size > RESULT_LIMIT:
            return f"{path} holds {st.st_size / 2**20:,.1f} MiB, more than {RESULT_LIMIT / 2**20:.0f} MiB (Tune would read it whole)"
        if stat.S_ISREG(st.st_mode) and name in (RESULT_FILE, "progress.csv") and _lines(path) > RESULT_LINES:
            return f"{path} holds more than {RESULT_LINES:,} lines (Tune would read each into a table, GBs in all)"
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a special file"
            return f"{path} is {'a symbolic link' if stat.S_ISLNK(st.st_mode) else kind}"
    return None


def _lines(path: str) -> int:
    """The lines of a regular file (0 where it cannot be read: the checks after this one say so)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return 0
    with os.fdopen(fd, "rb") as f:
        try:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(2**20), b""))
        except OSError:
            return 0


def _what_is_left(exp_uri: str, name: str) -> str:
    from .export import ExportError, load_experiment

    try:
        table = load_experiment(exp_uri).table
    except ExportError:
        return f"start a new sweep with the same flags and --name {name}-rest"
    unfinished = table[~table["status"].isin(["terminated", "diverged"])]
    if not len(unfinished):
        return "nothing is left to run"
    runs = unfinished["run"].dropna().astype(int).tolist()
    off_grid = len(unfinished) - len(runs)
    if not runs:
        return f"to finish the {len(unfinished)} trial(s) that did not, start a new sweep with the same flags and --name {name}-rest"
    return (
        f"to finish the {len(unfinished)} trial(s) that did not, start a new sweep with --runs "
        f"{','.join(map(str, runs))} --name {name}-rest and the same flags but --optimizer, --lr, --batch-size, "
        "--dropout and --batchnorm (--runs names them)"
        + (f"; {off_grid} of them are off the study's grid: give their values instead" if off_grid else "")
    )


def check_resume_data(s: SweepSettings, exp_uri: str, data: Cifar) -> None:
    """A resume finishes the runs on the data they started on, unless the user says the change is deliberate."""
    if not s.resume or s.allow_data_change:
        return
    recorded = (read_settings(exp_uri) or {}).get("data")
    if recorded is None:
        raise PreflightError(
            f"--resume: {exp_uri}/{SETTINGS_FILE} holds no record of the data the sweep started on; pass "
            "--allow-data-change to resume on this data anyway"
        )
    try:
        check_same_data(recorded, data)
    except DataError as exc:
        raise PreflightError(str(exc)) from None


# --- trackers ----------------------------------------------------------------------------------------------


def check_trackers(s: SweepSettings) -> list[str]:
    """A requested tracker whose package is missing, whose server cannot be reached or, for W&B, that has no API
    key: Ray itself would only fail once the sweep had started. The folders made for one, deepest first."""
    if s.mlflow is not None:
        _need("mlflow", "--mlflow")
        _check_mlflow_uri(s.mlflow)
    if s.wandb is not None:
        _need("wandb", "--wandb")
        _check_wandb_key()
        _keep_wandb_folders_private()
        return _check_wandb_dir()
    return []


WANDB_FOLDERS = {"WANDB_CACHE_DIR": "user_cache_dir", "WANDB_DATA_DIR": "user_data_dir"}  # and platformdirs' default


def _keep_wandb_folders_private() -> None:
    """W&B's own folders beside its runs: its debug logs (named by the second, opened through any link there) and
    artifacts staged. By default below XDG_CACHE_HOME and XDG_DATA_HOME, which may be shared: then a folder in this
    user's private temp folder instead, set here for the logging actors to take. One the user named that others
    could write, make or swap is refused."""
    import platformdirs

    for name, default in WANDB_FOLDERS.items():
        given = os.environ.get(name)
        folder = Path(as_given(os.path.expanduser(given or getattr(platformdirs, default)("wandb"))))
        problem = cluster.others_could_steer(str(folder))
        if problem and given:
            raise PreflightError(f"{name}={given}{problem}, so they could read W&B's logs there or have it write "
                                 f"through a link of theirs; allowed: a folder only you can write, or {name} unset")  # fmt: skip
        if problem:
            try:
                os.environ[name] = os.path.join(cluster.private_temp_dir(), name.lower())
            except cluster.UnsafeTempDir as exc:
                raise PreflightError(f"Ray's session folder {exc}") from None
            except OSError as exc:  # (as ray.init would meet it: a read-only /tmp)
                raise _ray_could_not_start(exc) from None


def _check_wandb_dir() -> list[str]:
    """WANDB_DIR takes every trial's W&B run out of the experiment, into the folder W&B picks there at each run's
    start: .wandb where one exists, else wandb, and the temporary folder where it cannot write. So one that this
    user cannot write, or that other users can make files in (a .wandb of theirs, made at any time, would take the
    runs), is refused, and so is one on a path anyone could write; one on a path others could is said. Where wandb/
    does not exist yet, it is made now, this user's alone (W&B would make it at its first run, minutes on)."""
    given = os.environ.get("WANDB_DIR")
    if not given:
        return []
    root = Path(tracking.wandb_root())
    folder = root / ".wandb" if os.path.lexists(root / ".wandb") else root / "wandb"
    allowed = "allowed: a folder only you can write, or WANDB_DIR unset (the runs go into the trials' folders)"
    if open_to_all := cluster.open_to_all(folder):
        raise PreflightError(
            f"WANDB_DIR={given}: {open_to_all[0]}, so anyone could swap or read the W&B runs written there; allowed: "
            f"a folder not open to all ({open_to_all[1]}), or WANDB_DIR unset (the runs go into the trials' folders)"
        )
    made = missing_folders(str(folder))
    try:  # (folder by folder, as storage paths are: a deep one ran past the stack)
        make_folders(root)
        if not os.path.lexists(folder):
            os.mkdir(folder, 0o700)
        for place in (root, folder):
            if not os.access(place, os.R_OK | os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        if cluster.others_can_write(os.stat(root)):
            problem = (f"other users can make files in {root}, and W&B writes the runs into a .wandb folder there "
                       "whenever one exists, so one could take them")  # fmt: skip
        else:
            problem = None
    except OSError as exc:
        problem = (f"{folder} cannot be made or written there ({exc.strerror or exc}), and W&B would write the runs "
                   "into the temporary folder instead")  # fmt: skip
    if problem:
        remove_empty([f for f in made if os.path.isdir(f)])
        raise PreflightError(f"WANDB_DIR={given}: {problem}; {allowed}")
    if others := cluster.others_on_the_way(folder):
        settings.say(f"tune-alexnet: warning: WANDB_DIR={given}: the W&B runs go into {folder}; {others[0]} is on "
                     f"the way, which {others[1]}, so they could swap or read them")  # fmt: skip
    return made


def _need(package: str, flag: str) -> None:
    try:
        found = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        try:  # find_spec does not run the package: a broken install only shows on import
            __import__(package)
        except ImportError:
            found = False
        except Exception as exc:  # its import itself failed here (W&B's asks for a temporary folder)
            raise PreflightError(f"{flag}: the {package} package cannot be imported here ({first_line(exc)})") from None
    if not found:
        raise PreflightError(f"{flag} needs the {package} package: pip install 'tune-alexnet[{package}]'")


# file: is not among them: MLflow keeps its file store in maintenance mode and refuses it (inside Ray, in a traceback)
MLFLOW_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql")  # a database may name its driver


def _check_mlflow_uri(uri: str) -> None:
    """An http(s) tracking server must answer now; a local store (sqlite) needs an existing folder. Any
    other kind of URI (a bare path, which MLflow reads as its retired file store; databricks://, which needs its
    own login) would fail only once Ray had started, in a traceback that may show its secret."""
    parts = urlparse(uri)
    scheme = parts.scheme.lower()
    web = scheme in ("http", "https")
    if scheme.split("+")[0] not in MLFLOW_SCHEMES or any(c.isspace() for c in uri) or (web and not parts.hostname):
        raise PreflightError(
            f"--mlflow {redacted(uri)}: not a tracking URI this sweep can use; allowed: http(s)://HOST:PORT, "
            "sqlite:///FILE.db (in place of a folder store), or a database URI (postgresql://, mysql://, mssql://)"
        )
    if web and ("?" in uri or "#" in uri):  # MLflow appends its REST paths to the URI, query and all
        raise PreflightError(
            f"--mlflow {redacted(uri)}: a tracking server's URI cannot hold a query or fragment (MLflow would "
            "send its requests to the wrong place); allowed: http(s)://HOST:PORT[/PATH], with credentials in "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, in MLFLOW_TRACKING_TOKEN, or in the URI's user part"
        )
    if web:
        _probe(uri)
        return
    _check_driver(uri)
    if scheme.split("+")[0] == "sqlite":  # sqlite+pysqlite:// too, and with a ?query: the same file
        path = sqlite_file(uri)
        if path == "~" or path.startswith("~/"):
            raise PreflightError(
                f"--mlflow {redacted(uri)}: SQLite takes ~ as a folder named ~ in the working folder, not your home; "
                "allowed: the full path (sqlite:////home/you/mlflow.db) or one relative to the working folder"
            )
        # sqlite:///relative.db and sqlite:////absolute.db: the folder must exist for MLflow to create the file.
        file = Path(path)
        if path and not os.path.isdir(file.parent):  # (os.path: a name too long is one that does not exist)
            raise PreflightError(
                f"--mlflow {redacted(uri)}: the folder {file.parent} does not exist; create it or pick another path"
            )
        if path:
            _check_sqlite_store(redacted(uri), file)


def sqlite_file(uri: str) -> str:
    """The file a SQLite store's URI names, as SQLAlchemy (which MLflow opens it with) reads it: %XX escapes
    decoded, the path cut at a `?`; "" for a store in memory. The checks look at that file, not at the URI's text:
    sqlite:////tmp/x%2F..%2F..%2Fm.db is /m.db."""
    from sqlalchemy.engine import make_url

    try:
        database = make_url(uri).database
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy's ArgumentError and others: a URI it cannot read
        raise PreflightError(f"--mlflow {redacted(uri)}: SQLAlchemy cannot read it ({first_line(exc)})") from None
    if database and settings.unprintable(database):  # %00, %0A, %E2%80%AE decoded
        raise PreflightError(
            f"--mlflow {redacted(uri)}: the file it names holds a control character "
            f"({settings.printable(database)}); allowed: a file name without them"
        )
    return "" if database in (None, ":memory:") else database


def absolute_store(uri: str) -> str:
    """A SQLite store named relative to the working folder (sqlite:///runs.db), as a full path: the experiment
    records it, and a resume from another folder would otherwise start a second store there, each run's epochs
    split between the two. The working folder's name is %-escaped: SQLAlchemy decodes %XX, and cuts at `?`."""
    from urllib.parse import quote

    scheme, sep, rest = uri.partition("://")
    if not sep or scheme.split("+")[0].lower() != "sqlite" or not (file := sqlite_file(uri)) or os.path.isabs(file):
        return uri  # not SQLite, in memory (sqlite://), or a full path already (sqlite:////...)
    try:
        here = quote(os.getcwd())
    except UnicodeEncodeError:  # (bytes of another encoding, which SQLAlchemy would decode as UTF-8)
        raise PreflightError(f"--mlflow {redacted(uri)}: the working folder's name is not UTF-8; allowed: the full "
                             "path (sqlite:////home/you/mlflow.db)") from None  # fmt: skip
    return f"{scheme}:///{here}/{rest[1:]}"


SQLITE_MAGIC = b"SQLite format 3\x00"  # the first bytes of every SQLite database file


def _check_sqlite_store(shown_uri: str, file: Path) -> None:
    """MLflow writes every trial's runs into this file: one that is not a database fails only once Ray has
    started, in a traceback; one that others may write, or that lies where anyone could swap it, takes the runs
    (and their settings) to someone else. An existing file of another user's is said, as a team may share one."""
    allowed = "allowed: a SQLite file of yours, or a new one's name"
    if open_to_all := cluster.open_to_all(file.parent):
        raise PreflightError(f"--mlflow {shown_uri}: {open_to_all[0]}, so anyone could swap the store for theirs; "
                             f"{allowed}")  # fmt: skip
    try:  # SQLite makes the file, and its journal beside it: a folder it cannot write failed once Ray had started
        tempfile.NamedTemporaryFile(dir=file.parent, prefix=".tune-alexnet-write-test-").close()
    except OSError as exc:
        raise PreflightError(
            f"--mlflow {shown_uri}: the folder {file.parent} cannot be written ({exc.strerror}), and SQLite makes the "
            f"store and its journal there; {allowed} in a folder you can write"
        ) from None
    if others := cluster.others_on_the_way(file.parent):
        settings.say(f"tune-alexnet: warning: --mlflow {shown_uri}: the store lies in {others[0]}, which {others[1]}, "
                     "so they could swap it for theirs, and read or change every run the sweep logs there")  # fmt: skip
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:  # MLflow makes it, once Ray has started: another user, first, where they may
        if cluster.others_can_write(os.stat(file.parent)):
            raise PreflightError(
                f"--mlflow {shown_uri}: {file} does not exist yet, and other users can make files in {file.parent}, "
                f"so one could make it first and read or change every run; {allowed} in a folder only you can write"
            ) from None
        return
    except OSError as exc:
        why = "is a symbolic link" if os.path.islink(file) else f"cannot be read ({exc.strerror})"
        raise PreflightError(f"--mlflow {shown_uri}: {file} {why}; {allowed}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        head = f.read(len(SQLITE_MAGIC)) if stat.S_ISREG(st.st_mode) else b""
    if not stat.S_ISREG(st.st_mode) or st.st_size and head != SQLITE_MAGIC:
        raise PreflightError(f"--mlflow {shown_uri}: {file} is not a SQLite database; {allowed}")
    if st.st_mode & stat.S_IWOTH:
        raise PreflightError(f"--mlflow {shown_uri}: {file} can be written by every user (mode "
                             f"{stat.S_IMODE(st.st_mode):04o}); {allowed}")  # fmt: skip
    if not os.access(file, os.R_OK | os.W_OK):
        raise PreflightError(f"--mlflow {shown_uri}: you cannot write {file}; {allowed}")
    if st.st_uid not in (0, os.getuid()):
        settings.say(f"tune-alexnet: warning: --mlflow {shown_uri}: {file} belongs to another user (uid {st.st_uid}), "
                     "who can read and change every run the sweep logs there")  # fmt: skip
    elif cluster.others_can_write(os.stat(file.parent)):
        settings.say(f"tune-alexnet: warning: --mlflow {shown_uri}: other users can make files in {file.parent}, "
                     "where SQLite keeps the store's journal beside it, so they could change the runs logged there")  # fmt: skip


# pip's name for a database driver, where it is not the module's
DRIVER_PACKAGES = {"psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient"}


def _check_driver(uri: str) -> None:
    """MLflow opens a database store through SQLAlchemy's dialect for the URI's scheme (or the driver its +DRIVER
    names); a driver that is not installed would show only once Ray had started, in a traceback."""
    try:
        from sqlalchemy.engine.url import make_url
        from sqlalchemy.exc import SQLAlchemyError
    except ImportError:
        raise PreflightError(f"--mlflow {redacted(uri)} needs the sqlalchemy package: pip install sqlalchemy") from None
    try:
        dialect = make_url(uri).get_dialect()
    except (SQLAlchemyError, ValueError) as exc:
        why = str(exc).partition("\n")[0]
        raise PreflightError(
            f"--mlflow {redacted(uri)}: SQLAlchemy cannot open it ({why}); allowed: a database "
            "URI such as postgresql://HOST:PORT/DB, or SCHEME+DRIVER:// naming an installed driver"
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        module, why = exc.name or dialect.driver, str(exc).partition("\n")[0]
        raise PreflightError(
            f"--mlflow {redacted(uri)} needs the database driver {module}, which cannot be imported "
            f"({why}); pip install {DRIVER_PACKAGES.get(module, module)}, or name an installed "
            f"driver as {dialect.name}+DRIVER://"
        ) from None


def _probe(uri: str) -> None:
    """Any HTTP answer below 500 proves a server is there (auth and paths are MLflow's to judge), so the probe
    goes without the URI's user part and query: urllib would take a user part for a port, and a secret in
    either would travel, and could be echoed, for nothing."""
    parts = urlparse(uri)
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    url = urlunparse((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", "", ""))

    def ask() -> None:
        with urllib.request.urlopen(url, timeout=TRACKER_TIMEOUT_S):
            pass

    try:  # the whole answer within the limit: urllib's timeout is each read's, and a server may drip its headers
        within(TRACKER_TIMEOUT_S, ask)
        return
    except urllib.error.HTTPError as exc:
        if exc.code < 500:
            return
        reason = f"it answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        reason = str(getattr(exc, "reason", exc))
    raise PreflightError(
        f"--mlflow {redacted(uri)}: the MLflow tracking server cannot be reached ({redacted(reason)}); "
        f"start it (mlflow server --host 127.0.0.1 --port 5000) or pass a reachable URI"
    )


def _check_wandb_key() -> None:
    """Online W&B needs an API key; Ray would only find that out after the sweep had started."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled") or os.environ.get("WANDB_API_KEY"):
        return
    import wandb

    try:  # the lookup Ray's callback makes (env, netrc, settings), without its deprecation notice
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            key = wandb.api.api_key
    except Exception:  # an unreadable settings file or netrc is as good as no key
        key = None
    if not key:
        raise PreflightError(
            "--wandb needs a W&B API key: run 'wandb login' or set WANDB_API_KEY "
            "(or WANDB_MODE=offline to keep the runs on disk for 'wandb sync')"
        )


# --- Ray, the cluster and the resources ---------------------------------------------------------------------


def _ray_could_not_start(exc: OSError) -> PreflightError:
    where = f" {exc.filename}" if exc.filename else ""
    return PreflightError(f"Ray could not start:{where} {exc.strerror or exc}")


def connect(address: str, quiet: bool = True, given_as: str = "--address") -> tuple[bool, str | None]:
    """ray.init for a sweep unless this process is connected already: (whether it started Ray, the dashboard's
    URL). Fails within seconds, in one line, where no cluster answers at `address`. A local Ray listens on
    loopback only and keeps its logs in a folder of this user's alone. Ray's settings are checked before, in
    prepare (check_ray_settings)."""
    import ray

    if ray.is_initialized():
        return False, None
    found = _auto_address(given_as) if address == "auto" else address
    host, _, port = _as_ray_joins(found).rpartition(":")
    looked_up = address == "auto" and os.environ.get("RAY_ADDRESS", "") in ("", "auto")
    # An address `auto` found may be another user's listener: it gets a connect, not a byte, until a raylet of
    # this user's names it. (An address given, here or in RAY_ADDRESS, is the user's.)
    for speak in (False, True) if looked_up else (True,):
        if found != "local" and "://" not in found and port.isdigit():
            if why := _no_gcs_at(host.strip("[]"), int(port), speak=speak):  # [::1]: IPv6, bracketed
                raise PreflightError(
                    f"{given_as} {address}: no Ray cluster answers {'at ' + found if found != address else 'there'} "
                    f"({why}); {cluster.ADDRESS_ALLOWED}"
                ) from None
        if looked_up and not speak and not cluster.gcs_of_yours(found):
            raise PreflightError(
                f"{given_as} auto: no Ray node of yours on this machine runs the cluster at {found}, which Ray found "
                "in its shared temp folder or among other users' processes, and Ray would send it your token; "
                "allowed: the host:port of the Ray head you mean, in --address or RAY_ADDRESS"
            )
    options: dict = {}
    try:
        options = cluster.local_ray_options(log_to_driver=not quiet) if address == "local" else {}
        # again, now that the token is made: its folder, where it did not exist yet, was another user's to make
        # first (a HOME in a shared, sticky folder), and theirs is a token they know
        if address == "local" and (problem := cluster.token_problem()):
            raise PreflightError(problem)
        own_session = cluster.own_session() if address == "local" else _join_bounded(address, given_as)
        with _stop_signals_deferred() as stopped, own_session, cluster.from_the_root_folder():
            try:
                context = ray.init(address=found, logging_level=logging.WARNING, **options)  # as checked: no 2nd lookup
            except SystemExit as exc:  # ray.init puts its own SIGTERM handler (sys.exit) in place of ours
                if exc.code != signal.SIGTERM:
                    raise
                stopped.append(signal.SIGTERM)
        if stopped:
            ray.shutdown()
            raise KeyboardInterrupt
    except cluster.UnsafeTempDir as exc:
        raise PreflightError(f"Ray's session folder {exc}") from None
    except (ConnectionError, RuntimeError, ValueError) as exc:  # before OSError: a ConnectionError is one
        why = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        if address == "local":  # nothing was joined: the Ray this package starts did not come up
            logs = f"; its logs are in {options['_temp_dir']}" if options.get("_temp_dir") else ""
            raise PreflightError(f"the local Ray could not start ({why}){logs}") from None
        raise PreflightError(
            f"{given_as} {address}: cannot join that Ray cluster ({why}); {cluster.ADDRESS_ALLOWED}"
        ) from None
    except OSError as exc:  # the token, made or read inside ray.init (a race with the checks above)
        raise _ray_could_not_start(exc) from None
    if address == "local":
        cluster.keep_token_private()
    else:  # 'auto' takes whichever Ray it finds on this machine: say which one
        gcs = context.address_info.get("gcs_address") or address
        settings.say(f"tune-alexnet: joined the Ray cluster at {gcs} ({given_as} {address})")
        host, _, port = gcs.rpartition(":")
        tls = os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")
        if not tls and port.isdigit() and _cluster_id_asked(host.strip("[]"), int(port), 5.0) is None:
            settings.say(
                f"tune-alexnet: warning: the Ray cluster at {gcs} answers without a token: anyone who can reach its "
                "port can run code as the user who started it; start it with RAY_AUTH_MODE=token (docs/edges.md)"
            )
    return True, f"http://{context.dashboard_url}" if context.dashboard_url else None


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


JOIN_LIMIT_S = 90.0  # a join takes seconds; Ray's own gives up on a GCS gone silent after 60 s
STOP_GRACE_S = 10.0  # after a stop signal, how long a join may still take to finish (and then stop cleanly)


@contextlib.contextmanager
def _join_bounded(address: str, given_as: str, limit: float = JOIN_LIMIT_S):
    """ray.init joining a cluster waits inside Ray's C++ code, where no Python signal handler runs: a server that
    answered as a GCS and then went silent held the command for ever, Ctrl-C and SIGTERM unheard. A watching
    thread, which learns of signals through the wakeup descriptor, ends the process in one line when a stop
    signal has not ended the join within STOP_GRACE_S, or when the join takes longer than `limit`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    joined = threading.Event()

    def watch() -> None:
        end, stop_by = time.monotonic() + limit, None
        while not joined.wait(0.2):
            with contextlib.suppress(OSError):  # BlockingIOError: no signal since the last look
                if os.read(read, 64) and stop_by is None:
                    stop_by = time.monotonic() + STOP_GRACE_S
            now = time.monotonic()
            if (stop_by is not None and now > stop_by) or now > end:
                why = "stopped" if stop_by is not None else f"no answer in {limit:g} s"
                settings.say(f"tune-alexnet: {given_as} {address}: the cluster there did not let this process join "
                             f"({why}); nothing was run")  # fmt: skip
                os._exit(1)

    watcher = threading.Thread(target=watch, daemon=True, name="tune-alexnet-join-watch")
    watcher.start()
    try:
        yield
    finally:
        joined.set()
        watcher.join()
        signal.set_wakeup_fd(previous)
        os.close(read)
        os.close(write)


def _as_ray_joins(address: str) -> str:
    """The address as ray.init will join it: loopback and localhost become the node's own IP."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        return canonicalize_bootstrap_address(address) or address
    except Exception:  # noqa: BLE001 - not an address Ray parses: the probe, or ray.init, says so in one line
        return address


def _no_gcs_at(host: str, port: int, timeout: float = 5.0, speak: bool = True) -> str | None:
    """Why nothing at host:port can be a Ray GCS, within about 3 times `timeout` in all (a name of many addresses,
    each given `timeout`, or a name server that does not answer, took minutes); None where it may be."""
    answer: list = []
    probe = threading.Thread(target=lambda: answer.append(_gcs_probe(host, port, timeout, speak)), daemon=True)
    probe.start()
    probe.join(3 * timeout + 1)
    return answer[0] if answer else f"no answer within {3 * timeout + 1:g} s"


def _gcs_probe(host: str, port: int, timeout: float, speak: bool) -> str | None:
    """A GCS speaks gRPC, so it answers HTTP/2's opening with its SETTINGS frame: a port that takes the connection
    yet stays silent or closes it (another service, a wrong port) had ray.init retry for minutes, with stop
    signals held back meanwhile. Where Ray's TLS is on (RAY_USE_TLS), or not `speak`, the connection alone is
    checked."""
    try:
        conn = socket.create_connection((host, port), timeout=timeout)
    except (OSError, ValueError) as exc:  # ValueError: a name no DNS takes (an empty label, one over 63 bytes)
        return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
    head = b""
    with conn:
        if not speak or os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return None
        deadline = time.monotonic() + timeout
        try:
            conn.sendall(HTTP2_PREFACE)
            while len(head) < 9 and (left := deadline - time.monotonic()) > 0:
                conn.settimeout(left)
                if not (chunk := conn.recv(9 - len(head))):
                    break
                head += chunk
        except TimeoutError:
            return f"it takes connections but said nothing in {timeout:g} s"
        except OSError:
            pass  # reset: as closed
    if len(head) < 9:
        return "it takes connections but closed this one"
    if head[3] != 0x04:  # a frame of HTTP/2 opens with its length (3 bytes), then its type: SETTINGS is 4
        return "it takes connections but does not speak gRPC, as a Ray GCS does"
    return _gcs_answer(host, port, max(1.0, deadline - time.monotonic()))


def _gcs_answer(host: str, port: int, timeout: float) -> str | None:
    """A gRPC server is a GCS if it answers the GCS's first question (the cluster's id), or refuses it for want of
    a token: another one, or one answering UNAVAILABLE, had ray.init retry for minutes. None where it is one."""
    import grpc

    code = _cluster_id_asked(host, port, timeout)
    if code in (None, grpc.StatusCode.UNAUTHENTICATED):  # answered, or asked for the token: a GCS
        return None
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return "it speaks gRPC but is no Ray GCS"
    return f"it speaks gRPC but did not answer as a Ray GCS does ({code.name})"


def _cluster_id_asked(host: str, port: int, timeout: float):
    """The gRPC status of the GCS's first question (the cluster's id) asked without a token; None where answered."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with grpc.insecure_channel(target) as channel:
        try:
            stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code() or grpc.StatusCode.UNKNOWN
    return None


RETIRED_TUNE_VARIABLES = ("TUNE_RESULT_DIR", "RAY_AIR_LOCAL_CACHE_DIR")  # Tune will not start while one is set


def check_retired_variables() -> None:
    """Tune no longer uses these, and refuses to start while one is set: only once the experiment folder and
    Tune's first files had been written, in words that read as the sweep's own error."""
    for name in RETIRED_TUNE_VARIABLES:
        if value := os.environ.get(name):
            raise PreflightError(
                f"{name}={settings.printable(value)}: Ray no longer uses this variable, and Tune will not start a "
                f"sweep while it is set; unset it (experiments go into --storage, {settings.DEFAULT_STORAGE} unless "
                "given)"
            )


def check_ray_settings(address: str, given_as: str) -> None:
    """The address to join, and for the Ray this package starts its token authentication and token: checked
    before anything is started or mended."""
    if problem := cluster.address_problem(address):  # from the API or RAY_ADDRESS, which the parser never saw
        raise PreflightError(f"{given_as} {problem}")
    if address == "local":  # the Ray this package starts: token authentication on, its token ours alone
        problem = cluster.auth_mode_problem() or cluster.token_problem() or cluster.folder_settings_problem()
        if problem:
            raise PreflightError(problem)


def _auto_address(given_as: str) -> str:
    """The address `auto` stands for, found as Ray finds it (the address file of the newest `ray start` in Ray's
    temp folder, else a running GCS): a stale file names a cluster long gone, and Ray then tries it for minutes.
    None found is refused here: ray.init would look again, and find what another user put there meanwhile."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        found, why = canonicalize_bootstrap_address("auto"), "none found"
    except Exception as exc:  # none, several, or an address file that cannot be read
        found, why = None, first_line(exc)
    if not found:
        raise PreflightError(f"{given_as} auto: no Ray cluster to join was found on this machine ({why}); "
                             f"{cluster.ADDRESS_ALLOWED}")  # fmt: skip
    return found


@contextlib.contextmanager
def _stop_signals_deferred():
    """Ctrl-C, SIGTERM or SIGHUP while Ray starts: let the start finish, then stop it. Interrupted halfway, its
    agents outlive the process, and an exception raised inside its threads' locks is lost. A second signal
    interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    received: list[int] = []
    from .stopping import STOP_SIGNALS, heeded

    signals = heeded(STOP_SIGNALS)
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def defer(sig, _frame):
        if received:
            raise KeyboardInterrupt
        received.append(sig)

    def ignored(unraisable) -> None:  # Ray's own SIGTERM handler (set inside ray.init) fired where Python ignores
        if isinstance(unraisable.exc_value, SystemExit) and unraisable.exc_value.code == signal.SIGTERM:
            received.append(signal.SIGTERM)
        else:
            previous_hook(unraisable)

    previous_hook, sys.unraisablehook = sys.unraisablehook, ignored
    for sig in signals:
        signal.signal(sig, defer)
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = previous_hook


def check_resources(s: SweepSettings, root: str) -> tuple[dict, int]:
    """One trial's resources, checked against the nodes that are up and the node types the autoscaler can start,
    and the bytes a local storage keeps free for the running trials' next checkpoints (0 for a bucket)."""
    import ray

    node_types = cluster.startable_node_types()
    gpus = s.gpus_per_trial
    if gpus is None:
        gpus = DEFAULT_GPU_SHARE if cluster.max_cluster_gpus(node_types) > 0 else 0.0
    per_trial = {"CPU": s.cpus_per_trial, "GPU": gpus}
    check_resources_fit(per_trial, ray.nodes(), node_types)
    joined = (s.address or os.environ.get("RAY_ADDRESS") or "local") != "local"
    check_cluster(root, ray.nodes(), per_trial, joined, s.shared_storage)
    trials = (len(s.runs) or len(s.grid)) * s.repeats
    concurrent = max(1, int(ray.cluster_resources().get("CPU", 1) // max(s.cpus_per_trial, 1e-9)))
    if gpus:
        concurrent = max(1, int(max(ray.cluster_resources().get("GPU", 0), 1) / gpus))
    width = float({**TRIAL_DEFAULTS, **s.trial}["width"])
    if is_remote(root):
        return per_trial, 0
    if not s.resume:
        check_space(root, trials, concurrent, width)
    return per_trial, space_needed(trials, concurrent, width)[1]  # the disk guard's share of each running trial


def check_cluster(root: str, nodes: list[dict], per_trial: dict, joined: bool, shared_storage: bool) -> None:
    """Refuse a node-local storage path that other nodes' trials would write to."""
    if is_remote(root) or shared_storage or cluster.on_network_filesystem(root):
        return
    problem = cluster.local_storage_problem(nodes, per_trial, joined)
    if problem:
        raise PreflightError(
            f"--storage {root} is a local folder but {problem}; use --storage s3://BUCKET/PATH "
            f"(or gs://), a shared filesystem mount, or --shared-storage if {root} is the same "
            f"folder on every node"
        )


def check_resources_fit(per_trial: dict, nodes: list[dict], node_types: list[dict]) -> None:
    """Refuse a trial size that no node, up now or startable by the autoscaler, could ever hold (Tune would
    leave every trial pending forever)."""
    wanted = {k: v for k, v in per_trial.items() if v > 0}
    capacities = [n.get("Resources", {}) for n in nodes if n.get("Alive")] + node_types
    if any(all(c.get(k, 0) >= v for k, v in wanted.items()) for c in capacities):
        return
    asked = ", ".join(f"{v:g} {k}" for k, v in wanted.items())
    largest = ", ".join(f"{max(c.get(k, 0) for c in capacities):g} {k}" for k in wanted) if capacities else "none"
    raise PreflightError(
        f"a trial asks for {asked} but no node of this cluster has that (the most any node has: "
        f"{largest}); allowed: --cpus-per-trial and --gpus-per-trial within one node"
    )


def space_needed(trials: int, concurrent: int, width: float) -> tuple[int, int, int]:
    """Bytes a sweep needs on its storage: (all of it, what one running trial's next checkpoint needs, one trial's
    best weights). The same formula as the disk guard's (storage.room_needed), so that what is approved here can
    finish under the guard."""
    from .model import AlexNet, count_parameters

    weights = 4 * count_parameters(AlexNet(dropout=True, batchnorm=True, width=width))  # fp32 bytes
    return room_needed(trials, min(trials, concurrent), weights), checkpoint_room(weights), weights


def check_space(root: str, trials: int, concurrent: int, width: float) -> None:
    """Refuse a local --storage without room for what the sweep keeps: each finished trial's best weights, and
    while trials run their resume states (current weights, optimizer moments, a copy of the best weights) and
    room for the next one."""
    needed, per_running, weights = space_needed(trials, concurrent, width)
    free = shutil.disk_usage(root).free
    running = min(trials, concurrent)
    if free < needed:
        raise PreflightError(
            f"--storage {root} has {free / 1e6:,.0f} MB free but this sweep needs about {needed / 1e6:,.0f} MB "
            f"({trials} trial(s) keep {weights / 1e6:,.0f} MB of best weights each; each of the {running} running at "
            f"once holds about {per_running / 1e6:,.0f} MB of checkpoints and needs as much again for its next one; "
            f"{RESERVE_BYTES / 1e6:,.0f} MB for the tables); allowed: a folder with that much room, fewer runs, or "
            "an s3:// URI"
        )
