"""Part (b) of bench/device.py: K trials sharing one GPU, as Ray's fractional GPUs run them, with and without MPS.

Each trial is its own process with its CUDA memory capped at 1/K, training with the step that part (a) measured
fastest (steps.chosen_step; --step and --augment-chunk choose instead); every process trains for the same window
after all K have warmed up (a graph step has captured by then), and the aggregate is the sum of their images/s.
With NVIDIA MPS the kernels of the K processes may run at once instead of taking turns: its control daemon is
started for these points alone (`nvidia-cuda-mps-control -d`, its pipe and log folders in the work folder), the
processes are started after it, and it is stopped (`echo quit | nvidia-cuda-mps-control`) whatever happens. The
MPS rows say why they were skipped where there is no CUDA, no nvidia-cuda-mps-control, or the daemon does not
serve a test process. About half the part's time goes to the points without MPS, the rest to those with it (K=1
is not run again under MPS); a short budget cuts K=2 first, then K=8.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import queue
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import device_common as common
import steps
import torch

from tune_alexnet import train
from tune_alexnet.data import Cifar
from tune_alexnet.train import to_device_nchw

MPS_CONTROL = "nvidia-cuda-mps-control"
MPS_PROBE_S = 20.0  # a test process that has not run a kernel through the daemon by then: MPS does not serve
# bench/device.sh names the MPS folders, so that its exit trap quits a daemon left running whatever ends the call
MPS_DIR_VARIABLE = "TUNE_ALEXNET_MPS_DIR"


def _collect(results, kind: str, point: int, n: int, until: float, workers: list) -> dict[int, tuple]:
    """n messages of `kind` for `point` from the workers, by worker index; an error message, a worker that
    died or the time running out raise."""
    got: dict[int, tuple] = {}
    while len(got) < n:
        try:
            msg = results.get(timeout=1.0)
        except queue.Empty:
            dead = [i for i, w in enumerate(workers) if not w.is_alive()]
            if dead:
                raise RuntimeError(
                    f"worker process(es) {dead} exited (exit codes {[workers[i].exitcode for i in dead]})"
                ) from None
            if time.time() > until:
                raise TimeoutError(f"no '{kind}' from {n - len(got)} worker process(es) in time") from None
            continue
        if msg[0] == "error" and msg[2] == point:
            raise RuntimeError(f"worker {msg[1]}: {msg[3]}")
        if msg[0] == kind and msg[2] == point:
            got[msg[1]] = msg[3:]
    return got


def _pack_worker(index: int, arrays: str, images: int, width: float, threads: int, step: tuple, queues) -> None:
    """One trial's process: waits for (point, K, batch, window, wait_s) commands and trains for the window."""
    commands, results, go = queues
    torch.set_num_threads(threads)
    data = common.load_arrays(Path(arrays), images)
    device = common.device_of_this_machine()
    x, y = to_device_nchw(data.train_x, device), torch.from_numpy(data.train_y.copy()).to(device)
    results.put(("hello", index, -1))
    while (command := commands.get()) is not None:
        point, k, batch, window, wait_s = command
        try:
            rt, run = steps.runtime(device, steps.DEFAULT_VARIANT, *step)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.set_per_process_memory_fraction(train.memory_cap(1.0 / k), device)  # as a sweep caps it
            trial = steps.new_trial(rt, run, batch, width, seed=index)
            steps.warm_up(trial, x, y, batch, rt)
            results.put(("ready", index, point))
            if not go[point].wait(timeout=wait_s):
                raise TimeoutError("the other trials of this point never became ready")
            results.put(("done", index, point, *steps.timed(trial, x, y, batch, rt, window), trial.step.mode))
            del trial
        except Exception as exc:
            results.put(("error", index, point, f"{type(exc).__name__}: {exc}"))
        try:
            common.release_memory()  # the trial, and a captured graph's memory pool with it
        except Exception as exc:  # a sticky CUDA error: this process can measure no more
            results.put(("error", index, point, f"{type(exc).__name__}: {exc}"))
            return


