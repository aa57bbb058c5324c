"""What checkpointing costs per epoch through the real Tune path: bytes written and seconds of reporting.

Each configuration is one trial of a real `tune.Tuner` built by the project's own sweep code
(`tune_alexnet.preflight.prepare` and `tune_alexnet.sweep.run`, on a local Ray started with
`ray.init(address="local")`), so Tune's copy of each checkpoint into the experiment folder and its experiment
snapshots happen as in a sweep.

- bytes per epoch: the size of every checkpoint folder Tune persisted, taken when Tune registers it (a Tune
  callback's `on_checkpoint`, before Tune may delete an older one), summed over the trial, divided by its
  epochs. Checkpoints that Tune deleted later count too.
- seconds per epoch: the time between two epochs' results reaching the driver (a Tune callback's
  `on_trial_result`, on one clock) minus the later epoch's own training and evaluation time: the checkpoint
  writing, Tune's persisting of it, the driver's handling of the result (its experiment snapshot included)
  and the bookkeeping between epochs. (`time_this_iter_s` would miss the driver's part: the trial waits in
  its report call until the driver asks for the next result.) Epoch 1 has no predecessor and is left out.
  Where the metrics have them, checkpoint_s (writing the files) and report_s (the report call, reported with
  the next epoch) are shown as well.
- finished run: the experiment folder's size after the trial ended, and the part of it in checkpoints.

A tree other than this checkout (an older commit, checked out with `git worktree add`) is measured the same
way in a process of its own, with that tree first on sys.path, through that tree's own sweep API:

    git worktree add /tmp/before 689fff8
    python bench/checkpoint.py --data-dir ../shared/data/cifar10-mini --subset 2 --epochs 8 --before /tmp/before
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"sgd": 12, "adam": 48}  # lr 0.01, batch 128, no dropout, batch norm: only the optimizer differs
PERSISTED: dict[str, int] = {}  # checkpoint folder@trial -> bytes, filled on the driver by the Tune callback
ARRIVALS: dict[str, dict[int, float]] = {}  # trial -> {training_iteration: driver's clock when its result came}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def load_tree(tree: Path) -> ModuleType:
    """The tree's sweep module, its package checked to come from that tree."""
    sys.path.insert(0, str(tree))
    import tune_alexnet
    from tune_alexnet import sweep

    if not Path(tune_alexnet.__file__).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"tune_alexnet came from {tune_alexnet.__file__}, not from {tree}")
    return sweep


def register_sizes(sweep: ModuleType) -> None:
    """Every run config the tree's sweep builds gets a Tune callback that records, on the driver, when each
    result arrives and the size of each checkpoint Tune persists."""
    from ray import tune

    class Sizes(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            ARRIVALS.setdefault(trial.trial_id, {})[result["training_iteration"]] = time.perf_counter()

        def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
            PERSISTED[Path(checkpoint.path).name + "@" + trial.trial_id] = folder_bytes(Path(checkpoint.path))

    original_run_config = sweep._run_config

    def run_config_with_sizes(*args, **kwargs):  # (s, quiet, guards) before, (s, root, quiet, guards) now
        config = original_run_config(*args, **kwargs)
        config.callbacks = [*(config.callbacks or []), Sizes()]
        return config

    sweep._run_config = run_config_with_sizes


def run_one(sweep: ModuleType, s, data) -> None:
    """One sweep through whichever API the tree has: preflight.prepare's Plan and sweep.run (now);
    sweep.prepare and sweep.run_sweep (the previous design); sweep.run_sweep(settings, data) (the first)."""
    try:
        from tune_alexnet import preflight
    except ImportError:
        preflight = None
    if hasattr(preflight, "prepare") and hasattr(sweep, "run"):
        from tune_alexnet.storage import RESERVE_NAME, release_reserve

        with preflight.prepare(s, data) as plan:  # releases the lock; leaves our own ray.init running
            sweep.run(plan, quiet=True)
        release_reserve(os.path.join(plan.exp_uri, RESERVE_NAME))  # as the command line does: not a checkpoint
    elif hasattr(sweep, "prepare"):
        prepared = sweep.prepare(s)
        try:
            sweep.run_sweep(prepared[0], prepared[1], data)
        finally:
            if len(prepared) > 2 and hasattr(prepared[2], "release"):
                prepared[2].release()
    else:
        sweep.run_sweep(s, data)


def settings(
    sweep: ModuleType, run: int, epochs: int, storage: Path, name: str, interval: float | None, width: float
) -> object:
    """The tree's SweepSettings for one trial of study run `run`: its recipe but `epochs` (patience above it),
    2 CPUs, no GPU, no retry."""
    try:
        from tune_alexnet.settings import SweepSettings
    except ImportError:  # the first tree kept it in sweep.py
        SweepSettings = sweep.SweepSettings
    extra = {} if interval is None else {"runtime": {"resume_every_s": interval}}
    return SweepSettings(runs=(run,), epochs=epochs, patience=100, storage=str(storage), name=name, cpus_per_trial=2,
                         gpus_per_trial=0, max_failures=0, trial={"width": width}, **extra)  # fmt: skip


def measure(tree: Path, label: str, args: argparse.Namespace, intervals: list[float | None]) -> list[dict]:
    """Runs every configuration of one tree through its own sweep code; one result dict per configuration."""
    sweep = load_tree(tree)
    import ray

    from tune_alexnet.data import load_cifar10

    register_sizes(sweep)
    data = load_cifar10(args.data_dir, args.subset, progress=False)
    storage = Path(args.storage)
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="ERROR")
    out = []
    try:
        # Ray's workers put the driver's working directory first on sys.path: check they import this tree.
        seen = ray.get(ray.remote(_package_file).remote())
        if not Path(seen).resolve().is_relative_to(tree.resolve()):
            raise RuntimeError(f"Ray's workers import tune_alexnet from {seen}, not from {tree}")
        for repeat, optimizer, interval in itertools.product(range(args.repeats), args.optimizers, intervals):
            run = RUNS[optimizer]
            name = f"{label}-{optimizer}-{'default' if interval is None else f'{interval:g}'}-{repeat}"
            PERSISTED.clear()
            ARRIVALS.clear()
            start = time.time()
            run_one(sweep, settings(sweep, run, args.epochs, storage, name, interval, args.width), data)
            wall = time.time() - start
            out.append(summarise(storage / name, label, optimizer, run, interval, dict(PERSISTED), dict(ARRIVALS),
                                 wall))  # fmt: skip
    finally:
        ray.shutdown()
    return out


