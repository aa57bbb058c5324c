"""Fidelity A/B: the study's own recipe against this project's path, on the same images, at once on one GPU.

Arms, for each study run and seed:
- original: bench/original.py, the study's recipe (per-image PIL transforms in DataLoader worker processes,
  fp32, PyTorch's default backend flags);
- project-bf16 and project-fp32: train.train_cifar with the config's precision set to bf16 and to fp32, and
  the sweep's other defaults (batched augmentation on the device; on CUDA TF32, and channels-last with bf16).
Each (run, arm, seed) trains in its own process with 1/K of the GPU's memory until the plateau rule ends it or
the budget cuts it (a cut run gives no number). The table gives each seed's best test accuracy, each arm's mean
and spread between seeds, and each project arm's mean minus the original arm's, with both spreads beside it.

    bash bench/device.sh --parts ab              # on the GPU machine: run 12, seeds 0 and 1 (--ab-runs 12,16: run 16 too)
    bash bench/device.sh --smoke --parts ab --data-dir ../shared/data/cifar10-mini   # a CPU check, in seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
from functools import partial
from pathlib import Path

import device_common as common
import original

from tune_alexnet.data import Cifar
from tune_alexnet.grid import study_config
from tune_alexnet.settings import TRIAL_DEFAULTS
from tune_alexnet.train import train_cifar

ARMS = ("original", "project-bf16", "project-fp32")
AB_RUNS = (12,)  # SGD, lr 0.01, batch 128, no dropout, BN; run 16 (the same at lr 0.001, batch 32) if time allows
AB_SEEDS = (0, 1)
SMOKE_WIDTH = 0.0625  # narrower than the other parts' smoke: bf16 on a CPU is slow


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--ab-runs", default=",".join(map(str, AB_RUNS)), help="the A/B's study runs (e.g. 12,16)")
    ap.add_argument(
        "--ab-seeds", default=",".join(map(str, AB_SEEDS)), help="the A/B's seeds (2 or more give a spread)"
    )
    ap.add_argument(
        "--ab-workers",
        type=int,
        help="DataLoader worker processes of each original-recipe run (default: the CPU cores the other runs "
        "leave, shared out; 1 with --smoke)",
    )
    ap.add_argument("--ab-epochs", type=int, help="the A/B's epoch limit (default: the study's; 2 with --smoke)")
    ap.add_argument("--ab-images", type=int, help="train images of each A/B run (default: all; 64 with --smoke)")


def finish_arguments(args: argparse.Namespace) -> None:
    """After the runner's own arguments (the width among them) are final."""
    args.ab_runs = tuple(int(v) for v in args.ab_runs.split(","))
    args.ab_seeds = tuple(int(v) for v in args.ab_seeds.split(","))
    args.ab_width = min(args.width, SMOKE_WIDTH) if args.smoke else args.width
    if args.smoke:
        args.ab_workers = args.ab_workers or 1
        args.ab_epochs = args.ab_epochs or 2
        args.ab_images = args.ab_images or 64


def _echo(run: int, arm: str, seed: int, metrics: dict) -> str:
    return (
        f"run {run} {arm} seed {seed} epoch {metrics['epoch']}: test {metrics['val_acc']:.2f}%, best "
        f"{metrics['best_val_acc']:.2f}%, {metrics['train_s'] + metrics['eval_s']:.1f} s"
    )


def _ab_worker(
    run: int,
    arm: str,
    seed: int,
    arrays: str,
    width: float,
    epochs: int | None,
    images: int | None,
    deadline: float,
    log: str,
    threads: int,
    memory_fraction: float,
    loader_workers: int,
) -> None:
    """One (run, arm, seed) in its own process, until the plateau rule ends it or the deadline nears."""
    common.worker_setup(threads, memory_fraction)
    data = common.load_arrays(Path(arrays))
    data = common.spread_subset(data, images) if images else data
    config = {**study_config(run), "width": width, "seed": seed, **({"epochs": epochs} if epochs else {})}
    recorder = common.LocalStore(None, deadline=deadline, log=Path(log), echo=partial(_echo, run, arm, seed))
    if arm == "original":
        common.logged_run(lambda: original.train_original(config, data, recorder, loader_workers), Path(log))
    else:
        precision = arm.removeprefix("project-")
        common.logged_run(lambda: train_cifar({**config, "precision": precision}, data, recorder), Path(log))


def log_path(workdir: Path, run: int, arm: str, seed: int) -> Path:
    return Path(workdir) / f"ab-{run}-{arm}-{seed}.jsonl"