class _Pool:
    """The worker processes of part (b), one per trial of the largest K, and their queues."""

    def __init__(self, args, arrays: Path, points: int, threads: int, step: tuple[str, int]):
        ctx = mp.get_context("spawn")
        self.n = max(args.concurrency)
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(self.n)]
        self.go = [ctx.Event() for _ in range(points)]
        self.workers = [
            ctx.Process(
                target=_pack_worker,
                args=(
                    i,
                    str(arrays),
                    args.images,
                    args.width,
                    threads,
                    step,
                    (self.commands[i], self.results, self.go),
                ),
                daemon=True,
            )
            for i in range(self.n)
        ]

    def start(self, deadline: float) -> None:
        for w in self.workers:
            w.start()
        _collect(self.results, "hello", -1, self.n, deadline, self.workers)

    def measure(self, i: int, k: int, bs: int, window: float, deadline: float) -> tuple[list[float], set]:
        """Point i: k trials at batch bs train for the window at once; each trial's images/s, the modes they ran."""
        wait_s = max(5.0, deadline - time.time())
        for w in range(k):
            self.commands[w].put((i, k, bs, window, wait_s))
        _collect(self.results, "ready", i, k, deadline + 30, self.workers)
        self.go[i].set()
        done = _collect(self.results, "done", i, k, deadline + 30 + window, self.workers)
        return [images / seconds for images, seconds, _ in done.values()], {mode for *_, mode in done.values()}

    def stop(self) -> None:
        for c in self.commands:
            c.put(None)
        for w in self.workers:
            w.join(timeout=5)
            if w.is_alive():
                w.terminate()


def mps_possible(args: argparse.Namespace) -> bool:
    return torch.cuda.is_available() and shutil.which(MPS_CONTROL) is not None and not args.no_mps


@contextlib.contextmanager
def mps_daemon(workdir: Path) -> Iterator[str | None]:
    """NVIDIA MPS for the processes started inside: None while it serves them (its folders in os.environ, which
    they inherit), else why not. The daemon this started is stopped on the way out, whatever happened."""
    control = shutil.which(MPS_CONTROL)
    if not torch.cuda.is_available() or control is None:
        yield "needs an NVIDIA GPU" if not torch.cuda.is_available() else f"{MPS_CONTROL} is not installed"
        return
    if (mode := compute_mode()) != "Default":  # Exclusive_Process: MPS needs the card to itself; Prohibited: none
        yield f"the card's compute mode is {mode}, not Default"
        return
    folder = Path(os.environ.get(MPS_DIR_VARIABLE) or workdir)
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(folder / "mps-pipe"), "CUDA_MPS_LOG_DIRECTORY": str(folder / "mps-log")}
    for folder in env.values():
        Path(folder).mkdir(parents=True, exist_ok=True)
    saved = {k: os.environ.get(k) for k in env}
    try:
        started = subprocess.run([control, "-d"], env={**os.environ, **env}, capture_output=True, text=True,
                                 timeout=30)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        yield f"{MPS_CONTROL} -d failed: {exc}"
        return
    if started.returncode != 0:
        yield f"{MPS_CONTROL} -d failed: {(started.stderr or started.stdout).strip()[:200]}"
        return
    os.environ.update(env)
    try:
        yield _mps_probe()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _mps_quit(control, env)


