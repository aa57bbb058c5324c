"""The edges of trust and storage: the local Ray's token and private folder, storages that fill, turn read-only or
vanish, a reader racing the sweep, checkpoints that lie, and the small lines a person reads.

Real links, real tmpfs mounts, real read-only remounts, real processes run as another user (nobody)."""

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import moto_bucket

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


@pytest.mark.slow  # waits out the limit
@pytest.mark.timeout(60, func_only=True)  # it hung for more than 300 s
def test_load_model_from_a_bucket_without_credentials_fails_within_the_export_limit(monkeypatch):
    from tune_alexnet import storage
    from tune_alexnet.checkpoint import CheckpointError, load_model
    from tune_alexnet.settings import read_settings
    from tune_alexnet.storage import REACH_TIMEOUT_S

    for key in ("GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    start = time.monotonic()
    with pytest.raises(CheckpointError) as refused:
        load_model("gs://tune-alexnet-test-bucket/exp/trial/checkpoint_000001")
    assert time.monotonic() - start < REACH_TIMEOUT_S + 10
    assert "gs://tune-alexnet-test-bucket/exp/trial/checkpoint_000001 cannot be reached" in str(refused.value)
    monkeypatch.setattr(storage, "REACH_TIMEOUT_S", 2.0)  # the same bound on the settings record --resume reads
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        read_settings("gs://tune-alexnet-test-bucket/exp", strict=True)
    assert time.monotonic() - start < 2.0 + 3


@pytest.fixture
def crawling_bucket(tmp_path):
    """A checkpoint in moto's S3 on loopback, reached through a proxy that passes each answer on at a byte every
    0.5 s once a request names `slow["name"]`: the bucket answers the first look, then one read crawls (a client's
    own per-read timeout never fires). Yields (the checkpoint's URI, slow)."""
    from tune_alexnet import checkpoint
    from tune_alexnet.model import AlexNet

    listener = socket.create_server(("127.0.0.1", 0))
    with moto_bucket("ckpts") as (port, s3):
        args = {"dropout": True, "batchnorm": True, "width": 0.125}
        checkpoint.write(tmp_path, AlexNet(**args).state_dict(), args, {"epoch": 1})
        for name in (checkpoint.MODEL_FILE, checkpoint.MODEL_ARGS_FILE):
            s3.upload_file(str(tmp_path / name), "ckpts", f"trial/ckpt/{name}")
        slow = {"name": None}
        closed = threading.Event()

        def pipe(src, dst, crawl, request: bool):
            with contextlib.suppress(OSError):
                while chunk := src.recv(65536):
                    if request and slow["name"] and slow["name"].encode() in chunk:
                        crawl.set()
                    if request or not crawl.is_set():
                        dst.sendall(chunk)
                        continue
                    for byte in chunk:
                        if closed.wait(0.5):
                            return
                        dst.sendall(bytes([byte]))

        def proxy():
            with contextlib.suppress(OSError):
                while True:
                    client = listener.accept()[0]
                    upstream, crawl = socket.create_connection(("127.0.0.1", port)), threading.Event()
                    for src, dst, request in ((client, upstream, True), (upstream, client, False)):
                        threading.Thread(target=pipe, args=(src, dst, crawl, request), daemon=True).start()

        threading.Thread(target=proxy, daemon=True).start()
        host = f"127.0.0.1:{listener.getsockname()[1]}"
        yield f"s3://ckpts/trial/ckpt?endpoint_override={host}&scheme=http", slow
        closed.set()
        listener.close()


@pytest.mark.slow
def test_load_model_bounds_every_read_of_a_bucket_not_only_the_first(crawling_bucket, monkeypatch):
    from tune_alexnet import storage
    from tune_alexnet.checkpoint import CheckpointError, load_model, local_copy

    uri, slow = crawling_bucket
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    assert load_model(uri).classes  # the bucket itself works
    monkeypatch.setattr(storage, "REACH_TIMEOUT_S", 2.0)  # the export limit, shortened for the test
    for name in ("model.json", "model.pt"):
        slow["name"] = name
        start = time.monotonic()
        with pytest.raises(CheckpointError) as refused:
            load_model(uri)
        assert time.monotonic() - start < 2 * 2.0 + 3, name  # the first look, then the read that crawls
        assert f"ckpts/trial/ckpt/{name} cannot be reached (no answer within 2 s)" in str(refused.value), name
    slow["name"] = None
    with local_copy(uri) as copy:  # a resume's copy of a bucket checkpoint: the files, each read bounded too
        assert sorted(p.name for p in copy.iterdir()) == ["model.json", "model.pt"]
    slow["name"] = "model.pt"
    start = time.monotonic()
    with pytest.raises(TimeoutError), local_copy(uri):
        pass
    assert time.monotonic() - start < 2 * 2.0 + 3


# --- the local Ray: token authentication on, its token and its folder this user's alone ----------------------


@pytest.fixture
def open_dir():
    """A folder outside pytest's private one, that the user nobody can reach (for processes run as nobody)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="ta", dir="/tmp"))
    path.chmod(0o755)
    yield path
    subprocess.run(["umount", "-l", str(path / "home")], check=False, capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


def as_nobody(*argv: str) -> None:
    subprocess.run([*NOBODY, *argv], check=True)


def _planted_ray_link(d: Path, tmpdir: Path, victim: Path) -> None:
    private = tmpdir / f"tune-alexnet-{os.getuid()}"
    private.mkdir(mode=0o777)
    private.chmod(0o777)  # as an earlier run, or another user, left it
    as_nobody("ln", "-s", str(victim), str(private / "ray"))


def _own_ray_link(d: Path, tmpdir: Path, victim: Path) -> None:
    private = tmpdir / f"tune-alexnet-{os.getuid()}"
    private.mkdir(mode=0o700)
    (private / "ray").symlink_to(victim)


def _tmpdir_not_utf8(d: Path, tmpdir: Path, victim: Path) -> None:
    os.mkdir(os.fsencode(d) + b"/t\xff", 0o700)


def _token(kind: str):
    def plant(d: Path, tmpdir: Path, victim: Path) -> None:
        token = d / "home" / ".ray" / "auth_token"
        token.parent.mkdir(parents=True)
        if kind == "dangling link":
            token.symlink_to(victim / "auth_token")
        elif kind == "link to another's":
            (victim / "auth_token").write_text("a token someone else knows")
            os.chown(victim / "auth_token", 65534, 65534)
            token.symlink_to(victim / "auth_token")
        elif kind == "folder":
            token.mkdir()
        elif kind == "empty":
            token.write_text("")
        elif kind == "blank":
            token.write_text(" \n\t")
        elif kind == "odd bytes":  # Ray aborted the whole process on it (a gRPC header cannot carry it)
            token.write_bytes(b"abc\x00def")
            token.chmod(0o600)
        elif kind == "huge":
            token.write_bytes(b"x" * 50_000_000)
            token.chmod(0o600)
        elif kind == "open to all":  # another user could have written it, or could swap it before Ray reads it
            token.parent.chmod(0o777)
            token.write_text("a token someone else may know")
            token.chmod(0o666)
        elif kind == "read-only home":
            token.parent.rmdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d / "home")], check=True)

    return plant


LOCAL_RAY_CASES = {
    "auth disabled": (None, {"RAY_AUTH_MODE": "disabled"}, "RAY_AUTH_MODE=disabled would start the local Ray without "
                      "token authentication"),
    "auth mode with a space": (None, {"RAY_AUTH_MODE": " token"}, "RAY_AUTH_MODE= token would start the local Ray"),
    "an empty token": (_token("empty"), {}, "/.ray/auth_token is empty"),
    "a named token that is missing": (None, {"RAY_AUTH_TOKEN_PATH": "/nonexistent/token"}, "(RAY_AUTH_TOKEN_PATH) does "
                                      "not exist"),
    "a planted link in an open private folder": (_planted_ray_link, {}, "was writable by other users and holds 'ray'"),
    "a link in the private folder": (_own_ray_link, {}, "/ray is a symbolic link to"),
    "a dangling token link": (_token("dangling link"), {}, "/.ray/auth_token is a symbolic link"),
    "a token linked to another's file": (_token("link to another's"), {}, "/.ray/auth_token is a symbolic link"),
    "a token that is a folder": (_token("folder"), {}, "/.ray/auth_token is a folder"),
    "a read-only home": (_token("read-only home"), {}, "is on a read-only file system, so Ray cannot save one"),
    "a blank RAY_AUTH_TOKEN over a dangling token link": (_token("dangling link"), {"RAY_AUTH_TOKEN": " "},
                                                          "RAY_AUTH_TOKEN is set but blank"),
    "a named token of blank space": (_token("blank"), {"RAY_AUTH_TOKEN_PATH": "{d}/home/.ray/auth_token"},
                                     "/.ray/auth_token holds only blank space"),
    "a token others can write, in a folder others can write": (_token("open to all"), {},
                                                                "can be written by other users (mode 0666)"),
    "a token holding a NUL byte": (_token("odd bytes"), {}, "/.ray/auth_token holds byte 0x00 at 3; allowed: "
                                   "printable ASCII"),
    "a token of 50 MB": (_token("huge"), {}, "/.ray/auth_token is 50000000 bytes long; allowed: at most 4096"),
    "a token given that is not ASCII": (None, {"RAY_AUTH_TOKEN": "t\u00f6ken"}, "RAY_AUTH_TOKEN, Ray's token, holds "
                                        "byte 0xc3 at 1"),
    "a relative HOME": (None, {"HOME": "relhome"}, "Ray's token relhome/.ray/auth_token is a relative path (HOME or "
                        "RAY_AUTH_TOKEN_PATH is); allowed: an absolute path"),
    # Ray takes blank space for a folder's name, in the working folder: the checks looked at the user's own home
    "a HOME of blank space": (None, {"HOME": "  "}, "Ray's token   /.ray/auth_token is a relative path (HOME or "),
    "a RAY_TMPDIR of blank space": (None, {"RAY_TMPDIR": " "}, "RAY_TMPDIR=' ' is a relative path; allowed: an "
                                    "absolute path, or RAY_TMPDIR unset"),
    "a RAY_TMPDIR others can write": (None, {"RAY_TMPDIR": "{d}/victim"}, "/victim can be written by other users, "
                                      "so they could put in the lock files Tune keeps there"),
    "a relative kernel cache": (None, {"TORCHINDUCTOR_CACHE_DIR": "kc"}, "TORCHINDUCTOR_CACHE_DIR='kc' is a relative "
                                "path"),
    "Kubernetes' tokens asked for": (None, {"RAY_ENABLE_K8S_TOKEN_AUTH": "1"}, "RAY_ENABLE_K8S_TOKEN_AUTH=1 asks for "
                                     "Kubernetes token authentication, which only a Ray cluster on Kubernetes"),
    "a TMPDIR whose name is not UTF-8": (_tmpdir_not_utf8, {"TMPDIR": "{d}/t\udcff"}, "Ray's session folder cannot "
                                         "lie in "),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", list(LOCAL_RAY_CASES), ids=list(LOCAL_RAY_CASES))
def test_the_local_ray_never_runs_open_or_through_a_link(case, open_dir, synthetic_dir):
    plant, env, needle = LOCAL_RAY_CASES[case]
    env = {k: v.format(d=open_dir) for k, v in env.items()}
    # TMPDIR: a folder short enough for Ray's socket paths below it (a longer one is passed over for /tmp)
    tmpdir, victim, home = open_dir, open_dir / "victim", open_dir / "home"
    victim.mkdir()
    victim.chmod(0o777)
    os.chown(victim, 65534, 65534)  # another user's folder
    if plant:
        plant(open_dir, tmpdir, victim)
    home.mkdir(exist_ok=True)
    storage = open_dir / "results"
    code, lines = sweep_process(["--data-dir", str(synthetic_dir), "--storage", str(storage), *TINY],
                                {"TMPDIR": str(tmpdir), "HOME": str(home), **env})  # fmt: skip
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines[-20:]
    assert list(victim.iterdir()) == [] or case == "a token linked to another's file"  # nothing written through
    assert not storage.exists()  # a refused sweep leaves no folder behind
    if case == "a TMPDIR whose name is not UTF-8":  # refused before Ray began a session there
        assert "t\\xff, whose name is not UTF-8" in lines[0] and not os.listdir(os.fsencode(open_dir) + b"/t\xff")


def test_the_local_rays_settings_are_refused_before_the_data_is_looked_for(tmp_path):
    """A refusal that costs nothing comes before a load that may download 170 MB (or, here, find no data)."""
    args = ["--data-dir", str(tmp_path / "no-data"), "--storage", str(tmp_path / "r"), *TINY]
    code, lines = sweep_process(args, {"RAY_AUTH_MODE": "disabled"})
    assert code == 2 and len(lines) == 1 and "RAY_AUTH_MODE=disabled would start" in lines[0], lines[-20:]
    assert not (tmp_path / "r").exists()


def test_an_empty_home_is_the_users_own_as_ray_finds_it_not_the_root_folder(monkeypatch):
    """Ray's token loader takes the password database's home for an empty HOME; Python takes /: the token the
    checks looked at was not the one Ray used, and the image cache went to /.cache. A HOME of blank space Ray
    takes as given, a folder in the working folder: the checks took the user's own, and passed a token there that
    another user had planted."""
    import pwd

    from tune_alexnet import cluster, data

    own = Path(pwd.getpwuid(os.getuid()).pw_dir)
    monkeypatch.setenv("HOME", "")
    for name in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN", "TUNE_ALEXNET_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    assert cluster.token_path() == own / ".ray" / "auth_token"
    assert data.user_cache_dir() == own / ".cache" / "tune-alexnet"
    monkeypatch.setenv("HOME", "  ")
    assert cluster.token_path() == Path("  /.ray/auth_token") and "is a relative path" in cluster.token_problem()
    assert data.user_cache_dir() == own / ".cache" / "tune-alexnet"  # not below the working folder


def test_a_user_with_no_home_anywhere_is_refused_in_one_line_before_ray_is_imported(tmp_path, monkeypatch, capsys):
    """A container run as an arbitrary uid, with HOME unset: Ray's import raised 'Could not determine home
    directory' as a traceback from every command."""
    import pwd

    from tune_alexnet.cli import main

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    for home in (None, ""):  # (Python takes an empty HOME for /, Ray for the entry there is not)
        if home is None:
            monkeypatch.delenv("HOME")
        else:
            monkeypatch.setenv("HOME", home)
        for argv in (["export", str(tmp_path)], ["sweep", "--storage", str(tmp_path / "r"), *TINY]):
            with pytest.raises(SystemExit) as exited:
                main(argv)
            lines = capsys.readouterr().err.strip().splitlines()
            assert exited.value.code == 2 and len(lines) == 1, lines
            assert lines[0] == (f"tune-alexnet {argv[0]}: error: this user (uid {os.getuid()}) has no home folder: "
                                "HOME is empty or not set and the password database has no entry for the user; "
                                "allowed: HOME set to a folder of this user's own")  # fmt: skip
    assert not (tmp_path / "r").exists()


def test_a_private_folder_found_open_stays_refused_and_an_open_parent_is_said(open_dir, monkeypatch, capsys):
    """It was made private (0700) before the check, so the same command went on the second time with what had
    been planted in it; and a TMPDIR others can write to without the sticky bit lets them swap the folder."""
    import tempfile

    from tune_alexnet import cluster

    monkeypatch.setattr(tempfile, "tempdir", str(open_dir))
    private = open_dir / f"tune-alexnet-{os.getuid()}"
    private.mkdir()
    private.chmod(0o777)
    (private / "ray").mkdir()
    os.chown(private / "ray", 65534, 65534)
    for _ in range(2):
        with pytest.raises(cluster.UnsafeTempDir, match="was writable by other users and holds 'ray'"):
            cluster.private_temp_dir()
    shutil.rmtree(private)
    assert cluster.private_temp_dir() == str(private) and stat.S_IMODE(private.stat().st_mode) == 0o700
    shutil.rmtree(private)
    capsys.readouterr()
    open_dir.chmod(0o777)
    assert cluster.private_temp_dir() == str(private)
    assert f"lies in {open_dir}, which other users can write to (mode 0777, no sticky bit)" in capsys.readouterr().err
    open_dir.chmod(0o1777)  # the sticky bit: only the folder's owner may rename it
    assert cluster.private_temp_dir() == str(private) and not capsys.readouterr().err
    os.chown(open_dir, 65534, 65534)  # ... and that owner is another user, who may rename what it holds
    assert cluster.private_temp_dir() == str(private)
    assert f"lies in {open_dir}, which another user owns (uid 65534; the sticky bit" in capsys.readouterr().err


def test_a_tmpdir_through_another_users_link_is_said_and_rays_folder_lies_where_it_led(open_dir, monkeypatch, capsys):
    """Another user's link as TMPDIR: they re-pointed it mid-sweep, and Ray's new workers wrote their logs into
    that user's folder and waited there for sockets that never came."""
    import tempfile

    from tune_alexnet import cluster

    (open_dir / "m").mkdir(mode=0o700)  # short names: Ray's socket paths below must fit in 107 bytes
    link = open_dir / "l"
    link.symlink_to(open_dir / "m")
    os.lchown(link, 65534, 65534)
    monkeypatch.setattr(tempfile, "tempdir", str(link))
    private = open_dir / "m" / f"tune-alexnet-{os.getuid()}"
    assert cluster.private_temp_dir() == str(private)  # not through the link, which its owner may re-point
    assert f"lies in {link}, which another user owns (uid 65534; the sticky bit" in capsys.readouterr().err


@pytest.mark.slow
def test_a_tmpdir_as_long_as_ray_allows_starts_ray_and_a_longer_one_is_passed_over():
    """Ray's socket paths below TMPDIR must fit in 107 bytes; one too long cost a traceback and a minute's stall
    (the dashboard's sockets)."""
    from tune_alexnet import cluster

    own = f"tune-alexnet-{os.getuid()}"
    longest = cluster.SOCKET_PATH_MAX - 1 - len(own) - cluster.RAY_SOCKET_TAIL - cluster._pid_digits()
    base = Path("/tmp") / ("t" * (longest - len("/tmp/")))
    base.mkdir(mode=0o700)
    start = ("import ray; from tune_alexnet import cluster; "
             "ray.init(address='local', num_cpus=1, **cluster.local_ray_options(log_to_driver=False)); "
             "print(ray.get_runtime_context().get_node_id() and 'started'); ray.shutdown()")  # fmt: skip
    try:
        done = subprocess.run([sys.executable, "-c", start], env={**os.environ, "TMPDIR": str(base)},
                              capture_output=True, text=True, timeout=180)  # fmt: skip
        assert done.stdout.strip() == "started", done.stderr[-3000:]
        assert "Traceback" not in done.stderr and "Failed to start" not in done.stderr, done.stderr[-3000:]
        assert list((base / own / "ray").glob("session_*/sockets/dash_*"))  # the dashboard's sockets, in this folder
    finally:
        shutil.rmtree(base, ignore_errors=True)
    longer = Path("/tmp") / ("t" * (longest + 1 - len("/tmp/")))
    longer.mkdir(mode=0o700)
    try:
        got = subprocess.run([sys.executable, "-c", "from tune_alexnet import cluster; print(cluster.private_temp_dir())"],
                             env={**os.environ, "TMPDIR": str(longer)}, capture_output=True, text=True)  # fmt: skip
    finally:
        longer.rmdir()
    assert got.stdout.strip() == f"/tmp/{own}", got.stderr


@pytest.mark.slow
def test_a_token_that_cannot_be_read_is_one_line(open_dir, mini_dir):
    """Root reads every file: the sweep runs as nobody, whose own token has no read permission."""
    home, cache, storage = open_dir / "home", open_dir / "cache", open_dir / "results"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("x" * 32)
    (home / ".ray" / "auth_token").chmod(0)
    for path in (home, home / ".ray", home / ".ray" / "auth_token"):
        os.chown(path, 65534, 65534)
    for d in (cache, storage):
        d.mkdir()
        os.chown(d, 65534, 65534)
    code, lines = sweep_process(
        ["--data-dir", str(mini_dir), "--subset", "2", "--storage", str(storage), *TINY],
        {"HOME": str(home), "TUNE_ALEXNET_CACHE": str(cache), "TMPDIR": str(cache), "PYTHONPATH": os.getcwd()},
        user=NOBODY,
    )
    assert code == 2 and len(lines) == 1, lines[-20:]
    assert f"Ray's token {home}/.ray/auth_token cannot be read (Permission denied)" in lines[0]


@pytest.mark.parametrize(
    "mode, folder_mode, group, needle",
    [
        (0o600, 0o777, 0, "lies in {folder}, which other users can write to (mode 0777, no sticky bit)"),
        (0o660, 0o700, 65534, "can be written by other users (mode 0660)"),  # a group others share
        (0o600, 0o1777, 0, None),  # the sticky bit: only the token's owner can remove or rename it
        (0o660, 0o770, 0, None),  # a group of this user alone (root's here), as a umask of 002 leaves it
    ],
    ids=["open folder", "shared group", "sticky folder", "private group"],
)
def test_a_token_others_could_write_or_replace_is_refused(mode, folder_mode, group, needle, open_dir, monkeypatch):
    from tune_alexnet import cluster

    folder = open_dir / "home" / ".ray"
    folder.mkdir(parents=True)
    (folder / "auth_token").write_text("x" * 32)
    os.chown(folder / "auth_token", -1, group)
    (folder / "auth_token").chmod(mode)
    folder.chmod(folder_mode)
    monkeypatch.setenv("HOME", str(open_dir / "home"))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    problem = cluster.token_problem()
    assert (problem is None) if needle is None else needle.format(folder=folder) in problem, problem


def test_a_token_below_a_folder_another_user_owns_is_refused(open_dir, monkeypatch):
    """HOME inside a sticky folder that another user owns: the sticky bit does not bind that folder's owner, who
    renamed HOME away between the checks and Ray's start and put one of theirs, with a token they know, there."""
    from tune_alexnet import cluster

    theirs = open_dir / "theirs"
    (theirs / "home" / ".ray").mkdir(parents=True)
    (theirs / "home" / ".ray" / "auth_token").write_text("x" * 32)
    (theirs / "home" / ".ray" / "auth_token").chmod(0o600)
    (theirs / "home" / ".ray").chmod(0o700)
    theirs.chmod(0o1777)
    os.chown(theirs, 65534, 65534)
    monkeypatch.setenv("HOME", str(theirs / "home"))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    problem = cluster.token_problem()
    assert f"lies in {theirs}, which belongs to another user (uid 65534)" in (problem or ""), problem


@pytest.mark.parametrize("hop", [False, True], ids=["linked into it", "linked through a link in it"])
def test_a_token_folder_linked_into_a_folder_others_can_write_is_refused(open_dir, monkeypatch, hop):
    """~/.ray a link to a folder of this user's inside one that anyone may write: another user renames it away
    and puts a folder and token of theirs in its place. The folders the link leads through count too."""
    from tune_alexnet import cluster

    shared, home = open_dir / "shared", open_dir / "home"
    (shared / "mine").mkdir(parents=True)
    shared.chmod(0o777)
    (shared / "mine").chmod(0o700)
    (shared / "mine" / "auth_token").write_text("x" * 32)
    (shared / "mine" / "auth_token").chmod(0o600)
    home.mkdir()
    if hop:  # a link in the open folder to a folder of this user's elsewhere: the link itself can be swapped
        (open_dir / "private").mkdir(mode=0o700)
        (shared / "mine").rename(open_dir / "private" / "mine")
        (shared / "mine").symlink_to(open_dir / "private" / "mine")
    (home / ".ray").symlink_to(shared / "mine")
    monkeypatch.setenv("HOME", str(home))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    problem = cluster.token_problem()
    assert f"lies in {shared}, which other users can write to (mode 0777, no sticky bit)" in problem, problem


def test_a_token_readable_by_others_is_made_private_before_ray_starts(open_dir, monkeypatch, caplog):
    """Ray's own default (0644, as an earlier `ray start` leaves it): made 0600 in the options ray.init is given,
    with one line that says so."""
    import tempfile

    from tune_alexnet import cluster

    token = open_dir / "home" / ".ray" / "auth_token"
    token.parent.mkdir(parents=True)
    token.write_text("x" * 32)
    token.chmod(0o644)
    monkeypatch.setenv("HOME", str(open_dir / "home"))
    monkeypatch.setattr(tempfile, "tempdir", str(open_dir))  # the private folder goes there, not in /tmp
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert cluster.token_problem() is None  # readable by others is no refusal
    cluster.local_ray_options()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    said = [r.getMessage() for r in caplog.records if r.name == "tune_alexnet.cluster"]
    assert len(said) == 1 and f"{token} was readable by other users" in said[0], said
    caplog.clear()
    cluster.local_ray_options()  # private now: nothing more to say
    assert not [r for r in caplog.records if r.name == "tune_alexnet.cluster"]


def test_a_new_token_is_made_private_from_the_start(open_dir, monkeypatch, caplog):
    """Ray writes a new token readable by all and only then is it made private: made 0600 before Ray starts."""
    import tempfile

    from tune_alexnet import cluster

    token = open_dir / "home" / ".ray" / "auth_token"
    monkeypatch.setenv("HOME", str(open_dir / "home"))
    monkeypatch.setattr(tempfile, "tempdir", str(open_dir))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert cluster.token_problem() is None
    cluster.local_ray_options()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    assert len(bytes.fromhex(token.read_text())) == 32  # as Ray makes one: 256 random bits
    assert cluster.token_problem() is None
    assert not [r for r in caplog.records if r.name == "tune_alexnet.cluster"]


@pytest.mark.parametrize(
    "address, needle",
    [
        ("", "invalid value '': an empty address"),
        ("  ", "invalid value '  ': an empty address"),
        ("ray://127.0.0.1:1", "invalid value 'ray://127.0.0.1:1': Ray Client (ray://) addresses are not supported"),
        ("auto", None),
        ("10.0.0.5:6379", None),
        ("[::1]:6379", None),
        ("127.0.0.1:-1", "invalid value '127.0.0.1:-1': not host:port with a port from 1 to 65535"),  # Ray: minutes
        ("127.0.0.1:99999999999999999999", "not host:port with a port from 1 to 65535"),  # a traceback
        ("127.0.0.1:99999", "not host:port with a port from 1 to 65535"),
        ("127.0.0.1:\u0661\u0660", "not host:port with a port from 1 to 65535"),  # Arabic-Indic digits
        ("10.0.0.5", "invalid value '10.0.0.5': not host:port"),
        (":6379", "not host:port"),
        ("http://127.0.0.1:8265", "that is a Ray dashboard's address, which 'ray job submit' takes"),
    ],
)
def test_an_address_that_names_no_cluster_to_join_is_one_line(address, needle):
    """An empty --address would quietly start a local Ray; a Ray Client one timed out after three lines of Ray's."""
    import argparse

    from tune_alexnet import cluster

    if needle is None:
        assert cluster.checked_address(address) == address
        return
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        cluster.checked_address(address)
    line = str(refused.value)
    assert needle in line and "\n" not in line and "allowed: the address of a running Ray head" in line, line


# --- storage at its edges ------------------------------------------------------------------------------------


def test_a_storage_full_from_the_start_is_one_line_and_keeps_nothing(tmpfs, synthetic_dir, capsys):
    disk = tmpfs(1)
    with open(disk / "filler", "wb", buffering=0) as f, pytest.raises(OSError):
        while True:  # until the disk is full
            f.write(b"x" * 2**16)
    err = one_line(["sweep", "--data-dir", str(synthetic_dir), "--storage", str(disk), "--name", "full", *TINY], capsys)
    assert f"--storage {disk} cannot hold even the experiment's lock file (No space left on device; 0.0 MB free)" in err
    assert [p.name for p in disk.iterdir()] == ["filler"]  # no 0-byte lock, nothing else


@pytest.mark.slow
def test_a_sweep_approved_by_the_space_check_finishes_under_the_disk_guard(tmpfs, synthetic_dir):
    """One formula for both: on a disk just large enough for the approval, the guard lets the sweep finish."""
    args = ["--data-dir", str(synthetic_dir), "--name", "tight", *TINY[:2], "--lr", "0.01,0.001", *TINY[4:-1], "2",
            "--resume-every", "0", "--best-every", "0"]  # fmt: skip
    code, lines = sweep_process([*args, "--storage", str(tmpfs(30, "small"))])
    assert code == 2 and "but this sweep needs about" in lines[-1], lines[-5:]
    needed_mb = float(lines[-1].split("needs about ")[1].split(" MB")[0].replace(",", ""))
    disk = tmpfs(needed_mb * 1e6 / 2**20 + 1, "just-enough")
    code, lines = sweep_process([*args, "--storage", str(disk)], timeout=300)
    assert code == 0 and not any("nearly full" in ln for ln in lines), "\n".join(lines[-30:])


@pytest.mark.slow
def test_report_on_a_full_disk_says_how_much_room_it_needs_and_leaves_nothing(
    mixed_experiment, tmpfs, tmp_path, capsys
):
    path, _ = mixed_experiment
    disk = tmpfs(0.1)
    out = disk / "reports" / "mixed"
    err = one_line(["report", path, "--out", str(out)], capsys)
    free = float(err.split(f"{out} has ")[1].split(" MB free")[0])
    need = float(err.split("need about ")[1].split(" MB")[0])
    assert "report.md, 4 figures and the study page need about" in err and 0 < free <= 0.11 < need, err
    assert list(disk.iterdir()) == []  # no folder made, no file begun
    assert main(["report", path, "--out", str(tmp_path / "roomy")]) == 0
    written = sum(f.stat().st_size for f in (tmp_path / "roomy").iterdir()) / 1e6
    assert written <= need <= written * 1.1 + 0.05, (written, need)  # what it would write, in whole blocks


def test_export_on_a_full_disk_says_how_much_room_it_needs_and_writes_no_table(
    mixed_experiment, tmpfs, tmp_path, capsys
):
    """It wrote results.parquet and results.csv, then failed on epochs.parquet, saying 0.0 MB of 0.0 MB."""
    path, _ = mixed_experiment
    assert main(["export", path, "--out", str(tmp_path / "roomy")]) == 0
    written = sum(f.stat().st_size for f in (tmp_path / "roomy").iterdir() if f.suffix in (".csv", ".parquet"))
    disk = tmpfs(written / 2 / 1e6)
    err = one_line(["export", path, "--out", str(disk / "tables")], capsys)
    need = float(err.split("the tables need about ")[1].split(" MB")[0])
    assert f"{disk}/tables has " in err and written / 1e6 <= need <= written / 1e6 * 1.3 + 0.05, (err, written)
    assert list(disk.iterdir()) == []  # no folder made, no table begun


# --- a reader that races the sweep ---------------------------------------------------------------------------


@pytest.mark.slow
def test_an_export_of_an_older_read_never_replaces_newer_tables(mixed_experiment, tmp_path, capsys):
    """A reader that read the experiment while a trial ran, and writes after the sweep's own tables: it leaves them."""
    from tune_alexnet.export import load_experiment, write_tables

    copy = Path(shutil.copytree(mixed_experiment[0], tmp_path / "mixed"))
    (state,) = copy.glob("experiment_state-*.json")
    finished = state.read_text()
    data = json.loads(finished)
    for entry in data["trial_data"]:
        trial = json.loads(entry[0])
        trial["status"] = "RUNNING"
        entry[0] = json.dumps(trial)
    state.write_text(json.dumps(data))
    older = load_experiment(copy)  # read while the trials ran
    assert set(older.table["status"]) == {"interrupted"}  # RUNNING in Tune's state, but no sweep holds the copy
    time.sleep(0.01)
    state.write_text(finished)  # the sweep ended, and wrote its own tables
    assert main(["export", str(copy)]) == 0
    newer = (copy / "results.parquet").read_bytes()
    assert write_tables(older, copy) == []
    assert (copy / "results.parquet").read_bytes() == newer
    assert "running" not in set(pd.read_parquet(copy / "results.parquet")["status"])
    assert "were written from a newer read" in older.notes[-1]


@pytest.mark.slow
def test_an_older_read_within_one_tick_of_the_clock_never_replaces_newer_tables(mixed_experiment, tmp_path):
    """A trial's epoch appended in the same tick of the file system's clock as an earlier read (a few ms on ext4,
    1 to 2 s on others): by the newest time alone nothing had changed, and that read's tables replaced newer ones."""
    from tune_alexnet.export import load_experiment, write_tables

    copy = Path(shutil.copytree(mixed_experiment[0], tmp_path / "mixed"))
    result = max(copy.glob("train_cifar_*/result.json"), key=lambda p: len(p.read_bytes().splitlines()))
    lines = result.read_bytes().splitlines(keepends=True)
    assert len(lines) >= 2
    tick = max(p.stat().st_mtime_ns for p in [*copy.glob("experiment_state-*.json"), result]) + 10**9
    result.write_bytes(b"".join(lines[:-1]))
    os.utime(result, ns=(tick, tick))
    older = load_experiment(copy)  # read while the trial ran
    result.write_bytes(b"".join(lines))
    os.utime(result, ns=(tick, tick))  # its next epoch, within the same tick
    assert write_tables(load_experiment(copy), copy)
    epochs = len(pd.read_parquet(copy / "epochs.parquet"))
    assert write_tables(older, copy) == [] and "were written from a newer read" in older.notes[-1]
    assert len(pd.read_parquet(copy / "epochs.parquet")) == epochs == len(older.epochs) + 1
    again = load_experiment(copy)  # a read of the experiment as it is now is the newest there is: it writes
    assert write_tables(again, copy) and len(pd.read_parquet(copy / "epochs.parquet")) == epochs


def _sweep_then(storage: Path, synthetic_dir: Path, act, quiet: bool = True) -> tuple[int, str]:
    """A sweep of two trials that runs a while; `act()` once a trial has reported. (exit status, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    args = ["--data-dir", str(synthetic_dir), "--storage", str(storage), "--name", "net", *TINY[:2], "--lr",
            "0.01,0.001", *TINY[4:-1], "60", "--patience", "100", "--resume-every", "0"]  # fmt: skip
    args += ["--quiet"] if quiet else []
    proc = subprocess.Popen([sys.executable, "-m", "tune_alexnet", "sweep", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")  # fmt: skip
    deadline = time.monotonic() + 180
    while not list((storage / "net").glob("train_cifar_*/checkpoint_*/trainer.pt")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    act()
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.mark.slow
def test_a_storage_that_turns_read_only_mid_sweep_stops_it_cleanly_and_resumably(tmpfs, synthetic_dir):
    disk = tmpfs(400)

    def read_only() -> None:  # a read-only view of the same disk in its place (a busy disk cannot be remounted)
        subprocess.run(["mount", "--bind", str(disk), str(disk)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(disk)], check=True)

    code, err = _sweep_then(disk, synthetic_dir, read_only, quiet=False)
    subprocess.run(["umount", str(disk)], check=True)  # the read-only view: the disk is writable again
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "study page was not written" not in err and "keep their last checkpoints" not in err, err[-3000:]
    # at most the trials that failed before the guard noticed (Tune prints each trial's error; there were 35)
    assert code == 1 and "Traceback" not in err, err[-5000:]
    assert lines[-1].startswith(f"tune-alexnet sweep: error: --storage {disk} can no longer be written (Read-only")
    assert "--resume --name net" in lines[-1]
    from ray import tune

    assert tune.Tuner.can_restore(str(disk / "net"))


@pytest.mark.slow
def test_one_trial_folder_turning_read_only_mid_sweep_stops_it_in_one_line_and_resume_says_which(tmpfs,
                                                                                                 synthetic_dir):  # fmt: skip
    """Not the experiment folder: one trial's own (another user's chmod, chattr +i). Tune failed that trial at
    every try, a traceback each, and again at every --resume."""
    disk = tmpfs(400)
    shut = []

    def read_only() -> None:  # a read-only view of the trial's folder in its place
        folder = sorted(p.parents[1] for p in (disk / "net").glob("train_cifar_*/checkpoint_*/trainer.pt"))[0]
        subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        shut.append(folder)

    try:
        code, err = _sweep_then(disk, synthetic_dir, read_only)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 1 and "Traceback" not in err, err[-5000:]
        assert lines[-1].startswith(f"tune-alexnet sweep: error: --storage {disk} can no longer be written "
                                    f"(read-only or immutable: {shut[0]})"), lines[-1]  # fmt: skip
        assert lines[-1].endswith(f"--name net --storage {disk}' continues it"), lines[-1]
        resume = subprocess.run([sys.executable, "-m", "tune_alexnet", "sweep", "--resume", "--storage", str(disk),
                                 "--name", "net", "--quiet"], capture_output=True, text=True, timeout=300)  # fmt: skip
        assert resume.returncode == 2 and resume.stderr.strip() == (
            f"tune-alexnet sweep: error: --resume: {shut[0]} cannot be written (read-only or immutable); once it "
            "can, the same command continues experiment 'net'"
        ), resume.stderr[-3000:]
    finally:
        for folder in shut:
            subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("shut", ["result.json", "checkpoint_000001", "checkpoint_000001/model.pt"])
def test_the_disk_guard_names_a_file_or_checkpoint_of_a_running_trial_that_turned_read_only(tmp_path, monkeypatch,
                                                                                            shut):  # fmt: skip
    """Tune appends to a trial's files and deletes its replaced checkpoints: one of them shut alone lost the
    trial's results silently (result.json) or gave a traceback (a checkpoint)."""
    from types import SimpleNamespace

    from tune_alexnet import stopping, sweep

    exp, stops = tmp_path / "exp", []
    trial = exp / "train_cifar_x"
    (trial / "checkpoint_000001").mkdir(parents=True)
    (trial / "result.json").write_text("{}\n")
    (trial / "checkpoint_000001" / "model.pt").write_bytes(b"x")
    monkeypatch.setattr(stopping, "stop_at_once", lambda said=False: stops.append(said))  # not this process
    guard = sweep.DiskGuard(str(tmp_path), per_trial=0, exp_dir=str(exp))
    running = [SimpleNamespace(status="RUNNING", storage=SimpleNamespace(trial_dir_name=trial.name))]
    assert guard._check_writable(running) is False
    subprocess.run(["mount", "--bind", str(trial / shut), str(trial / shut)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(trial / shut)], check=True)
        assert guard._check_writable(running) is True and stops == [True]
        assert f"can no longer be written (read-only or immutable: {trial / shut})" in guard.lost
    finally:
        subprocess.run(["umount", str(trial / shut)], check=True)
        sweep._lost.clear()


