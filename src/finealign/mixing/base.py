"""What the mixers share: the ``Mix`` result, window geometry on the patch grid, the builder.

A mixer maps a batch of images ``(B, 3, H, W)`` to mixed images in which image ``i`` (the *target*)
keeps a share ``λ_i`` of itself and takes the rest from image ``source[i]`` of the same batch. The
source is the batch reversed (``flip(0)``, as TiMix): ``source[i] = B - 1 - i``. Windows are squares
on the ViT patch grid (row, col, side in patches), so λ is an exact area share and a window never
cuts a patch. Randomness comes from a ``random.Random`` the caller seeds (the pipeline seeds it from
(train.seed, step, micro-batch), so a resumed run and the no-grad pre-pass of gradient accumulation
draw exactly the same mix).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Mix:
    images: Tensor                        # (B, 3, H, W) mixed images
    lam: Tensor                           # (B,) share of each mixed image that is its own (target) image
    source: Tensor                        # (B,) long: batch index of the image mixed in
    target_window: Tensor | None = None   # (B, 3) long (row, col, side) in patches: replaced in the target
    source_window: Tensor | None = None   # (B, 3) long: where the pasted pixels come from in the source


class Mixer:
    """Interface: ``mixer(images, scores, rnd) -> Mix``; ``scores`` (B, N) patch scores (TiMix only)."""
    needs_scores = False

    def __init__(self, patch_size: int):
        if patch_size <= 0:
            raise ValueError(f"patch_size must be positive, got {patch_size}")
        self.patch_size = int(patch_size)

    def grid(self, images: Tensor) -> int:
        H, W = images.shape[-2:]
        p = self.patch_size
        if H != W or H % p:
            raise ValueError(f"mixers need square images that are a multiple of the patch size {p}, got {H}x{W}")
        return H // p

    def __call__(self, images: Tensor, scores: Tensor | None, rnd: random.Random) -> Mix:  # pragma: no cover
        raise NotImplementedError


def flip_source(n: int, device=None) -> Tensor:
    """(n,) long: ``source[i] = n - 1 - i`` (the batch reversed)."""
    return torch.arange(n - 1, -1, -1, device=device)


def window_side(grid: int, side: tuple[float, float], rnd: random.Random) -> int:
    """A square window side in patches drawn uniformly from the integers in [side[0]·g, side[1]·g]
    (at least 1, at most g)."""
    lo = max(1, math.ceil(side[0] * grid - 1e-9))
    hi = min(grid, max(lo, math.floor(side[1] * grid + 1e-9)))
    return rnd.randint(lo, hi)


def paste_windows(images: Tensor, source: Tensor, target_window: Tensor, source_window: Tensor,
                  patch_size: int) -> Tensor:
    """Copy of ``images`` in which window ``target_window[i]`` of image i holds the pixels of window
    ``source_window[i]`` of image ``source[i]`` (windows (row, col, side) in patches, equal sides)."""
    out = images.clone()
    p = patch_size
    for i in range(images.shape[0]):
        tr, tc, s = (int(v) for v in target_window[i])
        sr, sc, s2 = (int(v) for v in source_window[i])
        if s != s2:
            raise ValueError(f"window sides differ: {s} vs {s2}")
        out[i, :, tr * p:(tr + s) * p, tc * p:(tc + s) * p] = \
            images[int(source[i]), :, sr * p:(sr + s) * p, sc * p:(sc + s) * p]
    return out


def zscore(scores: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-image z-score of patch scores: (B, N) -> (B, N) with mean 0 and std 1 per row."""
    scores = scores.float()
    return (scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True, unbiased=False) + eps)


def build_mixer(cfg, patch_size: int) -> Mixer | None:
    """``MixerConfig`` -> a mixer (None when ``cfg.type`` is empty)."""
    from ..registry import MIXERS
    if cfg is None or not cfg.type:
        return None
    cls = MIXERS.get(cfg.type)
    return cls(patch_size=patch_size, side=tuple(cfg.side), alpha=float(cfg.alpha))
