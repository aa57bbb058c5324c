"""The training function: one trial is one run of the study, in plain PyTorch.

`train_cifar(config, data)` is what Tune calls; the same function runs in a test
or a script with a `report` callback of its own, and then needs no Ray at all
(ray_hooks.py is the only place the training side touches Ray). The data set
lives on the trial's device as uint8 tensors; each epoch draws a permutation there
and augments whole batches (augment.py), so no DataLoader or PIL is involved.
The function ends itself by the study's plateau rule (stopper.py); it checkpoints
as checkpoint.py describes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from . import augment, checkpoint, resume
from .data import Cifar
from .export import score
from .grid import full_config, run_number
from .model import AlexNet
from .settings import (
    AUGMENT_BYTES_PER_IMAGE,
    AUGMENT_MEMORY_SHARE,
    GPU_MEMORY_CAP,
    METRIC,
    OPTIMIZERS,
    RUNTIME_DEFAULTS,
    STEP_MODES,
    TRIAL_DEFAULTS,
)
from .stopper import plateau_update, should_stop
from .storage import brief, shown

log = logging.getLogger("tune_alexnet.train")

DIVERGENCE_CHECK_EVERY = 50  # steps between loss checks (each check syncs the device)


# Tune keeps the checkpoint of highest rank and the latest one (CheckpointConfig(num_to_keep=1)):
# a final checkpoint outranks all, a newer resume checkpoint outranks older ones and every best-weights
# one, which rank by accuracy. So a running trial keeps its newest resume state and its best weights,
# and a finished one keeps only its final checkpoint.
def checkpoint_rank(kind: str | None, epoch: int, best_val_acc: float) -> float:
    if kind == checkpoint.KIND_FINAL:
        return 1e6
    if kind == checkpoint.KIND_RESUME:
        return 1e3 + epoch  # above any accuracy (at most 100), newer above older
    return best_val_acc


# report(metrics, checkpoint_dir or None): tune.report through ray_hooks, or a test's recorder.
Report = Callable[[dict, "str | None"], None]


class GpuNotVisible(RuntimeError):
    """Ray granted a GPU share that torch cannot use."""


class SaveNow(Exception):
    """Raised at a step boundary when the trial is asked to save (a stop, a spot notice): `position` is where the
    epoch stands, enough to continue it exactly."""

    def __init__(self, reason: str, position: dict):
        super().__init__(reason)
        self.reason, self.position = reason, position


class Watch(Protocol):
    """What tells a trial to save (stopping.TrialWatch under Tune): `requested()` is read at every training step
    and names the reason; `hold()` waits after the saved state is reported."""

    def requested(self) -> str | None: ...

    def hold(self) -> None: ...


@dataclass(frozen=True)
class Runtime:
    """Where and how a trial computes, resolved from its config, its runtime settings and Ray's grant."""

    device: torch.device
    threads: int
    gpu_share: float  # fraction of a GPU Ray granted; 0 on CPU
    amp_dtype: torch.dtype | None  # autocast dtype, None for fp32
    channels_last: bool
    step: str = "eager"  # eager | graph | compile (settings.STEP_MODES)
    augment_chunk: int = 0  # images augmented at once; 0: one batch at a time
    tf32: bool = False  # TF32 matmuls and convolutions (CUDA only)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def make_optimizer(name: str, params, lr: float, capturable: bool = False) -> torch.optim.Optimizer:
    """The study's optimizer; `capturable` keeps Adam's and RMSprop's step counts on the device, as a captured
    CUDA graph needs (SGD has none)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is unknown; allowed: {', '.join(OPTIMIZERS)}")
    torch_class, settings = OPTIMIZERS[name]
    extra = {"capturable": True} if capturable and torch_class != "SGD" else {}
    return getattr(torch.optim, torch_class)(params, lr=lr, **settings, **extra)


def resolve_runtime(config: dict, runtime: dict, granted: dict | None) -> Runtime:
    """The GPU Ray granted (or, outside Ray, any GPU) unless the user asked for the CPU; Ray's CPUs as threads."""
    if granted is None:  # outside Ray: use what the machine has
        gpu_share = 1.0 if torch.cuda.is_available() else 0.0
        threads = torch.get_num_threads()
    else:
        gpu_share = granted.get("GPU", 0.0)
        threads = max(1, int(granted.get("CPU", 1)))
    if runtime["device"] not in ("auto", "cpu"):
        raise ValueError(f"device {runtime['device']!r} is unknown; allowed: auto, cpu")
    if runtime["device"] == "cpu":
        gpu_share = 0.0
    elif gpu_share > 0 and not torch.cuda.is_available():
        raise GpuNotVisible(_gpu_not_visible(gpu_share))
    use_cuda = gpu_share > 0
    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    precision = config["precision"] if config["precision"] != "auto" else ("bf16" if use_cuda else "fp32")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision {precision!r} is unknown; allowed: fp32, bf16, auto")
    cl = runtime["channels_last"]
    channels_last = (use_cuda and precision == "bf16") if cl == "auto" else bool(cl)
    step = runtime["step"]
    if step not in STEP_MODES:
        raise ValueError(f"step {step!r} is unknown; allowed: {', '.join(STEP_MODES)}")
    if step == "graph" and not use_cuda:
        log.warning("--step graph needs a CUDA device; this trial on the CPU trains eagerly")
        step = "eager"
    if runtime.get("compile") and step == "eager":  # the flag of earlier versions
        step = "compile"
    amp = torch.bfloat16 if precision == "bf16" else None
    chunk = int(runtime["augment_chunk"])
    if use_cuda and chunk:
        chunk = fitting_chunk(chunk, memory_cap(gpu_share) * torch.cuda.get_device_properties(device).total_memory)
    tf32 = use_cuda and bool(runtime["tf32"])
    return Runtime(device, threads, gpu_share, amp, channels_last, step, chunk, tf32)


