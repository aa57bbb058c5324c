"""Sending a sweep's trials to the tools teams keep their runs in: MLflow and Weights & Biases.

Both go through Ray's own logger callbacks, which log from the driver as results arrive; the
subclasses here only add what a reader of the study needs beside them (the study's run number,
the trial's final status). preflight.check_trackers refuses a tracker that cannot work before
any trial starts.
"""

from __future__ import annotations

import contextlib
import functools
import os

from .grid import full_config, run_number
from .settings import SweepSettings, redacted, say
from .storage import as_given, first_line, is_remote, within

# What a tracker receives of each result: the study's metrics, and nothing else. A result carries more (how the
# trial ran, Tune's checkpoint bookkeeping, fields added later); those stay in result.json and the tables. How a
# trial ran goes in each tracker's config/params once, never as a metric.
TRACKED_METRICS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "best_val_acc", "best_epoch",
                   "epochs_since_best", "train_time_s", "eval_time_s", "images_per_s")  # fmt: skip
STEP = "training_iteration"  # Tune's step counter: the x axis each tracker plots against, not a metric of ours
# MLflow's own patience with its server, which its defaults (120 s a try, 7 retries) stretch to a quarter of an hour:
# its calls run in Tune's loop, which a stop waits on. Where the user sets them, theirs stand.
MLFLOW_PATIENCE = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}
# ...which bounds each read, not each call: a server dripping its answer held Tune's loop for ever. Each call of the
# callback (a few requests) is bounded whole.
MLFLOW_CALL_S = 60.0
# The longest the end of a sweep waits for W&B to close its runs (Ray's default is its sync timeout, 30 min: a
# stopped sweep would sit that long before writing its tables). Scalars only: a run closes in seconds.
WANDB_CLOSE_S = 60


def study_metrics(result: dict) -> dict:
    """The study's metrics of one result (TRACKED_METRICS that it holds)."""
    return {k: result[k] for k in TRACKED_METRICS if k in result}


def callbacks(s: SweepSettings) -> list:
    """Tune callbacks for the trackers the settings ask for, each run grouped under the sweep's name, and
    TensorBoard's (Tune's own, which it would add anyway) fed the same study metrics."""
    auto = os.environ.get("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0") != "1"
    found = [_tbx_callback_class()(), _csv_callback_class()()] if auto else []
    if s.mlflow is not None:
        found.append(_mlflow_callback_class()(s.mlflow, experiment_name=s.name))
    if s.wandb is not None:
        found.append(
            _wandb_callback_class()(project=s.wandb, group=s.name, upload_timeout=WANDB_CLOSE_S, **_wandb_env())
        )
    return found


def trial_settings(config: dict) -> dict:
    """A trial's settings as trackers show them: the five grid settings filled in (a --runs trial's config holds
    its run number alone) and the study's run number where it has one."""
    settings = dict(full_config(config))
    number = run_number(settings)
    if number is not None:
        settings["run"] = number
    return settings


def trial_status(failed: bool, last_result: dict | None) -> str:
    """A finished trial's status in the words of the exported table (terminated, diverged, errored)."""
    if failed:
        return "errored"
    return "diverged" if (last_result or {}).get("diverged") else "terminated"


# --- callbacks --------------------------------------------------------------------------------


def _wandb_env() -> dict:
    """W&B's mode and folder as set on the driver, for the logging actors: a worker process of a Ray
    started earlier (or on a cluster) does not see the driver's environment."""
    # W&B's own console output (banners, run summaries, a sync hint naming a temporary folder) off: the trial's
    # folder in the experiment keeps its offline run, and the console speaks with one voice.
    kwargs = {}
    if os.environ.get("WANDB_MODE"):
        kwargs["mode"] = os.environ["WANDB_MODE"]
    if root := wandb_root():
        kwargs["dir"] = root
    return kwargs


def is_wandb(callback) -> bool:
    """Ray's W&B callback, or ours (restored from an experiment, its class is rebuilt from the pickle)."""
    return _made_from(callback, "WandbLoggerCallback")


def is_mlflow(callback) -> bool:
    """Ray's MLflow callback, or ours (as is_wandb)."""
    return _made_from(callback, "MLflowLoggerCallback")


def _made_from(callback, name: str) -> bool:
    return any(cls.__name__ == name for cls in type(callback).__mro__)


def wandb_root() -> str | None:
    """WANDB_DIR as the driver's checks take it: absolute (each logging actor runs in a folder of its own), `~`
    expanded, a/link/.. left for the kernel to take through the link, as W&B does."""
    given = os.environ.get("WANDB_DIR")
    return as_given(os.path.expanduser(given)) if given else None


