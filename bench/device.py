"""One call on a GPU machine: throughput, packing, checkpoint cost and fidelity, each as a Markdown table.

A GPU may be lent for a few minutes only, without Ray and without a network, so everything here is plain
PyTorch from the checkout (`train.train_cifar` with a report callback of its own) and every part stops on its
own deadline inside one wall-clock budget (data decoding included):

(a) throughput: training images/s of the original loop (bench/throughput.py's `original_epoch`: per-image PIL
    transforms, DataLoader(num_workers=0), fp32) and of this project's path (`train.train_epoch` with the
    sweep's defaults for the device) at batch 32, 64 and 128, training only, with the share of the card's
    dense bf16 peak;
(b) packing: K trials sharing the GPU, each in its own process with its CUDA memory capped at 1/K, as Ray's
    fractional GPUs run them; every process trains for the same window after all K have warmed up, and the
    aggregate is the sum of their images/s;
(c) checkpoint share: what writing and persisting checkpoints costs per epoch on this machine, for SGD and
    Adam at full width, from the training function's own metrics (checkpoint_s, report_s);
(d) fidelity: study runs trained with the study's full recipe, concurrently on the one GPU at 1/4 of its
    memory each, until they finish or the budget ends; a run cut short says so and gives no final number.

    bash bench/device.sh                        # on the GPU machine; results in $OUT (default ./device-out)
    python bench/device.py --smoke --data-dir ../shared/data/cifar10-mini --out /tmp/device-smoke   # CPU check
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):  # runs from a checkout with nothing installed
    if _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np  # noqa: E402
import throughput  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from tune_alexnet.data import Cifar, load_cifar10  # noqa: E402
from tune_alexnet.grid import study_config  # noqa: E402
from tune_alexnet.model import AlexNet  # noqa: E402
from tune_alexnet.settings import RUNTIME_DEFAULTS, TRIAL_DEFAULTS  # noqa: E402
from tune_alexnet.train import make_optimizer, to_device_nchw, train_cifar, train_epoch  # noqa: E402

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
DEFAULT_BUDGET_S = 480.0
SMOKE_BUDGET_S = 50.0
RESERVE_S = 20.0  # left at the end for stopping the fidelity runs, writing the summary and cleaning up
# Each part's share of the time left when it starts: about 1.5, 2 and 0.8 minutes of an 8-minute call,
# fidelity the rest. Time a part leaves unused passes to the next one. A smoke run (a check, not a
# measurement: its windows are fixed and short) gives each part at least its floor in seconds, so that a busy
# machine still runs every point of (a) to (c), and the fidelity runs reach their first epochs.
PART_SHARES = (("throughput", 0.21, 60.0), ("packing", 0.35, 60.0), ("checkpoint", 0.23, 60.0), ("fidelity", 1.0, 20.0))
FIDELITY_RUNS = (16, 12, 62, 79)  # SGD's best, SGD at batch 128, Adam's best, an RMSprop failure
CHECKPOINT_RUNS = (("sgd", 12), ("adam", 48))  # the same settings but the optimizer: lr 0.01, batch 128, BN


class OutOfTime(Exception):
    """Raised from a report callback: the next epoch would end after the part's deadline."""


# --- small helpers --------------------------------------------------------------------------------------


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


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def device_of_this_machine() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def card_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores): no GPU"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decode(data_dir: str) -> Cifar:
    """load_cifar10 without a progress bar (so without tqdm, which a bare GPU image may lack)."""
    return load_cifar10(data_dir, progress=False)


