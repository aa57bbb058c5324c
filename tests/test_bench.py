"""The benchmark scripts run end to end on tiny settings, so they work when a GPU is there to measure."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_fidelity_runs_chosen_study_runs_through_the_sweep(synthetic_dir, tmp_path):
    out = run("fidelity.py", "--data-dir", synthetic_dir, "--runs", "16,79", "--epochs", "2", "--width", "0.125",
              "--gpus-per-trial", "0", "--cpus-per-trial", "1", "--storage", tmp_path, "--name", "fid", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("| 16 ") or ln.startswith("| 79 ")]
    assert len(lines) == 2
    assert "| 16 | sgd | 0.001 | 32 | False | True | 88.43 |" in out.stdout  # the original's number, shipped
    assert "projected wall time of the whole 108-run study" in out.stdout


def test_throughput_prints_its_table(synthetic_dir, tmp_path):
    out = run("throughput.py", "--device", "cpu", "--data-dir", synthetic_dir, "--images", "64", "--batch-size", "32",
              cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| augmentation only (1 CPU thread) | 32 |" in out.stdout
    assert "| train epoch (model + data) | 32 |" in out.stdout


def test_packing_runs_its_sweeps(synthetic_dir, tmp_path):
    out = run("packing.py", "--data-dir", synthetic_dir, "--concurrency", "2", "--epochs", "2", "--width", "0.125",
              "--cpus-per-trial", "1", "--storage", tmp_path, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith("| 2 |")]
    assert len(rows) == 1 and "aggregate img/s" in out.stdout