@functools.cache  # one class, built on first use: importing Ray's integrations imports the tracker too
def _mlflow_callback_class():
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class StudyMLflowCallback(MLflowLoggerCallback):
        """Ray's MLflow callback, plus the study's run number and the trial's final status as tags. Pickled with
        the experiment (Tune keeps its callbacks), it keeps its tracking URI redacted: --resume sets it again."""

        def __getstate__(self) -> dict:
            state = dict(self.__dict__)
            if isinstance(state.get("tracking_uri"), str):
                state["tracking_uri"] = redacted(state["tracking_uri"])
            state.pop("_gave_up", None)  # a resume asks the server anew
            return state

        def _bounded(self, call, *args) -> None:
            """call(*args) within MLFLOW_CALL_S. One that fails, or is given up on (it may still be running), is
            said in one line and MLflow is asked nothing more: the sweep goes on without it (a tracker's outage
            costs no training; raised in Tune's loop, it ended the sweep, or, at a trial's end, restarted the
            trial)."""
            if getattr(self, "_gave_up", False):
                return
            try:
                within(MLFLOW_CALL_S, lambda: call(*args))
            except Exception as exc:  # noqa: BLE001 - MLflow's, its HTTP client's, its database's
                self._gave_up = True
                timeout = isinstance(exc, TimeoutError)
                why = f"gave no answer within {MLFLOW_CALL_S:g} s" if timeout else f"failed ({first_line(exc)})"
                say(f"tune-alexnet: warning: MLflow at {redacted(str(self.tracking_uri))} {why}; the sweep goes on "
                    "without it, and its runs there end here")  # fmt: skip

        def setup(self, *args, **kwargs) -> None:
            self._bounded(lambda: super(StudyMLflowCallback, self).setup(*args, **kwargs))

        def log_trial_start(self, trial) -> None:
            self._bounded(self._log_trial_start, trial)

        def log_trial_result(self, iteration: int, trial, result: dict) -> None:
            self._bounded(self._log_trial_result, trial, result)

        def log_trial_end(self, trial, failed: bool = False) -> None:
            self._bounded(self._log_trial_end, trial, failed)

        def _log_trial_start(self, trial) -> None:
            super().log_trial_start(trial)
            run_id = self._trial_runs[trial]
            settings = trial_settings(trial.config)
            extra = {k: v for k, v in settings.items() if k not in trial.config}  # a --runs trial's five settings
            if extra:
                self.mlflow_util.log_params(run_id=run_id, params_to_log=extra)
            tags = {"trial_id": trial.trial_id}
            if "run" in settings:  # off the study's grid a trial has no run number
                tags["run_number"] = str(settings["run"])
            client = self.mlflow_util._get_client()
            for key, value in tags.items():
                client.set_tag(run_id, key, value)

        def _log_trial_result(self, trial, result: dict) -> None:
            self.mlflow_util.log_metrics(
                run_id=self._trial_runs[trial], metrics_to_log=study_metrics(result), step=result[STEP]
            )

        def _log_trial_end(self, trial, failed: bool) -> None:
            run_id = self._trial_runs[trial]
            self.mlflow_util._get_client().set_tag(run_id, "status", trial_status(failed, trial.last_result))
            super().log_trial_end(trial, failed)

    return StudyMLflowCallback


def remove_wandb_links(trial_paths) -> None:
    """W&B links its core's log into each run (wandb/*/logs/debug-core.log); an experiment folder holds no links
    (a resume refuses one), so they go when the sweep ends, and before a resume where a second Ctrl-C cut that
    short. Only links inside the trials' wandb folders, and only the links: what they point to stays. One in a
    folder this user cannot write (a teammate's run) stays too: nothing of the sweep follows it."""
    for path in trial_paths:
        folder = os.path.join(path, "wandb")
        if is_remote(path) or not os.path.isdir(folder) or os.path.islink(folder):
            continue
        folders = [folder]  # folder by folder, not os.walk, which recurses once a level (a tree 1,000 deep)
        while folders:
            try:
                entries = list(os.scandir(folders.pop()))
            except OSError:
                continue
            for entry in entries:
                if entry.is_symlink():
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                elif entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)


