"""The study as a Tune experiment: param space, resources, stopper, checkpoints, restore.

Knows nothing of layers or optimisers: trials run `train.train_cifar`.
Execution settings (where, how many resources) stay out of the trial config,
which holds only what defines a trial's result.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import export
from .data import Cifar, load_cifar10
from .grid import DIMENSIONS, Grid, study_config
from .stopper import DEFAULT_MAX_EPOCHS, DEFAULT_PATIENCE, PlateauStopper
from .train import DEFAULTS, train_cifar

log = logging.getLogger("tune_alexnet.sweep")
SETTINGS_FILE = "tune_alexnet_sweep.json"  # in the experiment folder: what --resume needs to rebuild the sweep
DEFAULT_STORAGE = "ray_results"
DEFAULT_GPU_SHARE = 0.25  # of one GPU per trial, when the cluster has GPUs
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "glusterfs", "beegfs",
                       "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs", "efs", "9p", "virtiofs")


class SweepError(Exception):
    """A reason not to start (or resume) a sweep, as one line for the command line."""


@dataclass
class SweepSettings:
    grid: Grid = field(default_factory=Grid)
    runs: tuple[int, ...] = ()  # the study's run numbers to run instead of the grid (e.g. 16, 12)
    epochs: int = DEFAULT_MAX_EPOCHS  # most epochs per trial
    patience: int = DEFAULT_PATIENCE  # epochs without a new best val_acc before a trial stops
    seed: int = 0  # the trials' seed; with repeats, seeds the draw of one seed per trial
    repeats: int = 1  # trials per grid point (Tune's num_samples), each with its own seed
    data_dir: str | None = None  # ImageFolder tree; None downloads CIFAR-10 with torchvision
    download_root: str | None = None  # where torchvision's CIFAR-10 goes
    subset: int | None = None  # train images per class; None is the whole set
    storage: str = DEFAULT_STORAGE  # local folder or s3://, gs:// URI for experiments
    name: str | None = None  # experiment folder name; None makes a dated one
    address: str | None = None  # Ray cluster to join; None starts an embedded local Ray
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None  # None: DEFAULT_GPU_SHARE if the cluster has GPUs, else 0
    max_failures: int = 3  # restarts of a trial whose process died, from its last checkpoint
    shared_storage: bool = False  # the user vouches that a local --storage path is shared by every node
    resume: bool = False
    trial: dict = field(default_factory=dict)  # overrides of train.DEFAULTS (precision, compile, width, ...)


def storage_uri(storage: str) -> str:
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def trial_space(s: SweepSettings) -> dict:
    """Tune's param space: the grid's five dimensions plus the fixed trial settings."""
    from ray import tune

    if s.runs:  # chosen runs of the study: one grid dimension over run numbers, the five values looked up
        space = {"run": tune.grid_search(list(s.runs))}
        space.update({dim: tune.sample_from(_run_value(dim)) for dim in DIMENSIONS})
    else:
        space = {dim: tune.grid_search(list(values)) for dim, values in s.grid.values().items()}
    space.update({**DEFAULTS, **s.trial, "epochs": s.epochs, "patience": s.patience})
    space["seed"] = tune.randint(0, 2**31 - 1) if s.repeats > 1 else s.seed
    return space


def _run_value(dim: str):
    return lambda spec: study_config(spec.config.run)[dim]


def run_sweep(s: SweepSettings, data: Cifar | None = None) -> tuple[str, export.Experiment]:
    """Start (or resume) the sweep, wait for it, export its table; returns (experiment path, experiment)."""
    import ray
    from ray import tune

    root = storage_uri(s.storage)
    _leave_job_working_dir()
    if s.resume:
        s = _settings_for_resume(s, root)
    name = s.name or time.strftime("alexnet-%Y%m%d-%H%M%S")
    exp_path = f"{root.rstrip('/')}/{name}"
    _check_storage(root, exp_path, s.resume)
    if data is None:
        data = load_cifar10(s.data_dir, s.subset, s.download_root)
    log.info("data: %s: %d train, %d test images", data.source, len(data.train_x), len(data.test_x))

    started_ray = not ray.is_initialized()
    address = s.address or os.environ.get("RAY_ADDRESS") or "local"
    if started_ray:
        ray.init(address=address, logging_level=logging.WARNING)
    try:
        gpus = s.gpus_per_trial
        if gpus is None:
            gpus = DEFAULT_GPU_SHARE if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        _check_cluster(root, s, gpus, joined=address != "local")
        trainable = tune.with_resources(tune.with_parameters(train_cifar, data=data),
                                        {"cpu": s.cpus_per_trial, "gpu": gpus})
        if s.resume:
            tuner = tune.Tuner.restore(exp_path, trainable, resume_errored=True)
        else:
            _write_settings(exp_path, s, name)
            tuner = tune.Tuner(trainable, param_space=trial_space(s), tune_config=_tune_config(s),
                               run_config=_run_config(s, root, name))
        results = tuner.fit()
    finally:
        if started_ray:
            ray.shutdown()
    experiment, written = export.export(results.experiment_path)
    if "://" not in results.experiment_path:
        from .report import write_report

        written.append(write_report(experiment))
    for path in written:
        print(f"tune-alexnet: wrote {path}", file=sys.stderr)
    return results.experiment_path, experiment


def _leave_job_working_dir() -> None:
    """Under `ray job submit --working-dir`, Ray may delete that folder while the job still runs in it
    (ray-project/ray#52343), and Tune's final os.getcwd() then fails; paths here are absolute, so move out."""
    try:
        cwd = os.getcwd()
    except FileNotFoundError:
        cwd = ""
    if not cwd or "/runtime_resources/working_dir_files/" in cwd:
        os.chdir(Path.home())


def _tune_config(s: SweepSettings):
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    return tune.TuneConfig(num_samples=s.repeats, search_alg=BasicVariantGenerator(random_state=s.seed))


def _run_config(s: SweepSettings, root: str, name: str):
    from ray import tune

    return tune.RunConfig(
        name=name,
        storage_path=root,
        stop=PlateauStopper(s.patience, s.epochs),
        # Tune keeps the best checkpoint by val_acc and always the latest one (to resume from).
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_acc",
                                                checkpoint_score_order="max"),
        failure_config=tune.FailureConfig(max_failures=s.max_failures),
        # Each trial's stdout/stderr are written in its working dir and, with sync_artifacts, copied into the
        # trial folder in storage, so the logs stay with the experiment (and reach S3 on a cluster).
        log_to_file=True,
        sync_config=tune.SyncConfig(sync_artifacts=True),
    )


