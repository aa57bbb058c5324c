"""The study as a Tune experiment: build the Tuner (or restore it), fit, hand back the ResultGrid.

Knows nothing of layers or optimisers: trials run `train.train_cifar`. A trial's
param space holds what defines its result; how it runs travels beside it through
`tune.with_parameters`, so it neither names trials nor blocks a change on --resume.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import ray
from ray import tune
from ray.tune.search import BasicVariantGenerator

from . import preflight, tracking
from .console import Console
from .data import Cifar, check_same_data, describe, load_cifar10
from .settings import (
    DEFAULT_GPU_SHARE,
    EPOCHS,
    METRIC,
    MODE,
    PATIENCE,
    TRIAL_DEFAULTS,
    Grid,
    SweepSettings,
    read_settings,
    write_settings,
)
from .stopper import result_says_stop
from .storage import experiment_uri, is_remote, storage_uri
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
        return not result.get("ends_trial") and result_says_stop(result, self.patience, self.max_epochs)

    def stop_all(self) -> bool:
        return False


class DiskGuard(tune.Callback):
    """Stops the sweep as Ctrl-C does (so --resume continues it) once a local storage has less room than the
    running trials' next checkpoints need, before a write fails halfway."""

    def __init__(self, root: str, min_free: int, every_s: float = 2.0):
        self.root, self.min_free, self.every_s = root, min_free, every_s
        self.last_check, self.tripped = 0.0, False

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if self.tripped or time.monotonic() - self.last_check < self.every_s:
            return
        self.last_check = time.monotonic()
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:  # the folder moved since this guard was saved with the experiment: nothing to watch
            return
        if free < self.min_free:
            self.tripped = True
            print(
                f"tune-alexnet sweep: --storage {self.root} is nearly full ({free / 1e6:,.0f} MB free, about "
                f"{self.min_free / 1e6:,.0f} MB needed for the running trials' next checkpoints); stopping",
                file=sys.stderr,
                flush=True,
            )
            os.kill(os.getpid(), signal.SIGINT)  # Tune's own clean stop: trials keep their last checkpoints


def trial_space(s: SweepSettings) -> dict:
    """Tune's param space: the grid's five dimensions plus the settings that define a trial's result."""
    if s.runs:  # chosen runs of the study: one grid dimension over run numbers (grid.full_config looks them up)
        space = {"run": tune.grid_search(list(s.runs))}
    else:
        space = {dim: tune.grid_search(list(values)) for dim, values in s.grid.values().items()}
    space.update({**TRIAL_DEFAULTS, **s.trial, "epochs": s.epochs, "patience": s.patience})
    space["seed"] = tune.randint(0, 2**31 - 1) if s.repeats > 1 else s.seed
    return space


def prepare(s: SweepSettings):
    """The settings to run (an interrupted sweep's own, on --resume), the experiment's URI and the lock that
    holds it for this process (keep it until the end); refuses with a PreflightError before anything else is
    written."""
    root = storage_uri(s.storage)
    name = s.name or (None if s.resume else time.strftime("alexnet-%Y%m%d-%H%M%S"))
    if name is None:
        name = _latest_experiment(root)
    lock = preflight.lock_experiment(root, name)
    try:
        if s.resume:
            s = _settings_for_resume(SweepSettings(**{**asdict(s), "grid": s.grid, "name": name}), root)
        s = SweepSettings(**{**asdict(s), "grid": s.grid, "name": name})
        exp_uri = experiment_uri(root, name)
        preflight.check_storage(root, exp_uri, s.resume, name)
        tracking.check(s)
    except BaseException:
        lock.release()
        raise
    return s, exp_uri, lock


def gpu_share(s: SweepSettings, node_types: list[dict]) -> float:
    if s.gpus_per_trial is not None:
        return s.gpus_per_trial
    return DEFAULT_GPU_SHARE if preflight.max_cluster_gpus(node_types) > 0 else 0.0


def check_resume_data(s: SweepSettings, exp_uri: str, data: Cifar) -> None:
    """A resume finishes the runs on the data they started on, unless the user says the change is deliberate."""
    recorded = (read_settings(exp_uri) or {}).get("data")
    if s.resume and recorded is not None and not s.allow_data_change:
        check_same_data(recorded, data)


