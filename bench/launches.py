"""ATen ops per training step on the CPU, by augmentation chunk: a proxy for the GPU's kernel launches.

On a GPU the host issues one kernel launch (or a few) for every ATen op that computes, and a trial that launches
hundreds of small kernels a step keeps the card waiting on the host. A CPU can count those ops: this script runs
`train.train_epoch` under a TorchDispatchMode that counts every op dispatched, split by where it came from:

- augmentation: inside `augment.augment_batch` (one call per batch, or per chunk with --augment-chunk);
- forward, loss and backward: inside the training step (`TrainStep.__call__`), less the optimizer;
- optimizer: inside the optimizer's step (its step hooks); torch's foreach implementation, which torch picks on
  CUDA (one op for all parameters), where its CPU default loops over the parameters;
- other: the epoch's shuffle, indexing a chunk out of the data set, slicing batches, the divergence check.

Views and allocations launch no kernel: they are counted apart. Differences from a CUDA run: on the CPU the hue
step gathers the rows that need it (a data-dependent op or two more); on CUDA it computes every row and selects.
The count does not depend on the network's width, so a narrow one keeps the script fast.

A second table times chunk 0 against the chunked setting on the CPU with the full-width network, to show the
CPU path is no slower.

    python bench/launches.py                  # both tables (a few minutes on 2 cores)
    python bench/launches.py --smoke          # seconds: a check that it runs
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator

import device_common as common
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tune_alexnet import augment
from tune_alexnet.model import AlexNet
from tune_alexnet.settings import RUNTIME_DEFAULTS, TRIAL_DEFAULTS
from tune_alexnet.train import Runtime, TrainStep, make_optimizer, resolve_runtime, train_epoch

PHASES = ("augmentation", "step", "optimizer", "other")
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}  # allocations
MARKERS = {"_record_function_enter_new", "_record_function_exit"}  # the profiler's markers: not ops


class OpCounter(TorchDispatchMode):
    """Counts every ATen op dispatched, by the phase it ran in; views and allocations apart from compute ops."""

    def __init__(self):
        super().__init__()
        self.phase = ["other"]
        self.compute: Counter = Counter()
        self.no_kernel: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in MARKERS:
            (self.no_kernel if func.is_view or name in NO_KERNEL else self.compute)[self.phase[-1]] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def inside(self, phase: str):
        self.phase.append(phase)
        try:
            yield
        finally:
            self.phase.pop()


class CountedStep(TrainStep):
    """The product's training step, its ops counted as the step's."""

    counter: OpCounter | None = None

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        with self.counter.inside("step"):
            super().__call__(inputs, targets)


@contextlib.contextmanager
def counted_augmentation(counter: OpCounter) -> Iterator[None]:
    """augment.augment_batch (which train_epoch calls through the module) with its ops counted as augmentation."""
    original = augment.augment_batch

    def wrapped(*args, **kwargs):
        with counter.inside("augmentation"):
            return original(*args, **kwargs)

    augment.augment_batch = wrapped
    try:
        yield
    finally:
        augment.augment_batch = original


def cpu_runtime(chunk: int) -> Runtime:
    return resolve_runtime(dict(TRIAL_DEFAULTS), {**RUNTIME_DEFAULTS, "device": "cpu", "augment_chunk": chunk}, None)


def images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images and labels: the op count and the CPU's speed do not depend on the pixels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(
        0, 10, (n,), generator=g
    )


def count_ops(batch: int, chunk: int, n: int, width: float) -> dict[str, float]:
    """Ops per step of one train_epoch over n images, by phase, after a first short epoch (the optimizer's state
    and other one-time work stay out of the count); 'views' are those that launch no kernel."""
    torch.manual_seed(0)
    rt = cpu_runtime(chunk)
    model = AlexNet(dropout=True, batchnorm=True, width=width)
    optimizer = make_optimizer("sgd", model.parameters(), 0.01)
    for group in optimizer.param_groups:
        group["foreach"] = True  # as torch picks on CUDA
    counter = OpCounter()
    step = CountedStep(model, optimizer, rt, batch)
    step.counter = counter
    optimizer.register_step_pre_hook(lambda *_: counter.phase.append("optimizer"))
    optimizer.register_step_post_hook(lambda *_: counter.phase.pop())
    x, y = images(n)
    gen = torch.Generator().manual_seed(0)
    train_epoch(model, optimizer, x[: 2 * batch], y[: 2 * batch], batch, gen, rt, step=step)  # lazy state: once
    with counted_augmentation(counter), counter:
        train_epoch(model, optimizer, x, y, batch, gen, rt, step=step)
    steps = -(-n // batch)
    out = {phase: counter.compute[phase] / steps for phase in PHASES}
    out["compute"] = sum(counter.compute.values()) / steps
    out["views"] = sum(counter.no_kernel.values()) / steps
    return out


def ops_table(batches: list[int], chunks: list[int], n: int, width: float) -> str:
    rows = []
    for batch in batches:
        base = None
        for chunk in chunks:
            c = count_ops(batch, chunk, n, width)
            base = base or c["compute"]
            rows.append(
                [batch, chunk or "0 (one batch at a time)", *[f"{c[p]:.1f}" for p in PHASES], f"{c['compute']:.1f}"]
                + [f"{c['compute'] / base:.2f}x", f"{c['views']:.1f}"]
            )
    header = ["batch", "augment chunk", "augmentation", "forward, loss, backward", "optimizer (foreach)", "other"]
    return common.markdown([*header, "compute ops / step", "vs chunk 0", "views, allocations / step"], rows)


def wall_rates(batch: int, chunks: list[int], n: int, width: float, repeats: int) -> dict[int, list[float]]:
    """Training images/s over n images for each chunk setting, the settings alternated `repeats` times on one
    model (the machine's load drifts; alternating spreads it over both)."""
    torch.manual_seed(0)
    model = AlexNet(dropout=True, batchnorm=True, width=width)
    optimizer = make_optimizer("sgd", model.parameters(), 0.01)
    x, y = images(n)
    gen = torch.Generator().manual_seed(0)
    train_epoch(model, optimizer, x[: 2 * batch], y[: 2 * batch], batch, gen, cpu_runtime(0))  # warm-up
    rates: dict[int, list[float]] = {chunk: [] for chunk in chunks}
    for _ in range(repeats):
        for chunk in chunks:
            start = time.perf_counter()
            train_epoch(model, optimizer, x, y, batch, gen, cpu_runtime(chunk))
            rates[chunk].append(n / (time.perf_counter() - start))
    return rates


def wall_table(batches: list[int], chunks: list[int], n: int, width: float, repeats: int) -> str:
    rows = []
    for batch in batches:
        rates = wall_rates(batch, chunks, n, width, repeats)
        base = statistics.median(rates[chunks[0]])
        for chunk in chunks:
            each = ", ".join(f"{r:,.1f}" for r in rates[chunk])
            median = statistics.median(rates[chunk])
            rows.append([batch, chunk or "0 (one batch at a time)", f"{median:,.1f} ({each})", f"{median / base:.2f}x"])
    return common.markdown(["batch", "augment chunk", "train img/s, median (each run)", "vs chunk 0"], rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: a check that it runs")
    ap.add_argument("--batch-sizes", default="32,128", help="batch sizes (default 32,128)")
    ap.add_argument("--chunks", help="augment chunks, 0 first (default 0,1024,8192; 0,128 with --smoke)")
    ap.add_argument("--images", type=int, help="images counted (default: the largest chunk, at least 1,024)")
    ap.add_argument("--width", type=float, default=0.125, help="network width for the count (default 0.125)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: the count and the comparison)")
    ap.add_argument("--wall-images", type=int, help="images per timed epoch (default 1,024; 64 with --smoke)")
    ap.add_argument("--wall-width", type=float, help="network width for the timing (default 1; 0.125 smoke)")
    ap.add_argument("--wall-repeats", type=int, help="timed epochs per setting (default 2; 1 with --smoke)")
    ap.add_argument("--no-wall", action="store_true", help="the op count alone")
    ap.add_argument("--no-count", action="store_true", help="the wall-clock comparison alone")
    args = ap.parse_args(argv)
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    args.batch_sizes = ints(args.batch_sizes)
    args.chunks = ints(args.chunks or ("0,128" if args.smoke else "0,1024,8192"))
    args.images = args.images or max(max(args.chunks), 1024 if not args.smoke else 256)
    args.wall_images = args.wall_images or (64 if args.smoke else 1024)
    args.wall_width = args.wall_width or (0.125 if args.smoke else 1.0)
    args.wall_repeats = args.wall_repeats or (1 if args.smoke else 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu = platform.processor() or platform.machine()
    print(f"Command: python bench/launches.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    print(f"Machine: {cpu}, {os.cpu_count()} cores, {args.threads} torch thread(s); torch {torch.__version__}; "
          f"{datetime.date.today()}")  # fmt: skip
    if not args.no_count:
        print(f"\nATen ops dispatched per training step, one train_epoch over {args.images:,} random images, width "
              f"{args.width:g} (the count does not depend on it), SGD, dropout and batch norm, the study's "
              f"augmentation:\n")  # fmt: skip
        print(ops_table(args.batch_sizes, args.chunks, args.images, args.width), flush=True)
    if not args.no_wall:
        chunks = [args.chunks[0], max(args.chunks[-1], 1)] if len(args.chunks) > 1 else args.chunks
        chunks[-1] = min(chunks[-1], args.wall_images) if chunks[-1] else 0
        print(f"\nTraining images/s on this CPU, width {args.wall_width:g}, {args.wall_images:,} images an epoch, "
              f"{args.wall_repeats} epoch(s) per setting, alternated:\n")  # fmt: skip
        print(wall_table(args.batch_sizes[::-1], chunks, args.wall_images, args.wall_width, args.wall_repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
