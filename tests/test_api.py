"""The package from Python: the command line's settings and checks, and what a user needs next."""

import os
import re
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_image_folder

from tune_alexnet import api
from tune_alexnet.export import ExportError


def test_flags_from_python_pass_the_command_lines_checks():
    s = api.settings(optimizer=["sgd"], lr=0.01, batch_size=[32, 64], dropout=True, epochs=2, width=0.125)
    assert s.grid.optimizer == ("sgd",) and s.grid.batch_size == (32, 64) and s.grid.dropout == (True,)
    assert s.epochs == 2 and s.trial["width"] == 0.125
    with pytest.raises(ValueError, match=r"^tune-alexnet sweep: error: argument --epochs: invalid value '0'; allowed"):
        api.settings(epochs=0)
    with pytest.raises(ValueError, match="--runs picks whole runs of the study"):
        api.settings(runs=[2], optimizer="sgd")
    assert api.settings(tf32=False).runtime["tf32"] is False  # a switch turned off: its --no- twin
    assert api.settings(tf32=True).runtime["tf32"] is True and "tf32" not in api.settings().runtime
    # Keywords have no order a reader sees: two that set one setting are refused, not settled by the last one.
    with pytest.raises(ValueError, match=r"^tune-alexnet sweep: error: tf32=True and no_tf32=True set one setting"):
        api.settings(tf32=True, no_tf32=True)
    # A switch takes True or False, not a word that reads as either; a value cannot go in unnamed.
    for loose in ({"resume": "no"}, {"no_tf32": "false"}, {"help": True}):
        with pytest.raises(ValueError, match=r"^tune-alexnet sweep: error: \w+=.*; allowed: "):
            api.settings(**loose)
    with pytest.raises(TypeError):
        api.sweep("sgd")  # would have started the whole 108-run study
    # A value of another type is not spelled into a flag: data_dir=123 was the folder '123', None read 'None'.
    for wrong in ({"data_dir": 123}, {"data_dir": b"/tmp"}, {"storage": object()}, {"epochs": object()}):
        with pytest.raises(ValueError, match=rf"^tune-alexnet sweep: error: {next(iter(wrong))}=.*; allowed: a "):
            api.settings(**wrong)
    assert api.settings(data_dir=Path("/tmp")).data_dir == "/tmp"  # a path is a path
    # None leaves a setting at its default, but a name that is no setting is refused all the same (a typo).
    assert api.settings(epochs=None).epochs == api.settings().epochs
    for typo in ({"epoch": None}, {"epoch": 3}):
        with pytest.raises(ValueError, match=r"^tune-alexnet sweep: error: unrecognized arguments: --epoch"):
            api.settings(**typo)
    # numpy's numbers are numbers, as they print; a folder may begin with -; an int Python will not write out
    s = api.settings(epochs=np.int64(3), lr=[np.float32(0.01)], storage="-dir")
    assert (s.epochs, s.grid.lr, s.storage) == (3, (0.01,), "-dir")
    with pytest.raises(ValueError, match=r"^tune-alexnet sweep: error: epochs: a number too long to write out; "):
        api.settings(epochs=10**5000)
    with pytest.raises(ExportError, match=r"^experiment: None; allowed: a folder or URI as a str or os.PathLike"):
        api.table(None)