def compute_mode() -> str:
    """The card's compute mode as nvidia-smi names it (Default, Exclusive_Process, Prohibited), or why unknown."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=compute_mode", "--format=csv,noheader", "-i", "0"],
                              capture_output=True, text=True, timeout=15)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({type(exc).__name__})"
    return done.stdout.strip() or f"unknown ({done.stderr.strip()[:80]})"


def _mps_quit(control: str, env: dict) -> None:
    """`echo quit | nvidia-cuda-mps-control` for the daemon of these folders; a loud line if it may still run."""
    try:
        done = subprocess.run([control], input="quit\n", env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        problem = None if done.returncode == 0 else (done.stderr or done.stdout).strip()[:200]
    except (OSError, subprocess.SubprocessError) as exc:
        problem = str(exc)
    if problem is not None:
        print(f"WARNING: MPS may still run ({problem}); stop it with: echo quit | CUDA_MPS_PIPE_DIRECTORY="
              f"{env['CUDA_MPS_PIPE_DIRECTORY']} {MPS_CONTROL}", file=sys.stderr, flush=True)  # fmt: skip


def _mps_probe() -> str | None:
    """None when a fresh process runs a kernel through the daemon, else what went wrong."""
    code = "import torch; torch.ones(1, device='cuda').add_(1); torch.cuda.synchronize()"
    try:
        probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=MPS_PROBE_S)
    except subprocess.TimeoutExpired:
        return f"a test process did not run a kernel through MPS within {MPS_PROBE_S:g} s"
    tail = (probe.stderr.strip().splitlines() or ["no message"])[-1]
    return None if probe.returncode == 0 else f"a test process failed under MPS: {tail[:200]}"


def part_packing(data: Cifar, args: argparse.Namespace, deadline: float, workdir: Path) -> str:
    device = common.device_of_this_machine()
    mode, chunk, why = steps.chosen_step(args, workdir)
    threads = 1 if device.type == "cpu" else max(1, (os.cpu_count() or 2) // max(args.concurrency))
    rows, measured, notes = [], {}, [f"Step: {mode}, augment chunk {chunk} ({why})."]
    for mps in (False, True):
        stop = deadline if mps or not mps_possible(args) else time.time() + 0.55 * (deadline - time.time())
        order = sorted(args.concurrency, key=lambda k: (k != 1, k == 2, k))  # what a short budget cuts: K=2 first
        points = [(k, bs) for k in order for bs in args.pack_batch_sizes if not (mps and k == 1)]
        if mps and args.no_mps:
            notes.append("MPS rows skipped: --no-mps.")
            continue
        with mps_daemon(workdir) if mps else contextlib.nullcontext() as problem:
            if problem:
                notes.append(f"MPS rows skipped: {problem}.")
                continue
            notes.append(_points(args, workdir, points, threads, (mode, chunk), mps, stop, rows, measured))
    rows.sort(key=lambda r: (r[1] == "on", r[3], r[0]))  # by MPS, batch, K
    common.record(workdir, "packing", {"step": mode, "chunk": chunk, "points": [
        {"k": k, "batch": bs, "mps": mps, "aggregate": v} for (k, bs, mps), v in measured.items()]})  # fmt: skip
    return _text(args, threads, notes, rows)


def _points(args, workdir: Path, points, threads: int, step: tuple, mps: bool, deadline: float, rows, measured) -> str:
    """Measures the points with one pool of processes; appends their rows; a line on how it went."""
    on_cuda = torch.cuda.is_available()
    cap, label = ("1/{}" if on_cuda else "no GPU"), ("on" if mps else "off")
    pool = _Pool(args, common.arrays_dir(workdir), len(points), threads, step)
    started = time.time()
    try:
        pool.start(deadline)
        startup = time.time() - started
        overhead = 6.0 if on_cuda else 1.5  # a model per process, its warm-up and capture, hand-shakes
        window = args.window or max(0.5, min(10.0, (deadline - time.time()) / len(points) - overhead))
        for i, (k, bs) in enumerate(points):
            if time.time() + window + overhead > deadline:
                rows.append([k, label, cap.format(k), bs, "not measured (out of time)", "", "", ""])
                continue
            per_trial, modes = pool.measure(i, k, bs, window, deadline)
            measured[k, bs, mps] = sum(per_trial)
            base = measured.get((1, bs, False))
            vs_one = f"{sum(per_trial) / base:.2f}x" if base else ""
            rows.append([k, label, cap.format(k), bs, ", ".join(f"{r:,.0f}" for r in per_trial),
                         f"{sum(per_trial):,.0f}", vs_one, ", ".join(sorted(modes))])  # fmt: skip
        return (f"MPS {label}: {pool.n} worker processes started in {startup:.1f} s (not timed); each point trains "
                f"for {window:.1f} s in every process after all of them have warmed up.")  # fmt: skip
    except (TimeoutError, RuntimeError) as exc:
        return f"MPS {label}: stopped early: {exc}"
    finally:
        pool.stop()


def _text(args, threads: int, notes: list[str], rows: list[list]) -> str:
    cap = "torch.cuda.set_per_process_memory_fraction(1/K)" if torch.cuda.is_available() else "CPU: no memory cap"
    header = ["trials at once (K)", "MPS", "memory cap each", "batch", "img/s of each trial", "aggregate img/s",
              "vs 1 trial without MPS", "step ran"]  # fmt: skip
    return "\n".join(
        [
            "## (b) Packing: trials sharing one GPU, with and without MPS",
            "",
            f"Card: {common.card_name()}; width {args.width:g}; each trial is its own process ({cap}, {threads} CPU "
            f"thread(s)), training this project's path (SGD, dropout and batch norm on, fp32 with TF32 on CUDA) on "
            f"the first {args.images:,} train images. " + " ".join(notes),
            "",
            common.markdown(header, rows),
        ]
    )
