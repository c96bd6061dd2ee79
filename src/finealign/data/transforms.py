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

Region boxes follow the image: ``ImageTransform(img, rng, boxes=[(x0, y0, x1, y1), ...])`` (boxes in
pixels of the input image) returns ``(tensor, new_boxes)`` with every box mapped through the very
crop box / resize / flip applied to the image (the image is bit-identical to the ``boxes=None``
call: the same random draws are made), in pixels of the ``S x S`` output, clipped to ``[0, S]``.
A box left with zero area (outside the crop) becomes ``None``, so ``new_boxes`` stays aligned with
``boxes``; callers drop the ``None`` entries (``load_item`` does). Without ``boxes`` the return is
just the tensor. ``TwoViewTransform`` maps boxes through view 1: ``((v1, v2), boxes1)``.
``accepts_boxes(transform)`` tells whether a transform takes ``boxes=``; ``map_box`` is the pure
per-box mapping.
"""
from __future__ import annotations

import inspect
import math
import random
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

RngLike = Union[random.Random, torch.Generator, int, None]
Box = tuple[float, float, float, float]          # (x0, y0, x1, y1) in pixels

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


_TRANSPOSING = frozenset(range(2, 9))            # EXIF orientations that move pixels (1 = as stored)


def _apply_orientation(img: Image.Image) -> Image.Image:
    """``img`` with its EXIF orientation applied (tag removed); ``img`` itself when there is nothing
    to apply (``ImageOps.exif_transpose`` would return a copy: three per image on the loader path)."""
    try:
        img.load()                               # some formats find their EXIF only while decoding
        if img.getexif().get(ExifTags.Base.Orientation, 1) in _TRANSPOSING:
            return ImageOps.exif_transpose(img)
    except Exception:  # broken EXIF must not make an otherwise fine image unusable
        pass
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB (EXIF orientation applied, transparency composited on white).

    An RGB image without an orientation to apply is returned as is (not copied): treat the result
    as read-only. Raises ``ValueError("unsupported image mode ...")`` for modes PIL cannot convert.
    """
    img = _apply_orientation(img)
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        # premultiplied "La" has no direct RGBA conversion in PIL: un-premultiply to "LA" first
        return _composite_on_white(img.convert("LA") if mode == "La" else img)
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


_MEAN_STD: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}


def _mean_std(x: Tensor) -> tuple[Tensor, Tensor]:
    """CLIP mean and std as (3, 1, 1) tensors of ``x``'s dtype and device, built once per pair (two
    ``torch.tensor`` calls per image were a tenth of the transform's time). Read-only."""
    key = (x.dtype, x.device)
    ms = _MEAN_STD.get(key)
    if ms is None:
        ms = (torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1),
              torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(3, 1, 1))
        # not kept when made under inference mode (such tensors cannot be saved for a later backward)
        if not (torch.is_inference_mode_enabled() or torch.compiler.is_compiling() or x.device.type == "meta"):
            _MEAN_STD[key] = ms
    return ms


def normalize(x: Tensor) -> Tensor:
    """(..., 3, H, W) in [0, 1] -> CLIP-normalised."""
    mean, std = _mean_std(x)
    return (x - mean) / std


def denormalize(x: Tensor) -> Tensor:
    """(..., 3, H, W) CLIP-normalised -> [0, 1] (clamped), for visualisation."""
    mean, std = _mean_std(x)
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


