"""An autoscaling cluster whose GPU workers are not up yet (Ray's fake_multinode provider, on this machine).

The sweep must still ask for GPU shares, so that the autoscaler starts a GPU worker; a trial granted a GPU
that torch cannot see must fail with a clear error, unless the user asked for the CPU.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_cluster_config(gcs: str) -> dict:
    """A CPU head and one GPU node type with no node up: what `ray up cluster.yaml` gives before any trial."""
    return {
        "cluster_name": "fake-gpu",
        "max_workers": 1,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 1,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            "head": {"resources": {"CPU": 2, "GPU": 0}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {
                "resources": {"CPU": 2, "GPU": 1, "object_store_memory": 100_000_000},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 1,
            },
        },
        "head_node_type": "head",
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def cluster_pids(marker: str) -> set[int]:
    """This cluster's processes (their command line names its temp dir or GCS address) and their children."""

    def cmdline(pid):
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return ""

    def parent(pid):
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            return -1

    pids = {int(p) for p in os.listdir("/proc") if p.isdigit()} - {os.getpid()}
    found = {p for p in pids if marker in cmdline(p)}
    grew = True
    while grew:
        new = {p for p in pids - found if parent(p) in found}
        found |= new
        grew = bool(new)
    return found


@pytest.fixture(scope="module")
def autoscaling_cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fake")
    port = free_port()
    gcs = f"127.0.0.1:{port}"
    config = tmp / "cluster.yaml"
    config.write_text(json.dumps(fake_cluster_config(gcs)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0"
    )
    temp_dir = tmp / "rt"
    subprocess.run(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            f"--autoscaling-config={config}",
            "--num-cpus=2",
            "--num-gpus=0",
            "--object-store-memory=100000000",
            "--include-dashboard=false",
            f"--dashboard-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    yield gcs, env
    pids = cluster_pids(str(temp_dir)) | cluster_pids(gcs)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(3)


def sweep(gcs, env, data_dir, storage, name, *extra):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tune_alexnet",
            "sweep",
            "--address",
            gcs,
            "--data-dir",
            str(data_dir),
            "--optimizer",
            "sgd",
            "--lr",
            "0.01",
            "--batchnorm",
            "true",
            "--dropout",
            "true",
            "--batch-size",
            "32,64",
            "--epochs",
            "2",
            "--width",
            "0.125",
            "--storage",
            str(storage),
            "--name",
            name,
            "--shared-storage",
            "--max-failures",
            "0",
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )


def test_gpu_shares_are_asked_for_gpus_the_autoscaler_can_start(autoscaling_cluster, synthetic_dir, tmp_path):
    gcs, env = autoscaling_cluster
    out = sweep(gcs, env, synthetic_dir, tmp_path, "cpu-on-purpose", "--device", "cpu")
    assert out.returncode == 0, out.stderr[-3000:]
    # started with RAY_AUTH_MODE=disabled: joined with a warning, not silently
    assert f":{gcs.rsplit(':', 1)[1]} answers without a token: anyone who can reach its port" in out.stderr
    epochs = pd.read_parquet(tmp_path / "cpu-on-purpose" / "epochs.parquet")
    assert set(epochs["gpus_granted"]) == {0.25}  # no --gpus-per-trial, no GPU up at the start: still a share
    assert set(epochs["device"]) == {"cpu"}  # asked for
    nodes = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, ray; ray.init(address='" + gcs + "'); "
            "print('GPU-NODES', json.dumps([n['NodeID'] for n in ray.nodes() if n['Resources'].get('GPU')]))",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    gpu_nodes = set(json.loads(next(ln for ln in nodes.splitlines() if ln.startswith("GPU-NODES")).split(" ", 1)[1]))
    assert set(epochs["node_id"]) <= gpu_nodes and gpu_nodes  # the autoscaler started the GPU worker for them


def test_a_granted_gpu_that_torch_cannot_see_fails_the_trial_clearly(autoscaling_cluster, synthetic_dir, tmp_path):
    gcs, env = autoscaling_cluster
    out = sweep(gcs, env, synthetic_dir, tmp_path, "no-cuda")
    assert out.returncode == 1, out.stderr[-3000:]
    table = pd.read_parquet(tmp_path / "no-cuda" / "results.parquet")
    assert set(table["status"]) == {"errored"}
    assert table["error"].str.contains("Ray granted this trial 0.25 GPU but torch").all()
    assert table["error"].str.contains("--device cpu").all()


@pytest.mark.parametrize("whose", ["this user's", "another user's"])
def test_node_types_come_from_this_users_autoscaler_alone(whose, tmp_path, monkeypatch, caplog):
    """Any process that looked like Ray's monitor named the node types, by any address (one process can list
    thousands) and a config of its own: another user's said 8 GPUs a node, and every trial of a GPU-less machine
    waited for a node that can never start."""
    from tune_alexnet.cluster import autoscaler_node_types

    monkeypatch.setenv("HOME", str(tmp_path))  # this user's ~/ray_bootstrap_config.yaml: read where no monitor is
    (tmp_path / "ray_bootstrap_config.yaml").write_text(
        "head_node_type: h\navailable_node_types:\n  h: {resources: {CPU: 2}}\n"
    )
    (tmp_path / "theirs").mkdir(mode=0o755)
    (tmp_path / "theirs" / "evil.yaml").write_text(
        "head_node_type: head\navailable_node_types:\n  head: {resources: {CPU: 1}}\n"
        "  gpu: {resources: {CPU: 8, GPU: 8}, max_workers: 1}\n"
    )
    tmp_path.chmod(0o755)
    as_them = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if whose != "this user's" else []
    monitor = [*as_them, "/bin/sh", "-c", "sleep 60; :", "/x/ray/autoscaler/_private/monitor.py",
               "--gcs-address=127.0.0.1:6379", "--autoscaling-config=evil.yaml"]  # fmt: skip
    proc = subprocess.Popen(monitor, cwd=tmp_path / "theirs")
    try:
        time.sleep(0.5)
        found = autoscaler_node_types("127.0.0.1:6379")
    finally:
        proc.kill()
        proc.wait()
    assert found == ([{"CPU": 1}, {"CPU": 8, "GPU": 8}] if whose == "this user's" else [{"CPU": 2}])
    said = "a process of another user (uid 65534) names itself the autoscaler of the cluster at 127.0.0.1:6379"
    assert (said in caplog.text) == (whose != "this user's"), caplog.text