def test_the_apis_paths_are_checked_as_the_command_lines_before_anything_is_read(tmp_path):
    """What the command line refuses in a path (a control character, an empty path, bytes) the API refuses too,
    in one line naming the argument, before it reads the experiment or makes a folder."""
    from tune_alexnet.checkpoint import CheckpointError

    exp = str(tmp_path / "not-an-experiment")  # the out_dir is checked first, so this is never read
    (tmp_path / "dangling").symlink_to(tmp_path / "gone" / "deep")
    odd = tmp_path / "nl\nx\u202e"
    odd.mkdir()
    (tmp_path / "to-odd").symlink_to(odd)
    for bad, why in (("a\x00b", "control character"), ("a\nb", "control character"), ("\u202eevil", "control char"),
                     ("", "an empty path"), (b"out", "as a str or os.PathLike"), (3, "as a str or os.PathLike"),
                     ("~a\x00b", "control character"), ("~\ud800/x", "in UTF-8"),  # before ~ is looked up
                     # the kernel goes through the link before the ..: the folder would be made where it points
                     (f"{tmp_path}/dangling/../out", "dangling is a link to nothing"),
                     (f"{tmp_path}/to-odd/out", r"control character, as .*/nl\\nx\\u202e/out")):  # fmt: skip
        for write in (api.export, api.report, api.write_report):
            with pytest.raises(ExportError, match=f"^out_dir: .*{why}"):
                write(exp, bad)
    for bad in (None, b"x\x1b[31m", "x\x1b[31m", 7):  # (a bytes path to a checkpoint is fine: os.fspath's)
        with pytest.raises(CheckpointError, match=r"^checkpoint: .*; allowed: a folder or URI"):
            api.load_model(bad)
        with pytest.raises(ExportError, match=r"^experiment: .*; allowed: a folder or URI"):
            api.load_experiment(bad)
    # a secret in a value of the wrong type is hidden, however long (a cut before hiding it left it shown)
    secret = "http://alice:S3cretPWthatIsLong0123456789abcdefghijklmnop@mlflow.example.com:5000"
    for call in (lambda: api.settings(mlflow=secret.encode()), lambda: api.settings(mlflow=[secret]),
                 lambda: api.load_model(secret.encode() * 2), lambda: api.table(secret.encode())):  # fmt: skip
        with pytest.raises((ValueError, ExportError)) as refused:
            call()
        assert "alice:***@" in str(refused.value) and "S3cret" not in str(refused.value)
    # a long password is hidden before the line is cut (cut first, it lost its '@' and was shown)
    long = "S3CR3T" + "x" * 400
    for call in (lambda: api.settings(data_dir=f"https://user:{long}@host/cifar"),
                 lambda: api.table(f"s3://key:{long}@bucket/exp\t"), lambda: api.settings(storage=f"s3://u:{long}@b/\udcff"),
                 lambda: api.settings(wandb=f"https://api:{long[:40]}@api.wandb.ai"),
                 lambda: api.settings(name=f"https://api:{long[:40]}@api.wandb.ai"),
                 lambda: api.table(f"s3://AKIA:{long[:200]}@bucket/x?region=%zz")):  # pyarrow's error names it  # fmt: skip
        with pytest.raises((ValueError, ExportError)) as refused:
            call()
        assert "S3CR3T" not in str(refused.value), str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", odd.name, "to-odd"]
    assert list(odd.iterdir()) == []


def test_a_path_is_checked_as_the_system_and_the_package_take_it(tmp_path, monkeypatch):
    """What path_problem approves is what the package then uses: `~` with an empty HOME is the home folder (Python
    alone takes /, and tables were written there), a local folder flag takes no URI (`dl/a://b` made folders where
    the dangling dl points), a path past what the system takes is refused at once (its walk took minutes)."""
    from tune_alexnet.checkpoint import CheckpointError
    from tune_alexnet.settings import PATH_MAX, listed_home, path_problem
    from tune_alexnet.storage import storage_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", "")
    assert storage_uri("~/x") == os.path.realpath(f"{listed_home()}/x") and path_problem("~/x") is None
    monkeypatch.setenv("HOME", " ")
    assert "(HOME=' ' is no full path); allowed: an absolute path" in path_problem("~/x")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "dl").symlink_to(tmp_path / "nowhere")
    for flag in ("data_dir", "download_root"):
        for value, why in (("dl/a://b", "(a URI); allowed: a local folder"),
                           ("s3://AKIA:pa55w0rd@bucket/cifar", "(a URI); allowed: a local folder")):  # fmt: skip
            with pytest.raises(ValueError, match=re.escape(why)) as refused:
                api.settings(**{flag: value})
            assert "pa55w0rd" not in str(refused.value)
    for deep in ("/" * 131_000, "a/" * 65_500, "x" * PATH_MAX):
        with pytest.raises(ExportError, match=rf"bytes as a full path\); allowed: a path of fewer than {PATH_MAX} b"):
            api.table(deep)
    with pytest.raises(CheckpointError, match="is a link to nothing"):
        api.load_model("dl/../ckpt")  # read where the kernel goes: through dl
    # a tune.Checkpoint's path is checked as a path given as text (its newline was a message of two lines)
    from ray import tune

    (tmp_path / "ck\nfake").mkdir()
    for ckpt, why in ((tune.Checkpoint(str(tmp_path / "ck\nfake")), r"^checkpoint.path: .*control character"),
                      (tune.Checkpoint(f"{tmp_path}/x\x1b[2J"), r"^checkpoint.path: .*control character"),
                      (tune.Checkpoint(str(tmp_path / "dl")), r"^checkpoint.path: .*dl is a link to nothing"),
                      (types.SimpleNamespace(filesystem=None, path="/x"), r"^checkpoint.filesystem: None; allowed")):  # fmt: skip
        with pytest.raises(CheckpointError, match=why):
            api.load_model(ckpt)
    (tmp_path / "ck\nfake").rmdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dl"]


