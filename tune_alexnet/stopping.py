"""A stop that loses no training: every running trial saves its state first, then Tune stops.

Tune's own stop (Ctrl-C) ends the trials where they stand, and each restarts from its last checkpoint, which may
be minutes old. So while a sweep runs, the first Ctrl-C, SIGTERM or SIGHUP goes here instead of to Tune:

- the driver raises a flag in Ray's key-value store, which every trial on every node sees within a second;
- each trial saves a resume state at its next training step (train.py: the weights, the optimizer, the random
  generators and its place inside the epoch) and reports it through Tune; then it waits;
- once every running trial has reported (a Tune callback sees the reports), or after `STOP_WAIT_S`, the driver
  triggers Tune's own clean stop (SIGUSR1, which Tune listens to), and `--resume` continues each trial from the
  state it reported, so no epoch is trained twice.

A second signal stops at once. A trial on a spot node that gets an interruption notice (spot.py) saves and waits
in the same way, on its own; when the node is gone, Tune restarts it elsewhere from that state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import uuid

from ray import tune

from . import spot
from .settings import say
from .storage import first_line

STOP_WAIT_S = 60.0  # the longest a stop waits for the running trials' saved states
POLL_S = 0.5  # how often a trial looks at the stop flag
SPOT_POLL_S = 5.0  # how often a trial on a node with a metadata service asks for a notice (AWS's advice)
# The longest a trial waits after a spot notice: AWS takes the node 2 minutes after its notice, so a node that
# outlives one by this much was given a stale one (a service that keeps a past notice up).
SPOT_HOLD_S = 300.0
KV_NAMESPACE = "tune_alexnet"
SAVED_FOR = "saved_for"  # a result key: why the trial saved its state and waits ("stop" or "spot")
STOP, SPOT = "stop", "spot"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_active: SaveFirst | None = None  # the driver's stop in progress, if any (one sweep a process)
log = logging.getLogger(__name__)


def heeded(signals) -> tuple:
    """Of `signals`, those this process was not started ignoring: under nohup (SIGHUP) or as a background job of
    a shell (SIGINT) the caller said so, and that stands for the whole sweep."""
    return tuple(sig for sig in signals if signal.getsignal(sig) is not signal.SIG_IGN)


def new_key() -> str:
    """The stop flag's key for one run of the driver: a later run (--resume) never sees an old flag."""
    return f"stop-{uuid.uuid4().hex}"


def announced() -> bool:
    """Whether this driver has already said that it is stopping (Tune's own notice then adds nothing)."""
    return _active is not None and _active.requested_at is not None


def stop_at_once(said: bool = False) -> None:
    """Tune's own stop at once (SIGUSR1), not the stop signals': those first ask every trial to save, into a storage
    that can take none, and wait for them in vain. `said`: the caller tells the user why, so no stop line follows
    (the usual one promises checkpoints a lost storage no longer holds)."""
    if said and _active is not None:
        _active.requested_at = _active.requested_at or time.monotonic()
        _active.sent = True
    os.kill(os.getpid(), signal.SIGUSR1)


