"""The `tune-alexnet` command line: sweep, export, report.

Every bad flag or value ends in one line naming it and what is allowed, exit
status 2, and nothing started or written. A sweep reads top to bottom in
`run_study`: preflight (every refusal, once) -> the sweep -> its tables and report.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import signal
import sys
import threading
from contextlib import contextmanager

from . import __version__, cluster
from .grid import make_grid
from .settings import (
    BATCH_SIZES,
    BOUNDS,
    DEFAULT_CPUS_PER_TRIAL,
    DEFAULT_GPU_SHARE,
    DEFAULT_MAX_FAILURES,
    DEFAULT_STORAGE,
    EPOCHS,
    LRS,
    OPTIMIZERS,
    PATIENCE,
    PRECISIONS,
    RUNTIME_DEFAULTS,
    STEP_MODES,
    TRACKING_URI_ALLOWED,
    TRIAL_DEFAULTS,
    WANDB_PROJECT_ALLOWED,
    Grid,
    RedactedError,
    clipped,
    escaped,
    expand_user,
    home,
    home_problem,
    path_problem,
    say,
    shown,
    stdout_lost,
    tell,
    uri_problem,
    wandb_project_ok,
)
from .storage import SCHEMES, last_name

STUDY_RUNS = len(Grid())
EXIT_USAGE = 2
EXIT_FAILED = 1
MAX_NAME = 100  # Tune adds trial folder names of ~120 characters below it; paths stay well under PATH_MAX
GRID_FLAGS = ("optimizer", "lr", "batch_size", "dropout", "batchnorm", "runs")
# What defines a trial's result: a resume continues the experiment's own, so these cannot change with --resume.
# (The data's flags may: other data is then refused unless --allow-data-change says it is deliberate.)
TRIAL_FLAGS = (*GRID_FLAGS, "epochs", "patience", "seed", "repeats", "precision", "width")
URIS = " or ".join(f"{s}://BUCKET/PATH" for s in SCHEMES)


class CliError(Exception):
    """Flags that parse one by one but not together."""


class SweepFailed(RedactedError):
    """The sweep stopped on an error that is neither bad input nor a storage gone: Ray's, a state Tune read, or
    ours. One line on the console; its traceback in the experiment's driver.log."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that answers in one line, refuses a flag given twice, and suggests the flag a typo meant."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):  # argparse prints usage + message; we want one line, with no secret in it
        self.exit(EXIT_USAGE, shown(f"{self.prog}: error: {message} (see {self.prog} --help)") + "\n")

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        own = args[: args.index("--")] if "--" in args else args
        given = set()
        for action in self._actions:
            if not action.option_strings or action.dest in ("help", "version"):
                continue
            uses = [a for a in own if a.split("=", 1)[0] in action.option_strings]
            if len(uses) > 1 and self._subparsers is None:
                lists = getattr(action.type, "takes_list", False)  # the advice fits the flags that take a list
                self.error(f"{action.option_strings[0]} is given {len(uses)} times; allowed: once" + (
                    f" (several values go in one comma-separated list, e.g. {action.option_strings[0]} "
                    f"{action.type.example})" if lists else ""))  # fmt: skip
            if uses:
                given.add(action.dest)
        namespace, extras = super().parse_known_args(args, namespace)
        if self._subparsers is None:  # a subcommand: its own unknown flags are its own error, with a suggestion
            namespace._given = given
            if extras:
                self.error(f"unrecognized arguments: {' '.join(extras)}{self._suggestion(extras[0])}")
        return namespace, extras

    def _suggestion(self, typed: str) -> str:
        flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        close = difflib.get_close_matches(typed.split("=", 1)[0], flags, n=1, cutoff=0.6)
        return f"; did you mean {close[0]}?" if close else ""


# --- values -----------------------------------------------------------------------------------------------


