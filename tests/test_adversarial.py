"""Bad input, damaged experiments and competing sweeps: each gets one line and exit 2, and nothing is lost.

The data folder's own table of bad inputs is in test_data.py."""

import contextlib
import json
import os
import pickle
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import NO_OVERRIDE, moto_bucket

from tune_alexnet import preflight
from tune_alexnet.cli import build_parser, main
from tune_alexnet.resume import STATE_COPIES


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_2_lines(argv, capsys, count: int) -> list[str]:
    """The `count` lines of a refusal (exit 2, no traceback); the data's progress bar may come first."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip() and "decoding " not in ln]
    assert len(lines) == count and "Traceback" not in err, err
    return lines


def one_line_exit_2(argv, capsys) -> str:
    return exit_2_lines(argv, capsys, 1)[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--name", "../outside"], "'../outside'; allowed: letters, digits"),
        (["--name", "a/b"], "'a/b'; allowed: letters, digits"),
        (["--name", "x" * 300], "at most 100 characters"),
        (["--name", ".hidden"], "not starting with '.'"),
        (["--seed", str(2**64)], f"'{2**64}'; allowed: a whole number >= 0 and <= 4294967295"),
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


FAKE_GCS = """
import os, sys, time
from concurrent import futures
import grpc
mode = sys.argv[1]
class Handler(grpc.GenericRpcHandler):
    def service(self, details):
        if mode != "hold":  # every call answered with this status
            return grpc.unary_unary_rpc_method_handler(lambda r, c: c.abort(getattr(grpc.StatusCode, mode), "no"))
        if details.method.endswith("/GetClusterId"):  # the GCS's first question answered, every other one held
            from ray.core.generated import gcs_service_pb2
            reply = gcs_service_pb2.GetClusterIdReply(cluster_id=os.urandom(28)).SerializeToString()
            return grpc.unary_unary_rpc_method_handler(lambda r, c: reply)
        print("held", flush=True)
        return grpc.unary_unary_rpc_method_handler(lambda r, c: time.sleep(600))
server = grpc.server(futures.ThreadPoolExecutor(8))
server.add_generic_rpc_handlers((Handler(),))
print(server.add_insecure_port("0.0.0.0:0"), flush=True)  # (a loopback address is joined as the node's own IP)
server.start()
server.wait_for_termination()
"""


@pytest.fixture
def fake_gcs():
    """Start a gRPC server in a process of its own (grpc in pytest's process upset later tests' forks): `mode` a
    status it answers every call with, or "hold". Yields a function of the mode giving (port, its stdout)."""
    started = []

    def start(mode: str):
        proc = subprocess.Popen([sys.executable, "-c", FAKE_GCS, mode], stdout=subprocess.PIPE, text=True)
        started.append(proc)
        return int(proc.stdout.readline()), proc.stdout

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_unreachable_places_fail_within_seconds(synthetic_dir, tmp_path, fake_gcs):
    """A cluster and buckets that do not answer, each refused in one line within its own limit of seconds, where
    Ray and pyarrow retried for minutes (all at once: each mostly waits; two minutes in all bound a hang, not the
    time ten imports of torch and Ray take on a small machine)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_EC2_METADATA_DISABLED="true")
    port = free_port()  # nothing listens there
    # Ports that take the connection, then stay silent or close it (another service, a wrong port): Ray retried
    # them for minutes, with Ctrl-C held back.
    silent, closing = socket.create_server(("0.0.0.0", 0)), socket.create_server(("0.0.0.0", 0))  # (see below)
    threading.Thread(target=lambda: [closing.accept()[0].close() for _ in iter(int, 1)], daemon=True).start()
    unavailable = fake_gcs("UNAVAILABLE")[0]  # gRPC, yet no GCS: Ray retried for minutes
    sweep = ["sweep", "--data-dir", str(synthetic_dir), *TINY]
    gs = "gs://tune-alexnet-test-bucket/x"
    cases = [
        ([*sweep, "--storage", str(tmp_path / "r"), "--address", f"127.0.0.1:{port}"],
         f"--address 127.0.0.1:{port}: no Ray cluster answers there"),
        ([*sweep, "--storage", str(tmp_path / "r2"), "--address", f"127.0.0.1:{silent.getsockname()[1]}"],
         "no Ray cluster answers there (it takes connections but said nothing in 5 s)"),
        ([*sweep, "--storage", str(tmp_path / "r3"), "--address", f"127.0.0.1:{closing.getsockname()[1]}"],
         "no Ray cluster answers there (it takes connections but closed this one)"),  # as Ray joins it: the node's IP
        ([*sweep, "--storage", str(tmp_path / "r4"), "--address", "head..lan:6379"],  # a name no DNS takes
         "--address head..lan:6379: no Ray cluster answers there (encoding with 'idna' codec failed"),
        ([*sweep, "--storage", str(tmp_path / "r6"), "--address", f"[::1]:{port}"],  # IPv6: its brackets are no name
         f"--address [::1]:{port}: no Ray cluster answers there ("),
        ([*sweep, "--storage", str(tmp_path / "r7"), "--address", f"127.0.0.1:{unavailable}"],
         "no Ray cluster answers there (it speaks gRPC but did not answer as a Ray GCS does (UNAVAILABLE))"),
        ([*sweep, "--storage", f"s3://bucket/x?endpoint_override=127.0.0.1:{port}&scheme=http"], "cannot be reached"),
        ([*sweep, "--storage", gs], f"--storage {gs} cannot be reached"),  # every scheme --help names
        (["export", gs], f"{gs} holds no readable Tune experiment"),
        # a bucket that takes the connection and says nothing: pyarrow's exit waited 85 s for the call given up on
        (["export", f"s3://bucket/x?endpoint_override=127.0.0.1:{silent.getsockname()[1]}&scheme=http"],
         "holds no readable Tune experiment (no answer within"),
    ]  # fmt: skip
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", "tune_alexnet", *argv], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path) for argv, _ in cases]  # fmt: skip
    for proc, (argv, needle) in zip(procs, cases):  # Ray's own retries took minutes: a hang fails here
        _, err = proc.communicate(timeout=max(1, 120 - (time.monotonic() - start)))
        assert proc.returncode == 2 and "Traceback" not in err, (argv, err[-2000:])
        assert needle in err.strip().splitlines()[-1] and "Name or service not known" not in err, (argv, err[-2000:])


@pytest.mark.slow
def test_a_join_that_a_fake_gcs_holds_ends_in_one_line_on_a_stop_signal(synthetic_dir, tmp_path, fake_gcs):
    """A server that answers the GCS's first question, then holds every other call: ray.init waited inside Ray's
    C++ code for ever, and Ctrl-C, SIGTERM and SIGINT again were never heard."""
    port, calls = fake_gcs("hold")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    argv = ["sweep", "--data-dir", str(synthetic_dir), *TINY, "--storage", str(tmp_path / "s"), "--address",
            f"127.0.0.1:{port}"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "tune_alexnet", *argv], env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert calls.readline().strip() == "held"  # Ray's join began, and waits
        time.sleep(3)
        assert proc.poll() is None  # held
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 1 and "Traceback" not in rest, rest[-3000:]
    assert f"--address 127.0.0.1:{port}: the cluster there did not let this process join (stopped)" in rest


