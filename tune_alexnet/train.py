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

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from . import augment, checkpoint
from .data import Cifar
from .grid import full_config
from .model import AlexNet
from .settings import OPTIMIZERS, RUNTIME_DEFAULTS, TRIAL_DEFAULTS
from .stopper import plateau_update, should_stop

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


@dataclass(frozen=True)
class Runtime:
    """Where and how a trial computes, resolved from its config, its runtime settings and Ray's grant."""

    device: torch.device
    threads: int
    gpu_share: float  # fraction of a GPU Ray granted; 0 on CPU
    amp_dtype: torch.dtype | None  # autocast dtype, None for fp32
    channels_last: bool


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is unknown; allowed: {', '.join(OPTIMIZERS)}")
    torch_class, settings = OPTIMIZERS[name]
    return getattr(torch.optim, torch_class)(params, lr=lr, **settings)


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
        fix = (
            "install a CUDA build of torch on the GPU nodes"
            if torch.version.cuda is None
            else f"this torch is built for CUDA {torch.version.cuda}: check the node's NVIDIA driver and that it has "
            f"the GPU it declares"
        )
        raise GpuNotVisible(
            f"Ray granted this trial {gpu_share:g} GPU but torch {torch.__version__} sees no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); {fix}; or pass --device cpu "
            f"to train on the CPU on purpose"
        )
    use_cuda = gpu_share > 0
    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    precision = config["precision"] if config["precision"] != "auto" else ("bf16" if use_cuda else "fp32")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision {precision!r} is unknown; allowed: fp32, bf16, auto")
    cl = runtime["channels_last"]
    channels_last = use_cuda if cl == "auto" else bool(cl)
    return Runtime(device, threads, gpu_share, torch.bfloat16 if precision == "bf16" else None, channels_last)


def to_device_nchw(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, H, W, C) uint8 numpy (possibly read-only, from the object store) -> (N, C, H, W) uint8 on device."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)