def _list_of(kind, allowed_text: str, check=lambda v: True, choices=None, example: str = ""):
    """A comma-separated list of values; a flag given pins its grid dimension to them."""

    def parse(text: str):
        values, typed = [], []
        for part in text.split(","):
            part = part.strip().lower()
            if choices is not None and part == "all":
                if len(text.split(",")) > 1:
                    raise argparse.ArgumentTypeError(
                        f"invalid value {text!r} ('all' stands for every value, so nothing goes beside it); allowed: "
                        f"{allowed_text}"
                    )
                values.extend(choices)
                continue
            try:  # as written in ASCII digits: Python would read '1_0' as 10, and other scripts' digits too
                value = kind(part) if part.isascii() and "_" not in part else None
            except ValueError:
                value = None
            if value is None or (choices is not None and value not in choices) or not check(value):
                comma = kind is float and re.fullmatch(r"\d+,\d+", text.strip())  # 0,01: a decimal comma
                hint = f" ('{text.strip()}' is read as a list; write {text.strip().replace(',', '.')})" if comma else ""
                raise argparse.ArgumentTypeError(f"invalid value {part!r}{hint}; allowed: {allowed_text}")
            if value in typed:  # a repeat is a typo, or meant as --repeats: never silently one
                raise argparse.ArgumentTypeError(f"invalid value {text!r} ({part} given twice); allowed: {allowed_text}, "
                                                 "each once (--repeats N trains each N times)")  # fmt: skip
            typed.append(value)
            values.append(value)
        return tuple(dict.fromkeys(values))

    parse.takes_list, parse.example = True, example
    return parse


def _bool(text: str) -> bool:
    if text in ("true", "false"):
        return text == "true"
    raise ValueError(text)


def _bounded(name: str):
    """One number within settings.BOUNDS[name]; anything else is named with what is allowed."""
    bound = BOUNDS[name]

    def parse(text: str):
        try:  # as written in ASCII digits: Python would read '1_0' as 10, and other scripts' digits too
            value = float(text) if text.isascii() and "_" not in text else None
            value = int(value) if value is not None and bound.whole and bound.allows(value) else value
        except (ValueError, OverflowError):
            value = None
        if value is None or not bound.allows(value) or (bound.whole and not re.fullmatch(r"[+]?[0-9]+", text.strip())):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}; allowed: {bound.text()}")
        return value

    parse.bound = bound
    return parse


def _name(text: str) -> str:
    """An experiment name stays one folder inside --storage: no separators, no '..', not too long."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", text) or len(text) > MAX_NAME:
        raise argparse.ArgumentTypeError(
            f"invalid value {clipped(text, 40, '...')!r}; allowed: letters, digits, '.', '_' and '-', "
            f"not starting with '.' or '-', at most {MAX_NAME} characters"
        )
    return text


def _takes_text(parse):
    """Marks a flag's parser as one that takes text: the Python API refuses other types for it (api.settings)."""
    parse.takes_text = True
    return parse


@_takes_text
def _place(text: str) -> str:
    """A folder or URI as typed, checked as the Python API checks one (settings.path_problem)."""
    if why := path_problem(text):
        raise argparse.ArgumentTypeError(why)
    return text


@_takes_text
def _folder(text: str) -> str:
    """A local folder as typed: `a://b` there is no URI but a folder `a:` with `b` in it."""
    if why := path_problem(text, local=True):
        raise argparse.ArgumentTypeError(why)
    return text


class _OneVoice(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        name = "tune-alexnet" if record.name.split(".")[0] == "tune_alexnet" else record.name
        return f"{name}: {record.getMessage()}"


@_takes_text
def _tracking_uri(text: str) -> str:
    """A tracking URI that parses (a host, a port that is a number), named redacted where it does not: an
    unclosed `[::1` would otherwise be a traceback from deep inside the preflight."""
    text = _place(text)
    if why := uri_problem(text):
        raise argparse.ArgumentTypeError(
            f"invalid value '{escaped(text, 300, '...')}' ({why}); allowed: {TRACKING_URI_ALLOWED}"
        )
    return text


@_takes_text
def _wandb_project(text: str) -> str:
    """--wandb's project, checked as an experiment's record of it is (settings.wandb_project_ok)."""
    if not wandb_project_ok(text):
        named = escaped(text, 40, "...")
        raise argparse.ArgumentTypeError(f"invalid value '{named}'; allowed: {WANDB_PROJECT_ALLOWED}")
    return text


# --- the parser: one small builder a subcommand, the shared groups written once ---------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="tune-alexnet", description="AlexNet on CIFAR-10: the 108-run hyperparameter study as a Ray Tune sweep."
    )
    parser.add_argument("--version", action="version", version=f"tune-alexnet {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{sweep,export,report}", parser_class=OneLineParser
    )
    _sweep_parser(sub)
    _export_parser(sub)
    _report_parser(sub)
    return parser


