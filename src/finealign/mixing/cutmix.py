"""CutMix baseline: one random square window (same side distribution as TiMix, same place in target
and source, as in CutMix) is replaced by the source's pixels; λ = 1 - s² / g²."""
from __future__ import annotations

import random

import torch
from torch import Tensor

from ..registry import MIXERS
from .base import Mix, Mixer, flip_source, paste_windows, window_side


@MIXERS.register("cutmix")
class CutMixMixer(Mixer):
    def __init__(self, patch_size: int, side: tuple[float, float] = (0.35, 0.75), **_):
        super().__init__(patch_size)
        self.side = tuple(side)

    def __call__(self, images: Tensor, scores: Tensor | None, rnd: random.Random) -> Mix:
        B, g = images.shape[0], self.grid(images)
        s = window_side(g, self.side, rnd)
        r, c = rnd.randint(0, g - s), rnd.randint(0, g - s)
        window = torch.tensor([[r, c, s]], device=images.device).expand(B, 3)
        source = flip_source(B, images.device)
        mixed = paste_windows(images, source, window, window, self.patch_size)
        lam = torch.full((B,), 1.0 - s * s / (g * g), device=images.device)
        return Mix(mixed, lam, source, window, window)
