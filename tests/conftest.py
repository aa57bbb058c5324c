import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MINI = SHARED_DATA / "cifar10-mini"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# A command's prefix that runs it as root without root's override of file modes, as any other user meets them
NO_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]


def load_bench(script: str):
    """A bench/ script as a module (bench/ is no package; its modules import each other by name)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    found = importlib.util.spec_from_file_location(f"bench_{script}", BENCH / f"{script}.py")
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    return module


@contextlib.contextmanager
def moto_bucket(bucket: str, key_id: str = "testing", secret: str = "testing", log: Path | None = None):
    """moto's S3 emulator on a free loopback port, with `bucket` made: yields (port, boto3 client); killed after."""
    import boto3

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log.open("w") if log else subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              start_new_session=True)  # fmt: skip
    try:
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                              aws_access_key_id=key_id, aws_secret_access_key=secret)  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                client.create_bucket(Bucket=bucket)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        yield port, client
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep decoded-array caches and torchvision downloads out of the user's home."""
    os.environ["TUNE_ALEXNET_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "0"


@pytest.fixture(scope="session", autouse=True)
def _stop_signals_as_from_a_terminal():
    """Tests stop sweeps with Ctrl-C, SIGTERM and SIGHUP, and a sweep leaves a signal it was started ignoring
    ignored (nohup): so the tests, and the sweeps they start, heed them as from a terminal, whatever ran the test
    run (a background job ignores SIGINT)."""
    import signal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for sig, handler in before.items():
        if handler is signal.SIG_IGN:
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


def make_image_folder(root: Path, train_per_class: int = 20, test_per_class: int = 4, seed: int = 0) -> Path:
    """Generated CIFAR-like PNGs: each class a colour with noise, so a network can learn it."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            base = np.array([(label * 25) % 256, (label * 70) % 256, (255 - label * 25) % 256], np.float32)
            for i in range(n):
                img = np.clip(base + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                img[8 + label : 12 + label, :, :] = 255  # a class-dependent stripe
                Image.fromarray(img).save(d / f"{i:04d}.png")
    return root


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def mini_dir() -> Path:
    if not MINI.is_dir():
        pytest.skip(f"{MINI} is absent (real CIFAR-10 slice)")
    return MINI


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for the session, with few CPUs."""
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mixed_experiment(ray_local, synthetic_dir, tmp_path_factory):
    """One trial that trains, one that diverges, two that error: what exports and reports must survive."""
    from tune_alexnet.cli import run_study
    from tune_alexnet.grid import make_grid
    from tune_alexnet.settings import SweepSettings

    s = SweepSettings(
        grid=make_grid(
            optimizer=("adam", "nosuchopt"), lr=(0.001, 1e6), batch_size=(32,), dropout=(False,), batchnorm=(False,)
        ),
        epochs=3,
        data_dir=str(synthetic_dir),
        storage=str(tmp_path_factory.mktemp("mixed")),
        name="mixed",
        max_failures=0,
        trial={"width": 0.125},
    )
    return run_study(s)[:2]


@pytest.fixture(autouse=True)
def _local_ray_folders_stay_with_their_test(monkeypatch):
    """A sweep run in the test process points RAY_TMPDIR and TORCHINDUCTOR_CACHE_DIR at its private folder, which
    a test's own temporary folder may hold: the sweeps of later tests, in processes of their own, were given the
    names of folders gone (and refused them, as folders another user could make first)."""
    from tune_alexnet import cluster

    for name in (cluster.RAY_TMPDIR, cluster.KERNEL_CACHE):
        monkeypatch.setenv(name, os.environ.get(name, ""))  # each put back as it was, or removed, after the test
        if not os.environ[name]:
            monkeypatch.delenv(name)
    for name in ("_ray_tmpdir", "_kernel_cache"):
        monkeypatch.setattr(cluster, name, getattr(cluster, name))
