"""The cluster path on one machine: a real two-node Ray (`ray start`), job submission, fake GPUs."""

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
from conftest import moto_bucket

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """`ray start --head` (2 CPUs, a fake GPU) plus `ray start --address` (2 CPUs, no GPU), torn down by pgid;
    other nodes where a test says so."""

    def __init__(self, tmp: Path, head=("--num-cpus=2", "--num-gpus=1"), workers=(("--num-cpus=2", "--num-gpus=0"),)):
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        # Token auth on, explicitly: whether it is on must not depend on ~/.ray/auth_token: a local ray.init() may have written one.
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0")
        # As cluster.yaml's head: `ray job stop` leaves a sweep 120 s (not Ray's 3) for its trials to save.
        self.env.update(RAY_JOB_STOP_WAIT_TIME_S="120")
        # Credentials for the S3 emulator on loopback (the nodes' trials write checkpoints there).
        self.env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
        self.procs = []
        # A head that does not come up (a chosen port taken between its pick and Ray's bind) is started once more
        # on fresh ports; a second failure shows both logs.
        for attempt in (1, 2):
            port, dash = free_port(), free_port()
            self.gcs = f"127.0.0.1:{port}"
            self.dashboard = f"http://127.0.0.1:{dash}"
            log = tmp / ("head.log" if attempt == 1 else "head-again.log")
            self.procs = [
                self._start(
                    [
                        "--head",
                        f"--port={port}",
                        *head,
                        "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={dash}",
                        f"--ray-client-server-port={free_port()}",
                    ],
                    log,
                )
            ]
            try:
                self.wait_nodes(1)
                break
            except RuntimeError as e:
                self.stop()
                if attempt == 2:
                    raise
                print(f"the head did not come up; starting it once more: {e}", file=sys.stderr)
        for i, args in enumerate(workers):
            self.add_worker(args, tmp / f"worker{i or ''}.log", nodes=2 + i)

    def add_worker(self, args, log: Path, env: dict | None = None, nodes: int | None = None) -> subprocess.Popen:
        """One more node, with `env` added to its processes' environment; waits until `nodes` are up."""
        proc = self._start([f"--address={self.gcs}", *args], log, env)
        self.procs.append(proc)
        if nodes:
            self.wait_nodes(nodes)
        return proc

    def _start(self, args, log: Path, env: dict | None = None) -> subprocess.Popen:
        # Every port chosen free, so another Ray on this machine (default ports) cannot collide with this one.
        ports = [
            f"--{flag}={free_port()}"
            for flag in (
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "metrics-export-port",
                "runtime-env-agent-port",
                "node-manager-port",
                "object-manager-port",
            )
        ]
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", *args, *ports],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env={**self.env, **(env or {})},
            start_new_session=True,
        )
        proc.log = log
        return proc

    def wait_nodes(self, n: int):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            out = subprocess.run(
                [str(BIN / "ray"), "status", "--address", self.gcs], env=self.env, capture_output=True, text=True
            ).stdout
            active = out.split("Active:", 1)[-1].split("Pending:", 1)[0]
            if len(re.findall(r"\bnode_[0-9a-f]+", active)) >= n:
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(1)
        logs = "\n".join(
            f"--- {p.log.name} (exit code {p.poll()}) ---\n{p.log.read_text()[-3000:]}" for p in self.procs
        )
        raise RuntimeError(f"ray cluster did not reach {n} nodes; `ray status` said:\n{out}\n{logs}")

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
                p.wait(3)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.stop()


def small_sweep(data_dir, storage, name, *extra):
    """A small sweep's flags; `extra` adds flags or, for one given here already, replaces its value (a flag is
    refused when given twice)."""
    flags = {"--data-dir": data_dir, "--optimizer": "sgd", "--lr": "0.01", "--batchnorm": "true",
             "--batch-size": "32,64", "--epochs": "3", "--width": "0.125", "--storage": storage, "--name": name}  # fmt: skip
    alone = []
    extra = list(extra)
    while extra:
        flag = extra.pop(0)
        if extra and not str(extra[0]).startswith("--"):
            flags[flag] = extra.pop(0)
        else:
            alone.append(flag)
    return [*(item for pair in flags.items() for item in pair), *alone]


def trial_rows(exp_dir: Path) -> dict[str, list[dict]]:
    return {
        p.parent.name: [json.loads(line) for line in p.read_text().splitlines()]
        for p in exp_dir.glob("train_cifar_*/result.json")
    }


