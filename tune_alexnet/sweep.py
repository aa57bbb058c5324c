"""The study as a Tune experiment: build the Tuner (or restore it), fit, hand back the ResultGrid.

Like Ray's own examples: configure, fit, return the results. Every refusal has
run before (preflight.prepare made the Plan); this module knows nothing of layers
or optimizers either: trials run `train.train_cifar`. A trial's param space holds
what defines its result; how it runs travels beside it through
`tune.with_parameters`, so it neither names trials nor blocks a change on --resume.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from contextlib import nullcontext

from ray import tune
from ray.tune.search import BasicVariantGenerator

from . import stopping, tracking
from .console import Console
from .data import describe
from .live_page import LivePage
from .plan import Plan
from .preflight import no_fresh_start, restore_refused
from .ray_hooks import STORAGE_FULL
from .resume import keep_whole_state
from .settings import (
    EPOCHS,
    METRIC,
    MODE,
    PATIENCE,
    TRIAL_DEFAULTS,
    SweepSettings,
    keep_runtime,
    say,
    write_settings,
)
from .stopper import result_says_stop
from .storage import RESERVE_BYTES, StorageLost, is_remote, make_reserve, release_reserve, unwritable_in
from .train import train_cifar

log = logging.getLogger("tune_alexnet.sweep")


class PlateauStopper(tune.Stopper):
    """The study's plateau rule for Tune: the same functions the training function ends itself by.

    On the report after which the function returns by itself (`ends_trial`) it leaves the trial alone:
    stopping it from outside would race the function's own exit, and tearing down a worker while the
    full-size network is still being released aborted it. It stops any trial that goes past the rule.
    """

    def __init__(self, patience: int = PATIENCE, max_epochs: int = EPOCHS):
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        if max_epochs < 1:
            raise ValueError(f"max_epochs must be at least 1, got {max_epochs}")
        self.patience, self.max_epochs = patience, max_epochs

    def __call__(self, trial_id: str, result: dict) -> bool:
        if result.get("ends_trial") or result.get(STORAGE_FULL):  # it ends itself, or the sweep stops it all
            return False
        return result_says_stop(result, self.patience, self.max_epochs)

    def stop_all(self) -> bool:
        return False


class DiskGuard(tune.Callback):
    """Stops the sweep as Ctrl-C does (so --resume continues it) once a local storage has less room than the
    running trials' next checkpoints need (storage.checkpoint_room each: the formula preflight approved the sweep
    by), before a write fails halfway: from its own look at the disk every few seconds, or at once when a trial
    reports that it held back a checkpoint for want of room (ray_hooks.report). Tripping releases the reserve, so
    Tune's last state and the tables still fit."""

    def __init__(
        self, root: str, per_trial: int, reserve: str | None = None, every_s: float = 2.0, exp_dir: str | None = None
    ):
        self.root, self.per_trial, self.reserve, self.every_s = root, per_trial, reserve, every_s
        self.last_check, self.tripped, self.running, self.exp_dir = 0.0, False, 1, exp_dir
        self.lost: str | None = None  # why the experiment folder can no longer be written, once seen
        self.identity = _identity(exp_dir)  # a folder deleted and made again (Tune makes it) is another folder

    def __getstate__(self) -> dict:  # saved with the experiment: what it saw this time is not kept
        return {**self.__dict__, "lost": None, "tripped": False}

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        self.running = max(1, sum(t.status == "RUNNING" for t in trials))
        if self.tripped or time.monotonic() - self.last_check < self.every_s:
            return
        self.last_check = time.monotonic()
        if self._check_writable(trials):
            return
        free = self._free()
        if free is not None and free < self._needed():
            self.trip(free)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if result.get(STORAGE_FULL) and not self.tripped:
            self.trip(self._free() or 0)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        if not self.tripped:  # a trial that failed to write: the storage may have gone from under the sweep
            self._check_writable([*trials, trial])

    def _check_writable(self, trials: list) -> bool:
        """Whether the experiment folder was found deleted, or it or a running trial's folder unwritable (read-only,
        immutable); if so, the sweep is stopped as Ctrl-C stops it, and sweep.run raises StorageLost."""
        exp_dir = self.exp_dir
        if exp_dir is None:
            return False
        why, deleted = None, False
        try:
            if _identity(exp_dir) != self.identity:
                raise FileNotFoundError(exp_dir)
            with tempfile.NamedTemporaryFile(dir=exp_dir, prefix=".tune-alexnet-write-test-"):
                pass
            # a trial's own folder, or a file or checkpoint in it, shut alone
            shut = next(filter(None, (unwritable_in(f) for f in _trial_folders(exp_dir, trials))), None)
            if shut is None:
                return False
            why = f"read-only or immutable: {shut}"
        except FileNotFoundError:
            deleted = True
            self.lost = (
                f"the experiment folder {exp_dir} was deleted while the sweep ran, and what its trials had done "
                f"with it; start afresh with the same command and another --name (or once {exp_dir} is removed, "
                "with this one)"
            )
        except OSError as exc:
            why = exc.strerror
        if why is not None:
            self.lost = (
                f"--storage {self.root} can no longer be written ({why}); the sweep stopped; once it can be written "
                f"again, 'tune-alexnet sweep --resume --name {os.path.basename(exp_dir)} --storage {self.root}' "
                "continues it"
            )
        _lost.append(StorageLost(self.lost, deleted=deleted))
        self.tripped = True
        if self.reserve:
            release_reserve(self.reserve)
        stopping.stop_at_once(said=True)  # the sweep's last line says why
        return True

    def _needed(self) -> int:
        return self.running * self.per_trial

    def _free(self) -> int | None:
        try:
            return shutil.disk_usage(self.root).free
        except OSError:  # the storage gone from under the sweep: _check_writable says so
            return None

    def trip(self, free: int) -> None:
        self.tripped = True
        if self.reserve:
            release_reserve(self.reserve)
        say(
            f"tune-alexnet sweep: --storage {self.root} is nearly full ({free / 1e6:,.0f} MB free, about "
            f"{self._needed() / 1e6:,.0f} MB needed for the next checkpoints of the {self.running} running trial(s)); "
            "stopping; free some room, then --resume continues"
        )
        stopping.stop_at_once()  # trials keep their last checkpoints, as the stop line says


