"""Attentive (text-guided) patch masking, SyCoCa-style.

Relevance of patch i to its caption: ``r_i = max_j cos(P_v v_i, P_t t_j)`` over the real text tokens j
(or the mean over them), computed from the current model without gradient. Then

    AttentiveMasker(mask="most")   masks the most relevant patches   (TG-MIM: rebuild them from the text)
    AttentiveMasker(mask="least")  masks the least relevant patches  (IC: keep what the text talks about)

For the same N, ``mask="least"`` at ratio 1-r selects exactly the complement of ``mask="most"`` at ratio r
(ties included): IC keep == MIM masked and IC masked == MIM keep.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import MASKERS
from .base import Masker, MaskIndices, split_by_score


@torch.no_grad()
def patch_text_relevance(patch_emb: Tensor, token_emb: Tensor, text_mask: Tensor | None = None,
                         reduce: str = "max") -> Tensor:
    """Cosine relevance of every patch to the caption's real tokens.

    patch_emb (B, N, E), token_emb (B, T, E) (already projected into one space), text_mask (B, T) bool,
    True on real tokens (None = all real). Returns (B, N) float32, detached. reduce "max": the best
    matching token; "mean": the average over real tokens. Rows without any real token get 0.
    """
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    p = F.normalize(patch_emb.detach().float(), dim=-1)                 # (B, N, E)
    t = F.normalize(token_emb.detach().float(), dim=-1)                 # (B, T, E)
    sim = p @ t.transpose(1, 2)                                         # (B, N, T)
    if text_mask is None:
        text_mask = torch.ones(sim.shape[0], sim.shape[2], dtype=torch.bool, device=sim.device)
    real = text_mask.to(sim.device, torch.bool)[:, None, :]             # (B, 1, T)
    if reduce == "max":
        rel = sim.masked_fill(~real, float("-inf")).amax(dim=-1)        # (B, N)
    else:
        rel = (sim * real).sum(dim=-1) / real.sum(dim=-1).clamp(min=1)  # (B, N)
    has_text = real.any(dim=-1)                                         # (B, 1)
    return torch.where(has_text, rel, torch.zeros_like(rel))


@MASKERS.register("attentive")
class AttentiveMasker(Masker):
    """Masks ``round(mask_ratio * N)`` patches by relevance: the most (``mask="most"``) or the least
    (``mask="least"``) relevant ones. Deterministic: ``generator`` is accepted and ignored."""

    def __init__(self, mask_ratio: float = 0.5, mask: str = "most"):
        super().__init__(mask_ratio)
        if mask not in ("most", "least"):
            raise ValueError(f"mask must be 'most' or 'least', got {mask!r}")
        self.mask = mask

    def __call__(self, relevance: Tensor, generator: torch.Generator | None = None) -> MaskIndices:
        B, N = relevance.shape
        M = self.num_masked(N)
        if self.mask == "most":
            return split_by_score(relevance, M)
        # keep the N-M most relevant (same ranking as "most", so the two are exact complements)
        top = split_by_score(relevance, N - M)
        return MaskIndices(keep=top.masked, masked=top.keep)