def _sweep_parser(sub) -> None:
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
    _grid_flags(sw.add_argument_group("the study's grid (the original's flags)"))
    _training_flags(sw.add_argument_group("training (defines a trial: fixed for an experiment's --resume)"))
    _runtime_flags(sw.add_argument_group("how trials run (may change on --resume; not part of a trial's config)"))
    _data_flags(sw.add_argument_group("data"))
    _placement_flags(sw.add_argument_group("where and how it runs"))
    _tracker_flags(sw.add_argument_group("trackers (optional extras)"))
    for action in sw._actions:  # a bounded number's help names its bounds, as its error does
        bound = getattr(action.type, "bound", None)
        if bound is not None and action.help:
            action.help += f"; allowed: {bound.text()}"


def _grid_flags(g) -> None:
    names = ", ".join(OPTIMIZERS)
    lr, batch = BOUNDS["lr"], BOUNDS["batch_size"]
    g.add_argument("--optimizer", type=_list_of(str, f"{names} or all", choices=tuple(OPTIMIZERS), example="sgd,adam"),
                   help=f"{names}, or all (default: all)")  # fmt: skip
    g.add_argument("--lr", type=_list_of(float, f"{lr.text()}, such as 0.01", check=lr.allows, example="0.01,0.001"),
                   help=f"learning rate(s) (default: {', '.join(map(str, LRS))}); allowed: {lr.text()}")  # fmt: skip
    g.add_argument("--batch_size", "--batch-size", dest="batch_size",
                   type=_list_of(int, f"{batch.text()}, such as 32", check=batch.allows, example="32,64"),
                   help=f"batch size(s) (default: {', '.join(map(str, BATCH_SIZES))}); allowed: {batch.text()}")  # fmt: skip
    g.add_argument("--dropout", type=_list_of(_bool, "true or false", example="true,false"),
                   help="true or false (default: both)")  # fmt: skip
    g.add_argument("--batchnorm", type=_list_of(_bool, "true or false", example="true,false"),
                   help="true or false (default: both)")  # fmt: skip
    g.add_argument("--runs", type=_list_of(int, f"run numbers 1..{STUDY_RUNS} of the study",
                                           check=lambda v: 1 <= v <= STUDY_RUNS, example="16,12,38"),
                   help="instead of the grid flags: these run numbers of the study, e.g. 16,12,38")  # fmt: skip


def _training_flags(t) -> None:
    t.add_argument("--epochs", type=_bounded("epochs"), default=EPOCHS, help=f"most epochs per run (default: {EPOCHS})")
    t.add_argument("--patience", type=_bounded("patience"), default=PATIENCE,
                   help=f"stop a run after this many epochs without a new best accuracy (default: {PATIENCE})")  # fmt: skip
    t.add_argument("--seed", type=_bounded("seed"), default=TRIAL_DEFAULTS["seed"],
                   help=f"random seed (default: {TRIAL_DEFAULTS['seed']})")  # fmt: skip
    t.add_argument("--repeats", type=_bounded("repeats"), default=1,
                   help="trials per grid point, each with its own seed (default: 1)")  # fmt: skip
    t.add_argument("--precision", choices=PRECISIONS, default=TRIAL_DEFAULTS["precision"],
                   help="fp32: the study's (TF32 matmuls on CUDA unless --no-tf32); bf16: autocast, on CUDA and on the "
                   f"CPU alike; auto: bf16 on CUDA, fp32 on CPU (default: {TRIAL_DEFAULTS['precision']})")  # fmt: skip
    t.add_argument("--width", type=_bounded("width"), default=TRIAL_DEFAULTS["width"],
                   help="scale AlexNet's channels and hidden units; 1 is the study's network, 0.125 a quick smoke test")  # fmt: skip