def memory_cap(gpu_share: float) -> float:
    """The fraction of the card one trial's allocator may use: GPU_MEMORY_CAP of its share, so that the CUDA
    context (outside the allocator, about 0.5 GB) of every trial packed on the card fits beside the caps."""
    return min(1.0, GPU_MEMORY_CAP * gpu_share)


def fitting_chunk(requested: int, trial_bytes: float) -> int:
    """The augmentation chunk that fits a trial's memory: at most AUGMENT_MEMORY_SHARE of it in the chunk's float
    temporaries (BENCHMARKS.md has the arithmetic). The draws do not depend on the chunk (train_epoch)."""
    fits = int(AUGMENT_MEMORY_SHARE * trial_bytes // AUGMENT_BYTES_PER_IMAGE)
    if fits < requested:
        log.info("augmenting %d images at once instead of %d: that many fit this trial's GPU memory",
                 fits, requested)  # fmt: skip
    return max(1, min(requested, fits))


def _gpu_not_visible(gpu_share: float) -> str:
    fix = (
        "install a CUDA build of torch on the GPU nodes"
        if torch.version.cuda is None
        else f"this torch is built for CUDA {torch.version.cuda}: check the node's NVIDIA driver and that it has "
        f"the GPU it declares"
    )
    return (
        f"Ray granted this trial {gpu_share:g} GPU but torch {torch.__version__} sees no CUDA device "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); {fix}; or pass --device cpu "
        f"to train on the CPU on purpose"
    )


def to_device_nchw(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, H, W, C) uint8 numpy (possibly read-only, from the object store) -> (N, C, H, W) uint8 on device."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)


