"""The training function: one trial is one run of the study.

`train_cifar(config, data)` is what Tune calls; the same function runs in a
test or a script with a `report` callback of its own. The data set lives on
the trial's device as uint8 tensors; each epoch draws a permutation there and
augments whole batches (augment.py), so no DataLoader or PIL is involved.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from . import augment
from .data import Cifar
from .model import AlexNet
from .stopper import plateau_update, should_stop

log = logging.getLogger("tune_alexnet.train")

# Every trial config holds these keys; the five grid dimensions come from grid.py.
DEFAULTS = {
    "seed": 0,  # seeds weights, shuffling, augmentation and dropout
    "epochs": 100,  # most epochs a run may train (SPEC)
    "patience": 5,  # epochs without a new best val_acc that end a run (SPEC); the stopper applies it
    "augment": True,  # SPEC's training augmentation; off only for learning checks
    "width": 1.0,  # AlexNet width multiplier; 1 is the study's network
    "precision": "auto",  # fp32 | bf16 | auto (bf16 autocast on CUDA, fp32 on CPU)
    "channels_last": "auto",  # true | false | auto (on CUDA only)
    "tf32": True,  # TF32 matmuls and convolutions on CUDA
    "compile": False,  # torch.compile the model
    "eval_batch_size": 1000,  # images per evaluation step (no gradients, so large is fine)
}
OPTIMIZER_NAMES = ("sgd", "adam", "rmsprop")
WEIGHT_DECAY = 1e-4
SGD_MOMENTUM = 0.9
DIVERGENCE_CHECK_EVERY = 50  # steps between loss checks (each check syncs the device)
MODEL_FILE = "model.pt"  # in every checkpoint: the weights at that epoch
STATE_FILE = "trainer.pt"  # in every checkpoint: optimiser, counters and RNG, to resume
MODEL_ARGS_FILE = "model.json"  # in every checkpoint: AlexNet's arguments, so the folder alone rebuilds the network

Report = Callable[[dict, "tune.Checkpoint | None"], None]


@dataclass(frozen=True)
class Runtime:
    """Where and how a trial computes, resolved from its config and Ray's grant."""

    device: torch.device
    threads: int
    gpu_share: float  # fraction of a GPU Ray granted; 0 on CPU
    amp_dtype: torch.dtype | None  # autocast dtype, None for fp32
    channels_last: bool


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, weight_decay=WEIGHT_DECAY)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=WEIGHT_DECAY)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=WEIGHT_DECAY)
    raise ValueError(f"optimizer {name!r} is unknown; allowed: {', '.join(OPTIMIZER_NAMES)}")


def resolve_runtime(config: dict) -> Runtime:
    """CUDA when Ray granted this trial a GPU that torch can see, else CPU with Ray's CPU count as threads."""
    granted = _ray_resources()
    if granted is None:  # outside Ray: use what the machine has
        gpu_share = 1.0 if torch.cuda.is_available() else 0.0
        threads = torch.get_num_threads()
    else:
        gpu_share = granted.get("GPU", 0.0)
        threads = max(1, int(granted.get("CPU", 1)))
    use_cuda = gpu_share > 0 and torch.cuda.is_available()
    if gpu_share > 0 and not use_cuda:
        log.warning("Ray granted this trial %.2f GPU but torch sees no CUDA device "
                    "(CUDA_VISIBLE_DEVICES=%s); training on the CPU", gpu_share, os.environ.get("CUDA_VISIBLE_DEVICES"))
        gpu_share = 0.0
    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    precision = config["precision"] if config["precision"] != "auto" else ("bf16" if use_cuda else "fp32")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision {precision!r} is unknown; allowed: fp32, bf16, auto")
    channels_last = use_cuda if config["channels_last"] == "auto" else bool(config["channels_last"])
    return Runtime(device, threads, gpu_share, torch.bfloat16 if precision == "bf16" else None, channels_last)


def _ray_resources() -> dict | None:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_assigned_resources()
    except Exception:  # not a Ray worker
        pass
    return None


def _tune_report(metrics: dict, checkpoint) -> None:
    from ray import tune

    tune.report(metrics, checkpoint=checkpoint)


def _tune_checkpoint():
    from ray import tune

    return tune.get_checkpoint()


def to_device_nchw(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, H, W, C) uint8 numpy (possibly read-only, from the object store) -> (N, C, H, W) uint8 on device."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)


