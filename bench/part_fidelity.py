"""Part (d) of bench/device.py: study runs trained with the study's full recipe, next to the original's accuracy.

The runs train concurrently on the one GPU, each in its own process with 1/K of its memory, until they finish or
the budget ends; a run cut short says so and gives no final number. They train with the step of parts (b) and
(c) (steps.chosen_step: the fastest part (a) measured, or --step and --augment-chunk), as runtime settings: the
trial's config, and so what it computes, is the study's.
"""

from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path

import device_common as common
import steps

from tune_alexnet.data import Cifar
from tune_alexnet.grid import study_config
from tune_alexnet.settings import TRIAL_DEFAULTS
from tune_alexnet.train import train_cifar

FIDELITY_RUNS = (16, 12, 62, 79)  # SGD's best, SGD at batch 128, Adam's best, an RMSprop failure
HEADER = [
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
]


def _echo(run: int, original: float, metrics: dict) -> str:
    return (
        f"run {run} epoch {metrics['epoch']}: test {metrics['val_acc']:.2f}%, best "
        f"{metrics['best_val_acc']:.2f}% (original {original:.2f}%), "
        f"{metrics['train_s'] + metrics['eval_s']:.1f} s"
    )


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
    runtime: dict,
) -> None:
    """One study run with the full recipe, in its own process, until it ends itself or the deadline nears."""
    common.worker_setup(threads, memory_fraction)
    data = common.load_arrays(Path(arrays))
    echo = partial(_echo, run, original)
    recorder = common.LocalStore(Path(store), deadline=deadline, log=Path(log), keep_last=True, echo=echo)
    config = {**study_config(run), "width": width}
    common.logged_run(lambda: train_cifar(config, data, recorder, runtime=runtime), Path(log))


def log_path(workdir: Path, run: int) -> Path:
    """A fidelity run's JSON-lines log: its epochs' metrics and how it ended."""
    return Path(workdir) / f"fidelity-{run}.jsonl"


def _fidelity_row(run: int, original: float, log: Path, max_epochs: int, patience: int) -> list:
    epochs, end = common.read_log(log)
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
        why = common.finish_reason(last, patience)
        result = f"{best:.2f}% (finished: {why} at epoch {last['epoch']}, best at epoch {last['best_epoch']})"
        diff = f"{best - original:+.2f}"
    elif end["end"] == "error":
        result, diff = f"error after epoch {last['epoch']}: {end.get('detail', '')}", ""
    else:
        result, diff = f"cut at epoch {last['epoch']} of <={max_epochs}: best so far {best:.2f}%", ""
    cost = sum(r["checkpoint_s"] + r["own_report_s"] for r in epochs)
    share = cost / (cost + sum(r["train_s"] + r["eval_s"] for r in epochs))
    return [run, *setting, result, diff, len(epochs), f"{common.median_epoch_s(epochs):.1f}", f"{100 * share:.1f}%"]


def part_fidelity(data: Cifar, args: argparse.Namespace, deadline: float, workdir: Path) -> str:
    from tune_alexnet.report import reference_table  # pandas: the parent only

    ref = reference_table().set_index("run")["final_accuracy"]
    on_cuda = common.device_of_this_machine().type == "cuda"
    k = len(args.runs)
    threads = 1 if not on_cuda else max(1, (os.cpu_count() or 2) // k)
    fraction = 1.0 / k if on_cuda else 1.0
    arrays = common.arrays_dir(workdir)
    mode, chunk, why = steps.chosen_step(args, workdir)
    runtime = {"step": mode, "augment_chunk": chunk}
    logs = {run: log_path(workdir, run) for run in args.runs}
    jobs = [
        (
            _fidelity_worker,
            (run, str(arrays), args.width, deadline, str(logs[run]), threads, fraction)
            + (str(workdir / f"fidelity-{run}"), float(ref[run]), runtime),
        )
        for run in args.runs
    ]
    common.run_processes(jobs, deadline)
    rows = [
        _fidelity_row(run, float(ref[run]), logs[run], TRIAL_DEFAULTS["epochs"], TRIAL_DEFAULTS["patience"])
        for run in args.runs
    ]
    return "\n".join(
        [
            "## (d) Fidelity: study runs with the full recipe, next to the original's accuracy",
            "",
            f"Card: {common.card_name()}; width {args.width:g}; {k} runs at once, each its own process"
            + (f" with 1/{k} of the GPU's memory" if on_cuda else "")
            + f"; the recipe: up to {TRIAL_DEFAULTS['epochs']} epochs, patience {TRIAL_DEFAULTS['patience']}, "
            f"augmentation, the whole train set ({common.train_images(arrays):,} images) and test set every epoch; "
            f"checkpoints copied to local disk; step {mode}, augment chunk {chunk} ({why}). A run the time budget cut "
            f"short says so: its number is the best so far, not a result.",
            "",
            common.markdown(HEADER, rows),
        ]
    )
