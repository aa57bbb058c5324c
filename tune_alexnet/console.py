"""What a person sees while a sweep runs: one compact table of the trials at work and a progress line.

Tune's own live output (a wide table without our accuracy, a box per trial) is turned
off; this callback prints, every `every_s` seconds and at the end, the running
trials with their study run number, five settings, epoch and accuracies, and one
line with counts, the best run so far, the elapsed time and a rough time left.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import sys
import tempfile
import time

from ray import tune

from . import stopping
from .grid import full_config, run_number
from .settings import redacted
from .storage import DRIVER_LOG, make_folders, upload_limit, within

STATUS = {"RUNNING": "running", "PENDING": "pending", "TERMINATED": "done", "ERROR": "errored", "PAUSED": "paused"}


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def describe_trial(config: dict) -> str:
    c = full_config(config)
    run = run_number(c)
    return (
        f"{'run ' + str(run) if run else 'off-grid'}: {c['optimizer']} lr {c['lr']:g} batch {c['batch_size']} "
        f"{'dropout' if c['dropout'] else 'no dropout'} {'BN' if c['batchnorm'] else 'no BN'}"
    )


def trial_row(config: dict, result: dict, status: str) -> str:
    c, r = full_config(config), result
    run = run_number(c)
    acc = f"{r['val_acc']:6.2f}" if "val_acc" in r else "     -"
    best = f"{r['best_val_acc']:6.2f}" if has_accuracy(r) else "     -"  # none before its first whole epoch
    return (
        f"{run if run else '-':>4} {c['optimizer']:<8} {c['lr']:<7g} {c['batch_size']:>5} "
        f"{str(c['dropout']).lower():<5} {str(c['batchnorm']).lower():<5} {STATUS.get(status, status):<8} "
        f"{_epochs_done(r):>3}/{c.get('epochs', '?'):<3} {acc} {best}"
    )


def has_accuracy(result: dict) -> bool:
    """Whether a trial's last result holds a best accuracy: a finished epoch that did not diverge. A state saved
    inside the first epoch, or a run that diverged at once, reports best_val_acc 0 with best_epoch 0."""
    return bool(result.get("best_epoch", 1)) and result.get("best_val_acc") is not None


def _epochs_done(result: dict) -> int:
    """The epoch of an epoch's result; for a state saved inside an epoch, the epochs before it."""
    return result.get("epoch") or max(0, result.get("saved_in_epoch", 1) - 1)


HEADER = f"{'run':>4} {'optim':<8} {'lr':<7} {'batch':>5} {'drop':<5} {'bn':<5} {'status':<8} {'epoch':>7} {'acc %':>6} {'best %':>6}"


_stop_said = False  # whether RayLines said, in our words, that Tune is stopping (stopping.py says its own)


def stop_announced() -> bool:
    """Whether this driver has told the user the sweep is stopping: its progress lines then end."""
    return _stop_said or stopping.announced()


