"""Part (a) of bench/device.py: training images/s of the original loop and of this project's path.

The original is bench/throughput.py's `original_epoch` (per-image PIL transforms, DataLoader(num_workers=0),
fp32); the project is `train.train_epoch` with the sweep's defaults for the device; at batch 32, 64 and 128,
training only, with the share of the card's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import device_common as common
import throughput
import torch

from tune_alexnet.data import Cifar

PATHS = ("original", "project")


def part_throughput(data: Cifar, args: argparse.Namespace, deadline: float, workdir: Path | None = None) -> str:
    device = common.device_of_this_machine()
    n = min(len(data.train_x), args.images)
    overhead = 3.0 if device.type == "cuda" else 0.5  # model build, warm-up, cudnn autotuning per measurement
    window = args.window or max(0.2, min(10.0, (deadline - time.time()) / (2 * len(args.batch_sizes)) - overhead))
    rt = throughput.project_runtime(device)
    rates = _rates(data.train_x[:n], data.train_y[:n], args, device, rt, window, overhead, deadline)
    return _text(rates, args, n, data.source, window, "bf16" if rt.amp_dtype else "fp32", rt.channels_last)


def _rates(x, y, args, device, rt, window: float, overhead: float, deadline: float) -> dict[tuple[str, int], float]:
    """Images/s by (path, batch), for those that fit before the deadline."""
    rates: dict[tuple[str, int], float] = {}
    for path in PATHS:
        for bs in args.batch_sizes:
            if time.time() + window + overhead > deadline:
                continue
            if path == "original":
                rates[path, bs] = throughput.original_epoch(x, y, bs, device, width=args.width, seconds=window)
            else:
                rates[path, bs] = throughput.project_epoch(x, y, bs, device, rt, width=args.width, seconds=window)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rates


def _rows(rates: dict, batches, fwd: int, peak: float | None, on_cuda: bool) -> list[list]:
    rows = []
    for path in PATHS:
        for bs in batches:
            rate = rates.get((path, bs))
            if rate is None:
                rows.append([path, bs, "not measured (out of time)", "", "", ""])
                continue
            share = f"{100 * rate * 3 * fwd / peak:.1f}%" if peak else ("unknown card" if on_cuda else "no GPU")
            ratio = f"{rate / rates['original', bs]:.1f}x" if ("original", bs) in rates else ""
            rows.append([path, bs, f"{rate:,.0f}", f"{common.STUDY_TRAIN_IMAGES / rate:,.1f}", share, ratio])
    return rows


def _text(rates: dict, args, n: int, source: str, window: float, precision: str, channels_last: bool) -> str:
    on_cuda = torch.cuda.is_available()
    fwd = common.forward_flops(args.width)
    peak = common.card_peak_flops(common.card_name()) if on_cuda else None
    epoch_tflop = 3 * fwd * common.STUDY_TRAIN_IMAGES / 1e12
    images = f"{common.STUDY_TRAIN_IMAGES:,}"
    if peak:
        peak_text = f"{peak / 1e12:,.0f} TFLOP/s."
    else:
        peak_text = "unknown card (not in the table)." if on_cuda else "no GPU."
    header = ["path", "batch", "train img/s", "s per 50,000-image epoch at this rate", "share of bf16 peak"]
    return "\n".join(
        [
            "## (a) Training throughput: the original loop and this project's path",
            "",
            f"Card: {common.card_name()}; torch {torch.__version__}; width {args.width:g}; {n:,} real train images "
            f"({source}); each figure is training only (no evaluation), timed over a {window:.1f} s window after "
            f"a warm-up. original: per-image PIL transforms, DataLoader(num_workers=0), fp32, PyTorch's default "
            f"backend flags. project: uint8 data on the device, batched augmentation, train.train_epoch with the "
            f"sweep's defaults here ({precision}, channels_last={channels_last}).",
            "",
            f"Arithmetic: one forward pass of one 32x32 image is {fwd / 1e9:.3f} GFLOP (2 x the multiply-adds of the "
            f"5 convolutions and 3 linear layers, counted from the layer shapes); a training step is taken as 3 x the "
            f"forward (the backward pass about twice the forward), so an epoch of {images} images is "
            f"3 x {fwd / 1e9:.3f} GFLOP x {images} = {epoch_tflop:.1f} TFLOP. Card's dense bf16 peak: " + peak_text,
            "",
            common.markdown([*header, "vs original"], _rows(rates, args.batch_sizes, fwd, peak, on_cuda)),
        ]
    )