def run_sweep(s: SweepSettings, exp_uri: str, data: Cifar | None = None, quiet: bool = False) -> tune.ResultGrid:
    """Start (or resume) the sweep on the Ray this process is connected to, and wait for it. Unless `quiet`,
    the console shows our compact progress table (Tune's own live output is off)."""
    if data is None:
        data = load_cifar10(s.data_dir, s.subset, s.download_root)
    log.info("data: %s: %d train, %d test images", data.source, len(data.train_x), len(data.test_x))
    node_types = preflight.startable_node_types()
    gpus = gpu_share(s, node_types)
    per_trial = {"CPU": s.cpus_per_trial, "GPU": gpus}
    preflight.check_resources_fit(per_trial, ray.nodes(), node_types)
    joined = (s.address or os.environ.get("RAY_ADDRESS") or "local") != "local"
    root = storage_uri(s.storage)
    preflight.check_cluster(root, ray.nodes(), per_trial, joined, s.shared_storage)
    trials = (len(s.runs) or len(s.grid)) * s.repeats
    concurrent = max(1, int(ray.cluster_resources().get("CPU", 1) // max(s.cpus_per_trial, 1e-9)))
    if gpus:
        concurrent = max(1, int(max(ray.cluster_resources().get("GPU", 0), 1) / gpus))
    width = float({**TRIAL_DEFAULTS, **s.trial}["width"])
    if not s.resume:
        preflight.check_space(root, trials, concurrent, width)
    guard = [] if is_remote(root) else [DiskGuard(root, preflight.space_needed(trials, concurrent, width)[1])]
    # Each checkpoint a trial reports forces a snapshot of the experiment state (so that the checkpoints Tune
    # deletes are never still named in it); we checkpoint rarely, so the warning about frequent ones is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's newer console output prints a box and a TensorBoard folder that is not the experiment's even when
    # silent; the older one is truly silent at verbose=0, and console.Console shows the progress instead.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    trainable = tune.with_resources(
        tune.with_parameters(train_cifar, data=data, runtime=s.runtime), {"cpu": s.cpus_per_trial, "gpu": gpus}
    )
    if s.resume:
        tuner = tune.Tuner.restore(exp_uri, trainable, resume_errored=True)
    else:
        write_settings(exp_uri, s, {"data": describe(data)})
        tuner = tune.Tuner(
            trainable, param_space=trial_space(s), tune_config=_tune_config(s), run_config=_run_config(s, quiet, guard)
        )
    return tuner.fit()


def _tune_config(s: SweepSettings) -> tune.TuneConfig:
    return tune.TuneConfig(
        metric=METRIC, mode=MODE, num_samples=s.repeats, search_alg=BasicVariantGenerator(random_state=s.seed)
    )


def _run_config(s: SweepSettings, quiet: bool = False, guards: list | None = None) -> tune.RunConfig:
    return tune.RunConfig(
        name=s.name,
        storage_path=storage_uri(s.storage),
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
        callbacks=[*tracking.callbacks(s), *(guards or []), *([] if quiet else [Console()])],
        verbose=0,
    )


def _settings_for_resume(s: SweepSettings, root: str) -> SweepSettings:
    """The interrupted sweep's own settings; of them the cluster address, the data's location, a GPU share
    given again and the flags on how trials run (--device, --resume-every, ...) may change."""
    name = s.name
    exp_uri = experiment_uri(root, name)
    if not tune.Tuner.can_restore(exp_uri):
        raise preflight.PreflightError(
            f"--resume: no experiment named {name!r} in {root}; start it without "
            f"--resume, or pass the --name of one that exists"
        )
    try:
        tune.ExperimentAnalysis(exp_uri)
    except Exception as exc:  # Tune's restore would start trials with empty configs and write a newer state
        from .export import load_experiment

        table = load_experiment(exp_uri).table
        unfinished = table[~table["status"].isin(["terminated", "diverged"])]
        runs = unfinished["run"].dropna().astype(int).tolist()
        off_grid = len(unfinished) - len(runs)
        again = (
            f"to finish the {len(unfinished)} trial(s) that did not, start a new sweep with the same flags and "
            + (f"--runs {','.join(map(str, runs))} " if runs else "")
            + f"--name {name}-rest"
            + (f" ({off_grid} of them are off the study's grid: give their values instead)" if off_grid else "")
            if len(unfinished)
            else "nothing is left to run"
        )
        raise preflight.PreflightError(
            f"--resume: the experiment state of {name!r} is damaged "
            f"({type(exc).__name__}); what finished is in 'tune-alexnet export "
            f"{exp_uri}'; {again}"
        ) from None
    saved = read_settings(exp_uri)
    if saved is None:
        return SweepSettings(**{**asdict(s), "grid": s.grid, "name": name})
    saved = {k: v for k, v in saved.items() if k in SweepSettings.__dataclass_fields__}  # the record has more
    saved["grid"] = Grid(**{k: tuple(v) for k, v in saved["grid"].items()})
    saved["runs"] = tuple(saved.get("runs", ()))
    keep = {
        "address": s.address,
        "shared_storage": s.shared_storage,
        "allow_data_change": s.allow_data_change,
        "runtime": {**saved.get("runtime", {}), **s.runtime},
    }
    if s.gpus_per_trial is not None:
        keep["gpus_per_trial"] = s.gpus_per_trial
    if s.data_dir is not None:  # the data may have moved since
        keep["data_dir"] = s.data_dir
    return SweepSettings(**{**saved, **keep, "storage": s.storage, "name": name, "resume": True})


def _latest_experiment(root: str) -> str:
    """The newest experiment in `root` that has not finished (its table says so, or it has none yet)."""
    if is_remote(root) or not Path(root).is_dir():
        raise preflight.PreflightError(
            f"--resume without --name needs a local --storage folder that holds experiments; got {root}"
        )
    found = [p for p in Path(root).iterdir() if p.is_dir() and tune.Tuner.can_restore(str(p))]
    if not found:
        raise preflight.PreflightError(f"--resume: {root} holds no experiment to resume; start one without --resume")
    unfinished = [p for p in found if not _finished(p)]
    if not unfinished:
        names = ", ".join(sorted(p.name for p in found))
        raise preflight.PreflightError(
            f"--resume: every experiment in {root} has finished ({names}); pass --name "
            f"to resume one anyway (its errored trials are retried)"
        )
    return max(unfinished, key=lambda p: p.stat().st_mtime).name


def _finished(exp_dir: Path) -> bool:
    import pandas as pd

    try:
        status = pd.read_parquet(exp_dir / "results.parquet", columns=["status"])["status"]
    except Exception:  # no table yet, or a damaged one: treat it as unfinished
        return False
    return bool(status.isin(["terminated", "diverged"]).all())