@dataclass
class Trial:
    """One run's model, optimizer, generator and counters, and its best weights so far (kept on the device
    between checkpoint writes: no host copy, no sync, when the accuracy improves)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: TrainStep
    gen: torch.Generator
    model_args: dict
    state: dict = field(default_factory=lambda: dict(NEW_COUNTERS))
    best_weights: dict | None = None
    unwritten_best: bool = False  # a new best since the last checkpoint
    position: dict | None = None  # inside an epoch: where a saved state stopped it (SaveNow.position)
    watch: Watch | None = None
    rank: tuple = (None, None)  # (study run number, Tune trial id): what breaks a tie of accuracies (export.score)


NEW_COUNTERS = {
    "epoch": 0,
    "best_val_acc": -1.0,
    "best_epoch": 0,
    "epochs_since_best": 0,
    "train_time_s": 0.0,
    "eval_time_s": 0.0,
}


def train_cifar(
    config: dict,
    data: Cifar,
    report: Report | None = None,
    checkpoint_from=None,
    runtime: dict | None = None,
    keep_free: int = 0,
    stop_key: str | None = None,
    watch: Watch | None = None,
) -> None:
    """Tune's function trainable. Outside Tune, pass `report` and, to resume, `checkpoint_from`: a
    checkpoint folder (or URI, or tune.Checkpoint), or a list of them, newest first. Under Tune, a checkpoint
    that would leave a local storage with less than `keep_free` bytes is not written (ray_hooks.report), and the
    trial saves its state at the next step when the sweep's flag `stop_key` is raised or its node gets a spot
    notice (stopping.py); outside Tune, `watch` does that."""
    cfg = {**TRIAL_DEFAULTS, **full_config(config)}
    run = {**RUNTIME_DEFAULTS, **(runtime or {})}
    granted, node, trial_id = None, None, None
    if report is None:
        from . import ray_hooks
        from .cluster import private_kernel_cache

        ray_hooks.quiet_exit_on_sigterm()
        private_kernel_cache()  # before anything compiles: a joined cluster's trials have no private cache yet
        report = functools.partial(ray_hooks.report, keep_free=keep_free)
        checkpoint_from = ray_hooks.resume_candidates()
        granted, node, trial_id = ray_hooks.granted_resources(), ray_hooks.node_id(), ray_hooks.trial_id()
        watch = ray_hooks.trial_watch(stop_key)
    try:
        _train(cfg, data, report, checkpoint_from, run, granted, node, watch, trial_id)
    finally:
        if hasattr(watch, "close"):
            watch.close()


def _train(cfg: dict, data: Cifar, report: Report, checkpoint_from, run: dict, granted, node, watch,
           trial_id: str | None = None) -> None:  # fmt: skip
    rt = resolve_runtime(cfg, run, granted)
    _set_backends(rt, run)
    trial = _restore(cfg, rt, checkpoint_from, len(data.train_x))
    if trial is None:
        return  # it had finished; the driver died before recording that
    trial.watch, trial.rank = watch, (run_number(cfg), trial_id)
    train_x, train_y = to_device_nchw(data.train_x, rt.device), torch.tensor(data.train_y, device=rt.device)
    test_x, test_y = to_device_nchw(data.test_x, rt.device), torch.tensor(data.test_y, device=rt.device)
    clock = {"resume": time.monotonic(), "best": -math.inf, "report_s": 0.0}
    extra = {"node_id": node, "gpus_granted": (granted or {}).get("GPU", 0.0)}
    for epoch in range(trial.state["epoch"] + 1, cfg["epochs"] + 1):
        while True:  # an epoch, saved and held at a step where asked to (a stop, a spot notice), then continued
            try:
                metrics = _train_and_evaluate(trial, epoch, cfg, run, rt, (train_x, train_y, test_x, test_y))
                break
            except SaveNow as save:
                _save_and_hold(trial, epoch, save, extra, rt, data.classes, report, clock)
        kind = _checkpoint_kind(trial, metrics, run, clock)
        metrics.update(extra, report_s=clock["report_s"], checkpoint_kind=kind)
        metrics["checkpoint_rank"] = checkpoint_rank(kind, epoch, trial.state["best_val_acc"])
        _report(trial, metrics, kind, rt, data.classes, report, clock)
        if metrics["ends_trial"]:
            return


def _set_backends(rt: Runtime, run: dict) -> None:
    torch.set_num_threads(rt.threads)
    if rt.device.type == "cuda":
        set_tf32(rt.tf32)
        torch.backends.cudnn.benchmark = True
        if 0 < rt.gpu_share < 1:  # packed trials must not starve each other of memory
            torch.cuda.set_per_process_memory_fraction(memory_cap(rt.gpu_share), rt.device)


def set_tf32(on: bool) -> None:
    """TF32 in CUDA's fp32 matmuls and convolutions, through one API (`fp32_precision`): mixing it with the older
    `allow_tf32` setters makes torch's getters of either raise."""
    precision = "tf32" if on else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


def _new_trial(cfg: dict, rt: Runtime) -> Trial:
    torch.manual_seed(cfg["seed"])
    gen = torch.Generator(rt.device).manual_seed(cfg["seed"])
    model_args = _model_args(cfg)
    model = AlexNet(**model_args).to(rt.device, memory_format=rt.memory_format)
    optimizer = make_optimizer(cfg["optimizer"], model.parameters(), cfg["lr"], capturable=rt.step == "graph")
    # Static shapes: the epoch's last, smaller batch runs on the eager model instead of recompiling (TrainStep).
    step_model = torch.compile(model, dynamic=False) if rt.step == "compile" else model
    step = TrainStep(step_model, optimizer, rt, cfg["batch_size"], eager_model=model)
    return Trial(model, optimizer, step, gen, model_args)


