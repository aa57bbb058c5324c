"""Part (a) of bench/device.py: one trial's training images/s for each step mode, precision and layout.

Full-size AlexNet by default (SGD, dropout and batch norm), the study's augmentation, training only, at batch 32
and 128 (--batch-sizes):
- the launch-free bound, the reference: the graph-captured step replayed on data augmented once beforehand and
  held on the device, so that the timed loop holds the step alone;
- eager, graph and compile steps through train.train_epoch, augmenting one batch at a time (augment chunk 0, the
  default) and --chunk images at once;
- at fp32/TF32 NCHW (the default), bf16 channels-last, and fp32 with TF32 off (chunked only, if time allows);
  compile at the default precision only;
- the augmentation alone per chunk size (--aug-chunks), with its share of an epoch;
- the original loop (bench/throughput.py), last, if time allows.
Each row gives images/s, seconds per 50,000-image epoch, the share of the card's dense bf16 peak, the seconds of
its warm-up (capture or compilation included) and, at the default precision, host launch calls and GPU kernels per
step from torch.profiler. Compile runs in a process of its own, time-boxed (--compile-limit-s), over real epochs
that end in a partial batch (its compilation and any recompilation counted), and so do the
counts (a profiler fault there costs the counts alone). Without CUDA, graph, compile, bf16 and TF32-off rows say
"needs CUDA" and the bound uses the eager step.

What a short budget cuts first is measured last: bound, eager and graph rows at fp32/TF32 and bf16, the
augmentation, the counts, compile, TF32-off rows, the original loop.
"""

from __future__ import annotations

import json
import time
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path

import device_common as common
import numpy as np
import steps
import throughput
import torch
from torch import Tensor

from tune_alexnet.data import Cifar
from tune_alexnet.train import to_device_nchw

MODES = (steps.BOUND, "eager", "graph", "compile")
GPU_TESTS_FILE = "gpu-tests.txt"  # bench/device.sh's run of tests/test_gpu_step.py, in the output folder
ROW_OVERHEAD_S = {"cuda": 1.5, "cpu": 0.5}  # a fresh trial, its warm-up, cuDNN's choices
COUNT_LIMIT_S = 60.0  # the launch counts' process, at most


def all_keys(args: Namespace) -> list[tuple]:
    """(variant, mode, batch, chunk) of every row, in the table's order; the bound's chunk is None."""
    keys = []
    for variant in steps.VARIANTS:
        for mode in MODES:
            if mode == "compile" and variant != steps.DEFAULT_VARIANT:
                continue
            chunks = [None] if mode == steps.BOUND else [0, args.chunk] if variant != "fp32" else [args.chunk]
            keys += [(variant, mode, batch, chunk) for batch in args.batch_sizes for chunk in chunks]
    return keys


def needs_cuda(key: tuple) -> bool:
    variant, mode = key[:2]
    return mode in ("graph", "compile") or variant != steps.DEFAULT_VARIANT


def part_throughput(data: Cifar, args: Namespace, deadline: float, workdir: Path) -> str:
    device = common.device_of_this_machine()
    n = min(len(data.train_x), args.images)
    x, y = to_device_nchw(data.train_x[:n], device), torch.from_numpy(data.train_y[:n].copy()).to(device)
    keys = all_keys(args)
    first = [k for k in keys if k[0] != "fp32" and k[1] != "compile"]
    runnable = [k for k in first if device.type == "cuda" or not needs_cuda(k)]
    overhead = ROW_OVERHEAD_S[device.type]
    window = args.window or max(0.5, min(2.0, 0.45 * (deadline - time.time()) / max(1, len(runnable)) - overhead))
    rows: dict[tuple, dict] = {}
    measure(first, rows, x, y, args, window, deadline)
    augmentation = {c: augmentation_rate(x, c, window, deadline) for c in args.aug_chunks}
    configs = count_configs(args, device.type)
    counts = child_rows(count_worker, configs, args, workdir, n, deadline, COUNT_LIMIT_S)
    compiled = [k for k in keys if k[1] == "compile"]
    if device.type == "cuda":
        done = child_rows(compile_worker, compiled, args, workdir, n, deadline, args.compile_limit_s, window)
        rows.update({k: done.get(k, {"note": f"not measured: not done within {args.compile_limit_s:g} s"})
                     for k in compiled})  # fmt: skip
    measure([k for k in keys if k[0] == "fp32"] + compiled, rows, x, y, args, window, deadline)
    original = original_rates(data.train_x[:n], data.train_y[:n], args, device, window, deadline)
    common.record(workdir, "throughput", {"rows": [dict(zip(("variant", "mode", "batch", "chunk"), k), **v)
                                                   for k, v in rows.items()]})  # fmt: skip
    note = f"Launch counts: {len(counts)} of {len(configs)} configurations counted in their process."
    return text(rows, counts, augmentation, original, args, n, data.source, window, note)


