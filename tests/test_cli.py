"""Bad input: one line naming the value and what is allowed, exit 2, nothing started or written."""

import os
import re
import subprocess
import sys

import pytest

from tune_alexnet.cli import _settings, build_parser, main


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["sweep", "--dropout", "ture"], "'ture'; allowed: true or false"),
        (["sweep", "--batchnorm", "yes"], "'yes'; allowed: true or false"),
        (["sweep", "--optimizer", "sgdd"], "'sgdd'; allowed: sgd, adam, rmsprop or all"),
        (["sweep", "--lr", "fast"], "'fast'; allowed: a number > 0 and <= 1000000"),
        (["sweep", "--lr", "-0.1"], "'-0.1'; allowed: a number > 0 and <= 1000000"),
        (["sweep", "--lr", "inf"], "'inf'; allowed: a number > 0 and <= 1000000"),
        (["sweep", "--lr", "nan"], "'nan'; allowed: a number > 0 and <= 1000000"),
        (["sweep", "--batch_size", "1"], "'1'; allowed: a whole number >= 2 and <= 65536"),
        (["sweep", "--batch-size", "abc"], "'abc'; allowed: a whole number >= 2"),
        (["sweep", "--batch-size", "1" + "0" * 20], "allowed: a whole number >= 2 and <= 65536"),
        (["sweep", "--epochs", "0"], "'0'; allowed: a whole number >= 1 and <= 10000"),
        (["sweep", "--epochs", "1" + "0" * 20], "allowed: a whole number >= 1 and <= 10000"),
        (["sweep", "--epochs", "2.5"], "'2.5'; allowed: a whole number >= 1"),
        (["sweep", "--subset", "-5"], "'-5'; allowed: a whole number >= 1"),
        (["sweep", "--gpus-per-trial", "-1"], "'-1'; allowed: 0 or a number >= 0.01 and <= 64"),
        (["sweep", "--cpus-per-trial", "1e-300"], "'1e-300'; allowed: 0 or a number >= 0.01 and <= 1024"),
        (["sweep", "--width", "40"], "'40'; allowed: a number > 0 and <= 4"),
        (["sweep", "--resume-every", "-1"], "'-1'; allowed: a number >= 0"),
        (["sweep", "--precision", "fp8"], "invalid choice: 'fp8'"),
        (["sweep", "--step", "fast"], "invalid choice: 'fast'"),
        (
            ["sweep", "--optimis" + "er", "sgd"],  # the British spelling, a likely slip
            "unrecognized arguments: --optimis" + "er sgd; did you mean --optimizer? (see tune-alexnet sweep --help)",
        ),  # fmt: skip
        (["sweep", "--batchsize", "32"], "did you mean --batch_size?"),
        (["sweep", "--opt", "sgd"], "unrecognized arguments: --opt sgd"),  # no abbreviations: --opt is not --optimizer
        (
            ["sweep", "--lr", "0.01", "--lr", "0.001"],
            "--lr is given 2 times; allowed: once (several values go in one "
            "comma-separated list, e.g. --lr 0.01,0.001)",
        ),  # fmt: skip
        (["sweep", "--storage=a", "--storage", "b"], "--storage is given 2 times"),
        (["sweep", "--epochs", "2", "--epochs", "3"], "--epochs is given 2 times; allowed: once (see tune-alexnet"),
        (["sweep", "--batchnorm", "true", "--batchnorm=false"], "list, e.g. --batchnorm true,false)"),
        (["train"], "invalid choice: 'train'"),
        (
            ["sweep", "--address", ""],
            "--address: invalid value '': an empty address; allowed: the address of a running",
        ),
        (
            ["sweep", "--lr", "0,01"],
            "--lr: invalid value '0' ('0,01' is read as a list; write 0.01); allowed: a number",
        ),
        (
            ["sweep", "--runs", "2,2"],
            "--runs: invalid value '2,2' (2 given twice); allowed: run numbers 1..108 of the study, "
            "each once (--repeats N trains each N times)",
        ),  # fmt: skip
        (["sweep", "--lr", "0.01,0.010"], "invalid value '0.01,0.010' (0.010 given twice)"),
        (["sweep", "--wandb", ""], "--wandb: invalid value ''; allowed: a W&B project name, not blank, at most 128"),
        (["sweep", "--wandb", "team/proj"], "invalid value 'team/proj'; allowed: a W&B project name"),
        (["sweep", "--wandb", "a\nb"], "--wandb: invalid value 'a\\nb'; allowed: a W&B project name"),
        (["sweep", "--storage", "r\udcff"], "--storage: invalid value 'r\\xff'; allowed: a path or URI in UTF-8"),
        (["export", "x", "--out", "o\udcff"], "--out: invalid value 'o\\xff'; allowed: a path or URI in UTF-8"),
        (["sweep", "--mlflow", "file:///m\udcff"], "--mlflow: invalid value 'file:///m\\xff'; allowed: a path or URI"),
        (["sweep", "--epochs", "\u0661\u0660"], "--epochs: invalid value '\u0661\u0660'; allowed: a whole number"),
        (["sweep", "--seed", "\uff11"], "--seed: invalid value '\uff11'; allowed: a whole number"),  # full-width 1
        (["sweep", "--lr", "1_0"], "--lr: invalid value '1_0'; allowed: a number"),
        (["sweep", "--batch-size", "\uff13\uff12"], "--batch-size: invalid value '\uff13\uff12'; allowed:"),
        (["sweep", "--optimizer", "all,sgd"], "invalid value 'all,sgd' ('all' stands for every value, so nothing"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written, no ray_results


def test_original_flags_pin_the_grid():
    parse = build_parser().parse_args
    assert len(_settings(parse(["sweep"])).grid) == 108
    assert len(_settings(parse(["sweep", "--optimizer", "all"])).grid) == 108
    assert len(_settings(parse(["sweep", "--optimizer", "sgd"])).grid) == 36
    s = _settings(
        parse(
            [
                "sweep",
                "--optimizer",
                "adam",
                "--lr",
                "0.001",
                "--batch_size",
                "64",
                "--dropout",
                "false",
                "--batchnorm",
                "true",
            ]
        )
    )
    assert s.grid.configs() == [
        {"optimizer": "adam", "lr": 0.001, "batch_size": 64, "dropout": False, "batchnorm": True}
    ]
    assert _settings(parse(["sweep", "--batch-size", "32,128"])).grid.batch_size == (32, 128)


def test_help_is_there_for_newcomers():
    out = subprocess.run([sys.executable, "-m", "tune_alexnet", "sweep", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in (
        "--optimizer",
        "--batch_size",
        "--dropout",
        "--batchnorm",
        "--data-dir",
        "--subset",
        "--resume",
        "--storage",
        "--gpus-per-trial",
        "examples:",
    ):
        assert flag in out.stdout


def test_missing_data_dir_is_one_line_and_writes_nothing(tmp_path, capsys):
    storage = tmp_path / "results"
    assert main(["sweep", "--data-dir", str(tmp_path / "nowhere"), "--storage", str(storage), "--name", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tune-alexnet sweep: error:") and "nowhere does not exist" in err[-1]
    assert not (storage / "x").exists()


def test_unwritable_storage_is_refused(tmp_path, capsys, synthetic_dir):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["sweep", "--data-dir", str(synthetic_dir), "--storage", str(blocker / "sub")]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_export_of_a_folder_that_is_not_an_experiment(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert "holds no readable Tune experiment" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_resume_of_a_name_that_does_not_exist(tmp_path, capsys, synthetic_dir):
    assert (
        main(["sweep", "--resume", "--name", "ghost", "--storage", str(tmp_path), "--data-dir", str(synthetic_dir)])
        == 2
    )
    assert "no experiment named 'ghost'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_runs_flag_picks_whole_runs_of_the_study(capsys):
    parse = build_parser().parse_args
    assert _settings(parse(["sweep", "--runs", "16,12,62,79"])).runs == (16, 12, 62, 79)
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--runs", "109"])
    assert e.value.code == 2 and "'109'; allowed: run numbers 1..108" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--runs", "16", "--optimizer", "sgd"])
    assert e.value.code == 2 and "cannot be combined with --optimizer" in capsys.readouterr().err


def test_paths_are_taken_as_typed_from_any_working_directory(tmp_path, monkeypatch):
    from tune_alexnet.storage import storage_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    parse = build_parser().parse_args
    for typed, meant in (("data", tmp_path / "data"), ("~/data", tmp_path / "home" / "data"),
                         (str(tmp_path / "abs"), tmp_path / "abs")):  # fmt: skip
        assert _settings(parse(["sweep", "--data-dir", typed])).data_dir == str(meant)
        assert storage_uri(typed) == str(meant)  # --storage, export and report resolve through it
    assert (
        storage_uri("s3://bucket/x?endpoint_override=127.0.0.1:9000")
        == "s3://bucket/x?endpoint_override=127.0.0.1:9000"
    )


def test_a_relative_path_from_a_folder_whose_name_is_not_utf8_is_refused(tmp_path, capsys, monkeypatch):
    odd = os.fsdecode(bytes(tmp_path) + b"/cwd\xff")
    os.mkdir(odd)
    monkeypatch.chdir(odd)
    for argv, flag in (
        (["sweep", "--storage", "rel"], "--storage"),
        (["export", "x"], "experiment"),
        (["report", "/tmp", "--out", "out"], "--out"),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"argument {flag}: invalid value '" in err and "cwd\\xff/" in err, err
        assert "allowed: a path or URI in UTF-8" in err
    assert os.listdir(odd) == []


def test_tf32_undoes_no_tf32_and_neither_flag_leaves_the_experiments_choice(capsys):
    runtime = lambda *flags: _settings(build_parser().parse_args(["sweep", *flags])).runtime  # noqa: E731
    assert runtime("--no-tf32")["tf32"] is False
    assert runtime("--tf32")["tf32"] is True  # on --resume: undoes the experiment's --no-tf32
    assert "tf32" not in runtime()  # on --resume: the experiment's own choice stays
    with pytest.raises(SystemExit) as e:  # both: one line, as api.settings refuses both, not the last one silently
        runtime("--no-tf32", "--tf32")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "argument --tf32: not allowed with argument --no-tf32 (" in err, err


def test_help_names_the_bounds_its_errors_name():
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["sweep"].format_help().split())
    for flag, bound in (("--epochs EPOCHS", "epochs"), ("--width WIDTH", "width"), ("--subset SUBSET", "subset"),
                        ("--lr LR", "lr"), ("--batch-size BATCH_SIZE", "batch_size")):  # fmt: skip
        from tune_alexnet.settings import BOUNDS

        help_text = text.rsplit(flag, 1)[1].split(" --", 1)[0]  # its entry, not the usage line
        assert f"allowed: {BOUNDS[bound].text()}" in help_text, help_text


def test_resume_takes_trial_flags_equal_to_the_experiments_and_names_a_change():
    from tune_alexnet.grid import make_grid
    from tune_alexnet.preflight import PreflightError, check_unchanged
    from tune_alexnet.settings import SweepSettings

    parse = build_parser().parse_args
    argv = ["sweep", "--optimizer", "sgd", "--lr", "0.01,0.001", "--epochs", "2", "--width", "0.125"]
    asked = _settings(parse([*argv, "--resume"])).asked
    assert asked == {"optimizer": ("sgd",), "lr": (0.01, 0.001), "epochs": 2, "width": 0.125}
    saved = SweepSettings(grid=make_grid(optimizer=("sgd",), lr=(0.001, 0.01)), epochs=2, trial={"width": 0.125})
    check_unchanged(asked, saved)  # the same command with --resume added: accepted
    for changed, needle in (({"epochs": 3}, "--epochs 3 differs from the experiment's own 2"),
                            ({"lr": (0.1,)}, "--lr 0.1 differs from the experiment's own 0.001,0.01"),
                            ({"width": 1.0}, "--width 1 differs from the experiment's own 0.125"),
                            ({"runs": (4,)}, "--runs 4 differs from the experiment's own (all runs of its grid)")):  # fmt: skip
        with pytest.raises(PreflightError, match=re.escape(needle)):
            check_unchanged({**asked, **changed}, saved)
    with pytest.raises(PreflightError) as refused:  # several changes: every one named at once
        check_unchanged({**asked, "epochs": 3, "width": 1.0}, saved)
    assert "--epochs 3 differs" in str(refused.value) and "--width 1 differs" in str(refused.value)


CTRL_C_WHILE = {  # what is loading, and the one line a Ctrl-C then gives
    "the console script's module": "tune-alexnet: interrupted while starting",
    "the parser": "tune-alexnet: interrupted while starting",
    "torch and pandas": "tune-alexnet sweep: interrupted before the sweep started",
    "a C extension, which turns it into an ImportError": "tune-alexnet sweep: interrupted before the sweep started",
}


@pytest.mark.parametrize("loading", CTRL_C_WHILE)
def test_ctrl_c_while_python_loads_is_one_line_not_a_traceback(loading, monkeypatch, capsys, tmp_path):
    """A command's first tenth of a second loads the command line, its next seconds torch and pandas: a Ctrl-C
    then is an interruption like any other."""
    import os
    import signal
    import sys
    import time

    import tune_alexnet
    from tune_alexnet import cli

    module = "tune_alexnet.cli" if loading.startswith("the console") else "tune_alexnet.data"

    class CtrlC:
        def find_spec(self, name, path=None, target=None):
            if name == module and not loading.startswith("a C extension"):
                raise KeyboardInterrupt
            if name == module:  # as numpy's C import does: the signal's KeyboardInterrupt becomes an ImportError
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(5)
                except KeyboardInterrupt:
                    raise ImportError('PyCapsule_Import could not import module "datetime"') from None

    def parser():
        raise KeyboardInterrupt

    monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setattr(sys, "meta_path", [CtrlC(), *sys.meta_path])
    monkeypatch.setattr(sys, "argv", ["tune-alexnet", "sweep", "--storage", str(tmp_path / "r")])
    if loading == "the parser":
        monkeypatch.setattr(cli, "build_parser", parser)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        assert tune_alexnet.main() == 1  # the console script's
    finally:
        for sig, handler in handlers.items():  # it leaves its own for the shutdown: not this test process's
            signal.signal(sig, handler)
    assert capsys.readouterr().err == f"{CTRL_C_WHILE[loading]}; nothing was run\n"
    assert not (tmp_path / "r").exists()


def test_a_ctrl_c_during_the_shutdown_after_the_last_line_ends_it_quietly():
    """After the command's last line, Python's and Ray's atexit shutdown runs: a Ctrl-C then (a second one, a
    moment after the first) cut it short with a traceback."""
    import subprocess
    import sys

    code = (
        "import atexit, os, signal, time, tune_alexnet; "
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(5))); "
        "tune_alexnet._quit_at_once_on(3)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (3, "")


@pytest.mark.parametrize("ignored", ["SIGHUP", "SIGINT"], ids=["nohup", "a background job"])
def test_a_stop_signal_the_caller_ignores_stays_ignored_through_the_sweep(ignored):
    """`nohup tune-alexnet sweep ... &`, then logging out, stopped the sweep: every stage that takes the stop
    signals over (start-up, Ray's start, the sweep itself, the shutdown) leaves an ignored one ignored."""
    import signal

    import tune_alexnet
    from tune_alexnet import cli, preflight, stopping

    sig = getattr(signal, ignored)
    before = {s: signal.getsignal(s) for s in stopping.STOP_SIGNALS}
    signal.signal(sig, signal.SIG_IGN)
    try:
        with cli._ctrl_c_noted(), cli._stop_signals_as_ctrl_c(), preflight._stop_signals_deferred():
            assert signal.getsignal(sig) is signal.SIG_IGN
        with stopping.SaveFirst("key"):
            assert signal.getsignal(sig) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, before[signal.SIGTERM])  # heeded
        tune_alexnet._quit_at_once_on(0)
        assert signal.getsignal(sig) is signal.SIG_IGN
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_a_stop_signal_that_lands_inside_a_callback_or_a_c_extension_still_stops_export_and_report(capsys):
    """Ctrl-C while report drew its figures: landing inside a weakref's callback, Python printed its traceback and
    the report went on to exit 0; landing inside matplotlib's C code, it came out as a ValueError's traceback."""
    import signal
    import weakref

    from tune_alexnet.cli import _stop_signals_interrupt

    class Figure:
        pass

    def finalizer() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(1000))  # the signal's handler runs here, where Python passes over what it raises

    with pytest.raises(KeyboardInterrupt):
        with _stop_signals_interrupt():
            figure = Figure()
            weakref.finalize(figure, finalizer)
            del figure
            sum(range(1000))  # the rest of the command, which ran to its end
    assert "Traceback" not in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        with _stop_signals_interrupt():
            try:
                os.kill(os.getpid(), signal.SIGINT)
                sum(range(1000))
            except KeyboardInterrupt:
                raise ValueError("Invalid affine transformation matrix") from None  # as a C extension turns it
    with pytest.raises(ValueError):  # an error with no signal behind it stays what it is
        with _stop_signals_interrupt():
            raise ValueError("x")


def test_a_path_of_a_user_that_does_not_exist_is_taken_as_the_shell_leaves_it(tmp_path, monkeypatch, capsys):
    """pathlib's expanduser raises on ~nosuchuser (a typo of a user's name, which the shell leaves as typed): a
    traceback of RuntimeError from export, report and sweep alike."""
    from tune_alexnet import api

    monkeypatch.chdir(tmp_path)
    for argv in (["export", "~nosuchuser9/x"], ["report", "~nosuchuser9/x"],
                 ["sweep", "--data-dir", "~nosuchuser9/x", "--storage", str(tmp_path / "s")]):  # fmt: skip
        err = (main(argv), capsys.readouterr().err)
        assert err[0] == 2 and "~nosuchuser9/x" in err[1] and "Traceback" not in err[1], (argv, err)
    from tune_alexnet.export import ExportError

    with pytest.raises(ExportError, match="~nosuchuser9/x is not a folder"):  # as for any folder that is none
        api.table("~nosuchuser9/x")


def test_a_path_that_a_latin1_locale_and_ray_would_name_apart_is_refused(tmp_path):
    """Under a Latin-1 locale the byte 0xe9 is the text 'é', whose UTF-8 is another name: the checks, the lock and
    the tables were in one folder (Python's os, in the locale's encoding) and Ray's storage in another (pyarrow,
    in UTF-8), which the checks never saw."""
    locales = tmp_path / "locales"
    locales.mkdir()
    subprocess.run(["localedef", "-i", "en_US", "-f", "ISO-8859-1", str(locales / "en_US.ISO-8859-1")], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONUTF8", "PYTHONIOENC"))}
    env.update(LOCPATH=str(locales), LC_ALL="en_US.ISO-8859-1")
    storage = os.fsencode(tmp_path) + b"/r\xe9"
    out = subprocess.run([sys.executable, "-m", "tune_alexnet", "sweep", "--storage", storage, "--data-dir",
                          str(tmp_path / "no-data")], env=env, capture_output=True, timeout=120)  # fmt: skip
    err = out.stderr.decode("latin-1").strip()
    assert out.returncode == 2 and len(err.splitlines()) == 1, err
    assert f"--storage: invalid value '{tmp_path}/r\\xe9'; allowed: a path or URI in UTF-8 (and this locale spells " \
           "paths in iso8859-1)" in err  # fmt: skip
    assert not os.path.lexists(storage) and not os.path.lexists(os.fsencode(tmp_path) + "/ré".encode())