def map_box(box: Sequence[float], crop_box: Sequence[float], out_size: int,
            flipped: bool = False) -> Optional[Box]:
    """Map a box through "crop ``crop_box``, resize it to ``out_size`` x ``out_size``, optionally
    flip left-right" (what ``Image.resize(size, box=crop_box)`` + ``FLIP_LEFT_RIGHT`` do to pixels).

    Coordinates are continuous pixel-edge coordinates (a pixel ``i`` spans ``[i, i + 1]``), so the
    mapping is affine: ``x' = (x - cx0) * S / (cx1 - cx0)`` (then ``S - x'`` when flipped). The result
    is clipped to ``[0, S]``; ``None`` if nothing of positive area is left (box outside the crop).
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    cx0, cy0, cx1, cy1 = (float(v) for v in crop_box)
    s = float(out_size)
    sx, sy = s / (cx1 - cx0), s / (cy1 - cy0)
    nx0 = min(max((x0 - cx0) * sx, 0.0), s)
    nx1 = min(max((x1 - cx0) * sx, 0.0), s)
    ny0 = min(max((y0 - cy0) * sy, 0.0), s)
    ny1 = min(max((y1 - cy0) * sy, 0.0), s)
    if not (nx1 > nx0 and ny1 > ny0):
        return None
    if flipped:
        nx0, nx1 = s - nx1, s - nx0
    return (nx0, ny0, nx1, ny1)


def accepts_boxes(transform) -> bool:
    """Whether ``transform(img, rng, boxes=...)`` is supported (``accepts_boxes`` attribute, else
    a ``boxes`` parameter in the call signature)."""
    flag = getattr(transform, "accepts_boxes", None)
    if flag is not None:
        return bool(flag)
    try:
        return "boxes" in inspect.signature(transform).parameters
    except (TypeError, ValueError):
        return False


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

    accepts_boxes = True

    def __call__(self, img: Image.Image, rng: RngLike = None,
                 boxes: Optional[Sequence[Sequence[float]]] = None
                 ) -> Union[Tensor, tuple[Tensor, list[Optional[Box]]]]:
        """Image -> ``(3, S, S)`` tensor; with ``boxes`` -> ``(tensor, mapped boxes or None)``."""
        img = to_rgb(img)
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ValueError(f"empty image of size {w}x{h}")
        s = self.image_size
        flipped = False
        if not self.random:
            # resize shorter side to S + center crop, done as a single resample of the crop box
            crop = center_crop_box(w, h)
            out = img.resize((s, s), Image.Resampling.BICUBIC, box=crop)
            x = normalize(pil_to_tensor(out))                          # (3, S, S)
        else:
            rnd = _as_random(rng)
            crop = random_resized_crop_box(w, h, rnd, self.scale, self.ratio)
            out = img.resize((s, s), Image.Resampling.BICUBIC, box=crop)
            if self.hflip > 0 and rnd.random() < self.hflip:
                out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                flipped = True
            x = pil_to_tensor(out)                                     # (3, S, S) in [0, 1]
            if self.jitter > 0:
                b = rnd.uniform(1 - self.jitter, 1 + self.jitter)
                c = rnd.uniform(1 - self.jitter, 1 + self.jitter)
                order = rnd.random() < 0.5
                x = _brightness(x, b) if order else _contrast(x, c)
                x = _contrast(x, c) if order else _brightness(x, b)
            x = normalize(x)                                           # (3, S, S)
        if boxes is None:
            return x
        return x, [map_box(b, crop, s, flipped) for b in boxes]


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

    @property
    def accepts_boxes(self) -> bool:
        return accepts_boxes(self.base)

    def __call__(self, img: Image.Image, rng: RngLike = None,
                 boxes: Optional[Sequence[Sequence[float]]] = None):
        """-> ``(view1, view2)``; with ``boxes``: ``((view1, view2), boxes mapped through view 1)``."""
        rnd = _as_random(rng) if self.random else rng
        if boxes is None:
            x1 = self.base(img, rnd)                                   # (3, S, S)
            new_boxes = None
        else:
            x1, new_boxes = self.base(img, rnd, boxes=boxes)
        x2 = self.base(img, rnd) if self.random else x1.clone()        # (3, S, S)
        return (x1, x2) if boxes is None else ((x1, x2), new_boxes)


def _brightness(x: Tensor, factor: float) -> Tensor:
    return (x * factor).clamp_(0.0, 1.0)


def _contrast(x: Tensor, factor: float) -> Tensor:
    # blend with the mean grey level (ITU-R 601 luma), as PIL/torchvision do
    gray = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).mean()
    return (factor * x + (1.0 - factor) * gray).clamp_(0.0, 1.0)
