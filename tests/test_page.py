"""The study page (report.html) in a real headless Chromium, offline: the page of a real small sweep, and synthetic
tables with the real schema for what a small sweep cannot show (a brush, live updates, planted markup).

Skipped where Chromium, its driver or selenium is missing, except with TUNE_ALEXNET_NEEDS_BROWSER=1 (CI), where
that is a failure.
"""

import importlib.util
import io
import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import load_bench

from tune_alexnet.export import best_run
from tune_alexnet.page import DATA_NAME, PAGE_NAME, page_data, sidecar, to_json, variance_shares, write_page
from tune_alexnet.report import reference_table

bench_page = load_bench("page")

# Markup planted in every string a folder can set: none of it may run, all of it must read as text.
PLANT = "<img src=x onerror=window.__pwned=1></script><script>window.__pwned=2</script>"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [p for p in (bench_page.CHROMIUM, bench_page.CHROMEDRIVER) if not shutil.which(p)]
    if importlib.util.find_spec("selenium") is None:
        missing.append("selenium")
    if missing:
        if os.environ.get("TUNE_ALEXNET_NEEDS_BROWSER") == "1":
            pytest.fail(f"TUNE_ALEXNET_NEEDS_BROWSER=1 but {', '.join(missing)} is missing")
        pytest.skip(f"{', '.join(missing)} is missing (apt-get install chromium chromium-driver)")
    driver = bench_page.chromium(str(tmp_path_factory.mktemp("chromium-profile")))
    yield driver
    driver.quit()


def open_page(driver, page: Path) -> None:
    driver.get_log("browser")  # what an earlier page logged is not this one's
    bench_page.open_page(driver, page)


def rows(driver) -> list[dict]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#runs tbody tr')].map(r => ({trial: r.dataset.trial, "
        "cells: [...r.cells].map(c => c.textContent), cls: r.className}))"
    )


def assert_clean(driver) -> None:
    """No console errors, nothing fetched but file://, no planted script ran."""
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    names = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(n.startswith("file://") for n in names), names
    assert driver.execute_script("return window.__pwned") is None


def assert_not_blank(driver) -> None:
    from PIL import Image

    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("L")
    lo, hi = image.getextrema()
    assert hi - lo > 100 and len(set(image.resize((64, 64)).getdata())) > 20


