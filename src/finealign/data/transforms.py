"""Image preprocessing without torchvision: mode normalisation, resize/crop, light augmentation.

* ``to_rgb(img)`` turns any PIL image (CMYK, P with transparency, LA, L, 1, I;16, I, F, RGBA, ...)
  into an 8-bit RGB image, applying the EXIF orientation first. Transparent pixels are composited
  on white.
* ``ImageTransform(image_size, train, augment)`` maps a PIL image to a normalised float tensor
  ``(3, S, S)`` (CLIP mean/std). Evaluation: resize the shorter side to ``S`` + center crop.
  Training with ``augment``: random resized crop (scale 0.7-1.0, ratio 3/4-4/3) + mild
  brightness/contrast jitter. There is deliberately no horizontal flip: captions say left/right.
* Randomness never comes from global state: ``__call__`` takes ``rng`` (a ``random.Random``, a
  ``torch.Generator`` or an int seed). The loader derives that seed from (seed, epoch, index), so
  augmentations are reproducible across resumes and independent of the number of workers.
* ``TwoViewTransform(base)`` (``data.views: 2``): one decoded image -> ``(view1, view2)``, ``base``
  applied twice with independent draws of the same per-sample generator (view 1 is exactly the
  ``views: 1`` image; view 2 continues that generator), so both stay reproducible per
  (seed, epoch, sample). Without randomness (eval / ``augment: false``) the views are equal.
* ``denormalize(x)`` undoes the normalisation for visualisation.
"""
from __future__ import annotations

import math
import random
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

RngLike = Union[random.Random, torch.Generator, int, None]

_WHITE = (255, 255, 255)


def _composite_on_white(img: Image.Image) -> Image.Image:
    """RGBA (or anything convertible to RGBA) -> RGB with transparent pixels over white."""
    rgba = img.convert("RGBA")
    bg = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(bg, rgba).convert("RGB")


def _wide_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float single-channel image -> 8-bit "L".

    Integer modes (I;16*, I) are treated as 16-bit data and scaled by 255/65535 (values clipped);
    float images in [0, 1] are scaled by 255, otherwise clipped to [0, 255].
    """
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        finite = arr[np.isfinite(arr)]
        if finite.size and finite.max() <= 1.0:
            arr = arr * 255.0
    else:
        arr = arr.astype(np.float64) / 257.0  # 65535 -> 255
    arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB (EXIF orientation applied, transparency composited on white).

    Raises ``ValueError("unsupported image mode ...")`` for modes PIL cannot convert.
    """
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # broken EXIF must not make an otherwise fine image unusable
        pass
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        return _composite_on_white(img)
    if mode == "P":
        if "transparency" in img.info:
            return _composite_on_white(img.convert("RGBA"))
        return img.convert("RGB")
    if mode in ("1", "L", "CMYK", "YCbCr", "RGBX", "HSV"):
        return img.convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _wide_to_l(img).convert("RGB")
    try:
        return img.convert("RGB")
    except Exception as e:
        raise ValueError(f"unsupported image mode {mode!r}") from e


def _as_random(rng: RngLike) -> random.Random:
    """Normalise the accepted rng kinds to a ``random.Random``."""
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, torch.Generator):
        return random.Random(int(torch.randint(0, 2**62, (1,), generator=rng).item()))
    if isinstance(rng, int):
        return random.Random(rng)
    # No rng given: fall back to an unseeded generator (not reproducible; the loader always passes one).
    return random.Random()


def pil_to_tensor(img: Image.Image) -> Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8)                     # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def normalize(x: Tensor) -> Tensor:
    """(..., 3, H, W) in [0, 1] -> CLIP-normalised."""
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def denormalize(x: Tensor) -> Tensor:
    """(..., 3, H, W) CLIP-normalised -> [0, 1] (clamped), for visualisation."""
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * std + mean).clamp(0.0, 1.0)


def center_crop_box(w: int, h: int) -> tuple[float, float, float, float]:
    """Largest centered square of a (w, h) image, as a PIL box (x0, y0, x1, y1)."""
    m = min(w, h)
    x0, y0 = (w - m) / 2.0, (h - m) / 2.0
    return (x0, y0, x0 + m, y0 + m)