class Console(tune.Callback):
    """Pickled with the experiment (Tune saves its callbacks), so it keeps no stream and no clock of a past run.

    It counts what Tune's experiment state counts: the statuses as of the last step of the loop. When the sweep
    is stopped, Tune marks the trials it tears down as terminated in memory only; the saved state, the table
    and the summary keep them running or pending, and so does this."""

    def __init__(self, every_s: float = 30.0):
        self.every_s = every_s
        self.__setstate__({})

    def __getstate__(self) -> dict:
        return {"every_s": self.every_s}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.started = None
        self.last_print = 0.0
        self.snapshot: list[tuple] = []  # (status, config, last result) of every trial at the last step
        self.pace = Pace()

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if stop_announced():  # from the stop's line on, only the stop's own lines and the summary
            return
        if self.started is None:
            self.started = time.monotonic()
        self.snapshot = [(t.status, t.config, dict(t.last_result or {})) for t in trials]
        self.pace.update(self.snapshot)
        if time.monotonic() - self.last_print >= self.every_s:
            self.show()

    def on_experiment_end(self, trials: list, **info) -> None:
        if stop_announced():
            return
        if not self.snapshot:
            self.snapshot = [(t.status, t.config, dict(t.last_result or {})) for t in trials]
        self.show()

    def show(self) -> None:
        self.last_print = time.monotonic()
        running = [(c, r, status) for status, c, r in self.snapshot if status == "RUNNING"]
        lines = [self.progress()]
        if running:
            lines += [HEADER, *(trial_row(c, r, status) for c, r, status in running)]
        try:
            print("\n".join(lines), file=sys.stdout, flush=True)
        except OSError:  # a closed pipe or terminal: the sweep goes on without its progress lines
            self.every_s = float("inf")

    def progress(self) -> str:
        statuses = [status for status, _, _ in self.snapshot]
        ended = sum(s in ("TERMINATED", "ERROR") for s in statuses)
        running, pending = statuses.count("RUNNING"), statuses.count("PENDING")
        from .export import best_key

        # a trial with no best epoch (diverged at once, stopped inside its first epoch) has no accuracy, not 0%
        scored = [(r["best_val_acc"], c, r.get("trial_id")) for _, c, r in self.snapshot if has_accuracy(r)]
        best = min(scored, key=lambda x: best_key(x[0], run_number(full_config(x[1])), x[2]), default=None)
        none = "best: none yet" if running + pending else "best: none (no run has an accuracy)"
        best_text = f"best {best[0]:.2f}% ({describe_trial(best[1])})" if best else none
        elapsed = time.monotonic() - (self.started or time.monotonic())
        left = self.pace.left(self.snapshot)
        left_text = f", ~{duration(left)} left" if left is not None and running + pending else ""
        return (
            f"[{duration(elapsed)}] {ended}/{len(statuses)} done, {running} running, {pending} pending; "
            f"{best_text}{left_text}"
        )


class Pace:
    """Time left from the work done: epochs trained per second since this driver started, and the epochs still
    to train (a running trial's remaining ones, a pending trial's as many as finished trials needed on average).
    It waits for a trial to finish, since until then a run's length under early stopping is unknown."""

    def __init__(self):
        self.first: tuple[float, int] | None = None  # (time, epochs trained) when this driver saw its first epoch
        self.last: tuple[float, int] | None = None  # the same at the newest epoch

    def update(self, snapshot: list[tuple]) -> None:
        trained = sum(r.get("epoch", 0) or 0 for _, _, r in snapshot)
        now = time.monotonic()
        if self.first is None:
            self.first = (now, trained)
        elif self.last is None or trained > self.last[1]:
            self.last = (now, trained)

    def left(self, snapshot: list[tuple]) -> float | None:
        finished = [r.get("epoch", 0) for s, _, r in snapshot if s == "TERMINATED" and r.get("epoch")]
        if not finished or self.first is None or self.last is None or self.last[1] <= self.first[1]:
            return None
        per_run = sum(finished) / len(finished)
        todo = sum(max(0.0, per_run - (r.get("epoch") or 0)) for s, _, r in snapshot if s in ("RUNNING", "PENDING"))
        rate = (self.last[1] - self.first[1]) / max(self.last[0] - self.first[0], 1e-9)
        return max(0.0, todo / rate - (time.monotonic() - self.last[0]))


