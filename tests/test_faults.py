"""Nothing lost: real processes killed with real signals, divergence, errored trials, half-finished exports."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from conftest import make_image_folder

from tune_alexnet.export import load_experiment

pytestmark = pytest.mark.slow

TIMEOUT = 240


def start_sweep(args, log_path: Path, **env) -> subprocess.Popen:
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **env}
    return subprocess.Popen(
        [sys.executable, "-m", "tune_alexnet", "sweep", *map(str, args)],
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"sweep exited (rc={proc.returncode}) before {what}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def reported_epochs(exp_dir: Path) -> dict[str, list[dict]]:
    """Each trial folder's result.json lines, by folder name (complete lines only)."""
    out = {}
    for result in exp_dir.glob("train_cifar_*/result.json"):
        rows = []
        for line in result.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
        out[result.parent.name] = rows
    return out


def worker_titles(proc: subprocess.Popen) -> str:
    """The titles Ray gives its worker processes under the sweep's driver: what each runs now."""
    titles = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            titles.append(" ".join(child.cmdline()))
    return "\n".join(titles)


def sweep_args(data_dir, storage, name, epochs, extra=()):
    return [
        "--data-dir",
        data_dir,
        "--optimizer",
        "sgd",
        "--lr",
        "0.01",
        "--batchnorm",
        "true",
        "--epochs",
        epochs,
        "--width",
        "0.125",
        "--storage",
        storage,
        "--name",
        name,
        *extra,
    ]


def test_driver_killed_mid_sweep_then_resume_keeps_finished_trials(synthetic_dir, tmp_path):
    storage, epochs = tmp_path / "results", 4
    exp_dir = storage / "killed"
    three = ["--dropout", "true"]  # batch 32, 64, 128: two run at once, so one can finish while two have not
    proc = start_sweep(sweep_args(synthetic_dir, storage, "killed", epochs, three), tmp_path / "first.log")
    finished = wait_for(
        lambda: [k for k, rows in reported_epochs(exp_dir).items() if len(rows) == epochs], proc, "a trial to finish"
    )
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (storage / ".killed.lock").exists()  # its lock file stays; the lock itself went with the process
    before = reported_epochs(exp_dir)
    assert len(before) < 3 or any(len(rows) < epochs for rows in before.values()), "sweep ended before the kill"

    # A half-finished experiment exports with every trial's recorded status, no crash.
    half = load_experiment(exp_dir).table
    assert len(half) == 3
    assert set(half["status"]) <= {"terminated", "interrupted", "pending"}  # no sweep holds it: none is running
    assert (half["status"] != "terminated").any()

    # Without --resume the name is refused; with it the sweep completes.
    again = start_sweep(sweep_args(synthetic_dir, storage, "killed", epochs, three), tmp_path / "refused.log")
    assert again.wait(TIMEOUT) == 2
    assert "--resume" in (tmp_path / "refused.log").read_text()
    resumed = start_sweep(["--resume", "--name", "killed", "--storage", storage], tmp_path / "resume.log")
    assert resumed.wait(TIMEOUT) == 0, (tmp_path / "resume.log").read_text()[-3000:]

    table = pd.read_parquet(exp_dir / "results.parquet")
    assert len(table) == 3 and set(table["status"]) == {"terminated"}
    assert (table["epochs_run"] == epochs).all()
    after = reported_epochs(exp_dir)
    for name in finished:  # finished before the kill: not one epoch trained again
        assert [r["epoch"] for r in after[name]] == [r["epoch"] for r in before[name]]


def test_killed_trial_worker_restarts_from_its_checkpoint(synthetic_dir, tmp_path):
    storage, epochs = tmp_path / "results", 8
    exp_dir = storage / "worker"
    proc = start_sweep(
        sweep_args(
            synthetic_dir,
            storage,
            "worker",
            epochs,
            [
                "--dropout",
                "true",
                "--batch-size",
                "32,64",
                "--max-failures",
                "2",
                "--resume-every",
                "0",
                "--patience",
                "100",
            ],
        ),
        tmp_path / "sweep.log",
    )

    def victim():
        for name, rows in reported_epochs(exp_dir).items():
            if len(rows) >= 2 and rows[-1]["epoch"] < epochs - 2:
                return name, rows[-1]["pid"], rows[-1]["epoch"]

    name, pid, epoch_at_kill = wait_for(victim, proc, "a trial in mid-training")
    os.kill(pid, signal.SIGKILL)
    assert proc.wait(TIMEOUT) == 0, (tmp_path / "sweep.log").read_text()[-3000:]

    table = pd.read_parquet(exp_dir / "results.parquet")
    assert len(table) == 2 and set(table["status"]) == {"terminated"} and (table["epochs_run"] == epochs).all()
    rows = reported_epochs(exp_dir)[name]
    seen = [r["epoch"] for r in rows]
    assert sorted(set(seen)) == list(range(1, epochs + 1))
    assert seen.count(1) == 1, seen  # resumed, not started over
    assert len({r["pid"] for r in rows}) == 2  # a new worker process took over
    first_new = next(i for i, r in enumerate(rows) if r["pid"] != pid)
    assert rows[first_new]["epoch"] >= epoch_at_kill


