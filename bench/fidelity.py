"""Fidelity: chosen runs of the study, through the normal sweep, next to the original's accuracies.

Runs the study's recipe (the real Tuner, the real plateau stopper, up to 100 epochs, patience 5) for the
given run numbers, packed on the GPU as the sweep packs them, then prints per run: the original's
accuracy, this run's, the difference, epochs run and wall time per epoch, and projects the whole
108-run study's wall time on this machine.

    python bench/fidelity.py --data-dir /path/to/cifar10-jpeg   # train/<class>/*.jpg, test/<class>/*.jpg
    python bench/fidelity.py --data-dir ... --step graph --augment-chunk 8192   # with the faster step
"""

from __future__ import annotations

import argparse
import platform
import time

import pandas as pd
from part_projection import project

from tune_alexnet.cli import run_study
from tune_alexnet.report import markdown_table, reference_table
from tune_alexnet.settings import STEP_MODES, SweepSettings

# SGD's best (88.43%), SGD at lr 0.01 batch 128 (88.11%), Adam's best (88.14%), an RMSprop failure (13.54%).
DEFAULT_RUNS = (16, 12, 62, 79)


def projection(table: pd.DataFrame, epochs: pd.DataFrame, concurrent: int) -> tuple[float, str]:
    """Hours for all 108 runs: every batch size's median epoch time (under this packing) times the mean epochs a
    run took here, summed over the study's runs at each batch size, divided by the trials run at once."""
    per_epoch = epochs.groupby("batch_size")["train_s"].median()
    return project({int(bs): float(t) for bs, t in per_epoch.items()}, float(table["epochs_run"].mean()), concurrent)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    ap.add_argument("--step", choices=STEP_MODES, help="the training step (a runtime setting; default: the sweep's)")
    ap.add_argument("--augment-chunk", type=int, help="images augmented at once (default: the sweep's)")
    return ap.parse_args(argv)


def settings(args: argparse.Namespace) -> SweepSettings:
    runtime = {"step": args.step} if args.step else {}
    if args.augment_chunk is not None:
        runtime["augment_chunk"] = args.augment_chunk
    return SweepSettings(
        runs=tuple(int(r) for r in args.runs.split(",")),
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
        runtime=runtime,
    )


def rows(table: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """One row per run: the original's accuracy, this run's, the difference, epochs run, seconds an epoch."""
    ref = reference_table().set_index("run")["final_accuracy"]
    out = []
    for _, row in table.iterrows():
        e = epochs[epochs["trial_id"] == row["trial_id"]]
        out.append(
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
    return pd.DataFrame(out)


def device_name(epochs: pd.DataFrame) -> str:
    device = str(epochs["device"].iloc[0]) if len(epochs) else "?"
    import torch

    return device + (
        f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else f" ({platform.processor()})"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.time()
    path, exp, _ = run_study(settings(args))
    wall = time.time() - start
    table, epochs = exp.table, exp.epochs
    concurrent = max(1, int(round(1 / args.gpus_per_trial))) if args.gpus_per_trial > 0 else 1
    hours, how = projection(table, epochs, min(concurrent, len(table)))
    print(f"\nmachine: {device_name(epochs)}; experiment {path}; wall time {wall / 60:.1f} min for {len(table)} runs\n")
    print(markdown_table(rows(table, epochs)))
    print(f"\nprojected wall time of the whole 108-run study on this machine: {hours:.1f} h\n  = {how}")


if __name__ == "__main__":
    main()
