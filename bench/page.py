"""The study page of a full-size experiment: how long it takes to open in headless Chromium, and its size.

    python bench/page.py [--runs 108] [--epochs 100] [--repeat 3] [--browsers 1]

Builds synthetic tables with the real schema (export.TABLE_SCHEMA, EPOCH_SCHEMA): every run of the study's grid,
each with `--epochs` epochs, a few diverged and errored, then writes report.html and opens it from file:// with
the network cut off. "open" is the browser's own clock from navigation start to the page fully drawn; "load" is
selenium's wall clock for the same (the page draws before its load event).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tune_alexnet.export import EPOCH_SCHEMA, TABLE_SCHEMA, Experiment, typed  # noqa: E402
from tune_alexnet.grid import study_config  # noqa: E402
from tune_alexnet.report import reference_table  # noqa: E402
from tune_alexnet.settings import DIMENSIONS, Grid  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--enable-unsafe-swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--proxy-server=127.0.0.1:9",  # anything that tried the network would reach nothing
    "--proxy-bypass-list=<-loopback>",
    "--window-size=1400,1000",
)


def synthetic_experiment(path: str, runs: int = 108, epochs: int = 100, mark: str = "", seed: int = 0) -> Experiment:
    """An experiment as export.load_experiment returns it, without a sweep: the first `runs` runs of the study's
    grid, accuracies near the original's, every fifth run stopped early, run 9 diverged and run 10 errored.
    `mark` is put into every string a folder can set (errors, class names, the data folder, the node)."""
    rng = np.random.default_rng(seed)
    ref = reference_table().set_index("run")["final_accuracy"]
    rows, frames = [], []
    for run in range(1, runs + 1):
        c = study_config(run)
        trial_id = f"a1b2c_{run:05d}"
        final = float(np.clip(ref[run] + rng.normal(0, 2), 10, 95))
        n = epochs if run % 5 else max(3, epochs // 3)
        status, error = "terminated", None
        if run == 9:
            status, n, final = "diverged", min(epochs, 4), 10.0
        if run == 10:
            status, n, error = "errored", 0, f"RuntimeError: CUDA error: out of memory {mark}".strip()
        ep = np.arange(1, n + 1)
        acc = final * (1 - np.exp(-ep / max(n / 4, 1))) + rng.normal(0, 0.6, n)
        acc = np.clip(acc, 0, 100)
        loss = 2.3 * np.exp(-ep / max(n / 3, 1)) + 0.05 + rng.uniform(0, 0.02, n)
        best = np.maximum.accumulate(acc)
        best_epoch = np.array([int(np.argmax(acc[: i + 1])) + 1 for i in range(n)])
        frames.append(
            pd.DataFrame(
                {
                    "trial_id": trial_id,
                    "run": run,
                    **{d: c[d] for d in DIMENSIONS},
                    "seed": 42,
                    "epoch": ep,
                    "train_loss": loss,
                    "train_acc": np.clip(acc + 5, 0, 100),
                    "val_loss": loss * 1.1,
                    "val_acc": acc,
                    "best_val_acc": best,
                    "best_epoch": best_epoch,
                    "epochs_since_best": ep - best_epoch,
                    "train_s": 10.0,
                    "eval_s": 1.0,
                    "train_time_s": ep * 10.0,
                    "eval_time_s": ep * 1.0,
                    "diverged": [False] * (n - 1) + [status == "diverged"] if n else [],
                    "device": "cuda:0",
                    "precision": "fp32",
                    "node_id": f"node {mark}".strip(),
                }
            )
        )
        rows.append(
            {
                "run": run,
                **{d: c[d] for d in DIMENSIONS},
                "seed": 42,
                "final_accuracy": round(float(best[-1]), 2) if n and status != "diverged" else None,
                "epochs_run": n,
                "best_epoch": int(best_epoch[-1]) if n else None,
                "max_epochs": epochs,
                "stopped_early": status == "terminated" and n < epochs,
                "status": status,
                "error": error,
                "train_time_s": n * 10.0,
                "eval_time_s": n * 1.0,
                "trial_id": trial_id,
                "node_id": "node",
            }
        )
    table = typed(pd.DataFrame(rows), TABLE_SCHEMA)
    epochs_df = typed(pd.concat(frames, ignore_index=True), EPOCH_SCHEMA)
    grid = {d: list(v) for d, v in Grid().values().items()}
    settings = {
        "grid": grid,
        "runs": [],
        "epochs": epochs,
        "patience": 5,
        "repeats": 1,
        "trial": {"width": 1.0},
        "data": {
            "classes": [
                f"airplane {mark}".strip(),
                "automobile",
                "bird",
                "cat",
                "deer",
                "dog",
                "frog",
                "horse",
                "ship",
                "truck",
            ],  # fmt: skip
            "train_images": 50000,
            "test_images": 10000,
            "source": f"/data/cifar10 {mark}".strip(),
        },
    }
    return Experiment(path, table, epochs_df, settings, [])


def chromium(user_data_dir: str):
    """Headless Debian Chromium through its chromedriver, offline: a proxy to nowhere and DevTools' offline mode."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={user_data_dir}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd(
        "Network.emulateNetworkConditions",
        {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
    )
    return driver


def open_page(driver, page: Path) -> tuple[float, float]:
    """(seconds from navigation start to the page drawn, by the browser's clock; selenium's wall seconds)."""
    start = time.perf_counter()
    driver.get(page.resolve().as_uri())
    while driver.execute_script("return document.body && document.body.dataset.ready") != "1":
        if time.perf_counter() - start > 60:
            raise TimeoutError(f"{page} was not drawn within 60 s")
        time.sleep(0.01)
    wall = time.perf_counter() - start
    return float(driver.execute_script("return Number(document.body.dataset.readyMs)")) / 1000, wall


def main() -> None:
    from tune_alexnet.page import write_page

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=108)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3, help="opens in each browser")
    p.add_argument("--browsers", type=int, default=1, help="fresh browsers (each one's first open parses plotly.js)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-page-"))
    try:
        exp = synthetic_experiment(str(tmp / "bench"), args.runs, args.epochs)
        t0 = time.perf_counter()
        page = Path(write_page(exp, tmp / "bench"))
        write_s = time.perf_counter() - t0
        size = page.stat().st_size
        sidecar = (page.parent / "report-data.js").stat().st_size
        times = []
        for b in range(args.browsers):
            driver = chromium(str(tmp / f"profile-{b}"))
            try:
                times += [(b + 1, i + 1, *open_page(driver, page)) for i in range(args.repeat)]
            finally:
                driver.quit()
        print(f"runs {args.runs}, epochs {args.epochs}, points {len(exp.epochs)}")
        print(f"{'what':<34} {'value':>12}")
        print(f"{'report.html size':<34} {size / 1e6:>10.2f} MB")
        print(f"{'report-data.js size':<34} {sidecar / 1e3:>10.0f} KB")
        print(f"{'write (Python)':<34} {write_s:>10.2f} s")
        for b, i, browser_s, wall_s in times:
            print(f"{f'browser {b}, open #{i} (browser / wall)':<34} {browser_s:>6.2f} s / {wall_s:.2f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