def _runtime_flags(h) -> None:
    # Defaults of None: on --resume only the flags given change how the experiment's trials run.
    h.add_argument("--device", choices=("auto", "cpu"),
                   help="auto: the GPU share Ray grants (a trial granted one that torch cannot see fails); "
                   "cpu: train on the CPU even where GPUs are granted (default: auto)")  # fmt: skip
    h.add_argument("--channels-last", choices=("auto", "true", "false"),
                   help="channels-last memory format; auto: with bf16 on CUDA only (default: auto)")  # fmt: skip
    tf32 = h.add_mutually_exclusive_group()  # both given: one line, not the last one silently
    tf32.add_argument("--tf32", dest="tf32", action="store_const", const=True,
                      help="TF32 matmuls and convolutions on CUDA (the default; undoes an experiment's --no-tf32)")  # fmt: skip
    tf32.add_argument("--no-tf32", dest="tf32", action="store_const", const=False,
                      help="no TF32 on CUDA: fp32 matmuls and convolutions in full precision")  # fmt: skip
    h.add_argument("--step", choices=STEP_MODES,
                   help="eager; graph: each training step replays one captured CUDA graph (CUDA only); compile: "
                   f"torch.compile the model (default: {RUNTIME_DEFAULTS['step']})")  # fmt: skip
    h.add_argument("--augment-chunk", type=_bounded("augment_chunk"), metavar="IMAGES",
                   help="augment this many images at once, ahead of the steps that use them; 0: one batch at a "
                   f"time (default: {RUNTIME_DEFAULTS['augment_chunk']})")  # fmt: skip
    h.add_argument("--resume-every", type=_bounded("resume_every_s"), metavar="SECONDS",
                   help="seconds between a trial's resume states (weights and optimizer state); 0: every epoch "
                   f"(default: {RUNTIME_DEFAULTS['resume_every_s']:g})")  # fmt: skip
    h.add_argument("--best-every", type=_bounded("best_every_s"), metavar="SECONDS",
                   help="at most one best-weights checkpoint this often (a run's last one is always written); "
                   f"0: at every new best (default: {RUNTIME_DEFAULTS['best_every_s']:g})")  # fmt: skip


def _data_flags(d) -> None:
    d.add_argument("--data-dir", type=_folder, help="offline data: a folder with train/<class>/ and test/<class>/ images "
                   "(default: download CIFAR-10 with torchvision)")  # fmt: skip
    d.add_argument("--download-root", type=_folder,
                   help="where torchvision's CIFAR-10 is downloaded (default: ~/.cache/tune-alexnet/torchvision)")  # fmt: skip
    d.add_argument("--subset", type=_bounded("subset"),
                   help="use N train images per class (and the test set cut in the same proportion)")  # fmt: skip


