"""Random patch masking (MAE ``random_masking``): argsort of uniform noise, per sample."""
from __future__ import annotations

import torch
from torch import Tensor

from ..registry import MASKERS
from .base import Masker, MaskIndices, split_by_score


@MASKERS.register("random")
class RandomMasker(Masker):
    """Masks ``round(mask_ratio * N)`` patches chosen uniformly at random in every row.

    The relevance argument is only read for its shape and device (so every masker has one signature).
    Reproducible given a seeded ``generator``; the noise is drawn on the generator's device.
    """

    uses_relevance = False

    def __init__(self, mask_ratio: float = 0.5, mask: str = "most"):
        # ``mask`` (most | least) has no meaning for random masks; it is accepted so that a recipe can turn
        # an inherited attentive masker into a random one by overriding ``type`` alone (ablations)
        super().__init__(mask_ratio)
        if mask not in ("most", "least"):
            raise ValueError(f"mask must be 'most' or 'least', got {mask!r}")

    def __call__(self, relevance: Tensor, generator: torch.Generator | None = None) -> MaskIndices:
        B, N = relevance.shape
        device = generator.device if generator is not None else relevance.device
        noise = torch.rand(B, N, generator=generator, device=device).to(relevance.device)  # (B, N)
        # MAE keeps the lowest-noise patches; masking the highest is the same distribution
        return split_by_score(noise, self.num_masked(N))
