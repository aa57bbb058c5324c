"""The benchmark scripts run end to end on tiny settings, so they work when a GPU is there to measure.

bench/device.sh is meant for a GPU machine that has no Ray: its smoke runs here go through the same parts (the
default five, and the fidelity A/B) with `import ray` made to fail.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_bench

from tune_alexnet.storage import RESERVE_NAME

pytestmark = pytest.mark.slow  # real sweeps and subprocesses

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
NUMBER = r"[\d,]+(?:\.\d+)?"
MINI = ROOT.parent / "shared" / "data" / "cifar10-mini"  # real CIFAR-10 images, where present


def run(script, *args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def common():
    return load_bench("device_common")


@pytest.fixture(scope="module")
def ab():
    return load_bench("ab")


@pytest.fixture
def no_ray_env(tmp_path):
    """An environment in which `import ray` raises ImportError, in this process's children and theirs."""
    blocker = tmp_path / "no-ray" / "ray"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('ray is not installed on this machine')\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(blocker.parent)
    env["PYTHON"] = sys.executable
    probe = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "ray is not installed" in probe.stderr
    return env


def sections(summary: str) -> dict[str, str]:
    """summary.md's part sections by their letter: "(a)" ... "(f)"."""
    found = re.split(r"^## (\([a-f]\))", summary, flags=re.M)
    return dict(zip(found[1::2], found[2::2]))


