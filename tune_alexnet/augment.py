"""The study's training augmentation (docs/STUDY.md), batched on the trial's device with per-sample randomness.

The study augmented one PIL image at a time (RandomCrop(32, padding=4),
RandomHorizontalFlip, RandomRotation(15), ColorJitter(0.2, 0.2, 0.2, 0.1),
ToTensor, Normalize(0.5, 0.5)). Here a whole uint8 batch goes through the same
distribution at once:
- crop, flip and nearest-neighbour rotation are one gather: each output pixel
  looks up its source pixel through the three maps composed;
- colour jitter draws its four factors *and* torchvision's random order per
  image; brightness, contrast and saturation are all "blend towards a target
  and clamp", so each of the four order positions is one batched blend, and hue
  is applied only to the images whose order puts it there.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

PAD = 4
MAX_ROTATION = 15.0  # degrees
BRIGHTNESS = CONTRAST = SATURATION = 0.2
HUE = 0.1
MEAN = STD = 0.5
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
BRIGHTNESS_OP, CONTRAST_OP, SATURATION_OP, HUE_OP = range(4)  # torchvision ColorJitter's fn_idx order


@dataclass
class AugmentParams:
    """Per-image random draws; tests set them by hand to compare with torchvision."""

    top: torch.Tensor  # (B,) crop offset into the 4-pixel-padded image, 0..8
    left: torch.Tensor  # (B,)
    flip: torch.Tensor  # (B,) bool
    angle: torch.Tensor  # (B,) degrees, counter-clockwise like torchvision
    brightness: torch.Tensor  # (B,) factors
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor  # (B,) shift in [-0.5, 0.5] turns
    order: torch.Tensor  # (B, 4) permutation of the four jitter ops


def sample_params(n: int, device: torch.device | str, generator: torch.Generator | None = None) -> AugmentParams:
    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.empty(n, device=device).uniform_(lo, hi, generator=generator)

    return AugmentParams(
        top=torch.randint(0, 2 * PAD + 1, (n,), device=device, generator=generator),
        left=torch.randint(0, 2 * PAD + 1, (n,), device=device, generator=generator),
        flip=torch.rand(n, device=device, generator=generator) < 0.5,
        angle=uniform(-MAX_ROTATION, MAX_ROTATION),
        brightness=uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS),
        contrast=uniform(1 - CONTRAST, 1 + CONTRAST),
        saturation=uniform(1 - SATURATION, 1 + SATURATION),
        hue=uniform(-HUE, HUE),
        order=torch.rand(n, 4, device=device, generator=generator).argsort(dim=1),
    )


def concat_params(parts: list[AugmentParams]) -> AugmentParams:
    """The draws of several batches as those of one chunk, image for image."""
    if len(parts) == 1:
        return parts[0]
    return AugmentParams(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(AugmentParams)))


def geometric(images: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """Crop with zero padding, flip, then rotate about the centre (nearest, zero fill): one gather.

    images: (B, C, H, W) uint8 or float; returns the same dtype.
    """
    b, c, h, w = images.shape
    dev = images.device
    ys = torch.arange(h, device=dev, dtype=torch.float32).view(1, h, 1)
    xs = torch.arange(w, device=dev, dtype=torch.float32).view(1, 1, w)
    # Rotation: torchvision maps each output pixel centre back through the inverse rotation
    # about the image centre, then grid_sample(nearest) rounds half to even.
    theta = torch.deg2rad(p.angle.float()).view(b, 1, 1)
    cos, sin = torch.cos(theta), torch.sin(theta)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    dx, dy = xs - cx, ys - cy
    src_x = torch.round(cos * dx - sin * dy + cx)
    src_y = torch.round(sin * dx + cos * dy + cy)
    inside = (src_x >= 0) & (src_x <= w - 1) & (src_y >= 0) & (src_y <= h - 1)
    src_x = src_x.long().clamp_(0, w - 1)
    src_y = src_y.long().clamp_(0, h - 1)
    # Flip, then undo the crop: pixel (y, x) of the crop is (y + top - PAD, x + left - PAD) of the original.
    src_x = torch.where(p.flip.view(b, 1, 1), w - 1 - src_x, src_x) + (p.left.view(b, 1, 1) - PAD)
    src_y = src_y + (p.top.view(b, 1, 1) - PAD)
    inside &= (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    index = (src_y.clamp(0, h - 1) * w + src_x.clamp(0, w - 1)).view(b, 1, h * w).expand(b, c, h * w)
    out = torch.gather(images.reshape(b, c, h * w), 2, index)
    return (out * inside.view(b, 1, h * w).to(out.dtype)).view(b, c, h, w)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's HSV hue rotation for float images in [0, 1], per-image shift, without building HSV.

    A hue rotation keeps each pixel's max (V) and max - min (chroma), so only the hue
    angle is computed and the standard hsv->rgb formula is applied channel-wise.
    """
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    chroma = maxc - minc
    r, g, b = x.unbind(1)
    safe = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    is_r, is_g = maxc == r, maxc == g
    h6 = torch.where(is_r, bc - gc, torch.where(is_g, 2.0 + rc - bc, 4.0 + gc - rc))
    h6 = torch.remainder(h6 + 6.0 * shift.view(-1, 1, 1), 6.0)  # hue in sixths of a turn
    k = torch.remainder(torch.stack((h6 + 5.0, h6 + 3.0, h6 + 1.0), dim=1), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return maxc.unsqueeze(1) - chroma.unsqueeze(1) * ramp


def color_jitter(x: torch.Tensor, p: AugmentParams, masked_hue: bool | None = None) -> torch.Tensor:
    """Brightness, contrast, saturation and hue in each image's own random order. x: float in [0, 1].

    Hue goes only to the images whose order puts it at each position: on the CPU by gathering those rows
    (less arithmetic); on CUDA by computing it for all rows and selecting (no host sync for the row list).
    """
    n = x.shape[0]
    if masked_hue is None:
        masked_hue = x.is_cuda
    factors = torch.stack((p.brightness, p.contrast, p.saturation), dim=1).to(x.dtype)  # (B, 3)
    for position in range(4):
        op = p.order[:, position]
        is_blend = op != HUE_OP
        factor = torch.where(is_blend, factors.gather(1, op.clamp(max=2).view(n, 1)).squeeze(1), 1.0).view(n, 1, 1, 1)
        # Blend target: 0 for brightness, the mean grey level for contrast, the grey image for saturation.
        gray = _gray(x)
        target = torch.where(
            (op == CONTRAST_OP).view(n, 1, 1, 1),
            gray.mean(dim=(2, 3), keepdim=True),
            torch.where((op == SATURATION_OP).view(n, 1, 1, 1), gray, 0.0),
        )
        x = (factor * x + (1.0 - factor) * target).clamp_(0.0, 1.0)
        if masked_hue:
            x = torch.where(is_blend.view(n, 1, 1, 1), x, adjust_hue(x, p.hue))
            continue
        hue_rows = torch.nonzero(~is_blend).squeeze(1)
        if hue_rows.numel():
            x = x.index_copy(0, hue_rows, adjust_hue(x.index_select(0, hue_rows), p.hue.index_select(0, hue_rows)))
    return x


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


def to_unit_float(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float().div_(255.0)


def augment_batch(
    images_uint8: torch.Tensor, generator: torch.Generator | None = None, params: AugmentParams | None = None
) -> torch.Tensor:
    """(B, 3, 32, 32) uint8 -> normalised float, the study's training distribution, one draw per image."""
    if params is None:
        params = sample_params(images_uint8.shape[0], images_uint8.device, generator)
    x = to_unit_float(geometric(images_uint8, params))
    return normalize(color_jitter(x, params))


def prepare_eval(images_uint8: torch.Tensor) -> torch.Tensor:
    return normalize(to_unit_float(images_uint8))


def spec_pil_transform():
    """The study's own per-image pipeline (torchvision on PIL images), kept as the reference."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomCrop(32, padding=PAD),
            T.RandomHorizontalFlip(),
            T.RandomRotation(MAX_ROTATION),
            T.ColorJitter(brightness=BRIGHTNESS, contrast=CONTRAST, saturation=SATURATION, hue=HUE),
            T.ToTensor(),
            T.Normalize((MEAN,) * 3, (STD,) * 3),
        ]
    )
