"""The `tune-alexnet` command line: sweep, export, report.

Every bad flag or value ends in one line naming it and what is allowed, exit
status 2, and nothing started or written.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from . import __version__
from .grid import make_grid
from .settings import (
    BATCH_SIZES,
    DEFAULT_CPUS_PER_TRIAL,
    DEFAULT_GPU_SHARE,
    DEFAULT_MAX_FAILURES,
    DEFAULT_STORAGE,
    EPOCHS,
    LRS,
    OPTIMIZERS,
    PATIENCE,
    RUNTIME_DEFAULTS,
    TRIAL_DEFAULTS,
    Grid,
)

STUDY_RUNS = len(Grid())
EXIT_USAGE = 2
EXIT_FAILED = 1


class CliError(Exception):
    """Flags that parse one by one but not together."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message; we want one line
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _list_of(kind, allowed_text: str, check=lambda v: True, choices=None):
    """A comma-separated list of values; a flag given pins its grid dimension to them."""

    def parse(text: str):
        values = []
        for part in text.split(","):
            part = part.strip().lower()
            if choices is not None and part == "all":
                values.extend(choices)
                continue
            try:
                value = kind(part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"invalid value {part!r}; allowed: {allowed_text}") from None
            if (choices is not None and value not in choices) or not check(value):
                raise argparse.ArgumentTypeError(f"invalid value {part!r}; allowed: {allowed_text}")
            values.append(value)
        return tuple(dict.fromkeys(values))

    return parse


def _bool(text: str) -> bool:
    if text in ("true", "false"):
        return text == "true"
    raise ValueError(text)


def _number(kind, ok, allowed_text: str):
    """One number that must pass `ok`; anything else is named with what is allowed."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}; allowed: {allowed_text}")
        return value

    return parse


MAX_NAME = 100  # Tune adds trial folder names of ~120 characters below it; paths stay well under PATH_MAX


def _name(text: str) -> str:
    """An experiment name stays one folder inside --storage: no separators, no '..', not too long."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", text) or len(text) > MAX_NAME:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise argparse.ArgumentTypeError(
            f"invalid value {shown!r}; allowed: letters, digits, '.', '_' and '-', "
            f"not starting with '.' or '-', at most {MAX_NAME} characters"
        )
    return text


def _whole(minimum: int):
    return _number(int, lambda v: v >= minimum, f"a whole number >= {minimum}")