def summary(table, exp_uri: str, written: list[str]) -> str:
    """The end of a sweep, for a person: the best run, each optimizer's best, counts, and where things are."""
    from .export import best_run
    from .grid import optimizer_order
    from .page import page_uri
    from .storage import is_remote

    counts = ", ".join(f"{n} {s}" for s, n in table["status"].value_counts().items())
    scored = table[table["final_accuracy"].notna()]
    lines = [f"tune-alexnet: experiment {exp_uri}: {len(table)} trials ({counts})"]
    if len(scored):
        best = best_run(scored)
        lines.append(f"  best:   {best['final_accuracy']:.2f}% ({describe_trial(best.to_dict())})")
        for opt in optimizer_order(scored["optimizer"]):
            part = scored[scored["optimizer"] == opt]
            top = best_run(part)
            lines.append(
                f"    {opt:<8} best {top['final_accuracy']:.2f}% of {len(part)} runs ({describe_trial(top.to_dict())})"
            )
        lines.append(f"  best checkpoint: {best['best_checkpoint']}")
    lines.append(f"  table:  {next(p for p in written if 'results.parquet' in p)} (and .csv, epochs.parquet)")
    if report := next((p for p in written if "report.md" in p), None):  # (none where it did not fit: said before)
        lines.append(f"  report: {report}")
    lines.append(f"  page:   {next((p for p in written if 'report.html' in p), page_uri(exp_uri))}")
    copy = "  (from a local copy of the folder)" if is_remote(exp_uri) else ""
    lines.append(f"  curves: {tensorboard_command()} --logdir {exp_uri}{copy}")
    return "\n".join(lines)


# Ray's driver lines that repeat or contradict ours: kept in the experiment's driver.log, not shown.
HIDDEN = (
    "Resume experiment with",  # a resume instruction other than ours, which names --resume and --storage
    "Failed to fetch metrics for",  # trials that had not started yet have no results to fetch
    "Token authentication is enabled",  # the README says what a local Ray listens on and how the token guards it
)
STOP_NOTICE = "Stop signal received"  # said again in our words
# Loggers whose lines go to driver.log whole and to the console filtered: Ray's, and the trackers' (MLflow's
# INFO lines about its database are not ours to show).
LOGGERS = ("ray", "mlflow", "alembic")
# Output of Ray's worker processes that Ray forwards to the driver: kept in driver.log, not shown. The trackers'
# logging actors (W&B's banners, run summaries, sync hints), Ray's C++ warnings about them, and Tune's note of a
# restored trial (the progress line says what runs).
WORKER_HANDLER = "ray_print_logs"  # the name Ray's own forwarding is registered under
HIDDEN_WORKERS = ("Wandb", "Mlflow", "_QueueActor")
HIDDEN_WORKER_LINES = ("core_worker.cc", "Restored on", "RAW: Lock blocking")  # the last: abseil's mutex note
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")  # colours and cursor moves: never into a file


def _lost_storage_line(message: str, error: BaseException | None = None) -> bool:
    """Tune's own traceback for an experiment state it could not save to a local folder that was deleted, turned
    read-only or filled up: the disk guard's line names the storage and the way on (sweep.DiskGuard)."""
    if not message.startswith("Saving experiment state to storage at '"):
        return False
    text = f"{message} {error or ''}"
    full = "No space left on device" in text or "[Errno 28]" in text
    folder = message.split("'")[1]
    shut = not (os.path.isdir(folder) and os.access(folder, os.W_OK))
    # or a file below it that cannot be written (a trial's own folder turned read-only)
    below = [p for p in re.findall(r"'(/[^']+)'", text) if p.startswith(f"{folder}/")]
    return folder.startswith("/") and (full or shut or not all(map(_writable, below)))


def _writable(path: str) -> bool:
    folder = os.path.dirname(path)
    return os.access(folder, os.W_OK) and (not os.path.lexists(path) or os.access(path, os.W_OK))