def train_cifar(config: dict, data: Cifar, report: Report | None = None, checkpoint=None) -> None:
    """Tune's function trainable. Outside Tune, pass `report` (and a `checkpoint` to resume from)."""
    cfg = {**DEFAULTS, **config}
    if report is None:
        report, checkpoint = _tune_report, _tune_checkpoint()
    rt = resolve_runtime(cfg)
    torch.set_num_threads(rt.threads)
    if rt.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cfg["tf32"])
        torch.backends.cudnn.benchmark = True
        if 0 < rt.gpu_share < 1:  # packed trials must not starve each other of memory
            torch.cuda.set_per_process_memory_fraction(rt.gpu_share, rt.device)
    torch.manual_seed(cfg["seed"])
    gen = torch.Generator(rt.device).manual_seed(cfg["seed"])
    memory_format = torch.channels_last if rt.channels_last else torch.contiguous_format

    model_args = {"dropout": cfg["dropout"], "batchnorm": cfg["batchnorm"], "width": cfg["width"]}
    model = AlexNet(**model_args).to(rt.device, memory_format=memory_format)
    optimizer = make_optimizer(cfg["optimizer"], model.parameters(), cfg["lr"])
    state = {"epoch": 0, "best_val_acc": -1.0, "best_epoch": 0, "epochs_since_best": 0, "train_time_s": 0.0}

    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            model.load_state_dict(torch.load(os.path.join(d, MODEL_FILE), map_location=rt.device))
            saved = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"])
        state = saved["counters"]
        log.info("resumed at epoch %d (best %.2f%%, %d epochs without improvement)",
                 state["epoch"], state["best_val_acc"], state["epochs_since_best"])
        if should_stop(state["epoch"], state["epochs_since_best"], cfg["patience"], cfg["epochs"]):
            return  # it had finished; the driver died before recording that

    step_model = torch.compile(model) if cfg["compile"] else model
    train_x, train_y = to_device_nchw(data.train_x, rt.device), torch.tensor(data.train_y, device=rt.device)
    test_x, test_y = to_device_nchw(data.test_x, rt.device), torch.tensor(data.test_y, device=rt.device)

    for epoch in range(state["epoch"] + 1, cfg["epochs"] + 1):
        start = time.perf_counter()
        train_loss, train_acc = train_epoch(step_model, optimizer, train_x, train_y, cfg["batch_size"], gen, rt,
                                            augment_images=cfg["augment"])
        val_loss, val_acc = evaluate(step_model, test_x, test_y, cfg["eval_batch_size"], rt)
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)
        epoch_time = time.perf_counter() - start
        diverged = not (math.isfinite(train_loss) and math.isfinite(val_loss))
        state["epoch"] = epoch
        state["train_time_s"] += epoch_time
        if not diverged:
            best, since, improved = plateau_update(state["best_val_acc"], state["epochs_since_best"], val_acc)
            state.update(best_val_acc=best, epochs_since_best=since, best_epoch=epoch if improved else state["best_epoch"])
        metrics = {
            "epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
            "val_acc": val_acc, "best_val_acc": max(state["best_val_acc"], 0.0), "best_epoch": state["best_epoch"],
            "epochs_since_best": state["epochs_since_best"], "epoch_time_s": epoch_time,
            "train_time_s": state["train_time_s"], "diverged": diverged,
            "images_per_s": len(train_x) / epoch_time, "device": str(rt.device),
            "precision": "bf16" if rt.amp_dtype else "fp32", "channels_last": rt.channels_last,
            "node_id": _node_id(),
        }
        if diverged:  # weights are garbage: report without a checkpoint so the best one stays, and stop
            log.warning("loss became non-finite at epoch %d; stopping this trial as diverged", epoch)
            report(metrics, None)
            return
        with tempfile.TemporaryDirectory(prefix="tune-alexnet-ckpt-") as d:
            torch.save(model.state_dict(), os.path.join(d, MODEL_FILE))
            with open(os.path.join(d, MODEL_ARGS_FILE), "w") as f:
                json.dump(model_args, f)
            torch.save({"optimizer": optimizer.state_dict(), "generator": gen.get_state(), "counters": dict(state)},
                       os.path.join(d, STATE_FILE))
            report(metrics, _checkpoint_from(d))


def _checkpoint_from(directory: str):
    from ray import tune

    return tune.Checkpoint.from_directory(directory)


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None


def _autocast(rt: Runtime):
    if rt.amp_dtype is None:
        return torch.autocast(rt.device.type, enabled=False)
    return torch.autocast(rt.device.type, dtype=rt.amp_dtype)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, x_u8: torch.Tensor, y: torch.Tensor,
                batch_size: int, gen: torch.Generator, rt: Runtime, augment_images: bool = True) -> tuple[float, float]:
    """One shuffled pass; returns (mean loss, accuracy %). A non-finite loss ends the pass early as NaN."""
    model.train()
    n = len(x_u8)
    order = torch.randperm(n, device=x_u8.device, generator=gen)
    loss_sum = torch.zeros((), device=x_u8.device)
    correct = torch.zeros((), device=x_u8.device, dtype=torch.long)
    seen = 0
    memory_format = torch.channels_last if rt.channels_last else torch.contiguous_format
    for step, start in enumerate(range(0, n, batch_size)):
        idx = order[start:start + batch_size]
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
def evaluate(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, batch_size: int, rt: Runtime) -> tuple[float, float]:
    """(mean loss, accuracy %) on the unaugmented images, in large batches without gradients."""
    model.eval()
    loss_sum = torch.zeros((), device=x_u8.device)
    correct = torch.zeros((), device=x_u8.device, dtype=torch.long)
    memory_format = torch.channels_last if rt.channels_last else torch.contiguous_format
    for start in range(0, len(x_u8), batch_size):
        inputs = augment.prepare_eval(x_u8[start:start + batch_size]).contiguous(memory_format=memory_format)
        targets = y[start:start + batch_size]
        with _autocast(rt):
            logits = model(inputs)
        loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum")
        correct += (logits.argmax(1) == targets).sum()
    return loss_sum.item() / len(x_u8), 100.0 * correct.item() / len(x_u8)


def load_model(checkpoint_dir: str | os.PathLike, device: str | torch.device = "cpu") -> AlexNet:
    """The network saved in a trial's checkpoint folder, ready for inference."""
    with open(os.path.join(checkpoint_dir, MODEL_ARGS_FILE)) as f:
        model = AlexNet(**json.load(f))
    model.load_state_dict(torch.load(os.path.join(checkpoint_dir, MODEL_FILE), map_location=device))
    return model.to(device).eval()
