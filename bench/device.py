"""One call on a GPU machine: throughput, packing, checkpoint cost and fidelity, each as a Markdown table.

A GPU may be lent for a few minutes only, without Ray and without a network, so everything here is plain
PyTorch from the checkout (`train.train_cifar` with a report callback of its own) and every part stops on its
own deadline inside one wall-clock budget (data decoding included). This file is the runner (arguments, the
budget, the loop over the parts, the summary); each part is a module of its own:

(a) throughput (part_throughput.py): training images/s of the original loop and of this project's path at
    batch 32, 64 and 128, with the share of the card's dense bf16 peak;
(b) packing (part_packing.py): K trials sharing the GPU, each in its own process with its memory capped at 1/K;
(c) checkpoint (part_checkpoint.py): what writing and persisting checkpoints costs per epoch;
(d) fidelity (part_fidelity.py): study runs with the study's full recipe, concurrently, until they finish or
    the budget ends; a run cut short says so and gives no final number;
(e) ab (ab.py, not run by default): the fidelity A/B, the study's own recipe (original.py) against this
    project's path in bf16 and fp32, on the same images, several seeds.

    bash bench/device.sh                        # on the GPU machine; results in $OUT (default ./device-out)
    bash bench/device.sh --parts ab             # the A/B alone
    python bench/device.py --smoke --data-dir ../shared/data/cifar10-mini --out /tmp/device-smoke   # CPU check
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import ab
import device_common as common
import torch
from part_checkpoint import part_checkpoint
from part_fidelity import FIDELITY_RUNS, part_fidelity
from part_packing import part_packing
from part_throughput import part_throughput

from tune_alexnet.data import Cifar

DEFAULT_BUDGET_S = 480.0
SMOKE_BUDGET_S = 50.0
RESERVE_S = 20.0  # left at the end for stopping the fidelity runs, writing the summary and cleaning up
DEFAULT_PARTS = "throughput,packing,checkpoint,fidelity"
# Each part: its function and its share of the time left when it starts (about 1.5, 2 and 0.8 minutes of an
# 8-minute call, fidelity the rest); the last part run takes all the time left, and time a part leaves unused
# passes to the next one. A smoke run (a check, not a measurement: its windows are fixed and short) gives each
# part at least its floor in seconds, so that a busy machine still runs every point of (a) to (c), and the
# fidelity runs reach their first epochs.
PARTS = {
    "throughput": (part_throughput, 0.21, 60.0),
    "packing": (part_packing, 0.35, 60.0),
    "checkpoint": (part_checkpoint, 0.23, 60.0),
    "fidelity": (part_fidelity, 0.5, 30.0),
    "ab": (ab.part_ab, 1.0, 45.0),
}


def machine_lines(args: argparse.Namespace) -> list[str]:
    lines = [f"- card: {common.card_name()}"]
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
    ap.add_argument(
        "--parts", default=DEFAULT_PARTS, help=f"which parts to run, of {','.join(PARTS)} (default {DEFAULT_PARTS})"
    )
    ab.add_arguments(ap)
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
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}; allowed: {', '.join(PARTS)}")
    ab.finish_arguments(args)
    return args


def load_data(args: argparse.Namespace, workdir: Path) -> tuple[Cifar, str]:
    """The decoded set (a few images of it with --smoke), saved for the worker processes; a timing line."""
    began = time.time()
    data = common.decode(args.data_dir)
    if args.smoke:  # a few images of every class for every part, the fidelity runs' "whole set" included
        data = common.spread_subset(data, args.images, args.images // 4)
        data = replace(data, source=f"{data.source}, {len(data.train_x)} + {len(data.test_x)} images of it")
    common.save_arrays(data, common.arrays_dir(workdir))
    return (
        data,
        f"data: {time.time() - began:.1f} s ({len(data.train_x):,} + {len(data.test_x):,} images, {data.source})",
    )


def run_part(
    name: str, data: Cifar, args: argparse.Namespace, end: float, workdir: Path, last: bool
) -> tuple[str, str, bool]:
    """One part inside its deadline: (its Markdown, a timing line, whether it failed)."""
    part, share, smoke_floor = PARTS[name]
    start = time.time()
    deadline = start + max(smoke_floor if args.smoke else 1.0, (end - RESERVE_S - start) * (1.0 if last else share))
    failed = False
    try:
        text = part(data, args, deadline, workdir)
    except Exception:
        failed = True
        text = f"## {name}: failed\n\n```\n{traceback.format_exc()[-3000:]}\n```"
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return text, f"{name}: {time.time() - start:.1f} s (its deadline allowed {deadline - start:.1f} s)", failed


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
    chosen = [name for name in PARTS if name in args.parts]
    try:
        data, timing = load_data(args, workdir)
        timings.append(timing)
        for name in chosen:
            text, timing, part_failed = run_part(name, data, args, end, workdir, last=name == chosen[-1])
            failed += [name] if part_failed else []
            timings.append(timing)
            (out / f"{name}.md").write_text(text + "\n")
            sections.append(text)
            print("\n" + text + "\n", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    timings.append(f"total: {time.time() - (args.started_at or began):.1f} s of the {args.budget_s:.0f} s budget")
    write_summary(out, header, timings, failed, sections)
    return 1 if failed else 0


def write_summary(out: Path, header: list[str], timings: list[str], failed: list[str], sections: list[str]) -> None:
    """summary.md: the machine, the time each part took, whether Ray was loaded, every part's section."""
    ray_loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
    time_lines = [
        *[f"- {t}" for t in timings],
        f"- Ray modules loaded by this run: {', '.join(ray_loaded) if ray_loaded else 'none'}",
    ]
    failures = [f"- part failed: {name}" for name in failed]
    (out / "summary.md").write_text(
        "\n".join([*header, "", "## Time", "", *time_lines, *failures, "", *sections]) + "\n"
    )
    print("\n".join(["## Time", *time_lines]))


if __name__ == "__main__":
    sys.exit(main())