class KeepWholeState(tune.Callback):
    """As Tune saves its experiment state, a copy of it beside the experiment that a kill cannot cut
    (resume.keep_whole_state; --resume puts it back in place of a cut state). Tune saves the callbacks' states
    right after it has staged its own, so get_state is where that staged state is whole and newest."""

    def __init__(self, exp_dir: str):
        self.exp_dir, self.staging = exp_dir, None

    def __getstate__(self) -> dict:  # saved with the experiment: this run's staging folder is not kept
        return {**self.__dict__, "staging": None}

    def on_trial_add(self, iteration: int, trials: list, trial, **info) -> None:
        self.staging = getattr(getattr(trial, "storage", None), "experiment_driver_staging_path", self.staging)

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if self.staging is None and trials:  # trials restored by a resume are not added again
            self.on_trial_add(iteration, trials, trials[0])

    def get_state(self) -> None:
        if self.staging is not None and os.path.isdir(self.staging):
            keep_whole_state(self.staging, self.exp_dir)
        return None  # nothing of its own to save


def _trial_folders(exp_dir: str, trials: list) -> list[str]:
    """The folders of the running trials that exist (Tune makes a deleted one again as it saves)."""
    names = {t.storage.trial_dir_name for t in trials if t.status == "RUNNING" and getattr(t, "storage", None)}
    return [p for n in sorted(names) if os.path.isdir(p := os.path.join(exp_dir, n))]


def _identity(folder: str | None) -> tuple[int, int] | None:
    try:
        st = os.stat(folder) if folder else None
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if st else None


_lost: list[StorageLost] = []  # what a disk guard found, in this (the driver's) process


def trial_space(s: SweepSettings) -> dict:
    """Tune's param space: the grid's five dimensions plus the settings that define a trial's result."""
    if s.runs:  # chosen runs of the study: one grid dimension over run numbers (grid.full_config looks them up)
        # In ascending order, the order of the tables: Tune creates (and numbers) trials in this order.
        space = {"run": tune.grid_search(sorted(s.runs))}
    else:
        space = {dim: tune.grid_search(list(values)) for dim, values in s.grid.values().items()}
    space.update({**TRIAL_DEFAULTS, **s.trial, "epochs": s.epochs, "patience": s.patience})
    space["seed"] = tune.randint(0, 2**31 - 1) if s.repeats > 1 else s.seed
    return space


def count_no_callbacks() -> None:
    """Tune counts the callbacks it is given, for Ray's usage statistics, by importing MLflow's and W&B's
    integrations whether or not a sweep asked for them: 1.5 to 2 s of every sweep's start, and MLflow's telemetry.
    The count is left out; the trackers asked for are imported by their own callbacks."""
    from ray.air._internal import usage

    if hasattr(usage, "tag_callbacks"):
        usage.tag_callbacks = lambda callbacks: False


