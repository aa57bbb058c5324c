"""Every default of the study and of a sweep, written once (docs/STUDY.md tells where each comes from).

The command line's --help, the sweep, the training function, the stopper and the
exporter all read them from here. A trial's config holds what defines its result
(TRIAL_DEFAULTS and the grid's five settings); how it runs (RUNTIME_DEFAULTS) travels
beside it, so it neither shows in trial names nor blocks changing it on --resume.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import sys
import tempfile
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path

# --- the study ---------------------------------------------------------------------------
NUM_CLASSES = 10  # CIFAR-10's classes: the network's outputs
# Optimizers, in the study's order: torch.optim's class and the settings beyond the learning rate
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
    # fp32 (the study's; on CUDA its matmuls and convolutions use TF32 unless --no-tf32) | bf16 (autocast, on CUDA
    # and on the CPU alike)
    # | auto (bf16 on CUDA, fp32 on CPU: the default of earlier versions, kept so their experiments resume alike)
    "precision": "fp32",
}
PRECISIONS = ("fp32", "bf16", "auto")

# How a trial runs: may change on --resume, never in the tables' grid columns.
RUNTIME_DEFAULTS = {
    "device": "auto",  # auto (the GPU Ray granted, else CPU) | cpu (train on CPU even if granted a GPU)
    "channels_last": "auto",  # true | false | auto (with bf16 autocast on CUDA only)
    "tf32": True,  # TF32 matmuls and convolutions on CUDA
    # eager | graph (forward, loss, backward and optimizer step replayed as one captured CUDA graph; CUDA only,
    # else eager with a warning) | compile (torch.compile the model)
    "step": "eager",
    "augment_chunk": 0,  # images augmented at once, ahead of the steps that use them; 0: one batch at a time
    "eval_batch_size": 1000,  # images per evaluation step (no gradients, so large is fine)
    "resume_every_s": 300.0,  # seconds between resume states (weights + optimizer); 0: every epoch
    "best_every_s": 30.0,  # at most one best-weights checkpoint this often (the last one always); 0: every gain
}
STEP_MODES = ("eager", "graph", "compile")

# --- where and how a sweep runs -----------------------------------------------------------
DEFAULT_STORAGE = "ray_results"
DEFAULT_GPU_SHARE = 0.25  # of one GPU per trial, when the cluster has (or can start) GPUs
# A packed trial's allocator may use this much of its share of the card: the rest holds its CUDA context (about
# 0.5 GB, outside the allocator). BENCHMARKS.md has the arithmetic for the cluster's cards.
GPU_MEMORY_CAP = 0.9
AUGMENT_BYTES_PER_IMAGE = 128 * 1024  # peak float temporaries of augmenting one image in a chunk (measured: 122 KB)
AUGMENT_MEMORY_SHARE = 0.25  # of a trial's GPU memory, at most, for its augmentation chunk
DEFAULT_CPUS_PER_TRIAL = 1.0
DEFAULT_MAX_FAILURES = 3  # restarts of a trial whose process died, from its last resume state
METRIC, MODE = "score", "max"  # what Tune ranks trials by: the best accuracy with the one tie-break (export.score)


@dataclass(frozen=True)
class Bound:
    """The sensible range of a number, from a flag or read back from an experiment folder: checked before
    anything starts, so that a 10**20 or an inf never reaches the training loop or the tables."""

    low: float
    high: float
    whole: bool = False  # a whole number
    above_low: bool = False  # `low` itself is not allowed (a learning rate of 0)
    or_zero: bool = False  # 0 is allowed besides [low, high] (no CPU for a trial that has a GPU)

    def allows(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if isinstance(value, int):  # a whole number of any size: no float conversion to overflow
            return (self.or_zero and value == 0) or (
                (value > self.low if self.above_low else value >= self.low) and value <= self.high
            )
        if not math.isfinite(value):
            return False
        if self.whole and value != int(value):
            return False
        if self.or_zero and value == 0:
            return True
        return (value > self.low if self.above_low else value >= self.low) and value <= self.high

    def text(self) -> str:
        kind = "a whole number" if self.whole else "a number"
        low = f"> {_shown(self.low)}" if self.above_low else f">= {_shown(self.low)}"
        return f"{'0 or ' if self.or_zero else ''}{kind} {low} and <= {_shown(self.high)}"


def _shown(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


BOUNDS = {
    "lr": Bound(0, 1e6, above_low=True),
    "batch_size": Bound(2, 65_536, whole=True),
    "epochs": Bound(1, 10_000, whole=True),
    "patience": Bound(1, 10_000, whole=True),
    "seed": Bound(0, 2**32 - 1, whole=True),
    "repeats": Bound(1, 1_000, whole=True),
    "subset": Bound(1, 1_000_000, whole=True),
    "width": Bound(0, 4, above_low=True),  # 1 is the study's network; 4 is already 16x its arithmetic
    "cpus_per_trial": Bound(0.01, 1_024, or_zero=True),
    "gpus_per_trial": Bound(0.01, 64, or_zero=True),
    "max_failures": Bound(0, 1_000, whole=True),
    "resume_every_s": Bound(0, 7 * 86_400),
    "best_every_s": Bound(0, 7 * 86_400),
    "augment_chunk": Bound(0, 1_000_000, whole=True),
    "eval_batch_size": Bound(1, 65_536, whole=True),
}


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
    # With resume: trial-defining values given again (flag name -> value); each must equal the experiment's own.
    asked: dict = field(default_factory=dict)


RUNTIME_CHOICES = {"device": ("auto", "cpu"), "channels_last": ("auto", True, False), "step": STEP_MODES}


def check(s: SweepSettings) -> None:
    """Every number and choice of a sweep within its bounds and types (ValueError naming the field), whether it
    came from flags, from code or from an experiment folder on --resume."""
    from .storage import not_utf8

    for dim in DIMENSIONS:
        values = getattr(s.grid, dim)
        if not isinstance(values, tuple) or not values:
            raise ValueError(f"grid.{dim}: {values!r}; allowed: a non-empty list")
        for v in values:
            _check_value(f"grid.{dim}", v, dim)
    study_runs = len(Grid())
    for run in s.runs:
        if not (isinstance(run, int) and not isinstance(run, bool) and 1 <= run <= study_runs):
            raise ValueError(f"runs: {run!r}; allowed: run numbers 1..{study_runs}")
    for name in ("epochs", "patience", "seed", "repeats", "cpus_per_trial", "max_failures"):
        _check_value(name, getattr(s, name), name)
    for name in ("subset", "gpus_per_trial"):
        if getattr(s, name) is not None:
            _check_value(name, getattr(s, name), name)
    for name in ("data_dir", "download_root", "storage", "name", "address", "mlflow", "wandb"):
        value = getattr(s, name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name}: {value!r}; allowed: text")
        if name != "wandb" and value and (unprintable(value) or not_utf8(value)):
            # as the flags refuse them (W&B's project: below): a record's NUL in data_dir failed deep in loading
            raise ValueError(f"{name}: '{clipped(ascii(value)[1:-1], 80)}'; allowed: UTF-8 text without control "
                             "characters")  # fmt: skip
    if s.mlflow is not None and (why := uri_problem(s.mlflow)):
        raise ValueError(f"mlflow: '{escaped(s.mlflow, 300, '...')}' ({why}); allowed: {TRACKING_URI_ALLOWED}")
    if s.wandb is not None and not wandb_project_ok(s.wandb):
        raise ValueError(f"wandb: '{clipped(printable(s.wandb), 40)}'; allowed: {WANDB_PROJECT_ALLOWED}")
    for name in ("shared_storage", "resume", "allow_data_change"):
        if not isinstance(getattr(s, name), bool):
            raise ValueError(f"{name}: {getattr(s, name)!r}; allowed: true or false")
    _check_overrides("trial", s.trial, TRIAL_DEFAULTS, {"precision": PRECISIONS})
    _check_overrides("runtime", s.runtime, RUNTIME_DEFAULTS, RUNTIME_CHOICES)


def _check_value(field_name: str, value, kind: str) -> None:
    if kind == "optimizer":
        ok, allowed = isinstance(value, str) and 0 < len(value) <= 64, "an optimizer name"
    elif kind in ("dropout", "batchnorm", "augment", "tf32"):
        ok, allowed = isinstance(value, bool), "true or false"
    else:  # a whole number is an int: a record's 20.0 was a float slice index, deep in the data's loading
        bound = BOUNDS[kind]
        ok, allowed = bound.allows(value) and (isinstance(value, int) or not bound.whole), bound.text()
    if not ok:
        raise ValueError(f"{field_name}: {value!r}; allowed: {allowed}")


def _check_overrides(where: str, given, defaults: dict, choices: dict) -> None:
    if not isinstance(given, dict):
        raise ValueError(f"{where}: {given!r}; allowed: a mapping of {', '.join(defaults)}")
    for key, value in given.items():
        if key not in defaults:
            continue  # a setting of another version: ignored, as the training function ignores it
        if key in choices:
            if not any(type(value) is type(c) and value == c for c in choices[key]):  # 1 is not True here
                raise ValueError(f"{where}.{key}: {value!r}; allowed: {', '.join(map(str, choices[key]))}")
        elif isinstance(defaults[key], bool) or key in BOUNDS:
            _check_value(f"{where}.{key}", value, key)


TRACKING_URI_ALLOWED = "a tracking URI such as http://host:5000, or sqlite:///file.db"
WANDB_PROJECT_MAX, WANDB_PROJECT_BANNED = 128, "/\\#?%:"  # W&B's own rules for a project name
WANDB_PROJECT_ALLOWED = (
    f"a W&B project name, not blank, at most {WANDB_PROJECT_MAX} characters, without control or format characters "
    f"or any of {' '.join(WANDB_PROJECT_BANNED)}"
)
CONTROLS = ("Cc", "Cf", "Zl", "Zp")  # categories of characters refused in names (Cf: a text direction, a joiner)


# Refused in paths: control characters, line breaks and the marks that reorder text on a terminal. Other format
# characters (the joiners of Persian or Hindi words and of emoji) are common in folder names; they print escaped.
TEXT_DIRECTION = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def unprintable(text: str) -> bool:
    """Whether `text` holds what a path may not: a control character, a line break or a text-direction mark."""
    return any(unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in TEXT_DIRECTION for c in text)


PATH_MAX = 4096  # bytes of a path the kernel takes, its ending NUL included (Linux's PATH_MAX)


def path_problem(value, local: bool = False) -> str | None:
    """Why `value` cannot name a folder or URI (a flag's value, or a Python API argument); None where it can.
    `local`: a local folder alone (--data-dir, --download-root), where `a://b` would be a folder of that name.
    A name that is not UTF-8 (the bytes of another encoding) cannot be passed on to Ray, pyarrow or the tables,
    so it is refused here rather than halfway. A relative path counts as the full path it becomes, and a path
    through a link as the place it leads to: that is where folders are made and what the tables name."""
    from .storage import locale_note, not_utf8

    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    kind = "a folder" if local else "a folder or URI"
    if not isinstance(value, str):  # bytes too: the tables and the console name a path as text
        return f"{escaped(repr(value), 80)}; allowed: {kind} as a str or os.PathLike"
    if not value.strip():
        return f"an empty path; allowed: {kind}"
    named = escaped(value, 300, "...")
    control = f"; allowed: {kind} without control characters such as a newline, a tab or a text-direction mark"
    if unprintable(value):  # (before ~ is looked up: a NUL there is os's ValueError)
        return f"invalid value '{named}' (it holds a control character){control}"
    utf8 = f"; allowed: a path{'' if local else ' or URI'} in UTF-8{locale_note()}"
    if spelled := not_utf8(value):
        return f"invalid value '{clipped(spelled, 300, '...')}'{utf8}"
    if "://" in value:
        return f"invalid value '{named}' (a URI); allowed: a local folder" if local else None
    if value.startswith("~") and value[1:2] in ("", "/") and not home().is_absolute():
        return f"invalid value '{named}' (HOME='{escaped(str(home()), 300, '...')}' is no full path); allowed: an absolute path"
    try:
        given = expand_user(value)  # not made normal: the kernel takes a/link/.. through the link
        given = given if os.path.isabs(given) else os.path.join(os.getcwd(), given)
    except OSError as exc:  # the working folder removed
        return (
            f"invalid value '{named}' ({exc.strerror} for the working folder, which a relative path starts from); "
            "allowed: an absolute path, or cd into a folder that exists"
        )
    if len(os.fsencode(given)) >= PATH_MAX:
        return (
            f"invalid value '{named}' ({len(os.fsencode(given)):,} bytes as a full path); allowed: a path of fewer "
            f"than {PATH_MAX} bytes, which the system takes"
        )
    step = ""
    for part in given.split("/")[1:]:  # each folder on the way, as the kernel walks it: x/link/.. goes through link
        step += "/" + part
        if os.path.islink(step) and not os.path.exists(step):  # a folder made there is made where it points
            return f"invalid value '{named}' ({escaped(step, 300, '...')} is a link to nothing); allowed: {kind}"
    for full in dict.fromkeys((os.path.abspath(given), os.path.realpath(given))):  # the tables name the real one
        if unprintable(full):
            return f"invalid value '{named}' (it holds a control character, as {escaped(full, 300, '...')}){control}"
        if spelled := not_utf8(full):
            return f"invalid value '{named}' (not UTF-8, as {clipped(spelled, 300, '...')}){utf8}"
    return None


CLIP_SLACK = 1024  # characters read past a cut, for a secret the cut would split: no credential is longer


def clipped(text: str, most: int, more: str = "") -> str:
    """`text` with its secrets hidden, then cut to `most` characters (`more` added where it was cut): cut first, a
    password cut before its '@' would no longer read as one, and be shown. Only `most` + CLIP_SLACK characters are
    read: hiding takes time growing with the square of a word's length, on a long run of URI-like words."""
    hidden = redacted(text[: most + CLIP_SLACK])
    return hidden if len(hidden) <= most and len(text) <= most + CLIP_SLACK else hidden[:most] + more


def escaped(text: str, most: int | None = None, more: str = "") -> str:
    """`text` on one line: each character that does not print spelled as Python does (\\n, \\t, \\x1b), its
    secrets hidden (redacted after the escaping, so a secret glued on by a control character is hidden too); with
    `most`, cut as clipped cuts."""
    if most is not None:
        return clipped(printable(text[: most + CLIP_SLACK]).replace("\t", "\\t"), most, more)
    return redacted(printable(text).replace("\t", "\\t"))


def uri_problem(text: str) -> str | None:
    """Why a URI does not parse (an unclosed [::1, a port that is no number or out of range); None where it does."""
    from urllib.parse import urlparse

    if "://" not in text:
        return None
    try:
        urlparse(text).port  # noqa: B018 - parsing it is the check
    except ValueError as exc:
        return str(exc).split(" as ")[0]  # not what it read as the port: that may be a password holding a '/'
    return None


def wandb_project_ok(text: str) -> bool:
    """A project name W&B accepts: its refusal comes only once the first trial starts, as a traceback, after the
    experiment folder is written; a name it mangles loses the tracking without a word."""
    if not text.strip() or len(text) > WANDB_PROJECT_MAX or any(c in WANDB_PROJECT_BANNED for c in text):
        return False
    return not any(unicodedata.category(c) in CONTROLS for c in text)


def from_record(record) -> SweepSettings:
    """The settings of an experiment's record (its JSON file), checked as flags are; ValueError names the field."""
    if not isinstance(record, dict):
        raise ValueError(f"{type(record).__name__} instead of a mapping of settings")
    fields = {
        k: v for k, v in record.items() if k in SweepSettings.__dataclass_fields__ and k not in ("resume", "asked")
    }
    grid = fields.get("grid", {})
    if not isinstance(grid, dict) or set(grid) != set(DIMENSIONS):
        raise ValueError(f"grid: {grid!r}; allowed: a mapping of {', '.join(DIMENSIONS)} to lists")
    if not all(isinstance(v, list) for v in grid.values()):
        raise ValueError("grid: every dimension must be a list")
    fields["grid"] = Grid(**{k: tuple(v) for k, v in grid.items()})
    runs = fields.get("runs", [])
    if not isinstance(runs, list):
        raise ValueError(f"runs: {runs!r}; allowed: a list of run numbers")
    fields["runs"] = tuple(runs)
    s = SweepSettings(**fields)
    check(s)
    return s


SETTINGS_FILE = "tune_alexnet_sweep.json"  # in the experiment folder: what --resume and the tables need
# Query parameters of a URI whose values are secrets: a name holding any of these, in any case (so "pass" covers
# password and passwd, "cred" credential, "sig" signature, "key" api_key and secret_key).
SECRET_PARAMS = ("token", "pass", "pw", "secret", "key", "auth", "sig", "cred", "session", "jwt", "bearer", "cookie",
                 "private")  # fmt: skip
REDACTED = "***"
_SCHEME = r"\b[A-Za-z][A-Za-z0-9+.-]*:[/\\]+"  # http://, and the mistyped http:/ and http:\\ alike
# A user part runs to the word's last @: a password typed in clear may hold / ? # : and @ itself.
_USER_PART = re.compile(rf"({_SCHEME})(\S*)@")
# USER:PASSWORD@ where the password holds a space: from a colon that is not a port's, to the line's last @.
_SPACED_PASSWORD = re.compile(rf"({_SCHEME}[^\s/\\:@\[\]]+:)(?!\d+(?![^/?#\s'\"]))[^@\n]*@")
# USER:PASSWORD@ with no scheme before it (user:pw@host, a user part cut by a space, or what follows http:/).
_BARE_PASSWORD = re.compile(r"(?:^|(?<=[\s'\"(=,<\[]))([^\s:@/\\'\"]+):(?![/\\])\S*@")
# name=value after ? & ; (a query) or \ (shown escaped after a control character), not after / (a folder of a
# local path may be named monkey=1); the value ends before the punctuation of the sentence around it (the colon of
# "--mlflow URI: ...", a closing quote).
_PARAM = re.compile(r"(?<=[?&;\\])([^=&;#?/\\\s'\"]+)=([^&;#\s]*?)(?=[:,.;'\")]*(?:[&;#\s]|$))")
_FRAGMENT = re.compile(r"(:[/\\]+[^#\s]*)#(\S+?)(?=[:,.;'\")]*(?:\s|$))")  # a fragment: nothing a server reads


def home() -> Path:
    """The home folder as Ray's own token loader finds it: HOME where it is set and not empty (blank space too, a
    relative path the token checks refuse), else this user's entry in the password database (Python alone would
    take an empty HOME for /)."""
    given = os.environ.get("HOME", "")
    return Path(given) if given else listed_home()


def expand_user(path: str) -> str:
    """`path` with a leading `~` made the home folder, as home() finds it (Python alone would take an empty HOME
    for /, and write there); `~user` as Python expands it."""
    if path == "~" or path.startswith("~/"):
        return str(home()) + path[1:]
    return os.path.expanduser(path)


def listed_home() -> Path:
    """This user's home in the password database."""
    import pwd

    try:
        return Path(pwd.getpwuid(os.getuid()).pw_dir)
    except KeyError:  # a uid with no entry (a container run as an arbitrary user): as Python takes it
        return Path(os.path.expanduser("~"))  # (the command line refuses this case first: home_problem)


def home_problem() -> str | None:
    """Why no home can be found, where neither HOME nor the password database names one (a container run as an
    arbitrary user): Ray cannot even be imported with HOME unset, and an empty one leaves its token nowhere."""
    if os.environ.get("HOME"):
        return None  # (a relative one, blank space too: the token checks refuse it in their words)
    import pwd

    try:
        pwd.getpwuid(os.getuid())
    except KeyError:
        return (f"this user (uid {os.getuid()}) has no home folder: HOME is empty or not set and the password "
                "database has no entry for the user; allowed: HOME set to a folder of this user's own")  # fmt: skip
    return None


def say(line: str) -> None:
    """A line on stderr that a closed terminal or pipe cannot turn into an error: every line the command prints of
    its own comes through here, or through `shown` on stdout."""
    with contextlib.suppress(OSError):
        print(shown(line), file=sys.stderr, flush=True)


_stdout_lost = False  # once stdout could not be written: the command goes on, and ends non-zero


def tell(text: str) -> None:
    """The command's answer on stdout (the files written, the summary), as `say` says a line on stderr: what its
    encoding cannot spell is escaped, and a stdout that cannot be written (a reader gone, a full disk) is let go,
    said once on stderr, so the command still ends as it would, its files whole and its other lines said, and
    exits non-zero (stdout_lost)."""
    global _stdout_lost
    if _stdout_lost:
        return
    line = shown(text)
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    with contextlib.suppress(LookupError):
        line = line.encode(encoding, "backslashreplace").decode(encoding)
    try:
        print(line, flush=True)
    except (OSError, ValueError) as exc:  # (ValueError: a stdout this process closed)
        _stdout_lost = True
        if not isinstance(exc, BrokenPipeError):  # a reader gone (`| head`): the user's own doing, no word
            say(f"tune-alexnet: warning: standard output cannot be written ({getattr(exc, 'strerror', None) or exc}); "
                "the rest of what the command prints there is dropped")  # fmt: skip
        with contextlib.suppress(OSError, ValueError, AttributeError):  # what is buffered goes nowhere, not into
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # a traceback as Python exits


def stdout_lost() -> bool:
    return _stdout_lost


SHOWN_LINE = 4096  # characters of a line the command prints: a refusal may name a value of 100 KB as typed


def shown(text: str) -> str:
    """`text` as the command prints it: no secret and no terminal control (text read from files, and the paths
    of folders, may hold escapes), each of its lines kept, each cut to SHOWN_LINE characters after its secrets are
    hidden (which takes time growing with the square of a long line of URI-like words: only so much is read)."""
    lines = redacted("\n".join(printable(line[: SHOWN_LINE + CLIP_SLACK]) for line in text.split("\n")))
    return "\n".join(line if len(line) <= SHOWN_LINE else line[:SHOWN_LINE] + "..." for line in lines.split("\n"))


def printable(text: str) -> str:
    """`text` with each character that does not print (a newline, an escape that would drive the terminal)
    spelled as Python does (\\n, \\x1b)."""
    return "".join(c if c.isprintable() or c == "\t" else c.encode("unicode_escape").decode("ascii") for c in text)


def redacted(uri: str) -> str:
    """`uri` as it may be shown, logged or stored: the password of its user part (user:***@), a user part
    that is a bare token (***@) and the values of query parameters that carry secrets (?token=***) hidden.
    By pattern, not by a URI parser, and erring on the side of hiding: text that does not parse as a URI is
    shown too (in the line refusing it), and so are URIs inside a longer text (a log line, an error)."""
    from urllib.parse import unquote

    hidden: list[str] = []  # each secret found, hidden too where the text names it again

    def user_part(m: re.Match) -> str:
        hidden.append(m[2].split(":", 1)[-1])
        return f"{m[1]}{m[2].split(':', 1)[0] + ':' if ':' in m[2] else ''}{REDACTED}@"

    def value(m: re.Match) -> str:  # a parameter's name as it reads once decoded (tok%65n is token)
        name = re.sub(r"[\x00-\x1f\x7f]", "", unquote(m[1])).lower()
        if not any(secret in name for secret in SECRET_PARAMS):
            return m[0]
        hidden.append(m[2])
        return f"{m[1]}={REDACTED}"

    text = _USER_PART.sub(user_part, uri)
    text = _SPACED_PASSWORD.sub(rf"\g<1>{REDACTED}@", text)
    text = _BARE_PASSWORD.sub(rf"\g<1>:{REDACTED}@", text)

    def fragment(m: re.Match) -> str:
        hidden.extend(p.split("=", 1)[-1] for p in re.split(r"[&;]", m[2]))  # name=value pairs, as a query has
        return f"{m[1]}#{REDACTED}"

    text = _FRAGMENT.sub(fragment, _PARAM.sub(value, text))
    secrets = {s for h in hidden for s in (h, unquote(h)) if len(s) >= 4}  # shorter: words, not secrets
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def without_credentials(uri: str) -> str:
    """A URI to store where others read it and yet use: its user part, secret query parameters and fragment
    left out rather than hidden, so that it loads with credentials from the environment (a redacted `***` would be
    sent as the secret)."""
    from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

    parts = urlsplit(uri)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if not any(secret in unquote(k).lower() for secret in SECRET_PARAMS)]  # fmt: skip
    netloc = parts.netloc.rpartition("@")[2]
    return redacted(urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, safe=":/"), "")))


