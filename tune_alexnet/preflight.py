"""Every reason to refuse a sweep before a trial starts, each as one line (PreflightError).

Storage that cannot be written or reached or has too little room, a name already
taken or held by a live sweep (the lock), a cluster that does not answer, a trial
size no node can ever hold, a node-local folder that trials on other machines
would write to: all are found here, before the sweep writes anything. It also
reads what an autoscaling cluster can start, so trials ask for GPU shares before
the GPU workers are up.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .storage import experiment_uri, is_remote

log = logging.getLogger("tune_alexnet.preflight")
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` leaves the autoscaling config on the head

NETWORK_FILESYSTEMS = (
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "lustre",
    "gpfs",
    "ceph",
    "glusterfs",
    "beegfs",
    "fuse.s3fs",
    "fuse.gcsfuse",
    "fuse.juicefs",
    "efs",
    "9p",
    "virtiofs",
)


class PreflightError(Exception):
    """A reason not to start (or resume) a sweep, as one line for the command line."""


def check_storage(root: str, exp_path: str, resume: bool, name: str) -> None:
    """The storage can be written, local or remote; a new experiment's name is free."""
    from ray import tune

    if is_remote(root):
        _check_remote(root)
    else:
        try:
            Path(root).mkdir(parents=True, exist_ok=True)
            probe = Path(root, f".tune-alexnet-write-test-{os.getpid()}")
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise PreflightError(
                f"--storage {root} is not writable ({exc.strerror}); allowed: a folder you can "
                f"write, or an s3:// or gs:// URI"
            ) from None
    if not resume and tune.Tuner.can_restore(exp_path):
        raise PreflightError(
            f"an experiment named {name!r} already exists in "
            f"{root}; continue it with --resume, or start a new one with another --name"
        )
    if not is_remote(exp_path) and Path(exp_path).exists() and not Path(exp_path).is_dir():
        raise PreflightError(f"{exp_path} is a file; allowed: a --name that is not taken in {root}")
    if not resume and not is_remote(exp_path) and Path(exp_path).exists() and any(Path(exp_path).iterdir()):
        raise PreflightError(f"{exp_path} already exists and is not empty; pick another --name")


def lock_experiment(root: str, name: str):
    """Hold the experiment for this process: a second sweep or resume of it is refused, naming the holder.

    An flock on a file beside the experiment (for a bucket: in the user's cache, so it guards this machine
    only); the kernel drops it when the process ends, however it ends, so a killed sweep leaves no stale lock.
    Returns the open file: the lock lasts as long as it stays open.
    """
    import fcntl
    import hashlib
    import socket
    import time

    if is_remote(root):
        from .data import user_cache_dir

        folder = user_cache_dir() / "locks"
        path = folder / (hashlib.sha256(experiment_uri(root, name).encode()).hexdigest()[:20] + ".lock")
    else:
        folder = Path(root)
        path = folder / f".{name}.lock"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
    except OSError as exc:
        where = f"--storage {root}" if not is_remote(root) else f"the lock folder {folder}"
        raise PreflightError(
            f"{where} is not writable ({exc.strerror}); allowed: a folder you can write, or an s3:// or gs:// URI"
        ) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not path.exists() or os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino:
            raise BlockingIOError  # the holder ended and removed this file between our open and our lock
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another sweep"
        handle.close()
        raise PreflightError(
            f"experiment {name!r} in {root} is in use by {holder}; wait for it to end, or use another --name"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"a sweep (pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})")
    handle.flush()
    return ExperimentLock(path, handle)


class ExperimentLock:
    """Released (its file removed, then unlocked) on leaving a `with` block or when the process ends."""

    def __init__(self, path: Path, handle):
        self.path, self.handle = path, handle

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self.handle.closed:
            return
        try:
            self.path.unlink()  # while still locked: a waiting opener then sees another inode and backs off
        except OSError:
            pass
        self.handle.close()