def test_divergence_is_recorded_and_the_sweep_goes_on(mixed_experiment):
    _, exp = mixed_experiment
    table = exp.table.set_index(["optimizer", "lr"])
    assert table.loc[("adam", 0.001), "status"] == "terminated"
    assert table.loc[("adam", 0.001), "epochs_run"] == 3
    diverged = table.loc[("adam", 1e6)]
    assert diverged["status"] == "diverged" and diverged["epochs_run"] < 3
    assert not diverged["stopped_early"]


def test_errored_trials_are_rows_with_their_error(mixed_experiment):
    _, exp = mixed_experiment
    errored = exp.table[exp.table["optimizer"] == "nosuchopt"]
    assert len(errored) == 2 and set(errored["status"]) == {"errored"}
    assert errored["error"].str.contains("optimizer 'nosuchopt' is unknown").all()
    assert errored["final_accuracy"].isna().all() and errored["run"].isna().all()


@pytest.mark.parametrize(
    "signals",
    [
        [signal.SIGTERM],  # what `ray job stop`, Kubernetes and systemd send (Ctrl-C: the S3 test in test_cluster)
        [signal.SIGHUP, signal.SIGINT],  # a closed terminal, then an impatient Ctrl-C: a shorter stop, still clean
    ],
    ids=["sigterm", "sighup-then-sigint"],
)
def test_a_stop_signal_stops_cleanly_exports_what_is_there_and_says_how_to_resume(signals, synthetic_dir, tmp_path):
    storage, epochs = tmp_path / "results", 30
    exp_dir = storage / "interrupted"
    log = tmp_path / "sweep.log"
    proc = start_sweep(
        sweep_args(synthetic_dir, storage, "interrupted", epochs, ["--dropout", "true", "--patience", "100"]), log
    )
    wait_for(lambda: any(len(rows) >= 2 for rows in reported_epochs(exp_dir).values()), proc, "a trial to train")
    for sig in signals:
        os.kill(proc.pid, sig)  # to the driver alone, as a process manager does
        time.sleep(0.5)
    assert proc.wait(TIMEOUT) == 1, log.read_text()[-3000:]
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert (
        f"did not finish; 'tune-alexnet sweep --resume --name interrupted --storage {storage}' continues them" in text
    )
    assert "errored or lost" not in text  # no error column to point to
    table = pd.read_parquet(exp_dir / "results.parquet")  # the table of what there is, written on the way out
    assert len(table) == 3 and (table["status"] != "terminated").any()
    console_tells_what_the_table_tells(text, table)
    # From the stop's line on, no progress line: the stop's own lines and the summary tell what there is.
    assert not re.search(r"\] \d+/3 done, \d+ running, \d+ pending", text.split("tune-alexnet: stopping:")[1])
    if signals == [signal.SIGTERM]:
        for rows in reported_epochs(exp_dir).values():  # what `ray job stop` sends: each running trial saved first
            assert rows[-1].get("saved_for") == "stop" or rows[-1].get("epoch") == epochs, rows[-1]
    # One voice: Ray's own resume hint, its stop notice and its noise about trials that never started stay in
    # the experiment's driver.log.
    for ray_line in ("Tuner.restore", "Stop signal received", "Failed to fetch metrics"):
        assert ray_line not in text, text[-3000:]
    assert "tune-alexnet: stopping: each running trial saves its state at its next training step" in text
    if signals == [signal.SIGTERM]:  # (the second signal stopped before Tune's own stop began)
        assert "Stop signal received" in (exp_dir / "driver.log").read_text()


def console_tells_what_the_table_tells(text: str, table: pd.DataFrame) -> None:
    """The summary counts what the table counts."""
    counts = table["status"].value_counts()
    assert "running" not in counts  # the sweep stopped: what ran is interrupted
    summary = next(line for line in text.splitlines() if line.startswith("tune-alexnet: experiment "))
    assert f"{len(table)} trials (" in summary and all(f"{n} {s}" in summary for s, n in counts.items()), summary


