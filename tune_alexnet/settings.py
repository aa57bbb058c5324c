"""Every default of the study and of a sweep, written once (docs/STUDY.md tells where each comes from).

The command line's --help, the sweep, the training function, the stopper and the
exporter all read them from here. A trial's config holds what defines its result
(TRIAL_DEFAULTS and the grid's five settings); how it runs (RUNTIME_DEFAULTS) travels
beside it, so it neither shows in trial names nor blocks changing it on --resume.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field

# --- the study ---------------------------------------------------------------------------
NUM_CLASSES = 10  # CIFAR-10's classes: the network's outputs
# Optimisers, in the study's order: torch.optim's class and the settings beyond the learning rate
# (PyTorch defaults for everything not named).
OPTIMIZERS: dict[str, tuple[str, dict]] = {
    "sgd": ("SGD", {"momentum": 0.9, "weight_decay": 1e-4}),
    "adam": ("Adam", {"weight_decay": 1e-4}),
    "rmsprop": ("RMSprop", {"weight_decay": 1e-4}),
}
LRS = (0.01, 0.001, 0.0001)
BATCH_SIZES = (32, 64, 128)
DROPOUTS = (True, False)  # the study ran dropout on first
BATCHNORMS = (False, True)  # and batch norm off first
EPOCHS = 100  # most epochs a run may train
PATIENCE = 5  # epochs in a row without a new best test accuracy that end a run

# What defines a trial's result besides the five grid settings: in the param space and the tables.
TRIAL_DEFAULTS = {
    "seed": 0,  # seeds weights, shuffling, augmentation and dropout
    "epochs": EPOCHS,
    "patience": PATIENCE,
    "augment": True,  # the study's training augmentation; off only for learning checks
    "width": 1.0,  # AlexNet width multiplier; 1 is the study's network
    "precision": "auto",  # fp32 | bf16 | auto (bf16 autocast on CUDA, fp32 on CPU): changes the numbers
}

# How a trial runs: may change on --resume, never in the tables' grid columns.
RUNTIME_DEFAULTS = {
    "device": "auto",  # auto (the GPU Ray granted, else CPU) | cpu (train on CPU even if granted a GPU)
    "channels_last": "auto",  # true | false | auto (on CUDA only)
    "tf32": True,  # TF32 matmuls and convolutions on CUDA
    "compile": False,  # torch.compile the model
    "eval_batch_size": 1000,  # images per evaluation step (no gradients, so large is fine)
    "resume_every_s": 300.0,  # seconds between resume states (weights + optimizer); 0: every epoch
}

# --- where and how a sweep runs -----------------------------------------------------------
DEFAULT_STORAGE = "ray_results"
DEFAULT_GPU_SHARE = 0.25  # of one GPU per trial, when the cluster has (or can start) GPUs
DEFAULT_CPUS_PER_TRIAL = 1.0
DEFAULT_MAX_FAILURES = 3  # restarts of a trial whose process died, from its last resume state
METRIC, MODE = "best_val_acc", "max"  # what Tune ranks trials by: the study's result


# The grid's dimensions in the study's nesting order (outermost first): its run numbers follow it.
DIMENSIONS = ("optimizer", "lr", "batch_size", "dropout", "batchnorm")


@dataclass(frozen=True)
class Grid:
    """Values swept along each grid dimension; a pinned dimension holds the user's values."""

    optimizer: tuple[str, ...] = tuple(OPTIMIZERS)
    lr: tuple[float, ...] = LRS
    batch_size: tuple[int, ...] = BATCH_SIZES
    dropout: tuple[bool, ...] = DROPOUTS
    batchnorm: tuple[bool, ...] = BATCHNORMS

    def values(self) -> dict[str, tuple]:
        return {d: getattr(self, d) for d in DIMENSIONS}

    def configs(self) -> list[dict]:
        """Every configuration, in the study's order."""
        return [dict(zip(DIMENSIONS, combo)) for combo in itertools.product(*self.values().values())]

    def __len__(self) -> int:
        n = 1
        for v in self.values().values():
            n *= len(v)
        return n


@dataclass
class SweepSettings:
    grid: Grid = field(default_factory=Grid)
    runs: tuple[int, ...] = ()  # the study's run numbers to run instead of the grid (e.g. 16, 12)
    epochs: int = EPOCHS
    patience: int = PATIENCE
    seed: int = 0  # the trials' seed; with repeats, seeds the draw of one seed per trial
    repeats: int = 1  # trials per grid point (Tune's num_samples), each with its own seed
    data_dir: str | None = None  # ImageFolder tree; None downloads CIFAR-10 with torchvision
    download_root: str | None = None  # where torchvision's CIFAR-10 goes
    subset: int | None = None  # train images per class; None is the whole set
    storage: str = DEFAULT_STORAGE  # local folder or s3://, gs:// URI for experiments
    name: str | None = None  # experiment folder name; None makes a dated one
    address: str | None = None  # Ray cluster to join; None starts an embedded local Ray
    cpus_per_trial: float = DEFAULT_CPUS_PER_TRIAL
    gpus_per_trial: float | None = None  # None: DEFAULT_GPU_SHARE if the cluster has or can start GPUs, else 0
    max_failures: int = DEFAULT_MAX_FAILURES
    shared_storage: bool = False  # the user vouches that a local --storage path is shared by every node
    resume: bool = False
    allow_data_change: bool = False  # resume on data that differs from the experiment's (classes, counts, pixels)
    mlflow: str | None = None  # MLflow tracking URI to log every trial to, under an experiment named after the sweep
    wandb: str | None = None  # Weights & Biases project to log every trial to
    trial: dict = field(default_factory=dict)  # overrides of TRIAL_DEFAULTS (width, precision, augment)
    runtime: dict = field(default_factory=dict)  # overrides of RUNTIME_DEFAULTS


SETTINGS_FILE = "tune_alexnet_sweep.json"  # in the experiment folder: what --resume and the tables need


def write_settings(exp_uri: str, s: SweepSettings, extra: dict | None = None) -> None:
    """The sweep's settings beside Tune's state, local or in a bucket, so --resume needs only the name."""
    import pyarrow.fs

    record = {**asdict(s), **(extra or {})}
    record.pop("resume")
    fs, path = pyarrow.fs.FileSystem.from_uri(exp_uri)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{SETTINGS_FILE}") as f:
        f.write(json.dumps(record, indent=2).encode())


def read_settings(exp_uri: str) -> dict | None:
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(exp_uri)
        with fs.open_input_stream(f"{path}/{SETTINGS_FILE}") as f:
            return json.loads(f.readall().decode())
    except (OSError, ValueError):
        return None