@pytest.mark.timeout(60)
def test_a_long_run_of_uri_like_words_is_refused_at_once():
    """Its secrets are looked for in what the line shows, not in the whole value: that search takes time growing
    with the square of a word's length (163 s for this one from the command line)."""
    with pytest.raises(ExportError, match=r"^experiment: invalid value 'a:/a:/.*\.\.\.' \(129,"):
        api.table("a:/" * 43_000)
    with pytest.raises(ExportError, match=r"^experiment: invalid value 'a:/a:/.*\.\.\.' \(it holds a control"):
        api.table("a:/" * 300_000 + "\x00")
    from tune_alexnet.checkpoint import CheckpointError

    for flags in ({"precision": "a:/" * 43_000}, {"mlflow": "http://[" + "a:/" * 40_000}, {"epochs": "a:/" * 16_000}):
        with pytest.raises(
            ValueError, match=r"^tune-alexnet sweep: error: argument --\w+: invalid (value|choice:) '(a:/a:/|http)"
        ):
            api.settings(**flags)  # (the refusal names the value cut to a line of at most 4,096 characters)
    with pytest.raises(ValueError) as refused:
        api.settings(precision="a:/" * 43_000)
    assert len(str(refused.value)) < 4_400
    key = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"  # a long secret, hidden before the line is cut
    with pytest.raises(CheckpointError, match=r"^checkpoint.filesystem: 's3://AKIA:\*\*\*@my-b") as refused:
        api.load_model(types.SimpleNamespace(filesystem=f"s3://AKIA:{key}@my-bucket/exp", path="exp/ckpt"))
    assert "wJalr" not in str(refused.value)
    import pyarrow.fs

    with pytest.raises(CheckpointError, match=r"^/nonexistent/ckpt/model.json is missing"):  # a Path: a path
        api.load_model(types.SimpleNamespace(filesystem=pyarrow.fs.LocalFileSystem(), path=Path("/nonexistent/ckpt")))


def test_best_run_takes_a_results_table_alone_and_picks_one_row_of_joined_tables():
    table = pd.DataFrame({"final_accuracy": [50.0, 20.0], "run": [1, 2], "trial_id": ["t_00000", "t_00001"]})
    joined = pd.concat([table, table.assign(final_accuracy=[20.0, 10.0])])  # the index repeats: 0, 1, 0, 1
    assert api.best_run(joined).to_dict() == {"final_accuracy": 50.0, "run": 1, "trial_id": "t_00000"}
    for bad in ("ray_results/x", None, api.table):
        with pytest.raises(ExportError, match=r"is not a results table; allowed: a DataFrame with numeric final_acc"):
            api.best_run(bad)
    for bad, named in ((table.assign(run="x"), "run (str)"), (table.drop(columns="trial_id"), "trial_id (missing)"),
                       (table.assign(final_accuracy=[1 + 2j, 3j]), "final_accuracy (complex128)")):  # fmt: skip
        with pytest.raises(ExportError, match=rf"^a DataFrame with .*{re.escape(named)}.* is not a res"):
            api.best_run(bad)
    twice = pd.DataFrame([[1.0, 1.0, 1, "t_1"]], columns=["final_accuracy", "final_accuracy", "run", "trial_id"])
    nested = table.set_axis(pd.MultiIndex.from_tuples([(c, "x") for c in table.columns]), axis=1)
    for bad in (twice, nested):
        with pytest.raises(ExportError, match="^a DataFrame with repeated or nested column names is not a results"):
            api.best_run(bad)
    for bad in (table.assign(run=[np.inf, 1]), table.assign(trial_id=pd.array([pd.NA, "t_1"], dtype="string")),
                table.assign(trial_id=["t_" + "1" * 5000, "t_2"])):  # fmt: skip
        with pytest.raises(ExportError, match=r"^a DataFrame holding a value no results table holds \("):
            api.best_run(bad)
    assert api.best_run(table.assign(table=[1, 2]))["final_accuracy"] == 50.0  # a column named "table" is a column
    # a number past a float is refused by the bounds as the command refuses inf, not an OverflowError
    from fractions import Fraction

    for lr in (Fraction(10**5000), [Fraction(-(10**5000))]):
        with pytest.raises(ValueError, match=r"^tune-alexnet sweep: error: argument --lr: invalid value '-?inf'"):
            api.settings(lr=lr)


