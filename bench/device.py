"""One call on a GPU machine: the training step, packing, checkpoint cost, fidelity and a study projection.

A GPU may be lent for a few minutes only, without Ray and without a network, so everything here is plain
PyTorch from the checkout (`train.train_cifar` with a report callback of its own) and every part stops on its
own deadline inside one wall-clock budget (data decoding included). This file is the runner (arguments, the
budget, the loop over the parts, the summary); each part is a module of its own:

(a) throughput (part_throughput.py): one trial's images/s for each step mode (eager, graph, compile), precision
    and layout, augmenting one batch or --chunk images at a time, against the launch-free bound (the captured
    step on pre-augmented data); the augmentation alone; launches and kernels per step; the original loop;
(b) packing (part_packing.py): K trials sharing the GPU, each its own process with 1/K of the memory, with the
    step (a) found fastest, without and with NVIDIA MPS;
(c) checkpoint (part_checkpoint.py): the checkpoint share of an epoch at that speed, best weights paced
    (the default) and at every new best;
(d) fidelity (part_fidelity.py): study runs with the study's full recipe, concurrently, until they finish or
    the budget ends; a run cut short says so and gives no final number;
(e) projection (part_projection.py): the 108-run study's wall time at the default share, from (b) and (d);
(f) ab (ab.py, not run by default): the fidelity A/B, the study's own recipe (original.py) against this
    project's path in bf16 and fp32, on the same images, several seeds.

The budget (480 s from the call's start, unpacking the data included; the call must end within 9 minutes):
unpacking and decoding the 60,000 JPEGs take about 20 s (decoding took 15 s on a 2-core CPU, BENCHMARKS.md);
RESERVE_S stays for the end; each part then gets its share of the time
left when it starts: (a) 0.45 (about 3.3 minutes: 20 rows of about 3.5 s, the counts' process, compile's), (b)
0.45 of the rest (about 1.8 minutes: 14 points and two pools of processes), (c) 0.25 of the rest (about 35 s),
(d) all the rest (about 1.6 minutes); (e) is arithmetic. Time a part leaves unused passes to the next one.

    bash bench/device.sh                        # on the GPU machine; results in $OUT (default ./device-out)
    bash bench/device.sh --parts ab             # the A/B alone
    python bench/device.py --smoke --data-dir ../shared/data/cifar10-mini --out device-out   # CPU check
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
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
from part_projection import part_projection
from part_throughput import part_throughput

from tune_alexnet.data import Cifar
from tune_alexnet.settings import STEP_MODES

DEFAULT_BUDGET_S = 480.0
SMOKE_BUDGET_S = 50.0
RESERVE_S = 20.0  # left at the end for stopping the fidelity runs, writing the summary and cleaning up
DEFAULT_PARTS = "throughput,packing,checkpoint,fidelity,projection"
# Each part: its function, its share of the time left when it starts (0: it needs none of its own and runs on
# what is left) and its floor in seconds under --smoke (a check, not a measurement: its windows are fixed and
# short), so that a busy machine still runs every point of (a) to (c) and the fidelity runs reach an epoch.
PARTS = {
    "throughput": (part_throughput, 0.45, 40.0),
    "packing": (part_packing, 0.45, 40.0),
    "checkpoint": (part_checkpoint, 0.25, 40.0),
    "fidelity": (part_fidelity, 0.5, 25.0),
    "projection": (part_projection, 0.0, 0.0),
    "ab": (ab.part_ab, 1.0, 45.0),
}


def machine_lines(args: argparse.Namespace) -> list[str]:
    lines = [f"- card: {common.card_name()}"]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"- GPU memory: {props.total_memory / 2**30:.1f} GiB; CUDA {torch.version.cuda}")
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_mode", "--format=csv,noheader"],
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


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = ap.add_argument
    add("--data-dir", required=True, help="CIFAR-10 ImageFolder tree (train/<class>/, test/<class>/)")
    add("--out", default=os.environ.get("OUT") or "device-out", help="folder for the Markdown files")
    add("--smoke", action="store_true", help="tiny sizes on whatever device there is: a check")
    add("--budget-s", type=float, help=f"wall-clock budget (default {DEFAULT_BUDGET_S:g} s, {SMOKE_BUDGET_S:g} smoke)")
    add("--started-at", type=float, help="UNIX time the call started (default: now)")
    add("--width", type=float, help="AlexNet width (default 1, 0.125 with --smoke)")
    add("--images", type=int, help="train images for (a) and (b) (default 16384, 256 with --smoke)")
    add("--batch-sizes", default="32,128", help="(a)'s batch sizes (default 32,128)")
    add("--chunk", type=int, help="(a)'s chunked setting: images augmented at once (default 8192, 128 smoke)")
    add("--aug-chunks", help="(a)'s chunk sizes for the augmentation alone (default 32,128,1024,8192; 32,128 smoke)")
    add("--compile-limit-s", type=float, default=75.0, help="(a)'s compile process, at most (default 75 s)")
    add("--step", default="auto", choices=("auto", *STEP_MODES), help="(b) to (d)'s step (default: (a)'s fastest)")
    add("--augment-chunk", type=int, help="(b) to (d)'s augment chunk (default: that of (a)'s fastest)")
    add("--pack-batch-sizes", default="32,128", help="(b)'s batch sizes")
    add("--concurrency", help="(b)'s trials at once (default 1,2,4,8; 1,2 with --smoke)")
    add("--no-mps", action="store_true", help="(b) without its MPS rows")
    add("--runs", default=",".join(map(str, FIDELITY_RUNS)), help="(d)'s study runs")
    add("--window", type=float, help="seconds per timed window in (a) and (b) (default: from the budget)")
    add("--checkpoint-epochs", type=int, default=3, help="epochs per configuration in (c) (default 3)")
    add("--parts", default=DEFAULT_PARTS, help=f"which parts to run, of {','.join(PARTS)} (default {DEFAULT_PARTS})")
    add("--gpu-tests", default="not-run", choices=("passed", "failed", "not-run"),
        help="how bench/device.sh's run of tests/test_gpu_step.py ended; failed: no graph rows")  # fmt: skip
    ab.add_arguments(ap)
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = parser()
    args = ap.parse_args(argv)
    smoke = args.smoke
    ints = lambda text: tuple(int(v) for v in text.split(","))  # noqa: E731
    args.batch_sizes, args.pack_batch_sizes, args.runs = map(ints, (args.batch_sizes, args.pack_batch_sizes, args.runs))
    args.aug_chunks = ints(args.aug_chunks or ("32,128" if smoke else "32,128,1024,8192"))
    args.concurrency = ints(args.concurrency or ("1,2" if smoke else "1,2,4,8"))
    args.budget_s = args.budget_s or (SMOKE_BUDGET_S if smoke else DEFAULT_BUDGET_S)
    args.width = args.width or (0.125 if smoke else 1.0)
    args.images = args.images or (256 if smoke else 16_384)
    args.chunk = args.chunk or (128 if smoke else 8192)
    if smoke and args.window is None:
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
        common.release_memory()
    except Exception:  # a sticky CUDA error raises in the cleanup too: inside the guard, like the part
        failed = True
        text = f"## {name}: failed\n\n```\n{traceback.format_exc()[-3000:]}\n```"
    return text, f"{name}: {time.time() - start:.1f} s (its deadline allowed {deadline - start:.1f} s)", failed


class WallClockStop(BaseException):
    """bench/device.sh's hard stop (SIGTERM from `timeout`): the summary is still written."""


