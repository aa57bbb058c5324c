"""Part (c) of bench/device.py: what writing and persisting checkpoints costs per epoch at the new step's speed.

Study run 12 (SGD, lr 0.01, batch 128, batch norm) through train.train_cifar, trained with the step of parts (b)
and (d) (steps.chosen_step), with the default checkpoint pacing (best weights at most every `best_every_s`, a resume
state every `resume_every_s`), with a best-weights write at every new best, and run 48 (the same with Adam, the
largest resume state) with a resume state every epoch; from the training function's own metrics (checkpoint_s,
report_s).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import device_common as common
import steps

from tune_alexnet.data import Cifar
from tune_alexnet.grid import study_config
from tune_alexnet.settings import RUNTIME_DEFAULTS
from tune_alexnet.train import train_cifar

DEFAULTS = f"best every {RUNTIME_DEFAULTS['best_every_s']:g} s, resume every {RUNTIME_DEFAULTS['resume_every_s']:g} s"
CONFIGS = (  # (optimizer, study run, pacing label, runtime overrides)
    ("sgd", 12, f"default: {DEFAULTS}", {}),
    ("sgd", 12, "every new best (best_every_s 0)", {"best_every_s": 0.0}),
    ("adam", 48, "a resume state every epoch (resume_every_s 0)", {"resume_every_s": 0.0}),
)
HEADER = ["run", "pacing", "epoch", "checkpoint", "MB written", "train_s", "eval_s", "checkpoint_s", "report_s",
          "share"]  # fmt: skip


def part_checkpoint(data: Cifar, args: argparse.Namespace, deadline: float, workdir: Path) -> str:
    mode, chunk, why = steps.chosen_step(args, workdir)
    rows, summary, cut = [], [], ""
    for optimizer, run, pacing, overrides in CONFIGS:
        if cut:
            break
        store = common.LocalStore(workdir / f"checkpoint-{optimizer}-{len(rows)}", deadline=deadline)
        config = {**study_config(run), "width": args.width, "epochs": args.checkpoint_epochs, "patience": 100}
        try:
            train_cifar(config, data, store, runtime={"step": mode, "augment_chunk": chunk, **overrides})
        except common.OutOfTime as exc:
            cut = f"The part's time ran out after epoch {exc} of this configuration; later ones were skipped."
        costs, work = _rows(store.epochs, f"{run} ({optimizer})", pacing, rows)
        if costs:
            share = 100 * sum(costs) / (sum(costs) + sum(work))
            summary.append(f"run {run} ({optimizer}), {pacing}: checkpoints took {share:.1f}% of its {len(costs)} "
                           f"epoch(s) ({sum(work) / len(work):.2f} s of training and evaluation an epoch)")  # fmt: skip
        shutil.rmtree(store.root, ignore_errors=True)
    step = f"step {mode}, augment chunk {chunk} ({why})"
    return _text(data, args, step, cut, rows, summary)


def _rows(epochs: list[dict], configuration: str, pacing: str, rows: list[list]) -> tuple[list, list]:
    """Appends one row per epoch; the epochs' checkpoint costs and training + evaluation times."""
    costs, work = [], []
    for i, e in enumerate(epochs):
        report_s = epochs[i + 1]["report_s"] if i + 1 < len(epochs) else e["own_report_s"]
        cost = e["checkpoint_s"] + report_s
        costs.append(cost)
        work.append(e["train_s"] + e["eval_s"])
        rows.append([configuration, pacing, e["epoch"], e["checkpoint_kind"] or "none", f"{e['bytes'] / 1e6:,.1f}",
                     f"{e['train_s']:.2f}", f"{e['eval_s']:.2f}", f"{e['checkpoint_s']:.3f}", f"{report_s:.3f}",
                     f"{100 * cost / (work[-1] + cost):.1f}%"])  # fmt: skip
    return costs, work


def _text(data: Cifar, args, step: str, cut: str, rows: list[list], summary: list[str]) -> str:
    return "\n".join(
        [
            "## (c) Checkpoint share of an epoch at the new step's speed",
            "",
            f"Card: {common.card_name()}; width {args.width:g}; {len(data.train_x):,} train and {len(data.test_x):,} "
            f"test images an epoch; fp32 (TF32 on CUDA); {step}. train.train_cifar with a report callback that "
            f"copies each checkpoint folder to local disk, as Tune does with local storage. checkpoint_s: writing the "
            f"files, the best weights' copy from the device included (metrics); report_s: the report call, i.e. the "
            f"copy (the next epoch's metrics; for the last epoch the callback's own clock). Share = (checkpoint_s + "
            f"report_s) / (train_s + eval_s + both). {cut}",
            "",
            common.markdown(HEADER, rows),
            "",
            *[f"- {line}" for line in summary],
        ]
    )
