"""The batched augmentation against torchvision's own per-image transforms, on real images where present."""

import pytest
import torch
import torchvision.transforms.v2.functional as F
from conftest import MINI
from PIL import Image

from tune_alexnet import augment as A
from tune_alexnet.data import load_cifar10
from tune_alexnet.train import to_device_nchw


@pytest.fixture(scope="module")
def images(synthetic_dir) -> torch.Tensor:
    """(N, 3, 32, 32) uint8: real CIFAR-10 photographs when the slice is here, else generated ones."""
    data = load_cifar10(MINI if MINI.is_dir() else synthetic_dir, progress=False)
    return to_device_nchw(data.train_x, torch.device("cpu"))


def params(n, seed=0, **fixed):
    p = A.sample_params(n, "cpu", torch.Generator().manual_seed(seed))
    for k, v in fixed.items():
        getattr(p, k).copy_(torch.as_tensor(v).expand_as(getattr(p, k)))
    return p


def crop_flip_reference(img, top, left, flip):
    x = F.crop(F.pad(img, [A.PAD] * 4), top, left, 32, 32)
    return F.horizontal_flip(x) if flip else x


def test_crop_and_flip_match_torchvision_exactly(images):
    x = images[:128]
    p = params(len(x), angle=0.0)
    out = A.geometric(x, p)
    ref = torch.stack(
        [crop_flip_reference(x[i], int(p.top[i]), int(p.left[i]), bool(p.flip[i])) for i in range(len(x))]
    )
    assert torch.equal(out, ref)
    assert p.flip.any() and not p.flip.all() and len(set(p.top.tolist())) > 3  # the cases were exercised


def test_rotation_matches_torchvision_nearest_rotation(images):
    x = images[:128]
    p = params(len(x), seed=1)
    out = A.geometric(x, p)
    ref = torch.stack(
        [
            F.rotate(
                crop_flip_reference(x[i], int(p.top[i]), int(p.left[i]), bool(p.flip[i])),
                float(p.angle[i]),
                interpolation=F.InterpolationMode.NEAREST,
                fill=0,
            )
            for i in range(len(x))
        ]
    )
    differing_pixels = (out != ref).any(dim=1).float().mean().item()
    assert differing_pixels < 0.001  # rounding ties at most
    assert p.angle.abs().max() > 10


def test_rotation_direction_and_zero_fill(images):
    img = images[:1]
    out = A.geometric(img, params(1, top=4, left=4, flip=False, angle=15.0))
    assert (out[0, :, 0, 0] == 0).all() and (out[0, :, 31, 31] == 0).all()  # corners fill with zeros
    ref = F.rotate(img[0], 15.0, interpolation=F.InterpolationMode.NEAREST, fill=0)
    assert torch.equal(out[0], ref)


def test_colour_jitter_matches_torchvision_per_image_in_each_images_order(images):
    x = images[:64].float() / 255
    p = params(len(x), seed=2)
    out = A.color_jitter(x.clone(), p)
    ops = [
        lambda im, i: F.adjust_brightness(im, float(p.brightness[i])),
        lambda im, i: F.adjust_contrast(im, float(p.contrast[i])),
        lambda im, i: F.adjust_saturation(im, float(p.saturation[i])),
        lambda im, i: F.adjust_hue(im, float(p.hue[i])),
    ]
    for i in range(len(x)):
        ref = x[i]
        for op in p.order[i].tolist():
            ref = ops[op](ref, i)
        assert torch.allclose(out[i], ref, atol=1e-4), i
    assert len({tuple(o) for o in p.order.tolist()}) > 10  # many different orders were checked


def test_masked_hue_path_for_cuda_gives_the_same_images(images):
    x = images[:64].float() / 255
    p = params(len(x), seed=3)
    assert torch.allclose(
        A.color_jitter(x.clone(), p, masked_hue=True), A.color_jitter(x.clone(), p, masked_hue=False), atol=1e-5
    )


def test_each_image_gets_its_own_random_draw(images):
    same = images[:1].expand(64, -1, -1, -1).contiguous()
    out = A.augment_batch(same, torch.Generator().manual_seed(0))
    assert len({tuple(o.flatten().tolist()) for o in out}) == 64


def test_batch_statistics_match_the_studys_per_image_pipeline(images):
    torch.manual_seed(0)
    images = images.repeat(-(-2000 // len(images)), 1, 1, 1)  # enough draws for the tolerance below on any slice
    n = len(images)
    ours = torch.cat([A.augment_batch(images[i : i + 250], torch.Generator().manual_seed(i)) for i in range(0, n, 250)])
    pil = A.spec_pil_transform()
    ref = torch.stack([pil(Image.fromarray(images[i].permute(1, 2, 0).numpy())) for i in range(n)])
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == torch.float32
    for dims in [(0, 2, 3)]:
        assert torch.allclose(ours.mean(dims), ref.mean(dims), atol=0.02)
        assert torch.allclose(ours.std(dims), ref.std(dims), atol=0.02)
    # Where the padding/rotation left pixels empty, both pipelines agree on how often.
    empty_ours = (ours == ours.amin(dim=(1, 2, 3), keepdim=True)).all(1).float().mean()
    empty_ref = (ref == ref.amin(dim=(1, 2, 3), keepdim=True)).all(1).float().mean()
    assert abs(empty_ours - empty_ref) < 0.02
    assert ours.min() >= -1 and ours.max() <= 1