def _cpu_copy(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def train_cifar(
    config: dict, data: Cifar, report: Report | None = None, checkpoint_from=None, runtime: dict | None = None
) -> None:
    """Tune's function trainable. Outside Tune, pass `report` and, to resume, `checkpoint_from`: a
    checkpoint folder (or URI, or tune.Checkpoint), or a list of them, newest first."""
    cfg = {**TRIAL_DEFAULTS, **full_config(config)}
    run = {**RUNTIME_DEFAULTS, **(runtime or {})}
    granted, node = None, None
    if report is None:
        from . import ray_hooks

        report, checkpoint_from = ray_hooks.report, ray_hooks.resume_candidates()
        granted, node = ray_hooks.granted_resources(), ray_hooks.node_id()
    rt = resolve_runtime(cfg, run, granted)
    torch.set_num_threads(rt.threads)
    if rt.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(run["tf32"])
        torch.backends.cudnn.benchmark = True
        if 0 < rt.gpu_share < 1:  # packed trials must not starve each other of memory
            torch.cuda.set_per_process_memory_fraction(rt.gpu_share, rt.device)
    torch.manual_seed(cfg["seed"])
    gen = torch.Generator(rt.device).manual_seed(cfg["seed"])
    memory_format = torch.channels_last if rt.channels_last else torch.contiguous_format

    model_args = {"dropout": cfg["dropout"], "batchnorm": cfg["batchnorm"], "width": cfg["width"]}
    model = AlexNet(**model_args).to(rt.device, memory_format=memory_format)
    optimizer = make_optimizer(cfg["optimizer"], model.parameters(), cfg["lr"])
    state = {
        "epoch": 0,
        "best_val_acc": -1.0,
        "best_epoch": 0,
        "epochs_since_best": 0,
        "train_time_s": 0.0,
        "eval_time_s": 0.0,
    }
    best_weights = None

    resumed = _resume(checkpoint_from, rt.device)
    if resumed == "finished":
        return  # it had finished; the driver died before recording that
    if resumed is not None:
        trainer, best_weights = resumed
        model.load_state_dict(trainer["model"])
        optimizer.load_state_dict(trainer["optimizer"])
        gen.set_state(trainer["generator"].cpu())
        torch.set_rng_state(trainer["torch_rng"].cpu())
        if rt.device.type == "cuda" and trainer.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(trainer["cuda_rng"].cpu(), rt.device)
        state = dict(trainer["counters"])
        log.info(
            "resumed at epoch %d (best %.2f%%, %d epochs without improvement)",
            state["epoch"],
            state["best_val_acc"],
            state["epochs_since_best"],
        )

    step_model = torch.compile(model) if run["compile"] else model
    train_x, train_y = to_device_nchw(data.train_x, rt.device), torch.tensor(data.train_y, device=rt.device)
    test_x, test_y = to_device_nchw(data.test_x, rt.device), torch.tensor(data.test_y, device=rt.device)
    last_resume_state = time.monotonic()
    report_s = 0.0  # the previous epoch's report call: Tune's persisting of its checkpoint included

    for epoch in range(state["epoch"] + 1, cfg["epochs"] + 1):
        start = time.perf_counter()
        train_loss, train_acc = train_epoch(
            step_model, optimizer, train_x, train_y, cfg["batch_size"], gen, rt, augment_images=cfg["augment"]
        )
        _sync(rt)
        trained = time.perf_counter()
        val_loss, val_acc = evaluate(step_model, test_x, test_y, run["eval_batch_size"], rt)
        _sync(rt)
        train_s, eval_s = trained - start, time.perf_counter() - trained
        diverged = not (math.isfinite(train_loss) and math.isfinite(val_loss))
        improved = False
        state["epoch"] = epoch
        state["train_time_s"] += train_s
        state["eval_time_s"] += eval_s
        if not diverged:
            best, since, improved = plateau_update(state["best_val_acc"], state["epochs_since_best"], val_acc)
            state.update(
                best_val_acc=best, epochs_since_best=since, best_epoch=epoch if improved else state["best_epoch"]
            )
            if improved:
                best_weights = _cpu_copy(model)
        stop = diverged or should_stop(epoch, state["epochs_since_best"], cfg["patience"], cfg["epochs"])
        if stop:
            kind = checkpoint.KIND_FINAL if best_weights is not None else None
        elif time.monotonic() - last_resume_state >= run["resume_every_s"]:
            kind = checkpoint.KIND_RESUME
        else:
            kind = checkpoint.KIND_BEST if improved else None
        metrics = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "best_val_acc": max(state["best_val_acc"], 0.0),
            "best_epoch": state["best_epoch"],
            "epochs_since_best": state["epochs_since_best"],
            "train_s": train_s,
            "eval_s": eval_s,
            "train_time_s": state["train_time_s"],
            "eval_time_s": state["eval_time_s"],
            "diverged": diverged,
            "images_per_s": len(train_x) / train_s,
            "device": str(rt.device),
            "precision": "bf16" if rt.amp_dtype else "fp32",
            "channels_last": rt.channels_last,
            "node_id": node,
            "gpus_granted": (granted or {}).get("GPU", 0.0),
            "report_s": report_s,
            "checkpoint_kind": kind,
            "checkpoint_rank": checkpoint_rank(kind, epoch, state["best_val_acc"]),
            "ends_trial": stop,  # the function returns right after this report
        }
        if diverged:
            log.warning("loss became non-finite at epoch %d; stopping this trial as diverged", epoch)
        with tempfile.TemporaryDirectory(prefix="tune-alexnet-ckpt-") as d:
            written = time.perf_counter()
            if kind is not None:
                progress = {**state, "kind": kind}
                trainer = _trainer_state(model, optimizer, gen, state, rt) if kind == checkpoint.KIND_RESUME else None
                checkpoint.write(d, best_weights, model_args, progress, trainer, data.classes)
            metrics["checkpoint_s"] = time.perf_counter() - written
            reported = time.perf_counter()
            report(metrics, d if kind is not None else None)
            report_s = time.perf_counter() - reported
        if kind == checkpoint.KIND_RESUME:
            last_resume_state = time.monotonic()
        if stop:
            return