@functools.cache
def _wandb_callback_class():
    from ray.air.integrations.wandb import WandbLoggerCallback, _WandbLoggingActor

    class StudyWandbActor(_WandbLoggingActor):
        """Ray's W&B logging actor, ending with W&B's teardown: Ray kills the actor (SIGKILL) as soon as `run`
        returns after `wandb.finish()`, so W&B's own teardown, an exit hook, never runs, and W&B asks for an explicit
        call where its hook cannot run. The teardown waits for W&B's core to close the run's files."""

        def run(self):
            try:
                super().run()
            finally:
                self._wandb.teardown()

    class StudyWandbCallback(WandbLoggerCallback):
        """Ray's W&B callback, plus the study's run number in each run's config and tags."""

        _logger_actor_cls = StudyWandbActor

        def _start_logging_actor(self, trial, exclude_results, **wandb_init_kwargs) -> None:
            if not self._remote_logger_class:
                # Ray's own makes the actor restartable, and Ray's core worker then prints a warning about its
                # arguments on the driver's stderr, past any logger; a logging actor that dies is not worth it.
                import ray
                from ray.air.integrations.wandb import WANDB_ENV_VAR, _force_on_current_node

                env = {"WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_SYMLINK": "false"}  # no links in folders
                for name in (WANDB_ENV_VAR, "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # (the last two: preflight's)
                    if name in os.environ:
                        env[name] = os.environ[name]
                self._remote_logger_class = ray.remote(
                    num_cpus=0, **_force_on_current_node(), runtime_env={"env_vars": env}, max_restarts=0
                )(self._logger_actor_cls)
            if "dir" not in wandb_init_kwargs and not is_remote(trial.path):
                # Into the trial's folder in the experiment, the copy that lasts: Ray's own choice is a staging
                # folder under its temp folder, copied to the experiment before W&B has written the run.
                os.makedirs(trial.path, exist_ok=True)
                wandb_init_kwargs["dir"] = trial.path
            settings = trial_settings(trial.config)
            wandb_init_kwargs["config"] = {**wandb_init_kwargs.get("config", {}), **settings}
            if "run" in settings:
                wandb_init_kwargs["tags"] = [*wandb_init_kwargs.get("tags", []), f"run-{settings['run']}"]
            super()._start_logging_actor(trial, exclude_results, **wandb_init_kwargs)

        def log_trial_start(self, trial) -> None:
            self.ended.discard(trial)  # a restarted trial logs on
            super().log_trial_start(trial)

        def log_trial_result(self, iteration: int, trial, result: dict) -> None:
            # Tune may hand over a trial's last result again once it ended: Ray's callback would start a second
            # W&B run for it.
            if trial not in self.ended:
                super().log_trial_result(iteration, trial, {**study_metrics(result), STEP: result[STEP]})

        def log_trial_end(self, trial, failed: bool = False) -> None:
            if trial not in self.ended and trial in self._trial_queues:  # and end it twice (KeyError in Ray's)
                self.ended.add(trial)
                super().log_trial_end(trial, failed)

        def on_experiment_end(self, trials: list, **info) -> None:
            # A stopped sweep's running trials never end in Tune's eyes, and Ray's callback waits for their
            # logging actors, which wait for an end that never comes: each is told to close its run here.
            for trial in list(self._trial_queues):
                if trial not in self.ended:
                    self.ended.add(trial)
                    self._signal_logging_actor_stop(trial)
            super().on_experiment_end(trials, **info)  # waits (WANDB_CLOSE_S at most) for the runs to close
            remove_wandb_links(trial.path for trial in trials)

        @property
        def ended(self) -> set:
            if "_ended" not in self.__dict__:
                self._ended = set()
            return self._ended

    return StudyWandbCallback


@functools.cache
def _csv_callback_class():
    import csv

    from ray.tune.logger import CSVLoggerCallback

    class StudyCSVCallback(CSVLoggerCallback):
        """Tune's progress.csv, whose columns stay those of its header after a resume. Tune takes them from the
        first result after a restore, without writing a header: a first result with other fields (an epoch that
        saved no checkpoint, a saved state's row) put every later row's values under the wrong names."""

        def log_trial_result(self, iteration: int, trial, result: dict) -> None:
            if trial not in self._trial_files:
                self._setup_trial(trial)
            if self._trial_csv.get(trial) is None and self._trial_continue.get(trial):
                with open(self._trial_files[trial].name, newline="", errors="replace") as f:
                    header = next(csv.reader(f), None)
                if header and "training_iteration" in header and not any("\ufffd" in h for h in header):
                    # (a damaged first line: Tune's own columns instead)
                    self._trial_csv[trial] = csv.DictWriter(self._trial_files[trial], header)
            super().log_trial_result(iteration, trial, result)

    return StudyCSVCallback


@functools.cache
def _tbx_callback_class():
    from ray.tune.logger import TBXLoggerCallback

    class StudyTBXCallback(TBXLoggerCallback):
        """Tune's TensorBoard callback, given the study's metrics only (the settings go in its HParams view)."""

        def log_trial_result(self, iteration: int, trial, result: dict) -> None:
            super().log_trial_result(iteration, trial, {**study_metrics(result), STEP: result[STEP]})

    return StudyTBXCallback