def _placement_flags(r) -> None:
    r.add_argument("--storage", type=_place, default=DEFAULT_STORAGE,
                   help=f"folder or {URIS} URI for experiments (default: ./{DEFAULT_STORAGE})")  # fmt: skip
    r.add_argument("--name", type=_name, help="experiment name: letters, digits, '.', '_', '-' "
                   f"(at most {MAX_NAME} characters; default: alexnet-<date>-<time>)")  # fmt: skip
    r.add_argument("--resume", action="store_true",
                   help="continue the experiment --name (default: the newest in --storage) with its own settings")  # fmt: skip
    r.add_argument("--allow-data-change", action="store_true",
                   help="with --resume: go on although the data differs from the experiment's (refused otherwise)")  # fmt: skip
    r.add_argument(
        "--address",
        type=_takes_text(cluster.checked_address),
        help="Ray cluster to join, e.g. auto (default: start a local Ray)",
    )
    r.add_argument("--cpus-per-trial", type=_bounded("cpus_per_trial"), default=DEFAULT_CPUS_PER_TRIAL,
                   help=f"CPUs per trial (default: {DEFAULT_CPUS_PER_TRIAL:g})")  # fmt: skip
    r.add_argument("--gpus-per-trial", type=_bounded("gpus_per_trial"),
                   help=f"GPUs per trial, fractional allowed (default: {DEFAULT_GPU_SHARE:g} if the cluster has GPUs "
                   "or node types that can start them, else 0)")  # fmt: skip
    r.add_argument("--max-failures", type=_bounded("max_failures"), default=DEFAULT_MAX_FAILURES,
                   help=f"restarts of a trial whose process died, from its last resume state (default: "
                   f"{DEFAULT_MAX_FAILURES})")  # fmt: skip
    r.add_argument("--quiet", action="store_true", help="print only the final summary and errors")
    r.add_argument("--shared-storage", action="store_true",
                   help="a local --storage folder is shared by every node of the cluster (NFS and the like)")  # fmt: skip


def _tracker_flags(k) -> None:
    k.add_argument("--mlflow", type=_tracking_uri, metavar="TRACKING_URI", help="log every trial as an MLflow run, in an "
                   "experiment named after the sweep (pip install 'tune-alexnet[mlflow]')")  # fmt: skip
    k.add_argument("--wandb", type=_wandb_project, metavar="PROJECT",
                   help="log every trial as a Weights & Biases run in PROJECT (pip install 'tune-alexnet[wandb]')")  # fmt: skip


def _experiment_args(p, writes: str) -> None:
    p.add_argument(
        "experiment", type=_place, help=f"experiment folder or URI, e.g. ray_results/<name> or {URIS}/<name>"
    )
    p.add_argument("--out", type=_place, help=f"folder or URI for {writes} (default: the experiment folder)")


def _export_parser(sub) -> None:
    tables = "results.parquet, results.csv, epochs.parquet, results_<optimizer>.csv and merged_results.csv"
    ex = sub.add_parser("export", help="write the table of an experiment folder (finished or not)",
                        description=f"Write {tables} (the original study's per-optimizer CSVs and their merge) for "
                        "an experiment folder, without re-running anything.")  # fmt: skip
    _experiment_args(ex, "the tables")


def _report_parser(sub) -> None:
    rp = sub.add_parser("report", help="write report.md, its figures and the study page for an experiment folder",
                        description="Write report.md and PNG figures (per-optimizer statistics, heatmaps, batch "
                        "norm and dropout effects, learning curves, failed runs, comparison with the original "
                        "study), and report.html, the interactive study page that opens offline, for an "
                        "experiment folder, finished or not.")  # fmt: skip
    _experiment_args(rp, "report.md, the figures and report.html")


# --- flags -> settings ------------------------------------------------------------------------------------


def _settings(args: argparse.Namespace):
    from .settings import SweepSettings

    pins = {d: getattr(args, d) for d in GRID_FLAGS if d != "runs"}
    given = getattr(args, "_given", set())
    if args.runs and any(v is not None for v in pins.values()):
        raise CliError(f"--runs picks whole runs of the study and cannot be combined with --{_first(pins)}")
    # With --resume, a trial-defining flag given again must equal the experiment's own (preflight compares them).
    asked = {f: getattr(args, f) for f in TRIAL_FLAGS if f in given} if args.resume else {}
    if args.cpus_per_trial == 0 and not args.gpus_per_trial:
        raise CliError("--cpus-per-trial 0 needs --gpus-per-trial above 0; allowed: a trial asks for some CPU or GPU")
    channels_last = {None: None, "auto": "auto", "true": True, "false": False}[args.channels_last]
    # Full paths, as recorded for --resume (which may run in another folder); ~nobody: as the shell leaves it
    data_dir, download_root = (
        None if p is None else os.path.realpath(expand_user(p)) for p in (args.data_dir, args.download_root)
    )
    runtime = {"device": args.device, "channels_last": channels_last, "tf32": args.tf32, "step": args.step,
               "augment_chunk": args.augment_chunk, "resume_every_s": args.resume_every,
               "best_every_s": args.best_every}  # fmt: skip
    return SweepSettings(
        grid=make_grid(**pins),
        runs=args.runs or (),
        epochs=args.epochs,
        patience=args.patience,
        seed=args.seed,
        repeats=args.repeats,
        data_dir=data_dir,
        download_root=download_root,
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
        runtime={k: v for k, v in runtime.items() if v is not None},
        asked=asked,
    )