def save_arrays(data: Cifar, folder: Path) -> None:
    """The decoded set once, as .npy files every worker process maps instead of decoding again."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train_x", "train_y", "test_x", "test_y"):
        np.save(folder / f"{name}.npy", getattr(data, name))
    (folder / "meta.json").write_text(json.dumps({"classes": list(data.classes), "source": data.source}))


def load_arrays(folder: Path, train_images: int | None = None) -> Cifar:
    meta = json.loads((Path(folder) / "meta.json").read_text())
    arrays = {
        name: np.load(Path(folder) / f"{name}.npy", mmap_mode="r")
        for name in ("train_x", "train_y", "test_x", "test_y")
    }
    if train_images is not None:
        arrays["train_x"], arrays["train_y"] = arrays["train_x"][:train_images], arrays["train_y"][:train_images]
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    return Cifar(**arrays, classes=tuple(meta["classes"]), source=meta["source"])


class LocalStore:
    """A report callback that keeps every epoch's metrics and persists each checkpoint folder the way Tune
    does on local storage: a copy into the trial's folder, timed by the training function as report_s.

    With a deadline, it ends the run (OutOfTime) when the next epoch, as long as the last one (wall time
    between two reports; for the first, its own timings, without the run's setup), would end after it.
    With `keep_last`, older copies are deleted (a long run would fill the disk otherwise)."""

    def __init__(self, root: Path, deadline: float | None = None, log: Path | None = None, keep_last: bool = False):
        self.root, self.deadline, self.log, self.keep_last = Path(root), deadline, log, keep_last
        self.root.mkdir(parents=True, exist_ok=True)
        self.epochs: list[dict] = []
        self._last: float | None = None
        self._copies: list[Path] = []

    def __call__(self, metrics: dict, directory: str | None) -> None:
        began = time.perf_counter()
        row = {k: v for k, v in metrics.items() if v is None or isinstance(v, (bool, int, float, str))}
        row["bytes"] = 0
        if directory is not None:
            dest = self.root / f"checkpoint_{len(self.epochs):06d}"
            shutil.copytree(directory, dest)
            row["bytes"] = folder_bytes(dest)
            if self.keep_last:
                for old in self._copies:
                    shutil.rmtree(old, ignore_errors=True)
                self._copies = []
            self._copies.append(dest)
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


def _collect(results, kind: str, point: int, n: int, until: float, workers: list) -> dict[int, tuple]:
    """n messages of `kind` for `point` from the workers, by worker index; an error message, a worker that
    died or the time running out raise."""
    got: dict[int, tuple] = {}
    while len(got) < n:
        try:
            msg = results.get(timeout=1.0)
        except queue.Empty:
            dead = [i for i, w in enumerate(workers) if not w.is_alive()]
            if dead:
                raise RuntimeError(
                    f"worker process(es) {dead} exited (exit codes {[workers[i].exitcode for i in dead]})"
                ) from None
            if time.time() > until:
                raise TimeoutError(f"no '{kind}' from {n - len(got)} worker process(es) in time") from None
            continue
        if msg[0] == "error" and msg[2] == point:
            raise RuntimeError(f"worker {msg[1]}: {msg[3]}")
        if msg[0] == kind and msg[2] == point:
            got[msg[1]] = msg[3:]
    return got


# --- (a) throughput -------------------------------------------------------------------------------------


def part_throughput(data: Cifar, args, deadline: float) -> str:
    device = device_of_this_machine()
    batches = args.batch_sizes
    n = min(len(data.train_x), args.images)
    x, y = data.train_x[:n], data.train_y[:n]
    measurements = 2 * len(batches)
    overhead = 3.0 if device.type == "cuda" else 0.5  # model build, warm-up, cudnn autotuning per measurement
    window = args.window or max(0.2, min(10.0, (deadline - time.time()) / measurements - overhead))
    fwd = forward_flops(args.width)
    peak = card_peak_flops(card_name()) if device.type == "cuda" else None
    rt = throughput.project_runtime(device)
    rates: dict[tuple[str, int], float] = {}
    for path in ("original", "project"):
        for bs in batches:
            if time.time() + window + overhead > deadline:
                continue
            if path == "original":
                rates[path, bs] = throughput.original_epoch(x, y, bs, device, width=args.width, seconds=window)
            else:
                rates[path, bs] = throughput.project_epoch(x, y, bs, device, rt, width=args.width, seconds=window)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    rows = []
    for path in ("original", "project"):
        for bs in batches:
            rate = rates.get((path, bs))
            if rate is None:
                rows.append([path, bs, "not measured (out of time)", "", "", ""])
                continue
            share = (
                f"{100 * rate * 3 * fwd / peak:.1f}%"
                if peak
                else ("unknown card" if device.type == "cuda" else "no GPU")
            )
            ratio = f"{rate / rates['original', bs]:.1f}x" if ("original", bs) in rates else ""
            rows.append([path, bs, f"{rate:,.0f}", f"{STUDY_TRAIN_IMAGES / rate:,.1f}", share, ratio])
    precision = "bf16" if rt.amp_dtype else "fp32"
    epoch_tflop = 3 * fwd * STUDY_TRAIN_IMAGES / 1e12
    return "\n".join(
        [
            "## (a) Training throughput: the original loop and this project's path",
            "",
            f"Card: {card_name()}; torch {torch.__version__}; width {args.width:g}; {n:,} real train images "
            f"({data.source}); each figure is training only (no evaluation), timed over a {window:.1f} s window after "
            f"a warm-up. original: per-image PIL transforms, DataLoader(num_workers=0), fp32, PyTorch's default "
            f"backend flags. project: uint8 data on the device, batched augmentation, train.train_epoch with the "
            f"sweep's defaults here ({precision}, channels_last={rt.channels_last}).",
            "",
            f"Arithmetic: one forward pass of one 32x32 image is {fwd / 1e9:.3f} GFLOP (2 x the multiply-adds of the "
            f"5 convolutions and 3 linear layers, counted from the layer shapes); a training step is taken as 3 x the "
            f"forward (the backward pass about twice the forward), so an epoch of {STUDY_TRAIN_IMAGES:,} images is "
            f"3 x {fwd / 1e9:.3f} GFLOP x {STUDY_TRAIN_IMAGES:,} = {epoch_tflop:.1f} TFLOP. Card's dense bf16 peak: "
            + (
                f"{peak / 1e12:,.0f} TFLOP/s."
                if peak
                else ("unknown card (not in the table)." if device.type == "cuda" else "no GPU.")
            ),
            "",
            markdown(
                [
                    "path",
                    "batch",
                    "train img/s",
                    "s per 50,000-image epoch at this rate",
                    "share of bf16 peak",
                    "vs original",
                ],
                rows,
            ),
        ]
    )


# --- (b) packing ----------------------------------------------------------------------------------------


def _pack_worker(index: int, arrays: str, images: int, width: float, threads: int, commands, results, go) -> None:
    """One trial's process: waits for (point, K, batch, window) commands and trains for the window."""
    torch.set_num_threads(threads)
    data = load_arrays(Path(arrays), images)
    device = device_of_this_machine()
    if device.type == "cuda":
        torch.zeros(1, device=device)  # the CUDA context, before the clock of any point starts
    results.put(("hello", index, -1))
    while (command := commands.get()) is not None:
        point, k, batch, window, wait_s = command
        try:
            results.put(
                (
                    "done",
                    index,
                    point,
                    *_pack_point(index, point, k, batch, window, wait_s, data, width, device, results, go[point]),
                )
            )
        except Exception as exc:
            results.put(("error", index, point, f"{type(exc).__name__}: {exc}"))


def _pack_point(index, point, k, batch, window, wait_s, data, width, device, results, go) -> tuple[int, float]:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0 / k, device)
    rt = throughput.project_runtime(device)
    memory_format = torch.channels_last if rt.channels_last else torch.contiguous_format
    model = AlexNet(dropout=True, batchnorm=True, width=width).to(device, memory_format=memory_format)
    optimizer = make_optimizer("sgd", model.parameters(), 0.01)
    x, y = to_device_nchw(data.train_x, device), torch.from_numpy(data.train_y.copy()).to(device)
    gen = torch.Generator(device).manual_seed(index)
    for _ in range(2):  # warm-up: cudnn autotuning, the allocator
        train_epoch(model, optimizer, x[: batch * 4], y[: batch * 4], batch, gen, rt)
    sync()
    results.put(("ready", index, point))
    if not go.wait(timeout=wait_s):
        raise TimeoutError("the other trials of this point never became ready")
    chunk = min(len(x), batch * 50)  # 50 steps, then one sync, as train_epoch checks the loss every 50 steps
    start, done, offset = time.perf_counter(), 0, 0
    while done == 0 or time.perf_counter() - start < window:
        if offset + chunk > len(x):
            offset = 0
        train_epoch(model, optimizer, x[offset : offset + chunk], y[offset : offset + chunk], batch, gen, rt)
        done, offset = done + chunk, offset + chunk
    sync()
    elapsed = time.perf_counter() - start
    del model, optimizer, x, y
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return done, elapsed