class RayLines(logging.Filter):
    """Ray's log lines on the driver, so that the console speaks with one voice: every line is kept whole in the
    experiment folder's driver.log; the console shows Ray's warnings and errors but those that repeat or
    contradict ours (with --quiet, its errors only), and Tune's stop notice in our words."""

    def __init__(self, quiet: bool):
        super().__init__()
        self.quiet = quiet
        self.kept: list[str] = []  # lines from before the experiment folder was known
        self.fd: int | None = None
        self.upload_to: str | None = None
        self.local_copy: str | None = None
        self.ray_forwarding = None  # Ray's own handler of worker output, put back on exit
        self.held: dict = {}  # (pid, is_err) -> the lines so far of a worker's "Exception ignored" block

    def __enter__(self) -> RayLines:
        import ray  # noqa: F401  (importing Ray sets up its logger and handler)

        global _stop_said
        _stop_said = False  # a new sweep of this process (the Python API runs several)

        self.gather()
        return self

    def gather(self) -> None:
        """Filter the handlers of LOGGERS that exist by now (a tracker's appear once preflight imported it), and
        take over Ray's forwarding of worker output once Ray is connected."""
        for name in LOGGERS:
            for handler in logging.getLogger(name).handlers:
                if self not in handler.filters:
                    handler.addFilter(self)
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        for name, handler in list(dispatcher.handlers):
            if name == WORKER_HANDLER and handler != self.worker_lines:
                self.ray_forwarding = handler
                dispatcher.remove_handler(WORKER_HANDLER)
                dispatcher.add_handler(WORKER_HANDLER, self.worker_lines)

    def __exit__(self, *exc) -> None:
        for name in LOGGERS:
            for handler in logging.getLogger(name).handlers:
                handler.removeFilter(self)
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        if any(h == self.worker_lines for _, h in dispatcher.handlers):  # Ray still connected: its own again
            dispatcher.remove_handler(WORKER_HANDLER)
            if self.ray_forwarding is not None:
                dispatcher.add_handler(WORKER_HANDLER, self.ray_forwarding)
        self.close()

    def worker_lines(self, data: dict) -> None:
        """One batch of a worker's output, as Ray forwards it: every line into driver.log, without escapes; on
        the console those not hidden, as Ray would show them."""
        name = data.get("actor_name") or data.get("task_name") or ""
        where = f", ip={data.get('ip')}" if data.get("ip") != data.get("localhost") else ""
        prefix = f"({name + ' ' if name else ''}pid={data.get('pid')}{where})"
        lines = [redacted(ANSI.sub("", line)) for line in data.get("lines", [])]
        if data.get("pid") == "autoscaler":  # as Ray shows it: its events, not its status tables
            from ray._private.worker import filter_autoscaler_events

            lines = list(filter_autoscaler_events(lines))
        for line in lines:
            self._keep(f"{time.strftime('%Y-%m-%d %H:%M:%S')} WORKER {prefix} {line}")
        if self.quiet or any(hidden in name for hidden in HIDDEN_WORKERS):
            return
        lines = self._without_ignored_exit((data.get("pid"), bool(data.get("is_err"))), lines)
        shown = [line for line in lines if line.strip() and not any(h in line for h in HIDDEN_WORKER_LINES)]
        if shown:
            with contextlib.suppress(OSError):
                print("\n".join(f"{prefix} {line}" for line in shown),
                      file=sys.stderr if data.get("is_err") else sys.stdout, flush=True)  # fmt: skip

    def _without_ignored_exit(self, stream, lines: list[str]) -> list[str]:
        """`lines` but a block Python prints when Ray's SIGTERM handler raised SystemExit inside a garbage
        collector's callback ("Exception ignored in ...", a traceback, "SystemExit: 1"), which a stopped worker
        still starting up shows before the trial's own quiet exit is in place (ray_hooks.quiet_exit_on_sigterm).
        A block may come in several batches, with the worker's other stream's between them (so `stream` is a
        pid and which of its two); one that ends in another exception is shown whole."""
        held, shown = self.held.pop(stream, []), []
        for line in lines:
            aside = not line.strip() or any(h in line for h in HIDDEN_WORKER_LINES)  # Ray's own notes meanwhile
            if aside or (not held and not line.startswith("Exception ignored in")):
                shown.append(line)
                continue
            held.append(line)
            if line.startswith("SystemExit"):
                held = []
            elif not line.startswith(("Exception ignored in", "Traceback (most recent call last)", " ")):
                shown += held  # the block's last line, another exception's
                held = []
        if held:
            self.held[stream] = held
        return shown

    def filter(self, record: logging.LogRecord) -> bool:
        plain = ANSI.sub("", record.getMessage())
        message = redacted(plain)
        if message != plain:  # a tracker's URI with its secret (MLflow names it): never shown, never kept
            record.msg, record.args = message, ()
        self._keep(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {record.levelname} {record.name}: {message}")
        if STOP_NOTICE in message:
            global _stop_said
            if not self.quiet and not stop_announced():  # a stop that saved the trials first has said so
                with contextlib.suppress(OSError):  # a closed terminal or pipe
                    print(
                        "tune-alexnet: stopping: running trials keep their last checkpoints, and the tables of what "
                        "is there follow; press Ctrl-C again to stop at once",
                        file=sys.stderr,
                        flush=True,
                    )
            _stop_said = True
            return False
        error = record.exc_info and record.exc_info[1]
        if any(hidden in message for hidden in HIDDEN) or _lost_storage_line(message, error):
            return False
        if "Error handling checkpoint" in message and isinstance(error, FileNotFoundError):
            return False  # one Tune meant to delete, gone already (its trial's folder deleted): nothing is lost
        if message.startswith("Caught exception when deleting path") and isinstance(error, OSError):
            return False  # a checkpoint that cannot be deleted (made immutable): the disk guard's line names it
        shown = record.levelno >= (logging.ERROR if self.quiet else logging.WARNING)
        if shown and record.exc_info and record.exc_info[1] is not None:  # one line here, the traceback in driver.log
            self.keep_traceback(record.exc_info[1])
            record.exc_info, record.exc_text = None, None
        return shown

    def keep_traceback(self, exc: BaseException) -> None:
        """`exc`'s traceback into driver.log alone: the console says it in one line."""
        import traceback

        for line in "".join(traceback.format_exception(exc)).splitlines():
            self._keep(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR tune_alexnet: {redacted(line)}")

    def keep_in(self, exp_uri: str) -> None:
        """From now on, and with every line so far, into the experiment's driver.log (for a bucket: a local file
        uploaded at the end). Ray's informational lines, below the console's level, are kept too."""
        from .storage import is_remote

        logging.getLogger("ray").setLevel(logging.INFO)
        if is_remote(exp_uri):
            fd, self.local_copy = tempfile.mkstemp(prefix="tune-alexnet-driver-", suffix=".log")
            self.upload_to = exp_uri
        else:
            try:
                make_folders(exp_uri)
                flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                fd = os.open(os.path.join(exp_uri, DRIVER_LOG), flags, 0o644)
            except OSError:  # a full or read-only folder: the console still works
                return
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device: not a log to keep
                os.close(fd)
                return
        self.fd = fd
        for line in self.kept:
            self._write(line)
        self.kept = []

    def _keep(self, line: str) -> None:
        if self.fd is None:
            self.kept.append(line)
        else:
            self._write(line)

    def _write(self, line: str) -> None:
        try:
            os.write(self.fd, (line + "\n").encode("utf-8", "replace"))
        except OSError:
            pass

    def close(self) -> None:
        if self.fd is None:
            return
        os.close(self.fd)
        self.fd = None
        if self.upload_to and self.local_copy:
            import pyarrow.fs

            def upload() -> None:
                fs, base = pyarrow.fs.FileSystem.from_uri(self.upload_to)
                pyarrow.fs.copy_files(self.local_copy, f"{base}/{DRIVER_LOG}", destination_filesystem=fs)

            try:  # bounded as every bucket call is: a bucket that stalls held the sweep's last line for good
                within(upload_limit(os.path.getsize(self.local_copy)), upload)
            except Exception:  # the log is a convenience; the tables are what must arrive
                pass
            os.unlink(self.local_copy)


def tensorboard_command() -> str:
    """`tensorboard` where it is on PATH; else the one beside this Python (a virtual environment not activated),
    so that the line runs as printed."""
    import shutil

    if shutil.which("tensorboard"):
        return "tensorboard"
    beside = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    return beside if os.access(beside, os.X_OK) else "tensorboard"
