"""Sending a sweep's trials to the tools teams keep their runs in: MLflow and Weights & Biases.

Both go through Ray's own logger callbacks, which log from the driver as results arrive; the
subclasses here only add what a reader of the study needs beside them (the study's run number,
the trial's final status). `check` refuses, before any trial starts and before anything is
written, a tracker whose package is missing, whose server cannot be reached or, for W&B, that
has no API key: Ray itself would only fail once the sweep had started.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import os
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from urllib.parse import urlparse

from .grid import run_number
from .preflight import PreflightError
from .settings import SweepSettings

PROBE_TIMEOUT_S = 5.0  # a tracking server that has not answered by then is taken as unreachable


def check(s: SweepSettings) -> None:
    """Raise preflight.PreflightError (one line) if a requested tracker cannot work."""
    if s.mlflow is not None:
        _need("mlflow", "--mlflow")
        _check_mlflow_uri(s.mlflow)
    if s.wandb is not None:
        _need("wandb", "--wandb")
        _check_wandb_key()


def callbacks(s: SweepSettings) -> list:
    """Tune callbacks for the trackers the settings ask for, each run grouped under the sweep's name."""
    found = []
    if s.mlflow is not None:
        found.append(_mlflow_callback_class()(s.mlflow, experiment_name=s.name))
    if s.wandb is not None:
        found.append(_wandb_callback_class()(project=s.wandb, group=s.name, **_wandb_env()))
    return found


def trial_status(failed: bool, last_result: dict | None) -> str:
    """A finished trial's status in the words of the exported table (terminated, diverged, errored)."""
    if failed:
        return "errored"
    return "diverged" if (last_result or {}).get("diverged") else "terminated"


# --- checks -----------------------------------------------------------------------------------


def _need(package: str, flag: str) -> None:
    try:
        found = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        try:  # find_spec does not run the package: a broken install only shows on import
            __import__(package)
        except ImportError:
            found = False
    if not found:
        raise PreflightError(f"{flag} needs the {package} package: pip install 'tune-alexnet[{package}]'")


def _check_mlflow_uri(uri: str) -> None:
    """An http(s) tracking server must answer now; a local store (file, sqlite) needs an existing folder."""
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        _probe(uri)
    elif scheme == "sqlite":
        path = uri.split("://", 1)[1].lstrip("/") if "://" in uri else ""
        # sqlite:///relative.db and sqlite:////absolute.db: the folder must exist for MLflow to create the file.
        folder = Path(("/" if uri.startswith("sqlite:////") else "") + path).expanduser().parent
        if path and not folder.is_dir():
            raise PreflightError(f"--mlflow {uri}: the folder {folder} does not exist; create it or pick another path")


def _probe(uri: str) -> None:
    """Any HTTP answer below 500 proves a server is there (auth and paths are MLflow's to judge)."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S):
            return
    except urllib.error.HTTPError as exc:
        if exc.code < 500:
            return
        reason = f"it answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = str(getattr(exc, "reason", exc))
    raise PreflightError(
        f"--mlflow {uri}: the MLflow tracking server cannot be reached ({reason}); start it "
        f"(mlflow server --host 127.0.0.1 --port 5000) or pass a reachable URI"
    )


def _check_wandb_key() -> None:
    """Online W&B needs an API key; Ray would only find that out after the sweep had started."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled") or os.environ.get("WANDB_API_KEY"):
        return
    import wandb

    try:  # the lookup Ray's callback makes (env, netrc, settings), without its deprecation notice
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            key = wandb.api.api_key
    except Exception:  # an unreadable settings file or netrc is as good as no key
        key = None
    if not key:
        raise PreflightError(
            "--wandb needs a W&B API key: run 'wandb login' or set WANDB_API_KEY "
            "(or WANDB_MODE=offline to keep the runs on disk for 'wandb sync')"
        )


# --- callbacks --------------------------------------------------------------------------------


def _wandb_env() -> dict:
    """W&B's mode and folder as set on the driver, for the logging actors: a worker process of a Ray
    started earlier (or on a cluster) does not see the driver's environment."""
    kwargs = {}
    if os.environ.get("WANDB_MODE"):
        kwargs["mode"] = os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_DIR"):
        kwargs["dir"] = os.environ["WANDB_DIR"]
    return kwargs


@functools.cache  # one class, built on first use: importing Ray's integrations imports the tracker too
def _mlflow_callback_class():
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class StudyMLflowCallback(MLflowLoggerCallback):
        """Ray's MLflow callback, plus the study's run number and the trial's final status as tags."""

        def log_trial_start(self, trial) -> None:
            super().log_trial_start(trial)
            tags = {"trial_id": trial.trial_id}
            number = run_number(trial.config)
            if number is not None:  # off the study's grid a trial has no run number
                tags["run_number"] = str(number)
            client = self.mlflow_util._get_client()
            for key, value in tags.items():
                client.set_tag(self._trial_runs[trial], key, value)

        def log_trial_result(self, iteration: int, trial, result: dict) -> None:
            # The config is already in the params; Ray would log each number of it again as a metric.
            super().log_trial_result(iteration, trial, {k: v for k, v in result.items() if k != "config"})

        def log_trial_end(self, trial, failed: bool = False) -> None:
            run_id = self._trial_runs[trial]
            self.mlflow_util._get_client().set_tag(run_id, "status", trial_status(failed, trial.last_result))
            super().log_trial_end(trial, failed)

    return StudyMLflowCallback


@functools.cache
def _wandb_callback_class():
    from ray.air.integrations.wandb import WandbLoggerCallback

    class StudyWandbCallback(WandbLoggerCallback):
        """Ray's W&B callback, plus the study's run number in each run's config and tags."""

        def _start_logging_actor(self, trial, exclude_results, **wandb_init_kwargs) -> None:
            number = run_number(trial.config)
            if number is not None:
                wandb_init_kwargs["config"] = {**wandb_init_kwargs.get("config", {}), "run": number}
                wandb_init_kwargs["tags"] = [*wandb_init_kwargs.get("tags", []), f"run-{number}"]
            super()._start_logging_actor(trial, exclude_results, **wandb_init_kwargs)

    return StudyWandbCallback
