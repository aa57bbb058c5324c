"""The one place where the training side touches Ray: what Ray granted, reporting, checkpoints to resume from.

train.py stays plain PyTorch and imports this module only when Tune runs it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sys
import time
from pathlib import Path, PurePosixPath

import ray
from ray import tune

# Tune logs a line per persisted checkpoint in the trial's process; the table says as much.
logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
log = logging.getLogger("tune_alexnet.train")

STORAGE_FULL = "storage_full"  # a result key: bytes the trial's next checkpoint lacked on a local storage
STOP_WAIT_S = 600.0  # how long a trial with no room waits for the sweep to stop it before it fails


def granted_resources() -> dict:
    return ray.get_runtime_context().get_assigned_resources()


def node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def trial_id() -> str | None:
    """This trial's Tune id (the experiment's prefix and its index in creation order); the score's last
    tie-break."""
    return tune.get_context().get_trial_id()


def trial_watch(stop_key: str | None):
    """What tells this trial to save: the sweep's stop flag in Ray's key-value store, and this node's spot
    interruption notice where the node has a metadata service to ask (stopping.TrialWatch)."""
    from . import spot, stopping

    return stopping.TrialWatch(stop_key, spot.endpoint())


def quiet_exit_on_sigterm() -> None:
    """Ray's workers turn SIGTERM into SystemExit; when that lands inside a garbage-collector callback Python
    prints it as an ignored exception with a traceback and the process lives on. Exit quietly instead."""
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, SystemExit):
            sys.stdout.flush()
            sys.stderr.flush()
            code = unraisable.exc_value.code
            os._exit(code if isinstance(code, int) else 1)
        previous(unraisable)

    sys.unraisablehook = hook


def report(metrics: dict, checkpoint_dir: str | None, keep_free: int = 0) -> None:
    """tune.report, but a checkpoint that would leave a local storage with less than `keep_free` bytes (what the
    other running trials' next checkpoints need) is not written: the trial says so and waits to be stopped."""
    if checkpoint_dir is not None:
        short = room_short(checkpoint_dir, keep_free)
        if short:
            tune.report({**metrics, STORAGE_FULL: short})
            _empty(checkpoint_dir)
            _wait_to_be_stopped(short)
    try:
        if checkpoint_dir is not None:
            _clear_the_next_checkpoint_name()
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)
    except Exception as exc:
        if checkpoint_dir is not None and _no_space(exc):  # filled by another between the room check and the copy
            short = max(1, room_short(checkpoint_dir, keep_free))
            tune.report({**metrics, STORAGE_FULL: short})
            _empty(checkpoint_dir)
            _wait_to_be_stopped(short)
        if checkpoint_dir is None or not _storage_gone():
            raise
        # The local storage turned read-only or was deleted: the sweep's disk guard sees that within seconds and
        # stops the sweep cleanly, naming it; failing here would only add a traceback per trial to its line.
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(":")[:200]  # Ray's repr follows
        log.warning("the checkpoint could not be written (%s); waiting for the sweep to stop", first)
        _empty(checkpoint_dir)
        time.sleep(STOP_WAIT_S)
        raise


def _trial_storage():
    """Tune's storage context of the trial this process runs; None with no Tune session (a test) or an API that
    moved."""
    try:
        return tune.get_context().get_storage()
    except Exception:
        return None


def _clear_the_next_checkpoint_name() -> None:
    """Tune names a trial's next checkpoint on from the last one it recorded, and copies it in among whatever a
    folder of that name holds: a state it never recorded (a stop's, which this trial went on from). Its stale
    resume state would sit beside the new best weights, and a later resume would take it."""
    from pyarrow.fs import FileType
    from ray.train._internal.storage import StorageContext

    storage = _trial_storage()
    if storage is None:
        return
    name = StorageContext._make_checkpoint_dir_name(storage.current_checkpoint_index + 1)
    fs, path = storage.storage_filesystem, f"{storage.trial_fs_path}/{name}"
    if fs.get_file_info(path).type == FileType.Directory:
        log.info("checkpoint %s holds a state Tune never recorded, which this one replaces", name)
        fs.delete_dir(path)