_nonneg_float = _number(float, lambda v: v >= 0, "a number >= 0")
_width = _number(float, lambda v: 0 < v <= 4, "a number in (0, 4], 1 is the study's AlexNet")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="tune-alexnet", description="AlexNet on CIFAR-10: the 108-run hyperparameter study as a Ray Tune sweep."
    )
    parser.add_argument("--version", action="version", version=f"tune-alexnet {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{sweep,export,report}", parser_class=OneLineParser
    )

    sw = sub.add_parser(
        "sweep",
        help="run (or resume) the study as a Ray Tune sweep",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the study's grid as a Ray Tune sweep. Each of the five grid flags, when given, "
        "pins its dimension (comma-separated values allowed); a flag left out sweeps all "
        f"of the study's values. No grid flag: all {STUDY_RUNS} runs.",
        epilog="examples:\n"
        "  tune-alexnet sweep --data-dir ../shared/data/cifar10-mini --subset 50 --epochs 2 --optimizer sgd --lr 0.01\n"
        "  tune-alexnet sweep --optimizer sgd            # the study's 36 SGD runs\n"
        "  tune-alexnet sweep --name study --resume     # continue an interrupted sweep\n"
        "Results go to STORAGE/NAME; the table is STORAGE/NAME/results.parquet (and .csv).",
    )
    g = sw.add_argument_group("the study's grid (the original's flags)")
    names = ", ".join(OPTIMIZERS)
    g.add_argument(
        "--optimizer",
        type=_list_of(str, f"{names} or all", choices=tuple(OPTIMIZERS)),
        help=f"{names}, or all (default: all)",
    )
    g.add_argument(
        "--lr",
        type=_list_of(float, "a positive number such as 0.01", check=lambda v: v > 0),
        help=f"learning rate(s) (default: {', '.join(map(str, LRS))})",
    )
    g.add_argument(
        "--batch_size",
        "--batch-size",
        dest="batch_size",
        type=_list_of(int, "a whole number >= 2 such as 32", check=lambda v: v >= 2),
        help=f"batch size(s) (default: {', '.join(map(str, BATCH_SIZES))})",
    )
    g.add_argument("--dropout", type=_list_of(_bool, "true or false"), help="true or false (default: both)")
    g.add_argument("--batchnorm", type=_list_of(_bool, "true or false"), help="true or false (default: both)")
    g.add_argument(
        "--runs",
        type=_list_of(int, f"run numbers 1..{STUDY_RUNS} of the study", check=lambda v: 1 <= v <= STUDY_RUNS),
        help="instead of the grid flags: these run numbers of the study, e.g. 16,12,38",
    )

    t = sw.add_argument_group("training")
    t.add_argument("--epochs", type=_whole(1), default=EPOCHS, help=f"most epochs per run (default: {EPOCHS})")
    t.add_argument(
        "--patience",
        type=_whole(1),
        default=PATIENCE,
        help=f"stop a run after this many epochs without a new best accuracy (default: {PATIENCE})",
    )
    t.add_argument(
        "--seed",
        type=_number(int, lambda v: 0 <= v < 2**32, "a whole number 0..4294967295"),
        default=TRIAL_DEFAULTS["seed"],
        help=f"random seed (default: {TRIAL_DEFAULTS['seed']})",
    )
    t.add_argument(
        "--repeats", type=_whole(1), default=1, help="trials per grid point, each with its own seed (default: 1)"
    )
    t.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default=TRIAL_DEFAULTS["precision"],
        help="auto: bf16 autocast on CUDA, fp32 on CPU (default: auto); part of a trial's config",
    )
    t.add_argument(
        "--width",
        type=_width,
        default=TRIAL_DEFAULTS["width"],
        help="scale AlexNet's channels and hidden units; 1 is the study's network, 0.125 a quick smoke test",
    )

    h = sw.add_argument_group("how trials run (may change on --resume; not part of a trial's config)")
    # Defaults of None: on --resume only the flags given change how the experiment's trials run.
    h.add_argument(
        "--device",
        choices=("auto", "cpu"),
        help="auto: the GPU share Ray grants (a trial granted one that torch cannot see fails); "
        "cpu: train on the CPU even where GPUs are granted (default: auto)",
    )
    h.add_argument(
        "--channels-last",
        choices=("auto", "true", "false"),
        help="channels-last memory format; auto: on CUDA only (default: auto)",
    )
    h.add_argument("--no-tf32", dest="tf32", action="store_const", const=False, help="disable TF32 matmuls on CUDA")
    h.add_argument("--compile", action="store_const", const=True, help="torch.compile the model")
    h.add_argument(
        "--resume-every",
        type=_nonneg_float,
        metavar="SECONDS",
        help="seconds between a trial's resume states (weights and optimizer state; best weights are "
        f"saved whenever accuracy improves); 0: every epoch (default: {RUNTIME_DEFAULTS['resume_every_s']:g})",
    )

    d = sw.add_argument_group("data")
    d.add_argument(
        "--data-dir",
        help="offline data: a folder with train/<class>/ and test/<class>/ images "
        "(default: download CIFAR-10 with torchvision)",
    )
    d.add_argument(
        "--download-root",
        help="where torchvision's CIFAR-10 is downloaded (default: ~/.cache/tune-alexnet/torchvision)",
    )
    d.add_argument(
        "--subset", type=_whole(1), help="use N train images per class (and the test set cut in the same proportion)"
    )

    r = sw.add_argument_group("where and how it runs")
    r.add_argument(
        "--storage",
        default=DEFAULT_STORAGE,
        help=f"folder or s3://, gs:// URI for experiments (default: ./{DEFAULT_STORAGE})",
    )
    r.add_argument(
        "--name",
        type=_name,
        help="experiment name: letters, digits, '.', '_', '-' "
        f"(at most {MAX_NAME} characters; default: alexnet-<date>-<time>)",
    )
    r.add_argument(
        "--resume",
        action="store_true",
        help="continue the experiment --name (default: the newest in --storage) with its own settings",
    )
    r.add_argument(
        "--allow-data-change",
        action="store_true",
        help="with --resume: go on although the data differs from the experiment's (refused otherwise)",
    )
    r.add_argument("--address", help="Ray cluster to join, e.g. auto (default: start a local Ray)")
    r.add_argument(
        "--cpus-per-trial",
        type=_nonneg_float,
        default=DEFAULT_CPUS_PER_TRIAL,
        help=f"CPUs per trial (default: {DEFAULT_CPUS_PER_TRIAL:g})",
    )
    r.add_argument(
        "--gpus-per-trial",
        type=_nonneg_float,
        help=f"GPUs per trial, fractional allowed (default: {DEFAULT_GPU_SHARE:g} if the cluster has GPUs "
        "or node types that can start them, else 0)",
    )
    r.add_argument(
        "--max-failures",
        type=_whole(0),
        default=DEFAULT_MAX_FAILURES,
        help=f"restarts of a trial whose process died, from its last resume state (default: {DEFAULT_MAX_FAILURES})",
    )
    k = sw.add_argument_group("trackers (optional extras)")
    k.add_argument(
        "--mlflow",
        metavar="TRACKING_URI",
        help="log every trial as an MLflow run, in an experiment named after the sweep "
        "(pip install 'tune-alexnet[mlflow]')",
    )
    k.add_argument(
        "--wandb",
        metavar="PROJECT",
        help="log every trial as a Weights & Biases run in PROJECT (pip install 'tune-alexnet[wandb]')",
    )
    r.add_argument("--quiet", action="store_true", help="print only the final summary and errors")
    r.add_argument(
        "--shared-storage",
        action="store_true",
        help="a local --storage folder is shared by every node of the cluster (NFS and the like)",
    )

    ex = sub.add_parser(
        "export",
        help="write the table of an experiment folder (finished or not)",
        description="Write results.parquet, results.csv, epochs.parquet and the original's "
        "results_<optimizer>.csv for an experiment folder, without re-running anything.",
    )
    ex.add_argument("experiment", help="experiment folder or URI, e.g. ray_results/<name> or s3://BUCKET/PATH/<name>")
    ex.add_argument("--out", help="folder or URI for the tables (default: the experiment folder)")

    rp = sub.add_parser(
        "report",
        help="write report.md and figures for an experiment folder",
        description="Write report.md and PNG figures (per-optimiser statistics, heatmaps, batch norm "
        "and dropout effects, learning curves, failed runs, comparison with the original "
        "study) for an experiment folder, finished or not.",
    )
    rp.add_argument("experiment", help="experiment folder or URI, e.g. ray_results/<name> or s3://BUCKET/PATH/<name>")
    rp.add_argument("--out", help="folder or URI for report.md and the figures (default: the experiment folder)")
    return parser