def _restore(cfg: dict, rt: Runtime, checkpoint_from, train_images: int) -> Trial | None:
    """A new trial with the newest resume state that fits it loaded; None if the run had already finished.

    A state that does not fit this trial (resume.state_problem: tampered, or from another trial) is passed over
    like a torn one, with one line in the trial's log: an older state is tried, else the trial starts afresh."""
    trial = _new_trial(cfg, rt)
    for resumed in _resume_candidates(checkpoint_from, cfg):
        if resumed == "finished":
            return None
        where, trainer, best = resumed
        try:
            problem = resume.state_problem(trainer, best, cfg, trial.model, train_images)
            if problem is None:
                _load_state(trial, trainer, best, rt)
        except Exception as exc:  # a kind of tensor or value the checks did not foresee
            problem = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        if problem is None:
            s = trial.state
            inside = f", inside epoch {s['epoch'] + 1} at step {trial.position['steps']}" if trial.position else ""
            log.info("resumed at epoch %d%s (best %.2f%%, %d epochs without improvement) from %s",
                     s["epoch"], inside, s["best_val_acc"], s["epochs_since_best"], where)  # fmt: skip
            return trial
        log.warning("resume state %s does not fit this trial (%s); trying an older checkpoint", where, problem)
        trial = _new_trial(cfg, rt)  # nothing of the refused state may stay
    return trial


def _load_state(trial: Trial, trainer: dict, best: dict, rt: Runtime) -> None:
    """A checked resume state (loaded on the CPU) into the trial, its optimizer in this run's step mode."""
    trial.model.load_state_dict(trainer["model"])
    trial.optimizer.load_state_dict(resume.in_step_mode(trainer["optimizer"], rt.step == "graph"))
    trial.gen.set_state(trainer["generator"].cpu())
    torch.set_rng_state(trainer["torch_rng"].cpu())
    if rt.device.type == "cuda" and trainer.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(trainer["cuda_rng"].cpu(), rt.device)
    trial.state = {k: trainer["counters"][k] for k in NEW_COUNTERS}
    # before the first epoch's end (a state saved inside epoch 1) there are no best weights yet
    trial.best_weights = {k: v.to(rt.device) for k, v in best.items()} if trial.state["best_epoch"] else None
    trial.position = trainer.get("position")  # a state saved inside an epoch: where it stood, in the next epoch


def _train_and_evaluate(trial: Trial, epoch: int, cfg: dict, run: dict, rt: Runtime, tensors) -> dict:
    """One epoch: train, evaluate, apply the plateau rule; the epoch's metrics (the counters updated)."""
    train_x, train_y, test_x, test_y = tensors
    start = time.perf_counter()
    before = trial.position["train_s"] if trial.position else 0.0  # the part trained before a saved state
    resumed_at = trial.position["steps"] if trial.position else None  # the step a saved state continued from
    try:
        train_loss, train_acc = train_epoch(trial.model, trial.optimizer, train_x, train_y, cfg["batch_size"],
                                            trial.gen, rt, augment_images=cfg["augment"], step=trial.step,
                                            resume_at=trial.position,
                                            save_now=trial.watch.requested if trial.watch else None)  # fmt: skip
    except SaveNow as save:
        save.position.update(epoch=epoch, train_s=before + time.perf_counter() - start)
        raise
    trial.position = None
    _sync(rt)
    trained = time.perf_counter()
    val_loss, val_acc = evaluate(trial.model, test_x, test_y, run["eval_batch_size"], rt)
    _sync(rt)
    train_s, eval_s = before + trained - start, time.perf_counter() - trained
    s = trial.state
    diverged = not (math.isfinite(train_loss) and math.isfinite(val_loss))
    s.update(epoch=epoch, train_time_s=s["train_time_s"] + train_s, eval_time_s=s["eval_time_s"] + eval_s)
    if not diverged:
        best, since, improved = plateau_update(s["best_val_acc"], s["epochs_since_best"], val_acc)
        s.update(best_val_acc=best, epochs_since_best=since, best_epoch=epoch if improved else s["best_epoch"])
        if improved:  # on the device: a copy kernel per tensor, no host round trip
            trial.best_weights = {k: v.detach().clone() for k, v in trial.model.state_dict().items()}
            trial.unwritten_best = True
    else:
        log.warning("loss became non-finite at epoch %d; stopping this trial as diverged", epoch)
    return {
        "epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc,
        "best_val_acc": max(s["best_val_acc"], 0.0), "best_epoch": s["best_epoch"],
        "epochs_since_best": s["epochs_since_best"], "train_s": train_s, "eval_s": eval_s,
        "train_time_s": s["train_time_s"], "eval_time_s": s["eval_time_s"], "diverged": diverged,
        "images_per_s": len(train_x) / train_s, "device": str(rt.device),
        "precision": "bf16" if rt.amp_dtype else "fp32", "channels_last": rt.channels_last,
        "step_mode": trial.step.mode, "tf32": rt.tf32, "augment_chunk": rt.augment_chunk,
        "ends_trial": diverged or should_stop(epoch, s["epochs_since_best"], cfg["patience"], cfg["epochs"]),
        "resumed_at_step": resumed_at,  # in every epoch's result: Tune's progress.csv keeps its first columns
    }  # fmt: skip