def _first(pins: dict) -> str:
    return next(k for k, v in pins.items() if v is not None)


# --- the commands -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    return EXIT_FAILED if code == 0 and stdout_lost() else code  # its answer, or part of it, was not written


def _main(argv: list[str] | None) -> int:
    command = None
    with _ctrl_c_noted() as pressed:
        try:  # the command line, then torch and pandas (for seconds): a Ctrl-C meanwhile is one line like any other
            parser = build_parser()
            args = parser.parse_args(argv)
            command = args.command
            if problem := home_problem():  # before Ray is imported: its import needs a home
                parser.exit(EXIT_USAGE, shown(f"tune-alexnet {command}: error: {problem}") + "\n")
            if args.command == "sweep":
                try:
                    settings = _settings(args)
                except CliError as exc:
                    message = f"tune-alexnet sweep: error: {exc} (see tune-alexnet sweep --help)"
                    parser.exit(EXIT_USAGE, shown(message) + "\n")
            quiet = getattr(args, "quiet", False)
            _set_up_logging(quiet)
            from .data import DataError
            from .export import ExportError
            from .preflight import NothingToResume, PreflightError
            from .storage import StorageLost
        except KeyboardInterrupt:
            return _interrupted(command)
        except ImportError:  # a Ctrl-C inside a C extension's import surfaces as its ImportError
            if pressed:
                return _interrupted(command)
            raise
    try:
        if args.command == "sweep":
            return _sweep_command(settings, quiet)
        with _stop_signals_interrupt():  # SIGTERM and SIGHUP too: each file in the making is removed
            if args.command == "export":
                from .export import export

                exp, written = export(args.experiment, args.out)
                _warn(exp.notes)
                tell("\n".join(written))
            else:
                from .export import load_experiment
                from .report import write_report_and_page

                exp = load_experiment(args.experiment)
                _warn(exp.notes)
                tell("\n".join(write_report_and_page(exp, args.out)))
    except NothingToResume as exc:
        tell(f"tune-alexnet {args.command}: {exc}")
        return 0
    except (StorageLost, SweepFailed) as exc:  # not bad input: the storage went away, or Ray failed, mid-sweep
        say(f"tune-alexnet {args.command}: error: {exc}")
        return EXIT_FAILED
    except (DataError, PreflightError, ExportError) as exc:
        say(f"tune-alexnet {args.command}: error: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:  # before the sweep started (loading data, starting Ray): nothing to keep
        return _interrupted(args.command)
    except BrokenPipeError:  # `| head` or a pager closed early: what was written stays, and no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    return 0


def _interrupted(command: str | None) -> int:
    if command is None:
        say("tune-alexnet: interrupted while starting; nothing was run")
        return EXIT_FAILED
    done = " before the sweep started; nothing was run" if command == "sweep" else "; no file is half-written"
    say(f"tune-alexnet {command}: interrupted{done}")
    return EXIT_FAILED


@contextmanager
def _ctrl_c_noted():
    """Ctrl-C raises KeyboardInterrupt as always, and is noted (a list that is no longer empty): where it lands
    inside a C extension's import, Python reports an ImportError instead."""
    pressed: list[int] = []
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:  # e.g. ignored (nohup, &)
        yield pressed
        return

    def note(sig, frame):
        pressed.append(sig)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, note)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


def _set_up_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # ours speak as the command does; a library names itself
        handler.setFormatter(_OneVoice())
    logging.getLogger("torch").setLevel(logging.WARNING)  # its caches' statistics at exit are not ours to show
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font cache, built once, is not ours either


