"""What users reach for after (and during) a sweep: the console, Ray's own result API, paths as typed,
one table schema across experiments, and the best model classifying real images."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tune_alexnet import __version__
from tune_alexnet.cli import main
from tune_alexnet.export import EPOCH_SCHEMA, TABLE_SCHEMA

pytestmark = pytest.mark.slow  # real sweeps and subprocesses

SWEEP = [
    "--optimizer",
    "sgd",
    "--lr",
    "0.01",
    "--batchnorm",
    "true",
    "--batch-size",
    "32",
    "--epochs",
    "2",
    "--width",
    "0.125",
]


@pytest.fixture(scope="module")
def cli_run(synthetic_dir, tmp_path_factory):
    """The real command in its own process, typed as a user would: relative --data-dir, ~ in --storage."""
    home = tmp_path_factory.mktemp("home")
    work = tmp_path_factory.mktemp("work")
    shutil.copytree(synthetic_dir, work / "images")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["HOME"] = str(home)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tune_alexnet",
            "sweep",
            "--data-dir",
            "images",
            "--storage",
            "~/results",
            "--name",
            "typed",
            *SWEEP,
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    return out, home / "results" / "typed", work


def test_console_tells_the_story_and_nothing_else(cli_run):
    out, exp, _ = cli_run
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "tune-alexnet: Ray dashboard at http://" in text
    page = exp / "report.html"  # the study page, named first and in the summary, live from the start
    assert f"tune-alexnet: study page: {page}" in out.stdout.splitlines()[:3]
    assert f"  page:   {page}" in out.stdout and page.is_file()
    assert "2/2 done, 0 running, 0 pending; best " in text  # the progress line, with the best run so far
    table = pd.read_parquet(exp / "results.parquet")
    best = table.loc[table["final_accuracy"].idxmax()]
    assert f"  best:   {best['final_accuracy']:.2f}% (run {best['run']}: sgd lr 0.01 batch 32" in out.stdout
    assert "    sgd      best " in out.stdout
    # the experiment's real folder, and a tensorboard that runs as printed (the venv's, where PATH has none)
    (tensorboard,) = re.findall(rf"  curves: (\S+) --logdir {re.escape(str(exp))}\n", out.stdout)
    assert tensorboard == "tensorboard" or os.access(tensorboard, os.X_OK)
    assert "tune-alexnet: data: " in text and "tune_alexnet." not in text  # one voice
    assert f"  best checkpoint: {best['best_checkpoint']}" in out.stdout
    for noise in (
        "Checkpoint successfully created",
        "Configuration for experiment",
        "sample_from",
        "may become a bottleneck",
        "driver_artifacts",
    ):
        assert noise not in text, noise
    assert max(len(line) for line in out.stdout.splitlines() if not line.startswith("  best checkpoint")) <= 120


def test_export_and_report_take_relative_home_and_absolute_paths(cli_run, tmp_path, monkeypatch, capsys):
    out, exp, work = cli_run
    assert out.returncode == 0
    monkeypatch.setenv("HOME", str(exp.parents[1]))
    monkeypatch.chdir(exp.parent)
    for i, path in enumerate(["typed", "~/results/typed", str(exp)]):
        assert main(["export", path, "--out", f"tables{i}"]) == 0, capsys.readouterr().err
        assert len(pd.read_parquet(exp.parent / f"tables{i}" / "results.parquet")) == 2
    assert main(["report", "typed", "--out", "~/report"]) == 0
    assert (exp.parents[1] / "report" / "report.md").is_file()


def test_an_answer_stdout_cannot_take_is_said_once_and_the_files_are_whole(cli_run, tmp_path):
    """Output to a full disk ended export and report in a traceback, and so did a path stdout's encoding could not
    spell; a sweep whose report.md did not fit lost its summary and the way to resume to a StopIteration."""
    from tune_alexnet.console import summary

    _, exp, _ = cli_run
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for command in ("export", "report"):
        with open("/dev/full", "w") as full:
            out = subprocess.run([sys.executable, "-m", "tune_alexnet", command, str(exp), "--out",
                                  str(tmp_path / command)], stdout=full, stderr=subprocess.PIPE, text=True, env=env,
                                 timeout=120)  # fmt: skip
        assert out.returncode == 1 and out.stderr.strip() == (
            "tune-alexnet: warning: standard output cannot be written (No space left on device); the rest of what "
            "the command prints there is dropped"
        ), out.stderr
    assert len(pd.read_parquet(tmp_path / "export" / "results.parquet")) == 2
    assert (tmp_path / "report" / "report.md").is_file()
    out = subprocess.run([sys.executable, "-m", "tune_alexnet", "export", str(exp), "--out", str(tmp_path / "caf\xe9")],
                         capture_output=True, text=True, env={**env, "PYTHONIOENCODING": "ascii"}, timeout=120)  # fmt: skip
    assert out.returncode == 0 and f"{tmp_path}/caf\\xe9/results.parquet" in out.stdout, out.stderr
    table = pd.read_parquet(exp / "results.parquet")
    told = summary(table, str(exp), [str(exp / "results.parquet")])  # report.md and the page did not fit
    assert "  report: " not in told and f"  page:   {exp}/report.html" in told


def test_report_reads_no_matplotlib_file_another_user_could_plant(cli_run, tmp_path):
    """matplotlib read ./matplotlibrc at its import (a FIFO there hung the report), and kept its font cache in
    MPLCONFIGDIR or XDG_CACHE_HOME, which may be shared: it rewrote the cache through another user's link, over a
    file of this user's."""
    _, exp, _ = cli_run
    shared = tmp_path / "shared"  # a folder like /tmp: anyone makes files there
    shared.mkdir(0o1777)
    shared.chmod(0o1777)
    os.mkfifo(shared / "matplotlibrc", 0o666)
    precious = tmp_path / "precious.txt"
    precious.write_text("my thesis")
    for cache in (shared / "matplotlib", shared / "config"):
        cache.mkdir(0o777)
        cache.chmod(0o777)
        (cache / "fontlist-v390.json").symlink_to(precious)  # (every version's name: which one is read varies)
        for version in ("v330", "v3.11.0", "v3.10.0"):
            (cache / f"fontlist-{version}.json").symlink_to(precious)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(XDG_CACHE_HOME=str(shared), MPLCONFIGDIR=str(shared / "config"))
    out = subprocess.run([str(Path(sys.executable).parent / "tune-alexnet"), "report", str(exp), "--out",
                          str(tmp_path / "r")], cwd=shared, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert precious.read_text() == "my thesis" and (tmp_path / "r" / "report.md").is_file()


def test_ray_result_api_gives_the_studys_answer_without_arguments(cli_run):
    from ray import tune

    from tune_alexnet.train import train_cifar

    out, exp, _ = cli_run
    assert out.returncode == 0
    table = pd.read_parquet(exp / "results.parquet")
    results = tune.Tuner.restore(str(exp), trainable=train_cifar).get_results()
    best = results.get_best_result()  # metric and mode come from the experiment
    assert best.metrics["best_val_acc"] == pytest.approx(table["final_accuracy"].max(), abs=0.006)
    assert len(results.get_dataframe()) == 2


def test_tables_share_one_schema_and_say_what_made_them(cli_run, mixed_experiment):
    out, exp, _ = cli_run
    assert out.returncode == 0
    mixed_path, _ = mixed_experiment  # errored and diverged trials: nulls where the clean one has values
    for name, schema in (("results.parquet", TABLE_SCHEMA), ("epochs.parquet", EPOCH_SCHEMA)):
        both = ds.dataset([str(Path(mixed_path, name)), str(exp / name)], format="parquet").to_table().to_pandas()
        assert list(both.columns) == list(schema)
        a, b = pq.read_schema(Path(mixed_path, name)), pq.read_schema(exp / name)
        assert a.remove_metadata() == b.remove_metadata()
        meta = json.loads(b.metadata[b"tune_alexnet"])
        assert meta["tune_alexnet"] == __version__ and meta["ray"] and meta["torch"]
        assert meta["settings"]["epochs"] == 2 and meta["settings"]["grid"]["optimizer"] == ["sgd"]
    epochs = pd.read_parquet(exp / "epochs.parquet")
    assert list(zip(epochs["run"], epochs["epoch"])) == sorted(zip(epochs["run"], epochs["epoch"]))
    # Rows of several experiments read as one dataset still say where each came from.
    record = json.loads((exp / "tune_alexnet_sweep.json").read_text())
    for name in ("results.parquet", "epochs.parquet"):
        both = pd.concat([pd.read_parquet(Path(mixed_path, name)), pd.read_parquet(exp / name)])
        assert set(both["experiment"]) == {"mixed", "typed"}
        mine = both[both["experiment"] == "typed"]
        assert (mine["width"] == 0.125).all() and mine["subset"].isna().all()
        assert (mine["data_fingerprint"] == record["data"]["fingerprint"]).all() and len(record["data"]["fingerprint"])
    assert (pd.read_parquet(exp / "results.parquet")["precision"] == "fp32").all()
    merged = pd.read_csv(exp / "merged_results.csv")
    assert list(merged.columns) == ["Run", "Optimizer", "LR", "Batch Size", "Dropout", "Batch Norm", "Final Accuracy"]
    assert merged["Run"].is_unique and len(merged) == 2


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"tune-alexnet {__version__}"


def test_resume_on_other_data_is_refused_unless_deliberate(cli_run, mini_dir, capsys, monkeypatch):
    out, exp, _ = cli_run
    assert out.returncode == 0
    before = sorted(p.name for p in exp.iterdir())
    code = main(
        [
            "sweep",
            "--resume",
            "--name",
            "typed",
            "--storage",
            str(exp.parent),
            "--data-dir",
            str(mini_dir),
            "--subset",
            "2",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "--subset 2 differs from the experiment's own all images (--allow-data-change" in err[-1], err
    resume = ["sweep", "--resume", "--name", "typed", "--storage", str(exp.parent), "--data-dir", str(mini_dir)]
    assert main(resume) == 2  # other images, no flag that says so: their fingerprint tells
    assert "pass --allow-data-change to resume on purpose" in capsys.readouterr().err.strip().splitlines()[-1]
    assert sorted(p.name for p in exp.iterdir()) == before  # nothing written


def test_a_trial_is_running_only_while_a_sweep_holds_its_experiment(tmp_path):
    from tune_alexnet.export import sweep_holds
    from tune_alexnet.preflight import lock_experiment

    exp = tmp_path / "results" / "e"
    exp.mkdir(parents=True)
    assert not sweep_holds(str(exp))  # no lock file: no sweep
    with lock_experiment(str(tmp_path / "results"), "e"):
        assert sweep_holds(str(exp))
    (tmp_path / "results" / ".e.lock").write_text("a sweep (pid 1)")  # what a killed sweep leaves: unlocked
    assert not sweep_holds(str(exp))


def test_the_readmes_python_runs_on_a_real_experiment(cli_run):
    """The tour's snippets, in order, with the experiment's folder in place of ray_results/<name>."""
    import re

    import numpy as np

    out, exp, _ = cli_run
    assert out.returncode == 0
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", readme, re.DOTALL)]
    assert len(blocks) == 2
    scope = {}
    for block in blocks:
        exec(block.replace("ray_results/<name>", str(exp)), scope)
    from tune_alexnet.checkpoint import predict, predict_proba

    images = np.zeros((3, 32, 32, 3), np.uint8)
    model = scope["model"]
    assert predict_proba(model, images).shape == (3, 10) and predict(model, images).shape == (3,)


def test_the_docs_python_runs_on_a_real_experiment(cli_run, tmp_path, monkeypatch):
    """docs/results.md's snippets (but the API's, which test_api runs), in order, on a real experiment: its tables
    copied as two experiments named as the snippet names them, its folder in place of the placeholders."""
    import re

    import numpy as np

    out, exp, _ = cli_run
    assert out.returncode == 0
    for name in ("study", "study-seed2"):
        (tmp_path / "ray_results" / name).mkdir(parents=True)
        shutil.copy(exp / "results.parquet", tmp_path / "ray_results" / name)
    monkeypatch.chdir(tmp_path)
    page = (Path(__file__).resolve().parents[1] / "docs" / "results.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", page, re.DOTALL) if "api.sweep(" not in b]
    assert len(blocks) == 3
    scope = {"images": np.zeros((3, 32, 32, 3), np.uint8)}  # the snippet's images: a batch of 32x32 RGB
    for block in blocks:
        exec(block.replace("/abs/path/ray_results/<name>", str(exp)).replace("<name>", "study"), scope)
    assert len(scope["every"]) == 2 * len(scope["df"]) == 4
    assert scope["results"].get_best_result().metrics["trial_id"] == scope["best_run"](scope["df"])["trial_id"]
    assert scope["probabilities"].shape == (3, 10) and len(scope["labels"]) == 3


def test_a_trial_id_with_a_digit_int_cannot_read_is_scored_as_index_0_without_an_error():
    """An edited state's trial id ('a_²': a digit to str.isdigit, not to int) broke the tables' best-run rule."""
    from tune_alexnet.export import best_key, score

    assert score(50.0, 1, "a_²") == score(50.0, 1, "a_0")
    assert best_key(50.0, 1, "a_00001") < best_key(50.0, 1, "a_00002")
