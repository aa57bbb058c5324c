"""What the parts of bench/device.py share: the card, the arithmetic, the arrays, the report callback, processes.

Importing this module first makes a checkout with nothing installed importable (the GPU machine gets the
checkout alone, on PYTHONPATH or not), so every bench module that runs there imports it before the package.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runs from a checkout with nothing installed
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from tune_alexnet.data import Cifar, load_cifar10  # noqa: E402
from tune_alexnet.model import AlexNet  # noqa: E402

STUDY_TRAIN_IMAGES = 50_000
# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' datasheets, matched in this
# order against torch.cuda.get_device_name (so "H100 PCIe" before "H100", "A100" and "A10G" before "A10").
# The A10G (AWS G5) is not the A10: it has fewer tensor TFLOP/s (70) than the A10's 125.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200 NVL", 836.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
)
ARRAY_NAMES = ("train_x", "train_y", "test_x", "test_y")


class OutOfTime(Exception):
    """Raised from a report callback: the next epoch would end after the part's deadline."""


# --- the card and the arithmetic --------------------------------------------------------------------------


def card_peak_flops(name: str) -> float | None:
    """The card's dense bf16 peak in FLOP/s, or None for a card the table does not know."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops * 1e12
    return None


def forward_flops(width: float = 1.0) -> int:
    """FLOPs of one forward pass of one 32x32 image: 2 x the multiply-adds of every convolution and linear
    layer, from the layer shapes (bias, BN, ReLU, pooling and the loss add well under 1% and are left out)."""
    model = AlexNet(dropout=False, batchnorm=False, width=width).eval()
    total = 0

    def count(module, _inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += 2 * output.numel() * (module.in_channels // module.groups) * kh * kw
        else:
            total += 2 * module.in_features * module.out_features * output.shape[0]

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    return total


def device_of_this_machine() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def card_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores): no GPU"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --- text and files -----------------------------------------------------------------------------------------


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


ROWS_FILE = "rows.jsonl"  # in the call's output folder: every measured row, appended as it is measured
ROWS: list[Path] = []  # that file, once the runner has set it


def emit(part: str, values: dict) -> None:
    """One measured row into the output folder at once, so that a later fault (a sticky CUDA error, the wall-clock
    stop) loses no number measured before it."""
    if ROWS:
        with open(ROWS[0], "a") as f:
            f.write(json.dumps({"part": part, **values}, default=str) + "\n")


def release_memory() -> None:
    """What a part or a row leaves on the card, returned to it; called inside the guards (a sticky CUDA error
    raises here too)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def record(workdir: Path, part: str, values: dict) -> None:
    """A part's measured values, for the parts after it (the step choice, the study projection), and into the
    output folder's rows."""
    (Path(workdir) / f"{part}.json").write_text(json.dumps(values))
    emit(part, {"recorded": values})


def recorded(workdir: Path, part: str) -> dict:
    """What `record` kept for a part; empty when that part did not run (or not in this call)."""
    path = Path(workdir) / f"{part}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def decode(data_dir: str) -> Cifar:
    """load_cifar10 without a progress bar (so without tqdm, which a bare GPU image may lack)."""
    return load_cifar10(data_dir, progress=False)


def arrays_dir(workdir: Path) -> Path:
    """Where the runner saves the decoded set for the parts' worker processes."""
    return Path(workdir) / "arrays"


