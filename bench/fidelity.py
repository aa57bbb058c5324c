"""Fidelity: chosen runs of the study, through the normal sweep, next to the original's accuracies.

Runs the study's recipe (the real Tuner, the real plateau stopper, up to 100 epochs, patience 5) for the
given run numbers, packed on the GPU as the sweep packs them, then prints per run: the original's
accuracy, this run's, the difference, epochs run and wall time per epoch, and projects the whole
108-run study's wall time on this machine.

    python bench/fidelity.py --data-dir /path/to/cifar10-jpeg   # train/<class>/*.jpg, test/<class>/*.jpg
"""

from __future__ import annotations

import argparse
import platform
import time

import pandas as pd

from tune_alexnet.cli import run_study
from tune_alexnet.report import markdown_table, reference_table
from tune_alexnet.settings import BATCH_SIZES, SweepSettings

# SGD's best (88.43%), SGD at lr 0.01 batch 128 (88.11%), Adam's best (88.14%), an RMSprop failure (13.54%).
DEFAULT_RUNS = (16, 12, 62, 79)
STUDY_RUNS = 108


def projection(table: pd.DataFrame, epochs: pd.DataFrame, concurrent: int) -> tuple[float, str]:
    """Hours for all 108 runs: every batch size's measured epoch time (under this packing) times the
    epochs a run takes, summed over the study's 36 runs per batch size, divided by the trials run at once."""
    per_epoch = epochs.groupby("batch_size")["train_s"].median()
    mean_epochs = table["epochs_run"].mean()
    fallback = per_epoch.mean()
    total_s = sum(STUDY_RUNS / len(BATCH_SIZES) * mean_epochs * per_epoch.get(bs, fallback) for bs in BATCH_SIZES)
    how = (
        f"36 runs per batch size x {mean_epochs:.1f} epochs a run (mean measured here) x median epoch time at "
        f"that batch size ({', '.join(f'{bs}: {t:.1f}s' for bs, t in per_epoch.items())}; unmeasured sizes take "
        f"the mean), / {concurrent} trials at once"
    )
    return total_s / concurrent / 3600, how


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="the full CIFAR-10 ImageFolder (cifar10-jpeg.tar.gz unpacked)")
    ap.add_argument("--runs", default=",".join(map(str, DEFAULT_RUNS)), help="study run numbers, comma-separated")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--gpus-per-trial", type=float, default=0.25)
    ap.add_argument("--cpus-per-trial", type=float, default=2)
    ap.add_argument("--storage", default="ray_results")
    ap.add_argument("--name", default=time.strftime("fidelity-%Y%m%d-%H%M%S"))
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--subset", type=int, help="train images per class, for a smoke run (default: all)")
    ap.add_argument("--width", type=float, default=1.0, help="AlexNet width, for a smoke run (default: 1, the study's)")
    args = ap.parse_args()

    runs = tuple(int(r) for r in args.runs.split(","))
    start = time.time()
    path, exp, _ = run_study(
        SweepSettings(
            runs=runs,
            epochs=args.epochs,
            patience=args.patience,
            data_dir=args.data_dir,
            storage=args.storage,
            name=args.name,
            gpus_per_trial=args.gpus_per_trial,
            cpus_per_trial=args.cpus_per_trial,
            resume=args.resume,
            subset=args.subset,
            trial={"width": args.width},
        )
    )
    wall = time.time() - start
    table, epochs = exp.table, exp.epochs
    ref = reference_table().set_index("run")["final_accuracy"]
    rows = []
    for _, row in table.iterrows():
        e = epochs[epochs["trial_id"] == row["trial_id"]]
        rows.append(
            {
                "run": int(row["run"]),
                "optimizer": row["optimizer"],
                "lr": row["lr"],
                "batch": row["batch_size"],
                "dropout": row["dropout"],
                "BN": row["batchnorm"],
                "original %": ref[row["run"]],
                "this run %": row["final_accuracy"],
                "difference": row["final_accuracy"] - ref[row["run"]],
                "epochs run": row["epochs_run"],
                "s / epoch": e["train_s"].median(),
                "status": row["status"],
            }
        )
    out = pd.DataFrame(rows)
    device = str(epochs["device"].iloc[0]) if len(epochs) else "?"
    try:
        import torch

        device += f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else f" ({platform.processor()})"
    except Exception:
        pass
    concurrent = max(1, int(round(1 / args.gpus_per_trial))) if args.gpus_per_trial > 0 else 1
    hours, how = projection(table, epochs, min(concurrent, len(table)))
    print(f"\nmachine: {device}; experiment {path}; wall time {wall / 60:.1f} min for {len(table)} runs\n")
    print(markdown_table(out))
    print(f"\nprojected wall time of the whole 108-run study on this machine: {hours:.1f} h\n  = {how}")


if __name__ == "__main__":
    main()