@pytest.mark.slow
def test_a_storage_that_fills_mid_sweep_stops_it_with_a_way_forward_not_a_bad_input_error(tmpfs, synthetic_dir):
    """The guard stops the sweep and the reserve holds the tables; a study page that no longer fits is a warning
    (report writes it later), not the bad-input exit with a message about report.html."""
    disk = tmpfs(60)

    def fill() -> None:
        with open(disk / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"x" * 2**16)

    code, err = _sweep_then(disk, synthetic_dir, fill)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and "Traceback" not in err, err[-5000:]
    assert "nearly full" in err and "error:" not in err, err[-3000:]
    assert lines[-1].startswith("tune-alexnet sweep: ") and "--resume --name net" in lines[-1], lines[-3:]
    assert (disk / "net" / "results.parquet").exists()


@pytest.mark.slow
def test_a_storage_deleted_mid_sweep_has_a_way_forward(tmpfs, synthetic_dir):
    disk = tmpfs(400)

    def delete() -> None:  # at once, as a whole: an rmtree races the sweep's own writes (Directory not empty)
        (disk / "net").rename(disk / "deleted")
        shutil.rmtree(disk / "deleted", ignore_errors=True)

    code, err = _sweep_then(disk, synthetic_dir, delete, quiet=False)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "keep their last checkpoints" not in err  # they went with the folder
    # at most the trials that failed before the guard noticed (Tune prints each trial's error; there were 35)
    assert code == 1 and "Traceback" not in err, err[-5000:]
    assert lines[-1].startswith(f"tune-alexnet sweep: error: the experiment folder {disk}/net was deleted while")
    assert "start afresh with the same command and another --name" in lines[-1]
    # Tune's driver writes back what it held (its state, the trials' results): the tables of those are there
    assert lines[-1].endswith(f"; the results the sweep still held are in {disk}/net/results.parquet")
    assert len(pd.read_parquet(disk / "net" / "results.parquet")) == 2
    resume = subprocess.run([sys.executable, "-m", "tune_alexnet", "sweep", "--resume", "--storage", str(disk),
                             "--name", "net", "--quiet"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resume.returncode == 2 and resume.stderr.strip() == (
        f"tune-alexnet sweep: error: --resume: experiment 'net' in {disk} cannot be continued: Tune's own record of "
        "it is gone (the folder deleted while it ran, or never a sweep's); the tables of what it held are in "
        f"{disk}/net/results.parquet; start it afresh with the same command and another --name"
    ), resume.stderr[-3000:]


def test_a_folder_another_process_holds_for_writing_is_one_line_not_a_hang(tmp_path, monkeypatch):
    """Export, report and the live page wait a bounded time for another writer of the folder (its lock file)."""
    from tune_alexnet import export

    monkeypatch.setattr(export, "WRITE_LOCK_WAIT_S", 0.5)
    hold = "import fcntl, os, sys, time; fcntl.flock(os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600), fcntl.LOCK_EX); print(1, flush=True); time.sleep(60)"  # fmt: skip
    lock = tmp_path / export.WRITE_LOCK_NAME
    holder = subprocess.Popen([sys.executable, "-c", hold, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        with pytest.raises(export.ExportError, match=r"another process has held .* for writing for more than 0.5 s"):
            with export.output_dir(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_on_the_folder_itself_no_longer_blocks_a_writer(tmp_path, monkeypatch):
    """Any user who can open a folder can flock it: the write lock is a private file of this user's instead."""
    import fcntl

    from tune_alexnet import export

    monkeypatch.setattr(export, "WRITE_LOCK_WAIT_S", 0.5)
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with export.output_dir(tmp_path):
            pass
    finally:
        os.close(fd)
    lock = os.stat(tmp_path / export.WRITE_LOCK_NAME)
    assert stat.S_IMODE(lock.st_mode) == 0o600 and lock.st_uid == os.getuid()


@pytest.mark.parametrize("plant", ["link", "fifo", "folder", "another user's", "two names"])
def test_a_planted_write_lock_is_refused_with_one_line(tmp_path, plant):
    from tune_alexnet import export

    out, victim = tmp_path / "out", tmp_path / "victim"
    out.mkdir()
    victim.write_text("not yours")
    lock = out / export.WRITE_LOCK_NAME
    if plant == "link":
        lock.symlink_to(victim)
    elif plant == "fifo":
        os.mkfifo(lock)
    elif plant == "folder":
        lock.mkdir()
    elif plant == "two names":
        os.link(victim, lock)
    else:
        lock.write_text("")
        os.chown(lock, os.getuid() + 4242, os.getgid() + 4242)
    with pytest.raises(export.ExportError) as refused:
        with export.output_dir(out):
            pass
    assert str(refused.value).startswith(f"the lock file {lock} is ") and "\n" not in str(refused.value)
    assert victim.read_text() == "not yours" and stat.S_IMODE(victim.stat().st_mode) != 0o600


def test_the_settings_record_is_never_written_through_a_planted_link(tmp_path):
    from tune_alexnet.settings import SETTINGS_FILE, keep_runtime, read_settings

    exp, victim = tmp_path / "exp", tmp_path / "victim.txt"
    exp.mkdir()
    (exp / SETTINGS_FILE).write_text(json.dumps({"runtime": {}}))
    victim.write_text("not yours")
    for name in (f"{SETTINGS_FILE}.new", f".{SETTINGS_FILE}.tmp"):
        (exp / name).symlink_to(victim)
    keep_runtime(str(exp), {"resume_every_s": 60})
    assert victim.read_text() == "not yours" and not (exp / SETTINGS_FILE).is_symlink()
    assert read_settings(str(exp))["runtime"] == {"resume_every_s": 60}


def test_a_write_that_fails_leaves_no_folder_it_made_not_even_its_lock_file(tmp_path):
    from tune_alexnet.export import WRITE_LOCK_NAME, output_dir

    with pytest.raises(RuntimeError), output_dir(tmp_path / "new" / "out"):
        raise RuntimeError("a write failed")
    assert list(tmp_path.iterdir()) == []
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(RuntimeError), output_dir(kept):
        raise RuntimeError("a write failed")
    assert kept.is_dir() and [p.name for p in kept.iterdir()] == [WRITE_LOCK_NAME]  # not ours to remove


def test_text_from_files_anyone_may_write_reaches_the_terminal_and_tables_without_its_escapes(tmp_path, capsys):
    """A lock file, an error.txt and a result line are written by whoever could write the folder: an escape in
    them would recolour, retitle or clear the terminal that shows them, or forge a line of the command's own."""
    import fcntl

    from tune_alexnet.export import TEXT_LIMIT, _error_line, line_problem
    from tune_alexnet.preflight import PreflightError, lock_experiment
    from tune_alexnet.settings import say

    lock = tmp_path / ".x.lock"
    lock.write_text("evil\n\x1b[31mtune-alexnet: all good, exit 0\x1b[0m\n")
    with lock.open() as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(PreflightError) as refused:
            lock_experiment(str(tmp_path), "x")
    say(str(refused.value))
    err = capsys.readouterr().err
    assert err == f"experiment 'x' in {tmp_path} is in use by evil; wait for it to end, or use another --name\n"
    lock.write_bytes(b"\xff\xfe not UTF-8")
    with lock.open() as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(PreflightError, match="is in use by \ufffd\ufffd not UTF-8"):
            lock_experiment(str(tmp_path), "x")
    say("one\x1b]0;title\x07\r\x9b2J two\nthree")  # a line of its own may still be two lines
    assert capsys.readouterr().err == "one\\x1b]0;title\\x07\\r\\x9b2J two\nthree\n"

    import pyarrow.fs

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "error.txt").write_text("Traceback\nValueError: bad \x1b[2J\x1b]0;pwned\x07")
    assert _error_line(pyarrow.fs.LocalFileSystem(), str(tmp_path), "t") == "ValueError: bad \\x1b[2J\\x1b]0;pwned\\x07"
    assert (
        line_problem({"epoch": 1, "node_id": "n\x1b[2J"})
        == "'node_id' is \"n\\u001b[2J\"; allowed: a string of at most "
        f"{TEXT_LIMIT} printable characters"
    )


def test_a_disk_filled_between_the_room_check_and_the_copy_is_a_full_storage_not_a_failed_trial():
    """Another process can fill the disk after a trial found room for its checkpoint: Tune's copy then fails, and
    the trial failed with a traceback instead of saying the storage is full and waiting for the guard's stop."""
    import errno

    from tune_alexnet.ray_hooks import _no_space

    full = OSError(errno.ENOSPC, "No space left on device")
    wrapped = RuntimeError("Failed to persist the checkpoint")
    wrapped.__cause__ = full
    assert _no_space(full) and _no_space(wrapped) and _no_space(OSError("IOError: No space left on device"))
    assert _no_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not _no_space(PermissionError(errno.EACCES, "Permission denied")) and not _no_space(ValueError("x"))
    assert _no_space(RuntimeError("IOError: Disk quota exceeded"))


THEIRS_FIRST = """
import os, sys
from pathlib import Path
from tune_alexnet import cluster
home, original = Path(os.environ["HOME"]), cluster.local_ray_options
def theirs_first(**kwargs):  # the moment between the checks and Ray's start
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("a-token-they-know-0123456789abcdef")
    for made in (home, home / ".ray", home / ".ray" / "auth_token"):
        os.chown(made, 65534, 65534)
    return original(**kwargs)
cluster.local_ray_options = theirs_first
import tune_alexnet
sys.exit(tune_alexnet.main())
"""


@pytest.mark.slow  # a sweep in a process of its own
def test_a_token_another_user_makes_between_the_check_and_rays_start_is_refused(synthetic_dir, tmp_path):
    """A HOME not made yet in a shared sticky folder: the check found no token and nothing wrong; another user then
    made ~/.ray and a token of theirs before Ray read it, and the sweep ran with a token they knew."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    home = shared / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    args = ["sweep", "--data-dir", str(synthetic_dir), "--storage", str(tmp_path / "r"), *TINY]
    done = subprocess.run([sys.executable, "-c", THEIRS_FIRST, *args], env={**env, "HOME": str(home)}, cwd="/",
                          capture_output=True, text=True, timeout=180)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    said = f"Ray's token {home}/.ray/auth_token belongs to another user (uid 65534), who knows it"
    assert said in done.stderr, done.stderr[-3000:]


def test_a_kernel_cache_other_users_could_write_make_or_swap_is_refused(tmp_path, monkeypatch):
    """torch loads and runs the code compiled into TORCHINDUCTOR_CACHE_DIR: one named by the user was trusted
    whoever could write it."""
    from tune_alexnet import cluster

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    cases = {shared: "can be written by other users", shared / "new": f"does not exist, and {shared} can be made in"}
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    cases[theirs / "cache"] = f"{theirs} is on the way, which another user owns (uid 65534)"
    (tmp_path / "link").symlink_to(shared / "gone")  # a link of yours that leads nowhere yet: torch makes its target
    cases[tmp_path / "link"] = f"does not exist, and {shared} can be made in"
    (shared / "theirs-link").symlink_to(tmp_path / "mine")  # another user's link, which they may re-point
    os.lchown(shared / "theirs-link", 65534, 65534)
    cases[shared / "theirs-link"] = f"{shared}/theirs-link is on the way, which another user owns (uid 65534)"
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    # Tune's lock files in RAY_TMPDIR: a lock of theirs there held a resume for ever (only the folder was looked at)
    for name in ("TORCHINDUCTOR_CACHE_DIR", "RAY_TMPDIR"):
        for folder, needle in cases.items():
            monkeypatch.setenv(name, str(folder))
            assert needle in (cluster.folder_settings_problem() or ""), (name, folder)
        monkeypatch.setenv(name, str(mine / "cache"))  # not made yet, where only you can
        assert cluster.folder_settings_problem() is None
        monkeypatch.delenv(name)


def test_sigterm_stops_as_ctrl_c_where_ctrl_c_itself_is_ignored(monkeypatch):
    """A shell's background job starts with SIGINT ignored: SIGTERM, sent on as a SIGINT, was dropped, and the
    sweep trained to its end."""
    import signal

    from tune_alexnet.cli import _stop_signals_as_ctrl_c

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(KeyboardInterrupt), _stop_signals_as_ctrl_c():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the signal lands here
    finally:
        signal.signal(signal.SIGINT, previous)