def _checkpoint_kind(trial: Trial, metrics: dict, run: dict, clock: dict) -> str | None:
    """The run's last report carries its final checkpoint; a resume state every `resume_every_s`; new best
    weights at most every `best_every_s` (a crash in between replays exactly, reaching the same best again)."""
    now = time.monotonic()
    if metrics["ends_trial"]:
        return checkpoint.KIND_FINAL if trial.best_weights is not None else None
    if now - clock["resume"] >= run["resume_every_s"]:
        return checkpoint.KIND_RESUME
    if trial.unwritten_best and now - clock["best"] >= run["best_every_s"]:
        return checkpoint.KIND_BEST
    return None


def _save_and_hold(trial: Trial, epoch: int, save: SaveNow, extra: dict, rt: Runtime, classes, report: Report,
                   clock: dict) -> None:  # fmt: skip
    """Report a resume state of where the epoch stands, then wait (Watch.hold). The report is not an epoch's: it
    has no `epoch`, so each epoch is reported once, whether the trial goes on here or restarts from the state."""
    trial.position = save.position
    s, kind = trial.state, checkpoint.KIND_RESUME
    metrics = {
        "saved_for": save.reason, "saved_in_epoch": epoch, "saved_at_step": save.position["steps"],
        "best_val_acc": max(s["best_val_acc"], 0.0), "best_epoch": s["best_epoch"],
        "epochs_since_best": s["epochs_since_best"], "train_time_s": s["train_time_s"],
        "eval_time_s": s["eval_time_s"], **extra, "checkpoint_kind": kind,
        # above the resume state after the last whole epoch, below the one after this epoch
        "checkpoint_rank": checkpoint_rank(kind, epoch - 1, s["best_val_acc"]) + 0.5,
    }  # fmt: skip
    _report(trial, metrics, kind, rt, classes, report, clock)
    log.info("saved the state at step %d of epoch %d (%s); waiting", save.position["steps"], epoch, save.reason)
    trial.watch.hold()


def _report(trial: Trial, metrics: dict, kind: str | None, rt: Runtime, classes, report: Report, clock: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="tune-alexnet-ckpt-") as d:
        written = time.perf_counter()
        if kind is not None:
            trainer = _trainer_state(trial, rt) if kind == checkpoint.KIND_RESUME else None
            # files the same whatever the device; before the first epoch's end, the weights as they stand
            best = trial.best_weights if trial.best_weights is not None else trial.model.state_dict()
            best = {k: v.to("cpu") for k, v in best.items()}
            progress = {**trial.state, "kind": kind, **({"diverged": True} if metrics.get("diverged") else {})}
            checkpoint.write(d, best, trial.model_args, progress, trainer, classes)
        metrics["checkpoint_s"] = time.perf_counter() - written
        metrics[METRIC] = score(metrics["best_val_acc"] if metrics.get("best_epoch") else None, *trial.rank)
        reported = time.perf_counter()
        report(metrics, d if kind is not None else None)
        clock["report_s"] = time.perf_counter() - reported
    if kind is not None:
        trial.unwritten_best = False
        clock["best"] = time.monotonic()
    if kind == checkpoint.KIND_RESUME:
        clock["resume"] = time.monotonic()


def _trainer_state(trial: Trial, rt: Runtime) -> dict:
    return {
        "model": trial.model.state_dict(),
        "optimizer": trial.optimizer.state_dict(),
        "generator": trial.gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None,
        "counters": dict(trial.state),
        **({"position": trial.position} if trial.position is not None else {}),
    }


def run_ended(progress: dict, cfg: dict) -> bool:
    """Whether a final checkpoint's counters say what ends a run: a divergence, or the stopping rule on this
    trial's own patience and epochs. Anything else (an edited progress.json) is passed over, not taken on trust."""
    epoch, since = progress.get("epoch"), progress.get("epochs_since_best")
    if progress.get("diverged") is True:
        return True
    counters = all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= cfg["epochs"] for v in (epoch, since))
    return counters and since <= epoch and should_stop(epoch, since, cfg["patience"], cfg["epochs"])