def _stop(signum, frame) -> None:
    raise WallClockStop(f"stopped by signal {signum} at the call's wall-clock limit")


def main(argv: list[str] | None = None) -> int:
    """Every part in turn, each inside its guard; each row goes to rows.jsonl as it is measured and summary.md is
    rewritten after every part and once more on the way out, whatever ends the call. Files in --out: summary.md,
    rows.jsonl, and bench/device.sh's log.txt and gpu-tests.txt."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # a check on a shared machine: a busy core must not stall a second thread
    end = (args.started_at or time.time()) + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    st = out.lstat()  # every file here is written by its name: no other user may plant links among them
    if out.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o002:
        print(f"device.py: --out {out} is a link, another user's folder, or writable by all; allowed: a folder of "
              "yours alone", file=sys.stderr)  # fmt: skip
        return 2
    common.ROWS[:] = [out / common.ROWS_FILE]
    common.ROWS[0].touch()
    signal.signal(signal.SIGTERM, _stop)
    workdir = Path(tempfile.mkdtemp(prefix="tune-alexnet-device-"))
    began = time.time()
    header = ["# Device measurements", "", *machine_lines(args)]
    print("\n".join(header), flush=True)
    timings, sections, failed = [], [], []
    chosen = [name for name in PARTS if name in args.parts]
    timed = [name for name in chosen if PARTS[name][1] > 0] or chosen
    try:
        data, timing = load_data(args, workdir)
        timings.append(timing)
        for name in chosen:
            text, timing, part_failed = run_part(name, data, args, end, workdir, last=name == timed[-1])
            failed += [name] if part_failed else []
            timings.append(timing)
            sections.append(text)
            print("\n" + text + "\n", flush=True)
            write_summary(out, header, timings, failed, sections, quiet=True)
    except (Exception, WallClockStop) as exc:  # the data, or the hard stop: what was measured stays
        failed.append(f"the call ({type(exc).__name__}: {str(exc)[:200]})")
    finally:
        timings.append(f"total: {time.time() - (args.started_at or began):.1f} s of the {args.budget_s:.0f} s budget")
        write_summary(out, header, timings, failed, sections)
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def write_summary(
    out: Path, header: list[str], timings: list[str], failed: list[str], sections: list[str], quiet: bool = False
) -> None:
    """summary.md: the machine, the time each part took, whether Ray was loaded, every part's section."""
    ray_loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
    time_lines = [
        *[f"- {t}" for t in timings],
        f"- Ray modules loaded by this run: {', '.join(ray_loaded) if ray_loaded else 'none'}",
    ]
    failures = [f"- part failed: {name}" for name in failed]
    tmp = out / "summary.md.tmp"
    tmp.write_text("\n".join([*header, "", "## Time", "", *time_lines, *failures, "", *sections]) + "\n")
    tmp.replace(out / "summary.md")
    if not quiet:
        print("\n".join(["## Time", *time_lines, *failures]))


if __name__ == "__main__":
    sys.exit(main())