def test_sweep_spreads_over_two_nodes_with_shared_storage(cluster, synthetic_dir, tmp_path):
    storage = tmp_path / "shared"
    out = cluster.sweep(
        *small_sweep(
            synthetic_dir, storage, "two", "--cpus-per-trial", "1", "--gpus-per-trial", "0", "--shared-storage"
        )
    )
    assert out.returncode == 0, out.stderr[-3000:]
    port = cluster.gcs.rsplit(":", 1)[1]  # the head's own address for it may be another interface's
    assert re.search(rf"^tune-alexnet: joined the Ray cluster at \S+:{port} \(--address {cluster.gcs}\)$", out.stderr,
                     re.M), out.stderr[-3000:]  # fmt: skip
    assert "answers without a token" not in out.stderr  # this cluster asks for its token
    table = pd.read_parquet(storage / "two" / "results.parquet")
    assert len(table) == 4 and set(table["status"]) == {"terminated"}
    assert table["node_id"].nunique() == 2  # 2 CPUs a node, 1 a trial: four at once need both nodes
    for _, row in table.iterrows():  # each finished trial keeps one checkpoint: best weights, no optimizer state
        trial_dir = Path(row["best_checkpoint"]).parent
        assert [p.name for p in trial_dir.glob("checkpoint_*")] == [Path(row["best_checkpoint"]).name]
        files = sorted(p.name for p in Path(row["best_checkpoint"]).iterdir())
        assert files == ["model.json", "model.pt", "progress.json"]


def test_local_storage_on_a_multi_node_cluster_is_refused_before_any_trial(cluster, synthetic_dir, tmp_path):
    storage = tmp_path / "local"
    out = cluster.sweep(*small_sweep(synthetic_dir, storage, "refused"))
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert "is a local folder but this Ray cluster has 2 nodes" in last and "s3://" in last
    assert not (storage / "refused").exists()


def test_auto_takes_the_gcs_a_ray_node_of_yours_names_and_no_other(cluster):
    from ray._private.services import canonicalize_bootstrap_address

    from tune_alexnet import cluster as ray_cluster

    host, port = cluster.gcs.rsplit(":", 1)
    for named in (cluster.gcs, f"localhost:{port}", canonicalize_bootstrap_address(cluster.gcs)):  # as `auto` has it
        assert ray_cluster.gcs_of_yours(named), named
    assert not ray_cluster.gcs_of_yours(f"{host}:1")


def test_fractional_gpus_pack_four_trials_on_one_fake_gpu(cluster, synthetic_dir, tmp_path):
    storage = tmp_path / "gpu"
    out = cluster.sweep(
        "--data-dir",
        synthetic_dir,
        "--optimizer",
        "sgd",
        "--lr",
        "0.01",
        "--batchnorm",
        "true",
        "--dropout",
        "true,false",
        "--batch-size",
        "32,64",
        "--epochs",
        "6",
        "--patience",
        "100",
        "--width",
        "0.125",
        "--storage",
        storage,
        "--name",
        "gpu",
        "--shared-storage",
        "--gpus-per-trial",
        "0.25",
        "--cpus-per-trial",
        "0",
        "--device",
        "cpu",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    table = pd.read_parquet(storage / "gpu" / "results.parquet")
    assert len(table) == 4 and set(table["status"]) == {"terminated"}
    assert table["node_id"].nunique() == 1  # only the head has a (fake) GPU
    runs = trial_rows(storage / "gpu")
    starts = [rows[0]["timestamp"] - rows[0]["time_this_iter_s"] for rows in runs.values()]
    ends = [rows[-1]["timestamp"] for rows in runs.values()]
    assert max(starts) < min(ends)  # all four were running at the same time
    assert {r["device"] for rows in runs.values() for r in rows} == {"cpu"}  # as asked: --device cpu
    assert {r["gpus_granted"] for rows in runs.values() for r in rows} == {0.25}


def test_job_submission_runs_the_sweep_on_the_cluster(cluster, synthetic_dir, tmp_path):
    storage, job = tmp_path / "jobs", f"tune-alexnet-{secrets.token_hex(4)}"
    entry = [
        sys.executable,
        "-m",
        "tune_alexnet",
        "sweep",
        "--address",
        "auto",
        *small_sweep(synthetic_dir, storage, "job", "--shared-storage", "--gpus-per-trial", "0"),
    ]
    submit = cluster.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            cluster.dashboard,
            "--submission-id",
            job,
            "--working-dir",
            str(ROOT),
            "--",
            *map(str, entry),
        ],
        cwd=ROOT,
    )
    assert submit.returncode == 0, (submit.stdout + submit.stderr)[-3000:]
    status = cluster.run([str(BIN / "ray"), "job", "status", "--address", cluster.dashboard, job])
    assert f"Job '{job}' succeeded" in status.stdout + status.stderr  # the CLI's words for SUCCEEDED
    table = pd.read_parquet(storage / "job" / "results.parquet")
    assert len(table) == 4 and set(table["status"]) == {"terminated"}
    assert (storage / "job" / "report.md").is_file()