def _model_args(cfg: dict) -> dict:
    return {"dropout": cfg["dropout"], "batchnorm": cfg["batchnorm"], "width": cfg["width"]}


def _resume_candidates(candidates, cfg: dict):
    """The readable resume states among the trial's checkpoints (newest first), as (where, trainer state, best
    weights), loaded on the CPU; first "finished" instead if the newest says the run ended. None left: the trial
    starts afresh (an exact replay: every draw is seeded)."""
    if candidates is None:
        return
    if not isinstance(candidates, list):
        candidates = [candidates]
    recorded = 0
    nothing_recorded = all(isinstance(c, tuple) for c in candidates)
    weights = checkpoint.network_bytes(_model_args(cfg))
    for candidate in candidates:
        stop_only = isinstance(candidate, tuple)  # newer than Tune's record (ray_hooks.STOP_ONLY)
        candidate = candidate[0] if stop_only else candidate
        recorded += not stop_only
        with contextlib.ExitStack() as stack:
            try:
                d = stack.enter_context(checkpoint.local_copy(candidate))
            except OSError as exc:  # a bucket that does not answer (storage.within) or a folder gone
                log.warning(
                    "checkpoint %s cannot be copied (%s); trying an older one",
                    getattr(candidate, "path", candidate),
                    exc,
                )
                continue
            progress = checkpoint.read_progress(d)
            if (
                recorded == 1
                and not stop_only
                and progress is not None
                and progress.get("kind") == checkpoint.KIND_FINAL
            ):
                if (d / checkpoint.TRAINER_FILE).exists():
                    why = "it holds a resume state, which a final checkpoint never does"
                elif not run_ended(progress, cfg):
                    why = (f"epoch {shown(progress.get('epoch'))} of {cfg['epochs']}, "
                           f"{shown(progress.get('epochs_since_best'))} epochs without improvement, "
                           f"patience {cfg['patience']}")  # fmt: skip
                else:
                    yield "finished"
                    return
                log.warning("final checkpoint %s does not end this trial (%s); trying its resume state or an older "
                            "checkpoint", d, why)  # fmt: skip
            if not (d / checkpoint.TRAINER_FILE).exists():
                continue
            resumed = checkpoint.read_resume(d, weights)
            inside_epoch = resumed is not None and isinstance(resumed[0], dict) and resumed[0].get("position")
            if stop_only and not isinstance(inside_epoch, dict):  # its epoch may be missing from the records
                log.info("resume state %s holds no place inside an epoch and Tune never recorded it; trying the "
                         "one it recorded", d / checkpoint.TRAINER_FILE)  # fmt: skip
                continue
            counters = resumed[0].get("counters") if stop_only else None  # (data: checked whole further on)
            done = counters.get("epoch") if isinstance(counters, dict) else None
            if stop_only and nothing_recorded and not (type(done) is int and done == 0):  # Tune's new records lack them
                log.info("resume state %s follows %s epochs that Tune never recorded; the trial starts afresh",
                         d / checkpoint.TRAINER_FILE, brief(done))  # fmt: skip
                continue
            if resumed is not None:
                yield (d / checkpoint.TRAINER_FILE, *resumed)
                continue
            log.warning("resume state %s is unreadable; trying an older checkpoint", d / checkpoint.TRAINER_FILE)


def _sync(rt: Runtime) -> None:
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)


def _autocast(rt: Runtime):
    if rt.amp_dtype is None:
        return torch.autocast(rt.device.type, enabled=False)
    # A captured graph must not keep autocast's cache of cast weights (PyTorch's CUDA-graph notes).
    return torch.autocast(rt.device.type, dtype=rt.amp_dtype, cache_enabled=rt.step != "graph")


GRAPH_WARMUP_STEPS = 3  # eager steps on a side stream before capture: lazy optimizer state, cuDNN's choices
# Below this torch, a capture that fails can leave the CUDA generator in capture mode: the next eager dropout
# then fails ("Offset increment outside graph capture"), so a failed capture cannot fall back to eager there.
CAPTURE_FALLBACK_TORCH = "2.12"
# Adam's and RMSprop's one-time warning that a capturable optimizer steps outside a capture: the warm-up and
# the epoch's last batch do so on purpose.
CAPTURABLE_WARNING = ".*capturable=True.*"


class CaptureFailed(RuntimeError):
    """A failed capture on a torch that cannot fall back to eager steps: one line that names the way out."""


