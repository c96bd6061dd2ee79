"""Mixup baseline: ``x = λ·x + (1 - λ)·x.flip(0)`` with λ ~ Beta(alpha, alpha), one λ per batch."""
from __future__ import annotations

import random

import torch
from torch import Tensor

from ..registry import MIXERS
from .base import Mix, Mixer, flip_source


@MIXERS.register("mixup")
class MixupMixer(Mixer):
    def __init__(self, patch_size: int, alpha: float = 1.0, **_):
        super().__init__(patch_size)
        if alpha <= 0:
            raise ValueError(f"mixup alpha must be > 0, got {alpha}")
        self.alpha = float(alpha)

    def __call__(self, images: Tensor, scores: Tensor | None, rnd: random.Random) -> Mix:
        B = images.shape[0]
        lam = rnd.betavariate(self.alpha, self.alpha)
        source = flip_source(B, images.device)
        mixed = lam * images + (1.0 - lam) * images[source]
        return Mix(mixed, torch.full((B,), lam, device=images.device), source)