def test_ray_job_stop_has_every_running_trial_save_before_the_job_ends(cluster, synthetic_dir, tmp_path):
    storage, job = tmp_path / "shared", f"stop-{secrets.token_hex(4)}"
    entry = [sys.executable, "-m", "tune_alexnet", "sweep", "--address", "auto",
             *small_sweep(synthetic_dir, storage, "stopped", "--epochs", "200", "--patience", "300",
                          "--cpus-per-trial", "1", "--shared-storage", "--gpus-per-trial", "0", "--best-every", "0")]  # fmt: skip
    ray_job = [str(BIN / "ray"), "job"]
    submit = cluster.run([*ray_job, "submit", "--address", cluster.dashboard, "--submission-id", job, "--no-wait",
                          "--working-dir", str(ROOT), "--", *map(str, entry)], cwd=ROOT)  # fmt: skip
    assert submit.returncode == 0, (submit.stdout + submit.stderr)[-3000:]
    deadline = time.monotonic() + TIMEOUT

    def training() -> int:
        return sum(sum("epoch" in r for r in rows) >= 2 for rows in trial_rows(storage / "stopped").values())

    while training() < 4:  # all four at once, each on a CPU of its own
        assert time.monotonic() < deadline, cluster.run([*ray_job, "logs", "--address", cluster.dashboard, job]).stdout
        time.sleep(0.5)
    stop = cluster.run([*ray_job, "stop", "--address", cluster.dashboard, job])
    assert stop.returncode == 0, stop.stdout + stop.stderr
    logs = cluster.run([*ray_job, "logs", "--address", cluster.dashboard, job]).stdout
    assert "each running trial saves its state at its next training step" in logs, logs[-3000:]
    assert "4 of 4 running trial(s) saved their state" in logs, logs[-3000:]
    for rows in trial_rows(storage / "stopped").values():
        assert rows[-1].get("saved_for") == "stop", rows[-1]
    assert len(pd.read_parquet(storage / "stopped" / "results.parquet")) == 4  # the tables, before the job ended


# --- S3 storage, against an S3 emulator on loopback ------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free loopback port, with one bucket; yields (storage URI root, boto3 client)."""
    with moto_bucket("sweeps", log=tmp_path_factory.mktemp("moto") / "moto.log") as (port, client):
        yield f"s3://sweeps/tune-alexnet?endpoint_override=127.0.0.1:{port}&scheme=http", client