def test_full_size_trials_end_from_the_inside_without_an_abort(synthetic_dir, tmp_path):
    """The function returns by the plateau rule at the same result the stopper stops on: nothing is torn down
    under a running full-width network (which once aborted worker processes at trial end)."""
    log = tmp_path / "sweep.log"
    proc = start_sweep(
        [
            "--data-dir",
            synthetic_dir,
            "--subset",
            "2",
            "--optimizer",
            "adam",
            "--lr",
            "1e-12",
            "--batchnorm",
            "true",
            "--batch-size",
            "32",
            "--epochs",
            "10",
            "--patience",
            "1",
            "--storage",
            tmp_path,
            "--name",
            "full",
        ],
        log,
    )
    assert proc.wait(TIMEOUT) == 0, log.read_text()[-3000:]
    table = pd.read_parquet(tmp_path / "full" / "results.parquet")
    assert (table["epochs_run"] == 2).all() and table["stopped_early"].all()
    logs = [p.read_text() for p in (tmp_path / "full").glob("train_cifar_*/std*")] + [log.read_text()]
    assert len(logs) == 5
    for text in logs:
        assert "Fatal Python error" not in text and "Aborted" not in text and "core dumped" not in text


def test_a_storage_filling_up_stops_the_sweep_cleanly_and_resume_finishes_it(synthetic_dir, tmp_path):
    """A real 80 MB filesystem that something else fills while the sweep runs."""
    import shutil

    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", str(disk)], check=True)
    try:
        log = tmp_path / "sweep.log"
        args = sweep_args(synthetic_dir, disk, "filling", 12, ["--dropout", "true", "--batch-size", "32,64",
                                                               "--patience", "100", "--resume-every", "0"])  # fmt: skip
        scratch = tmp_path / "scratch"  # the trials' temporary folder: what a stop leaves there
        scratch.mkdir()
        proc = start_sweep(args, log, TMPDIR=str(scratch))
        wait_for(lambda: any(len(rows) >= 2 for rows in reported_epochs(disk / "filling").values()), proc, "epochs")
        filler = disk / "someone-else.bin"
        # 5 MB left: less than one running trial needs (two need twice that: one trial may finish first). The sweep
        # writes meanwhile: a write the full disk cut short is shortened by what is missing of the 5 MB.
        with open(filler, "wb", buffering=0) as f:
            with contextlib.suppress(OSError):  # nothing at all could be written
                f.write(b"\0" * max(0, shutil.disk_usage(disk).free - 5_000_000))
            f.truncate(max(0, f.tell() - max(0, 5_000_000 - shutil.disk_usage(disk).free)))
        assert proc.wait(TIMEOUT) == 1, log.read_text()[-3000:]
        text = log.read_text()
        assert f"tune-alexnet sweep: --storage {disk} is nearly full (" in text and "Traceback" not in text
        assert f"'tune-alexnet sweep --resume --name filling --storage {disk}' continues them" in text
        table = pd.read_parquet(disk / "filling" / "results.parquet")  # what there is, exportable
        assert len(table) == 2 and (table["status"] != "terminated").any()
        # a trial waiting for the stop with a checkpoint it could not write had kept it in the temporary folder
        assert not [p for p in scratch.rglob("*") if p.is_file() and "tune-alexnet-ckpt-" in str(p)]
        filler.unlink()
        resumed = start_sweep(["--resume", "--name", "filling", "--storage", disk], tmp_path / "resume.log")
        assert resumed.wait(TIMEOUT) == 0, (tmp_path / "resume.log").read_text()[-3000:]
        table = pd.read_parquet(disk / "filling" / "results.parquet")
        assert set(table["status"]) == {"terminated"} and (table["epochs_run"] == 12).all()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def epochs_of(rows: list[dict]) -> list[int]:
    return [r["epoch"] for r in rows if r.get("epoch") is not None]


