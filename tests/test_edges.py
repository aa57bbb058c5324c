"""The edges of trust and storage: the local Ray's token and private folder, storages that fill, turn read-only or
vanish, a reader racing the sweep, checkpoints that lie, and the small lines a person reads.

Real links, real tmpfs mounts, real read-only remounts, real processes run as another user (nobody)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tune_alexnet.cli import main

TINY = ["--optimizer", "sgd", "--lr", "0.01", "--batch-size", "32", "--dropout", "true", "--batchnorm", "true",
        "--width", "0.125", "--epochs", "1"]  # fmt: skip
NOBODY = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]


def one_line(argv, capsys, code: int = 2) -> str:
    try:
        got = main(argv)
    except SystemExit as e:
        got = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and "decoding " not in ln]
    assert got == code and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def sweep_process(args: list[str], env: dict | None = None, timeout: float = 180, user: list[str] = ()):
    """`tune-alexnet sweep ARGS` in a process of its own: (exit status, stderr's lines that are not blank)."""
    run_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | (env or {})
    proc = subprocess.run([*user, sys.executable, "-m", "tune_alexnet", "sweep", *args], env=run_env,
                          capture_output=True, text=True, timeout=timeout, cwd="/")  # fmt: skip
    return proc.returncode, [ln for ln in proc.stderr.splitlines() if ln.strip() and "decoding " not in ln]


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a real tmpfs of a given size (MB); unmounted afterwards."""
    mounts = []

    def mount(size_mb: float, name: str = "disk") -> Path:
        point = tmp_path / name
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size_mb * 1024)}k", "tmpfs", str(point)], check=True)
        mounts.append(point)
        return point

    yield mount
    for point in reversed(mounts):
        subprocess.run(["umount", "-l", str(point)], check=False)


# --- small things a person reads ----------------------------------------------------------------------------


def test_a_tracking_password_is_never_echoed(tmp_path, capsys):
    err = one_line(
        ["sweep", "--mlflow", "http://alice:s3cret-pw@127.0.0.1:1", "--storage", str(tmp_path), *TINY], capsys
    )
    assert "s3cret-pw" not in err and "--mlflow http://alice:***@127.0.0.1:1: the MLflow tracking server" in err


def test_an_all_diverged_sweep_has_no_best_accuracy():
    from tune_alexnet.console import Console

    console = Console()
    diverged = {"epoch": 1, "best_val_acc": 0.0, "best_epoch": 0, "diverged": True}
    console.snapshot = [("TERMINATED", {"optimizer": "sgd"}, diverged), ("RUNNING", {"optimizer": "sgd"}, diverged)]
    assert "best: none yet" in console.progress() and "0.00%" not in console.progress()


def test_help_says_bf16_autocasts_on_the_cpu_too(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    assert "autocast, on CUDA and on the CPU alike" in " ".join(capsys.readouterr().out.split())


@pytest.mark.timeout(60, func_only=True)  # it hung for more than 300 s
def test_load_model_from_a_bucket_without_credentials_fails_within_the_export_limit(monkeypatch):
    from tune_alexnet.checkpoint import CheckpointError, load_model
    from tune_alexnet.storage import REACH_TIMEOUT_S

    for key in ("GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    start = time.monotonic()
    with pytest.raises(CheckpointError) as refused:
        load_model("gs://tune-alexnet-test-bucket/exp/trial/checkpoint_000001")
    assert time.monotonic() - start < REACH_TIMEOUT_S + 10
    assert "gs://tune-alexnet-test-bucket/exp/trial/checkpoint_000001 cannot be reached" in str(refused.value)