def bucket_keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="sweeps", Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_a_sweep_on_s3_storage_is_whole_and_resumes_from_the_bucket(cluster, s3, synthetic_dir, tmp_path, monkeypatch):
    root, client = s3
    uri = root.replace("tune-alexnet?", "tune-alexnet/s3run?")
    prefix = "tune-alexnet/s3run/"
    args = small_sweep(
        synthetic_dir,
        root,
        "s3run",
        "--epochs",
        "4",
        "--resume-every",
        "0",
        "--dropout",
        "true",
        "--batch-size",
        "32,64,128",
        "--gpus-per-trial",
        "0",
    )
    log = tmp_path / "first.log"
    first = subprocess.Popen(
        [sys.executable, "-m", "tune_alexnet", "sweep", "--address", cluster.gcs, *map(str, args)],
        env=cluster.env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    # Interrupt (Ctrl-C) once a trial has a resume state in the bucket.
    deadline = time.monotonic() + TIMEOUT
    while not any(k.endswith("/trainer.pt") for k in bucket_keys(client, prefix)):
        assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-1000:] + "".join(
            client.get_object(Bucket="sweeps", Key=k)["Body"].read().decode()[-1500:]
            for k in bucket_keys(client, prefix)
            if k.endswith("error.txt")
        )
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGINT)
    assert first.wait(TIMEOUT) == 1, log.read_text()[-3000:]
    assert f"'tune-alexnet sweep --resume --name s3run --storage {root}' continues them" in log.read_text()

    # Resume from the bucket alone: no grid flags, no --data-dir (the sweep's settings are in the bucket).
    resumed = cluster.sweep("--resume", "--name", "s3run", "--storage", root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    keys = bucket_keys(client, prefix)
    for name in (
        "results.parquet",
        "results.csv",
        "epochs.parquet",
        "results_sgd.csv",
        "report.md",
        "heatmaps.png",
        "curves.png",
        "tune_alexnet_sweep.json",
    ):
        assert prefix + name in keys, name
    trials = {k.split("/")[2] for k in keys if k.split("/")[2].startswith("train_cifar_")}
    assert len(trials) == 3
    for trial in trials:  # one checkpoint left per finished trial, without optimizer state
        ckpts = {k.split("/")[3] for k in keys if k.startswith(f"{prefix}{trial}/checkpoint_")}
        assert len(ckpts) == 1, ckpts
        assert not any(k.endswith("trainer.pt") for k in keys if k.startswith(f"{prefix}{trial}/"))

    # The table straight from the bucket: complete, and its best checkpoints are URIs that load_model reads.
    out = cluster.run([sys.executable, "-m", "tune_alexnet", "export", uri, "--out", str(tmp_path / "tables")])
    assert out.returncode == 0, out.stderr[-3000:]
    table = pd.read_parquet(tmp_path / "tables" / "results.parquet")
    assert len(table) == 3 and set(table["status"]) == {"terminated"} and (table["epochs_run"] == 4).all()
    epochs = pd.read_parquet(tmp_path / "tables" / "epochs.parquet")
    assert (epochs.groupby("trial_id")["epoch"].apply(lambda e: sorted(set(e)))).map(len).eq(4).all()
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        monkeypatch.setenv(key, value)
    from tune_alexnet.checkpoint import load_model

    for best in table["best_checkpoint"]:
        assert best.startswith("s3://sweeps/tune-alexnet/s3run/train_cifar_")
        assert load_model(best)(torch_zeros()).shape == (1, 10)

    # `report` of a bucket without --out writes into the experiment folder in the bucket.
    client.delete_object(Bucket="sweeps", Key=prefix + "report.md")
    out = cluster.run([sys.executable, "-m", "tune_alexnet", "report", uri])
    assert out.returncode == 0, out.stderr[-3000:]
    assert prefix + "report.md" in bucket_keys(client, prefix)
    assert prefix + "report.html" in bucket_keys(client, prefix)  # the study page, beside the report
    assert not Path("s3:").exists()

    # A bucket folder holding another experiment's tables is refused, as a local one is, and left as it was.
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "tables" / "results.parquet")
    meta = {**table.schema.metadata, b"tune_alexnet": json.dumps({"experiment": "/elsewhere/other"}).encode()}
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / "other.parquet")
    client.upload_file(str(tmp_path / "other.parquet"), "sweeps", "tune-alexnet/other/results.parquet")
    other = root.replace("tune-alexnet?", "tune-alexnet/other?")
    out = cluster.run([sys.executable, "-m", "tune_alexnet", "export", uri, "--out", other])
    assert out.returncode == 2 and "holds the tables of experiment /elsewhere/other" in out.stderr, out.stderr[-3000:]
    assert bucket_keys(client, "tune-alexnet/other/") == ["tune-alexnet/other/results.parquet"]


def torch_zeros():
    import torch

    return torch.zeros(1, 3, 32, 32)