def test_ctrl_c_saves_every_running_trial_and_resume_trains_no_epoch_twice(synthetic_dir, tmp_path):
    """Ctrl-C mid-epoch: each running trial saves where it stands and reports it before the sweep ends, within the
    time the stop message states; --resume continues there, so every record shows each epoch once.

    With an offline W&B tracker: the running trials' W&B runs are closed (Ray's callback waited for their ends,
    which a stop never gives, for its 30-minute upload timeout), and a link W&B left in a run (as a second Ctrl-C
    leaves it) does not keep --resume from going on."""
    from ray import tune

    from tune_alexnet.stopping import STOP_WAIT_S

    storage, epochs = tmp_path / "results", 40  # 0.2 s an epoch: still training when the stop comes
    exp_dir = storage / "saved"
    log = tmp_path / "sweep.log"
    # A resume state at every epoch's end (Tune records each) and the stop's, inside the next one, which Tune
    # (already stopping) does not record: the resume must take the stop's, the newest.
    args = sweep_args(synthetic_dir, storage, "saved", epochs, ["--dropout", "true", "--batch-size", "16,32",
                                                                "--patience", "100", "--cpus-per-trial", "1",
                                                                "--resume-every", "0", "--wandb", "try"])  # fmt: skip
    quiet_here = ("RAY_ADDRESS", "PYTEST_CURRENT_TEST", "CI")  # as a user's shell: MLflow is silent under tests or CI
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k not in quiet_here}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", HOME=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "tune_alexnet", "sweep", *map(str, args)], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)  # fmt: skip
    wait_for(lambda: len(reported_epochs(exp_dir)) == 2 and all(len(epochs_of(r)) >= 2 for r in reported_epochs(exp_dir).values()),
             proc, "both trials to train")  # fmt: skip
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground group
    stopped = time.monotonic()
    assert proc.wait(TIMEOUT) == 1, log.read_text()[-3000:]
    assert time.monotonic() - stopped < STOP_WAIT_S + 30
    text = log.read_text()
    assert f"saves its state at its next training step (waiting at most {STOP_WAIT_S:g} s)" in text, text[-3000:]
    assert "2 of 2 running trial(s) saved their state" in text and "Traceback" not in text
    after_stop = text.split("saves its state at its next training step", 1)[1]  # the stop's line, then the summary
    assert not re.search(r"^\[\d+[mh]\d\d[sm]\] \d+/\d+ done", after_stop, re.M), after_stop[-3000:]
    before = reported_epochs(exp_dir)
    for rows in before.values():  # the last report: a state saved inside an epoch, not an epoch's
        assert rows[-1]["saved_for"] == "stop" and "epoch" not in rows[-1]
        assert rows[-1]["saved_in_epoch"] == epochs_of(rows)[-1] + 1 < epochs
    runs = list(exp_dir.glob("train_cifar_*/wandb/offline-run-*"))
    assert len(runs) == 2 and all(any(run.glob("*.wandb")) for run in runs), sorted(exp_dir.rglob("wandb/*"))
    (runs[0] / "logs").mkdir(exist_ok=True)
    (runs[0] / "logs" / "debug-core.log").symlink_to(tmp_path / "wandb-core.log")  # what W&B links there
    storage = tmp_path / "moved"  # the folder moved before it resumes: the guard watches it where it is now
    storage.mkdir()
    exp_dir = Path(shutil.move(exp_dir, storage / "saved"))
    resumed = subprocess.run([sys.executable, "-m", "tune_alexnet", "sweep", "--resume", "--name", "saved",
                              "--storage", str(storage), "--data-dir", str(synthetic_dir)], capture_output=True,
                             text=True, env=env, timeout=TIMEOUT)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert not [p for p in exp_dir.rglob("*") if p.is_symlink()]
    # Tune's usage count imported MLflow, whose telemetry wrote an id into the home folder: a sweep without --mlflow
    assert not (tmp_path / ".config" / "mlflow").exists()
    every = list(range(1, epochs + 1))
    for folder, rows in reported_epochs(exp_dir).items():
        # continued from the stop's own state (Tune never recorded it), not from the epoch's start
        resumed = rows[len(before[folder])]
        assert resumed.get("resumed_at_step") == before[folder][-1]["saved_at_step"], resumed
        assert epochs_of(rows) == every, folder  # result.json: each epoch once, the saved one continued
        assert rows[len(before[folder])]["epoch"] == before[folder][-1]["saved_in_epoch"]
        progress = pd.read_csv(exp_dir / folder / "progress.csv")
        assert progress["epoch"].dropna().astype(int).tolist() == every, folder
    grid = tune.ResultGrid(tune.ExperimentAnalysis(str(exp_dir)))
    for result in grid:  # what Ray's own API shows
        assert result.metrics_dataframe["epoch"].dropna().astype(int).tolist() == every
    table = pd.read_parquet(exp_dir / "epochs.parquet")
    assert table.groupby("trial_id")["epoch"].apply(list).map(lambda e: e == every).all()
    results = pd.read_parquet(exp_dir / "results.parquet")
    assert set(results["status"]) == {"terminated"} and results["best_checkpoint"].notna().all()