def random_resized_crop_box(w: int, h: int, rnd: random.Random,
                            scale: tuple[float, float] = (0.7, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box sampling (10 tries, then a center crop fallback)."""
    area = w * h
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rnd.uniform(*scale)
        ar = math.exp(rnd.uniform(*log_r))
        cw = int(round(math.sqrt(target * ar)))
        ch = int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            x0 = rnd.randint(0, w - cw)
            y0 = rnd.randint(0, h - ch)
            return (x0, y0, x0 + cw, y0 + ch)
    # fallback: whole image clamped to the ratio range, centered
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return (x0, y0, x0 + cw, y0 + ch)


class ImageTransform:
    """PIL image (any mode) -> normalised float tensor (3, S, S).

    Args:
        image_size: output side ``S``.
        train: training transform (random crop + jitter when ``augment``) or evaluation transform.
        augment: switch the training augmentation off (then train == eval transform).
        scale, ratio: random resized crop ranges (fraction of the area, aspect ratio w/h).
        jitter: brightness/contrast factors are drawn from ``[1 - jitter, 1 + jitter]``.
        hflip: probability of a horizontal flip (default 0: captions talk about left/right).
    """

    def __init__(self, image_size: int, train: bool, augment: bool = True,
                 scale: tuple[float, float] = (0.7, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 jitter: float = 0.2, hflip: float = 0.0):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)
        self.train = bool(train)
        self.augment = bool(augment)
        self.scale = scale
        self.ratio = ratio
        self.jitter = float(jitter)
        self.hflip = float(hflip)

    @property
    def random(self) -> bool:
        """Whether the output depends on ``rng``."""
        return self.train and self.augment

    def __repr__(self) -> str:
        return (f"ImageTransform(image_size={self.image_size}, train={self.train}, "
                f"augment={self.augment})")

    def __call__(self, img: Image.Image, rng: RngLike = None) -> Tensor:
        img = to_rgb(img)
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ValueError(f"empty image of size {w}x{h}")
        s = self.image_size
        if not self.random:
            # resize shorter side to S + center crop, done as a single resample of the crop box
            out = img.resize((s, s), Image.Resampling.BICUBIC, box=center_crop_box(w, h))
            return normalize(pil_to_tensor(out))                       # (3, S, S)
        rnd = _as_random(rng)
        box = random_resized_crop_box(w, h, rnd, self.scale, self.ratio)
        out = img.resize((s, s), Image.Resampling.BICUBIC, box=box)
        if self.hflip > 0 and rnd.random() < self.hflip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = pil_to_tensor(out)                                         # (3, S, S) in [0, 1]
        if self.jitter > 0:
            b = rnd.uniform(1 - self.jitter, 1 + self.jitter)
            c = rnd.uniform(1 - self.jitter, 1 + self.jitter)
            order = rnd.random() < 0.5
            x = _brightness(x, b) if order else _contrast(x, c)
            x = _contrast(x, c) if order else _brightness(x, b)
        return normalize(x)                                            # (3, S, S)


class TwoViewTransform:
    """Image -> ``(view1, view2)``: ``base`` applied twice to the same (already decoded) image.

    ``rng`` is normalised once to a ``random.Random``; view 1 consumes it exactly as ``base``
    alone would (so view 1 equals the single-view image), view 2 continues the same generator
    (an independent, deterministic draw). If ``base`` is not random, view 2 is a copy of view 1.
    Picklable (DataLoader workers).
    """

    def __init__(self, base):
        self.base = base

    @property
    def random(self) -> bool:
        return bool(getattr(self.base, "random", True))

    def __repr__(self) -> str:
        return f"TwoViewTransform({self.base!r})"

    def __call__(self, img: Image.Image, rng: RngLike = None) -> tuple[Tensor, Tensor]:
        if not self.random:
            x = self.base(img, rng)                                    # (3, S, S)
            return x, x.clone()
        rnd = _as_random(rng)
        return self.base(img, rnd), self.base(img, rnd)                # 2 x (3, S, S)


def _brightness(x: Tensor, factor: float) -> Tensor:
    return (x * factor).clamp_(0.0, 1.0)


def _contrast(x: Tensor, factor: float) -> Tensor:
    # blend with the mean grey level (ITU-R 601 luma), as PIL/torchvision do
    gray = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).mean()
    return (factor * x + (1.0 - factor) * gray).clamp_(0.0, 1.0)
