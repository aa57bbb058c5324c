"""Reports from real small experiments: figures, statistics equal to the table's, the original's numbers."""

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from tune_alexnet.cli import main, run_study
from tune_alexnet.grid import make_grid
from tune_alexnet.report import markdown_table, reference_table, write_report
from tune_alexnet.settings import SweepSettings

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ("heatmaps.png", "effects.png", "curves.png", "comparison.png")


@pytest.fixture(scope="module")
def repeated(ray_local, synthetic_dir, tmp_path_factory):
    """Two SGD grid points (runs 14 and 16), two seeds each."""
    s = SweepSettings(
        grid=make_grid(optimizer=("sgd",), lr=(0.001,), batch_size=(32,), dropout=(True, False), batchnorm=(True,)),
        epochs=2,
        repeats=2,
        seed=7,
        data_dir=str(synthetic_dir),
        storage=str(tmp_path_factory.mktemp("rep")),
        name="rep",
        trial={"width": 0.125},
    )
    return run_study(s)[:2]


def md_table(text: str, heading: str) -> pd.DataFrame:
    """The first markdown table after a heading of report.md."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    rows = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return pd.DataFrame(rows[2:], columns=rows[0])


@pytest.mark.slow
def test_repeats_give_two_seeded_trials_per_grid_point(repeated):
    _, exp = repeated
    table = exp.table
    assert len(table) == 4 and sorted(table["run"].tolist()) == [14, 14, 16, 16]
    for _, group in table.groupby("run"):
        assert group["seed"].nunique() == 2


@pytest.mark.slow
def test_report_figures_statistics_and_comparison(repeated, tmp_path):
    path, exp = repeated
    # The sweep already wrote one into the experiment folder; write another elsewhere from the folder alone.
    assert Path(path, "report.md").is_file()
    report = write_report(path, tmp_path / "out")
    text = Path(report).read_text()
    for fig in FIGURES:
        data = (tmp_path / "out" / fig).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, fig
        assert f"]({fig})" in text

    table = pd.read_parquet(Path(path, "results.parquet"))
    stats = md_table(text, "## Per optimizer")
    sgd = stats.set_index("optimizer").loc["sgd"]
    acc = table["final_accuracy"]
    assert int(sgd["runs"]) == 4
    assert float(sgd["mean"]) == pytest.approx(acc.mean(), abs=0.006)
    assert float(sgd["median"]) == pytest.approx(acc.median(), abs=0.006)
    assert float(sgd["best"]) == pytest.approx(acc.max(), abs=0.006)
    assert float(sgd["worst"]) == pytest.approx(acc.min(), abs=0.006)

    comp = md_table(text, "## Comparison with the original study")
    ref = reference_table().set_index("run")
    assert sorted(comp["run"].astype(int)) == [14, 16]
    for _, row in comp.iterrows():
        run = int(row["run"])
        ours = table.loc[table["run"] == run, "final_accuracy"]
        assert float(row["original"]) == pytest.approx(ref.loc[run, "final_accuracy"])
        assert float(row["ours"]) == pytest.approx(ours.mean(), abs=0.006)
        assert float(row["std"]) == pytest.approx(ours.std(), abs=0.006)
        assert float(row["difference"]) == pytest.approx(ours.mean() - ref.loc[run, "final_accuracy"], abs=0.01)
        assert row["within_noise"] in ("True", "False")
    assert "## Repeats: mean and standard deviation per configuration" in text


@pytest.mark.slow
def test_report_lists_diverged_and_errored_runs(mixed_experiment, tmp_path, capsys):
    path, _ = mixed_experiment
    assert main(["report", path, "--out", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    failed = md_table(text, "## Diverged, errored or chance-level runs")
    assert sorted(failed["status"]) == ["diverged", "errored", "errored"]
    assert failed.loc[failed["status"] == "errored", "error"].str.contains("nosuchopt").all()
    for fig in FIGURES:
        assert (tmp_path / fig).read_bytes().startswith(PNG_MAGIC)


def test_the_noise_rule_against_hand_computed_cases():
    """Differences within 2 standard deviations of the seeds count as noise; one seed gives no verdict."""
    from tune_alexnet.report import comparison, reference_table

    ref = reference_table().set_index("run")["final_accuracy"]
    base = {"optimizer": "sgd", "lr": 0.001, "batch_size": 32, "dropout": False, "batchnorm": True}
    table = pd.DataFrame(
        [
            {
                **base,
                "run": 16,
                "final_accuracy": ref[16] + 1.0,
                "seed": 1,
            },  # mean +2, std 1.41: |2| <= 2 x 1.41, noise
            {**base, "run": 16, "final_accuracy": ref[16] + 3.0, "seed": 2},
            {
                **base,
                "dropout": True,
                "run": 14,
                "final_accuracy": ref[14] - 5.0,
                "seed": 1,
            },  # mean -5.07, std 0.1: not noise
            {**base, "dropout": True, "run": 14, "final_accuracy": ref[14] - 5.1414, "seed": 2},
            {**base, "batch_size": 64, "run": 18, "final_accuracy": ref[18] + 0.1, "seed": 1},  # one seed: no verdict
        ]
    )
    comp = comparison(table).set_index("run")
    assert comp.loc[16, "difference"] == pytest.approx(2.0)
    assert comp.loc[16, "std"] == pytest.approx(2**0.5)
    assert comp.loc[16, "within_noise"] == True  # noqa: E712 (a numpy bool)
    assert comp.loc[14, "difference"] == pytest.approx(-5.0707)
    assert comp.loc[14, "within_noise"] == False  # noqa: E712
    assert comp.loc[18, "within_noise"] is None


def test_text_from_the_experiment_stays_text_in_report_md():
    """An error line can hold anything: no HTML, no Markdown link (an escaped backslash cannot undo the escapes)."""
    error = r"\[go\](javascript:x) <img src=x onerror=y> [a](b) & c|d"
    table = markdown_table(pd.DataFrame({"error": [error]}))
    assert table.splitlines()[-1] == (r"| \\\[go\\\](javascript:x) &lt;img src=x onerror=y&gt; \[a\](b) &amp; c\|d |")


def test_figures_find_a_private_folder_where_no_temporary_one_can_be_written(tmp_path, monkeypatch):
    """With /tmp and /var/tmp read-only (a container's), tempfile takes the working folder: the private folder
    for matplotlib's cache was made there, outside --out, or its error ended the report in a traceback."""
    import tempfile

    from tune_alexnet import cluster, settings
    from tune_alexnet.export import ExportError
    from tune_alexnet.report import _private_matplotlib_folder

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for name in ("TMPDIR", "TEMP", "TMP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(work))  # what tempfile finds where no temporary folder is writable
    with pytest.raises(cluster.UnsafeTempDir, match=f"the working folder {work} is no place for it"):
        cluster.private_temp_dir()
    monkeypatch.setattr(tempfile, "tempdir", "/tmp")  # a command run in /tmp itself: /tmp is tempfile's own choice
    monkeypatch.chdir("/tmp")
    assert not cluster._working_folder_as_temp("/tmp")
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(work))
    monkeypatch.setattr(settings, "listed_home", lambda: tmp_path / "home")  # this user's own home
    assert _private_matplotlib_folder() == str(tmp_path / "home" / ".cache" / "tune-alexnet" / "matplotlib")
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(settings, "listed_home", lambda: tmp_path / "file")  # no folder to be had there either
    with pytest.raises(ExportError, match="the figures need a folder of matplotlib's own, and neither"):
        _private_matplotlib_folder()
    monkeypatch.setattr(settings, "listed_home", lambda: Path("rel"))  # no passwd entry: HOME as given, relative
    with pytest.raises(ExportError, match="no home folder of this user's is known"):
        _private_matplotlib_folder()
    assert os.listdir(work) == []


def test_a_fifo_in_the_private_matplotlib_folder_is_refused_not_opened(tmp_path, monkeypatch):
    """matplotlib opens its matplotlibrc at its import: a FIFO there held the sweep's last step (the report) for
    ever, deaf to stop signals."""
    from tune_alexnet import cluster
    from tune_alexnet.export import ExportError
    from tune_alexnet.report import _private_matplotlib_folder

    short = tempfile.mkdtemp(prefix="mpl", dir="/tmp")  # (a TMPDIR too long for Ray's socket names is passed over)
    try:
        monkeypatch.setenv("TMPDIR", short)
        monkeypatch.setattr(tempfile, "tempdir", None)
        folder = Path(cluster.private_temp_dir()) / "matplotlib"
        assert folder.parent.parent == Path(short) and _private_matplotlib_folder() == str(folder)
        folder.mkdir()
        (folder / "fontlist.json").write_text("{}")
        assert _private_matplotlib_folder() == str(folder)  # what matplotlib makes there is fine
        (folder / "fontlist.json").chmod(0o664)  # a umask of 002: no opening in a folder only this user enters
        assert _private_matplotlib_folder() == str(folder)
        real_scandir = os.scandir

        @contextlib.contextmanager
        def racing(path):  # matplotlib's lock file goes between the listing and its stat: passed over
            with real_scandir(path) as found:
                entries = list(found)
            (folder / "fontlist.json.matplotlib-lock").unlink(missing_ok=True)
            yield iter(entries)

        (folder / "fontlist.json.matplotlib-lock").write_text("")
        monkeypatch.setattr(os, "scandir", racing)
        assert _private_matplotlib_folder() == str(folder)
        monkeypatch.setattr(os, "scandir", real_scandir)
        os.mkfifo(folder / "matplotlibrc")
        with pytest.raises(ExportError, match=r"holds 'matplotlibrc', which is not a file or folder of this user's"):
            _private_matplotlib_folder()
        shutil.rmtree(folder)
        folder.write_text("")  # a file in its place: matplotlib made a folder of its own in the temporary folder
        with pytest.raises(ExportError, match=r"matplotlib's folder, is not a folder; allowed: remove it"):
            _private_matplotlib_folder()
    finally:
        shutil.rmtree(short)


@pytest.mark.parametrize(
    "planted",
    [
        "nothing",
        "open cache",
        "link",
        "fifo",
        "another's folder",
        "fifo in an open stylelib",
        "a link",
        "a dead link",
        "a deep tree",
    ],  # fmt: skip
)
def test_figures_fall_back_to_the_home_folder_only_where_no_one_else_could_have_planted_anything(
    planted, tmp_path, monkeypatch, capsys, request
):
    """Another user can force the fallback by making the private temporary folder's name first: matplotlib then
    rewrote a file of this user's through a link planted in a shared ~/.cache, or hung on a FIFO there."""
    from tune_alexnet import settings
    from tune_alexnet.export import ExportError
    from tune_alexnet.report import _private_matplotlib_folder

    temp, home = Path(tempfile.mkdtemp(prefix="ta")), tmp_path / "home"  # short: Ray's socket names must fit
    request.addfinalizer(lambda: shutil.rmtree(temp))
    (temp / f"tune-alexnet-{os.getuid()}").mkdir()
    os.chown(temp / f"tune-alexnet-{os.getuid()}", 65534, 65534)  # made first by another user
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setattr(settings, "listed_home", lambda: home)
    folder = home / ".cache" / "tune-alexnet" / "matplotlib"
    precious = home / "precious.txt"
    if planted in ("a link", "a dead link"):  # the folder itself a link: to a folder of this user's, or nowhere
        (home / "elsewhere").mkdir(parents=True)
        folder.parent.mkdir(parents=True)
        folder.symlink_to(home / ("elsewhere" if planted == "a link" else "nowhere"))
    else:
        folder.mkdir(parents=True)
    precious.write_text("mine")
    if planted == "open cache":
        os.chmod(home / ".cache", 0o777)
    elif planted == "link":
        (folder / "fontlist-v3.11.0.json").symlink_to(precious)
    elif planted == "fifo":
        os.mkfifo(folder / "fontlist-v3.11.0.json")
    elif planted == "another's folder":
        os.chown(folder, 65534, 65534)
    elif planted == "fifo in an open stylelib":  # matplotlib's import reads every stylelib/*.mplstyle: a hang
        (folder / "stylelib").mkdir(mode=0o777)
        os.chmod(folder / "stylelib", 0o777)
        os.mkfifo(folder / "stylelib" / "x.mplstyle")
    elif planted == "a deep tree":  # this user's own: os.walk's recursion ran past Python's stack
        # (removed by rm, which walks without recursion: pytest's own cleanup ran past Python's stack on it)
        request.addfinalizer(lambda: subprocess.run(["rm", "-rf", str(folder / "d")], check=True))
        fd = os.open(folder, os.O_RDONLY)
        for _ in range(1200):  # folder by folder: pathlib's mkdir(parents=True) recurses too
            os.mkdir("d", dir_fd=fd)
            fd, above = os.open("d", os.O_RDONLY, dir_fd=fd), fd
            os.close(above)
        os.close(fd)
    if planted in ("nothing", "a deep tree"):
        assert _private_matplotlib_folder() == str(folder)
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        warning = capsys.readouterr().err
        assert f"matplotlib's settings are kept in {folder}" in warning and "is not a folder of this user's" in warning
        return
    with pytest.raises(ExportError, match="the figures need a folder of matplotlib's own") as refused:
        _private_matplotlib_folder()
    assert "\n" not in str(refused.value)
    why = {"open cache": f"{home / '.cache'} can be written by every user", "link": "holds 'fontlist-v3.11.0.json'",
           "fifo": "holds 'fontlist-v3.11.0.json'", "another's folder": "another user owns",
           "fifo in an open stylelib": "holds 'stylelib', which another user could have planted",
           "a link": "it is not a folder of this user's", "a dead link": "it is not a folder of this user's"}[planted]  # fmt: skip
    assert why in str(refused.value), refused.value
    assert precious.read_text() == "mine" and not (home / "nowhere").exists()