def test_a_stop_in_a_trials_first_epoch_is_where_resume_goes_on(tmp_path):
    """Tune, stopping, records no checkpoint of a stop's report: in the first epoch it has recorded none at all,
    and the stop's state was passed over (epoch 1 trained again), then mixed with the next checkpoint Tune wrote
    under the same name."""
    storage, epochs = tmp_path / "results", 2
    exp_dir = storage / "first"
    data = make_image_folder(tmp_path / "data", train_per_class=150, test_per_class=2)
    args = sweep_args(data, storage, "first", epochs, ["--dropout", "true", "--batch-size", "16"])
    args[args.index("--width") + 1] = "0.5"  # an epoch of seconds: the stop comes inside the first
    log = tmp_path / "sweep.log"
    proc = start_sweep(args, log)
    # Tune's files of a trial reach the experiment folder late (at a sync): its worker's title says it trains
    wait_for(lambda: "ray::ImplicitFunc.train" in worker_titles(proc), proc, "the trial to train")
    os.killpg(proc.pid, signal.SIGINT)  # it saves at its next training step, one inside epoch 1
    assert proc.wait(TIMEOUT) == 1, log.read_text()[-3000:]
    assert "1 of 1 running trial(s) saved their state" in log.read_text(), log.read_text()[-3000:]
    ((folder, before),) = reported_epochs(exp_dir).items()
    assert not epochs_of(before) and before[-1]["saved_for"] == "stop" and before[-1]["saved_in_epoch"] == 1
    stopped_at = exp_dir / folder / before[-1]["checkpoint_dir_name"]
    resumed = start_sweep(["--resume", "--name", "first", "--storage", storage], tmp_path / "resume.log")
    wait_for(lambda: epochs_of(reported_epochs(exp_dir)[folder]), resumed, "the resumed epoch 1")
    # epoch 1's checkpoint (best weights alone), which Tune names as the stop's: not copied in among its files
    assert not (stopped_at / "trainer.pt").exists(), sorted(p.name for p in stopped_at.iterdir())
    assert resumed.wait(TIMEOUT) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    rows = reported_epochs(exp_dir)[folder]  # Tune starts the files of a trial it holds no checkpoint of afresh
    assert epochs_of(rows) == list(range(1, epochs + 1))
    (first,) = [r for r in rows if r.get("epoch") == 1]
    assert first.get("resumed_at_step") == before[-1]["saved_at_step"], first


def test_sigterm_to_the_whole_process_group_saves_writes_the_tables_and_resumes(synthetic_dir, tmp_path):
    """`timeout`, systemd's KillMode=control-group and a shell's `kill -- -PGID` signal every process of the
    driver's group: the local Ray it started is not among them, so the trials still save and the tables follow."""
    storage, epochs = tmp_path / "results", 40  # 0.1-0.2 s an epoch: still training when the signal comes
    exp_dir = storage / "grouped"
    log = tmp_path / "sweep.log"
    extra = ["--patience", "100", "--dropout", "true", "--batch-size", "32", "--best-every", "0"]
    proc = start_sweep(sweep_args(synthetic_dir, storage, "grouped", epochs, extra), log)  # each gain seen at once
    wait_for(lambda: any(len(epochs_of(r)) >= 2 for r in reported_epochs(exp_dir).values()), proc, "a trial to train")
    ray_processes = psutil.Process(proc.pid).children(recursive=True)
    assert ray_processes and all(os.getpgid(p.pid) != proc.pid for p in ray_processes)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(TIMEOUT) == 1, log.read_text()[-3000:]
    gone, alive = psutil.wait_procs(ray_processes, timeout=30)
    assert not alive, alive  # Ray ended with the driver
    text = log.read_text()
    assert text.count("tune-alexnet: stopping:") == 1 and "Traceback" not in text, text[-3000:]
    assert "1 of 1 running trial(s) saved their state" in text, text[-3000:]
    assert len(pd.read_parquet(exp_dir / "results.parquet")) == len(pd.read_csv(exp_dir / "results.csv")) == 1
    (rows,) = reported_epochs(exp_dir).values()
    assert rows[-1]["saved_for"] == "stop", rows[-1]
    (progress,) = exp_dir.glob("train_cifar_*/progress.csv")  # a byte that is not UTF-8: Tune's traceback, each try
    progress.write_bytes(b"\xff" + progress.read_bytes())
    resumed = start_sweep(["--resume", "--name", "grouped", "--storage", storage], tmp_path / "resume.log")
    assert resumed.wait(TIMEOUT) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    (rows,) = reported_epochs(exp_dir).values()
    assert epochs_of(rows) == list(range(1, epochs + 1))  # continued from the saved state: no epoch twice
