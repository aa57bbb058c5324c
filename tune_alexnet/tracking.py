"""Sending a sweep's trials to the tools teams keep their runs in: MLflow and Weights & Biases.

Both go through Ray's own logger callbacks, which log from the driver as results arrive; the
subclasses here only add what a reader of the study needs beside them (the study's run number,
the trial's final status). preflight.check_trackers refuses a tracker that cannot work before
any trial starts.
"""

from __future__ import annotations

import functools
import os

from .grid import run_number
from .settings import SweepSettings


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
