"""The one place where the training side touches Ray: what Ray granted, reporting, checkpoints to resume from.

train.py stays plain PyTorch and imports this module only when Tune runs it.
"""

from __future__ import annotations

import logging
from pathlib import PurePosixPath

import ray
from ray import tune

# Tune logs a line per persisted checkpoint in the trial's process; the table says as much.
logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)


def granted_resources() -> dict:
    return ray.get_runtime_context().get_assigned_resources()


def node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def report(metrics: dict, checkpoint_dir: str | None) -> None:
    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)


def resume_candidates() -> list[tune.Checkpoint]:
    """The trial's checkpoints in storage, newest first: Tune's latest, then the other ones it kept
    (the latest may hold only best weights while the resume state sits in an older one)."""
    latest = tune.get_checkpoint()
    if latest is None:
        return []
    from pyarrow.fs import FileSelector, FileType

    parent = PurePosixPath(latest.path).parent
    try:
        infos = latest.filesystem.get_file_info(FileSelector(str(parent)))
    except OSError:
        return [latest]
    others = sorted(
        (
            i.path
            for i in infos
            if i.type == FileType.Directory
            and i.base_name.startswith("checkpoint_")
            and i.path.rstrip("/") != latest.path.rstrip("/")
        ),
        reverse=True,
    )
    return [latest] + [tune.Checkpoint(path, filesystem=latest.filesystem) for path in others]