def test_json_in_the_page_cannot_close_its_script_and_variance_shares_are_exact():
    text = to_json({"a": PLANT + "&\u2028\u2029"})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"a": PLANT + "&\u2028\u2029"}
    ref = reference_table()
    shares = variance_shares(ref)
    y = ref["final_accuracy"]
    means = ref.groupby("lr")["final_accuracy"].mean()
    by_hand = 36 * ((means - y.mean()) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert shares["lr"] == pytest.approx(by_hand) and 0 < sum(shares.values()) <= 1
    # One rule for the best run: ties go to the lowest run number, then the earliest trial.
    exp = bench_page.synthetic_experiment("/x", runs=4, epochs=3)
    exp.table["final_accuracy"] = [50.0, 60.0, 60.0, 60.0]
    exp.table.loc[3, "run"] = 2
    exp.table.loc[3, "trial_id"] = "a1b2c_00000"
    assert best_run(exp.table)["trial_id"] == "a1b2c_00000"
    # Each optimizer's original numbers are over the runs this experiment made, not the whole grid.
    part = bench_page.synthetic_experiment("/x", runs=24, epochs=3)  # sgd's runs 1..24 of its 36
    (sgd,) = page_data(part)["optimizers"]
    ref = reference_table()
    made = part.table.loc[part.table["final_accuracy"].notna(), "run"]  # run 9 diverged, run 10 errored
    same = ref[ref["run"].isin(made)]
    assert int(sgd["orig_best_run"]) in set(made)
    assert sgd["orig_mean"] == pytest.approx(same["final_accuracy"].mean(), abs=0.01)


def test_the_embedded_plotly_is_the_pinned_build_and_every_page_asset_ships_in_the_package():
    import re
    import tomllib

    root = Path(__file__).resolve().parents[1]
    pinned = json.loads((root / "tools/plotly/package.json").read_text())["dependencies"]["plotly.js"]
    banner = (root / "tune_alexnet/plotly.min.js").read_text()[:200]
    assert re.match(rf"/\*! plotly\.js v{re.escape(pinned)}: ", banner), banner
    shipped = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    read = set(re.findall(r"_asset\([\"']([^\"']+)[\"']\)", (root / "tune_alexnet/page.py").read_text()))
    assert read == {"page.html", "page.css", "page.js", "plotly.min.js"} and read <= set(shipped["tune_alexnet"])


@pytest.mark.slow
def test_a_real_sweeps_page_opens_offline_with_its_runs_and_failures(mixed_experiment, browser):
    path, exp = mixed_experiment
    page = Path(path, PAGE_NAME)
    assert page.is_file() and 1e6 < page.stat().st_size < 8e6
    assert '"live":null' in Path(path, DATA_NAME).read_text()  # the sweep ended: an open page stops polling
    assert "study page was not written" not in Path(path, "driver.log").read_text()  # the live writes worked
    open_page(browser, page)
    shown = rows(browser)
    assert sorted(r["trial"] for r in shown) == sorted(exp.table["trial_id"])
    problems = browser.execute_script(
        "return [...document.querySelectorAll('#problems tbody tr')].map(r => r.cells[3].textContent + ' ' + "
        "r.cells[5].textContent)"
    )
    assert sorted(p.split()[0] for p in problems) == sorted(
        exp.table.loc[exp.table["status"].isin(["errored", "diverged"]), "status"]
    )
    assert any("nosuchopt" in p for p in problems)
    assert_clean(browser)
    assert_not_blank(browser)


def test_axes_read_whole_epochs_and_distinct_losses_and_the_table_fits_a_laptop_screen(browser, tmp_path):
    """A two-epoch sweep's curves tick at whole epochs, the log loss axis never repeats a label or drops its
    decade, and every column of the run table shows at 1280 px. The page runs no eval and loads no file
    scripts except through its own code."""
    exp = bench_page.synthetic_experiment(str(tmp_path / "short"), runs=24, epochs=2)
    page = Path(write_page(exp, tmp_path / "short"))
    csp = page.read_text().split('http-equiv="Content-Security-Policy" content="')[1].split('"')[0]
    script_src = next(d for d in csp.split(";") if d.strip().startswith("script-src")).split()
    assert "'strict-dynamic'" in script_src and not {"'unsafe-eval'", "'unsafe-inline'", "file:"} & set(script_src)
    browser.set_window_size(1280, 900)
    try:
        open_page(browser, page)
        fits = "const s = document.getElementById('runs').parentElement; return s.scrollWidth <= s.clientWidth"
        assert browser.execute_script(fits)
        browser.execute_script("document.getElementById('curve-acc').scrollIntoView()")
        ticks = "return [...document.querySelectorAll('#%s .%s text')].map(t => t.textContent)"
        deadline = time.time() + 10
        while not browser.execute_script(ticks % ("curve-loss", "ytick")):
            assert time.time() < deadline, "the curves were not drawn"
            time.sleep(0.1)
        epochs = browser.execute_script(ticks % ("curve-acc", "xtick"))
        assert epochs and all(t.isdigit() for t in epochs) and len(set(epochs)) == len(epochs), epochs
        losses = browser.execute_script(ticks % ("curve-loss", "ytick"))
        values = [float(t) for t in losses]
        lo, hi = exp.epochs["train_loss"].min(), exp.epochs["train_loss"].max()
        assert len(set(losses)) == len(losses) >= 2 and all(lo <= v <= hi for v in values), (losses, lo, hi)
        # One optimizer here: the curves are coloured by the first setting that varies, and the importance view
        # says which settings did not vary instead of drawing them a 0 % bar.
        assert browser.execute_script("return document.getElementById('colour-by').value") == "lr"
        browser.execute_script("document.getElementById('importance').scrollIntoView()")
        deadline = time.time() + 10
        while not browser.execute_script(ticks % ("importance", "ytick")):
            assert time.time() < deadline, "the importance view was not drawn"
            time.sleep(0.1)
        assert "optimizer (not varied)" in browser.execute_script(ticks % ("importance", "ytick"))
        assert_clean(browser)
    finally:
        browser.set_window_size(1400, 1000)


def drag_on_axis(driver, axis: int, top: float, bottom: float) -> None:
    """A real mouse drag along a parallel-coordinates axis, from `top` to `bottom` (fractions of its height)."""
    from selenium.webdriver.common.action_chains import ActionChains

    target = driver.find_elements("css selector", "#parcoords .axis-brush rect.background")[axis]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", target)
    h = target.size["height"]
    ActionChains(driver).move_to_element_with_offset(target, 0, int((top - 0.5) * h)).click_and_hold().move_by_offset(
        0, int((bottom - top) * h / 2)
    ).move_by_offset(0, int((bottom - top) * h / 2)).release().perform()


def test_brush_sort_highlight_survive_a_live_update_and_planted_markup_stays_text(browser, tmp_path):
    exp = bench_page.synthetic_experiment(str(tmp_path / PLANT.replace("/", "|")), runs=24, epochs=12, mark=PLANT)
    errored = exp.table["run"] == 10
    exp.table.loc[errored, "error"] = PLANT  # an errored trial's one line, and its trial name
    exp.table.loc[errored, "trial_id"] = "a1b2c_00010" + PLANT
    folder = tmp_path / "exp"
    live = {"running": [], "pending": 2, "left_s": 90.0, "elapsed_s": 30.0}
    page = Path(write_page(exp, folder, live=live, poll_s=0.5))
    html = page.read_text()
    assert "<img src=x" not in html and "<script>window.__pwned" not in html
    open_page(browser, page)
    assert len(rows(browser)) == len(exp.table)  # one row per trial
    # The planted strings read as text where they are shown; none became an element.
    text = browser.execute_script("return document.body.innerText")
    assert PLANT in text and text.count("window.__pwned=2") >= 5  # title, path, data folder, classes, error, trial
    assert browser.execute_script("return document.querySelectorAll('img').length") == 0

    # A header click sorts (best accuracy, highest first; empty cells last).
    browser.find_element("css selector", "#runs th[data-key='acc']").click()
    accs = [float(r["cells"][7]) for r in rows(browser) if r["cells"][7]]
    assert accs == sorted(accs, reverse=True) and len(accs) == exp.table["final_accuracy"].notna().sum()

    # A real mouse drag on the accuracy axis (the last one) keeps only the runs in its range.
    drag_on_axis(browser, -1, 0.05, 0.5)
    time.sleep(0.3)
    brushed = rows(browser)
    ranges = browser.execute_script("return window.tuneAlexnetState.constraints.acc")
    assert ranges and 0 < len(brushed) < len(exp.table)
    assert all(min(ranges) <= float(r["cells"][7]) <= max(ranges) for r in brushed)

    # A row click highlights that run's curve.
    chosen = brushed[1]["trial"]
    browser.find_element("css selector", f"#runs tr[data-trial='{chosen}']").click()
    highlighted = (
        "return document.getElementById('curve-acc').data.filter(t => t.meta).map(t => [t.meta, t.line.width])"
    )
    assert browser.execute_script(highlighted) == [[chosen, 3.5]]

    # New data arrives (curves move, a run outside the brush reaches its range); sort, brush and highlight stay.
    exp.epochs["val_acc"] = exp.epochs["val_acc"] * 0.99
    lo, hi = min(ranges), max(ranges)
    outside = next(i for i, r in exp.table.iterrows() if r["trial_id"] not in {b["trial"] for b in brushed})
    exp.table.loc[outside, "final_accuracy"] = (lo + hi) / 2
    data = page_data(exp, live={**live, "pending": 1}, poll_s=0.5)
    (folder / DATA_NAME).write_text(sidecar(data))
    deadline = time.time() + 15
    while browser.execute_script("return document.body.dataset.updates") != "1":
        assert time.time() < deadline, "the open page did not pick up report-data.js"
        time.sleep(0.2)
    after = rows(browser)
    assert browser.execute_script("return window.tuneAlexnetState.constraints.acc") == ranges
    assert (
        browser.find_element("css selector", "#runs th[data-key='acc']").get_attribute("class").endswith("sorted-desc")
    )
    assert {r["trial"] for r in after} == {r["trial"] for r in brushed} | {exp.table.loc[outside, "trial_id"]}
    assert [float(r["cells"][7]) for r in after] == sorted((float(r["cells"][7]) for r in after), reverse=True)
    assert browser.execute_script(highlighted) == [[chosen, 3.5]]
    assert "highlight" in next(r["cls"] for r in after if r["trial"] == chosen)
    assert "1 pending" in browser.find_element("id", "live-line").text

    # The sweep ends: the page says so and stops polling.
    (folder / DATA_NAME).write_text(sidecar(page_data(exp, live=None)))
    while browser.execute_script("return document.body.dataset.updates") != "2":
        assert time.time() < deadline + 15
        time.sleep(0.2)
    assert browser.find_element("id", "live-badge").text == "finished"
    assert_clean(browser)


@pytest.mark.slow
def test_a_resumed_sweeps_page_takes_earlier_epochs_from_the_folder(mixed_experiment):
    """The live page's tables equal export's for trials that reported nothing since the restart, and a trial's new
    epochs replace the folder's from the first one reported again."""
    from tune_alexnet.live_page import LivePage

    path, exp = mixed_experiment
    status = {"terminated": "TERMINATED", "diverged": "TERMINATED", "errored": "ERROR"}
    trials = []
    for row in exp.table.to_dict("records"):
        params = json.loads(next(Path(path).glob(f"*{row['trial_id']}*/params.json")).read_text())
        trials.append(SimpleNamespace(trial_id=row["trial_id"], status=status[row["status"]], config=params,
                                      last_result={}, get_error=lambda: None))  # fmt: skip
    callback = LivePage(path)
    live = callback.experiment(trials)
    cols = ["run", "optimizer", "lr", "final_accuracy", "epochs_run", "best_epoch", "status", "error", "trial_id"]
    assert live.table[cols].equals(exp.table[cols])
    assert live.epochs[["trial_id", "epoch", "val_acc"]].equals(exp.epochs[["trial_id", "epoch", "val_acc"]])
    trained = exp.table.loc[exp.table["status"] == "terminated", "trial_id"].iloc[0]
    callback.on_trial_result(0, trials, SimpleNamespace(trial_id=trained), {"epoch": 2, "val_acc": 1.0})
    redone = callback.experiment(trials).epochs
    assert redone.loc[redone["trial_id"] == trained, "val_acc"].tolist()[1:] == [1.0]


def test_a_page_that_cannot_be_written_is_logged_in_driver_log_and_the_sweep_goes_on(tmp_path):
    from tune_alexnet.console import RayLines
    from tune_alexnet.live_page import LivePage

    (tmp_path / "afile").write_text("not a folder")
    with RayLines(quiet=True) as lines:
        lines.keep_in(str(tmp_path))
        callback = LivePage(str(tmp_path / "afile" / "exp"))
        callback.write([], live=True)  # raises nothing
        callback.write([], live=True)
    log = (tmp_path / "driver.log").read_text().splitlines()
    levels = [line.split()[2] for line in log if "study page was not written" in line]
    # The first failure is a warning, later ones are kept quietly (each line once per handler of Ray's logger).
    assert set(levels) == {"WARNING", "INFO"} and levels == sorted(levels, key=lambda level: level == "INFO")