class SaveFirst:
    """Around Tuner.fit(): the first stop signal asks every trial to save, and stops Tune when they have."""

    def __init__(self, key: str, wait_s: float = STOP_WAIT_S, quiet: bool = False):
        self.key, self.wait_s, self.quiet = key, wait_s, quiet
        self.requested_at: float | None = None
        self.running: set[str] = set()  # trial ids, as of Tune's last step
        self.saved: set[str] = set()  # trials whose last result is a saved state they wait at
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.sent = self.closed = False
        self.previous: dict = {}
        self.env: str | None = None

    def __enter__(self) -> SaveFirst:
        global _active
        if threading.current_thread() is not threading.main_thread():
            return self  # no signal handlers off the main thread: Tune's own stop applies
        self.previous = {sig: signal.getsignal(sig) for sig in (*STOP_SIGNALS, signal.SIGUSR1)}
        signal.signal(signal.SIGUSR1, self._before_tune)  # until Tune puts its handler there
        for sig in heeded(STOP_SIGNALS):
            signal.signal(sig, self._on_signal)
        self.env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Tune then leaves Ctrl-C to us and stops on SIGUSR1
        _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        with self.lock:
            self.closed = True
        self.wake.set()
        if self.previous:
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)
            if self.env is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self.env
        _active = None
        if self.requested_at is not None:
            with contextlib.suppress(Exception):
                from ray.experimental import internal_kv

                internal_kv._internal_kv_del(self.key, namespace=KV_NAMESPACE)

    def _before_tune(self, sig, frame) -> None:
        """SIGUSR1 before Tune's loop began: nothing to do (the stop itself raised KeyboardInterrupt)."""

    def _on_signal(self, sig, frame) -> None:
        if self.requested_at is not None or signal.getsignal(signal.SIGUSR1) == self._before_tune:
            raise KeyboardInterrupt  # a second signal, or one before any trial of this run started: stop at once
        self.requested_at = time.monotonic()
        if not self.quiet:
            say(
                f"tune-alexnet: stopping: each running trial saves its state at its next training step (waiting at "
                f"most {self.wait_s:g} s), then the tables of what is there follow; press Ctrl-C again to stop at "
                "once"
            )
        threading.Thread(target=self._publish_then_wait, name="tune-alexnet-stop", daemon=True).start()

    def _publish_then_wait(self) -> None:
        try:
            from ray.experimental import internal_kv

            internal_kv._internal_kv_put(self.key, STOP, overwrite=True, namespace=KV_NAMESPACE)
        except Exception as exc:  # the trials cannot be told: stop as Tune would
            say(f"tune-alexnet: the trials could not be asked to save ({first_line(exc)}); stopping now")
            self.stop_tune()
            return
        self.wake.wait(self.wait_s)
        self.stop_tune()

    def on_step(self, trials: list) -> None:
        self.running = {t.trial_id for t in trials if t.status == "RUNNING"}
        if self.requested_at is not None and not self.sent and self.running <= self.saved:
            self.stop_tune()

    def on_result(self, trial_id: str, result: dict) -> None:
        if result.get(SAVED_FOR):
            self.saved.add(trial_id)
        else:
            self.saved.discard(trial_id)

    def stop_tune(self) -> None:
        """Tune's own clean stop, once: its experiment state then names each trial's saved state as its latest."""
        with self.lock:
            if self.sent or self.closed:
                return
            self.sent = True
            running, saved = len(self.running), len(self.running & self.saved)
            if not self.quiet and running:
                late = (
                    ""
                    if saved == running
                    else f" within {self.wait_s:g} s; the others continue from their last checkpoint"
                )
                say(f"tune-alexnet: {saved} of {running} running trial(s) saved their state{late}")
            os.kill(os.getpid(), signal.SIGUSR1)


class StopAfterSaving(tune.Callback):
    """The driver's eyes on the trials during a stop, and its voice when a spot notice makes a trial save.
    Pickled with the experiment, it keeps nothing: the stop in progress is this process's (`_active`)."""

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if _active is not None:
            _active.on_step(trials)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if _active is not None:
            _active.on_result(trial.trial_id, result)
        if result.get(SAVED_FOR) == SPOT and not (_active is not None and _active.quiet):
            say(
                f"tune-alexnet: trial {trial.trial_id} saved its state: its node got a spot interruption notice; "
                "it continues from there on another node"
            )


class TrialWatch:
    """In a trial: a daemon thread that says when to save (`requested()`, read at every training step) and why:
    the sweep's stop flag, or a spot interruption notice for this node."""

    def __init__(self, key: str | None, imds: str | None = None):
        self.key = key
        self.reader = spot.NoticeReader(imds) if imds else None
        self.reason: str | None = None
        self.notice: dict | None = None  # the node's spot notice, as last read
        self.outlived: dict | None = None  # a notice the node outlived by SPOT_HOLD_S: heeded no more
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._run, name="tune-alexnet-watch", daemon=True)
        if key or self.reader:
            self.thread.start()
        if self.reader:  # a thread of its own: a slow metadata service never delays a look at the stop flag
            threading.Thread(target=self._ask_spot, name="tune-alexnet-spot", daemon=True).start()

    def requested(self) -> str | None:
        return None if self.reason == SPOT and self.notice == self.outlived else self.reason

    def hold(self) -> None:
        """Wait after a saved state while its reason lasts: until the sweep stops this trial or the node goes.
        Should the reason pass (a notice withdrawn, or one the node outlives by SPOT_HOLD_S), training goes on
        from the saved state, in this process."""
        since = time.monotonic()
        while self.requested() is not None and not self.closed.is_set():
            if self.reason == SPOT and time.monotonic() - since > SPOT_HOLD_S:
                self.outlived = self.notice
                log.warning("the node outlived its spot notice %s by %g s; training goes on", self.notice, SPOT_HOLD_S)
                return
            time.sleep(POLL_S / 2)

    def close(self) -> None:
        self.closed.set()

    def _run(self) -> None:
        while not self.closed.is_set():
            stop = self.key is not None and _flag(self.key)
            self.reason = STOP if stop else (SPOT if self.notice else None)
            self.closed.wait(POLL_S)

    def _ask_spot(self) -> None:
        while not self.closed.is_set():
            try:
                self.notice = self.reader.notice()
            except Exception as exc:  # noqa: BLE001 - whatever the service sent: a watcher that died would miss a real one
                log.warning("the spot notice could not be read (%s); asking again", type(exc).__name__)
                self.notice = None
            self.closed.wait(SPOT_POLL_S)


def _flag(key: str) -> bool:
    try:
        from ray.experimental import internal_kv

        return internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE) is not None
    except Exception:  # the GCS briefly out of reach: no flag seen this time
        return False
