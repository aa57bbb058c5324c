"""Train and augmentation throughput: the original study's loop against this project's training path.

(a) the original: a CIFAR10-style dataset that augments one PIL image at a time with SPEC's torchvision
    transforms, a DataLoader with num_workers=0, fp32;
(b) this project: uint8 data on the device, batched augmentation (augment.py), train.train_epoch with the
    sweep's default settings for that device.
Same real images, same model, same batch size, same process. Prints a markdown table.

    python bench/throughput.py --device cpu --batch-size 128 --data-dir ../shared/data/cifar10-mini
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tune_alexnet import augment
from tune_alexnet.data import load_cifar10
from tune_alexnet.model import AlexNet
from tune_alexnet.settings import RUNTIME_DEFAULTS, TRIAL_DEFAULTS
from tune_alexnet.train import Runtime, make_optimizer, resolve_runtime, set_tf32, to_device_nchw, train_epoch


class OriginalCifar(Dataset):
    """What torchvision.datasets.CIFAR10 does per item: uint8 array -> PIL -> transform."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y, self.transform = x, y, augment.spec_pil_transform()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pytorch_defaults(device: torch.device) -> None:
    """The original ran with PyTorch's default backend flags: no cudnn autotuning, no TF32 in matmuls."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.fp32_precision = "ieee"  # one API throughout (train.set_tf32's)
        torch.backends.cudnn.conv.fp32_precision = "tf32"


def original_epoch(x, y, batch_size, device, width: float = 1.0, seconds: float | None = None) -> float:
    """Images/s of the study's loop: one pass over (x, y), or as many batches as fit in `seconds`."""
    pytorch_defaults(device)
    model = AlexNet(dropout=True, batchnorm=True, width=width).to(device)
    opt = make_optimizer("sgd", model.parameters(), 0.01)
    model.train()
    warm_up = DataLoader(OriginalCifar(x[:batch_size], y[:batch_size]), batch_size=batch_size, num_workers=0)
    for images, labels in warm_up:  # one step first: kernel selection and library start-up stay off the clock
        _original_step(model, opt, images.to(device), labels.to(device))
    loader = DataLoader(OriginalCifar(x, y), batch_size=batch_size, shuffle=True, num_workers=0)
    sync(device)
    start, done = time.perf_counter(), 0
    for images, labels in loader:
        _original_step(model, opt, images.to(device), labels.to(device))
        done += len(labels)
        if seconds is not None and time.perf_counter() - start >= seconds:
            break
    sync(device)
    return done / (time.perf_counter() - start)


def _original_step(model, opt, images, labels) -> None:
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    opt.zero_grad()
    loss.backward()
    opt.step()


def project_runtime(device: torch.device) -> Runtime:
    """The sweep's defaults for a trial on `device` (settings.TRIAL_DEFAULTS and RUNTIME_DEFAULTS),
    with the backend flags the training function sets."""
    runtime = {**RUNTIME_DEFAULTS, "device": "auto" if device.type == "cuda" else "cpu"}
    rt = resolve_runtime(dict(TRIAL_DEFAULTS), runtime, None)
    project_flags(rt)
    return rt


def project_flags(rt: Runtime) -> None:
    if rt.device.type == "cuda":
        set_tf32(bool(RUNTIME_DEFAULTS["tf32"]))
        torch.backends.cudnn.benchmark = True


