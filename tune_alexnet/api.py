"""The package from Python, with the command line's settings and checks: a sweep, its tables and report.

`sweep(optimizer="sgd", epochs=2, width=0.125)` takes the flags of `tune-alexnet sweep` as keyword arguments
(named as the flags, with `_` for `-`; a list for a flag that takes several values; True for a switch). They go
through the command line's own parser and checks, so a bad value raises ValueError with the line the command
would print, before anything starts or is written.
"""

from __future__ import annotations

import contextlib
import io
import math
import numbers
import os

import pandas as pd

from .checkpoint import load_model, predict, predict_proba
from .export import best_run, export, load_experiment
from .report import write_report

__all__ = ["sweep", "settings", "table", "export", "report", "write_report", "load_experiment", "best_run", "load_model",
           "predict", "predict_proba"]  # fmt: skip


def settings(**flags):
    """The SweepSettings the command line would make of these flags; ValueError with its one line if it refuses."""
    from .cli import CliError, _settings, build_parser

    parser = build_parser()
    sweep_parser = parser._subparsers._group_actions[0].choices["sweep"]
    switches = {o for a in sweep_parser._actions if a.nargs == 0 for o in a.option_strings}
    texts = {o for a in sweep_parser._actions if a.nargs is None and (a.type is str or
             getattr(a.type, "takes_text", False)) for o in a.option_strings}  # fmt: skip
    dests = {o: a.dest for a in sweep_parser._actions for o in a.option_strings}
    given: dict[str, str] = {}  # a setting's dest -> the keyword that set it: tf32 and no_tf32 are one setting
    for key, value in flags.items():
        dest = dests.get("--" + key.replace("_", "-"))
        if value is not None and dest is not None and given.setdefault(dest, key) != key:
            raise _refusal(
                f"tune-alexnet sweep: error: {given[dest]}={flags[given[dest]]!r} and {key}={value!r} set one "
                f"setting; allowed: one of them"
            )
    argv = ["sweep"]
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if key == "help" or flag in switches and not isinstance(value, bool) and value is not None:
            allowed = "not a setting" if key == "help" else "True or False"
            raise _refusal(f"tune-alexnet sweep: error: {key}={value!r}; allowed: {allowed}")
        if flag in texts and value is not None and not isinstance(value, str | os.PathLike):
            raise _refusal(f"tune-alexnet sweep: error: {key}={value!r}; allowed: a str (or a path)")
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        value = _plain(value)
        if not isinstance(value, str | int | float | list | tuple) and value is not None:
            raise _refusal(f"tune-alexnet sweep: error: {key}={value!r}; allowed: a number, a str or a list")
        if flag in switches and value is False:  # a switch turned off: its --no- twin where it has one (tf32)
            flag = flag.replace("--", "--no-", 1) if flag.replace("--", "--no-", 1) in switches else None
            value = True
        if value is None and flag not in dests:  # not a setting: refused as the command refuses it
            argv.append(flag)
        if value is None or flag is None:
            continue
        try:
            if flag in switches:
                argv.append(flag)
            elif isinstance(value, (list, tuple)):  # flag=value: a value may begin with - (a folder named -x)
                argv.append(f"{flag}={','.join(_text(_plain(v)) for v in value)}")
            else:
                argv.append(f"{flag}={_text(value)}")
        except ValueError:  # an int past Python's 4300 digits, which it will not write out
            raise _refusal(
                f"tune-alexnet sweep: error: {key}: a number too long to write out; allowed: the values of "
                f"--{flag.removeprefix('--')} in tune-alexnet sweep --help"
            ) from None
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return _settings(parser.parse_args(argv))
    except SystemExit:
        raise _refusal(err.getvalue().strip().removesuffix(" (see tune-alexnet sweep --help)")) from None
    except CliError as exc:
        raise _refusal(f"tune-alexnet sweep: error: {exc}") from None


def _refusal(line: str) -> ValueError:
    """The command's one line, its secrets hidden: a value is named as given (mlflow=b'http://user:pw@...')."""
    from .settings import shown

    return ValueError(shown(line))


def _plain(value):
    """A number of another library's (numpy's int64, float32) as the Python number it stands for."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, int | float):
        try:  # as it prints (float32's 0.01), not its binary value (0.009999999776...)
            return float(str(value))
        except ValueError:
            pass
        try:
            return float(value)
        except OverflowError:  # past a float (a Fraction of 5,000 digits): the bounds' check refuses it in one line
            return math.inf if value > 0 else -math.inf
    return value


def _text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def sweep(*, quiet: bool = False, **flags) -> tuple:
    """Run (or, with resume=True, continue) a sweep as `tune-alexnet sweep` does, and return what comes next:
    (the ResultGrid, the results table). It speaks as the command does (the study page's path, the progress
    lines, the summary); `quiet=True` leaves only the summary and errors, as --quiet does. Its tables and report are in the experiment
    folder, as after the command. Refusals raise ValueError (bad flags) or preflight.PreflightError, each with the
    command's line. `get_best_result()` on the ResultGrid names the tables' best run (the study's tie-break)."""
    from ray import tune

    from .cli import run_study, tell_the_end
    from .settings import METRIC, MODE

    s = settings(**flags, quiet=quiet)
    exp_uri, exp, written = run_study(s, quiet=quiet)
    tell_the_end(s, exp_uri, exp, written)
    analysis = tune.ExperimentAnalysis(exp_uri, default_metric=METRIC, default_mode=MODE)
    return tune.ResultGrid(analysis), exp.table


def table(experiment) -> pd.DataFrame:
    """The results table of an experiment folder or URI, read as `tune-alexnet export` reads it."""
    return load_experiment(experiment).table


def report(experiment, out_dir=None) -> list[str]:
    """What `tune-alexnet report` writes, for an experiment folder or URI: report.md with its figures and the study
    page, report.html (into the experiment folder, or `out_dir`); their paths or URIs."""
    from .report import write_report_and_page

    return write_report_and_page(experiment, out_dir)