class RedactedError(Exception):
    """An error whose message may name a URI: its secrets are hidden from the start, so that the command line,
    a caller of the Python API and a log alike never see them."""

    def __init__(self, *args):
        super().__init__(*(redacted(a) if isinstance(a, str) else a for a in args))


def is_uri(text: str) -> bool:
    """A URI (scheme://...), whose secrets are hidden when stored; a local path is kept as it is, whatever its
    folders are named (a path is an identity: two hidden alike would read as one)."""
    return "://" in text


def has_secret(uri: str | None) -> bool:
    """Whether `uri` holds something redacted() hides (then it is stored redacted, never in clear)."""
    return uri is not None and redacted(uri) != uri


def write_settings(exp_uri: str, s: SweepSettings, extra: dict | None = None) -> None:
    """The sweep's settings beside Tune's state, local or in a bucket, so --resume needs only the name."""
    record = {**asdict(s), **(extra or {})}
    record.pop("resume")
    record.pop("asked")
    if record["mlflow"] is not None:  # its secrets never in clear: --resume asks for the URI again (resume_settings)
        record["mlflow"] = redacted(record["mlflow"])
    if is_uri(record["storage"]):  # a bucket's ?secret_key=: --resume takes --storage as given
        record["storage"] = redacted(record["storage"])
    _write_record(exp_uri, record)