class TrainStep:
    """Forward, loss, backward and optimizer step on one batch, adding the loss and the correct count into
    device tensors (no host sync). In `graph` mode, after a few eager steps, the whole step of a full batch is
    captured once as a CUDA graph and then replayed, one launch where eager mode issues hundreds: each replay
    draws fresh dropout masks (the default CUDA generator advances per replay), batch norm updates its running
    statistics in place as in eager mode, and a batch of another size (an epoch's last) runs eagerly on the
    same weights, optimizer state and gradient tensors. A capture that fails leaves the trial eager, with one
    warning (on torch below CAPTURE_FALLBACK_TORCH it ends the trial with one line instead). In `compile` mode
    the compiled model has static shapes and that last batch runs on `eager_model`, so nothing recompiles.

    Exactness on CUDA: a replay runs the kernels eager mode chose, so it matches eager steps up to the summation
    order of those kernels; `cudnn.benchmark` (on in training) may choose other kernels in another process, and
    some backward kernels are not deterministic, so two runs on CUDA agree closely, not bit for bit."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        rt: Runtime,
        batch_size: int,
        eager_model: nn.Module | None = None,
    ):
        self.model, self.optimizer, self.rt, self.batch_size = model, optimizer, rt, batch_size
        self.eager_model = model if eager_model is None else eager_model
        self.loss_sum = torch.zeros((), device=rt.device)
        self.correct = torch.zeros((), device=rt.device, dtype=torch.long)
        self.mode = rt.step
        self.warmup_left = GRAPH_WARMUP_STEPS
        self.graph = None
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None

    def begin_epoch(self) -> None:
        self.loss_sum.zero_()
        self.correct.zero_()

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        if self.mode != "graph" or len(targets) != self.batch_size:
            model = self.model if self.mode != "compile" or len(targets) == self.batch_size else self.eager_model
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=CAPTURABLE_WARNING)
                self.eager(inputs, targets, model)
        elif self.graph is not None:
            self.static[0].copy_(inputs)
            self.static[1].copy_(targets)
            self.graph.replay()
        elif self.warmup_left > 0:
            self.warmup_left -= 1
            side = torch.cuda.Stream(self.rt.device)
            side.wait_stream(torch.cuda.current_stream(self.rt.device))
            with torch.cuda.stream(side), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=CAPTURABLE_WARNING)
                self.eager(inputs, targets)
            torch.cuda.current_stream(self.rt.device).wait_stream(side)
        else:
            self.capture(inputs, targets)

    def eager(self, inputs: torch.Tensor, targets: torch.Tensor, model: nn.Module | None = None) -> None:
        # Once a graph exists its gradient tensors are the ones to use: zeroed, not dropped for a second set.
        self.optimizer.zero_grad(set_to_none=self.graph is None)
        self._forward_backward_step(inputs, targets, self.model if model is None else model)

    def _forward_backward_step(self, inputs: torch.Tensor, targets: torch.Tensor, model: nn.Module) -> None:
        with _autocast(self.rt):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float(), targets)
        loss.backward()
        self.optimizer.step()
        self.loss_sum.add_(loss.detach() * targets.shape[0])
        self.correct.add_((logits.argmax(1) == targets).sum())

    def capture(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Record the step once (nothing runs while recording), then replay it for this batch."""
        self.static = (inputs.clone(), targets.clone())
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # backward makes the gradients inside the graph's memory
        stream = torch.cuda.current_stream(self.rt.device)
        try:
            with torch.cuda.graph(graph):
                self._forward_backward_step(*self.static, self.model)
        except Exception as exc:  # an op that cannot be captured, or too little memory for the graph's pool
            torch.cuda.set_stream(stream)  # a failed capture_end leaves the capture's side stream current
            self._capture_failed(exc)
            self.mode, self.static = "eager", None
            self(inputs, targets)
            return
        self.graph = graph
        graph.replay()

    def _capture_failed(self, exc: Exception) -> None:
        why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if torch.torch_version.TorchVersion(torch.__version__) < CAPTURE_FALLBACK_TORCH:
            raise CaptureFailed(
                f"capturing the training step as a CUDA graph failed ({why}); torch {torch.__version__} cannot "
                f"train on eagerly after that (CUDA's random generator stays in capture mode): run with --step "
                f"eager, or torch >= {CAPTURE_FALLBACK_TORCH}"
            ) from None
        log.warning("capturing the training step as a CUDA graph failed (%s); this trial trains eagerly", why)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x_u8: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    gen: torch.Generator,
    rt: Runtime,
    augment_images: bool = True,
    step: TrainStep | None = None,
    resume_at: dict | None = None,
    save_now: Callable[[], str | None] | None = None,
) -> tuple[float, float]:
    """One shuffled pass; returns (mean loss, accuracy %). A non-finite loss ends the pass early as NaN.

    Images are augmented `rt.augment_chunk` at a time (whole batches; one batch when 0), ahead of the steps that
    use them: the same per-image distribution in a handful of launches per chunk instead of per batch. Each
    batch's draws are made in batch order from `gen` whatever the chunk, so the chunk changes no number: a run
    replays exactly with any chunk. The host waits for the device only every DIVERGENCE_CHECK_EVERY steps, to
    check the loss.

    Before each step, `save_now()` naming a reason raises SaveNow with where the pass stands: its order, the
    generator's state at the current chunk's start (the chunk's draws are made again from it), the step and the
    running sums. `resume_at` (such a position) continues the pass from there, as if it had never stopped; one
    that does not fit this pass (other data, a tampered file) is refused with ValueError."""
    model.train()
    step = step or TrainStep(model, optimizer, rt, batch_size)
    step.begin_epoch()
    n = len(x_u8)
    chunk = max(1, rt.augment_chunk // batch_size) * batch_size
    seen = steps = begin = skip = 0
    if resume_at is not None and (problem := resume.position_problem(resume_at, n, batch_size)):
        # _restore passes such a state over whole; its weights must not train on from another position
        raise ValueError(f"the state saved inside this epoch does not fit it ({problem})")
    if resume_at is None:
        order = torch.randperm(n, device=x_u8.device, generator=gen)
    else:
        order, chunk, begin, skip = (resume_at["order"].to(x_u8.device), resume_at["chunk"], resume_at["first"],
                                     resume_at["start"])  # fmt: skip
        seen, steps = resume_at["seen"], resume_at["steps"]
        step.loss_sum.copy_(resume_at["loss_sum"])
        step.correct.copy_(resume_at["correct"])
        gen.set_state(resume_at["chunk_gen"].cpu())
    for first in range(begin, n, chunk):
        chunk_gen = gen.get_state() if save_now is not None else None
        skipped = skip if first == begin else 0  # images of this chunk trained before a saved state
        sizes = resume.epoch_batches(min(chunk, n - first), batch_size, seen - skipped)
        if not sizes:
            break
        idx = order[first : first + sum(sizes)]
        images = x_u8[idx]
        if augment_images:
            params = augment.concat_params([augment.sample_params(b, x_u8.device, gen) for b in sizes])
            inputs = augment.augment_batch(images, params=params)
        else:
            inputs = augment.prepare_eval(images)
        inputs, targets = inputs.contiguous(memory_format=rt.memory_format), y[idx]
        start = 0
        for size in sizes:
            if start < skipped:
                start += size
                continue
            if save_now is not None and (reason := save_now()):
                raise SaveNow(reason, {"order": order.cpu(), "chunk": chunk, "first": first, "start": start,
                                       "chunk_gen": chunk_gen, "seen": seen, "steps": steps,
                                       "loss_sum": step.loss_sum.detach().cpu().clone(),
                                       "correct": step.correct.cpu().clone()})  # fmt: skip
            step(inputs[start : start + size], targets[start : start + size])
            start, seen, steps = start + size, seen + size, steps + 1
            if steps % DIVERGENCE_CHECK_EVERY == 0 and not torch.isfinite(step.loss_sum).item():
                return math.nan, 100.0 * step.correct.item() / seen
    return step.loss_sum.item() / seen, 100.0 * step.correct.item() / seen


@torch.inference_mode()
def evaluate(
    model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, batch_size: int, rt: Runtime
) -> tuple[float, float]:
    """(mean loss, accuracy %) on the unaugmented images, in large batches without gradients."""
    model.eval()
    loss_sum = torch.zeros((), device=x_u8.device)
    correct = torch.zeros((), device=x_u8.device, dtype=torch.long)
    for start in range(0, len(x_u8), batch_size):
        inputs = augment.prepare_eval(x_u8[start : start + batch_size]).contiguous(memory_format=rt.memory_format)
        targets = y[start : start + batch_size]
        with _autocast(rt):
            logits = model(inputs)
        loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum")
        correct += (logits.argmax(1) == targets).sum()
    return loss_sum.item() / len(x_u8), 100.0 * correct.item() / len(x_u8)