def save_arrays(data: Cifar, folder: Path) -> None:
    """The decoded set once, as .npy files every worker process maps instead of decoding again."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ARRAY_NAMES:
        np.save(folder / f"{name}.npy", getattr(data, name))
    (folder / "meta.json").write_text(json.dumps({"classes": list(data.classes), "source": data.source}))


def load_arrays(folder: Path, train_images: int | None = None) -> Cifar:
    meta = json.loads((Path(folder) / "meta.json").read_text())
    arrays = {name: np.load(Path(folder) / f"{name}.npy", mmap_mode="r") for name in ARRAY_NAMES}
    if train_images is not None:
        arrays["train_x"], arrays["train_y"] = arrays["train_x"][:train_images], arrays["train_y"][:train_images]
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    return Cifar(**arrays, classes=tuple(meta["classes"]), source=meta["source"])


def spread_subset(data: Cifar, train: int, test: int | None = None) -> Cifar:
    """About `train` (and `test`) images taken at even steps through the set, so that every class is in them
    (an ImageFolder set is sorted by class)."""

    def every(x: np.ndarray, y: np.ndarray, n: int | None) -> tuple[np.ndarray, np.ndarray]:
        step = max(1, len(x) // n) if n else 1
        return x[::step][:n], y[::step][:n]

    train_x, train_y = every(data.train_x, data.train_y, train)
    test_x, test_y = every(data.test_x, data.test_y, test)
    return Cifar(train_x, train_y, test_x, test_y, data.classes, data.source)


def train_images(arrays: Path) -> int:
    return int(np.load(Path(arrays) / "train_y.npy", mmap_mode="r").shape[0])


# --- the report callback --------------------------------------------------------------------------------------


class LocalStore:
    """A report callback that keeps every epoch's metrics and persists each checkpoint folder the way Tune
    does on local storage: a copy into the trial's folder, timed by the training function as report_s.

    With a deadline, it ends the run (OutOfTime) when the next epoch, as long as the last one (wall time
    between two reports; for the first, its own timings, without the run's setup), would end after it.
    With `keep_last`, older copies are deleted (a long run would fill the disk otherwise); without a `root`,
    checkpoints are not kept at all (a run whose metrics alone matter). `echo` makes a line to print per epoch."""

    def __init__(
        self,
        root: Path | None,
        deadline: float | None = None,
        log: Path | None = None,
        keep_last: bool = False,
        echo: Callable[[dict], str] | None = None,
    ):
        self.root, self.deadline, self.log, self.keep_last, self.echo = root, deadline, log, keep_last, echo
        if root is not None:
            self.root = Path(root)
            self.root.mkdir(parents=True, exist_ok=True)
        self.epochs: list[dict] = []
        self._last: float | None = None
        self._copies: list[Path] = []

    def __call__(self, metrics: dict, directory: str | None) -> None:
        if self.echo is not None:
            print(self.echo(metrics), flush=True)
        began = time.perf_counter()
        row = {k: v for k, v in metrics.items() if v is None or isinstance(v, (bool, int, float, str))}
        row["bytes"] = self._persist(directory)
        row["own_report_s"] = time.perf_counter() - began  # what the next epoch's report_s measures
        self.epochs.append(row)
        if self.log is not None:
            with open(self.log, "a") as f:
                f.write(json.dumps(row) + "\n")
        now = time.time()
        if self._last is None:
            epoch_s = sum(row.get(k) or 0.0 for k in ("train_s", "eval_s", "checkpoint_s", "own_report_s"))
        else:
            epoch_s = now - self._last
        self._last = now
        if self.deadline is not None and now + epoch_s > self.deadline:
            raise OutOfTime(row["epoch"])

    def _persist(self, directory: str | None) -> int:
        """Copies a checkpoint folder into the trial's folder; its bytes."""
        if directory is None or self.root is None:
            return 0
        dest = self.root / f"checkpoint_{len(self.epochs):06d}"
        shutil.copytree(directory, dest)
        if self.keep_last:
            for old in self._copies:
                shutil.rmtree(old, ignore_errors=True)
            self._copies = []
        self._copies.append(dest)
        return folder_bytes(dest)


# --- runs in processes of their own -----------------------------------------------------------------------------


def worker_setup(threads: int, memory_fraction: float) -> None:
    """A run's process: its CPU threads and, on a GPU shared with other runs, its share of the memory."""
    torch.set_num_threads(threads)
    if torch.cuda.is_available() and memory_fraction < 1:
        torch.cuda.set_per_process_memory_fraction(memory_fraction, 0)


def logged_run(train: Callable[[], None], log: Path) -> None:
    """Runs `train` and appends how it ended to its JSON-lines log: finished, cut (the deadline), or error."""
    end: dict = {"end": "finished"}
    try:
        train()
    except OutOfTime:
        end = {"end": "cut"}
    except Exception as exc:
        traceback.print_exc()
        end = {"end": "error", "detail": f"{type(exc).__name__}: {exc}"}
    with open(log, "a") as f:
        f.write(json.dumps(end) + "\n")


def run_processes(jobs: list[tuple[Callable, tuple]], deadline: float) -> None:
    """Each (target, args) in a process of its own, all at once; those still running a little after the
    deadline (their runs end themselves before it) are terminated.

    The processes fork from a server process that has imported torch, the targets' modules and the running
    script's once (and has not touched CUDA, so each process starts its own CUDA context), instead of each
    importing them again."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", __name__, *_script_module(), *sorted({t.__module__ for t, _ in jobs})])
    # The server finds bench/ and the checkout through its environment: it is given no sys.path of ours.
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    ours = [p for p in (str(Path(__file__).resolve().parent), str(ROOT)) if p not in paths]
    os.environ["PYTHONPATH"] = os.pathsep.join(ours + paths)
    start_method = mp.get_start_method()
    procs = [ctx.Process(target=_child, args=(start_method, target, args)) for target, args in jobs]
    for p in procs:
        p.start()
    hard_stop = deadline + (10.0 if torch.cuda.is_available() else 5.0)
    for p in procs:
        p.join(timeout=max(0.0, hard_stop - time.time()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)


def _script_module() -> list[str]:
    """The running bench script as a module name (its imports are what each process re-runs it for)."""
    main_file = getattr(sys.modules["__main__"], "__file__", None)
    script = Path(main_file).resolve() if main_file else None
    return [script.stem] if script is not None and script.parent == Path(__file__).resolve().parent else []


def _child(start_method: str, target: Callable, args: tuple) -> None:
    """A process of run_processes: the processes it starts (a DataLoader's workers) start as the parent's
    would (fork on Linux), not through a forkserver of their own."""
    mp.set_start_method(start_method, force=True)
    target(*args)


def read_log(log: Path) -> tuple[list[dict], dict]:
    """A run's epochs and how it ended ("killed" when its process left no end line)."""
    lines = [json.loads(line) for line in Path(log).read_text().splitlines()] if Path(log).exists() else []
    return [r for r in lines if "epoch" in r], next((r for r in lines if "end" in r), {"end": "killed"})


def finish_reason(last: dict, patience: int) -> str:
    """Why a finished run stopped, from its last epoch's metrics."""
    if last.get("diverged"):
        return "diverged"
    return "plateau" if last["epochs_since_best"] >= patience else "epoch limit"


def median_epoch_s(epochs: list[dict]) -> float:
    return statistics.median(r["train_s"] + r["eval_s"] for r in epochs)
