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
        if self.started_ray:
            import ray

            ray.shutdown()
            self.started_ray = False
