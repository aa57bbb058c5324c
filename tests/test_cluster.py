"""The cluster path on one machine: a real two-node Ray (`ray start`), job submission, fake GPUs, configs."""
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """`ray start --head` (2 CPUs, a fake GPU) plus `ray start --address` (2 CPUs, no GPU), torn down by pgid."""

    def __init__(self, tmp: Path):
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        # Token auth on, explicitly: whether it is on must not depend on ~/.ray/auth_token (RAY-NOTES).
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0")
        port, dash = free_port(), free_port()
        self.gcs = f"127.0.0.1:{port}"
        self.dashboard = f"http://127.0.0.1:{dash}"
        self.procs = [self._start(["--head", f"--port={port}", "--num-cpus=2", "--num-gpus=1",
                                   "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"],
                                  tmp / "head.log")]
        self.wait_nodes(1)
        self.procs.append(self._start([f"--address={self.gcs}", "--num-cpus=2", "--num-gpus=0"], tmp / "worker.log"))
        self.wait_nodes(2)

    def _start(self, args, log: Path) -> subprocess.Popen:
        return subprocess.Popen([str(BIN / "ray"), "start", "--block", *args], stdout=log.open("w"),
                                stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    def wait_nodes(self, n: int):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            out = subprocess.run([str(BIN / "ray"), "status", "--address", self.gcs], env=self.env,
                                 capture_output=True, text=True).stdout
            active = out.split("Active:", 1)[-1].split("Pending:", 1)[0]
            if len(re.findall(r"\bnode_[0-9a-f]+", active)) >= n:
                return
            time.sleep(1)
        raise RuntimeError(f"ray cluster did not reach {n} nodes")

    def run(self, args, timeout=TIMEOUT, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout, **kw)

    def sweep(self, *args) -> subprocess.CompletedProcess:
        return self.run([sys.executable, "-m", "tune_alexnet", "sweep", "--address", self.gcs, *map(str, args)])

    def stop(self):
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.stop()


def small_sweep(data_dir, storage, name, *extra):
    return ["--data-dir", data_dir, "--optimizer", "sgd", "--lr", "0.01", "--batchnorm", "true",
            "--batch-size", "32,64", "--epochs", "3", "--width", "0.125", "--storage", storage, "--name", name, *extra]


def trial_rows(exp_dir: Path) -> dict[str, list[dict]]:
    return {p.parent.name: [json.loads(line) for line in p.read_text().splitlines()]
            for p in exp_dir.glob("train_cifar_*/result.json")}


def test_sweep_spreads_over_two_nodes_with_shared_storage(cluster, synthetic_dir, tmp_path):
    storage = tmp_path / "shared"
    out = cluster.sweep(*small_sweep(synthetic_dir, storage, "two", "--cpus-per-trial", "1", "--gpus-per-trial", "0",
                                     "--shared-storage"))
    assert out.returncode == 0, out.stderr[-3000:]
    table = pd.read_parquet(storage / "two" / "results.parquet")
    assert len(table) == 4 and set(table["status"]) == {"terminated"}
    assert table["node_id"].nunique() == 2  # 2 CPUs a node, 1 a trial: four at once need both nodes
    for _, row in table.iterrows():  # every checkpoint persisted to the shared path
        trial_dir = Path(row["best_checkpoint"]).parent
        kept = sorted(p.name for p in trial_dir.glob("checkpoint_*"))
        assert Path(row["best_checkpoint"]).name in kept and "checkpoint_000002" in kept
        assert all((trial_dir / k / "model.pt").is_file() and (trial_dir / k / "trainer.pt").is_file() for k in kept)


def test_local_storage_on_a_multi_node_cluster_is_refused_before_any_trial(cluster, synthetic_dir, tmp_path):
    storage = tmp_path / "local"
    out = cluster.sweep(*small_sweep(synthetic_dir, storage, "refused"))
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert "is a local folder but this Ray cluster has 2 nodes" in last and "s3://" in last
    assert not (storage / "refused").exists()


def test_fractional_gpus_pack_four_trials_on_one_fake_gpu(cluster, synthetic_dir, tmp_path):
    storage = tmp_path / "gpu"
    out = cluster.sweep("--data-dir", synthetic_dir, "--optimizer", "sgd", "--lr", "0.01", "--batchnorm", "true",
                        "--dropout", "true,false", "--batch-size", "32,64", "--epochs", "6", "--patience", "100",
                        "--width", "0.125", "--storage", storage, "--name", "gpu", "--shared-storage",
                        "--gpus-per-trial", "0.25", "--cpus-per-trial", "0")
    assert out.returncode == 0, out.stderr[-3000:]
    table = pd.read_parquet(storage / "gpu" / "results.parquet")
    assert len(table) == 4 and set(table["status"]) == {"terminated"}
    assert table["node_id"].nunique() == 1  # only the head has a (fake) GPU
    runs = trial_rows(storage / "gpu")
    starts = [rows[0]["timestamp"] - rows[0]["time_this_iter_s"] for rows in runs.values()]
    ends = [rows[-1]["timestamp"] for rows in runs.values()]
    assert max(starts) < min(ends)  # all four were running at the same time
    assert {r["device"] for rows in runs.values() for r in rows} == {"cpu"}
    logs = "".join(p.read_text() for p in (storage / "gpu").glob("train_cifar_*/stderr"))
    assert logs.count("torch sees no CUDA device") == 4


def test_job_submission_runs_the_sweep_on_the_cluster(cluster, synthetic_dir, tmp_path):
    storage, job = tmp_path / "jobs", f"tune-alexnet-{secrets.token_hex(4)}"
    entry = [sys.executable, "-m", "tune_alexnet", "sweep", "--address", "auto",
             *small_sweep(synthetic_dir, storage, "job", "--shared-storage")]
    submit = cluster.run([str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--submission-id", job,
                          "--working-dir", str(ROOT), "--", *map(str, entry)], cwd=ROOT)
    assert submit.returncode == 0, (submit.stdout + submit.stderr)[-3000:]
    status = cluster.run([str(BIN / "ray"), "job", "status", "--address", cluster.dashboard, job])
    assert f"Job '{job}' succeeded" in status.stdout + status.stderr  # the CLI's words for SUCCEEDED
    table = pd.read_parquet(storage / "job" / "results.parquet")
    assert len(table) == 4 and set(table["status"]) == {"terminated"}
    assert (storage / "job" / "report.md").is_file()