def part_ab(data: Cifar, args: argparse.Namespace, deadline: float, workdir: Path) -> str:
    on_cuda = common.device_of_this_machine().type == "cuda"
    k = len(args.ab_runs) * len(ARMS) * len(args.ab_seeds)
    originals = len(args.ab_runs) * len(args.ab_seeds)
    loader_workers = args.ab_workers or max(1, ((os.cpu_count() or 2) - k) // originals)
    fraction = 1.0 / k if on_cuda else 1.0
    arrays = str(common.arrays_dir(workdir))
    jobs = [
        (
            _ab_worker,
            (run, arm, seed, arrays, args.ab_width, args.ab_epochs, args.ab_images, deadline)
            + (str(log_path(workdir, run, arm, seed)), 1, fraction, loader_workers),
        )
        for run in args.ab_runs
        for arm in ARMS
        for seed in args.ab_seeds
    ]
    common.run_processes(jobs, deadline)
    setting = (
        f"{k} processes at once" + (f", each with 1/{k} of the GPU's memory" if on_cuda else "") + f"; the original "
        f"arm's DataLoader has {loader_workers} worker process(es) a run"
    )
    for row in detail_rows(args.ab_runs, args.ab_seeds, workdir):  # each run's outcome, into rows.jsonl
        common.emit(
            "ab", dict(zip(("run", "arm", "seed", "epochs", "best_epoch", "epoch_s", "img_s", "precision"), row))
        )
    return ab_text(data, args, workdir, setting)


def seed_cell(log: Path, patience: int) -> tuple[str, float | None]:
    """A seed's cell and its final best accuracy; None when it did not finish (cut, error, killed)."""
    epochs, end = common.read_log(log)
    detail = end.get("detail", "")
    if not epochs:
        if end["end"] == "error":
            return f"error before its first epoch ended: {detail}", None
        return "cut before its first epoch ended: no accuracy", None
    last = epochs[-1]
    best = last["best_val_acc"]
    if end["end"] == "finished":
        why = common.finish_reason(last, patience)
        return f"{best:.2f}% ({why} at epoch {last['epoch']}, best at epoch {last['best_epoch']})", best
    if end["end"] == "error":
        return f"error after epoch {last['epoch']}: {detail}", None
    return f"cut at epoch {last['epoch']}, best so far {best:.2f}%", None


def spread(values: list[float]) -> str:
    """Between seeds: max - min for two, the standard deviation for three or more."""
    if len(values) >= 3:
        return f"{statistics.stdev(values):.2f} (std)"
    return f"{max(values) - min(values):.2f} (max-min)" if len(values) == 2 else "one seed: none"


def arm_summary(finals: list[float | None]) -> tuple[float | None, str, str]:
    """(mean, mean cell, spread cell); a mean only when every seed finished, never from a cut run."""
    unfinished = sum(v is None for v in finals)
    if unfinished:
        return None, f"not computed: {unfinished} of {len(finals)} seed(s) did not finish", ""
    mean = statistics.fmean(finals)
    return mean, f"{mean:.2f}%", spread(finals)


def ab_rows(runs, seeds, workdir: Path, patience: int) -> list[list]:
    """One row per (run, arm): each seed's cell, the mean, the spread, the difference from the original arm."""
    rows = []
    for run in runs:
        summaries = {}
        for arm in ARMS:
            cells = [seed_cell(log_path(workdir, run, arm, seed), patience) for seed in seeds]
            summaries[arm] = (cells, *arm_summary([final for _, final in cells]))
        base_mean, _, base_spread = summaries["original"][1:]
        for arm in ARMS:
            cells, mean, mean_cell, spread_cell = summaries[arm]
            if arm == "original":
                diff = "reference"
            elif mean is None or base_mean is None:
                diff = "not computed: a seed of this arm or of the original did not finish"
            else:
                diff = f"{mean - base_mean:+.2f} points (spread: this arm {spread_cell}, original {base_spread})"
            rows.append([run, arm, *[text for text, _ in cells], mean_cell, spread_cell, diff])
    return rows


def detail_rows(runs, seeds, workdir: Path) -> list[list]:
    rows = []
    for run in runs:
        for arm in ARMS:
            for seed in seeds:
                epochs, _ = common.read_log(log_path(workdir, run, arm, seed))
                if not epochs:
                    rows.append([run, arm, seed, 0, "", "", "", ""])
                    continue
                rate = statistics.median(e["images_per_s"] for e in epochs)
                timing = f"{common.median_epoch_s(epochs):.1f}"
                last = epochs[-1]
                rows.append(
                    [run, arm, seed, len(epochs), last["best_epoch"], timing, f"{rate:,.0f}", last["precision"]]
                )
    return rows


def ab_text(data: Cifar, args: argparse.Namespace, workdir: Path, setting: str) -> str:
    from tune_alexnet.report import reference_table  # pandas: the parent only

    ref = reference_table().set_index("run")["final_accuracy"]
    patience, limit = TRIAL_DEFAULTS["patience"], args.ab_epochs or TRIAL_DEFAULTS["epochs"]
    published = "; ".join(f"run {run}: {float(ref[run]):.2f}%" for run in args.ab_runs)
    seeds = [f"seed {s}" for s in args.ab_seeds]
    train = min(len(data.train_x), args.ab_images or len(data.train_x))
    detail = [
        "run",
        "arm",
        "seed",
        "epochs",
        "best epoch",
        "s / epoch (train + eval, median)",
        "train img/s",
        "precision",
    ]
    return "\n".join(
        [
            "## (f) Fidelity A/B: the study's own recipe and this project's path on the same images",
            "",
            f"Card: {common.card_name()}; data: {data.source} ({train:,} train and {len(data.test_x):,} "
            f"test images, the same arrays for every arm); width {args.ab_width:g}; up to {limit} epochs, patience "
            f"{patience}, the test set every epoch; {setting}. original: bench/original.py (per-image PIL transforms, "
            f"fp32, PyTorch's default backend flags). project-bf16 / project-fp32: train.train_cifar with precision "
            f"bf16 / fp32 and the sweep's other defaults (batched augmentation on the device; on CUDA TF32, and "
            f"channels-last with bf16). Each number is a seed's best test accuracy; a run the budget cut short says so and counts in "
            f"no mean. The study's published results (CIFAR-10's original pixels, one run each): {published}.",
            "",
            common.markdown(
                ["run", "arm", *seeds, "mean", "spread between seeds", "difference from the original arm's mean"],
                ab_rows(args.ab_runs, args.ab_seeds, workdir, patience),
            ),
            "",
            common.markdown(detail, detail_rows(args.ab_runs, args.ab_seeds, workdir)),
        ]
    )
