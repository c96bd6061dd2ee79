"""TiMix: text-aware CutMix. The lowest-scoring window of each target image is replaced by the
highest-scoring window of its source (the batch reversed); scores are per-patch text relevance
(the PTA head's z-scored class-1 log-probability, or the model's patch-text relevance).

    side s ~ U{ceil(0.35 g) .. floor(0.75 g)} (one per batch)        g = patch grid side
    window sums S_b(r, c) = sum of scores over rows r..r+s-1, cols c..c+s-1
    target window = argmin S_i,  source window = argmax S_source[i],  λ = 1 - s² / g²
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import MIXERS
from .base import Mix, Mixer, flip_source, paste_windows, window_side


def window_sums(scores: Tensor, side: int) -> Tensor:
    """scores (B, g, g) -> (B, g-s+1, g-s+1): the sum of each s×s window (top-left corner indexed)."""
    return F.avg_pool2d(scores[:, None].float(), side, stride=1)[:, 0] * side * side


def best_windows(scores: Tensor, side: int, lowest: bool) -> Tensor:
    """(B, g, g) -> (B, 3) long (row, col, side) of each image's lowest- or highest-scoring window
    (ties: the first in raster order)."""
    sums = window_sums(scores, side)                                    # (B, g-s+1, g-s+1)
    n = sums.shape[-1]
    flat = sums.flatten(1)
    idx = flat.argmin(1) if lowest else flat.argmax(1)                  # (B,)
    return torch.stack([idx // n, idx % n, torch.full_like(idx, side)], dim=1)


@MIXERS.register("timix")
class TiMixMixer(Mixer):
    needs_scores = True

    def __init__(self, patch_size: int, side: tuple[float, float] = (0.35, 0.75), **_):
        super().__init__(patch_size)
        self.side = tuple(side)

    def __call__(self, images: Tensor, scores: Tensor | None, rnd: random.Random) -> Mix:
        if scores is None:
            raise ValueError("the timix mixer needs patch scores (B, N)")
        B, g = images.shape[0], self.grid(images)
        if scores.shape != (B, g * g):
            raise ValueError(f"patch scores must be (B, N) = ({B}, {g * g}), got {tuple(scores.shape)}")
        s = window_side(g, self.side, rnd)
        grid_scores = scores.detach().reshape(B, g, g)
        source = flip_source(B, images.device)
        target_w = best_windows(grid_scores, s, lowest=True)                # (B, 3)
        source_w = best_windows(grid_scores, s, lowest=False)[source]      # (B, 3) in each source image
        mixed = paste_windows(images, source, target_w, source_w, self.patch_size)
        lam = torch.full((B,), 1.0 - s * s / (g * g), device=images.device)
        return Mix(mixed, lam, source, target_w, source_w)
