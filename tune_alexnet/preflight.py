"""Every reason to refuse a sweep before a trial starts, each as one line (PreflightError).

Storage that cannot be written or reached, a name already taken, a node-local
folder that trials on other machines would write to: all are found here, before
anything is written, so a refused sweep leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("tune_alexnet.preflight")
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` leaves the autoscaling config on the head

NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "glusterfs", "beegfs",
                       "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs", "efs", "9p", "virtiofs")


class PreflightError(Exception):
    """A reason not to start (or resume) a sweep, as one line for the command line."""


def is_remote(path: str) -> bool:
    return "://" in path


def storage_uri(storage: str) -> str:
    """An absolute local path (Ray rejects relative ones) or the URI as given."""
    return storage if is_remote(storage) else str(Path(storage).expanduser().resolve())


def experiment_uri(root: str, name: str) -> str:
    """`root`/`name`, keeping any query string (an S3 endpoint override) at the end of the URI."""
    base, sep, query = root.partition("?")
    return f"{base.rstrip('/')}/{name}{sep}{query}"


def check_storage(root: str, exp_path: str, resume: bool) -> None:
    """The storage can be written (local) or reached (remote); a new experiment's name is free."""
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
            raise PreflightError(f"--storage {root} is not writable ({exc.strerror}); allowed: a folder you can "
                                 f"write, or an s3:// or gs:// URI") from None
    if not resume and tune.Tuner.can_restore(exp_path):
        raise PreflightError(f"an experiment named {exp_path.rsplit('/', 1)[-1].split('?')[0]!r} already exists in "
                             f"{root}; continue it with --resume, or start a new one with another --name")
    if not resume and not is_remote(exp_path) and Path(exp_path).exists() and any(Path(exp_path).iterdir()):
        raise PreflightError(f"{exp_path} already exists and is not empty; pick another --name")


def _check_remote(root: str) -> None:
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(root)
        fs.get_file_info(path)
    except Exception as exc:  # pyarrow raises OSError, ValueError or ArrowInvalid depending on the failure
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise PreflightError(f"--storage {root} cannot be reached ({reason}); allowed: a bucket URI your "
                             f"credentials can read and write, or a local folder") from None


def check_cluster(root: str, nodes: list[dict], per_trial: dict, joined: bool, shared_storage: bool) -> None:
    """Refuse a node-local storage path that other nodes' trials would write to."""
    if is_remote(root) or shared_storage or on_network_filesystem(root):
        return
    problem = local_storage_problem(nodes, per_trial, joined)
    if problem:
        raise PreflightError(f"--storage {root} is a local folder but {problem}; use --storage s3://BUCKET/PATH "
                             f"(or gs://), a shared filesystem mount, or --shared-storage if {root} is the same "
                             f"folder on every node")


def local_storage_problem(nodes: list[dict], per_trial: dict, joined: bool) -> str | None:
    """Why trials could not all write to a local folder: several nodes now, or (on a cluster we joined, which
    may autoscale) no node up yet that can hold one trial, so trials will run on machines started later."""
    alive = [n for n in nodes if n.get("Alive")]
    if len(alive) > 1:
        return f"this Ray cluster has {len(alive)} nodes, whose trials cannot write there"
    fits = any(all(n.get("Resources", {}).get(k, 0) >= v for k, v in per_trial.items() if v > 0) for n in alive)
    if joined and not fits:
        wants = ", ".join(f"{v:g} {k}" for k, v in per_trial.items() if v > 0)
        return (f"no node of this cluster has the {wants} a trial asks for yet, so trials will run on nodes "
                f"started later, which cannot write there")
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


def max_cluster_gpus() -> float:
    """GPUs the connected cluster has now, or can start: an autoscaling cluster's GPU workers are not up
    when a sweep starts, yet its trials must ask for GPU shares so that the autoscaler starts them."""
    import ray

    up = float(ray.cluster_resources().get("GPU", 0))
    context = ray.get_runtime_context()
    head = [n for n in ray.nodes() if n.get("Alive") and "node:__internal_head__" in n.get("Resources", {})]
    try:
        if not head or head[0]["NodeID"] == context.get_node_id():
            can_start = autoscaler_gpus(context.gcs_address)
        else:  # the autoscaler's config lies on the head node: read it there
            task = ray.remote(num_cpus=0, resources={"node:__internal_head__": 0.001}, max_retries=0)
            can_start = ray.get(task(autoscaler_gpus).remote(context.gcs_address), timeout=60)
    except Exception as exc:  # no verdict is no reason to refuse: count the GPUs that are up
        log.warning("could not read the autoscaler's node types (%s); counting the GPUs that are up", exc)
        can_start = 0.0
    return max(up, can_start)


def autoscaler_gpus(gcs_address: str) -> float:
    """GPUs the node types of this machine's autoscaler (for the cluster at `gcs_address`) can start.

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
            return 0.0
        config = Path(BOOTSTRAP_CONFIG).expanduser()
    if not config.is_file():
        return 0.0
    cfg = yaml.safe_load(config.read_text()) or {}
    total = 0.0
    for name, node_type in (cfg.get("available_node_types") or {}).items():
        gpus = float((node_type.get("resources") or {}).get("GPU", 0) or 0)
        count = int(node_type.get("max_workers", cfg.get("max_workers", 0)) or 0)
        total += gpus * (count + (name == cfg.get("head_node_type")))
    return total