def project_epoch(
    x, y, batch_size, device, rt: Runtime, epochs: int = 1, width: float = 1.0, seconds: float | None = None
) -> float:
    """Images/s of train.train_epoch after a warm-up: `epochs` passes over (x, y), or as many chunks of 50
    steps as fit in `seconds` (each train_epoch call ends in one device sync, as an epoch does)."""
    project_flags(rt)  # original_epoch resets them
    memory_format = torch.channels_last if rt.channels_last else torch.contiguous_format
    model = AlexNet(dropout=True, batchnorm=True, width=width).to(device, memory_format=memory_format)
    opt = make_optimizer("sgd", model.parameters(), 0.01)
    xd = to_device_nchw(x, device)
    yd = torch.from_numpy(y.copy()).to(device)
    gen = torch.Generator(device).manual_seed(0)
    for _ in range(2):  # warm-up: cudnn autotuning, allocator
        train_epoch(model, opt, xd[: batch_size * 4], yd[: batch_size * 4], batch_size, gen, rt)
    sync(device)
    start, done = time.perf_counter(), 0
    if seconds is None:
        for _ in range(epochs):
            train_epoch(model, opt, xd, yd, batch_size, gen, rt)
        done = epochs * len(x)
    else:
        chunk = min(len(x), batch_size * 50)
        offset = 0
        while done == 0 or time.perf_counter() - start < seconds:
            if offset + chunk > len(x):
                offset = 0
            train_epoch(model, opt, xd[offset : offset + chunk], yd[offset : offset + chunk], batch_size, gen, rt)
            done += chunk
            offset += chunk
    sync(device)
    return done / (time.perf_counter() - start)


def augment_only(x, batch_size, device) -> tuple[float, float]:
    """Images/s of the per-image PIL path and of the batched path, on one CPU thread when on the CPU."""
    pil = augment.spec_pil_transform()
    images = [Image.fromarray(im) for im in x]
    start = time.perf_counter()
    for im in images:
        pil(im)
    per_image = len(images) / (time.perf_counter() - start)
    xd = to_device_nchw(x, device)
    gen = torch.Generator(device).manual_seed(0)
    augment.augment_batch(xd[:batch_size], gen)
    sync(device)
    start, done = time.perf_counter(), 0
    while done < max(len(x), 4096) or time.perf_counter() - start < 1.0:
        for i in range(0, len(xd), batch_size):
            augment.augment_batch(xd[i : i + batch_size], gen)
            done += len(xd[i : i + batch_size])
    sync(device)
    return per_image, done / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, nargs="+", default=[128])
    ap.add_argument("--data-dir", default="../shared/data/cifar10-mini")
    ap.add_argument("--images", type=int, default=1000, help="train images per measurement")
    ap.add_argument("--project-epochs", type=int, default=1, help="epochs timed for the project's path")
    ap.add_argument("--skip-train", action="store_true", help="augmentation only")
    args = ap.parse_args()

    device = torch.device(args.device)
    data = load_cifar10(args.data_dir, progress=False)
    x, y = data.train_x[: args.images], data.train_y[: args.images]
    use_cuda = device.type == "cuda"
    rt = project_runtime(device)
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    name = torch.cuda.get_device_name(device) if use_cuda else cpu
    print(f"device: {device} ({name}); torch {torch.__version__}; {len(x)} images from {data.source}")
    print(
        f"project settings: precision={'bf16' if rt.amp_dtype else 'fp32'}, channels_last={rt.channels_last}, "
        f"tf32={use_cuda and bool(RUNTIME_DEFAULTS['tf32'])} (the sweep's defaults for this device)"
    )
    print()
    print("| what | batch | original img/s | project img/s | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for bs in args.batch_size:
        threads = torch.get_num_threads()
        if device.type == "cpu":
            torch.set_num_threads(1)
        per_image, batched = augment_only(x, bs, device)
        torch.set_num_threads(threads)
        core = " (1 CPU thread)" if device.type == "cpu" else ""
        print(f"| augmentation only{core} | {bs} | {per_image:,.0f} | {batched:,.0f} | {batched / per_image:.1f}x |")
        if not args.skip_train:
            orig = original_epoch(x, y, bs, device)
            ours = project_epoch(x, y, bs, device, rt, args.project_epochs)
            print(f"| train epoch (model + data) | {bs} | {orig:,.0f} | {ours:,.0f} | {ours / orig:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
