"""Part (c) of bench/device.py: what writing and persisting checkpoints costs per epoch on this machine.

SGD and Adam at full width, from the training function's own metrics (checkpoint_s, report_s), at the default
resume interval and with a resume state every epoch.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import device_common as common
import torch

from tune_alexnet.data import Cifar
from tune_alexnet.grid import study_config
from tune_alexnet.settings import RUNTIME_DEFAULTS
from tune_alexnet.train import train_cifar

CHECKPOINT_RUNS = (("sgd", 12), ("adam", 48))  # the same settings but the optimizer: lr 0.01, batch 128, BN
HEADER = [
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
]


def part_checkpoint(data: Cifar, args: argparse.Namespace, deadline: float, workdir: Path) -> str:
    rows, summary, cut = [], [], ""
    for optimizer, run in CHECKPOINT_RUNS:
        for interval in (RUNTIME_DEFAULTS["resume_every_s"], 0.0):
            if cut:
                break
            store = common.LocalStore(workdir / f"checkpoint-{optimizer}-{interval:g}", deadline=deadline)
            config = {**study_config(run), "width": args.width, "epochs": args.checkpoint_epochs, "patience": 100}
            try:
                train_cifar(config, data, store, runtime={"resume_every_s": interval})
            except common.OutOfTime as exc:
                cut = f"The part's time ran out after epoch {exc} of this configuration; later ones were skipped."
            costs, work = _rows(store.epochs, f"{optimizer} (run {run})", f"{interval:g} s", rows)
            if costs:
                summary.append(
                    f"{optimizer}, resume interval {interval:g} s: checkpoints took "
                    f"{100 * sum(costs) / (sum(costs) + sum(work)):.1f}% of the time of its "
                    f"{len(costs)} epoch(s)"
                )
            shutil.rmtree(store.root, ignore_errors=True)
    return _text(data, args, cut, rows, summary)


def _rows(epochs: list[dict], configuration: str, interval: str, rows: list[list]) -> tuple[list, list]:
    """Appends one row per epoch; the epochs' checkpoint costs and training + evaluation times."""
    costs, work = [], []
    for i, e in enumerate(epochs):
        report_s = epochs[i + 1]["report_s"] if i + 1 < len(epochs) else e["own_report_s"]
        cost = e["checkpoint_s"] + report_s
        share = cost / (e["train_s"] + e["eval_s"] + cost)
        costs.append(cost)
        work.append(e["train_s"] + e["eval_s"])
        rows.append(
            [
                configuration,
                interval,
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
    return costs, work


def _text(data: Cifar, args, cut: str, rows: list[list], summary: list[str]) -> str:
    precision = "bf16" if torch.cuda.is_available() else "fp32"
    return "\n".join(
        [
            "## (c) Checkpoint share of an epoch",
            "",
            f"Card: {common.card_name()}; width {args.width:g}; {len(data.train_x):,} train and {len(data.test_x):,} "
            f"test images an epoch; {precision}. train.train_cifar with a report callback "
            f"that copies each checkpoint folder to local disk, as Tune does with local storage. checkpoint_s: writing "
            f"the files (metrics); report_s: the report call, i.e. the copy (the next epoch's metrics; for the last "
            f"epoch the callback's own clock). Share = (checkpoint_s + report_s) / (train_s + eval_s + both). Resume "
            f"interval {RUNTIME_DEFAULTS['resume_every_s']:g} s is the default (best weights when the accuracy "
            f"improves, a resume state every so often); 0 s writes the resume state every epoch. {cut}",
            "",
            common.markdown(HEADER, rows),
            "",
            *[f"- {line}" for line in summary],
        ]
    )