def _check_remote(root: str) -> None:
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(root)
        probe = f"{path.rstrip('/')}/.tune-alexnet-write-test-{os.getpid()}"
        with fs.open_output_stream(probe) as f:  # reading is not enough: trials write here
            f.write(b"ok")
        fs.delete_file(probe)
    except Exception as exc:  # pyarrow raises OSError, ValueError or ArrowInvalid depending on the failure
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise PreflightError(
            f"--storage {root} cannot be reached ({reason}); allowed: a bucket URI your "
            f"credentials can read and write, or a local folder"
        ) from None


def check_cluster(root: str, nodes: list[dict], per_trial: dict, joined: bool, shared_storage: bool) -> None:
    """Refuse a node-local storage path that other nodes' trials would write to."""
    if is_remote(root) or shared_storage or on_network_filesystem(root):
        return
    problem = local_storage_problem(nodes, per_trial, joined)
    if problem:
        raise PreflightError(
            f"--storage {root} is a local folder but {problem}; use --storage s3://BUCKET/PATH "
            f"(or gs://), a shared filesystem mount, or --shared-storage if {root} is the same "
            f"folder on every node"
        )


def local_storage_problem(nodes: list[dict], per_trial: dict, joined: bool) -> str | None:
    """Why trials could not all write to a local folder: several nodes now, or (on a cluster we joined, which
    may autoscale) no node up yet that can hold one trial, so trials will run on machines started later."""
    alive = [n for n in nodes if n.get("Alive")]
    if len(alive) > 1:
        return f"this Ray cluster has {len(alive)} nodes, whose trials cannot write there"
    fits = any(all(n.get("Resources", {}).get(k, 0) >= v for k, v in per_trial.items() if v > 0) for n in alive)
    if joined and not fits:
        wants = ", ".join(f"{v:g} {k}" for k, v in per_trial.items() if v > 0)
        return (
            f"no node of this cluster has the {wants} a trial asks for yet, so trials will run on nodes "
            f"started later, which cannot write there"
        )
    return None