def part_packing(args, arrays: Path, deadline: float) -> str:
    device = device_of_this_machine()
    points = [(k, bs) for bs in args.pack_batch_sizes for k in args.concurrency]
    workers_n = max(args.concurrency)
    threads = 1 if device.type == "cpu" else max(1, (os.cpu_count() or 2) // workers_n)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    commands = [ctx.Queue() for _ in range(workers_n)]
    go = [ctx.Event() for _ in points]
    workers = [
        ctx.Process(
            target=_pack_worker,
            args=(i, str(arrays), args.images, args.width, threads, commands[i], results, go),
            daemon=True,
        )
        for i in range(workers_n)
    ]
    started = time.time()
    rows, measured = [], {}
    note = ""
    try:
        for w in workers:
            w.start()
        _collect(results, "hello", -1, workers_n, deadline, workers)
        startup = time.time() - started
        overhead = 5.0 if device.type == "cuda" else 1.5  # model, warm-up, cudnn autotuning, hand-shakes
        window = args.window or max(0.3, min(15.0, (deadline - time.time()) / len(points) - overhead))
        for i, (k, bs) in enumerate(points):
            if time.time() + window + overhead > deadline:
                rows.append(
                    [k, f"1/{k}" if device.type == "cuda" else "no GPU", bs, "not measured (out of time)", "", ""]
                )
                continue
            wait_s = max(5.0, deadline - time.time())
            for w in range(k):
                commands[w].put((i, k, bs, window, wait_s))
            _collect(results, "ready", i, k, deadline + 30, workers)
            go[i].set()
            done = _collect(results, "done", i, k, deadline + 30 + window, workers)
            per_trial = [images / seconds for images, seconds in done.values()]
            measured[k, bs] = sum(per_trial)
            base = measured.get((1, bs))
            rows.append(
                [
                    k,
                    f"1/{k}" if device.type == "cuda" else "no GPU",
                    bs,
                    ", ".join(f"{r:,.0f}" for r in per_trial),
                    f"{sum(per_trial):,.0f}",
                    f"{sum(per_trial) / base:.2f}x" if base else "",
                ]
            )
        note = (
            f"{workers_n} worker processes started in {startup:.1f} s (not timed); each point trains for "
            f"{window:.1f} s in every process after all of them have warmed up."
        )
    except (TimeoutError, RuntimeError) as exc:
        note = f"stopped early: {exc}"
    finally:
        for c in commands:
            c.put(None)
        for w in workers:
            w.join(timeout=5)
            if w.is_alive():
                w.terminate()
    return "\n".join(
        [
            "## (b) Packing: trials sharing one GPU",
            "",
            f"Card: {card_name()}; width {args.width:g}; each trial is its own process "
            f"({'torch.cuda.set_per_process_memory_fraction(1/K)' if device.type == 'cuda' else 'CPU: no memory cap'}, "
            f"{threads} CPU thread(s)), training this project's path (SGD, dropout and batch norm on, the sweep's "
            f"defaults) on the first {args.images:,} train images. {note}",
            "",
            markdown(
                [
                    "trials at once (K)",
                    "memory cap each",
                    "batch",
                    "img/s of each trial",
                    "aggregate img/s",
                    "vs 1 trial",
                ],
                rows,
            ),
        ]
    )


# --- (c) checkpoint share -------------------------------------------------------------------------------


def part_checkpoint(data: Cifar, args, deadline: float, workdir: Path) -> str:
    rows, summary, cut = [], [], ""
    epochs = args.checkpoint_epochs
    for optimizer, run in CHECKPOINT_RUNS:
        for interval in (RUNTIME_DEFAULTS["resume_every_s"], 0.0):
            if cut:
                break
            store = LocalStore(workdir / f"checkpoint-{optimizer}-{interval:g}", deadline=deadline)
            config = {**study_config(run), "width": args.width, "epochs": epochs, "patience": 100}
            try:
                train_cifar(config, data, store, runtime={"resume_every_s": interval})
            except OutOfTime as exc:
                cut = f"The part's time ran out after epoch {exc} of this configuration; later ones were skipped."
            costs, work = [], []
            for i, e in enumerate(store.epochs):
                report_s = store.epochs[i + 1]["report_s"] if i + 1 < len(store.epochs) else e["own_report_s"]
                cost = e["checkpoint_s"] + report_s
                share = cost / (e["train_s"] + e["eval_s"] + cost)
                costs.append(cost)
                work.append(e["train_s"] + e["eval_s"])
                rows.append(
                    [
                        f"{optimizer} (run {run})",
                        f"{interval:g} s",
                        e["epoch"],
                        e["checkpoint_kind"] or "none",
                        f"{e['bytes'] / 1e6:,.1f}",
                        f"{e['train_s']:.2f}",
                        f"{e['eval_s']:.2f}",
                        f"{e['checkpoint_s']:.3f}",
                        f"{report_s:.3f}",
                        f"{100 * share:.1f}%",
                    ]
                )
            if costs:
                summary.append(
                    f"{optimizer}, resume interval {interval:g} s: checkpoints took "
                    f"{100 * sum(costs) / (sum(costs) + sum(work)):.1f}% of the time of its "
                    f"{len(costs)} epoch(s)"
                )
            shutil.rmtree(store.root, ignore_errors=True)
    device = device_of_this_machine()
    return "\n".join(
        [
            "## (c) Checkpoint share of an epoch",
            "",
            f"Card: {card_name()}; width {args.width:g}; {len(data.train_x):,} train and {len(data.test_x):,} test "
            f"images an epoch; {'bf16' if device.type == 'cuda' else 'fp32'}. train.train_cifar with a report callback "
            f"that copies each checkpoint folder to local disk, as Tune does with local storage. checkpoint_s: writing "
            f"the files (metrics); report_s: the report call, i.e. the copy (the next epoch's metrics; for the last "
            f"epoch the callback's own clock). Share = (checkpoint_s + report_s) / (train_s + eval_s + both). Resume "
            f"interval {RUNTIME_DEFAULTS['resume_every_s']:g} s is the default (best weights when the accuracy "
            f"improves, a resume state every so often); 0 s writes the resume state every epoch. {cut}",
            "",
            markdown(
                [
                    "optimizer",
                    "resume interval",
                    "epoch",
                    "checkpoint",
                    "MB written",
                    "train_s",
                    "eval_s",
                    "checkpoint_s",
                    "report_s",
                    "share",
                ],
                rows,
            ),
            "",
            *[f"- {line}" for line in summary],
        ]
    )


# --- (d) fidelity ---------------------------------------------------------------------------------------


def _fidelity_worker(
    run: int,
    arrays: str,
    width: float,
    deadline: float,
    log: str,
    threads: int,
    memory_fraction: float,
    store: str,
    original: float,
) -> None:
    """One study run with the full recipe, in its own process, until it ends itself or the deadline nears."""
    torch.set_num_threads(threads)
    if torch.cuda.is_available() and memory_fraction < 1:
        torch.cuda.set_per_process_memory_fraction(memory_fraction, 0)
    data = load_arrays(Path(arrays))

    class Printing(LocalStore):
        def __call__(self, metrics, directory):
            print(
                f"run {run} epoch {metrics['epoch']}: test {metrics['val_acc']:.2f}%, best "
                f"{metrics['best_val_acc']:.2f}% (original {original:.2f}%), "
                f"{metrics['train_s'] + metrics['eval_s']:.1f} s",
                flush=True,
            )
            super().__call__(metrics, directory)

    recorder = Printing(Path(store), deadline=deadline, log=Path(log), keep_last=True)
    end: dict = {"end": "finished"}
    try:
        train_cifar({**study_config(run), "width": width}, data, recorder)
    except OutOfTime:
        end = {"end": "cut"}
    except Exception as exc:
        end = {"end": "error", "detail": f"{type(exc).__name__}: {exc}"}
    with open(log, "a") as f:
        f.write(json.dumps(end) + "\n")


def _fidelity_row(run: int, original: float, log: Path, max_epochs: int, patience: int) -> list:
    lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    epochs = [r for r in lines if "epoch" in r]
    end = next((r for r in lines if "end" in r), {"end": "killed"})
    cfg = study_config(run)
    setting = [
        cfg["optimizer"],
        f"{cfg['lr']:g}",
        cfg["batch_size"],
        cfg["dropout"],
        cfg["batchnorm"],
        f"{original:.2f}",
    ]
    if not epochs:
        if end["end"] == "error":
            return [run, *setting, f"error before its first epoch ended: {end.get('detail', '')}", "", "", "", ""]
        return [run, *setting, "cut before its first epoch ended: no accuracy", "", "", "", ""]
    last = epochs[-1]
    best = last["best_val_acc"]
    if end["end"] == "finished":
        why = (
            "diverged"
            if last.get("diverged")
            else "plateau"
            if last["epochs_since_best"] >= patience
            else "epoch limit"
        )
        result = f"{best:.2f}% (finished: {why} at epoch {last['epoch']}, best at epoch {last['best_epoch']})"
        diff = f"{best - original:+.2f}"
    elif end["end"] == "error":
        result, diff = f"error after epoch {last['epoch']}: {end.get('detail', '')}", ""
    else:
        result, diff = f"cut at epoch {last['epoch']} of <={max_epochs}: best so far {best:.2f}%", ""
    epoch_s = statistics.median(r["train_s"] + r["eval_s"] for r in epochs)
    cost = sum(r["checkpoint_s"] + r["own_report_s"] for r in epochs)
    share = cost / (cost + sum(r["train_s"] + r["eval_s"] for r in epochs))
    return [run, *setting, result, diff, len(epochs), f"{epoch_s:.1f}", f"{100 * share:.1f}%"]


def part_fidelity(args, arrays: Path, deadline: float, workdir: Path) -> str:
    from tune_alexnet.report import reference_table  # pandas: the parent only

    ref = reference_table().set_index("run")["final_accuracy"]
    device = device_of_this_machine()
    k = len(args.runs)
    threads = 1 if device.type == "cpu" else max(1, (os.cpu_count() or 2) // k)
    fraction = 1.0 / k if device.type == "cuda" else 1.0
    ctx = mp.get_context("spawn")
    logs = {run: workdir / f"fidelity-{run}.jsonl" for run in args.runs}
    procs = [
        ctx.Process(
            target=_fidelity_worker,
            args=(
                run,
                str(arrays),
                args.width,
                deadline,
                str(logs[run]),
                threads,
                fraction,
                str(workdir / f"fidelity-{run}"),
                float(ref[run]),
            ),
        )
        for run in args.runs
    ]
    for p in procs:
        p.start()
    hard_stop = deadline + (10.0 if device.type == "cuda" else 5.0)
    for p in procs:
        p.join(timeout=max(0.0, hard_stop - time.time()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
    rows = [
        _fidelity_row(run, float(ref[run]), logs[run], TRIAL_DEFAULTS["epochs"], TRIAL_DEFAULTS["patience"])
        for run in args.runs
    ]
    return "\n".join(
        [
            "## (d) Fidelity: study runs with the full recipe, next to the original's accuracy",
            "",
            f"Card: {card_name()}; width {args.width:g}; {k} runs at once, each its own process"
            + (f" with 1/{k} of the GPU's memory" if device.type == "cuda" else "")
            + f"; the recipe: up to {TRIAL_DEFAULTS['epochs']} epochs, patience {TRIAL_DEFAULTS['patience']}, "
            f"augmentation, the whole train set ({_train_images(arrays):,} images) and test set every epoch; "
            f"checkpoints copied to local disk. A run the time budget cut short says so: its number is the best so far, "
            f"not a result.",
            "",
            markdown(
                [
                    "run",
                    "optimizer",
                    "lr",
                    "batch",
                    "dropout",
                    "BN",
                    "original %",
                    "this run",
                    "difference",
                    "epochs",
                    "s / epoch (train + eval, median)",
                    "checkpoint share (all epochs)",
                ],
                rows,
            ),
        ]
    )


def _train_images(arrays: Path) -> int:
    return int(np.load(arrays / "train_y.npy", mmap_mode="r").shape[0])


# --- the call -------------------------------------------------------------------------------------------


def machine_lines(args) -> list[str]:
    lines = [f"- card: {card_name()}"]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"- GPU memory: {props.total_memory / 2**30:.1f} GiB; CUDA {torch.version.cuda}")
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            lines.append(f"- nvidia-smi: {smi.stdout.strip() or smi.stderr.strip()}")
    lines.append(
        f"- torch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPU cores, "
        f"{platform.machine()}"
    )
    lines.append(
        f"- mode: {'smoke (tiny sizes, not a measurement)' if args.smoke else 'measurement'}; "
        f"budget {args.budget_s:.0f} s from the call's start; data {args.data_dir}"
    )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="CIFAR-10 ImageFolder tree (train/<class>/, test/<class>/)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "device-out", help="folder for the Markdown files")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device there is: a check")
    ap.add_argument(
        "--budget-s",
        type=float,
        help=f"wall-clock budget (default {DEFAULT_BUDGET_S:g} s, {SMOKE_BUDGET_S:g} with --smoke)",
    )
    ap.add_argument("--started-at", type=float, help="UNIX time the call started (default: now)")
    ap.add_argument("--width", type=float, help="AlexNet width (default 1, 0.125 with --smoke)")
    ap.add_argument("--images", type=int, help="train images for (a) and (b) (default 10000, 256 with --smoke)")
    ap.add_argument("--batch-sizes", default="32,64,128", help="(a)'s batch sizes")
    ap.add_argument("--pack-batch-sizes", default="32,128", help="(b)'s batch sizes")
    ap.add_argument("--concurrency", help="(b)'s trials at once (default 1,2,4,8; 1,2 with --smoke)")
    ap.add_argument("--runs", default=",".join(map(str, FIDELITY_RUNS)), help="(d)'s study runs")
    ap.add_argument("--window", type=float, help="seconds per timed window in (a) and (b) (default: from the budget)")
    ap.add_argument("--checkpoint-epochs", type=int, help="epochs per configuration in (c) (default 3, 2 smoke)")
    ap.add_argument("--parts", default="throughput,packing,checkpoint,fidelity", help="which parts to run")
    args = ap.parse_args(argv)
    ints = lambda text: tuple(int(v) for v in text.split(","))  # noqa: E731
    args.batch_sizes, args.pack_batch_sizes, args.runs = (
        ints(args.batch_sizes),
        ints(args.pack_batch_sizes),
        ints(args.runs),
    )
    args.concurrency = ints(args.concurrency or ("1,2" if args.smoke else "1,2,4,8"))
    args.budget_s = args.budget_s or (SMOKE_BUDGET_S if args.smoke else DEFAULT_BUDGET_S)
    args.width = args.width or (0.125 if args.smoke else 1.0)
    args.images = args.images or (256 if args.smoke else 10_000)
    args.checkpoint_epochs = args.checkpoint_epochs or (2 if args.smoke else 3)
    if args.smoke and args.window is None:
        args.window = 0.3
    args.parts = tuple(p for p in args.parts.split(",") if p)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    end = (args.started_at or time.time()) + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="tune-alexnet-device-"))
    began = time.time()
    header = ["# Device measurements", "", *machine_lines(args)]
    print("\n".join(header), flush=True)
    timings, sections, failed = [], [], []
    try:
        data = decode(args.data_dir)
        if args.smoke:  # a few images for every part, the fidelity runs' "whole set" included
            data = Cifar(
                data.train_x[: args.images],
                data.train_y[: args.images],
                data.test_x[: args.images // 4],
                data.test_y[: args.images // 4],
                data.classes,
                f"{data.source}, first {args.images} + {args.images // 4} images",
            )
        save_arrays(data, workdir / "arrays")
        timings.append(
            f"data: {time.time() - began:.1f} s ({len(data.train_x):,} + {len(data.test_x):,} images, {data.source})"
        )
        for name, share, smoke_floor in PART_SHARES:
            if name not in args.parts:
                continue
            start = time.time()
            deadline = start + max(smoke_floor if args.smoke else 1.0, (end - RESERVE_S - start) * share)
            try:
                if name == "throughput":
                    text = part_throughput(data, args, deadline)
                elif name == "packing":
                    text = part_packing(args, workdir / "arrays", deadline)
                elif name == "checkpoint":
                    text = part_checkpoint(data, args, deadline, workdir)
                else:
                    text = part_fidelity(args, workdir / "arrays", deadline, workdir)
            except Exception:
                failed.append(name)
                text = f"## {name}: failed\n\n```\n{traceback.format_exc()[-3000:]}\n```"
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            timings.append(f"{name}: {time.time() - start:.1f} s (its deadline allowed {deadline - start:.1f} s)")
            (out / f"{name}.md").write_text(text + "\n")
            sections.append(text)
            print("\n" + text + "\n", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ray_loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
    timings.append(f"total: {time.time() - (args.started_at or began):.1f} s of the {args.budget_s:.0f} s budget")
    summary = [
        *header,
        "",
        "## Time",
        "",
        *[f"- {t}" for t in timings],
        f"- Ray modules loaded by this run: {', '.join(ray_loaded) if ray_loaded else 'none'}",
        *[f"- part failed: {name}" for name in failed],
        "",
        *sections,
    ]
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    print(
        "\n".join(
            [
                "## Time",
                *[f"- {t}" for t in timings],
                f"- Ray modules loaded by this run: {', '.join(ray_loaded) if ray_loaded else 'none'}",
            ]
        )
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