def _package_file() -> str:
    import tune_alexnet

    return tune_alexnet.__file__


def summarise(
    exp: Path,
    label: str,
    optimizer: str,
    run: int,
    interval: float | None,
    persisted: dict,
    arrivals: dict,
    wall: float,
) -> dict:
    """One configuration's numbers from its experiment folder and the sizes Tune's callback saw."""
    results = list(exp.glob("*/result.json"))
    if len(results) != 1:
        raise RuntimeError(f"expected one trial in {exp}, found {len(results)}")
    rows = [json.loads(line) for line in results[0].read_text().splitlines() if line.strip()]
    trial_id = rows[0]["trial_id"]
    sizes = {k.split("@")[0]: v for k, v in persisted.items() if k.endswith("@" + trial_id)}
    epochs = len(rows)
    written = sum(sizes.values())
    came = arrivals.get(trial_id, {})
    overhead, ckpt_s, report_s = [], [], []
    for i, r in enumerate(rows):
        own = r["train_s"] + r["eval_s"] if "train_s" in r else r["epoch_time_s"]
        it = r["training_iteration"]
        if i > 0 and it in came and it - 1 in came:  # one epoch's cycle on the driver's clock, less its work
            overhead.append(came[it] - came[it - 1] - own)
        if "checkpoint_s" in r:
            ckpt_s.append(r["checkpoint_s"])
            if i > 0:
                report_s.append(r["report_s"])  # the previous epoch's report call
    kinds: dict[str, int] = {}
    for r in rows:
        kind = r.get("checkpoint_kind", "every epoch" if r.get("checkpoint_dir_name") else None) or "none"
        kinds[kind] = kinds.get(kind, 0) + 1
    folder = folder_bytes(exp)
    kept = sum(folder_bytes(d) for d in exp.glob("*/checkpoint_*") if d.is_dir())
    return {
        "tree": label,
        "optimizer": optimizer,
        "run": run,
        "interval": interval,
        "epochs": epochs,
        "checkpoints": len(sizes),
        "kinds": kinds,
        "bytes_per_epoch": written / epochs,
        "bytes_total": written,
        "seconds_per_epoch": statistics.mean(overhead) if overhead else float("nan"),
        "checkpoint_s": statistics.mean(ckpt_s) if ckpt_s else None,
        "report_s": statistics.mean(report_s) if report_s else None,
        "train_eval_s": statistics.mean(
            r["train_s"] + r["eval_s"] if "train_s" in r else r["epoch_time_s"] for r in rows[1:] or rows
        ),
        "folder_bytes": folder,
        "kept_bytes": kept,
        "wall_s": wall,
    }