def on_network_filesystem(path: str) -> bool:
    """Whether `path` lies on a filesystem that other machines can mount too (from /proc/mounts)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return False
    best, fstype = "", ""
    for mount_point, kind in mounts:
        if (path == mount_point or path.startswith(mount_point.rstrip("/") + "/")) and len(mount_point) > len(best):
            best, fstype = mount_point, kind
    return fstype in NETWORK_FILESYSTEMS


def startable_node_types() -> list[dict]:
    """Resources of each node type the connected cluster's autoscaler can start ([] without an autoscaler):
    an autoscaling cluster's GPU workers are not up when a sweep starts, yet its trials must ask for GPU
    shares so that the autoscaler starts them."""
    import ray

    context = ray.get_runtime_context()
    head = [n for n in ray.nodes() if n.get("Alive") and "node:__internal_head__" in n.get("Resources", {})]
    try:
        if not head or head[0]["NodeID"] == context.get_node_id():
            return autoscaler_node_types(context.gcs_address)
        # the autoscaler's config lies on the head node: read it there
        task = ray.remote(num_cpus=0, resources={"node:__internal_head__": 0.001}, max_retries=0)
        return ray.get(task(autoscaler_node_types).remote(context.gcs_address), timeout=60)
    except Exception as exc:  # no verdict is no reason to refuse: go by the nodes that are up
        log.warning("could not read the autoscaler's node types (%s); going by the nodes that are up", exc)
        return []


def max_cluster_gpus(node_types: list[dict]) -> float:
    """GPUs the connected cluster has now, or that one node of a startable type has."""
    import ray

    return max([float(ray.cluster_resources().get("GPU", 0))] + [float(t.get("GPU", 0)) for t in node_types])


def autoscaler_node_types(gcs_address: str) -> list[dict]:
    """Resources of the node types that this machine's autoscaler (for the cluster at `gcs_address`) can start.

    Ray keeps the node types only in the autoscaler's own config file, named on its monitor's command line
    (`ray up` puts it in ~/ray_bootstrap_config.yaml); a monitor without one, as an embedded Ray has, means
    no autoscaling.
    """
    import yaml

    config, monitor_seen = None, False
    for pid in (p for p in os.listdir("/proc") if p.isdigit()) if os.path.isdir("/proc") else ():
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(a.endswith("monitor.py") and "autoscaler" in a for a in args):
            continue
        if f"--gcs-address={gcs_address}" not in args:
            continue
        monitor_seen = True
        for a in args:
            if a.startswith("--autoscaling-config="):
                config = Path(os.readlink(f"/proc/{pid}/cwd"), os.path.expanduser(a.split("=", 1)[1]))
    if config is None:
        if monitor_seen:
            return []
        config = Path(BOOTSTRAP_CONFIG).expanduser()
    if not config.is_file():
        return []
    cfg = yaml.safe_load(config.read_text()) or {}
    return [
        dict(t.get("resources") or {})
        for name, t in (cfg.get("available_node_types") or {}).items()
        if name == cfg.get("head_node_type") or int(t.get("max_workers", cfg.get("max_workers", 0)) or 0) > 0
    ]


def connect(address: str):
    """ray.init for a sweep, failing within seconds, in one line, where no cluster answers at `address`."""
    import socket

    import ray

    host, _, port = address.rpartition(":")
    if address not in ("local", "auto") and "://" not in address and port.isdigit():
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as exc:
            raise PreflightError(
                f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); "
                f"allowed: the address of a running Ray head (host:port), auto, or none for a "
                f"local Ray"
            ) from None
    try:
        return ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise PreflightError(
            f"--address {address}: cannot join that Ray cluster ({str(exc).splitlines()[0]}); "
            f"allowed: the address of a running Ray head (host:port), auto, or none for a local "
            f"Ray"
        ) from None


def check_resources_fit(per_trial: dict, nodes: list[dict], node_types: list[dict]) -> None:
    """Refuse a trial size that no node, up now or startable by the autoscaler, could ever hold (Tune would
    leave every trial pending forever)."""
    wanted = {k: v for k, v in per_trial.items() if v > 0}
    capacities = [n.get("Resources", {}) for n in nodes if n.get("Alive")] + node_types
    if any(all(c.get(k, 0) >= v for k, v in wanted.items()) for c in capacities):
        return
    asked = ", ".join(f"{v:g} {k}" for k, v in wanted.items())
    largest = ", ".join(f"{max(c.get(k, 0) for c in capacities):g} {k}" for k in wanted) if capacities else "none"
    raise PreflightError(
        f"a trial asks for {asked} but no node of this cluster has that (the most any node has: "
        f"{largest}); allowed: --cpus-per-trial and --gpus-per-trial within one node"
    )


def space_needed(trials: int, concurrent: int, width: float) -> tuple[int, int, int]:
    """Bytes a sweep keeps on its storage: (all of it, what the trials running at once hold on top of their
    best weights, one trial's best weights). Adam's resume state (weights, two moments, a best copy) is the
    largest a trial holds."""
    from .model import AlexNet, count_parameters

    weights = 4 * count_parameters(AlexNet(dropout=True, batchnorm=True, width=width))  # fp32 bytes
    running = min(trials, concurrent) * 5 * weights
    return trials * weights + running, running, weights


def check_space(root: str, trials: int, concurrent: int, width: float) -> None:
    """Refuse a local --storage without room for what the sweep keeps: each finished trial's best weights, and
    while trials run their resume states (current weights, optimizer moments, a copy of the best weights)."""
    if is_remote(root):
        return
    import shutil

    needed, running, weights = space_needed(trials, concurrent, width)
    free = shutil.disk_usage(root).free
    if free < needed:
        raise PreflightError(
            f"--storage {root} has {free / 1e6:,.0f} MB free but this sweep needs about {needed / 1e6:,.0f} MB "
            f"({trials} trial(s) keep {weights / 1e6:,.0f} MB of best weights each, and each running trial briefly "
            f"holds about {5 * weights / 1e6:,.0f} MB more); allowed: a folder with that much room, fewer runs, "
            f"or an s3:// URI"
        )