def keep_runtime(exp_uri: str, runtime: dict) -> None:
    """On --resume: the flags on how trials run, as this resume runs them, into the experiment's record, so that the
    next --resume keeps them."""
    record = read_settings(exp_uri)
    if record is None or record.get("runtime") == runtime:
        return
    _write_record(exp_uri, {**record, "runtime": runtime})


def _write_record(exp_uri: str, record: dict) -> None:
    """The record written whole or not at all: in a local folder, into a new file of its own (never through a
    link planted there) renamed over the old one; in a bucket, as one object."""
    import pyarrow.fs

    from .storage import is_remote, upload_limit, within

    data = json.dumps(record, indent=2).encode()
    if is_remote(exp_uri):  # bounded as every bucket call is: one that stalls held the sweep before its start

        def put() -> None:
            fs, path = pyarrow.fs.FileSystem.from_uri(exp_uri)
            fs.create_dir(path, recursive=True)
            with fs.open_output_stream(f"{path}/{SETTINGS_FILE}") as f:
                f.write(data)

        within(upload_limit(len(data)), put)
        return
    fs, path = pyarrow.fs.FileSystem.from_uri(exp_uri)
    fs.create_dir(path, recursive=True)
    fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{SETTINGS_FILE}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(path, SETTINGS_FILE))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_settings(exp_uri: str, strict: bool = False) -> dict | None:
    """The experiment's settings record, read as storage.read_json reads (a regular file inside the folder, no
    link followed, at most JSON_LIMIT bytes): an untrusted folder can neither block nor feed this a huge file.
    None where there is none, and where it is unreadable or not a JSON object, unless `strict`: then that
    raises OSError or ValueError saying why. Its fields are checked by `from_record`."""
    from .storage import JSON_LIMIT, reach, read_json, shown

    try:
        fs, path = reach(exp_uri)  # a bucket that does not answer is a TimeoutError (an OSError), not a hang
        record = read_json(fs, path, SETTINGS_FILE, JSON_LIMIT)
        if not isinstance(record, dict):
            raise ValueError(f"{SETTINGS_FILE} holds {shown(record)}; allowed: a JSON object of the sweep's settings")
        return record
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        if strict:
            raise
        return None
