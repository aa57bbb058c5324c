"""One trial's training step on this machine, built and timed as parts (a) to (d) of bench/device.py need it.

Every trial here is the product's own: train._new_trial builds the model, the optimizer (capturable under graph
capture), torch.compile for the compile mode and the TrainStep; train._set_backends sets the backend flags the
training function sets; train.train_epoch trains. Only the timing around them is this module's.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import device_common as common
import torch
from torch import Tensor

from tune_alexnet import augment, train
from tune_alexnet.settings import RUNTIME_DEFAULTS, STEP_MODES, TRIAL_DEFAULTS
from tune_alexnet.train import DIVERGENCE_CHECK_EVERY, GRAPH_WARMUP_STEPS, Runtime, train_epoch

# Precision and layout: (label, trial config overrides, runtime overrides). The first is the product's default
# (precision fp32, which on CUDA runs TF32 matmuls and convolutions, NCHW).
VARIANTS = {
    "tf32": ("fp32/TF32, NCHW", {"precision": "fp32"}, {"channels_last": False, "tf32": True}),
    "bf16-cl": ("bf16, channels-last", {"precision": "bf16"}, {"channels_last": True, "tf32": True}),
    "fp32": ("fp32, TF32 off, NCHW", {"precision": "fp32"}, {"channels_last": False, "tf32": False}),
}
DEFAULT_VARIANT = "tf32"
BOUND = "bound"  # the graph-captured step on pre-augmented, device-resident data: no augmentation, no indexing
WARMUP_BATCHES = 8  # covers the graph mode's eager warm-up steps and its capture
assert WARMUP_BATCHES > GRAPH_WARMUP_STEPS + 1


def variant_label(variant: str, on_cuda: bool) -> str:
    return "fp32 (TF32 is CUDA's)" if variant == DEFAULT_VARIANT and not on_cuda else VARIANTS[variant][0]


def runtime(device: torch.device, variant: str, step: str, chunk: int) -> tuple[Runtime, dict]:
    """The trial's resolved Runtime and its runtime settings, as train_cifar resolves them."""
    _, trial_over, run_over = VARIANTS[variant]
    run = {**RUNTIME_DEFAULTS, "device": "auto" if device.type == "cuda" else "cpu", **run_over}
    run.update(step=step, augment_chunk=chunk)
    return train.resolve_runtime({**TRIAL_DEFAULTS, **trial_over}, run, None), run


def new_trial(rt: Runtime, run: dict, batch: int, width: float, seed: int = 0) -> train.Trial:
    """SGD at lr 0.01 with dropout and batch norm, as the training function builds a trial."""
    config = {**TRIAL_DEFAULTS, "optimizer": "sgd", "lr": 0.01, "batch_size": batch, "dropout": True}
    config.update(batchnorm=True, width=width, seed=seed)
    train._set_backends(rt, run)
    return train._new_trial(config, rt)


