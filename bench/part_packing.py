"""Part (b) of bench/device.py: K trials sharing one GPU, as Ray's fractional GPUs run them.

Each trial is its own process with its CUDA memory capped at 1/K; every process trains for the same window
after all K have warmed up, and the aggregate is the sum of their images/s.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import time
from pathlib import Path

import device_common as common
import throughput
import torch

from tune_alexnet.data import Cifar
from tune_alexnet.model import AlexNet
from tune_alexnet.train import make_optimizer, to_device_nchw, train_epoch


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


def _pack_worker(index: int, arrays: str, images: int, width: float, threads: int, commands, results, go) -> None:
    """One trial's process: waits for (point, K, batch, window) commands and trains for the window."""
    torch.set_num_threads(threads)
    data = common.load_arrays(Path(arrays), images)
    device = common.device_of_this_machine()
    if device.type == "cuda":
        torch.zeros(1, device=device)  # the CUDA context, before the clock of any point starts
    results.put(("hello", index, -1))
    while (command := commands.get()) is not None:
        point, k, batch, window, wait_s = command
        try:
            done = _pack_point(index, point, k, batch, window, wait_s, data, width, device, results, go[point])
            results.put(("done", index, point, *done))
        except Exception as exc:
            results.put(("error", index, point, f"{type(exc).__name__}: {exc}"))


def _pack_point(index, point, k, batch, window, wait_s, data, width, device, results, go) -> tuple[int, float]:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0 / k, device)
    rt = throughput.project_runtime(device)
    memory_format = torch.channels_last if rt.channels_last else torch.contiguous_format
    model = AlexNet(dropout=True, batchnorm=True, width=width).to(device, memory_format=memory_format)
    optimizer = make_optimizer("sgd", model.parameters(), 0.01)
    x, y = to_device_nchw(data.train_x, device), torch.from_numpy(data.train_y.copy()).to(device)
    gen = torch.Generator(device).manual_seed(index)
    for _ in range(2):  # warm-up: cudnn autotuning, the allocator
        train_epoch(model, optimizer, x[: batch * 4], y[: batch * 4], batch, gen, rt)
    common.sync()
    results.put(("ready", index, point))
    if not go.wait(timeout=wait_s):
        raise TimeoutError("the other trials of this point never became ready")
    chunk = min(len(x), batch * 50)  # 50 steps, then one sync, as train_epoch checks the loss every 50 steps
    start, done, offset = time.perf_counter(), 0, 0
    while done == 0 or time.perf_counter() - start < window:
        if offset + chunk > len(x):
            offset = 0
        train_epoch(model, optimizer, x[offset : offset + chunk], y[offset : offset + chunk], batch, gen, rt)
        done, offset = done + chunk, offset + chunk
    common.sync()
    elapsed = time.perf_counter() - start
    del model, optimizer, x, y
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return done, elapsed


class _Pool:
    """The worker processes of part (b), one per trial of the largest K, and their queues."""

    def __init__(self, args, arrays: Path, points: list, threads: int):
        ctx = mp.get_context("spawn")
        self.n = max(args.concurrency)
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(self.n)]
        self.go = [ctx.Event() for _ in points]
        self.workers = [
            ctx.Process(
                target=_pack_worker,
                args=(i, str(arrays), args.images, args.width, threads, self.commands[i], self.results, self.go),
                daemon=True,
            )
            for i in range(self.n)
        ]

    def start(self, deadline: float) -> None:
        for w in self.workers:
            w.start()
        _collect(self.results, "hello", -1, self.n, deadline, self.workers)

    def measure(self, i: int, k: int, bs: int, window: float, deadline: float) -> list[float]:
        """Point i: k trials at batch bs train for the window at once; each trial's images/s."""
        wait_s = max(5.0, deadline - time.time())
        for w in range(k):
            self.commands[w].put((i, k, bs, window, wait_s))
        _collect(self.results, "ready", i, k, deadline + 30, self.workers)
        self.go[i].set()
        done = _collect(self.results, "done", i, k, deadline + 30 + window, self.workers)
        return [images / seconds for images, seconds in done.values()]

    def stop(self) -> None:
        for c in self.commands:
            c.put(None)
        for w in self.workers:
            w.join(timeout=5)
            if w.is_alive():
                w.terminate()


def part_packing(data: Cifar, args: argparse.Namespace, deadline: float, workdir: Path) -> str:
    device = common.device_of_this_machine()
    points = [(k, bs) for bs in args.pack_batch_sizes for k in args.concurrency]
    threads = 1 if device.type == "cpu" else max(1, (os.cpu_count() or 2) // max(args.concurrency))
    cap = (lambda k: f"1/{k}") if device.type == "cuda" else (lambda k: "no GPU")
    pool = _Pool(args, common.arrays_dir(workdir), points, threads)
    started = time.time()
    rows, measured = [], {}
    note = ""
    try:
        pool.start(deadline)
        startup = time.time() - started
        overhead = 5.0 if device.type == "cuda" else 1.5  # model, warm-up, cudnn autotuning, hand-shakes
        window = args.window or max(0.3, min(15.0, (deadline - time.time()) / len(points) - overhead))
        for i, (k, bs) in enumerate(points):
            if time.time() + window + overhead > deadline:
                rows.append([k, cap(k), bs, "not measured (out of time)", "", ""])
                continue
            per_trial = pool.measure(i, k, bs, window, deadline)
            measured[k, bs] = sum(per_trial)
            base = measured.get((1, bs))
            vs_one = f"{sum(per_trial) / base:.2f}x" if base else ""
            rows.append([k, cap(k), bs, ", ".join(f"{r:,.0f}" for r in per_trial), f"{sum(per_trial):,.0f}", vs_one])
        note = (
            f"{pool.n} worker processes started in {startup:.1f} s (not timed); each point trains for "
            f"{window:.1f} s in every process after all of them have warmed up."
        )
    except (TimeoutError, RuntimeError) as exc:
        note = f"stopped early: {exc}"
    finally:
        pool.stop()
    return _text(args, threads, note, rows)


def _text(args, threads: int, note: str, rows: list[list]) -> str:
    cap = "torch.cuda.set_per_process_memory_fraction(1/K)" if torch.cuda.is_available() else "CPU: no memory cap"
    header = ["trials at once (K)", "memory cap each", "batch", "img/s of each trial", "aggregate img/s", "vs 1 trial"]
    return "\n".join(
        [
            "## (b) Packing: trials sharing one GPU",
            "",
            f"Card: {common.card_name()}; width {args.width:g}; each trial is its own process ({cap}, "
            f"{threads} CPU thread(s)), training this project's path (SGD, dropout and batch norm on, the sweep's "
            f"defaults) on the first {args.images:,} train images. {note}",
            "",
            common.markdown(header, rows),
        ]
    )