def _empty(checkpoint_dir: str) -> None:
    """The files of a checkpoint that will not be written, removed before the trial waits: the stop kills the
    trial in its wait, and they would stay in the temporary folder (a full-size trial's are half a gigabyte)."""
    for f in Path(checkpoint_dir).iterdir():
        with contextlib.suppress(OSError):
            f.unlink()


def _no_space(exc: BaseException) -> bool:
    """Whether `exc`, or what caused it, is a full disk or quota (pyarrow's copy may keep only the words)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        words = str(exc)
        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
            os.strerror(code) in words for code in (errno.ENOSPC, errno.EDQUOT)
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _storage_gone() -> bool:
    """Whether this trial's local storage can no longer be written: its experiment folder deleted, or it or the
    trial's own folder read-only."""
    from pyarrow.fs import LocalFileSystem

    storage = _trial_storage()
    if storage is None or not isinstance(storage.storage_filesystem, LocalFileSystem):
        return False
    from ray.train._internal.storage import _VALIDATE_STORAGE_MARKER_FILENAME

    folder, own = Path(storage.experiment_fs_path), Path(storage.trial_fs_path)
    # Tune's driver recreates a deleted experiment folder as it saves, without the marker file it made at the start
    gone = not (folder / _VALIDATE_STORAGE_MARKER_FILENAME).is_file()
    return gone or not os.access(folder, os.W_OK) or (own.is_dir() and not os.access(own, os.W_OK))


def room_short(checkpoint_dir: str, keep_free: int) -> int:
    """Bytes missing on the trial's local storage for this checkpoint plus `keep_free`; 0 if there is room or the
    storage is not a local folder (a bucket has no such limit to check)."""
    from pyarrow.fs import LocalFileSystem

    storage = _trial_storage()
    if storage is None or not isinstance(storage.storage_filesystem, LocalFileSystem):
        return 0
    folder = Path(storage.trial_fs_path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    needed = sum(f.stat().st_size for f in Path(checkpoint_dir).iterdir() if f.is_file()) + keep_free
    return max(0, needed - shutil.disk_usage(folder).free)


def _wait_to_be_stopped(short: int) -> None:
    log.warning("the storage lacks %.0f MB for this trial's checkpoint; waiting for the sweep to stop", short / 1e6)
    time.sleep(STOP_WAIT_S)
    raise OSError(f"the storage lacked {short / 1e6:.0f} MB for a checkpoint and the sweep did not stop")


def resume_candidates() -> list:
    """The trial's checkpoints in storage, newest first: those newer than Tune's latest, or all where Tune has
    recorded none (as (checkpoint, STOP_ONLY): a stop's or a spot notice's last report saves a state that Tune,
    stopping, may never record, in the first epoch too), then Tune's latest, then the older ones it kept (the
    latest may hold only best weights while the resume state sits in an older one). train._restore takes the
    first that fits."""
    from pyarrow.fs import FileSelector, FileType

    latest, storage = tune.get_checkpoint(), _trial_storage()
    if storage is not None:
        fs, folder = storage.storage_filesystem, storage.trial_fs_path
    elif latest is not None:  # Tune's latest alone says where
        fs, folder = latest.filesystem, str(PurePosixPath(latest.path).parent)
    else:
        return []
    try:
        infos = fs.get_file_info(FileSelector(folder))
    except OSError:
        return [latest] if latest else []
    mark = PurePosixPath(latest.path.rstrip("/")).name if latest else ""
    names = sorted(
        (i.base_name for i in infos if i.type == FileType.Directory and i.base_name.startswith("checkpoint_")),
        reverse=True,
    )
    newer = [(tune.Checkpoint(f"{folder}/{n}", filesystem=fs), STOP_ONLY) for n in names if n > mark]
    older = [tune.Checkpoint(f"{folder}/{n}", filesystem=fs) for n in names if mark and n < mark]
    return [*newer, *([latest] if latest else []), *older]


# A checkpoint Tune did not record: used only for a state saved inside an epoch (a stop's, a spot notice's), which
# the driver asked for while it was alive and recording. An epoch's state there may be one whose epoch result never
# reached the records (the driver was killed first): training that epoch again keeps every record whole.
STOP_ONLY = "stop-only"