@contextmanager
def _made_yours_alone():
    """What the sweep makes (Tune's state among it, which a resume unpickles) writable by the user alone, whatever
    the umask: with 002 and a group shared with others, any of them could have had a resume run their code."""
    old = os.umask(0o022)
    os.umask(old | 0o022)
    try:
        yield
    finally:
        os.umask(old)


def run_study(settings, data=None, quiet: bool = True):
    """Preflight, the sweep, then its tables and report in the experiment folder (local or in a bucket).
    Returns (experiment URI, export.Experiment, the files written); what tests and benchmarks call."""
    from . import export, preflight, sweep
    from .console import RayLines
    from .page import page_uri, write_page
    from .report import write_report
    from .storage import DRIVER_LOG, RESERVE_NAME, StorageLost, first_line, is_remote, release_reserve

    _leave_job_working_dir()
    with _made_yours_alone(), RayLines(quiet) as lines:
        with _stop_signals_as_ctrl_c():  # Ctrl-C, SIGTERM and SIGHUP stop cleanly from Ray's start on
            plan = preflight.prepare(settings, data, quiet)
        lines.gather()  # Ray is connected and the trackers imported: their lines too, from here on
        with plan:
            lines.keep_in(plan.exp_uri)
            if not quiet:  # (a reader gone already, `| true`: the sweep runs all the same)
                if plan.dashboard_url:
                    tell(f"tune-alexnet: Ray dashboard at {plan.dashboard_url}")
                tell(f"tune-alexnet: study page: {page_uri(plan.exp_uri)}")  # live as it runs
            interrupted, failure = False, None
            try:
                with _stop_signals_as_ctrl_c():
                    sweep.run(plan, quiet)
            except KeyboardInterrupt:  # a second Ctrl-C (or SIGTERM) while Tune was stopping: stop now, cleanly
                interrupted = True
                say("tune-alexnet: stopping at once; writing the tables of what is there")
            except (StorageLost, preflight.PreflightError) as exc:  # each says which and the way on in one line
                failure = exc
            except Exception as exc:  # whatever else broke the sweep, what finished still gets its tables
                lines.keep_traceback(exc)
                failure = SweepFailed(
                    f"the sweep stopped on an error ({type(exc).__name__}: {first_line(exc)}); its traceback is in "
                    f"{plan.exp_uri}/{DRIVER_LOG}; what finished is in its tables ('tune-alexnet export "
                    f"{plan.exp_uri}')"
                )
            finally:
                with _stop_signals_ignored():
                    plan.stop_ray()
            with _stop_signals_ignored():  # what finished gets its tables, whatever is pressed now
                if not is_remote(plan.exp_uri):  # the room held back for these last writes
                    release_reserve(os.path.join(plan.exp_uri, RESERVE_NAME))
                if isinstance(failure, preflight.PreflightError):  # a resume refused before Tune wrote a thing
                    raise failure  # the tables of before stand
                try:
                    exp, written = export.export(plan.exp_uri, ended=True)
                except export.ExportError:
                    if failure is not None:
                        raise failure from None
                    if interrupted:  # stopped before Tune wrote its first state: nothing ran
                        raise KeyboardInterrupt from None
                    raise
                for write in (write_report, write_page):  # the tables hold the results: these are views of them
                    try:
                        written.append(write(exp))
                    except export.ExportError as exc:
                        _warn([f"{exc}; 'tune-alexnet report {plan.exp_uri}' writes it when there is room"])
                if isinstance(failure, StorageLost) and failure.deleted:  # Tune's driver put back what it held
                    failure = StorageLost(f"{failure}; the results the sweep still held are in {written[0]}")
            if failure is not None:
                raise failure
    return plan.exp_uri, exp, written


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
    from .stopping import heeded

    def as_ctrl_c(_sig, frame) -> None:  # Ctrl-C's handler of the moment, called: a SIGINT sent to this process is
        handler = signal.getsignal(signal.SIGINT)  # lost where it is ignored (a shell's background job)
        if not callable(handler):
            raise KeyboardInterrupt
        handler(signal.SIGINT, frame)

    previous = {sig: signal.getsignal(sig) for sig in heeded((signal.SIGTERM, signal.SIGHUP))}
    for sig in previous:
        signal.signal(sig, as_ctrl_c)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def _stop_signals_interrupt():
    """Each stop signal this process heeds, as a KeyboardInterrupt where it lands: export and report then remove
    the file they were writing, and say so in one line."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from .stopping import heeded

    pressed: list[int] = []

    def interrupt(sig, _frame) -> None:
        pressed.append(sig)
        raise KeyboardInterrupt

    def unraisable(event) -> None:  # raised inside a callback (a weakref's): Python printed it and went on
        if not isinstance(event.exc_value, KeyboardInterrupt):
            hook(event)

    hook, sys.unraisablehook = sys.unraisablehook, unraisable
    previous = {sig: signal.signal(sig, interrupt) for sig in heeded(STOP_SIGNALS)}
    try:
        yield
    except KeyboardInterrupt:
        raise
    except Exception:
        if pressed:  # raised inside a C extension (matplotlib's), which turned it into an error of its own
            raise KeyboardInterrupt from None
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = hook
    if pressed:  # it landed where it was passed over: the command still stops as asked (each file is whole)
        raise KeyboardInterrupt


def _sweep_command(settings, quiet: bool) -> int:
    from .export import ExportError

    try:
        exp_uri, exp, written = run_study(settings, quiet=quiet)
    except ExportError as exc:  # the sweep's own tables not written (a storage that filled): not bad input
        say(f"tune-alexnet sweep: error: {exc}")
        return EXIT_FAILED
    return tell_the_end(settings, exp_uri, exp, written)


def tell_the_end(settings, exp_uri: str, exp, written: list[str]) -> int:
    """The sweep's closing lines (the summary, where W&B's offline runs are, how to go on); its exit code."""
    from .console import summary

    tell(summary(exp.table, exp_uri, written))
    if settings.wandb and os.environ.get("WANDB_MODE") == "offline" and not os.environ.get("WANDB_DIR"):
        runs = os.path.join(exp_uri, "*", "wandb", "offline-run-*")  # in the experiment: the copy that lasts
        tell(f"  W&B:    offline runs {runs} (upload: wandb sync {runs})")
    failed, unfinished = left_over(exp.table)
    if failed or unfinished:  # interrupted (Ctrl-C), failed or lost trials: say how to go on, exit non-zero
        where = "" if settings.storage == DEFAULT_STORAGE else f" --storage {settings.storage}"
        parts = [f"{failed} trial(s) errored or lost (see the table's error column)"] if failed else []
        parts += [f"{unfinished} did not finish"] if unfinished else []
        say(
            f"tune-alexnet sweep: {', '.join(parts)}; 'tune-alexnet sweep --resume --name {last_name(exp_uri)}{where}' "
            "continues them"
        )
        return EXIT_FAILED
    return 0


def left_over(table) -> tuple[int, int]:
    """(trials that failed: errored, lost or unknown; trials that did not finish): any of them fails the sweep."""
    status = table["status"]
    return int((~status.isin(["terminated", "diverged", *UNFINISHED])).sum()), int(status.isin(UNFINISHED).sum())


UNFINISHED = ("pending", "running", "paused", "interrupted")


def _warn(notes: list[str]) -> None:
    for note in notes:
        say(f"tune-alexnet: warning: {note}")


def _leave_job_working_dir() -> None:
    """Under `ray job submit --working-dir`, Ray may delete that folder while the job still runs in it
    (ray-project/ray#52343), and Tune's final os.getcwd() then fails; paths here are absolute, so move out."""
    try:
        cwd = os.getcwd()
    except FileNotFoundError:
        cwd = ""
    if not cwd or "/runtime_resources/working_dir_files/" in cwd:
        os.chdir(home())


if __name__ == "__main__":
    sys.exit(main())