def call_images(n: int, batch: int, chunk: int) -> int:
    """Images per timed train_epoch call: a whole augmentation chunk (rounded to batches as train_epoch rounds
    it), and at least the steps between two of its loss checks (each a host sync), within n."""
    chunk_images = max(1, chunk // batch) * batch
    return max(batch, min(n, max(chunk_images, DIVERGENCE_CHECK_EVERY * batch)) // batch * batch)


def warm_up(trial: train.Trial, x: torch.Tensor, y: torch.Tensor, batch: int, rt: Runtime) -> float:
    """Two short epochs (cuDNN's choices, the graph's capture, compilation); their seconds."""
    began = time.perf_counter()
    n = min(len(x), WARMUP_BATCHES * batch)
    for _ in range(2):
        train_epoch(trial.model, trial.optimizer, x[:n], y[:n], batch, trial.gen, rt, step=trial.step)
    common.sync()
    return time.perf_counter() - began


def epoch_seconds(trial: train.Trial, x: torch.Tensor, y: torch.Tensor, batch: int, rt: Runtime) -> float:
    """One train_epoch over all of x, its last batch partial where len(x) is not a multiple of the batch."""
    common.sync()
    began = time.perf_counter()
    train_epoch(trial.model, trial.optimizer, x, y, batch, trial.gen, rt, step=trial.step)
    common.sync()
    return time.perf_counter() - began


def timed(
    trial: train.Trial, x: torch.Tensor, y: torch.Tensor, batch: int, rt: Runtime, window: float
) -> tuple[int, float]:
    """(images, seconds) of train_epoch calls over slices of x until `window` seconds have passed (one at least)."""
    n = call_images(len(x), batch, rt.augment_chunk)
    common.sync()
    start, done, offset = time.perf_counter(), 0, 0
    while done == 0 or time.perf_counter() - start < window:
        offset = 0 if offset + n > len(x) else offset
        train_epoch(trial.model, trial.optimizer, x[offset : offset + n], y[offset : offset + n], batch, trial.gen,
                    rt, step=trial.step)  # fmt: skip
        done, offset = done + n, offset + n
    common.sync()
    return done, time.perf_counter() - start


def training_row(
    x: Tensor, y: Tensor, batch: int, variant: str, step: str, chunk: int, width: float, window: float
) -> dict:
    """A fresh trial's images/s with this step mode, precision and chunk; the seconds of its warm-up (compiling
    or capturing included) and the mode it ended in (a failed capture trains eagerly)."""
    rt, run = runtime(x.device, variant, step, chunk)
    trial = new_trial(rt, run, batch, width)
    first_s = warm_up(trial, x, y, batch, rt)
    images, seconds = timed(trial, x, y, batch, rt, window)
    return {"img_s": images / seconds, "first_s": first_s, "ran": trial.step.mode}


def pre_augmented(x: torch.Tensor, gen: torch.Generator, rt: Runtime, chunk: int = 8192) -> torch.Tensor:
    with torch.no_grad():
        parts = [augment.augment_batch(x[i : i + chunk], gen) for i in range(0, len(x), chunk)]
    return torch.cat(parts).contiguous(memory_format=rt.memory_format)


def bound_steps(trial: train.Trial, inputs: torch.Tensor, y: torch.Tensor, batch: int, steps: int) -> int:
    full = len(inputs) // batch
    for s in range(steps):
        i = (s % full) * batch
        trial.step(inputs[i : i + batch], y[i : i + batch])
    return steps


def bound_row(x: Tensor, y: Tensor, batch: int, variant: str, width: float, window: float) -> dict:
    """The launch-free bound: the graph-captured step (eager where there is no CUDA) replayed on data augmented
    once beforehand and kept on the device, so the timed loop holds the step alone."""
    step = "graph" if x.device.type == "cuda" else "eager"
    rt, run = runtime(x.device, variant, step, 0)
    trial = new_trial(rt, run, batch, width)
    trial.model.train()
    inputs = pre_augmented(x, trial.gen, rt)
    began = time.perf_counter()
    bound_steps(trial, inputs, y, batch, WARMUP_BATCHES)
    common.sync()
    first_s, steps = time.perf_counter() - began, len(x) // batch
    start, done = time.perf_counter(), 0
    while done == 0 or time.perf_counter() - start < window:
        done += bound_steps(trial, inputs, y, batch, steps) * batch
    common.sync()
    return {"img_s": done / (time.perf_counter() - start), "first_s": first_s, "ran": trial.step.mode}


def augmentation_rate(x: torch.Tensor, chunk: int, window: float) -> float:
    """Images/s of taking `chunk` shuffled images out of the data set and augmenting them, as train_epoch does."""
    gen = torch.Generator(x.device).manual_seed(0)
    order = torch.randperm(len(x), device=x.device, generator=gen)
    augment.augment_batch(x[order[:chunk]], gen)  # warm-up
    common.sync()
    start, done = time.perf_counter(), 0
    while done == 0 or time.perf_counter() - start < window:
        for first in range(0, len(x) - chunk + 1, chunk):
            augment.augment_batch(x[order[first : first + chunk]], gen)
            done += chunk
        common.sync()
    return done / (time.perf_counter() - start)


def launches_per_step(run: Callable[[], int]) -> tuple[float, float]:
    """(host launch calls, GPU kernels) per step of `run`, which returns its number of steps, from torch.profiler:
    the CUDA runtime's and driver's kernel and graph launch calls, and the kernels the device ran (copies and
    fills left out)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        steps = run()
        common.sync()
    try:  # the raw events: building the profiler's Python events for a few hundred steps takes seconds
        events = [(e.name(), e.device_type()) for e in prof.profiler.kineto_results.events()]
    except AttributeError:
        events = [(e.name, e.device_type) for e in prof.events()]
    launches = kernels = 0
    for name, device_type in events:
        if device_type == DeviceType.CUDA:
            kernels += not name.startswith(("Memcpy", "Memset"))
        elif "LaunchKernel" in name or "GraphLaunch" in name:
            launches += 1
    return launches / steps, kernels / steps


def counted_call(x: Tensor, y: Tensor, batch: int, step: str, chunk: int, width: float) -> Callable[[], int]:
    """A warmed-up trial (a graph one has captured) and its one timed call over a chunk's images, ready to be
    profiled: the call returns its number of steps."""
    rt, run = runtime(x.device, DEFAULT_VARIANT, step, chunk)
    trial = new_trial(rt, run, batch, width)
    warm_up(trial, x, y, batch, rt)
    n = call_images(len(x), batch, chunk)

    def one_call() -> int:
        train_epoch(trial.model, trial.optimizer, x[:n], y[:n], batch, trial.gen, rt, step=trial.step)
        return n // batch

    return one_call


def counted_bound(x: Tensor, y: Tensor, batch: int, width: float) -> Callable[[], int]:
    """The bound's trial, warmed up (captured on CUDA), and a run of its steps, ready to be profiled."""
    step = "graph" if x.device.type == "cuda" else "eager"
    rt, run = runtime(x.device, DEFAULT_VARIANT, step, 0)
    trial = new_trial(rt, run, batch, width)
    trial.model.train()
    inputs = pre_augmented(x, trial.gen, rt)
    bound_steps(trial, inputs, y, batch, WARMUP_BATCHES)
    return lambda: bound_steps(trial, inputs, y, batch, 2 * WARMUP_BATCHES)


# --- the step that parts (b) to (d) train with --------------------------------------------------------------


def chosen_step(args: argparse.Namespace, workdir: Path) -> tuple[str, int, str]:
    """(step mode, augmentation chunk, why) for parts (b) to (d): --step and --augment-chunk where given; else
    the pair of eager or graph and a chunk that part (a) measured fastest at the default precision, summed over
    its batch sizes (compile is left to --step: every packed process would compile on its own); else graph on
    CUDA with --chunk, eager on the CPU."""
    fallback = "graph" if torch.cuda.is_available() else "eager"
    measured = common.recorded(workdir, "throughput").get("rows", [])
    totals: dict[tuple[str, int], list[float]] = {}
    for r in measured:
        if r["variant"] == DEFAULT_VARIANT and r["mode"] in ("eager", "graph") and r.get("ran") == r["mode"]:
            totals.setdefault((r["mode"], r["chunk"]), []).append(common.STUDY_TRAIN_IMAGES / r["img_s"])
    complete = {k: sum(v) for k, v in totals.items() if len(v) == len(args.batch_sizes)}
    if complete:
        (mode, chunk), why = min(complete, key=complete.get), "the fastest pair part (a) measured"
    else:
        mode, chunk, why = fallback, args.chunk, "part (a) measured no complete pair; the default choice"
    if args.step != "auto":
        mode, why = args.step, "--step"
    if args.augment_chunk is not None:
        chunk, why = args.augment_chunk, why + ", --augment-chunk"
    if mode == "graph" and getattr(args, "gpu_tests", None) == "failed":
        mode, why = "eager", "eager: tests/test_gpu_step.py failed on this card"
    assert mode in STEP_MODES
    return mode, chunk, why