def _trainer_state(model, optimizer, gen, state, rt: Runtime) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None,
        "counters": dict(state),
    }


def _resume(candidates, device: torch.device):
    """The newest readable resume state among the trial's checkpoints (newest first), "finished" if the
    newest says the run ended, or None to start afresh (an exact replay: every draw is seeded)."""
    if candidates is None:
        return None
    if not isinstance(candidates, (list, tuple)):
        candidates = [candidates]
    for i, candidate in enumerate(candidates):
        with checkpoint.local_copy(candidate) as d:
            progress = checkpoint.read_progress(d)
            if i == 0 and progress is not None and progress.get("kind") == checkpoint.KIND_FINAL:
                return "finished"
            if not (d / checkpoint.TRAINER_FILE).exists():
                continue
            resumed = checkpoint.read_resume(d, device)
            if resumed is not None:
                return resumed
            log.warning("resume state %s is unreadable; trying an older checkpoint", d / checkpoint.TRAINER_FILE)
    return None


def _sync(rt: Runtime) -> None:
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)


def _autocast(rt: Runtime):
    if rt.amp_dtype is None:
        return torch.autocast(rt.device.type, enabled=False)
    return torch.autocast(rt.device.type, dtype=rt.amp_dtype)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x_u8: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    gen: torch.Generator,
    rt: Runtime,
    augment_images: bool = True,
) -> tuple[float, float]:
    """One shuffled pass; returns (mean loss, accuracy %). A non-finite loss ends the pass early as NaN."""
    model.train()
    n = len(x_u8)
    order = torch.randperm(n, device=x_u8.device, generator=gen)
    loss_sum = torch.zeros((), device=x_u8.device)
    correct = torch.zeros((), device=x_u8.device, dtype=torch.long)
    seen = 0
    memory_format = torch.channels_last if rt.channels_last else torch.contiguous_format
    for step, start in enumerate(range(0, n, batch_size)):
        idx = order[start : start + batch_size]
        if len(idx) < 2 and seen:  # a last batch of one breaks BatchNorm; the study's loader never made one
            break
        images = x_u8[idx]
        inputs = augment.augment_batch(images, gen) if augment_images else augment.prepare_eval(images)
        inputs = inputs.contiguous(memory_format=memory_format)
        targets = y[idx]
        with _autocast(rt):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(idx)
        correct += (logits.argmax(1) == targets).sum()
        seen += len(idx)
        if step % DIVERGENCE_CHECK_EVERY == DIVERGENCE_CHECK_EVERY - 1 and not torch.isfinite(loss_sum).item():
            return math.nan, 100.0 * correct.item() / seen
    return loss_sum.item() / seen, 100.0 * correct.item() / seen


@torch.inference_mode()
def evaluate(
    model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, batch_size: int, rt: Runtime
) -> tuple[float, float]:
    """(mean loss, accuracy %) on the unaugmented images, in large batches without gradients."""
    model.eval()
    loss_sum = torch.zeros((), device=x_u8.device)
    correct = torch.zeros((), device=x_u8.device, dtype=torch.long)
    memory_format = torch.channels_last if rt.channels_last else torch.contiguous_format
    for start in range(0, len(x_u8), batch_size):
        inputs = augment.prepare_eval(x_u8[start : start + batch_size]).contiguous(memory_format=memory_format)
        targets = y[start : start + batch_size]
        with _autocast(rt):
            logits = model(inputs)
        loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum")
        correct += (logits.argmax(1) == targets).sum()
    return loss_sum.item() / len(x_u8), 100.0 * correct.item() / len(x_u8)
