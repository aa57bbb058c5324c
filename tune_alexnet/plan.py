"""A sweep that passed every check: what runs, where, on which data and with which resources.

preflight.prepare builds it after its last refusal; sweep.run runs it; the command
line closes it (the lock released, a Ray it started shut down).
"""

from __future__ import annotations

from dataclasses import dataclass

from .data import Cifar
from .settings import SweepSettings


@dataclass
class Plan:
    """A sweep that passed every check: what runs, where, on which data and with which resources."""

    settings: SweepSettings  # on --resume, the experiment's own
    root: str  # the storage: an absolute folder or a bucket URI
    exp_uri: str  # root/name
    data: Cifar
    per_trial: dict  # Ray resources of one trial
    keep_free: int  # bytes a local storage keeps free for each running trial's next checkpoint; 0 for a bucket
    lock: object  # preflight.ExperimentLock: released when the sweep ends
    started_ray: bool = False
    dashboard_url: str | None = None

    def __enter__(self) -> Plan:
        return self

    def __exit__(self, *exc) -> None:
        self.stop_ray()
        self.lock.release()

    def stop_ray(self) -> None:
        """Ray's shutdown, with the stop signals left as the caller set them (ignored while the tables are
        written): its core worker puts SIGTERM back to the default, so that one arriving while it stops its
        processes (seconds) killed the driver before the tables."""
        if not self.started_ray:
            return
        import signal
        import threading

        import ray
        from ray._private import worker

        from .stopping import STOP_SIGNALS

        main = threading.current_thread() is threading.main_thread()  # (only it may set them)
        kept = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} if main else {}

        def put_back() -> None:
            for sig, handler in kept.items():
                if handler is not None:  # (None: set outside Python, not ours to set)
                    signal.signal(sig, handler)

        node = worker._global_node
        kill = node.kill_all_processes if node is not None else None
        if kill is not None:  # the core worker is shut down just before: from here on, the caller's again
            node.kill_all_processes = lambda *a, **k: (put_back(), kill(*a, **k))[1]
        try:
            ray.shutdown()
        finally:
            put_back()
            if kill is not None:
                del node.kill_all_processes
        self.started_ray = False