def measure(
    keys: list[tuple], rows: dict, x: Tensor, y: Tensor, args: Namespace, window: float, deadline: float
) -> None:
    """Each row not measured yet, in order, while the deadline allows; a row that fails says why."""
    overhead = ROW_OVERHEAD_S[x.device.type]
    for key in keys:
        variant, mode, batch, chunk = key
        if key in rows:
            continue
        if needs_cuda(key) and x.device.type != "cuda":
            rows[key] = {"note": "needs CUDA"}
        elif mode in ("graph", steps.BOUND) and x.device.type == "cuda" and args.gpu_tests == "failed":
            rows[key] = {"note": f"skipped: tests/test_gpu_step.py failed ({GPU_TESTS_FILE})"}
        elif time.time() + window + overhead > deadline:
            rows[key] = {"note": "not measured (out of time)"}
        elif mode == steps.BOUND:
            rows[key] = guarded(steps.bound_row, x, y, batch, variant, args.width, window)
        else:
            rows[key] = guarded(steps.training_row, x, y, batch, variant, mode, chunk, args.width, window)
        common.emit("throughput", {"key": list(key), **rows[key]})


def guarded(measure_row: Callable[..., dict], *args) -> dict:
    try:
        row = measure_row(*args)
    except Exception as exc:  # out of memory, a backend that refuses: the row says so, the part goes on
        row = {"note": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"}
    try:
        common.release_memory()  # the trial, and a captured graph's memory pool with it
    except Exception as exc:  # a sticky CUDA error: this row is measured; the next ones will say they failed
        row.setdefault("note", f"after it: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    return row


def augmentation_rate(x: Tensor, chunk: int, window: float, deadline: float) -> float | None:
    if chunk > len(x) or time.time() + window + 0.5 > deadline:
        return None
    return steps.augmentation_rate(x, chunk, window)


def original_rates(
    x: np.ndarray, y: np.ndarray, args: Namespace, device: torch.device, window: float, deadline: float
) -> dict[int, float]:
    """The original loop's images/s per batch size, as time allows."""
    rates = {}
    for batch in args.batch_sizes:
        if time.time() + window + ROW_OVERHEAD_S[device.type] < deadline:
            rates[batch] = throughput.original_epoch(x, y, batch, device, width=args.width, seconds=window)
    return rates


# --- the processes of their own: launch counts, compile ----------------------------------------------------


def count_configs(args: Namespace, device_type: str) -> list[tuple]:
    """At the default precision: the bound, eager and graph; without CUDA (a check of the code: the CPU launches
    no kernel) the first batch size's bound and eager rows."""
    batches = args.batch_sizes if device_type == "cuda" else args.batch_sizes[:1]
    keys = [(steps.DEFAULT_VARIANT, steps.BOUND, b, None) for b in batches]
    modes = ("eager", "graph") if device_type == "cuda" else ("eager",)
    return keys + [(steps.DEFAULT_VARIANT, m, b, c) for m in modes for b in batches for c in (0, args.chunk)]


def child_rows(
    worker: Callable, keys: list[tuple], args: Namespace, workdir: Path, n: int, deadline: float, limit: float, *extra
) -> dict:
    """`worker` over `keys` in a process of its own until min(deadline, now + limit): what it wrote, by key."""
    log = Path(workdir) / f"{worker.__name__}.jsonl"
    log.unlink(missing_ok=True)
    stop = min(deadline, time.time() + limit) - (10.0 if torch.cuda.is_available() else 5.0)  # run_processes' grace
    if not keys or stop - time.time() < 5.0:
        return {}
    arrays = str(common.arrays_dir(workdir))
    common.run_processes([(worker, (arrays, n, args.width, [list(k) for k in keys], str(log), *extra))], stop)
    lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    for line in lines:
        common.emit("throughput", line)
    return {tuple(line.pop("key")): line for line in lines}


def _device_data(arrays: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = common.load_arrays(Path(arrays), n)
    device = common.device_of_this_machine()
    if device.type == "cpu":
        torch.set_num_threads(1)  # as the runner's CPU check: a busy core must not stall a second thread
    return to_device_nchw(data.train_x, device), torch.from_numpy(data.train_y.copy()).to(device)


def _append(log: str, line: dict) -> None:
    with open(log, "a") as f:
        f.write(json.dumps(line) + "\n")


def count_worker(arrays: str, n: int, width: float, keys: list, log: str) -> None:
    """Host launch calls and GPU kernels per step of each configuration. Every trial is built and warmed up (each
    graph captured) before the first profiling session: a session before a capture has been seen to leave the
    profiler blind to kernels for the rest of the process."""
    x, y = _device_data(arrays, n)
    calls = {}
    for key in keys:
        _, mode, batch, chunk = key
        try:
            if mode == steps.BOUND:
                calls[tuple(key)] = steps.counted_bound(x, y, batch, width)
            else:
                calls[tuple(key)] = steps.counted_call(x, y, batch, mode, chunk, width)
        except Exception as exc:
            _append(log, {"key": key, "note": f"failed: {type(exc).__name__}: {str(exc)[:160]}"})
    for key, call in calls.items():
        try:
            launches, kernels = steps.launches_per_step(call)
            _append(log, {"key": list(key), "launches": launches, "kernels": kernels})
        except Exception as exc:
            _append(log, {"key": list(key), "note": f"failed: {type(exc).__name__}: {str(exc)[:160]}"})


def compile_worker(arrays: str, n: int, width: float, keys: list, log: str, window: float) -> None:
    """The compiled step over real epochs: a fresh compilation per row, an epoch that ends in a partial batch (as
    50,000 images do at every batch size), its seconds with the compilation as the warm-up, then the rate of the
    next epoch. A recompilation on the partial batch would show in both."""
    x, y = _device_data(arrays, n)
    for key in keys:
        variant, mode, batch, chunk = key
        rt, run = steps.runtime(x.device, variant, mode, chunk)
        m = len(x) - batch // 2 if len(x) % batch == 0 else len(x)  # a last batch of another size
        try:
            torch._dynamo.reset()
            trial = steps.new_trial(rt, run, batch, width)
            first_s = steps.epoch_seconds(trial, x[:m], y[:m], batch, rt)
            row = {"img_s": m / steps.epoch_seconds(trial, x[:m], y[:m], batch, rt), "first_s": first_s}
            row["ran"] = trial.step.mode
        except Exception as exc:
            row = {"note": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"}
        _append(log, {"key": key, **row})


# --- the text -------------------------------------------------------------------------------------------------


def row_cells(key: tuple, row: dict, count: dict | None, fwd: int, peak: float | None, on_cuda: bool) -> list:
    variant, mode, batch, chunk = key
    what = [mode if mode != steps.BOUND else "bound: graph, pre-augmented" + ("" if on_cuda else " (eager here)")]
    what += [steps.variant_label(variant, on_cuda), batch, "pre-augmented" if chunk is None else chunk]
    if "img_s" not in row:
        return [*what, row.get("note", "not measured (out of time)"), "", "", "", "", ""]
    rate = row["img_s"]
    share = f"{100 * rate * 3 * fwd / peak:.1f}%" if peak else ("unknown card" if on_cuda else "no GPU")
    if count is None:
        launches = kernels = "not counted"
    elif "note" in count:
        launches = kernels = count["note"]
    elif not on_cuda:
        launches = kernels = "no GPU"
    else:
        launches, kernels = f"{count['launches']:.1f}", f"{count['kernels']:.1f}"
    ran = "" if row["ran"] == mode or mode == steps.BOUND else f" (ran {row['ran']})"
    return [*what, f"{rate:,.0f}{ran}", f"{common.STUDY_TRAIN_IMAGES / rate:,.1f}", share, launches, kernels,
            f"{row['first_s']:.1f}"]  # fmt: skip


def augmentation_rows(augmentation: dict, rows: dict, args: Namespace) -> list[list]:
    """Each chunk size's images/s, and its share of an epoch of the training rows that augment that many images
    at once (the training rate over the augmentation's: both run in turn on one stream)."""
    out = []
    for chunk, rate in augmentation.items():
        if rate is None:
            out.append([chunk, "not measured (out of time or more than the images)", "", ""])
            continue
        shares = []
        for (variant, mode, batch, c), row in rows.items():
            same = (c == 0 and batch == chunk) or (c == chunk and c != 0)
            if same and variant == steps.DEFAULT_VARIANT and mode in ("eager", "graph") and "img_s" in row:
                shares.append(f"{mode} batch {batch} chunk {c}: {100 * row['img_s'] / rate:.0f}%")
        out.append([chunk, f"{rate:,.0f}", f"{common.STUDY_TRAIN_IMAGES / rate:,.2f}", "; ".join(shares)])
    return out


def text(
    rows: dict,
    counts: dict,
    augmentation: dict,
    original: dict,
    args: Namespace,
    n: int,
    source: str,
    window: float,
    note: str,
) -> str:
    on_cuda = torch.cuda.is_available()
    fwd = common.forward_flops(args.width)
    peak = common.card_peak_flops(common.card_name()) if on_cuda else None
    header = ["step", "precision, layout", "batch", "augment chunk", "train img/s", "s per 50,000-image epoch",
              "share of bf16 peak", "host launch calls / step", "GPU kernels / step", "warm-up s (capture, compile)"]  # fmt: skip
    table = [row_cells(k, rows.get(k, {}), counts.get(k), fwd, peak, on_cuda) for k in all_keys(args)]
    originals = [[b, f"{r:,.0f}", f"{common.STUDY_TRAIN_IMAGES / r:,.1f}"] for b, r in original.items()]
    return "\n".join([
        "## (a) One trial's training step: step modes, precision and layout",
        "",
        f"Card: {common.card_name()}; torch {torch.__version__}; width {args.width:g}; {n:,} real train images "
        f"({source}) on the device; training only (no evaluation), each row a fresh trial (SGD, dropout and batch "
        f"norm) through train.train_epoch, timed over a {window:.1f} s window after a warm-up of two short epochs. "
        f"Augment chunk 0 augments one batch at a time (the default); the bound replays the captured step on data "
        f"augmented once beforehand. Launch calls and kernels: torch.profiler over one timed call after the warm-up, "
        f"at the default precision; compile: at most {args.compile_limit_s:g} s in a process of its own, each row "
        f"a fresh compilation timed over real epochs that end in a partial batch (warm-up: the first epoch, "
        f"compilation included; the rate: the next epoch).",
        "",
        peak_text(fwd, peak, on_cuda),
        "",
        common.markdown(header, table),
        "",
        note,
        "",
        "Augmentation alone (taking a chunk of shuffled images out of the set and augmenting it), and its share of "
        "an epoch of the training rows that augment as many images at once:",
        "",
        common.markdown(["chunk (images)", "img/s", "s per 50,000 images", "share of an epoch"],
                        augmentation_rows(augmentation, rows, args)),  # fmt: skip
        "",
        "The original loop (per-image PIL transforms, DataLoader(num_workers=0), fp32, PyTorch's default flags):",
        "",
        common.markdown(["batch", "train img/s", "s per 50,000-image epoch"], originals or [["-", "not measured "
                        "(out of time)", ""]]),  # fmt: skip
    ])  # fmt: skip


def peak_text(fwd: int, peak: float | None, on_cuda: bool) -> str:
    images = f"{common.STUDY_TRAIN_IMAGES:,}"
    epoch_tflop = 3 * fwd * common.STUDY_TRAIN_IMAGES / 1e12
    if peak:
        card = f"{peak / 1e12:,.0f} TFLOP/s."
    else:
        card = "unknown card (not in the table)." if on_cuda else "no GPU."
    return (
        f"Arithmetic: one forward pass of one 32x32 image is {fwd / 1e9:.3f} GFLOP (2 x the multiply-adds of the 5 "
        f"convolutions and 3 linear layers, counted from the layer shapes); a training step is taken as 3 x the "
        f"forward, so an epoch of {images} images is 3 x {fwd / 1e9:.3f} GFLOP x {images} = {epoch_tflop:.1f} TFLOP. "
        f"Card's dense bf16 peak: {card}"
    )