def run(plan: Plan, quiet: bool = False) -> tune.ResultGrid:
    """Start (or resume) the sweep on the Ray this process is connected to, and wait for it. Unless `quiet`,
    the console shows our compact progress table (Tune's own live output is off)."""
    s, data = plan.settings, plan.data
    log.info("data: %s: %d train, %d test images", data.source, len(data.train_x), len(data.test_x))
    guard = []
    if not is_remote(plan.root):
        reserve = make_reserve(plan.exp_uri, RESERVE_BYTES)
        guard = [DiskGuard(plan.root, plan.keep_free, reserve, exp_dir=plan.exp_uri)]
    # Each checkpoint a trial reports forces a snapshot of the experiment state (so that the checkpoints Tune
    # deletes are never still named in it); we checkpoint rarely, so the warning about frequent ones is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's newer console output prints a box and a TensorBoard folder that is not the experiment's even when
    # silent; the older one is truly silent at verbose=0, and console.Console shows the progress instead.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    if not s.mlflow:  # Tune's usage count imports MLflow wherever it is installed, whose telemetry then writes an
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # id into ~/.config and calls home: not asked for
    else:
        for name, value in tracking.MLFLOW_PATIENCE.items():
            os.environ.setdefault(name, value)
    count_no_callbacks()
    stop_key = stopping.new_key()  # the flag that asks every trial to save before a stop (stopping.py)
    trainable = tune.with_resources(
        # a trial checks only that its own checkpoint fits: the guard, which sees every trial, keeps the others' room
        tune.with_parameters(train_cifar, data=data, runtime=s.runtime, keep_free=0, stop_key=stop_key),
        {"cpu": plan.per_trial["CPU"], "gpu": plan.per_trial["GPU"]},
    )
    if s.resume:
        keep_runtime(plan.exp_uri, s.runtime)
        try:  # its record of the sweep (tuner.pkl), whole and of Tune's keys yet not what Tune wrote: one line
            tuner = tune.Tuner.restore(plan.exp_uri, trainable, resume_errored=True)
        except Exception as exc:  # noqa: BLE001
            raise restore_refused(plan.exp_uri, s.name, exc) from None
        local = getattr(tuner, "_local_tuner", None)
        if local is not None:
            callbacks_as_now(local.get_run_config(), plan, quiet, guard)
    else:
        write_settings(plan.exp_uri, s, {"data": describe(data)})
        tuner = tune.Tuner(
            trainable,
            param_space=trial_space(s),
            tune_config=_tune_config(s),
            run_config=_run_config(s, plan.root, quiet, guard, plan.exp_uri),
        )
    _lost.clear()
    with stopping.SaveFirst(stop_key, quiet=quiet), no_fresh_start(plan.exp_uri, s.name) if s.resume else nullcontext():
        results = tuner.fit()
    if _lost:
        raise _lost[0]
    return results


def callbacks_as_now(run_config: tune.RunConfig, plan: Plan, quiet: bool, guard: list) -> None:
    """The callbacks come back pickled with the experiment as the first run made them: its folders, console and
    trackers' settings (its WANDB_DIR may since be another user's folder), and, for the classes tracking builds on
    first use, their code as it was then. This run's are made in their place, from the settings as checked now and
    where the experiment is now (copied into a bucket, or back). A tracker that no record of the settings names
    any more is left out, with a warning line: no check has seen its settings."""
    s = plan.settings
    for tracker, named, made in (("MLflow", s.mlflow, tracking.is_mlflow), ("W&B", s.wandb, tracking.is_wandb)):
        if named is None and any(map(made, run_config.callbacks or [])):
            say(f"tune-alexnet: warning: the experiment's record of its settings names no {tracker} tracker, so the "
                "one Tune kept is left out of this run (no check has seen its settings)")  # fmt: skip
    run_config.callbacks = _callbacks(s, quiet, guard, plan.exp_uri)


def _tune_config(s: SweepSettings) -> tune.TuneConfig:
    return tune.TuneConfig(
        metric=METRIC, mode=MODE, num_samples=s.repeats, search_alg=BasicVariantGenerator(random_state=s.seed)
    )


def _run_config(
    s: SweepSettings, root: str, quiet: bool = False, guards: list | None = None, exp_uri: str | None = None
) -> tune.RunConfig:
    return tune.RunConfig(
        name=s.name,
        storage_path=root,
        stop=PlateauStopper(s.patience, s.epochs),
        # Keep the checkpoint of highest rank plus the latest: see train.checkpoint_rank for what that leaves.
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=1, checkpoint_score_attribute="checkpoint_rank", checkpoint_score_order="max"
        ),
        failure_config=tune.FailureConfig(max_failures=s.max_failures),
        # Each trial's stdout/stderr are written in its working dir and, with sync_artifacts, copied into the
        # trial folder in storage, so the logs stay with the experiment (and reach S3 on a cluster).
        log_to_file=True,
        sync_config=tune.SyncConfig(sync_artifacts=True),
        callbacks=_callbacks(s, quiet, guards, exp_uri),
        verbose=0,
    )


def _callbacks(s: SweepSettings, quiet: bool, guards: list | None, exp_uri: str | None) -> list:
    """A run's callbacks, a first run's or a resume's (callbacks_as_now). The study page is written with --quiet
    too: it is for whoever opens it, not for this console."""
    return [
        *tracking.callbacks(s),
        *(guards or []),
        *([LivePage(exp_uri)] if exp_uri else []),
        *([KeepWholeState(exp_uri)] if exp_uri and not is_remote(exp_uri) else []),
        stopping.StopAfterSaving(),
        *([] if quiet else [Console()]),
    ]