def stand_in_metadata_service():
    """EC2's instance metadata service on loopback, IMDSv2 only: a session token, then 404 for the spot notice
    until the test posts one. Returns (server, the notice to fill in, the requests seen)."""
    import http.server
    import threading

    token, notice, seen = secrets.token_hex(8), {}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PUT(self):
            seen.append(("PUT", self.path, self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")))
            self._answer(200, token) if self.path == "/latest/api/token" else self._answer(404, "")

        def do_GET(self):
            seen.append(("GET", self.path, self.headers.get("X-aws-ec2-metadata-token")))
            if self.headers.get("X-aws-ec2-metadata-token") != token:
                self._answer(401, "")
            elif self.path == "/latest/meta-data/spot/instance-action" and notice:
                self._answer(200, json.dumps(notice))
            else:
                self._answer(404, "")

        def _answer(self, code: int, body: str):
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, notice, seen


def test_a_spot_notice_saves_the_trial_and_it_finishes_on_another_node_training_no_epoch_twice(synthetic_dir, tmp_path):
    """The trial's node (the only one with CPUs) gets an interruption notice, the trial saves and reports its state,
    the node is killed, a replacement joins, and the trial finishes there from the saved state."""
    from tune_alexnet.spot import ENDPOINT_VAR

    server, notice, seen = stand_in_metadata_service()
    c = LocalCluster(tmp_path, head=("--num-cpus=0", "--num-gpus=0"), workers=())
    try:
        # Only the spot node's processes see the metadata service; the head and the driver do not.
        spot_node = c.add_worker(["--num-cpus=1", "--num-gpus=0"], tmp_path / "spot.log",
                                 {ENDPOINT_VAR: f"http://127.0.0.1:{server.server_port}"}, nodes=2)  # fmt: skip
        storage, epochs = tmp_path / "shared", 80  # 0.2 s an epoch: a notice is seen within SPOT_POLL_S
        exp_dir = storage / "spot"
        args = small_sweep(synthetic_dir, storage, "spot", "--batch-size", "32", "--epochs", epochs, "--patience",
                           "200", "--dropout", "true", "--cpus-per-trial", "1", "--gpus-per-trial", "0",
                           "--shared-storage", "--best-every", "0")  # one trial, each gain in the storage at once  # fmt: skip
        log = tmp_path / "sweep.log"
        proc = subprocess.Popen([sys.executable, "-m", "tune_alexnet", "sweep", "--address", c.gcs, *map(str, args)],
                                env=c.env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

        def rows() -> list[dict]:
            found = list(exp_dir.glob("train_cifar_*/result.json"))
            lines = found[0].read_text().splitlines() if found else []
            return [json.loads(line) for line in lines if line.endswith("}")]

        def wait(predicate, what: str):
            deadline = time.monotonic() + TIMEOUT
            while not predicate():
                assert proc.poll() is None and time.monotonic() < deadline, f"{what}: {log.read_text()[-3000:]}"
                time.sleep(0.2)

        wait(lambda: sum("epoch" in r for r in rows()) >= 2, "a trial training on the spot node")
        notice.update(action="terminate", time="2026-12-04T12:00:00Z")
        wait(lambda: rows()[-1].get("saved_for") == "spot", "the trial's saved state")
        os.killpg(spot_node.pid, signal.SIGKILL)  # the instance is taken back
        c.add_worker(["--num-cpus=1", "--num-gpus=0"], tmp_path / "replacement.log")  # the autoscaler's new node
        assert proc.wait(TIMEOUT) == 0, log.read_text()[-3000:]
    finally:
        server.shutdown()
        c.stop()
    text, reported = log.read_text(), rows()
    assert "saved its state: its node got a spot interruption notice" in text
    epochs_seen = [r["epoch"] for r in reported if "epoch" in r]
    assert epochs_seen == list(range(1, epochs + 1))  # each epoch once, the interrupted one continued
    saved = next(i for i, r in enumerate(reported) if r.get("saved_for") == "spot")
    assert {r["node_id"] for r in reported[: saved + 1]} != {r["node_id"] for r in reported[saved + 1 :]}
    assert reported[saved + 1]["epoch"] == reported[saved]["saved_in_epoch"]
    progress = pd.read_csv(next(exp_dir.glob("train_cifar_*/progress.csv")))
    assert progress["epoch"].dropna().astype(int).tolist() == epochs_seen
    table = pd.read_parquet(exp_dir / "results.parquet")
    assert table["status"].tolist() == ["terminated"] and table["epochs_run"].tolist() == [epochs]
    assert pd.read_parquet(exp_dir / "epochs.parquet")["epoch"].tolist() == epochs_seen
    # IMDSv2 as AWS serves it: a session token first, then the notice asked for with it.
    assert ("PUT", "/latest/api/token", "21600") in seen
    asked = [token for method, path, token in seen if method == "GET"]
    assert asked and all(asked), seen