def _write_settings(exp_path: str, s: SweepSettings, name: str) -> None:
    if "://" in exp_path:
        return  # remote storage: --resume then needs the same flags again
    Path(exp_path).mkdir(parents=True, exist_ok=True)
    record = {**asdict(s), "name": name}
    record.pop("resume")
    Path(exp_path, SETTINGS_FILE).write_text(json.dumps(record, indent=2))


def _settings_for_resume(s: SweepSettings, root: str) -> SweepSettings:
    """The interrupted sweep's own settings. Tune restores trials as they were (resources and failure
    budget included); of ours only the cluster address and the data's location may change."""
    from ray import tune

    name = s.name or _latest_experiment(root)
    exp_path = f"{root.rstrip('/')}/{name}"
    if not tune.Tuner.can_restore(exp_path):
        raise SweepError(f"--resume: no experiment named {name!r} in {root}; start it without --resume, "
                         f"or pass the --name of one that exists")
    record_file = Path(exp_path, SETTINGS_FILE)
    if "://" in exp_path or not record_file.is_file():
        return SweepSettings(**{**asdict(s), "name": name})
    saved = json.loads(record_file.read_text())
    saved["grid"] = Grid(**{k: tuple(v) for k, v in saved["grid"].items()})
    saved["runs"] = tuple(saved.get("runs", ()))
    keep = {k: getattr(s, k) for k in ("address", "cpus_per_trial", "gpus_per_trial", "max_failures", "shared_storage")}
    if s.data_dir is not None:  # the data may have moved since
        keep["data_dir"] = s.data_dir
    return SweepSettings(**{**saved, **keep, "storage": s.storage, "name": name, "resume": True})


def _latest_experiment(root: str) -> str:
    if "://" in root or not Path(root).is_dir():
        raise SweepError(f"--resume without --name needs a local --storage folder that holds experiments; got {root}")
    from ray import tune

    found = [p for p in Path(root).iterdir() if p.is_dir() and tune.Tuner.can_restore(str(p))]
    if not found:
        raise SweepError(f"--resume: {root} holds no experiment to resume; start one without --resume")
    return max(found, key=lambda p: p.stat().st_mtime).name


def _check_storage(root: str, exp_path: str, resume: bool) -> None:
    from ray import tune

    if "://" in root:
        return
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        probe = Path(root, f".tune-alexnet-write-test-{os.getpid()}")
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise SweepError(f"--storage {root} is not writable ({exc.strerror}); allowed: a folder you can write, "
                         f"or an s3:// or gs:// URI") from None
    if not resume and Path(exp_path).exists() and (tune.Tuner.can_restore(exp_path) or any(Path(exp_path).iterdir())):
        raise SweepError(f"an experiment named {Path(exp_path).name!r} already exists in {root}; "
                         f"continue it with --resume, or start a new one with another --name")


def _check_cluster(root: str, s: SweepSettings, gpus: float, joined: bool) -> None:
    """Refuse, before any trial starts, a node-local storage path that other nodes' trials would write to."""
    import ray

    if "://" in root or s.shared_storage or _on_network_filesystem(root):
        return
    problem = local_storage_problem(root, ray.nodes(), {"CPU": s.cpus_per_trial, "GPU": gpus}, joined)
    if problem:
        raise SweepError(f"--storage {root} is a local folder but {problem}; use --storage s3://BUCKET/PATH "
                         f"(or gs://), a shared filesystem mount, or --shared-storage if {root} is the same folder "
                         f"on every node")


def local_storage_problem(root: str, nodes: list[dict], per_trial: dict, joined: bool) -> str | None:
    """Why trials could not all write to a local `root`: several nodes now, or (on a cluster we joined, which
    may autoscale) no node up yet that can hold one trial, so trials will run on machines started later."""
    alive = [n for n in nodes if n.get("Alive")]
    if len(alive) > 1:
        return f"this Ray cluster has {len(alive)} nodes, whose trials cannot write there"
    fits = any(all(n.get("Resources", {}).get(k, 0) >= v for k, v in per_trial.items() if v > 0) for n in alive)
    if joined and not fits:
        wants = ", ".join(f"{v:g} {k}" for k, v in per_trial.items() if v > 0)
        return (f"no node of this cluster has the {wants} a trial asks for yet, so trials will run on nodes "
                f"started later, which cannot write there")
    return None


def _on_network_filesystem(path: str) -> bool:
    """Whether `path` lies on a filesystem that other machines can mount too (from /proc/mounts)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return False
    best, fstype = "", ""
    for mount_point, kind in mounts:
        if (path == mount_point or path.startswith(mount_point.rstrip("/") + "/")) and len(mount_point) > len(best):
            best, fstype = mount_point, kind
    return fstype in NETWORK_FILESYSTEMS
