"""The study's own recipe as a training function: the reference arm of the fidelity A/B (bench/ab.py).

What the study ran: its AlexNet (`tune_alexnet.model`, the study's definition) in fp32 with PyTorch's default
backend flags; its torchvision transforms on one PIL image at a time (`augment.spec_pil_transform()`; the test set
gets ToTensor and Normalize only), fed by a DataLoader that shuffles every epoch and keeps the last partial batch;
its optimizer settings, cross-entropy, a test evaluation after every epoch and the plateau rule with the study's
patience and epoch limit. The DataLoader's worker processes (and pinned memory on CUDA) make it run at GPU speed;
they change no arithmetic. It reads the same uint8 arrays as the project's path, made into PIL images with
`Image.fromarray` as torchvision's CIFAR10 does, so both paths train on the same images. It reuses the package's
definitions and adds nothing to the package.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import device_common as common
import throughput
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchvision import transforms as T

from tune_alexnet import augment
from tune_alexnet.data import Cifar
from tune_alexnet.grid import full_config
from tune_alexnet.model import AlexNet
from tune_alexnet.settings import TRIAL_DEFAULTS
from tune_alexnet.stopper import plateau_update, should_stop
from tune_alexnet.train import make_optimizer

Report = Callable[[dict, str | None], None]  # train.train_cifar's report callback


def study_test_transform():
    """The study's test preprocessing: ToTensor and Normalize, the last two steps of its training pipeline."""
    return T.Compose([T.ToTensor(), T.Normalize((augment.MEAN,) * 3, (augment.STD,) * 3)])


def study_loader(data: Cifar, batch_size: int, num_workers: int, seed: int, device: torch.device) -> DataLoader:
    """The training images one PIL image at a time through the study's transforms, shuffled every epoch by a
    seeded generator (which also seeds the workers' augmentation draws), the last partial batch kept."""
    return DataLoader(
        throughput.OriginalCifar(data.train_x, data.train_y),
        batch_size=batch_size,
        shuffle=True,
        drop_last=False,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
    )


def study_test_set(data: Cifar, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images through the study's test preprocessing, once: it has no randomness, so every epoch's
    evaluation sees the same tensors a test DataLoader would give it."""
    transform = study_test_transform()
    x = torch.stack([transform(Image.fromarray(im)) for im in data.test_x])
    return x.to(device), torch.tensor(data.test_y, dtype=torch.long, device=device)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, device: torch.device):
    """One pass over the loader; (mean loss, accuracy %)."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
    return loss_sum.item() / seen, 100.0 * correct.item() / seen


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """(mean loss, accuracy %) on the test tensors, in eval mode."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size])
        targets = y[start : start + batch_size]
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(1) == targets).sum().item()
    return loss_sum / len(x), 100.0 * correct / len(x)


def train_original(
    config: dict, data: Cifar, report: Report, num_workers: int = 0, eval_batch_size: int = 1000
) -> None:
    """A study run with the study's recipe: `config` as train.train_cifar takes it (the five settings, seed,
    width, epochs, patience; precision and augment do not apply: the recipe is fp32 and augments). `report`
    gets every epoch's metrics, as train.train_cifar reports them, and no checkpoint."""
    cfg = {**TRIAL_DEFAULTS, **full_config(config)}
    device = common.device_of_this_machine()
    throughput.pytorch_defaults(device)
    torch.manual_seed(cfg["seed"])
    model = AlexNet(dropout=cfg["dropout"], batchnorm=cfg["batchnorm"], width=cfg["width"]).float().to(device)
    optimizer = make_optimizer(cfg["optimizer"], model.parameters(), cfg["lr"])
    loader = study_loader(data, cfg["batch_size"], num_workers, cfg["seed"], device)
    test_x, test_y = study_test_set(data, device)
    best, since, best_epoch = -1.0, 0, 0
    for epoch in range(1, cfg["epochs"] + 1):
        start = time.perf_counter()
        train_loss, train_acc = train_epoch(model, optimizer, loader, device)
        trained = time.perf_counter()
        val_loss, val_acc = evaluate(model, test_x, test_y, eval_batch_size)
        train_s, eval_s = trained - start, time.perf_counter() - trained
        best, since, improved = plateau_update(best, since, val_acc)
        best_epoch = epoch if improved else best_epoch
        stop = should_stop(epoch, since, cfg["patience"], cfg["epochs"])
        metrics = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "best_val_acc": best,
            "best_epoch": best_epoch,
            "epochs_since_best": since,
            "train_s": train_s,
            "eval_s": eval_s,
            "checkpoint_s": 0.0,
            "diverged": not (math.isfinite(train_loss) and math.isfinite(val_loss)),  # noted; the study went on
            "images_per_s": len(data.train_x) / train_s,
            "device": str(device),
            "precision": "fp32",
            "ends_trial": stop,
        }
        report(metrics, None)
        if stop:
            return