def _settings(args: argparse.Namespace):
    from .settings import SweepSettings

    pins = {
        "optimizer": args.optimizer,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "dropout": args.dropout,
        "batchnorm": args.batchnorm,
    }
    if args.runs and any(v is not None for v in pins.values()):
        given = next(k for k, v in pins.items() if v is not None)
        raise CliError(f"--runs picks whole runs of the study and cannot be combined with --{given}")
    if args.cpus_per_trial == 0 and not args.gpus_per_trial:
        raise CliError("--cpus-per-trial 0 needs --gpus-per-trial above 0; allowed: a trial asks for some CPU or GPU")
    grid = make_grid(**pins)
    channels_last = {None: None, "auto": "auto", "true": True, "false": False}[args.channels_last]
    data_dir = None if args.data_dir is None else str(Path(args.data_dir).expanduser().resolve())
    return SweepSettings(
        grid=grid,
        runs=args.runs or (),
        epochs=args.epochs,
        patience=args.patience,
        seed=args.seed,
        repeats=args.repeats,
        data_dir=data_dir,
        download_root=args.download_root,
        subset=args.subset,
        storage=args.storage,
        name=args.name,
        address=args.address,
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial,
        max_failures=args.max_failures,
        shared_storage=args.shared_storage,
        resume=args.resume,
        mlflow=args.mlflow,
        wandb=args.wandb,
        allow_data_change=args.allow_data_change,
        trial={"precision": args.precision, "width": args.width},
        runtime={
            k: v
            for k, v in (
                ("device", args.device),
                ("channels_last", channels_last),
                ("tf32", args.tf32),
                ("compile", args.compile),
                ("resume_every_s", args.resume_every),
            )
            if v is not None
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "sweep":
        try:
            settings = _settings(args)
        except CliError as exc:
            parser.error(str(exc))
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(name)s: %(message)s")
    from .data import DataError
    from .export import ExportError
    from .preflight import PreflightError

    try:
        if args.command == "sweep":
            return _sweep_command(settings, quiet)
        if args.command == "export":
            from .export import export

            exp, written = export(args.experiment, args.out)
            _warn(exp.notes)
            for p in written:
                print(p)
        elif args.command == "report":
            from .export import load_experiment
            from .report import write_report

            exp = load_experiment(args.experiment)
            _warn(exp.notes)
            print(write_report(exp, args.out))
    except (DataError, PreflightError, ExportError) as exc:
        print(f"tune-alexnet {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before the sweep started (loading data, say): nothing to keep
        print(f"tune-alexnet {args.command}: interrupted", file=sys.stderr)
        return EXIT_FAILED
    return 0


def run_study(settings, data=None, quiet: bool = True):
    """Preflight, the sweep, then its tables and report in the experiment folder (local or in a bucket).
    Returns (experiment URI, export.Experiment, the files written); what tests and benchmarks call."""
    import ray

    from . import export, preflight, sweep
    from .data import load_cifar10
    from .report import write_report

    _leave_job_working_dir()
    settings, exp_uri, lock = sweep.prepare(settings)
    with lock:
        if data is None:
            data = load_cifar10(settings.data_dir, settings.subset, settings.download_root, progress=not quiet)
        sweep.check_resume_data(settings, exp_uri, data)
        started_ray = not ray.is_initialized()
        if started_ray:
            context = preflight.connect(settings.address or os.environ.get("RAY_ADDRESS") or "local")
            if context.dashboard_url and not quiet:
                print(f"tune-alexnet: Ray dashboard at http://{context.dashboard_url}", flush=True)
        try:
            with _stop_signals_as_ctrl_c():
                sweep.run_sweep(settings, exp_uri, data, quiet)
        except KeyboardInterrupt:  # a second Ctrl-C (or SIGTERM) while Tune was stopping: stop now, cleanly
            print("tune-alexnet: stopping at once; writing the tables of what is there", file=sys.stderr)
        finally:
            with _stop_signals_ignored():
                if started_ray:
                    ray.shutdown()
        with _stop_signals_ignored():  # what finished gets its tables, whatever is pressed now
            exp, written = export.export(exp_uri)
            written.append(write_report(exp))
    return exp_uri, exp, written


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def _stop_signals_ignored():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def _stop_signals_as_ctrl_c():
    """SIGTERM (ray job stop, Kubernetes, systemd) and SIGHUP (a closed terminal) get what Ctrl-C gets: Tune's
    clean stop the first time, an immediate one the second."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    for sig in previous:
        signal.signal(sig, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _sweep_command(settings, quiet: bool) -> int:
    from .console import summary

    exp_uri, exp, written = run_study(settings, quiet=quiet)
    print(summary(exp.table, exp_uri, written))
    table = exp.table
    errored = int((table["status"] == "errored").sum())
    unfinished = int(table["status"].isin(["pending", "running", "paused"]).sum())
    if errored or unfinished:  # interrupted (Ctrl-C) or failed trials: say how to go on, exit non-zero
        where = "" if settings.storage == DEFAULT_STORAGE else f" --storage {settings.storage}"
        print(
            f"tune-alexnet sweep: {errored} trial(s) errored (see the table's error column), "
            f"{unfinished} did not finish; 'tune-alexnet sweep --resume --name {settings.name}{where}' continues them",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return 0


def _warn(notes: list[str]) -> None:
    for note in notes:
        print(f"tune-alexnet: warning: {note}", file=sys.stderr)


def _leave_job_working_dir() -> None:
    """Under `ray job submit --working-dir`, Ray may delete that folder while the job still runs in it
    (ray-project/ray#52343), and Tune's final os.getcwd() then fails; paths here are absolute, so move out."""
    try:
        cwd = os.getcwd()
    except FileNotFoundError:
        cwd = ""
    if not cwd or "/runtime_resources/working_dir_files/" in cwd:
        os.chdir(Path.home())


if __name__ == "__main__":
    sys.exit(main())
