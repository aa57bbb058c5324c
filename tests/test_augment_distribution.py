"""The batched augmentation draws from the same distribution as the study's per-image PIL pipeline.

tests/test_augment.py checks the formulas image by image with the draws fixed; this file checks what a training
run sees: thousands of random draws from each pipeline on the same source images, compared by per-channel mean
and standard deviation, the share of zero-filled (padded or rotated-in) pixels, and histogram distances. Each
tolerance is shown to catch a deliberately wrong parameter: the same comparison must fail for the mutants below.

The two pipelines do not compute the same numbers: PIL rounds to uint8 after every colour operation, and its
ImageEnhance blends truncate (95.95 becomes 95), so its outputs are 1 to 2 grey levels (of 255) darker on
average; the batched path keeps floats. The mean tolerance leaves room for that and little more.
"""

from __future__ import annotations

import pytest
import torch
from conftest import MINI
from PIL import Image
from torchvision import transforms as T

from tune_alexnet import augment
from tune_alexnet.data import load_cifar10
from tune_alexnet.train import to_device_nchw

DRAWS = 3  # random augmentations of each source image, in each pipeline, at least
MIN_IMAGES = 3000  # draws per pipeline at least: the generated fallback set has 200 images
CHUNK = 500
VALUE_BINS = 32  # 8 grey levels a bin, so PIL's whole levels fall evenly into the bins
HUE_BINS = 18  # 20 degrees a bin
MIN_CHROMA = 0.1  # pixels greyer than this have no meaningful hue
# Largest allowed distance between the pipelines, per statistic, set from the spread over 3 x 3 seeds of each
# pipeline (FIDELITY.md lists it): real photographs where ../shared/data/cifar10-mini is present, the generated
# fallback set (saturated colours, much clipping) elsewhere.
TOLERANCES = {
    "cifar10-mini": {
        "mean": 3.0,  # grey levels (0..255), worst channel
        "std": 1.0,  # grey levels, worst channel
        "value_tv": 0.025,  # total variation between per-channel histograms of grey levels, worst channel
        "zero_fill": 0.008,  # share of pixels zero in all three channels after crop, flip and rotation
        "hue_tv": 0.09,  # total variation between hue histograms of the coloured pixels
    },
    "generated": {"mean": 4.0, "std": 1.5, "value_tv": 0.035, "zero_fill": 0.008, "hue_tv": 0.055},
}
# Each mutant is the batched pipeline with one wrong constant, and the statistics that must catch it.
MUTANTS = {
    "rotation up to 30 degrees": ({"MAX_ROTATION": 30.0}, {"zero_fill"}),
    "no hue step": ({"HUE": 0.0}, {"hue_tv"}),
    "padding 6 instead of 4": ({"PAD": 6}, {"mean", "std", "zero_fill"}),
    "brightness 0.4 instead of 0.2": ({"BRIGHTNESS": 0.4}, {"value_tv"}),
    "contrast 0.4 instead of 0.2": ({"CONTRAST": 0.4}, {"value_tv"}),
}