@pytest.mark.parametrize("out_is", ["another user's", "writable by all"])
def test_the_device_call_writes_into_no_folder_another_user_could_plant_links_in(no_ray_env, tmp_path, out_is):
    """Its files are written by name: a planted link in a shared --out (a /tmp path, as its help once showed)
    had them overwrite the user's own file."""
    out = tmp_path / "out"
    out.mkdir()
    if out_is == "another user's":
        os.chown(out, 65534, 65534)
    else:
        out.chmod(0o777)
    env = {**no_ray_env, "OUT": str(out)}
    for command in (["bash", "bench/device.sh"], [sys.executable, "bench/device.py", "--out", str(out)]):
        done = subprocess.run([*command, "--smoke", "--data-dir", str(tmp_path)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 2 and "another user's folder, or writable by all" in done.stderr, done.stderr
        assert list(out.iterdir()) == []


def test_device_smoke_runs_every_part_without_ray(no_ray_env, synthetic_dir, tmp_path):
    data = MINI if MINI.is_dir() else synthetic_dir
    out = tmp_path / "out"
    env = {**no_ray_env, "OUT": str(out)}
    done = subprocess.run(
        ["bash", "bench/device.sh", "--smoke", "--data-dir", str(data), "--budget-s", "60"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu-tests.txt", "log.txt", "rows.jsonl", "summary.md"]
    assert "skipped" in (out / "gpu-tests.txt").read_text()  # the CUDA tests ran first, and skip without CUDA
    text = sections((out / "summary.md").read_text())

    step = text["(a)"]
    cpu = r"fp32 \(TF32 is CUDA's\)"
    for batch in (32, 128):  # the bound and the eager rows measured; what needs CUDA says so instead of failing
        bound = rf"^\| bound: graph, pre-augmented \(eager here\) \| {cpu} \| {batch} \| pre-augmented \| {NUMBER} \|"
        assert re.search(bound, step, re.M), step
        for chunk in (0, 128):
            assert re.search(
                rf"^\| eager \| {cpu} \| {batch} \| {chunk} \| {NUMBER} \| {NUMBER} \| no GPU \|", step, re.M
            )
            for mode in ("graph", "compile"):
                assert re.search(rf"^\| {mode} \| {cpu} \| {batch} \| {chunk} \| needs CUDA \|", step, re.M), step
        assert re.search(rf"^\| eager \| bf16, channels-last \| {batch} \| 0 \| needs CUDA \|", step, re.M)
        assert re.search(rf"^\| eager \| fp32, TF32 off, NCHW \| {batch} \| 128 \| needs CUDA \|", step, re.M)
    assert "Launch counts: 3 of 3 configurations counted in their process." in step  # the profiler's process ran
    assert re.search(rf"^\| 32 \| {NUMBER} \| {NUMBER} \| eager batch 32 chunk 0: \d+% \|$", step, re.M), step
    assert re.search(r"= \d+\.\d TFLOP", step)  # the epoch's arithmetic, from the layer shapes

    pack = text["(b)"]
    assert "Step: eager, augment chunk " in pack and "MPS rows skipped: needs an NVIDIA GPU." in pack
    for batch in (32, 128):
        assert re.search(
            rf"^\| 1 \| off \| no GPU \| {batch} \| {NUMBER} \| {NUMBER} \| 1\.00x \| eager \|", pack, re.M
        )
        two = rf"^\| 2 \| off \| no GPU \| {batch} \| {NUMBER}, {NUMBER} \| {NUMBER} \| {NUMBER}x \| eager \|"
        assert re.search(two, pack, re.M), pack
    assert "| on |" not in pack  # no MPS row where there is no GPU

    kinds = {}
    for run, pacing, kind in re.findall(
        r"^\| (\d+) \(\w+\) \| ([^|]+) \| \d+ \| (\w+) \| " + NUMBER, text["(c)"], re.M
    ):
        kinds.setdefault((run, pacing.strip()), []).append(kind)
    default = ("12", "default: best every 30 s, resume every 300 s")
    assert kinds[default][0] == "best" and kinds[default][-1] == "final", text["(c)"]
    assert kinds["48", "a resume state every epoch (resume_every_s 0)"] == ["resume", "resume", "final"]

    for run_number, original in ((16, "88.43"), (12, "88.11"), (62, "88.14"), (79, "13.54")):
        row = re.search(
            rf"^\| {run_number} \| \w+ \| [\d.]+ \| \d+ \| \w+ \| \w+ \| {original} \| (.*?) \|",
            text["(d)"],
            re.M,
        )
        assert row, text["(d)"]
        assert re.fullmatch(
            r"\d+\.\d\d% \(finished: .*\)|cut at epoch \d+ of <=100: best so far \d+\.\d\d%", row.group(1)
        ), row.group(1)
    assert "step eager, augment chunk " in text["(d)"]

    projection = text["(e)"]  # from (d)'s four runs at once: the default share packs four
    assert re.search(r"^\| \(d\): whole epochs .* \| 100\.0 \(the epoch limit, 100 .* = [\d,]+ s = [\d.]+ h \| [\d.]+ \|$",
                     projection, re.M), projection  # fmt: skip
    assert "6.0 (the plateau rule's least: 1 + patience 5 (a lower bound))" in projection

    summary = (out / "summary.md").read_text()
    assert "Ray modules loaded by this run: none" in summary
    for part in (
        "(a) One trial's training step",
        "(b) Packing",
        "(c) Checkpoint share",
        "(d) Fidelity",
        "(e) Projection",
    ):
        assert part in summary
    assert "part failed" not in summary


def test_launch_count_splits_ops_and_chunking_divides_the_augmentations():
    """bench/launches.py --smoke: at batch 32 a 128-image chunk augments once per 4 steps, so the augmentation's
    ops per step fall 4-fold while the model's step is the same op for op."""
    out = run("launches.py", "--smoke", cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("Command: python bench/launches.py --smoke\nMachine: ")
    assert f"torch {__import__('torch').__version__}" in out.stdout
    rows = {}
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 9 and cells[0].isdigit():
            rows[int(cells[0]), cells[1].split()[0]] = [float(c.rstrip("x")) for c in cells[2:]]
    one, chunked = rows[32, "0"], rows[32, "128"]
    augmentation, step, optimizer, other, compute, ratio, views = range(7)
    assert one[augmentation] > 100 and chunked[augmentation] == pytest.approx(one[augmentation] / 4, abs=0.2)
    assert chunked[step] == one[step] > 20 and chunked[optimizer] == one[optimizer] > 0
    assert one[compute] == pytest.approx(sum(one[:4]), abs=0.2) and one[ratio] == 1.0 and chunked[ratio] < 0.6
    assert rows[128, "128"][augmentation] == rows[128, "0"][augmentation]  # a chunk of one batch is one batch
    assert "| 128 | 0 (one batch at a time) |" in out.stdout.split("Training images/s")[1]  # the wall-clock table


def write_log(path: Path, lines: list[dict]) -> Path:
    """A run's JSON-lines log as the device parts' processes write it."""
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def epoch_row(n, best, since, best_epoch, **extra):
    return {
        "epoch": n,
        "best_val_acc": best,
        "epochs_since_best": since,
        "best_epoch": best_epoch,
        "diverged": False,
        "train_s": 10.0,
        "eval_s": 1.0,
        "checkpoint_s": 0.1,
        "own_report_s": 0.1,
        **extra,
    }


def test_fidelity_rows_never_pass_a_cut_run_off_as_a_result(tmp_path):
    fidelity = load_bench("part_fidelity")
    cut_log = write_log(tmp_path / "cut", [epoch_row(1, 50.0, 0, 1), epoch_row(37, 85.1, 2, 35), {"end": "cut"}])
    cut = fidelity._fidelity_row(16, 88.43, cut_log, 100, 5)
    assert cut[7] == "cut at epoch 37 of <=100: best so far 85.10%" and cut[8] == ""
    done_log = write_log(tmp_path / "done", [epoch_row(40, 87.9, 5, 35), {"end": "finished"}])
    done = fidelity._fidelity_row(12, 88.11, done_log, 100, 5)
    assert done[7] == "87.90% (finished: plateau at epoch 40, best at epoch 35)" and done[8] == "-0.21"
    killed = fidelity._fidelity_row(62, 88.14, tmp_path / "absent.jsonl", 100, 5)
    assert killed[7].startswith("cut before its first epoch ended") and "%" not in killed[7]


def test_ab_smoke_trains_every_arm_and_seed_without_ray(no_ray_env, synthetic_dir, tmp_path):
    """The A/B part alone, as on the GPU machine: 3 arms x 2 seeds of run 12, each its own process, finished."""
    data = MINI if MINI.is_dir() else synthetic_dir
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", "bench/device.sh", "--smoke", "--parts", "ab", "--data-dir", str(data), "--budget-s", "150"],
        cwd=ROOT,
        env={**no_ray_env, "OUT": str(out)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu-tests.txt", "log.txt", "rows.jsonl", "summary.md"]
    text = sections((out / "summary.md").read_text())["(f)"]
    assert f"data: image folder {data.resolve()}" in text  # the comparison names the images it ran on
    assert "The study's published results (CIFAR-10's original pixels, one run each): run 12: 88.11%." in text
    finished = r"\d+\.\d\d% \(epoch limit at epoch 2, best at epoch [12]\)"
    for arm, difference in (
        ("original", "reference"),
        (
            "project-bf16",
            rf"[+-]\d+\.\d\d points \(spread: this arm {NUMBER} \(max-min\), original {NUMBER} \(max-min\)\)",
        ),
        (
            "project-fp32",
            rf"[+-]\d+\.\d\d points \(spread: this arm {NUMBER} \(max-min\), original {NUMBER} \(max-min\)\)",
        ),
    ):
        row = rf"^\| 12 \| {arm} \| {finished} \| {finished} \| \d+\.\d\d% \| {NUMBER} \(max-min\) \| {difference} \|$"
        assert re.search(row, text, re.M), text
        for seed in (0, 1):  # each arm really ran in its own precision, two epochs
            precision = "bf16" if arm == "project-bf16" else "fp32"
            assert re.search(rf"^\| 12 \| {arm} \| {seed} \| 2 \| [12] \| .* \| {precision} \|$", text, re.M), text
    summary = (out / "summary.md").read_text()
    assert "Ray modules loaded by this run: none" in summary and "part failed" not in summary


def test_ab_table_gives_no_mean_or_difference_from_a_cut_run(ab, tmp_path):
    def log(arm, seed, *lines):
        write_log(ab.log_path(tmp_path, 12, arm, seed), list(lines))

    finished = {"end": "finished"}
    log("original", 0, epoch_row(30, 88.0, 5, 25), finished)
    log("original", 1, epoch_row(31, 88.5, 5, 26), finished)
    log("original", 2, epoch_row(29, 87.5, 5, 24), finished)
    log("project-bf16", 0, epoch_row(20, 85.0, 5, 15), finished)
    log("project-bf16", 1, epoch_row(22, 85.5, 5, 17), finished)
    log("project-bf16", 2, epoch_row(21, 84.5, 5, 16), finished)
    log("project-fp32", 0, epoch_row(20, 86.0, 5, 15), finished)
    log("project-fp32", 1, epoch_row(1, 40.0, 0, 1), epoch_row(14, 86.9, 1, 13), {"end": "cut"})
    log("project-fp32", 2, {"end": "error", "detail": "RuntimeError: CUDA out of memory"})
    rows = {row[1]: row for row in ab.ab_rows((12,), (0, 1, 2), tmp_path, patience=5)}
    assert rows["original"][2:] == [
        "88.00% (plateau at epoch 30, best at epoch 25)",
        "88.50% (plateau at epoch 31, best at epoch 26)",
        "87.50% (plateau at epoch 29, best at epoch 24)",
        "88.00%",
        "0.50 (std)",
        "reference",
    ]
    assert rows["project-bf16"][5:] == [
        "85.00%",
        "0.50 (std)",
        "-3.00 points (spread: this arm 0.50 (std), original 0.50 (std))",
    ]
    fp32 = rows["project-fp32"]
    assert fp32[3] == "cut at epoch 14, best so far 86.90%"  # its best so far, never a result
    assert fp32[4] == "error before its first epoch ended: RuntimeError: CUDA out of memory"
    assert fp32[5] == "not computed: 2 of 3 seed(s) did not finish" and fp32[6] == ""
    assert fp32[7].startswith("not computed") and "%" not in fp32[5] + fp32[7]
    assert ab.spread([85.0, 85.25]) == "0.25 (max-min)"


def test_original_recipe_shuffles_with_its_seed_and_keeps_the_last_batch(synthetic_dir):
    import torch

    from tune_alexnet.data import Cifar, load_cifar10

    original = load_bench("original")
    data = load_cifar10(MINI if MINI.is_dir() else synthetic_dir, progress=False)
    picked = slice(0, None, len(data.train_x) // 70)  # every class, not the first folder's images alone
    small = Cifar(
        data.train_x[picked][:70], data.train_y[picked][:70], data.test_x[:20], data.test_y[:20], data.classes, "t"
    )

    def labels(seed):
        loader = original.study_loader(small, 32, 0, seed, torch.device("cpu"))
        return [[int(v) for v in y] for _, y in loader]

    first = labels(0)
    assert [len(b) for b in first] == [32, 32, 6]  # shuffled batches, the last partial one kept
    assert labels(0) == first and labels(1) != first

    def run(seed):
        epochs = []
        config = {"run": 12, "width": 0.125, "epochs": 2, "seed": seed}
        original.train_original(config, small, lambda m, d: epochs.append((m, d)), num_workers=1)
        return epochs

    a, b = run(0), run(0)
    assert [d for _, d in a] == [None, None] and [m["epoch"] for m, _ in a] == [1, 2]
    assert [m["train_loss"] for m, _ in a] == [m["train_loss"] for m, _ in b]  # seeded, workers included
    assert a[-1][0]["precision"] == "fp32" and a[-1][0]["ends_trial"]
    assert run(1)[0][0]["train_loss"] != a[0][0]["train_loss"]


def test_device_runner_refuses_an_unknown_part(capsys):
    device = load_bench("device")
    with pytest.raises(SystemExit) as refused:
        device.parse_args(["--data-dir", ".", "--parts", "throughput,abc"])
    assert refused.value.code == 2
    assert "unknown part(s) abc; allowed: throughput, packing, checkpoint, fidelity, projection, ab" in (
        capsys.readouterr().err
    )
    assert device.parse_args(["--data-dir", ".", "--smoke", "--parts", "ab"]).ab_seeds == (0, 1)


def test_device_arithmetic_and_card_table(common):
    epoch_flop = 3 * common.forward_flops(1.0) * 50_000
    assert 75e12 < epoch_flop < 77e12  # the study's "about 76 TFLOP an epoch"
    assert common.card_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert common.card_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert common.card_peak_flops("NVIDIA H200") == 989e12
    assert common.card_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert common.card_peak_flops("NVIDIA A10G") == 70e12
    assert common.card_peak_flops("NVIDIA L4") == 121e12
    assert common.card_peak_flops("NVIDIA L40S") == 362e12
    assert common.card_peak_flops("Some Other Card") is None


def test_checkpoint_bench_counts_every_persisted_checkpoint_and_the_driver_clock(tmp_path):
    bench = load_bench("checkpoint")
    trial = tmp_path / "exp" / "train_cifar_0"
    (trial / "checkpoint_000002").mkdir(parents=True)
    (trial / "checkpoint_000002" / "model.pt").write_bytes(b"x" * 1000)  # the one Tune kept
    rows = [
        {
            "trial_id": "t0",
            "training_iteration": i,
            "train_s": 1.0,
            "eval_s": 0.5,
            "checkpoint_s": 0.2,
            "report_s": 0.3 if i > 1 else 0.0,
            "checkpoint_kind": kind,
            "checkpoint_dir_name": None if kind is None else f"checkpoint_{i - 1:06d}",
        }
        for i, kind in ((1, "best"), (2, None), (3, "final"))
    ]
    (trial / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    persisted = {"checkpoint_000000@t0": 1000, "checkpoint_000002@t0": 1000, "checkpoint_000009@other": 5}
    arrivals = {"t0": {1: 10.0, 2: 12.0, 3: 14.5}}  # epoch 2: 2.0 s, epoch 3: 2.5 s on the driver's clock
    r = bench.summarise(tmp_path / "exp", "after", "sgd", 12, None, persisted, arrivals, 60.0)
    assert r["checkpoints"] == 2 and r["bytes_per_epoch"] == pytest.approx(2000 / 3)  # the deleted one counts
    assert r["seconds_per_epoch"] == pytest.approx(((2.0 - 1.5) + (2.5 - 1.5)) / 2)
    assert r["kept_bytes"] == 1000 and r["kinds"] == {"best": 1, "none": 1, "final": 1}
    row = next(
        ln for ln in bench.table([r, {**r, "seconds_per_epoch": 0.9}], 300.0).splitlines() if ln.startswith("| after")
    )
    assert "| default (300 s) | 3 | best x1, none x1, final x1 | 2 | 0.0 | 0.82 (0.75, 0.90) |" in row


def test_fidelity_runs_chosen_study_runs_through_the_sweep(synthetic_dir, tmp_path):
    out = run(
        "fidelity.py",
        "--data-dir",
        synthetic_dir,
        "--runs",
        "16,79",
        "--epochs",
        "2",
        "--width",
        "0.125",
        "--gpus-per-trial",
        "0",
        "--cpus-per-trial",
        "1",
        "--storage",
        tmp_path,
        "--name",
        "fid",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("| 16 ") or ln.startswith("| 79 ")]
    assert len(lines) == 2
    assert "| 16 | sgd | 0.001 | 32 | False | True | 88.43 |" in out.stdout  # the original's number, shipped
    assert "projected wall time of the whole 108-run study" in out.stdout


def test_throughput_prints_its_table(synthetic_dir, tmp_path):
    out = run(
        "throughput.py",
        "--device",
        "cpu",
        "--data-dir",
        synthetic_dir,
        "--images",
        "64",
        "--batch-size",
        "32",
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| augmentation only (1 CPU thread) | 32 |" in out.stdout
    assert "| train epoch (model + data) | 32 |" in out.stdout


def test_fidelity_projection_arithmetic_by_hand():
    """36 runs per batch size x mean epochs x median epoch time at that size, summed, / trials at once."""
    import pandas as pd

    fidelity = load_bench("fidelity")

    table = pd.DataFrame({"epochs_run": [10, 30]})  # mean 20 epochs a run
    epochs = pd.DataFrame({"batch_size": [32, 32, 32, 128], "train_s": [2.0, 4.0, 100.0, 1.0]})  # medians 4 and 1
    hours, how = fidelity.projection(table, epochs, concurrent=4)
    # 32: 36 x 20 x 4 = 2880 s; 128: 36 x 20 x 1 = 720 s; 64 unmeasured takes the mean of the medians, 2.5 s: 1800 s
    assert hours == pytest.approx((2880 + 720 + 1800) / 4 / 3600)
    assert "20.0 epochs a run" in how and "/ 4 trials at once" in how


def test_study_projection_arithmetic_and_run_lengths_by_hand(tmp_path):
    """(e): 36 runs at each batch size x epochs a run x seconds an epoch, / 4 at once; a missing size is assumed
    and says so; a cut run gives only a lower bound on the run length."""
    projection = load_bench("part_projection")
    hours, how = projection.project({32: 10.0, 128: 4.0}, 20.0, 4)
    assert hours == pytest.approx(36 * 20 * (10 + 7 + 4) / 4 / 3600)  # batch 64: the mean of 10 and 4
    assert "7.00 s (batch 64, assumed: the mean of the measured sizes)" in how and "/ 4 trials at once" in how
    assert projection.run_lengths([(30, True), (20, True)])[0] == (25.0, "the mean of (d)'s 2 finished runs")
    floor, why = projection.run_lengths([(30, True), (20, False)])[0]
    assert floor == 25.5 and why.startswith("at least")
    assert [n for n, _ in projection.run_lengths([])] == [6.0, 100.0]  # the plateau rule's bounds alone

    common = load_bench("device_common")
    common.record(tmp_path, "packing", {"points": [
        {"k": 4, "batch": 32, "mps": False, "aggregate": 20_000.0},
        {"k": 4, "batch": 32, "mps": True, "aggregate": 40_000.0},
        {"k": 2, "batch": 128, "mps": False, "aggregate": 1e6},
    ]})  # fmt: skip
    assert projection.packing_epochs(tmp_path, mps=False) == {32: 4 * 50_000 / 20_000}  # one trial's epoch at K=4
    assert projection.packing_epochs(tmp_path, mps=True) == {32: 5.0}


def test_later_parts_train_with_the_pair_part_a_measured_fastest(tmp_path):
    """Summed epoch time over the batch sizes decides; a graph row that fell back to eager, a row at another
    precision and a pair not measured at every batch size do not count; the flags override."""
    import argparse

    steps, common = load_bench("steps"), load_bench("device_common")
    args = argparse.Namespace(batch_sizes=(32, 128), chunk=8192, step="auto", augment_chunk=None)
    assert steps.chosen_step(args, tmp_path)[:2] == ("eager", 8192)  # nothing measured, no CUDA here

    def row(mode, batch, chunk, img_s, ran=None, variant="tf32"):
        return {"variant": variant, "mode": mode, "batch": batch, "chunk": chunk, "img_s": img_s, "ran": ran or mode}

    rows = [
        row("eager", 32, 0, 3_000), row("eager", 128, 0, 11_000),
        row("graph", 32, 8192, 20_000), row("graph", 128, 8192, 5_000),  # 2.5 + 10 s: slower in sum
        row("eager", 32, 8192, 9_000), row("eager", 128, 8192, 30_000),  # 5.6 + 1.7 s: the fastest
        row("graph", 32, 0, 90_000, ran="eager"), row("graph", 128, 0, 90_000, ran="eager"),
        row("eager", 32, 1024, 99_000, variant="bf16-cl"), row("eager", 128, 1024, 99_000, variant="bf16-cl"),
        row("compile", 32, 0, 99_000), row("compile", 128, 0, 99_000), row("graph", 32, 1024, 99_000),
    ]  # fmt: skip
    common.record(tmp_path, "throughput", {"rows": rows})
    assert steps.chosen_step(args, tmp_path)[:2] == ("eager", 8192)
    args.step, args.augment_chunk = "graph", 0
    assert steps.chosen_step(args, tmp_path)[:2] == ("graph", 0)


def test_mps_is_skipped_with_its_reason_and_leaves_the_environment_alone(tmp_path, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine would start the daemon")
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    packing = load_bench("part_packing")
    with packing.mps_daemon(tmp_path) as problem:
        assert problem == "needs an NVIDIA GPU"
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ and not (tmp_path / "mps-pipe").exists()


def test_checkpoint_bench_runs_a_sweep_through_the_current_api(mini_dir, tmp_path):
    """bench/checkpoint.py end to end on a local Ray: preflight's Plan, sweep.run, the size callback, the reserve
    released (the finished folder holds the checkpoint alone)."""
    out = run("checkpoint.py", "--data-dir", mini_dir, "--subset", "1", "--epochs", "2", "--width", "0.125",
              "--optimizers", "sgd", "--storage", tmp_path, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith("| after | sgd |")]
    assert len(rows) == 2, out.stdout
    assert "| default (300 s) | 2 | best x1, final x1 | 2 |" in rows[0]
    assert "| 0 s | 2 | resume x1, final x1 | 2 |" in rows[1]
    folder, kept = (float(c) for c in rows[0].strip("|").split("|")[-2:])
    assert 0 < kept < folder < kept + 8  # the study page beside the checkpoints (about 5 MB), no 8 MiB reserve
    assert not list(tmp_path.rglob(RESERVE_NAME))  # released when the sweep ended


def test_a_part_that_fails_loses_no_row_of_the_others_and_the_summary_is_written(synthetic_dir, tmp_path, monkeypatch):
    """Part (b) measures a row, then a sticky CUDA error shows in the cleanup after it; part (c) measures a row and
    raises: every row measured, the other parts' sections and the summary are all there, in at most 8 files."""
    device = load_bench("device")
    common = sys.modules["device_common"]
    error = RuntimeError("CUDA error: an illegal memory access was encountered")
    cleanups = []

    def release_memory():
        cleanups.append(1)
        if len(cleanups) == 2:  # the cleanup after part (b)
            raise error

    def part(letter: str):
        def run(data, args, deadline, workdir):
            common.emit(letter, {"img_s": 1.0})
            if letter == "c":
                raise error
            return f"## ({letter}) part {letter}"

        return run

    monkeypatch.setattr(common, "release_memory", release_memory, raising=False)
    monkeypatch.setattr(device, "PARTS", {n: (part(x), 0.3, 1.0) for n, x in zip(device.PARTS, "abcdef")})
    out = tmp_path / "out"
    args = ["--smoke", "--data-dir", str(synthetic_dir), "--out", str(out), "--budget-s", "20"]
    assert device.main([*args, "--parts", "throughput,packing,checkpoint,fidelity"]) == 1
    rows = [json.loads(line)["part"] for line in (out / "rows.jsonl").read_text().splitlines()]
    assert rows == ["a", "b", "c", "d"]
    summary = (out / "summary.md").read_text()
    assert "## (a) part a" in summary and "## (d) part d" in summary
    assert "## packing: failed" in summary and "## checkpoint: failed" in summary
    assert "- part failed: packing" in summary and "illegal memory access" in summary
    assert len(list(out.iterdir())) <= 8 and all(p.is_file() for p in out.iterdir())