RESULTS_MD = Path(__file__).resolve().parents[1] / "docs" / "results.md"


def api_example() -> str:
    """The docs' Python API example (docs/results.md), as written there."""
    return next(b for b in re.findall(r"```python\n(.*?)```", RESULTS_MD.read_text(), re.DOTALL) if "api.sweep(" in b)


@pytest.mark.slow
def test_the_docs_api_example_runs_and_speaks_as_the_command_does(ray_local, mini_dir, tmp_path, monkeypatch, capfd):
    """The example exactly as the docs give it (its data folder resolved), in a fresh working folder."""
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(api_example().replace("../shared/data/cifar10-mini", str(mini_dir)), scope)
    table = scope["table"]
    out = capfd.readouterr().out
    exp = Path(table["best_checkpoint"].dropna().iloc[0]).parents[1]
    assert exp.parent == tmp_path / "ray_results"
    # the command's voice: the page's path first, progress lines, the summary naming the best run
    assert f"tune-alexnet: study page: {exp / 'report.html'}" in out.splitlines()[:3]
    assert "2/2 done, 0 running, 0 pending; best " in out
    best = api.best_run(table)
    assert f"  best:   {best['final_accuracy']:.2f}% (run {best['run']}:" in out and f"  page:   {exp}" in out
    assert list(table["run"]) == [4, 6] and set(table["status"]) == {"terminated"}
    assert (exp / "results.parquet").exists() and (exp / "report.md").exists()
    assert scope["best"].metrics["trial_id"] == best["trial_id"]
    assert api.predict_proba(scope["model"], np.zeros((2, 32, 32, 3), "uint8")).shape == (2, 10)
    report = tmp_path / "elsewhere"
    assert [p.rsplit("/", 1)[-1] for p in api.report(exp, report)] == ["report.md", "report.html"]
    assert (report / "report.md").is_file() and (report / "report.html").stat().st_size > 1e6


@pytest.mark.slow
def test_ray_names_the_tables_best_run_on_an_exact_tie_also_after_a_restore(ray_local, tmp_path, capfd):
    """20 train images: batch 32 and batch 64 train on one identical batch, so runs 1 and 5 tie exactly. Ray keeps
    the first of equals in its own order of trials, which is the order their states were first saved in (a set's
    order, so either); every order Ray may list them in must name run 1."""
    from ray import tune

    from tune_alexnet.settings import METRIC, MODE
    from tune_alexnet.train import train_cifar

    data = make_image_folder(tmp_path / "tiny", train_per_class=2, test_per_class=1)
    results, table = api.sweep(optimizer="sgd", lr=0.01, batch_size=[32, 64], dropout=True, batchnorm=False,
                               epochs=1, width=0.125, data_dir=str(data), storage=str(tmp_path), name="tie",
                               quiet=True)  # fmt: skip
    out = capfd.readouterr().out
    assert "done, 0 running" not in out and "study page:" not in out  # quiet: no progress, only the summary
    assert "tune-alexnet: experiment " in out and "  best:   " in out  # the summary, as --quiet keeps it
    by_run = table.set_index("run")
    assert by_run.loc[1, "final_accuracy"] == by_run.loc[5, "final_accuracy"]  # the tie
    best = api.best_run(table)
    assert best["run"] == 1
    assert results.get_best_result().metrics["trial_id"] == best["trial_id"]
    restored = tune.Tuner.restore(str(tmp_path / "tie"), trainable=train_cifar).get_results()
    assert restored.get_best_result().metrics["trial_id"] == best["trial_id"]
    trials = tune.ExperimentAnalysis(str(tmp_path / "tie")).trials
    grids = [tune.ResultGrid(tune.ExperimentAnalysis(str(tmp_path / "tie"), trials=order, default_metric=METRIC,
                                                     default_mode=MODE)) for order in (trials, trials[::-1])]  # fmt: skip
    # Ray's own ranking, over either order of the tied trials; then the docs' way for a grid without a metric
    assert {grid.get_best_result().metrics["trial_id"] for grid in grids} == {best["trial_id"]}
    assert {grid.get_best_result("score", "max").metrics["trial_id"] for grid in grids} == {best["trial_id"]}
