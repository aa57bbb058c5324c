"""Bad input, damaged experiments and competing sweeps: each gets one line and exit 2, and nothing is lost.

The data folder's own table of bad inputs is in test_data.py."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tune_alexnet.cli import main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line_exit_2(argv, capsys) -> str:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [
        ln for ln in err.splitlines() if ln.strip() and "decoding " not in ln
    ]  # the data's progress bar may come first
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--name", "../outside"], "'../outside'; allowed: letters, digits"),
        (["--name", "a/b"], "'a/b'; allowed: letters, digits"),
        (["--name", "x" * 300], "at most 100 characters"),
        (["--name", ".hidden"], "not starting with '.'"),
        (["--seed", str(2**64)], f"'{2**64}'; allowed: a whole number 0..4294967295"),
        (["--cpus-per-trial", "0"], "--cpus-per-trial 0 needs --gpus-per-trial above 0"),
        (["--gpus-per-trial", "1"], "a trial asks for 1 CPU, 1 GPU but no node of this cluster has that"),
        (
            ["--cpus-per-trial", "64"],
            "a trial asks for 64 CPU but no node of this cluster has that (the most any node has: 2 CPU)",
        ),
    ],
)
def test_bad_sweep_flags(extra, needle, ray_local, synthetic_dir, tmp_path, capsys):
    storage = tmp_path / "results"
    err = one_line_exit_2(
        [
            "sweep",
            "--data-dir",
            str(synthetic_dir),
            "--storage",
            str(storage),
            "--epochs",
            "1",
            "--optimizer",
            "sgd",
            *extra,
        ],
        capsys,
    )
    assert needle in err, err
    assert not storage.exists() or [p.name for p in storage.iterdir()] == []  # nothing written, no lock left


def test_a_name_taken_by_a_file_is_refused(synthetic_dir, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    err = one_line_exit_2(
        ["sweep", "--data-dir", str(synthetic_dir), "--storage", str(tmp_path), "--name", "taken"], capsys
    )
    assert f"{tmp_path / 'taken'} is a file" in err


@pytest.mark.slow
def test_unreachable_places_fail_within_seconds(synthetic_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_EC2_METADATA_DISABLED="true")
    port = free_port()  # nothing listens there
    cases = [
        (["--address", f"127.0.0.1:{port}"], f"--address 127.0.0.1:{port}: no Ray cluster answers there"),
        (["--storage", f"s3://bucket/x?endpoint_override=127.0.0.1:{port}&scheme=http"], "cannot be reached"),
    ]
    for extra, needle in cases:
        start = time.monotonic()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "tune_alexnet",
                "sweep",
                "--data-dir",
                str(synthetic_dir),
                "--storage",
                str(tmp_path / "r"),
                *extra,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert out.returncode == 2, out.stderr[-2000:]
        lines = out.stderr.strip().splitlines()
        assert needle in lines[-1] and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert time.monotonic() - start < 60


@pytest.mark.slow
def test_export_and_report_into_a_place_that_cannot_be_written(mixed_experiment, tmp_path, capsys):
    path, _ = mixed_experiment
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for command in ("export", "report"):
        err = one_line_exit_2([command, path, "--out", str(blocker / "sub")], capsys)
        assert f"cannot write into {blocker / 'sub'}" in err


@pytest.fixture
def damaged(mixed_experiment, tmp_path):
    """A copy of a finished experiment, to break."""
    path, exp = mixed_experiment
    copy = tmp_path / "mixed"
    shutil.copytree(path, copy)
    return copy, exp.table


@pytest.mark.slow
def test_a_table_knows_what_it_is_missing(damaged, capsys):
    copy, before = damaged
    trained = before[before["status"] == "terminated"].iloc[0]
    trial_dir = Path(
        str(trained["best_checkpoint"]).replace(str(Path(trained["best_checkpoint"]).parents[2]), str(copy.parent))
    ).parent
    shutil.rmtree(trial_dir / Path(trained["best_checkpoint"]).name)
    diverged = before[before["status"] == "diverged"].iloc[0]
    (next(copy.glob(f"*{diverged['trial_id']}*")) / "result.json").unlink()
    assert main(["export", str(copy)]) == 0
    table = pd.read_parquet(copy / "results.parquet").set_index("trial_id")
    assert table.loc[trained["trial_id"], "best_checkpoint"] is pd.NA or pd.isna(
        table.loc[trained["trial_id"], "best_checkpoint"]
    )
    assert (
        "best checkpoint" in table.loc[trained["trial_id"], "error"]
        and "is missing" in table.loc[trained["trial_id"], "error"]
    )
    assert table.loc[diverged["trial_id"], "status"] == "lost"
    assert "result.json is missing" in table.loc[diverged["trial_id"], "error"]
    assert pd.isna(table.loc[diverged["trial_id"], "final_accuracy"])


@pytest.mark.slow
def test_a_truncated_experiment_state_still_exports_and_refuses_resume(damaged, capsys, synthetic_dir):
    copy, before = damaged
    for state in copy.glob("experiment_state-*.json"):
        state.write_text(state.read_text()[:200])  # a full disk cut it short
    assert main(["export", str(copy), "--out", str(copy / "tables")]) == 0
    captured = capsys.readouterr()
    assert "the experiment state" in captured.err and "is missing or unreadable" in captured.err
    table = pd.read_parquet(copy / "tables" / "results.parquet")
    finished = before[before["status"].isin(["terminated", "diverged"])]
    assert set(finished["trial_id"]) <= set(table["trial_id"])
    rows = table.set_index("trial_id").loc[finished["trial_id"]]
    assert (rows["final_accuracy"].fillna(-1) == finished.set_index("trial_id")["final_accuracy"].fillna(-1)).all()
    states = sorted(p.name for p in copy.glob("experiment_state-*.json"))
    err = one_line_exit_2(["sweep", "--resume", "--name", "mixed", "--storage", str(copy.parent)], capsys)
    assert "the experiment state of 'mixed' is damaged" in err and "tune-alexnet export" in err
    assert sorted(p.name for p in copy.glob("experiment_state-*.json")) == states  # nothing newer hides it


@pytest.mark.slow
def test_one_sweep_per_experiment_folder(synthetic_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    args = [
        sys.executable,
        "-m",
        "tune_alexnet",
        "sweep",
        "--data-dir",
        str(synthetic_dir),
        "--storage",
        str(tmp_path),
        "--name",
        "held",
        "--optimizer",
        "sgd",
        "--lr",
        "0.01",
        "--batchnorm",
        "true",
        "--batch-size",
        "32",
        "--dropout",
        "true",
        "--epochs",
        "3",
        "--width",
        "0.125",
        "--quiet",
    ]
    first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / ".held.lock").exists():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    for extra in ([], ["--resume"]):
        second = subprocess.run(args + extra, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        line = second.stderr.strip().splitlines()[-1]
        assert f"experiment 'held' in {tmp_path} is in use by a sweep (pid {first.pid} on " in line, line
    assert first.wait(300) == 0, first.stderr[-2000:]
    assert len(pd.read_parquet(tmp_path / "held" / "results.parquet")) == 1
    assert not (tmp_path / ".held.lock").exists()  # released


@pytest.mark.slow
def test_resume_without_a_name_takes_the_newest_unfinished_experiment(mixed_experiment, tmp_path):
    from tune_alexnet.preflight import PreflightError
    from tune_alexnet.sweep import _latest_experiment

    path, exp = mixed_experiment  # has errored trials: unfinished
    shutil.copytree(path, tmp_path / "older-unfinished")
    time.sleep(0.01)
    shutil.copytree(path, tmp_path / "newer-finished")
    done = exp.table.assign(status="terminated")
    done.to_parquet(tmp_path / "newer-finished" / "results.parquet")
    assert _latest_experiment(str(tmp_path)) == "older-unfinished"
    shutil.rmtree(tmp_path / "older-unfinished")
    with pytest.raises(PreflightError, match=r"every experiment in .* has finished \(newer-finished\); pass --name"):
        _latest_experiment(str(tmp_path))


@pytest.fixture
def small_disk(tmp_path):
    """A real 20 MB filesystem (tmpfs), as a storage that is about to be full."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_a_storage_without_room_for_the_sweep_is_refused_before_any_trial(small_disk, ray_local, synthetic_dir, capsys):
    err = one_line_exit_2(
        ["sweep", "--data-dir", str(synthetic_dir), "--storage", str(small_disk), "--name", "big", "--optimizer",
         "sgd", "--lr", "0.01", "--batchnorm", "true", "--width", "0.125", "--epochs", "1"],
        capsys,
    )  # fmt: skip
    assert f"--storage {small_disk} has 21 MB free but this sweep needs about 36 MB (6 trial(s) keep 2 MB" in err
    assert list(small_disk.iterdir()) == []  # nothing written, the lock gone


@pytest.mark.slow
def test_export_reads_tunes_state_without_unpickling_it(damaged, capsys):
    """A shared folder's pickled fields are never loaded: export needs no trust in whoever wrote it."""
    import json

    copy, before = damaged
    (state,) = copy.glob("experiment_state-*.json")
    data = json.loads(state.read_text())
    for entry in data["trial_data"]:
        trial = json.loads(entry[0])
        for key, value in trial.items():
            if isinstance(value, str) and key not in ("trial_id", "status", "relative_logdir", "trainable_name"):
                trial[key] = (
                    "80049505000000000000008c026f73948c0673797374656d9493948c046563686f945294"  # a pickle that runs code
                )
        entry[0] = json.dumps(trial)
    state.write_text(json.dumps(data))
    assert main(["export", str(copy)]) == 0, capsys.readouterr().err
    table = pd.read_parquet(copy / "results.parquet")
    assert sorted(table["trial_id"]) == sorted(before["trial_id"])
    assert list(table.sort_values("trial_id")["status"]) == list(before.sort_values("trial_id")["status"])
