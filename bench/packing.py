"""Fractional-GPU packing: aggregate training images/s of 1, 2 and 4 concurrent trials sharing one GPU.

Each point is a real sweep (the real Tuner and training function) of K identical trials of one study run at
`--gpus-per-trial 1/K`, so all K run at once on one GPU with their memory capped at 1/K of it. The aggregate
is K x the median images/s of a trial's epochs after the first (the first includes cudnn autotuning).
Without a GPU it runs the same sweeps on the CPU (for a smoke test), where the numbers mean little.

    python bench/packing.py --data-dir /path/to/cifar10-jpeg --concurrency 1,2,4 --epochs 3
"""
from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from tune_alexnet.report import markdown_table
from tune_alexnet.cli import run_study
from tune_alexnet.settings import SweepSettings


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--run", type=int, default=12, help="the study run to repeat (default 12: SGD, batch 128)")
    ap.add_argument("--concurrency", default="1,2,4", help="trials sharing the GPU, comma-separated")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--cpus-per-trial", type=float, default=2)
    ap.add_argument("--storage", default="ray_results")
    ap.add_argument("--subset", type=int)
    ap.add_argument("--width", type=float, default=1.0)
    args = ap.parse_args()

    gpu = torch.cuda.is_available()
    rows = []
    for k in (int(c) for c in args.concurrency.split(",")):
        share = 1.0 / k if gpu else 0.0
        _, exp, _ = run_study(SweepSettings(runs=(args.run,), repeats=k, epochs=args.epochs, patience=args.epochs,
                                         data_dir=args.data_dir, subset=args.subset, storage=args.storage,
                                         name=time.strftime(f"packing-{k}-%Y%m%d-%H%M%S"), gpus_per_trial=share,
                                         cpus_per_trial=args.cpus_per_trial, trial={"width": args.width}))
        epochs = exp.epochs[exp.epochs["epoch"] > 1] if args.epochs > 1 else exp.epochs
        per_trial = epochs.groupby("trial_id")["images_per_s"].median()
        rows.append({"trials at once": k, "gpus per trial": share, "img/s per trial": per_trial.mean(),
                     "aggregate img/s": per_trial.sum(), "device": ", ".join(sorted(set(epochs["device"])))})
    table = pd.DataFrame(rows)
    table["vs 1 trial"] = table["aggregate img/s"] / table["aggregate img/s"].iloc[0]
    name = torch.cuda.get_device_name(0) if gpu else "CPU (no GPU: a smoke run, not a measurement)"
    print(f"\nmachine: {name}; study run {args.run}; {args.epochs} epochs per trial\n")
    print(markdown_table(table))


if __name__ == "__main__":
    main()