@pytest.fixture(scope="module")
def source(synthetic_dir) -> tuple[str, torch.Tensor]:
    """(name, (N, 3, 32, 32) uint8): real CIFAR-10 photographs when the slice is here, else generated images;
    repeated so that each pipeline makes thousands of draws."""
    name = "cifar10-mini" if MINI.is_dir() else "generated"
    data = load_cifar10(MINI if MINI.is_dir() else synthetic_dir, progress=False)
    x = to_device_nchw(data.train_x, torch.device("cpu"))
    return name, x.repeat(max(DRAWS, -(-MIN_IMAGES // len(x))), 1, 1, 1)


def hue_histogram(unit: torch.Tensor) -> torch.Tensor:
    """Histogram of the HSV hue of the pixels with chroma above MIN_CHROMA; unit: (N, 3, H, W) in [0, 1]."""
    maxc, _ = unit.max(1)
    minc, _ = unit.min(1)
    chroma = maxc - minc
    r, g, b = unit.unbind(1)
    safe = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h6 = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.remainder(h6 / 6.0, 1.0)[chroma > MIN_CHROMA]
    counts = torch.histc(hue, HUE_BINS, 0.0, 1.0)
    return counts / counts.sum()


def statistics(full: torch.Tensor, geometric_u8: torch.Tensor) -> dict[str, torch.Tensor]:
    """full: the whole pipeline's normalised output; geometric_u8: crop, flip and rotation alone, uint8."""
    unit = full * augment.STD + augment.MEAN
    levels = unit * 255
    values = torch.stack([torch.histc(levels[:, c], VALUE_BINS, -0.5, 255.5) for c in range(3)])
    return {
        "mean": levels.mean((0, 2, 3)),
        "std": levels.std((0, 2, 3)),
        "values": values / values.sum(1, keepdim=True),
        "zero_fill": (geometric_u8 == 0).all(1).float().mean(),
        "hue": hue_histogram(unit),
    }


def distances(ours: dict, ref: dict) -> dict[str, float]:
    return {
        "mean": (ours["mean"] - ref["mean"]).abs().max().item(),
        "std": (ours["std"] - ref["std"]).abs().max().item(),
        "value_tv": (0.5 * (ours["values"] - ref["values"]).abs().sum(1)).max().item(),
        "zero_fill": abs(ours["zero_fill"] - ref["zero_fill"]).item(),
        "hue_tv": 0.5 * (ours["hue"] - ref["hue"]).abs().sum().item(),
    }


def beyond_tolerance(d: dict[str, float], source_name: str) -> list[str]:
    return [name for name, value in d.items() if value > TOLERANCES[source_name][name]]


@pytest.fixture(scope="module")
def reference(source) -> dict[str, torch.Tensor]:
    """The study's torchvision pipeline, one PIL image at a time, seeded; its geometric steps alone too."""
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in source[1]]
    full = augment.spec_pil_transform()
    geometric = T.Compose([*full.transforms[:3], T.PILToTensor()])  # crop, flip, rotation: the study's first three
    torch.manual_seed(0)
    full_out = torch.stack([full(im) for im in pil])
    geometric_out = torch.stack([geometric(im) for im in pil])
    return statistics(full_out, geometric_out)


def batched(images: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """augment.augment_batch and augment.geometric over the images, in training-sized chunks."""
    gen = torch.Generator().manual_seed(seed)
    full, geometric = [], []
    for i in range(0, len(images), CHUNK):
        chunk = images[i : i + CHUNK]
        full.append(augment.augment_batch(chunk, gen))
        geometric.append(augment.geometric(chunk, augment.sample_params(len(chunk), chunk.device, gen)))
    return statistics(torch.cat(full), torch.cat(geometric))


def test_batched_augmentation_draws_from_the_pil_pipelines_distribution(source, reference):
    name, images = source
    d = distances(batched(images, seed=1), reference)
    print(f"real pipeline on {name}:", {k: round(v, 4) for k, v in d.items()})
    assert beyond_tolerance(d, name) == [], d
    assert len(images) >= MIN_IMAGES


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_the_same_comparison_fails_for_a_wrong_parameter(mutant, source, reference, monkeypatch):
    name, images = source
    constants, caught_by = MUTANTS[mutant]
    for constant, value in constants.items():
        assert hasattr(augment, constant), constant  # the mutant must change something that exists
        monkeypatch.setattr(augment, constant, value)
    d = distances(batched(images, seed=1), reference)
    print(f"{mutant} on {name}:", {k: round(v, 4) for k, v in d.items()})
    assert caught_by <= set(beyond_tolerance(d, name)), d


def test_every_tolerance_is_shown_to_catch_a_mutant():
    """A statistic added without a mutant that it must catch would be a tolerance nobody showed to be tight."""
    caught = set().union(*(caught_by for _, caught_by in MUTANTS.values()))
    assert all(caught == set(tolerance) for tolerance in TOLERANCES.values())