def combine(results: list[dict]) -> list[dict]:
    """One row per configuration: the median of its repeats, with the spread of the seconds."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["tree"], r["optimizer"], r["interval"]), []).append(r)
    rows = []
    for same in groups.values():
        row = dict(same[0])
        for key in (
            "bytes_per_epoch",
            "seconds_per_epoch",
            "checkpoint_s",
            "report_s",
            "train_eval_s",
            "folder_bytes",
            "kept_bytes",
            "checkpoints",
        ):
            values = [r[key] for r in same if r[key] is not None]
            row[key] = statistics.median(values) if values else None
        row["seconds_all"] = sorted(r["seconds_per_epoch"] for r in same)
        row["kinds"] = same[0]["kinds"] if all(r["kinds"] == same[0]["kinds"] for r in same) else {"varied": len(same)}
        rows.append(row)
    return rows


def table(results: list[dict], default_interval: float | None) -> str:
    rows = []
    for r in combine(results):
        if r["interval"] is None:
            interval = (
                "that tree's default"
                if r["tree"] == "before"
                else (f"default ({default_interval:g} s)" if default_interval is not None else "default")
            )
        else:
            interval = f"{r['interval']:g} s"
        split = (
            f"{r['checkpoint_s']:.3f} + {r['report_s']:.3f}"
            if r["checkpoint_s"] is not None and r["report_s"] is not None
            else "not in the metrics"
        )
        seconds = f"{r['seconds_per_epoch']:.2f}"
        if len(r["seconds_all"]) > 1:
            seconds += f" ({', '.join(f'{v:.2f}' for v in r['seconds_all'])})"
        rows.append(
            [
                r["tree"],
                r["optimizer"],
                interval,
                r["epochs"],
                ", ".join(f"{k} x{n}" for k, n in r["kinds"].items()),
                f"{r['checkpoints']:g}",
                f"{r['bytes_per_epoch'] / 1e6:,.1f}",
                seconds,
                split,
                f"{r['train_eval_s']:.2f}",
                f"{r['folder_bytes'] / 1e6:,.1f}",
                f"{r['kept_bytes'] / 1e6:,.1f}",
            ]
        )
    return markdown(
        [
            "tree",
            "optimizer",
            "resume state",
            "epochs",
            "checkpoint kinds",
            "checkpoints persisted",
            "MB persisted / epoch",
            "report + checkpoint s / epoch",
            "mean checkpoint_s + report_s (metrics)",
            "train + eval s / epoch",
            "finished folder MB",
            "of it checkpoints MB",
        ],
        rows,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="CIFAR-10 ImageFolder tree")
    ap.add_argument("--subset", type=int, default=2, help="train images per class (default 2: 20-image epochs)")
    ap.add_argument("--epochs", type=int, default=8, help="epochs per configuration (patience is set above it)")
    ap.add_argument("--width", type=float, default=1.0, help="AlexNet width (default 1, the study's: 144 MB weights)")
    ap.add_argument("--optimizers", default=",".join(RUNS), help=f"of {', '.join(RUNS)} (default: both)")
    ap.add_argument("--before", help="a checkout of the previous design to measure beside this one")
    ap.add_argument("--repeats", type=int, default=1, help="trials per configuration; the table gives medians")
    ap.add_argument("--storage", help="folder for the experiments (default: a temporary one, deleted)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: TREE:LABEL, in a process of its own
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.optimizers = args.optimizers.split(",")
    if not set(args.optimizers) <= set(RUNS):
        ap.error(f"--optimizers {','.join(args.optimizers)}; allowed: {', '.join(RUNS)}")
    return args


def measure_tree(tree: Path, label: str, args: argparse.Namespace, storage: Path) -> list[dict]:
    """`measure` in a process of its own, with the tree first on its path and as its working directory (Ray's
    workers import from the driver's working directory)."""
    out = storage / f"{label}.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
    options = {"--data-dir": Path(args.data_dir).resolve(), "--subset": args.subset, "--epochs": args.epochs, "--width": args.width,
               "--repeats": args.repeats, "--storage": storage / label, "--optimizers": ",".join(args.optimizers)}  # fmt: skip
    cmd = [sys.executable, __file__, "--measure", f"{tree}:{label}", "--json-out", str(out)]
    cmd += [str(v) for option in options.items() for v in option]
    subprocess.run(cmd, check=True, env=env, cwd=tree)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure:
        tree, label = args.measure.rsplit(":", 1)
        intervals: list[float | None] = [None] if label == "before" else [None, 0.0]
        Path(args.json_out).write_text(json.dumps(measure(Path(tree), label, args, intervals)))
        return 0
    storage = Path(args.storage or tempfile.mkdtemp(prefix="tune-alexnet-checkpoint-bench-"))
    storage.mkdir(parents=True, exist_ok=True)
    trees = ([(Path(args.before), "before")] if args.before else []) + [(ROOT, "after")]
    results = [r for tree, label in trees for r in measure_tree(tree, label, args, storage)]
    sys.path.insert(0, str(ROOT))
    from tune_alexnet.settings import RUNTIME_DEFAULTS

    print(
        f"\n{args.epochs} epochs of {10 * args.subset} train images per configuration, AlexNet width {args.width:g}, "
        f"one trial at a time (2 CPUs each) on a local Ray; {args.repeats} trial(s) per configuration, medians "
        f"(each trial's value in brackets)\n"
    )
    print(table(results, RUNTIME_DEFAULTS.get("resume_every_s")))
    if not args.storage:
        shutil.rmtree(storage, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