@pytest.mark.parametrize("there", ["nothing", "a stranger", "no address file"])
def test_auto_joins_no_address_that_ray_found_unless_a_ray_node_of_yours_runs_it(synthetic_dir, tmp_path, there):
    """`auto` takes the address file of the last `ray start`, which outlives its cluster: Ray tried that address for
    minutes. The file lies in Ray's shared temp folder, which any user may write: another user's listener named
    there got the user's token. (Where exactly one Ray runs on the machine, Ray's `auto` joins it instead: here
    none is, as this test's own Ray is hidden from the lookup.)"""
    heard: list[bytes] = []
    with socket.create_server(("0.0.0.0", 0)) as stranger:
        port = stranger.getsockname()[1] if there == "a stranger" else free_port()
        (tmp_path / "ray").mkdir()
        if there != "no address file":  # else ray.init looked again, and took what another user put there meanwhile
            (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")

        def listen() -> None:
            stranger.settimeout(60)
            with contextlib.suppress(OSError):
                while True:
                    conn, _ = stranger.accept()
                    with conn:
                        conn.settimeout(5)
                        heard.append(conn.recv(65536))

        threading.Thread(target=listen, daemon=True).start()
        argv = ["sweep", "--data-dir", str(synthetic_dir), *TINY, "--storage", str(tmp_path / "a"), "--address",
                "auto"]  # fmt: skip
        code = (
            "import functools, sys; import ray._private.services as s; s.find_gcs_addresses = functools.cache(list); "
            f"from tune_alexnet.cli import main; sys.exit(main({argv!r}))"
        )
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        ran = subprocess.run([sys.executable, "-c", code], env={**env, "RAY_TMPDIR": str(tmp_path)},
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = [ln for ln in ran.stderr.splitlines() if ln.strip() and "decoding " not in ln]
    assert ran.returncode == 2 and len(lines) == 1, ran.stderr[-2000:]
    if there == "nothing":
        assert "--address auto: no Ray cluster answers at " in lines[0] and "(Connection refused)" in lines[0], lines
    elif there == "no address file":
        assert "--address auto: no Ray cluster to join was found on this machine (" in lines[0], lines
    else:
        assert "--address auto: no Ray node of yours on this machine runs the cluster at " in lines[0], lines
        assert f":{port}, which Ray found in its shared temp folder" in lines[0], lines
        assert heard and not any(heard), heard  # only the reachability probe's connect: not a byte, no token
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_an_address_from_ray_address_is_named_as_such_when_refused(synthetic_dir, tmp_path):
    port = free_port()  # nothing listens there
    cases = [("  ", "RAY_ADDRESS invalid value '  ': an empty address"),
             ("ray://head:10001", "RAY_ADDRESS invalid value 'ray://head:10001': Ray Client (ray://) addresses"),
             (f"127.0.0.1:{port}", f"RAY_ADDRESS 127.0.0.1:{port}: no Ray cluster answers there")]  # fmt: skip
    procs = [subprocess.Popen([sys.executable, "-m", "tune_alexnet", "sweep", "--data-dir", str(synthetic_dir),
                               "--storage", str(tmp_path / str(i)), *TINY], env={**os.environ, "RAY_ADDRESS": address},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, (address, _) in enumerate(cases)]  # fmt: skip
    for proc, (address, needle) in zip(procs, cases):
        _, err = proc.communicate(timeout=120)
        lines = [ln for ln in err.splitlines() if ln.strip() and "decoding " not in ln]
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], (address, err[-2000:])


def test_an_address_with_a_control_character_is_refused_in_one_line(capsys):
    err = one_line_exit_2(["sweep", "--address", "127.0.0.1:1\nX"], capsys)
    assert "--address: invalid value '127.0.0.1:1\\nX': a control character in it" in err, err


@pytest.mark.slow
def test_export_and_report_into_a_place_that_cannot_be_written(mixed_experiment, tmp_path, capsys):
    path, _ = mixed_experiment
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for command in ("export", "report"):
        err = one_line_exit_2([command, path, "--out", str(blocker / "sub")], capsys)
        assert f"cannot write into {blocker / 'sub'}" in err
        # a filesystem that counts no room (proc) is not a full one: its own error, not "0.00 MB free"
        err = one_line_exit_2([command, path, "--out", "/proc/tune-alexnet-tables"], capsys)
        assert "cannot write into /proc/tune-alexnet-tables (" in err and "MB" not in err, err
    # A folder all users can write without the sticky bit: another user swapped the writers' temporary files for
    # links to the user's own files, which were overwritten with the tables and made readable by all.
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    for command in ("export", "report"):
        err = one_line_exit_2([command, path, "--out", str(shared / command)], capsys)
        assert f"cannot write into {shared / command}: {shared} can be written by every user and has no sticky" in err
    assert list(shared.iterdir()) == []
    shared.chmod(0o1777)  # as /tmp: only a file's owner may rename it
    assert main(["export", path, "--out", str(shared / "export")]) == 0
    shared.chmod(0o770)  # a team's folder: said once, though the report writes the page too
    os.chown(shared, os.getuid(), 65534)
    capsys.readouterr()
    assert main(["report", path, "--out", str(shared / "report")]) == 0
    assert capsys.readouterr().err.count("which a group of other users can write (mode 0770") == 1


def test_an_out_or_storage_through_a_link_another_user_owns_is_said(mixed_experiment, synthetic_dir, tmp_path, capsys):
    """The checks of the way to --out and --storage looked at the path with its links resolved: a link of another
    user's, which they may point at any folder of the user's, was never named, and the tables went where it led."""
    path, _ = mixed_experiment
    mine = tmp_path / "mine"
    mine.mkdir()
    link = tmp_path / "theirs"
    link.symlink_to(mine)
    os.lchown(link, 65534, 65534)
    for command in ("export", "report"):
        assert main([command, path, "--out", str(link / command)]) == 0
        err = capsys.readouterr().err
        assert f"warning: {link / command} lies in {link}, which another user owns (uid 65534)" in err, err
    lines = exit_2_lines(["sweep", "--data-dir", str(synthetic_dir), *TINY, "--storage", str(link / "results"),
                          "--mlflow", "http://127.0.0.1:1"], capsys, 2)  # fmt: skip
    assert f"warning: --storage {link / 'results'} lies in {link}, which another user owns (uid 65534)" in lines[0]
    assert "--mlflow http://127.0.0.1:1" in lines[1], lines


def test_a_path_through_a_link_then_up_is_checked_where_the_kernel_takes_it(mixed_experiment, tmp_path, capsys):
    """a/link/.. is the folder above where the link leads: the checks took it, as text, for a, and let --out and
    --storage into a folder anyone could write."""
    path, _ = mixed_experiment
    open_dir = tmp_path / "open"
    (open_dir / "sub").mkdir(parents=True)
    open_dir.chmod(0o777)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "link").symlink_to(open_dir / "sub")
    through = tmp_path / "mine" / "link" / ".."
    err = one_line_exit_2(["export", path, "--out", str(through / "tables")], capsys)
    assert f"{open_dir} can be written by every user and has no sticky bit" in err, err
    assert not (open_dir / "tables").exists()
    with pytest.raises(preflight.PreflightError, match="can be written by every user"):
        preflight.check_path_to(str(through / "results"))


@pytest.mark.timeout(60)
def test_the_way_to_a_path_follows_at_most_the_kernels_40_links_and_needs_no_working_folder(tmp_path, monkeypatch):
    """Links naming two links each, 30 deep: the walk of the way to l30/../x, counting its links by depth alone,
    took 2**30 steps. And a working folder since removed made every check of an absolute path raise."""
    from tune_alexnet import cluster

    chain = tmp_path / "chain"
    chain.mkdir()
    (chain / "l0").symlink_to(".")
    for k in range(1, 31):
        (chain / f"l{k}").symlink_to(f"l{k - 1}/l{k - 1}")
    for check in (cluster.open_to_all, cluster.others_on_the_way):
        assert check(chain / "l30" / ".." / "x") is None
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    assert cluster.open_to_all(tmp_path / "x") is None and cluster.others_on_the_way(tmp_path / "x") is None
    preflight.check_path_to(str(tmp_path / "results"))


@pytest.mark.timeout(60, func_only=True)
def test_a_report_md_of_backticks_in_out_is_read_in_one_pass(mixed_experiment, tmp_path, capsys):
    """Which experiment a report in --out is of was read with a regular expression that took hours over a line of
    backticks."""
    path, _ = mixed_experiment
    for command in ("export", "report"):
        out = tmp_path / command
        out.mkdir()
        (out / "report.md").write_bytes(b"Experiment " + b"`" * 65_536)
        assert main([command, path, "--out", str(out)]) == 0, capsys.readouterr().err
        assert (out / "results.parquet").is_file() if command == "export" else (out / "report.html").is_file()


@pytest.fixture
def damaged(mixed_experiment, tmp_path):
    """A copy of a finished experiment, to break."""
    path, exp = mixed_experiment
    copy = tmp_path / "mixed"
    shutil.copytree(path, copy)
    return copy, exp.table


@pytest.mark.slow
def test_an_out_folder_holding_another_experiments_tables_is_refused_naming_both(mixed_experiment, damaged, tmp_path,
                                                                                 capsys):  # fmt: skip
    path, other = str(Path(mixed_experiment[0]).resolve()), str(damaged[0])  # the copy: another experiment
    out = tmp_path / "tables"
    assert main(["export", path, "--out", str(out)]) == 0

    def files():
        return {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}

    before = files()
    for command in ("export", "report"):
        err = one_line_exit_2([command, other, "--out", str(out)], capsys)
        assert f"{out} holds the tables of experiment {path}, not of {other}" in err
    assert files() == before  # the first experiment's tables, untouched, and nothing of the other's beside them
    assert main(["export", path, "--out", str(out)]) == 0  # its own experiment writes on
    assert main(["export", other]) == 0  # a copied folder is its own, though its tables name where they came from
    import pyarrow.parquet as pq

    meta = json.loads(pq.read_schema(Path(other) / "results.parquet").metadata[b"tune_alexnet"])
    assert meta["experiment"] == other
    reports = tmp_path / "reports"  # a report alone names its experiment too: another's is not written over it
    assert main(["report", path, "--out", str(reports)]) == 0
    before = {f.name: f.read_bytes() for f in reports.iterdir() if f.is_file()}
    err = one_line_exit_2(["report", other, "--out", str(reports)], capsys)
    assert f"{reports} holds the tables of experiment {path}, not of {other}" in err
    assert {f.name: f.read_bytes() for f in reports.iterdir() if f.is_file()} == before


def test_an_export_racing_a_sweep_opens_no_fifo_and_writes_through_no_swapped_link(damaged, tmp_path):
    """The check for newer tables opened results.parquet by name: a FIFO there blocked the export for ever. And
    the writers wrote by path: another user who could write the folder, or one on the way, swapped it (or a file
    in it) for a link between two writes, and the user's own file was overwritten."""
    from tune_alexnet import export

    copy, _ = damaged
    exp = export.load_experiment(str(copy))
    (copy / "results.parquet").unlink()
    os.mkfifo(copy / "results.parquet")
    newest = max(copy.glob("train_cifar_*/result.json"))
    os.utime(newest, ns=(time.time_ns(), time.time_ns()))  # the sweep reported since the read
    answered: list[bool] = []
    with export.output_dir(copy, exp) as out:
        reader = threading.Thread(target=lambda: answered.append(out.newer_than(exp)), daemon=True)
        reader.start()
        reader.join(timeout=20)
    assert answered == [False]  # an answer, at once: no table of ours there
    # Another user's folder (here: --out), swapped for a link to one of the user's own between two writes, as
    # their inotify loop did: the writes went by path, and the user's own report.html was overwritten.
    theirs, mine = tmp_path / "pub" / "theirs", tmp_path / "mine"
    theirs.mkdir(parents=True)
    mine.mkdir()
    (mine / "report.html").write_text("mine")
    with export.output_dir(theirs) as out:
        out.put("report.md", b"first")
        theirs.rename(tmp_path / "pub" / "moved")
        theirs.symlink_to(mine)
        out.put("report.html", b"second")
    assert sorted(p.name for p in mine.iterdir()) == ["report.html"] and (mine / "report.html").read_text() == "mine"
    moved = tmp_path / "pub" / "moved"
    assert (moved / "report.html").read_text() == "second" and (moved / "report.md").read_text() == "first"
    with pytest.raises(export.ExportError, match=rf"^cannot write into {theirs} \(Not a directory\)"):
        with export.output_dir(theirs):  # the next write (the live page's, 30 s on) follows no link put there
            pass
    assert sorted(p.name for p in mine.iterdir()) == ["report.html"]


def test_files_nested_past_pythons_stack_are_damaged_ones_not_a_traceback(tmp_path):
    """JSON nested 100,000 deep raises RecursionError, not ValueError: a results.parquet of that metadata in an
    --out folder was a traceback from export and report, and an experiment state of it one from --resume."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tune_alexnet import export
    from tune_alexnet.resume import state_is_whole

    deep = b"[" * 100_000 + b"]" * 100_000
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"a": [1]}).replace_schema_metadata({b"tune_alexnet": deep}), out / "results.parquet")
    with export.output_dir(out) as written:
        assert written.table_metadata() == {} and written.tables_of() is None  # not ours: replaced like any such
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "experiment_state-2026-01-01_00-00-00.json").write_bytes(b'{"trial_data": ' + deep + b"}")
    assert state_is_whole(str(tmp_path / "exp")) is False  # read as a state cut short: its kept copy is put back


def test_report_md_shows_the_experiments_own_words_as_text(damaged, tmp_path):
    """The title (the folder's name), the data's source and the experiment's path went into report.md as they
    were: a folder another user named, or a settings record they wrote, put HTML into a Markdown viewer."""
    copy, _ = damaged
    planted = "<img src=x onerror=alert(1)>"
    named = copy.parent / f"e`{planted}"
    copy.rename(named)
    record = json.loads((named / "tune_alexnet_sweep.json").read_text())
    record["data"]["source"] = planted
    (named / "tune_alexnet_sweep.json").write_text(json.dumps(record))
    out = tmp_path / "reports"
    assert main(["report", str(named), "--out", str(out)]) == 0
    assert main(["export", str(named), "--out", str(out)]) == 0  # the report there is its own, read back from its span
    text = (out / "report.md").read_text()
    span = f"Experiment `` {named} ``: "  # a code span shows all inside it as text
    assert span in text and "<img" not in text.replace(span, ""), text[:2000]
    assert text.count("&lt;img src=x onerror=alert(1)&gt;") == 2  # the title and the data's source


def test_two_paths_to_two_folders_are_two_outs_and_files_take_the_users_umask(tmp_path, monkeypatch):
    """The links of an --out are resolved once a process, by the path as given: `L/../o` (L a link) and `o` were
    taken for one, and the second's files went into the first's folder. And a file's mode came from setting the
    umask of the whole process to 0 for a moment: a file another thread made meanwhile was open to all."""
    from tune_alexnet import export

    (tmp_path / "deep" / "dir").mkdir(parents=True)
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "L").symlink_to("../deep/dir")
    monkeypatch.chdir(tmp_path / "cwd")
    for given in ("L/../o", "o"):
        with export.output_dir(given) as out:
            out.put("made.txt", given.encode())
    assert (tmp_path / "deep" / "o" / "made.txt").read_text() == "L/../o"
    assert (tmp_path / "cwd" / "o" / "made.txt").read_text() == "o"
    umask = os.umask(0o027)
    try:
        with monkeypatch.context() as m:
            m.setattr(os, "umask", lambda *_: pytest.fail("the umask was set: for every thread of the process"))
            with export.output_dir("o") as out:
                out.put("mode.txt", b"x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "cwd" / "o" / "mode.txt").stat().st_mode) == 0o640


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_during_an_export_leaves_no_file_in_the_making(damaged, tmp_path, monkeypatch, capsys, sig):
    """export and report heeded Ctrl-C alone: a SIGTERM or SIGHUP (a closed terminal) mid-write left the
    temporary file, the lock file and the folder the command had made."""
    replace = os.replace

    def signalled(*args, **kwargs):  # the signal lands as a table is put in place
        os.kill(os.getpid(), sig)
        return replace(*args, **kwargs)

    monkeypatch.setattr(os, "replace", signalled)
    out = tmp_path / "new" / "out"
    assert main(["export", str(damaged[0]), "--out", str(out)]) == 1
    assert "tune-alexnet export: interrupted; no file is half-written" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # the folders it made, and nothing in them


def test_a_relative_path_from_a_working_folder_removed_is_one_line(tmp_path, monkeypatch, capsys):
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    for argv in (["export", "rel", "--out", "o"], ["sweep", "--data-dir", "/nonexistent"]):  # --storage's default
        err = one_line_exit_2(argv, capsys)
        assert "No such file or directory for the working folder, which a relative path starts from" in err, err


@pytest.mark.slow
def test_a_report_of_a_long_path_names_its_experiment_to_the_next_writer(damaged, mixed_experiment, tmp_path, capsys):
    """The line naming the experiment was read in the report's first 4096 bytes: past them (a long path), another
    experiment's report was written over it in a shared --out."""
    room = 3896 - len(str(tmp_path))  # 3,900 characters whatever the temporary folder: the line ends past 4096
    long = tmp_path.joinpath(*["d" * 200] * (room // 201), "e" * (room % 201 or 1), "exp")
    long.parent.mkdir(parents=True)
    damaged[0].rename(long)
    out = tmp_path / "reports"
    assert main(["report", str(long), "--out", str(out)]) == 0
    text = (out / "report.md").read_bytes()
    assert text.index(str(long).encode()) + len(str(long)) > 4096  # the line ends past the old limit
    err = one_line_exit_2(["export", str(mixed_experiment[0]), "--out", str(out)], capsys)  # (read as report reads)
    assert f"holds the tables of experiment {long}, not of " in err, err


def test_a_question_mark_in_a_local_folder_is_part_of_its_name(damaged, tmp_path, capsys):
    """Local paths were cut at '?' as if a bucket URI's query followed: report ended in a StopIteration traceback
    (its report.md not found among the files written), the study page was left stale, and the tables named the
    experiment 'what'."""
    exp = tmp_path / "what?"
    damaged[0].rename(exp)
    for argv in (["report", str(exp)], ["report", str(exp), "--out", str(tmp_path / "out?x")], ["export", str(exp)]):
        assert main(argv) == 0, argv
        assert "Traceback" not in capsys.readouterr().err
    assert (tmp_path / "out?x" / "report.html").is_file() and (exp / "report.html").is_file()
    assert (exp / "report.md").read_text().startswith("# Report: what?\n")
    assert set(pd.read_parquet(exp / "results.parquet")["experiment"]) == {"what?"}


def test_a_path_whose_link_leads_to_a_newline_is_refused_as_the_path_itself(damaged, mixed_experiment, tmp_path,
                                                                             capsys):  # fmt: skip
    """The tables, the report and the console name an experiment by the place its links lead to: reached through
    a link, a folder with a newline (or U+202E) was printed raw over two lines, and written so into the tables."""
    odd = tmp_path / "two\nlines\u202e"
    damaged[0].rename(odd)
    (tmp_path / "exp").symlink_to(odd)
    (tmp_path / "out").symlink_to(odd)
    before = {p.name: p.stat().st_mtime_ns for p in odd.iterdir()}
    for argv in (["report", str(tmp_path / "exp")], ["export", str(tmp_path / "exp")],
                 ["export", str(mixed_experiment[0]), "--out", str(tmp_path / "out" / "tables")]):  # fmt: skip
        err = one_line_exit_2(argv, capsys)
        assert "it holds a control character, as " in err and "two\\nlines\\u202e" in err, err
    assert {p.name: p.stat().st_mtime_ns for p in odd.iterdir()} == before  # nothing written, no folder made


def test_an_out_or_storage_1100_folders_deep_is_made_without_running_past_pythons_stack(mixed_experiment, tmp_path,
                                                                                         capsys):  # fmt: skip
    """pathlib and os.makedirs recurse once a folder: a path of 1,100 short names (2,200 characters, within
    PATH_MAX) was a RecursionError of 7,000 lines, for export, report and sweep alike."""
    from tune_alexnet.preflight import lock_experiment

    deep = tmp_path.joinpath(*["y"] * 1100)
    assert main(["export", mixed_experiment[0], "--out", str(deep / "tables")]) == 0
    assert main(["report", mixed_experiment[0], "--out", str(deep / "report")]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert (deep / "tables" / "results.parquet").is_file() and (deep / "report" / "report.md").is_file()
    lock = lock_experiment(str(deep / "storage"), "x")  # where a sweep takes its experiment's lock
    assert (deep / "storage" / ".x.lock").exists()
    lock.release()
    subprocess.run(["rm", "-rf", str(tmp_path / "y")], check=True)  # pytest's own removal recurses once a folder


def test_a_matplotlibrc_in_the_working_folder_does_not_restyle_the_report(mixed_experiment, tmp_path):
    """matplotlib reads ./matplotlibrc at its import: another user's working folder turned every figure green."""
    import numpy as np
    from PIL import Image

    (tmp_path / "matplotlibrc").write_text("savefig.facecolor: 00ff00\nfigure.facecolor: 00ff00\n")
    done = subprocess.run([sys.executable, "-m", "tune_alexnet", "report", mixed_experiment[0], "--out", "out"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    corner = np.asarray(Image.open(tmp_path / "out" / "heatmaps.png").convert("RGB"))[2, 2]
    assert tuple(corner) == (255, 255, 255), corner  # matplotlib's own white


def test_folders_named_like_secrets_stay_apart(mixed_experiment, tmp_path, capsys):
    """Local paths are never redacted: /a/monkey=1 and /a/monkey=2 both read monkey=*** once, and the second
    experiment's tables then replaced the first's in a shared --out."""
    first, second = tmp_path / "monkey=1" / "x", tmp_path / "monkey=2" / "x"
    for copy in (first, second):
        shutil.copytree(mixed_experiment[0], copy)
    out = tmp_path / "tables"
    assert main(["export", str(first), "--out", str(out)]) == 0
    err = one_line_exit_2(["export", str(second), "--out", str(out)], capsys)
    assert f"{out} holds the tables of experiment {first}, not of {second}" in err, err


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
    # Without the whole copy a sweep keeps beside it (one from before it kept one, or lost with it), a resume is
    # refused with the way on; with it, the copy is put back (the captured-step resume test).
    shutil.rmtree(copy / STATE_COPIES)
    err = one_line_exit_2(["sweep", "--resume", "--name", "mixed", "--storage", str(copy.parent)], capsys)
    assert "the experiment state of 'mixed' is damaged" in err and "tune-alexnet export" in err
    assert sorted(p.name for p in copy.glob("experiment_state-*.json")) == states  # nothing newer hides it


def test_a_resume_never_unpickles_an_experiment_another_user_could_have_written(damaged, capsys, tmp_path,
                                                                                monkeypatch):  # fmt: skip
    """Tune's restore unpickles the experiment's files: a planted state would run its code as the user. Without
    --name, such a folder is passed over; named, it is refused before anything of it is read."""
    copy, _ = damaged
    ran = tmp_path / "ran"
    payload = {"_type": "CLOUDPICKLE_FALLBACK", "value": pickle.dumps(_Touch(str(ran))).hex()}
    state = sorted(copy.glob("experiment_state-*.json"))[-1]
    state.write_text(json.dumps({**json.loads(state.read_text()), "planted": payload}))
    own = copy.parent / "own"  # an older experiment of the user's own, unfinished, its tuner.pkl torn: a refusal
    shutil.copytree(copy, own)  # that names it, before it is resumed
    (own / "results.parquet").unlink()
    (own / "tuner.pkl").write_bytes(b"\x80")
    os.utime(own, (1, 1))
    resume = ["sweep", "--resume", "--storage", str(copy.parent)]
    pickled = copy / "tuner.pkl"
    for planted, why in [(pickled, "can be written by every user (mode 0666; if it is yours: chmod o-w)"),
                         (copy, "can be written by every user (mode 0777; if it is yours: chmod o-w)"),
                         (pickled, "is a symbolic link, which a sweep never makes")]:  # fmt: skip
        if "link" in why:
            pickled.rename(tmp_path / "elsewhere.pkl")
            pickled.symlink_to(tmp_path / "elsewhere.pkl")
        else:
            planted.chmod(0o777 if planted.is_dir() else 0o666)
        err = one_line_exit_2([*resume, "--name", "mixed"], capsys)
        assert f"--resume: {planted} {why}, and resuming unpickles Tune's files in it" in err, err
        assert "allowed: an experiment only you can write" in err
        err = "\n".join(exit_2_lines(resume, capsys, 2))  # the newest is passed over, saying so: the user's own next
        assert err.startswith(f"tune-alexnet: --resume passes over experiment 'mixed': {planted} {why}\n"), err
        assert f"--resume: {own / 'tuner.pkl'}, Tune's record of the sweep's settings, is damaged" in err, err
        if not planted.is_symlink():
            planted.chmod(0o755 if planted.is_dir() else 0o644)
    real = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: real + 1)  # as another user sees them
    err = one_line_exit_2([*resume, "--name", "own"], capsys)
    assert f"--resume: {own} belongs to another user (uid {real})" in err, err
    err = "\n".join(exit_2_lines(resume, capsys, 3))
    assert "holds no experiment of yours to resume (passed over, not yours alone: mixed, own)" in err, err
    assert not ran.exists()


@pytest.mark.parametrize("where", ["a trial folder", "a checkpoint folder", "a trial's result.json"])
def test_a_resume_refuses_an_experiment_with_anything_another_user_could_swap(damaged, capsys, where):
    """A resume appends to the trials' files: in a folder every user can write, another could swap result.json
    for a link to a file of theirs between the checks and the appends, and the trial's rows went there."""
    copy, _ = damaged
    trial = sorted(copy.glob("train_cifar_*"))[0]
    opened = {"a trial folder": trial, "a checkpoint folder": next(trial.glob("checkpoint_*")),
              "a trial's result.json": trial / "result.json"}[where]  # fmt: skip
    opened.chmod(0o777 if opened.is_dir() else 0o666)
    err = one_line_exit_2(["sweep", "--resume", "--name", "mixed", "--storage", str(copy.parent)], capsys)
    mode = "0777" if opened.is_dir() else "0666"
    assert f"--resume: {opened} can be written by every user (mode {mode}; if it is yours: chmod o-w)" in err, err


@pytest.mark.parametrize("refused", ["a flag changed", "Ray's settings", "resources Ray lacks"])
def test_a_refused_resume_writes_nothing(damaged, capsys, tmp_path, refused):
    """The mending of a cut result line, and the removal of W&B's links, ran before the check of the flags given,
    of Ray's settings or of the resources asked for, which then refused the resume."""
    copy, _ = damaged
    trial = sorted(copy.glob("train_cifar_*"))[0]
    result = trial / "result.json"
    result.write_bytes(result.read_bytes()[:-20])  # cut inside its last line, as a kill leaves it
    (tmp_path / "core.log").write_text("w&b")
    (trial / "wandb" / "offline-run-1" / "logs").mkdir(parents=True)
    (trial / "wandb" / "offline-run-1" / "logs" / "debug-core.log").symlink_to(tmp_path / "core.log")  # W&B's link

    def everything() -> dict:
        return {p: os.readlink(p) if p.is_symlink() else p.read_bytes() for p in copy.rglob("*") if not p.is_dir()}

    before = everything()
    argv = ["sweep", "--resume", "--name", "mixed", "--storage", str(copy.parent)]
    if refused == "a flag changed":
        err = one_line_exit_2([*argv, "--epochs", "41"], capsys)
        assert "--epochs" in err, err
    elif refused == "resources Ray lacks":  # this process's Ray has no GPU
        err = one_line_exit_2([*argv, "--gpus-per-trial", "1"], capsys)
        assert "GPU" in err, err
    else:  # a process of its own, as a user runs it: this one has joined a Ray already
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}
        done = subprocess.run([sys.executable, "-m", "tune_alexnet", *argv], capture_output=True, text=True, env=env,
                              timeout=120)  # fmt: skip
        assert done.returncode == 2 and "RAY_AUTH_MODE=disabled" in done.stderr, done.stderr[-3000:]
    assert everything() == before


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["no runner data", "a run config of another type"])
def test_a_resume_tune_cannot_restore_is_refused_before_it_trains_anything_afresh(damaged, capsys, damage):
    """Where Tune's restore fails on a state the checks before it pass (here one without its runner data), Tune
    logs so and starts the experiment afresh: a trial of an empty config failed, the finished trial's row said
    "unknown", and a newer state of new trials lay over the one it could not read. A record of the sweep
    (tuner.pkl) of Tune's keys but not of what Tune writes failed Tuner.restore itself, in a traceback."""
    from ray import cloudpickle

    copy, _ = damaged
    if damage == "no runner data":
        (state_file,) = copy.glob("experiment_state-*.json")
        state = json.loads(state_file.read_text())
        del state["runner_data"]
        state_file.write_text(json.dumps(state))
        cause = "KeyError: 'runner_data'"
    else:
        record = cloudpickle.loads((copy / "tuner.pkl").read_bytes())
        (copy / "tuner.pkl").write_bytes(cloudpickle.dumps({**record, "_run_config": {"x": 1}}))
        cause = "AttributeError: "
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file() and p.name != "driver.log"}
    err = one_line_exit_2(["sweep", "--resume", "--name", "mixed", "--storage", str(copy.parent)], capsys)
    assert f"Tune could not restore experiment 'mixed' from its state ({cause}" in err, err
    assert "its state and tables are left as they were" in err and f"tune-alexnet export {copy}" in err
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file() and p.name != "driver.log"} == before


@pytest.mark.slow
def test_a_state_tune_restores_but_then_fails_on_stops_in_one_line_with_its_traceback_kept(damaged, capsys):
    """Tune takes its runner data as it lies: an iteration count of another type passed its restore, then broke its
    first step, in a traceback on the console. Whatever error ends a sweep is one line, with the traceback kept
    in driver.log and the tables written."""
    copy, _ = damaged
    (state_file,) = copy.glob("experiment_state-*.json")
    state = json.loads(state_file.read_text())
    state["runner_data"]["_iteration"] = "x"
    state_file.write_text(json.dumps(state))
    assert main(["sweep", "--resume", "--name", "mixed", "--storage", str(copy.parent)]) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("tune-alexnet sweep: error: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("tune-alexnet sweep: error: the sweep stopped on an error (TypeError: "), err
    assert f"its traceback is in {copy}/driver.log" in lines[0] and f"tune-alexnet export {copy}" in lines[0]
    log = (copy / "driver.log").read_text()
    assert "ERROR tune_alexnet: Traceback (most recent call last):" in log and "_iteration" in log, log[-3000:]
    assert (copy / "results.parquet").is_file()


def test_a_wandb_run_that_cannot_be_written_neither_blocks_a_resume_nor_breaks_its_mending(tmp_path):
    """A teammate's W&B run (or one made read-only) two levels down was "cannot be written", and a W&B link in a
    folder that could not be written was a PermissionError from the mending. Old runs are only ever read."""
    exp = tmp_path / "exp"
    trial = exp / "train_cifar_1_00000_0"
    logs = trial / "wandb" / "offline-run-1" / "logs"
    logs.mkdir(parents=True)
    (trial / "result.json").write_text("")
    (logs / "debug-core.log").symlink_to("/dev/null")
    for folder in (logs, logs.parent):
        folder.chmod(0o555)
    code = (
        "import sys; from tune_alexnet import preflight, tracking; exp, trial = sys.argv[1:]; "
        "print(preflight._unwritable(exp, list(preflight._entries(exp)))); tracking.remove_wandb_links([trial]); "
        "(__import__('pathlib').Path(trial) / 'result.json').chmod(0o444); "
        "print(preflight._unwritable(exp, list(preflight._entries(exp))))"
    )
    done = subprocess.run([*NO_OVERRIDE, sys.executable, "-c", code, str(exp), str(trial)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.stdout.split() == ["None", str(trial / "result.json")], done.stdout + done.stderr[-2000:]
    assert (logs / "debug-core.log").is_symlink()  # left where it could not be removed: nothing follows it


def test_wandb_links_are_removed_from_a_tree_deeper_than_pythons_stack(tmp_path):
    """os.walk recursed once a level: a trial's wandb folder 1,200 deep was a RecursionError's traceback on
    --resume, after Ray had started."""
    from tune_alexnet.storage import make_folders
    from tune_alexnet.tracking import remove_wandb_links

    trial = tmp_path / "train_cifar_1_00000_0"
    deep = trial.joinpath("wandb", *["d"] * 1200)
    make_folders(deep)  # (pathlib's mkdir recurses too)
    (deep / "debug-core.log").symlink_to("/dev/null")
    remove_wandb_links([str(trial)])
    assert not os.path.lexists(deep / "debug-core.log")
    subprocess.run(["rm", "-rf", str(trial)], check=True)  # pytest's own removal recurses once a folder


def test_a_teammates_tables_and_wandb_sync_do_not_block_a_resume(damaged, capsys):
    """A group member's export, report or 'wandb sync' leaves files of theirs in the experiment: the sweep replaces
    its tables whole and never touches old W&B runs, so only what a resume reads or appends to must be the user's."""
    copy, _ = damaged
    trial = sorted(copy.glob("train_cifar_*"))[0]
    (trial / "wandb" / "offline-run-1").mkdir(parents=True)
    theirs = [copy / "results.parquet", copy / "report.md", trial / "wandb" / "offline-run-1" / "run-1.wandb.synced"]
    theirs[-1].write_text("")
    for path in theirs:
        os.chown(path, 65534, 65534)
    assert preflight._not_yours(str(copy)) is None
    os.chown(result := trial / "result.json", 65534, 65534)  # what a resume appends to: refused
    err = one_line_exit_2(["sweep", "--resume", "--name", "mixed", "--storage", str(copy.parent)], capsys)
    assert f"--resume: {result} belongs to another user (uid 65534)" in err, err


def test_a_cut_search_state_with_no_whole_copy_is_refused(damaged, capsys):
    """Tune's restore, failing to load it, started the search afresh: trials of empty configs, failing every try."""
    copy, _ = damaged
    search = sorted(copy.glob("basic-variant-state-*.json"))[-1]
    search.write_bytes(search.read_bytes()[:-5])
    for kept in (copy / STATE_COPIES).glob("basic-variant-state-*.json"):
        kept.unlink()
    result = sorted(copy.glob("train_cifar_*"))[0] / "result.json"
    result.write_bytes(result.read_bytes()[:-20])  # a cut line too: refused before it is mended
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    err = one_line_exit_2(["sweep", "--resume", "--name", "mixed", "--storage", str(copy.parent)], capsys)
    assert f"--resume: {search}, Tune's record of its search, is damaged (cut short, and no whole copy" in err, err
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("shut", ["tuner.pkl", "a trial's result.json", "the kept states"])
def test_a_resume_of_an_experiment_you_cannot_read_says_so(damaged, shut):
    """As a user without root's override: an unreadable state or tuner record was a traceback, or 'damaged'
    with advice to start afresh; an unreadable folder of kept states was passed over without a word."""
    copy, _ = damaged
    closed = {"tuner.pkl": copy / "tuner.pkl", "a trial's result.json": sorted(copy.glob("train_cifar_*"))[0]
              / "result.json", "the kept states": copy / STATE_COPIES}[shut]  # fmt: skip
    if shut == "the kept states":
        closed.mkdir(exist_ok=True)
    closed.chmod(0)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([*NO_OVERRIDE, sys.executable, "-m", "tune_alexnet", "sweep", "--resume", "--name", "mixed",
                           "--storage", str(copy.parent)], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0] == (f"tune-alexnet sweep: error: --resume: {closed} cannot be read (its mode, or its owner, keeps "
                        "you out); once it can, the same command continues experiment 'mixed'"), lines  # fmt: skip


class _Touch:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("size", [0, 10], ids=["empty", "cut short"])
def test_resume_of_an_experiment_whose_tuner_record_is_torn_is_one_line(damaged, capsys, size):
    """Tune unpickles tuner.pkl after Ray has started, and a torn one was a traceback."""
    copy, _ = damaged
    pickled = copy / "tuner.pkl"
    pickled.write_bytes(pickled.read_bytes()[:size])
    err = one_line_exit_2(["sweep", "--resume", "--name", "mixed", "--storage", str(copy.parent)], capsys)
    assert f"{pickled}, Tune's record of the sweep's settings, is damaged (" in err and "tune-alexnet export" in err


def _outside(copy: Path) -> str:
    """A trial of the newest experiment state pointed at a folder outside the experiment (Tune's pickled storage)."""
    from tune_alexnet.resume import _pickled, _unpickled

    state = sorted(copy.glob("experiment_state-*.json"))[-1]
    data = json.loads(state.read_text())
    trial = json.loads(data["trial_data"][0][0])
    storage = _unpickled(trial["storage"])
    storage.trial_dir_name = "../../outside"
    trial["storage"] = _pickled(storage)
    data["trial_data"][0][0] = json.dumps(trial)
    state.write_text(json.dumps(data))
    return f"{state}: trial {trial['trial_id']!r} names the folder '../../outside', outside the experiment"


def _a_trial_twice(copy: Path) -> str:
    """A trial's entry twice in the newest state: both ran in one folder, and Tune waited on one for ever."""
    state = sorted(copy.glob("experiment_state-*.json"))[-1]
    data = json.loads(state.read_text())
    data["trial_data"].append(data["trial_data"][0])
    state.write_text(json.dumps(data))
    return f"{state}: two trials name the trial id {json.loads(data['trial_data'][0][0])['trial_id']!r}"


def _no_trials(copy: Path) -> str:
    state = sorted(copy.glob("experiment_state-*.json"))[-1]
    state.write_text(json.dumps({**json.loads(state.read_text()), "trial_data": []}))
    reported = [p for p in copy.glob("*/result.json") if p.stat().st_size]
    assert reported
    return f"{state} names no trials, yet {len(reported)} trial folder(s) hold results"


def _pickled_over(name: str, value, what: str):
    def tamper(copy: Path) -> str:
        path = sorted(copy.glob(name))[-1]
        path.write_bytes(pickle.dumps(value))
        return f"{path} holds {what}"

    return tamper


WRONG_STATES = {
    "tuner record of another shape": _pickled_over("tuner.pkl", {}, "a dict of 0 item(s), not Tune's record of a sweep"),
    "tuner record a list": _pickled_over("tuner.pkl", [1, 2], "a list of 2 item(s), not Tune's record of a sweep"),
    "search state empty": _pickled_over("basic-variant-state-*.json", {}, "a dict of 0 item(s), not Tune's record of "
                                        "its search"),
    "no trials": _no_trials,
    "a trial folder outside": _outside,
    "a trial twice": _a_trial_twice,
}  # fmt: skip


@pytest.mark.parametrize("case", list(WRONG_STATES), ids=list(WRONG_STATES))
def test_a_resume_refuses_a_state_that_is_whole_but_not_what_tune_writes(case, damaged, tmp_path, capsys):
    """Tune's restore failed with a traceback, started a trial of empty config in place of the experiment's (a
    newer state then lost them for every later resume), or wrote a trial's files outside the experiment."""
    copy, _ = damaged
    said = WRONG_STATES[case](copy)
    shutil.rmtree(copy / STATE_COPIES, ignore_errors=True)  # no whole copy to put back: what is there is read
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    err = one_line_exit_2(["sweep", "--resume", "--name", "mixed", "--storage", str(copy.parent)], capsys)
    assert f"--resume: the experiment's state is damaged: {said}; what finished is in 'tune-alexnet export" in err, err
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "outside").exists()


@pytest.mark.timeout(60, func_only=True)  # Tune's own reader would block on the FIFO for ever
def test_resume_of_an_experiment_state_that_is_a_fifo_is_refused_at_once(damaged, capsys):
    copy, _ = damaged
    state = sorted(copy.glob("experiment_state-*.json"))[-1]
    state.unlink()
    os.mkfifo(state)
    err = one_line_exit_2(["sweep", "--resume", "--name", "mixed", "--storage", str(copy.parent)], capsys)
    assert f"--resume: {state} is a FIFO, which a sweep never makes; what finished is in 'tune-alexnet export" in err


@pytest.mark.parametrize("odd", ["a file named as a checkpoint folder", "a result.json past the limit",
                                 "a folder named as the newest state", "a folder in place of progress.csv",
                                 "a trial's wandb folder as a link", "a file as the kept states",
                                 "a result.json of many short lines"])  # fmt: skip
def test_resume_refuses_files_a_sweep_never_makes_in_a_trial_folder(damaged, capsys, odd):
    """Tune would fail the trial at every try making that folder, or read the whole file into memory (20 GB); a
    folder named as a file was a traceback, or a trial failed at every try."""
    from tune_alexnet.export import load_experiment
    from tune_alexnet.storage import RESULT_LIMIT, RESULT_LINES

    copy, _ = damaged
    trial = sorted(copy.glob("train_cifar_*"))[0]
    if odd == "a file as the kept states":  # the sweep kept no whole copy of Tune's states, silently
        shutil.rmtree(copy / STATE_COPIES, ignore_errors=True)
        (copy / STATE_COPIES).write_text("x")
        said = f"{copy / STATE_COPIES} is a file named as the folder of kept states"
    elif odd.startswith("a file"):
        (trial / "checkpoint_000099").write_text("x")
        said = f"{trial}/checkpoint_000099 is a file named as a checkpoint folder"
    elif odd.endswith("as a link"):  # Ray's W&B actor writes the resumed runs through it
        (copy.parent / "elsewhere").mkdir()
        (trial / "wandb").symlink_to(copy.parent / "elsewhere")
        said = f"{trial}/wandb is a symbolic link"
    elif odd.startswith("a folder"):
        folder = copy / "experiment_state-2099-01-01_00-00-00.json" if "state" in odd else trial / "progress.csv"
        folder.unlink(missing_ok=True)
        folder.mkdir()
        said = f"{folder} is a folder named as a file"
    elif odd.endswith("many short lines"):  # within the size limit, yet each line a row: GBs on a resume
        (trial / "result.json").write_text("{}\n" * (RESULT_LINES + 1))
        said = f"{trial}/result.json holds more than 100,000 lines (Tune would read each into a table, GBs in all)"
    else:
        os.truncate(trial / "result.json", RESULT_LIMIT + 1)  # sparse: no room taken
        said = f"{trial}/result.json holds 64.0 MiB, more than 64 MiB (Tune would read it whole)"
    err = one_line_exit_2(["sweep", "--resume", "--name", "mixed", "--storage", str(copy.parent)], capsys)
    assert f"--resume: {said}, which a sweep never makes; what finished is in 'tune-alexnet export" in err
    if odd.endswith("many short lines"):  # and the tables read none of it, naming why
        errors = load_experiment(str(copy)).table.set_index("status")["error"]
        assert errors["damaged"].endswith("/result.json holds more than 100,000 lines; a trial writes one an epoch")


@pytest.mark.slow  # a driver of its own, with its own Ray
def test_a_sigterm_while_ray_stops_its_processes_is_still_ignored_as_the_tables_are_written():
    """Ray's core worker, shut down, puts SIGTERM back to the default: one arriving while Ray then stopped its
    processes (seconds) killed the driver before the sweep's last tables. Here it arrives at that very moment."""
    code = """
import os, signal, time, ray
from ray._private import node
from tune_alexnet.plan import Plan
ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level=40)
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)  # as the command line sets them while it stops Ray and writes the tables
kill = node.Node.kill_all_processes
def signalled(self, *a, **k):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)
    return kill(self, *a, **k)
node.Node.kill_all_processes = signalled
Plan(None, "", "", None, {}, 0, None, started_ray=True).stop_ray()
print("tables written")
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "tables written", (done.returncode, done.stderr[-2000:])


def test_resume_refuses_an_experiment_of_more_files_than_its_checks_walk(damaged, capsys):
    """The checks walked the first 100,000 entries and passed over the rest: a FIFO past them blocked the resume
    for ever, Ctrl-C and SIGTERM held back; a link past them took its appends into another user's file."""
    copy, _ = damaged
    trial = sorted(copy.glob("train_cifar_*"))[0]
    (trial / "junk").mkdir()
    for i in range(100_001):
        os.close(os.open(trial / "junk" / str(i), os.O_CREAT | os.O_WRONLY, 0o644))
    (trial / "progress.csv").unlink()
    os.mkfifo(trial / "progress.csv")
    err = one_line_exit_2(["sweep", "--resume", "--name", "mixed", "--storage", str(copy.parent)], capsys)
    assert f"{copy} holds more than 100,000 files and folders, which no sweep makes" in err, err


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
    resume = [*args[:4], "--resume", "--name", "held", "--storage", str(tmp_path)]
    seconds = [subprocess.Popen(again, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for again in (args, resume)]  # fmt: skip
    for second in seconds:
        _, second_err = second.communicate(timeout=120)
        assert second.returncode == 2, second_err[-2000:]
        line = second_err.strip().splitlines()[-1]
        assert f"experiment 'held' in {tmp_path} is in use by a sweep (pid {first.pid} on " in line, line
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert len(pd.read_parquet(tmp_path / "held" / "results.parquet")) == 1
    assert not (tmp_path / ".held.lock").exists()  # released
    # --quiet: our summary alone, none of Ray's lines (its token notice, its warnings) and no progress table.
    assert err == "" and out.startswith("tune-alexnet: experiment ") and "WARNING" not in out, out + err
    assert not any(line.startswith("[") for line in out.splitlines()), out


@pytest.mark.slow
def test_resume_without_a_name_takes_the_newest_unfinished_experiment(mixed_experiment, tmp_path):
    from tune_alexnet.preflight import PreflightError
    from tune_alexnet.preflight import latest_experiment as _latest_experiment

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
    assert f"--storage {small_disk} has 21 MB free but this sweep needs about 68 MB (6 trial(s) keep 2 MB" in err
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


# --- refused before anything starts: links, long paths, unknown places, a name with nothing in it ----------

TINY = ["--optimizer", "sgd", "--lr", "0.01", "--batch-size", "32", "--dropout", "true", "--batchnorm", "true",
        "--width", "0.125", "--epochs", "1"]  # fmt: skip


@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_a_planted_lock_link_redirects_no_write(link, synthetic_dir, tmp_path, capsys):
    storage, victim = tmp_path / "shared", tmp_path / "victim.txt"
    storage.mkdir()
    victim.write_text("precious")
    (storage / ".study.lock").symlink_to(victim) if link == "symbolic" else (storage / ".study.lock").hardlink_to(
        victim
    )
    err = one_line_exit_2(["sweep", "--data-dir", str(synthetic_dir), "--storage", str(storage), "--name", "study",
                           *TINY], capsys)  # fmt: skip
    kind = "a symbolic link" if link == "symbolic" else "a file with 2 names"
    assert f"the lock file {storage / '.study.lock'} is {kind}, which tune-alexnet never makes" in err
    assert victim.read_text() == "precious" and sorted(p.name for p in storage.iterdir()) == [".study.lock"]


def test_an_experiment_name_that_is_a_link_elsewhere_is_refused(synthetic_dir, tmp_path, capsys):
    storage, elsewhere = tmp_path / "shared", tmp_path / "elsewhere"
    storage.mkdir()
    elsewhere.mkdir()
    (storage / "study").symlink_to(elsewhere)
    err = one_line_exit_2(["sweep", "--data-dir", str(synthetic_dir), "--storage", str(storage), "--name", "study",
                           *TINY], capsys)  # fmt: skip
    assert f"{storage / 'study'} is a symbolic link; allowed: a --name that is not taken" in err
    assert list(elsewhere.iterdir()) == []


def test_a_storage_where_anyone_could_swap_the_experiment_is_refused(damaged, synthetic_dir, capsys):
    """Another user renamed the experiment away between the resume's checks and Tune's reads, and put one of
    theirs in its place: Tune unpickled their tuner.pkl. A fresh sweep wrote through the links they planted."""
    copy, _ = damaged
    shared = copy.parent  # the storage of the copied experiment, open to all
    shared.chmod(0o777)
    ran = shared / "ran"  # a tuner.pkl as another user would plant it: refused before anything is unpickled
    (copy / "tuner.pkl").write_bytes(pickle.dumps(_Touch(str(ran))))
    (shared / ".mixed.lock").symlink_to(ran)  # the lock file is not even opened on such a path
    fresh = ["--data-dir", str(synthetic_dir), *TINY, "--storage", str(shared / "results")]
    for args, storage in (
        (fresh, shared / "results"),
        (["--resume", "--name", "mixed", "--storage", str(shared)], shared),
    ):
        err = one_line_exit_2(["sweep", *args], capsys)
        assert f"--storage {storage}: {shared} can be written by every user and has no sticky bit (mode 0777)" in err
        assert f"allowed: a storage on a path not open to all (chmod o-w {shared}, or chmod +t" in err, err
    assert not (shared / "results").exists() and not ran.exists()
    (shared / ".mixed.lock").unlink()
    shared.chmod(0o1777)  # the sticky bit: only an entry's owner may rename it
    preflight.check_path_to(str(shared))
    shared.chmod(0o770)  # a team's folder: said, not refused
    os.chown(shared, os.getuid(), 65534)
    preflight.check_path_to(str(shared))
    assert (
        f"lies in {shared}, which a group of other users can write (mode 0770, no sticky bit)"
        in capsys.readouterr().err
    )
    shared.chmod(0o700)


@pytest.mark.slow  # sweeps and resumes, refused after Ray started
def test_another_users_closed_folder_or_lock_in_a_shared_storage_is_one_line(synthetic_dir, tmp_path):
    """pyarrow raised PermissionError from Tune's can_restore: a folder of another user's, mode 0700, made any
    sweep or resume of that name (or a resume without --name) a traceback. Their lock file let them lock anew
    while the user's sweep held it."""
    shared = tmp_path / "shared"
    (shared / "theirs").mkdir(parents=True)
    (shared / "theirs").chmod(0o700)
    os.chown(shared / "theirs", 65534, 65534)
    (shared / ".locked.lock").touch(mode=0o666)  # as another user's umask 0 left it: anyone's to open
    (shared / ".locked.lock").chmod(0o666)
    os.chown(shared / ".locked.lock", 65534, 65534)
    cases = [
        (["--data-dir", str(synthetic_dir), *TINY, "--name", "theirs"], "theirs cannot be looked into (Permission"),
        (["--resume", "--name", "theirs"], "theirs cannot be looked into (Permission denied); allowed: an experiment"),
        (["--resume"], "holds no experiment of yours to resume (passed over, not yours alone: theirs)"),
        (["--data-dir", str(synthetic_dir), *TINY, "--name", "locked"], "lock file " + str(shared / ".locked.lock")),
    ]
    for args, needle in cases:
        done = subprocess.run([*NO_OVERRIDE, sys.executable, "-m", "tune_alexnet", "sweep", "--storage", str(shared),
                               *args], capture_output=True, text=True, timeout=120)  # fmt: skip
        lines = [ln for ln in done.stderr.splitlines() if ln.strip() and "passes over" not in ln]
        assert done.returncode == 2 and len(lines) == 1 and needle in lines[0], done.stderr[-2000:]
    assert sorted(p.name for p in shared.iterdir()) == [".locked.lock", "theirs"]


def test_a_resume_runs_nothing_a_group_shared_with_others_could_write(damaged, capsys):
    """Under a umask of 002, with a group other users share, a member rewrote tuner.pkl in place, and the resume
    ran their code as the user."""
    copy, _ = damaged
    ran = copy.parent / "ran"
    (copy / "tuner.pkl").write_bytes(pickle.dumps(_Touch(str(ran))))
    os.chown(copy / "tuner.pkl", os.getuid(), 65534)  # nobody's group: not one of the user's alone
    (copy / "tuner.pkl").chmod(0o664)
    err = one_line_exit_2(["sweep", "--resume", "--name", "mixed", "--storage", str(copy.parent)], capsys)
    assert f"{copy / 'tuner.pkl'} can be written by group 65534, which other users share (mode 0664" in err, err
    assert not ran.exists()


def test_an_empty_folder_a_killed_start_left_is_one_that_never_started(tmp_path, capsys):
    """A sweep makes its folder at once; killed before anything else (the data's download), the folder is empty,
    and --resume advised another --name, which is not needed."""
    (tmp_path / "study").mkdir()
    err = one_line_exit_2(["sweep", "--resume", "--name", "study", "--storage", str(tmp_path)], capsys)
    assert "stopped before its first trial reported, so there is nothing to resume; run the same command" in err, err


def test_a_new_sweep_takes_no_experiment_folder_another_user_made(synthetic_dir, tmp_path, capsys):
    """In a shared storage (sticky, as /tmp), another user made the folder the sweep would use, and swapped Tune's
    experiment state in it for a link to a file of the user's, which the sweep then overwrote."""
    storage = tmp_path / "shared"
    storage.mkdir(mode=0o1777)
    storage.chmod(0o1777)
    (storage / "study").mkdir()
    os.chown(storage / "study", 65534, 65534)
    err = one_line_exit_2(["sweep", "--data-dir", str(synthetic_dir), "--storage", str(storage), "--name", "study",
                           *TINY], capsys)  # fmt: skip
    assert f"{storage / 'study'} belongs to another user (uid 65534), so whoever else can write it could send" in err
    assert "allowed: a --name that is not taken in" in err
    assert [p.name for p in storage.iterdir()] == ["study"]


@pytest.mark.parametrize(
    "storage,needle",
    [
        (
            "foo://bucket/x",
            "--storage foo://bucket/x: the scheme foo:// is not supported; allowed: a local folder, "
            "or s3://BUCKET/PATH or gs://BUCKET/PATH",
        ),  # fmt: skip
        ("s3:///x", "it names no bucket"),
        ("LONG", "characters long, so trial files below it would pass the file system's 4096-character path limit"),
    ],
    ids=["unknown-scheme", "no-bucket", "4000-character-path"],
)
def test_places_a_sweep_cannot_use_are_refused_at_once(storage, needle, synthetic_dir, tmp_path, capsys):
    if storage == "LONG":  # a real path of 4,000 characters, in components the file system accepts
        storage = str(tmp_path / "/".join(["d" * 200] * 19))
        assert len(storage) > 3800
    start = time.monotonic()
    err = one_line_exit_2(["sweep", "--data-dir", str(synthetic_dir), "--storage", storage, *TINY], capsys)
    assert needle in err and time.monotonic() - start < 10
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing created, not even the storage folder


@pytest.mark.parametrize("command", ["export", "report"])
def test_export_and_report_refuse_an_unknown_scheme_at_once(command, capsys):
    err = one_line_exit_2([command, "foo://bucket/x"], capsys)
    assert "foo://bucket/x: the scheme foo:// is not supported; allowed: a local folder, or s3://" in err


def test_a_failed_or_lost_trial_fails_the_sweep():
    from tune_alexnet.cli import left_over

    def table(*statuses):
        return pd.DataFrame({"status": list(statuses)})

    assert left_over(table("terminated", "diverged")) == (0, 0)
    assert left_over(table("terminated", "lost")) == (1, 0)  # every trial lost once exited 0
    assert left_over(table("errored", "unknown", "running", "pending")) == (2, 2)


@pytest.mark.slow
def test_a_sweep_whose_reader_has_gone_loses_no_table(synthetic_dir, tmp_path):
    """`tune-alexnet sweep ... | head` (or `| true`): once the reader has gone, the sweep trains on and writes its
    tables, without a traceback, and exits 1 (its summary could not be shown)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    read, write = os.pipe()
    argv = ["sweep", "--data-dir", str(synthetic_dir), "--storage", str(tmp_path), "--name", "piped", *TINY]
    proc = subprocess.Popen([sys.executable, "-m", "tune_alexnet", *argv], env=env, stdout=write,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    os.close(write)
    os.close(read)  # gone before the first line (`| true`); every line the sweep prints meets a closed pipe
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in err and "BrokenPipe" not in err, err[-3000:]
    table = pd.read_parquet(tmp_path / "piped" / "results.parquet")
    assert list(table["status"]) == ["terminated"] and (tmp_path / "piped" / "report.md").is_file()


# --- resume: a record that lies, or none ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage,needle",
    [
        (
            "delete",
            "tune_alexnet_sweep.json is missing, so neither the sweep's settings nor its data can be checked; "
            "pass --allow-data-change",
        ),  # fmt: skip
        ("[]", "tune_alexnet_sweep.json is damaged: "),
        ("epochs=1e20", "is damaged: epochs: 1e+20; allowed: a whole number >= 1 and <= 10000"),
        ("grid=lr-as-text", "is damaged: grid.lr: 'fast'; allowed: a number > 0 and <= 1000000"),
        ("grid=no-batchnorm", "is damaged: grid: "),
        ("trial.width=40", "is damaged: trial.width: 40; allowed: a number > 0 and <= 4"),
        ("no-data-record", "holds no record of the data the sweep started on; pass --allow-data-change"),
        ("data.train_images=Infinity", "tune_alexnet_sweep.json is damaged: data.train_images is Infinity; allowed: "),
    ],
)
def test_resume_trusts_no_damaged_record(damage, needle, damaged, capsys, synthetic_dir):
    import json

    copy, _ = damaged
    record_file = copy / "tune_alexnet_sweep.json"
    record = json.loads(record_file.read_text())
    if damage == "delete":
        record_file.unlink()
    elif damage == "[]":
        record_file.write_text("[]")
    else:
        key, _, value = damage.partition("=")
        if key == "epochs":
            record["epochs"] = 1e20
        elif value == "lr-as-text":
            record["grid"]["lr"] = ["fast"]
        elif value == "no-batchnorm":
            del record["grid"]["batchnorm"]
        elif key == "trial.width":
            record["trial"]["width"] = 40
        elif key == "data.train_images":
            record["data"]["train_images"] = float("inf")
        else:
            del record["data"]
        record_file.write_text(json.dumps(record))
    before = sorted(p.name for p in copy.iterdir())
    err = one_line_exit_2(["sweep", "--resume", "--name", "mixed", "--storage", str(copy.parent), "--data-dir",
                           str(synthetic_dir)], capsys)  # fmt: skip
    assert needle in err, err
    assert sorted(p.name for p in copy.iterdir()) == before  # nothing written


@pytest.mark.slow
def test_a_damaged_data_record_is_refused_even_with_allow_data_change(damaged, capsys, synthetic_dir):
    """The tables at the end read the record too: a resume that went on would lose them."""
    import json

    copy, _ = damaged
    record = json.loads((copy / "tune_alexnet_sweep.json").read_text())
    record["data"]["train_images"] = float("inf")
    (copy / "tune_alexnet_sweep.json").write_text(json.dumps(record))
    err = one_line_exit_2(["sweep", "--resume", "--name", "mixed", "--storage", str(copy.parent), "--data-dir",
                           str(synthetic_dir), "--allow-data-change"], capsys)  # fmt: skip
    assert "tune_alexnet_sweep.json is damaged: data.train_images is Infinity; allowed: a whole number" in err


@pytest.mark.slow
def test_a_resume_without_its_record_takes_no_tracker_it_cannot_check(damaged, capsys, synthetic_dir, tmp_path):
    """With no record of the settings, --mlflow and --wandb given to a resume were taken without a word and then
    left out, or logged to the first run's W&B project: a resume logs to the trackers its experiment started
    with, which nothing here names."""
    copy, _ = damaged
    (copy / "tune_alexnet_sweep.json").unlink()
    before = sorted(p.name for p in copy.iterdir())
    err = one_line_exit_2(["sweep", "--resume", "--name", "mixed", "--storage", str(copy.parent), "--data-dir",
                           str(synthetic_dir), "--allow-data-change", "--wandb", "another", "--mlflow",
                           f"sqlite:///{tmp_path}/m.db"], capsys)  # fmt: skip
    assert "tune_alexnet_sweep.json is missing, so --mlflow and --wandb cannot be checked against the trackers" in err
    assert sorted(p.name for p in copy.iterdir()) == before and not (tmp_path / "m.db").exists()


@pytest.mark.parametrize("name", ["TUNE_RESULT_DIR", "RAY_AIR_LOCAL_CACHE_DIR"])
def test_a_variable_tune_no_longer_uses_is_refused_before_anything_is_written(
    name, monkeypatch, tmp_path, capsys, synthetic_dir
):
    """Tune refuses to start while one is set, once the experiment folder and its first files were written: the
    sweep exited 1 and named an export that found nothing to read."""
    monkeypatch.setenv(name, str(tmp_path / "elsewhere"))
    err = one_line_exit_2(["sweep", "--data-dir", str(synthetic_dir), "--storage", str(tmp_path / "results"), *TINY],
                          capsys)  # fmt: skip
    assert err.endswith(f"{name}={tmp_path}/elsewhere: Ray no longer uses this variable, and Tune will not start a "
                        "sweep while it is set; unset it (experiments go into --storage, ray_results unless given)")  # fmt: skip
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_name_left_before_the_first_trial_reported_has_a_way_forward(damaged, ray_local, synthetic_dir, capsys):
    copy, _ = damaged
    for path in copy.iterdir():  # what a sweep killed right after starting leaves: its record and Tune's first file
        if path.name not in ("tune_alexnet_sweep.json", "tuner.pkl"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    early = copy.parent / "early"  # killed sooner still: before its record, with only its log and reserve
    early.mkdir()
    (early / "driver.log").write_text("2026-11-30 06:00:00 WARNING ray: ...\n")
    (early / ".tune-alexnet-reserve").write_bytes(b"\0" * 1024)
    for name in ("mixed", "early"):
        err = one_line_exit_2(["sweep", "--resume", "--name", name, "--storage", str(copy.parent)], capsys)
        assert "stopped before its first trial reported, so there is nothing to resume; run the same command " in err
    argv = ["sweep", "--data-dir", str(synthetic_dir), "--storage", str(copy.parent), "--name", "mixed", *TINY]
    # Such a folder with a link or a FIFO planted in it is no sweep's leftover: taking it over would write through
    # the link, or block on the FIFO.
    victim = copy.parent / "victim.txt"
    victim.write_text("precious")
    (copy / "tuner.pkl").rename(copy.parent / "tuner.pkl.kept")
    for planted, plant in (("tuner.pkl", lambda p: p.symlink_to(victim)), ("tuner.pkl", lambda p: p.hardlink_to(victim)),
                           ("driver.log", os.mkfifo)):  # fmt: skip
        if planted == "driver.log":
            (copy.parent / "tuner.pkl.kept").rename(copy / "tuner.pkl")
        plant(copy / planted)
        assert "an experiment named 'mixed' already exists" in one_line_exit_2(argv, capsys)
        assert victim.read_text() == "precious"
        (copy / planted).unlink()
    assert main(argv) == 0, capsys.readouterr().err  # the way it named: a fresh sweep takes the name over
    assert len(pd.read_parquet(copy / "results.parquet")) == 1


# --- what a local sweep shows the network, other users and the disk ------------------------------------------


@pytest.fixture
def short_tmpdir():
    """A private TMPDIR short enough for Ray's socket paths, so each test sees only its own Ray sessions."""
    import tempfile

    path = tempfile.mkdtemp(prefix="ta", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def ray_processes(session_root: str) -> list:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(session_root in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
def test_a_local_sweep_hides_secrets_from_other_users_and_guards_its_ports(synthetic_dir, tmp_path, short_tmpdir):
    import psutil

    canary = "canary-secret-5be1c0de"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(TMPDIR=short_tmpdir, AWS_SECRET_ACCESS_KEY=canary, AWS_ACCESS_KEY_ID="canary-id")
    storage = tmp_path / "results"
    # Epochs enough for the sweep (and its Ray) to outlive the port and token checks below.
    args = ["--data-dir", str(synthetic_dir), "--storage", str(storage), "--name", "net", *TINY[:-1], "40",
            "--patience", "100"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "tune_alexnet", "sweep", *args], env=env, umask=0o002,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    printed = ""
    while "Ray dashboard at http://" not in printed:  # the dashboard and the job API, which take no token
        line = proc.stdout.readline()
        assert line, printed[-3000:]
        printed += line
    dashboard_port = int(printed.split("Ray dashboard at http://")[1].split()[0].rsplit(":", 1)[1])
    deadline = time.monotonic() + 180
    while not list((storage / "net").glob("train_cifar_*/result.json")):
        assert proc.poll() is None and time.monotonic() < deadline, printed
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep ended before its ports could be checked"
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    listening = []
    for p in tree:
        try:
            listening += [(c.laddr.ip, c.laddr.port, p.name()) for c in p.net_connections(kind="inet")
                          if c.status == psutil.CONN_LISTEN]  # fmt: skip
        except psutil.Error:
            continue
    assert {ip for ip, port, _ in listening if port == dashboard_port} == {"127.0.0.1"}, listening
    gcs = next(port for _, port, name in listening if name == "gcs_server")
    no_token = subprocess.run([sys.executable, "-c", TOKEN_PROBE, f"127.0.0.1:{gcs}"], capture_output=True,
                              text=True, timeout=60, env={**env, "RAY_AUTH_MODE": "disabled", "HOME": str(tmp_path)})  # fmt: skip
    assert "refused: AuthenticationError" in no_token.stdout, no_token.stdout + no_token.stderr[-1000:]
    with_token = subprocess.run([sys.executable, "-c", TOKEN_PROBE, f"127.0.0.1:{gcs}"], capture_output=True,
                                text=True, timeout=60, env={**env, "RAY_AUTH_MODE": "token"})  # fmt: skip
    assert "joined" in with_token.stdout, with_token.stdout + with_token.stderr[-1000:]
    assert proc.poll() is None, "the sweep ended during the token checks: they did not reach its Ray"
    proc.stdout.read()
    assert proc.wait(300) == 0
    token = Path.home() / ".ray" / "auth_token"
    assert token.stat().st_mode & 0o077 == 0  # readable by this user only
    private = Path(short_tmpdir) / f"tune-alexnet-{os.getuid()}"
    assert private.stat().st_mode & 0o777 == 0o700
    holders = [
        p for p in (*private.rglob("*"), *storage.rglob("*")) if p.is_file() and canary.encode() in p.read_bytes()
    ]
    assert all(private in p.parents for p in holders), holders  # Ray's logs hold it, behind a 0700 folder only
    # torch's kernel cache, whose compiled code trials run: in the private folder, not one another user can make
    assert not list(Path(short_tmpdir).glob("torchinductor_*")), os.listdir(short_tmpdir)
    # under a umask of 002, with a group others may share: nothing of the experiment is theirs to write
    shared = [p for p in storage.rglob("*") if not p.is_symlink() and p.stat().st_mode & 0o022]
    assert not shared, shared[:5]


def test_rays_lock_files_lie_in_the_private_folder(short_tmpdir, monkeypatch):
    """Tune takes lock files in RAY_TMPDIR, else TMPDIR or /tmp: another user's folder there failed a resume
    halfway, and Tune then wrote a state of no trials over the experiment's."""
    import tempfile

    from ray.air._internal.filelock import TempFileLock

    from tune_alexnet import cluster

    monkeypatch.setattr(tempfile, "tempdir", short_tmpdir)
    for name in ("RAY_TMPDIR", cluster.KERNEL_CACHE):
        monkeypatch.setenv(name, "")  # undone after the test, whatever local_ray_options sets
        monkeypatch.delenv(name)
    cluster.local_ray_options()
    private = Path(short_tmpdir) / f"tune-alexnet-{os.getuid()}"
    assert Path(TempFileLock(str(Path(short_tmpdir) / "exp" / "state.json")).lock_file).parent.parent == private
    assert not (Path(short_tmpdir) / "_ray_lockfiles").exists()
    monkeypatch.setenv("RAY_TMPDIR", short_tmpdir)  # the user's own choice stays
    cluster.local_ray_options()
    assert os.environ["RAY_TMPDIR"] == short_tmpdir
    monkeypatch.setenv("RAY_TMPDIR", "")  # set but empty: Ray's lock files went into the working folder
    cluster.local_ray_options()
    assert os.environ["RAY_TMPDIR"] == str(private)


@pytest.mark.slow  # a trial on Ray
def test_a_trial_keeps_torchs_kernel_cache_in_the_private_folder_on_a_joined_cluster_too(short_tmpdir):
    """The private cache was set for the local Ray alone: on a cluster joined with --address the trials compiled
    into, and loaded kernels from, TMPDIR/torchinductor_USER, which another user had made (mode 0777) first."""
    import getpass

    theirs = Path(short_tmpdir) / f"torchinductor_{getpass.getuser()}"
    theirs.mkdir()
    theirs.chmod(0o777)
    code = (
        "from tune_alexnet.cluster import private_kernel_cache; private_kernel_cache(); "  # as train_cifar does
        "from torch._inductor.runtime.cache_dir_utils import cache_dir; print(cache_dir())"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"} | {"TMPDIR": short_tmpdir}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    private = Path(short_tmpdir) / f"tune-alexnet-{os.getuid()}"
    assert done.stdout.strip() == str(private / "torchinductor"), done.stdout + done.stderr[-2000:]
    assert private.stat().st_mode & 0o777 == 0o700 and not any(theirs.iterdir())
    env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(short_tmpdir) / "mine")  # one the user named stays theirs
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.strip() == env["TORCHINDUCTOR_CACHE_DIR"], done.stderr[-2000:]


TOKEN_PROBE = """
import sys
from ray._raylet import GcsClient
try:
    GcsClient(address=sys.argv[1]).cluster_id
    print("joined")
except Exception as exc:
    print("refused:", type(exc).__name__)
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM], ids=["sighup", "sigterm"])
def test_a_stop_signal_while_ray_starts_is_one_line_and_leaves_no_ray_behind(sig, synthetic_dir, tmp_path,
                                                                             short_tmpdir):  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"TMPDIR": short_tmpdir}
    sessions = Path(short_tmpdir) / f"tune-alexnet-{os.getuid()}" / "ray"
    proc = subprocess.Popen([sys.executable, "-m", "tune_alexnet", "sweep", "--data-dir", str(synthetic_dir),
                             "--storage", str(tmp_path / "r"), *TINY], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(sessions.glob("session_2*")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(sig)  # SIGTERM: after ray.init has put its own handler in place of ours
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "tune-alexnet sweep: interrupted before the sweep started; nothing was run"
    deadline = time.monotonic() + 20
    while ray_processes(str(sessions)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_processes(str(sessions)) == []


# --- tracker URIs: probed without their secrets, which are never echoed or stored in clear --------------------


@pytest.fixture
def health_server():
    """A stand-in tracking server on 127.0.0.1 that answers 200 and records each request's path and headers."""
    import http.server
    import threading

    seen: list = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, dict(self.headers)))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], seen
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("secret", ["alice:s3cret-pw@", "s3cret-pw@"])
def test_a_tracker_uri_with_a_user_part_is_probed_without_it(health_server, secret):
    from tune_alexnet.preflight import _check_mlflow_uri

    port, seen = health_server
    _check_mlflow_uri(f"http://{secret}127.0.0.1:{port}/mlflow/")
    assert [path for path, _ in seen] == ["/mlflow/health"]
    assert "s3cret-pw" not in repr(seen)


def test_a_tracker_uri_with_a_query_is_refused_before_any_request(health_server):
    """MLflow glues a query into its REST paths: a real server then answers what MLflow cannot read, a traceback
    from inside Ray. Credentials have their own places."""
    from tune_alexnet.preflight import PreflightError, _check_mlflow_uri

    port, seen = health_server
    for uri in (f"http://127.0.0.1:{port}/?token=s3cret-pw", f"https://127.0.0.1:{port}/mlflow#s3cret-pw"):
        with pytest.raises(PreflightError) as refused:
            _check_mlflow_uri(uri)
        assert "cannot hold a query or fragment" in str(refused.value) and "s3cret-pw" not in str(refused.value)
        assert "MLFLOW_TRACKING_TOKEN" in str(refused.value) and "MLFLOW_TRACKING_PASSWORD" in str(refused.value)
    assert seen == []


UNREACHABLE = "the MLflow tracking server cannot be reached"
WITH_A_QUERY = "a tracking server's URI cannot hold a query or fragment"


@pytest.mark.parametrize(
    "uri,shown,why",
    [
        ("http://alice:s3cret-pw@127.0.0.1:1", "http://alice:***@127.0.0.1:1", UNREACHABLE),
        ("http://s3cret-pw@127.0.0.1:1", "http://***@127.0.0.1:1", UNREACHABLE),
        ("http://127.0.0.1:1/?token=s3cret-pw", "http://127.0.0.1:1/?token=***", WITH_A_QUERY),
        ("http://127.0.0.1:1/?a=1&access_token=s3cret-pw", "http://127.0.0.1:1/?a=1&access_token=***", WITH_A_QUERY),
        ("http://127.0.0.1:1/?password=s3cret-pw", "http://127.0.0.1:1/?password=***", WITH_A_QUERY),
        ("http://127.0.0.1:1/?key=s3cret-pw", "http://127.0.0.1:1/?key=***", WITH_A_QUERY),
        ("http://127.0.0.1:1/#s3cret-pw", "http://127.0.0.1:1/#***", WITH_A_QUERY),
        ("http://127.0.0.1:1/?tok%65n=s3cret-pw", "http://127.0.0.1:1/?tok%65n=***", WITH_A_QUERY),
        ("http://127.0.0.1:1/?pwd=s3cret-pw&x=1", "http://127.0.0.1:1/?pwd=***&x=1", WITH_A_QUERY),
        ("http://127.0.0.1:1/?jwt=s3cret-pw", "http://127.0.0.1:1/?jwt=***", WITH_A_QUERY),
    ],
)
def test_a_tracker_uris_secrets_are_never_echoed(uri, shown, why, tmp_path, capsys):
    storage = tmp_path / "results"
    err = one_line_exit_2(["sweep", "--mlflow", uri, "--storage", str(storage), *TINY], capsys)
    assert "s3cret-pw" not in err and f"--mlflow {shown}: {why}" in err
    assert not storage.exists()


@pytest.mark.parametrize(
    "text,shown",
    [
        ("http://h/?pass=S3CRET&x=1", "http://h/?pass=***&x=1"),
        ("http://h/?pw=S3CRET", "http://h/?pw=***"),
        ("http://h/?pwd=S3CRET", "http://h/?pwd=***"),
        ("http://h/?session=S3CRET", "http://h/?session=***"),
        ("http://h/?x=1;jwt=S3CRET", "http://h/?x=1;jwt=***"),
        ("http://h/?bearer=S3CRET", "http://h/?bearer=***"),
        ("http://h/?apikey=S3CRET", "http://h/?apikey=***"),
        ("http://user:s3c/r3t@h:1", "http://user:***@h:1"),
        ("http://user:s3c?r3t#x@h:1", "http://user:***@h:1"),
        ("http://user:S3CRET@h@h:1/", "http://user:***@h:1/"),
        ("user:S3CRET@h:5000", "user:***@h:5000"),
        ("http:/user:S3CRET@h", "http:/user:***@h"),
        ("http:\\\\user:S3CRET@h", "http:\\\\user:***@h"),
        ("http://us er:S3CRET@h", "http://us er:***@h"),
        ("http://user:S3C RET@h:1/x", "http://user:***@h:1/x"),
        ("invalid value 'http://h:1/\\ntoken=S3CRET' (x)", "invalid value 'http://h:1/\\ntoken=***' (x)"),
        ("s3://AKIAX:S3CRET@b/x?endpoint_override=h:1&secret_key=S3CRET", "s3://AKIAX:***@b/x?endpoint_override=h:1&secret_key=***"),
        # a secret named again elsewhere in the text: after a space in a fragment, or in the message around it
        ("http://user:S3CRET@h/#frag S3CRET", "http://user:***@h/#*** ***"),
        ("'http://h/?token=S3CRET' (S3CRET is not a host)", "'http://h/?token=***' (*** is not a host)"),
        ("http://h/#token=S3CRET then S3CRET, a token", "http://h/#*** then ***, a token"),
        ("http://h/?x=1#tok%65n=S3CRET S3CRET", "http://h/?x=1#*** ***"),
        ("http://u:S3%40CRET@h/ S3@CRET", "http://u:***@h/ ***"),  # as it reads decoded, too
        # what hides nothing stays as it was
        ("http://[::1]:5000/x?a=1", "http://[::1]:5000/x?a=1"),
        ("http://127.0.0.1:port", "http://127.0.0.1:port"),
        ("RAY_AUTH_MODE=disabled would start", "RAY_AUTH_MODE=disabled would start"),
        # local paths are identities (which experiment's tables a folder holds): their folders' names stay whole
        ("/tmp/monkey=1/token-a", "/tmp/monkey=1/token-a"),
        ("cannot write /data/author=me/design=2/x", "cannot write /data/author=me/design=2/x"),
        ("/home/u/exp:v2@old/ckpt is missing", "/home/u/exp:v2@old/ckpt is missing"),
    ],
)  # fmt: skip
def test_a_secret_in_any_spelling_is_hidden(text, shown):
    from tune_alexnet.settings import redacted

    assert redacted(text) == shown and redacted(shown) == shown


@pytest.mark.parametrize(
    "uri",
    [
        "http://user:s3cret/pw@127.0.0.1:1",
        "user:s3cret-pw@127.0.0.1:5000",
        "http:/user:s3cret-pw@127.0.0.1",
        "http:\\\\user:s3cret-pw@127.0.0.1",
        "http://us er:s3cret-pw@127.0.0.1",
        "http://127.0.0.1:1/\x1b[2Jtoken=s3cret-pw",
    ],
)
def test_a_tracker_password_in_any_spelling_is_never_echoed(uri, tmp_path, capsys):
    storage = tmp_path / "results"
    err = one_line_exit_2(["sweep", "--mlflow", uri, "--storage", str(storage), *TINY], capsys)
    assert "s3cret" not in err and not storage.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["sweep", "--mlflow", "http://127.0.0.1:1/\ntoken=s3cret-pw", *TINY],
        ["sweep", "--storage", "results\tsub", *TINY],
        ["export", "ray_results/x\ny?token=s3cret-pw"],
        ["report", "ray_results/x", "--out", "page\rs"],
    ],
)
def test_a_value_with_a_control_character_is_one_line_shown_escaped(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = one_line_exit_2(argv, capsys)
    assert "(it holds a control character)" in err and "s3cret-pw" not in err, err
    assert any(escape in err for escape in ("\\n", "\\t", "\\r")) and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("folder", ["\u0646\u062a\u0627\u06cc\u062c\u200c\u0647\u0627", "\U0001f468\u200d\U0001f4bb"],
                         ids=["Persian with a joiner", "an emoji sequence"])  # fmt: skip
def test_a_folder_named_with_joiners_is_a_folder_like_any_other(folder, tmp_path, monkeypatch):
    """Format characters that join letters or emoji are common in names; only those that reorder text are refused."""
    work = tmp_path / folder
    work.mkdir()
    monkeypatch.chdir(work)
    args = build_parser().parse_args(["sweep", "--storage", "rr"])
    assert args.storage == "rr" and build_parser().parse_args(["sweep"]).storage


@pytest.mark.parametrize("folder", ["e\x1b]0;PWNED\x07\x1b[31mX", "o\u202eq"], ids=["escapes", "text direction"])
@pytest.mark.parametrize("argv", [["sweep", "--storage", "rr", *TINY], ["sweep", *TINY], ["export", "base"],
                                  ["report", "base"], ["export", "/x", "--out", "tables"]])  # fmt: skip
def test_a_relative_path_in_a_folder_named_with_control_characters_is_refused(folder, argv, tmp_path, monkeypatch,
                                                                              capsys):  # fmt: skip
    """The check looked at the path as typed, not the full path it becomes, which the console, results.csv and
    report.md then showed raw: a terminal title set, colours, text reversed."""
    work = tmp_path / folder
    work.mkdir()
    monkeypatch.chdir(work)
    err = one_line_exit_2(argv, capsys)
    assert "(it holds a control character, as " in err and "\x1b" not in err and "\u202e" not in err, err
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("uri", ["postgresql://u:s3cret-pw@127.0.0.1:1/db", "mysql://u:s3cret-pw@127.0.0.1:1/db",
                                 "mssql://u:s3cret-pw@127.0.0.1:1/db", "postgresql+pg8000://u:s3cret-pw@127.0.0.1:1/db"])  # fmt: skip
def test_a_database_tracker_without_its_driver_is_refused_before_ray_starts(uri, tmp_path, capsys):
    """MLflow opens the store only inside the sweep: a 40-line traceback once Ray has started, and an experiment
    folder left behind."""
    import importlib.util
    import re

    storage = tmp_path / "results"
    err = one_line_exit_2(["sweep", "--mlflow", uri, "--storage", str(storage), *TINY], capsys)
    driver = re.search(r"needs the database driver (\w+), which cannot be imported", err)
    assert driver and importlib.util.find_spec(driver[1]) is None, err
    assert "pg8000" not in uri or driver[1] == "pg8000"
    assert "s3cret-pw" not in err and "pip install" in err and not storage.exists()


def test_a_bucket_secret_is_never_in_an_error_line(tmp_path, capsys):
    """pyarrow takes credentials in a bucket URI's user part or query; its errors name the URI, and so do ours."""
    from tune_alexnet.checkpoint import CheckpointError, load_model
    from tune_alexnet.export import ExportError, load_experiment

    bucket = "s3://b/x?endpoint_override=127.0.0.1:1&secret_key=S3CRETQ&access_key=AK"
    err = one_line_exit_2(["export", bucket], capsys)
    assert "S3CRETQ" not in err and "secret_key=***" in err
    with pytest.raises(ExportError) as refused:  # the Python API too
        load_experiment(bucket)
    assert "S3CRETQ" not in str(refused.value) and "secret_key=***" in str(refused.value)
    storage = "s3://AKIAX:S3CRETKEY@b/x?bogus=1"
    err = one_line_exit_2(["sweep", "--storage", storage, *TINY], capsys)
    assert "S3CRETKEY" not in err and "s3://AKIAX:***@b/x" in err
    with pytest.raises(CheckpointError) as refused:
        load_model(storage)
    assert "S3CRETKEY" not in str(refused.value) and "S3CRETKEY" not in repr(refused.value.args)


@pytest.mark.parametrize("uri", ["http://[::1", "http://alice:s3cret-pw@[::1", "http://127.0.0.1:port"])
def test_a_tracker_uri_that_does_not_parse_is_one_line_and_nothing_written(uri, tmp_path, capsys):
    storage = tmp_path / "results"
    err = one_line_exit_2(["sweep", "--mlflow", uri, "--storage", str(storage), *TINY], capsys)
    assert err.startswith("tune-alexnet sweep: error: argument --mlflow: invalid value 'http://")
    assert "s3cret-pw" not in err and not storage.exists()


@pytest.mark.parametrize(
    "uri",
    [
        "databricks://profile:s3cret-pw@x",
        ":::",
        "https://u:s3cret-pw@exa mple.com/",
        "/tmp/mlruns",
        "ftp://h/x",
        "file:///tmp/mlruns",
    ],  # fmt: skip
)
def test_a_tracker_uri_of_a_kind_the_sweep_cannot_use_is_refused_before_ray_starts(uri, tmp_path, capsys):
    """MLflow would take these only once Ray had started: a traceback (with the secret, for databricks://) and a
    half-made experiment folder."""
    storage = tmp_path / "results"
    err = one_line_exit_2(["sweep", "--mlflow", uri, "--storage", str(storage), *TINY], capsys)
    assert "not a tracking URI this sweep can use; allowed: http(s)://HOST:PORT" in err, err
    assert "s3cret-pw" not in err and not storage.exists()


def test_a_tracker_password_is_stored_redacted_and_resume_asks_for_it(tmp_path, monkeypatch):
    from ray import cloudpickle

    from tune_alexnet import tracking
    from tune_alexnet.preflight import PreflightError, _resumed_mlflow
    from tune_alexnet.settings import SweepSettings, read_settings, write_settings

    uri = "http://alice:s3cret-pw@127.0.0.1:5000"
    write_settings(str(tmp_path), SweepSettings(mlflow=uri, name="x"))
    assert "s3cret-pw" not in (tmp_path / "tune_alexnet_sweep.json").read_text()
    recorded = read_settings(str(tmp_path))["mlflow"]
    assert recorded == "http://alice:***@127.0.0.1:5000"
    # Tune pickles its callbacks into the experiment folder: the URI goes there redacted too.
    callback = tracking._mlflow_callback_class()(uri, experiment_name="x")
    assert b"s3cret-pw" not in cloudpickle.dumps(callback) and callback.tracking_uri == uri
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(PreflightError, match=r"alice:\*\*\*@.*pass --mlflow with the whole URI again"):
        _resumed_mlflow(None, recorded)
    assert _resumed_mlflow(uri, recorded) == uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert _resumed_mlflow(None, recorded) == uri
    assert _resumed_mlflow(None, "http://127.0.0.1:5000") == "http://127.0.0.1:5000"  # no secret: as recorded


def test_a_bucket_secret_in_the_storage_uri_is_never_stored_or_written_with_the_tables(mixed_experiment, tmp_path):
    """pyarrow takes credentials in a bucket URI's query; the settings record and the tables' metadata go to
    whoever gets the tables, so the secret stays out of both."""
    import dataclasses
    import json

    import pyarrow.parquet as pq

    from tune_alexnet.export import load_experiment, write_tables
    from tune_alexnet.settings import SweepSettings, read_settings, write_settings

    bucket = "s3://bucket/results?endpoint_override=127.0.0.1:9000&secret_key=s3cret-key"
    write_settings(str(tmp_path), SweepSettings(storage=bucket, name="x"))
    assert (
        read_settings(str(tmp_path))["storage"] == "s3://bucket/results?endpoint_override=127.0.0.1:9000&secret_key=***"
    )
    exp = load_experiment(mixed_experiment[0])
    exp = dataclasses.replace(
        exp, path="s3://bucket/results/x?secret_key=s3cret-key", settings={**exp.settings, "storage": bucket}
    )
    write_tables(exp, tmp_path / "tables")
    meta = pq.read_schema(tmp_path / "tables" / "results.parquet").metadata[b"tune_alexnet"].decode()
    assert "s3cret-key" not in meta and json.loads(meta)["experiment"] == "s3://bucket/results/x?secret_key=***"


def test_a_bucket_secret_in_the_experiments_uri_stays_out_of_the_tables_and_the_page(mixed_experiment, tmp_path,
                                                                                    monkeypatch):  # fmt: skip
    """An experiment read from a bucket named with its credentials (user:secret@): the tables' checkpoint column
    and the page go to whoever gets them, and the column still loads."""
    import pyarrow.fs

    from tune_alexnet.checkpoint import load_model

    with moto_bucket("bkt", "AKID", "SeCrEt42") as (port, _):
        uri = f"s3://AKID:SeCrEt42@bkt/p/mixed?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        bucket, path = pyarrow.fs.FileSystem.from_uri(uri)
        pyarrow.fs.copy_files(str(mixed_experiment[0]), path, destination_filesystem=bucket)
        out = tmp_path / "out"
        assert main(["export", uri, "--out", str(out)]) == 0
        assert main(["report", uri, "--out", str(out)]) == 0
        table = pd.read_parquet(out / "results.parquet")
        best = table["best_checkpoint"].dropna()
        assert len(best) and best.str.startswith("s3://bkt/p/mixed/").all(), best
        with monkeypatch.context() as env:  # what the column leaves out comes from the environment
            env.setenv("AWS_ACCESS_KEY_ID", "AKID")
            env.setenv("AWS_SECRET_ACCESS_KEY", "SeCrEt42")
            assert load_model(best.iloc[0]).training is False
    written = {f.name for f in out.iterdir()}
    assert {"results.csv", "results.parquet", "report.html", "report.md"} <= written
    assert not [f.name for f in out.rglob("*") if f.is_file() and b"SeCrEt42" in f.read_bytes()]


HOLDING_PROXY = r"""
import http.client, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

upstream, method, part = int(sys.argv[1]), sys.argv[2], sys.argv[3]


class Proxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.command == method and part in self.path.split("?")[0]:
            print("held", self.path, flush=True)
            time.sleep(3600)
        conn = http.client.HTTPConnection("127.0.0.1", upstream, timeout=30)
        conn.request(self.command, self.path, body, dict(self.headers))
        answer = conn.getresponse()
        data = answer.read()
        self.send_response(answer.status)
        for key, value in answer.getheaders():
            if key.lower() not in ("transfer-encoding", "connection") and (
                key.lower() != "content-length" or self.command == "HEAD"
            ):
                self.send_header(key, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = forward


server = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


@contextlib.contextmanager
def holding_proxy(upstream: int, method: str = "", part: str = ""):
    """A loopback proxy to a bucket's server that never answers `method` calls on keys holding `part`, as a
    stalled bucket does (nothing held where `method` is empty); yields its port."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDING_PROXY, str(upstream), method, part],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


PATIENT_2_S = (  # the command line with a bucket's time limit of 2 s, not 15
    "import sys, tune_alexnet; from tune_alexnet import export, storage; "
    "storage.REACH_TIMEOUT_S = export.REACH_TIMEOUT_S = 2.0; sys.exit(tune_alexnet.main())"
)


@pytest.mark.slow  # waits out the limits
def test_a_bucket_that_stalls_mid_read_or_mid_write_ends_the_command_in_one_line_keeping_the_tables(
    mixed_experiment, tmp_path, monkeypatch
):
    """A bucket answering its listing but never a trial's result.json: each call gave up after its limit, was taken
    as a file gone, and export went on trial after trial (15 s each), then replaced good tables with ones where
    every trial was lost; one never answering the experiment state's read had the table rebuilt without it. Writes
    into a bucket had no limit at all."""
    import pyarrow.fs

    def command(*argv: str) -> tuple[int, str, float]:
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-c", PATIENT_2_S, *argv], env=env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        return done.returncode, done.stderr.strip(), time.monotonic() - start

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with moto_bucket("bkt") as (port, _):
        place = "s3://bkt/p/{}?endpoint_override=127.0.0.1:{}&scheme=http&region=us-east-1"
        bucket, path = pyarrow.fs.FileSystem.from_uri(place.format("mixed", port))
        pyarrow.fs.copy_files(str(mixed_experiment[0]), path, destination_filesystem=bucket)
        out = tmp_path / "out"
        assert command("export", place.format("mixed", port), "--out", str(out))[0] == 0
        good = (out / "results.parquet").read_bytes()
        assert "lost" not in set(pd.read_parquet(out / "results.parquet")["status"])
        for held_part in ("/result.json", "/experiment_state-"):
            with holding_proxy(port, "GET", held_part) as held:
                code, err, took = command("export", place.format("mixed", held), "--out", str(out))
            assert code == 2 and took < 30, (held_part, err)  # the first call given up on ends it
            assert "stopped answering while it was read (" in err and "within 2 s); nothing was written" in err, err
            assert len(err.splitlines()) == 1 and (out / "results.parquet").read_bytes() == good
        with holding_proxy(port, "PUT", "/results.parquet") as held:
            code, err, took = command("export", str(mixed_experiment[0]), "--out", place.format("out", held))
        assert code == 2 and took < 40, err
        assert "cannot write into s3://bkt/p/out?" in err and "no answer within" in err, err
        assert len(err.splitlines()) == 1


STALLED_UPLOADS = """
import sys, time
from tune_alexnet import storage
from tune_alexnet.console import RayLines
from tune_alexnet.settings import SweepSettings, write_settings

storage.REACH_TIMEOUT_S = 2.0
start = time.monotonic()
try:
    write_settings(sys.argv[1], SweepSettings())
except TimeoutError as exc:
    print("record:", exc, round(time.monotonic() - start))
lines = RayLines(True)
lines.keep_in(sys.argv[1])
start = time.monotonic()
lines.close()
print("driver.log:", round(time.monotonic() - start))
"""


@pytest.mark.slow  # waits out the limits
def test_the_record_and_driver_log_given_to_a_stalled_bucket_are_given_up_on_within_the_limit(monkeypatch):
    """The settings record (written before a sweep starts) and driver.log (uploaded after its last line) were the
    only writes into a bucket with no time limit: one that stalled held the sweep for good, before its start or
    before its last line."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with moto_bucket("bkt") as (port, _), holding_proxy(port, "PUT", "/bkt/") as held:
        uri = f"s3://bkt/p/exp?endpoint_override=127.0.0.1:{held}&scheme=http&region=us-east-1"
        proc = subprocess.Popen([sys.executable, "-u", "-c", STALLED_UPLOADS, uri], env=env, stdout=subprocess.PIPE,
                                text=True)  # fmt: skip
        deadline = threading.Timer(60, proc.kill)  # (the process's exit waits for the calls given up on)
        deadline.start()
        record, log = proc.stdout.readline(), proc.stdout.readline()
        deadline.cancel()
    proc.kill()
    proc.wait()
    assert record.startswith("record: no answer within 2.0") and int(record.split()[-1]) < 5, (record, log)
    assert log.startswith("driver.log:") and int(log.split()[-1]) < 5, (record, log)


def test_a_resume_from_a_bucket_that_never_answers_is_one_line_within_the_limit(monkeypatch):
    """Tune's look for an experiment to resume was the one bucket call without a limit: pyarrow held the main
    thread in C++ (no stop signal heard) for 100 s on a silent endpoint, and for good on gs:// without
    credentials."""
    from tune_alexnet import preflight

    monkeypatch.setattr(preflight, "REACH_TIMEOUT_S", 2.0)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with socket.socket() as silent:  # takes each connection, answers none
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        exp = f"s3://bkt/p/exp?endpoint_override=127.0.0.1:{silent.getsockname()[1]}&scheme=http&region=us-east-1"
        start = time.monotonic()
        with pytest.raises(preflight.PreflightError) as refused:
            preflight._check_restorable(exp, "s3://bkt/p", "exp")
        took = time.monotonic() - start
    assert str(refused.value).startswith(f"{exp} cannot be reached (no answer within 2 s); allowed: a bucket URI")
    assert took < 10, took


def test_a_download_root_is_recorded_whole_and_may_be_given_again_on_resume(tmp_path, monkeypatch):
    """--download-root was recorded as typed: a resume from another folder downloaded CIFAR-10 again there (or,
    offline, was refused with the data on disk), and a --download-root given to the resume was dropped."""
    from tune_alexnet import api, preflight
    from tune_alexnet.settings import write_settings

    (tmp_path / "run1").mkdir()
    monkeypatch.chdir(tmp_path / "run1")
    s = api.settings(download_root="dl", storage=str(tmp_path / "st"), name="e1")
    assert s.download_root == f"{tmp_path}/run1/dl"
    (tmp_path / "st" / "e1").mkdir(parents=True)
    write_settings(str(tmp_path / "st" / "e1"), s)
    monkeypatch.setattr(preflight, "_check_restorable", lambda *args: None)  # (no Tune state in this folder)
    monkeypatch.chdir(tmp_path)
    for given, expected in (({}, f"{tmp_path}/run1/dl"), ({"download_root": "moved"}, f"{tmp_path}/moved")):
        again = api.settings(resume=True, storage=str(tmp_path / "st"), name="e1", **given)
        assert preflight.resume_settings(again, str(tmp_path / "st"), "e1").download_root == expected


def test_a_link_loop_before_dot_dot_in_a_path_is_one_line(tmp_path, capsys, synthetic_dir):
    """Python's Path.resolve raises RuntimeError on a link loop, which a path's `x/..` hides from the checks of the
    path as typed: another user's loop planted in /tmp gave a traceback in every command, and in the API."""
    from tune_alexnet import api
    from tune_alexnet.export import ExportError

    (tmp_path / "x").symlink_to(tmp_path / "x" / "y")
    looped, storage = f"{tmp_path}/x/..", str(tmp_path / "results")
    for argv, needle in (
        (["export", looped], f"{tmp_path}/x is a link to nothing"),  # (the system goes through x before the ..)
        (["report", looped], f"{tmp_path}/x is a link to nothing"),
        (["sweep", "--data-dir", looped, "--storage", storage, *TINY], f"{tmp_path}/x is a link to nothing"),
        (["sweep", "--data-dir", str(synthetic_dir), "--storage", looped, *TINY], f"{tmp_path}/x is a link to "),
    ):
        assert needle in one_line_exit_2(argv, capsys), argv
    with pytest.raises(ExportError, match="x is a link to nothing"):
        api.table(looped)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_a_record_holds_what_the_flags_would_have_let_in_and_nothing_else():
    """A record's 20.0 for --subset passed the checks and failed as a float slice index deep in the data's loading;
    its MLflow URI and W&B project were never parsed as the flags' are, and failed in tracebacks of their own."""
    from dataclasses import asdict

    from tune_alexnet.settings import SweepSettings, from_record

    record = json.loads(json.dumps({k: v for k, v in asdict(SweepSettings()).items() if k not in ("resume", "asked")}))
    assert from_record(record) == SweepSettings()
    for field, value, needle in (
        ("subset", 20.0, "subset: 20.0; allowed: a whole number >= 1 and <= 1000000"),
        ("epochs", 30.0, "epochs: 30.0; allowed: a whole number"),
        ("max_failures", 1.0, "max_failures: 1.0; allowed: a whole number"),
        ("mlflow", "http://[::1", "mlflow: 'http://[::1' (Invalid IPv6 URL); allowed: a tracking URI"),
        ("mlflow", "http://h:99999", "mlflow: 'http://h:99999' (Port out of range 0-65535); allowed: a tracking URI"),
        ("wandb", "a/b", "wandb: 'a/b'; allowed: a W&B project name"),
        ("wandb", "\x1b[31m", "wandb: '\\x1b[31m'; allowed: a W&B project name"),
        ("data_dir", "/data/a\x00b", "data_dir: '/data/a\\x00b'; allowed: UTF-8 text without control characters"),
        ("download_root", "/dl\nx", "download_root: '/dl\\nx'; allowed: UTF-8 text without control"),
        ("data_dir", "/d\u202ex", "data_dir: '/d\\u202ex'; allowed: UTF-8 text"),  # a text-direction mark
        ("mlflow", "sqlite:////tmp/\ud800.db", "mlflow: 'sqlite:////tmp/\\ud800.db'; allowed: UTF-8 text"),
    ):
        with pytest.raises(ValueError) as refused:
            from_record({**record, field: value})
        assert str(refused.value).startswith(needle), str(refused.value)
    with pytest.raises(ValueError, match=r"^grid.batch_size: 32.0; allowed: a whole number"):
        from_record({**record, "grid": {**record["grid"], "batch_size": [32.0]}})
    with pytest.raises(ValueError, match=r"^runtime.augment_chunk: 8.0; allowed: a whole number"):
        from_record({**record, "runtime": {"augment_chunk": 8.0}})


def test_a_resume_refuses_a_tracker_its_experiment_did_not_start_with(mixed_experiment, synthetic_dir, capsys):
    """Tune restores the experiment's own callbacks: a tracker added on --resume was silently never used."""
    path = Path(mixed_experiment[0])
    resume = ["sweep", "--resume", "--name", path.name, "--storage", str(path.parent), "--data-dir", str(synthetic_dir)]
    err = one_line_exit_2([*resume, "--mlflow", "http://bob:s3cret-pw@127.0.0.1:1"], capsys)
    assert "--mlflow http://bob:***@127.0.0.1:1 (the experiment was started without it)" in err, err
    assert "s3cret-pw" not in err
    err = one_line_exit_2([*resume, "--wandb", "proj", "--mlflow", "http://127.0.0.1:1"], capsys)
    assert "--mlflow http://127.0.0.1:1 (the experiment was started without it); --wandb proj (the experiment " in err
    assert "drop those flags, or start a new experiment with another --name" in err
    err = one_line_exit_2([*resume, "--epochs", "9", "--subset", "5"], capsys)  # every change named at once
    assert (
        "--epochs 9 differs from the experiment's own 3; --subset 5 differs from the experiment's own all images "
        in err
    )


def test_a_log_line_naming_a_tracker_uri_is_shown_and_kept_redacted():
    import logging

    from tune_alexnet.console import RayLines

    lines = RayLines(quiet=False)
    uri = "http://alice:s3cret-pw@127.0.0.1:5000/#/experiments/1?token=s3cret-pw"
    record = logging.LogRecord("mlflow", logging.WARNING, __file__, 1, "View run at %s", (uri,), None)
    assert lines.filter(record)  # shown, as a warning is
    assert "s3cret-pw" not in record.getMessage() and "alice:***@127.0.0.1:5000" in record.getMessage()
    assert len(lines.kept) == 1 and "s3cret-pw" not in lines.kept[0]  # for driver.log
    lines.worker_lines({"lines": [f"run at {uri}"], "pid": 1})
    assert "s3cret-pw" not in lines.kept[1]


def test_an_empty_or_dangling_out_is_one_line_and_nothing_is_made(tmp_path, capsys):
    target = tmp_path / "nowhere"
    dangling = tmp_path / "dang"
    dangling.symlink_to(target)
    err = one_line_exit_2(["export", str(tmp_path), "--out", str(dangling)], capsys)
    assert f"({dangling} is a link to nothing)" in err and not target.exists()
    err = one_line_exit_2(["export", str(tmp_path), "--out", str(dangling / "sub" / "deeper")], capsys)
    assert f"({dangling} is a link to nothing)" in err and not target.exists()  # not made as mkdir -p would
    err = one_line_exit_2(["report", str(tmp_path), "--out", ""], capsys)
    assert "an empty path; allowed: a folder or URI" in err


@pytest.mark.parametrize("command,taken", [("export", "epochs.parquet"), ("report", "report-data.js")])
def test_an_out_folder_where_a_folder_takes_one_name_of_the_set_gets_none_of_it(mixed_experiment, tmp_path, capsys,
                                                                                 command, taken):  # fmt: skip
    out = tmp_path / "out"
    (out / taken).mkdir(parents=True)
    err = one_line_exit_2([command, str(mixed_experiment[0]), "--out", str(out)], capsys)
    assert f"cannot write {out / taken}: a folder has that name; allowed: an --out folder where the names of " in err
    assert sorted(p.name for p in out.iterdir()) == [taken]  # nothing of the set, not even the lock file


def test_a_state_naming_one_folder_for_many_trials_reads_it_once(damaged):
    """An edited state that names one trial folder N times made every export read it N times (minutes for a big
    result.json) and repeat its row N times."""
    from tune_alexnet.export import load_experiment

    copy, before = damaged
    state = sorted(copy.glob("experiment_state-*.json"))[-1]
    raw = json.loads(state.read_text())
    first = json.loads(raw["trial_data"][0][0])
    for i in range(3):
        raw["trial_data"].append([json.dumps({**first, "trial_id": f"copy{i}"}), raw["trial_data"][0][1]])
    state.write_text(json.dumps(raw))
    table = load_experiment(copy).table.set_index("trial_id")
    assert len(table) == len(before) + 3
    copies = table.loc[["copy0", "copy1", "copy2"]]
    assert (copies["status"] == "damaged").all() and copies["final_accuracy"].isna().all()
    assert copies["error"].str.contains(f"is trial {first['trial_id']}'s folder; allowed: a folder of its own").all()
    original = table.loc[first["trial_id"]]
    assert original["status"] == before.set_index("trial_id").loc[first["trial_id"], "status"]


@pytest.mark.slow  # a sweep on Ray
def test_no_trial_imports_what_another_user_left_in_the_folder_the_sweep_runs_in(synthetic_dir, tmp_path):
    """ray.init put the working folder first on every worker's import path: a torch.py another user left in a
    shared folder the sweep was started in (as /tmp is) ran in every trial, as this user."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    ran = tmp_path / "ran"
    (shared / "torch.py").write_text(f"open({str(ran)!r}, 'w').write('their code ran')\nraise ImportError\n")
    os.chown(shared / "torch.py", 65534, 65534)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    argv = ["sweep", "--data-dir", str(synthetic_dir), "--storage", str(tmp_path / "r"), "--name", "s", *TINY]
    out = subprocess.run([str(Path(sys.executable).parent / "tune-alexnet"), *argv], cwd=shared, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0 and not ran.exists(), out.stderr[-3000:]
    assert list(pd.read_parquet(tmp_path / "r" / "s" / "results.parquet")["status"]) == ["terminated"]
