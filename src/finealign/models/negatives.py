"""ALBEF's hard-negative sampling for ITM: one similarity-drawn negative per image and per text.

A pure function of the ITC similarities and item ids (no state); the fusion model calls it in
``heads`` and ``objectives.itm`` re-exports it.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _draw(sim: Tensor, item_ids: Tensor, generator: torch.Generator | None) -> Tensor:
    """For every row i of sim (B, B), one column j != i with item_ids[j] != item_ids[i], drawn with
    probability softmax over the valid columns; rows without a valid column take the least similar
    other column (ties: lowest index)."""
    B = sim.shape[0]
    same = item_ids[:, None] == item_ids[None, :]                              # (B, B), diagonal included
    eye = torch.eye(B, dtype=torch.bool, device=sim.device)
    invalid = same | eye
    has_valid = ~invalid.all(1)                                                # (B,)
    logits = sim.masked_fill(invalid, float("-inf"))
    # rows with no valid column would be all -inf (NaN softmax): give them a dummy uniform row, then override
    logits = torch.where(has_valid[:, None], logits, torch.zeros_like(logits))
    probs = torch.softmax(logits, dim=1)                                       # (B, B)
    if generator is not None and generator.device != probs.device:
        drawn = torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(1).to(sim.device)
    else:
        drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1)    # (B,)
    fallback = sim.masked_fill(eye, float("inf")).argmin(1)                    # least similar other sample
    return torch.where(has_valid, drawn, fallback)


@torch.no_grad()
def sample_hard_negatives(sim: Tensor, item_ids: Tensor,
                          generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """ALBEF's hard negatives: one negative text per image and one negative image per text.

    sim (B, B): image-to-text similarity logits, sim[i, j] = image i vs text j, already scaled by the
    contrastive temperature (ALBEF uses ``image_feat @ text_feat.T / temp``); item_ids (B,) long.

    For image i a text j is drawn with probability ``softmax(sim[i])`` restricted to the valid j: j != i
    and item_ids[j] != item_ids[i] (another image or caption of the same item is not a negative). Texts
    draw images the same way from ``sim.t()``. Fallback: when every other sample shares the item of row
    i, there is no valid negative and row i deterministically takes the *least similar other sample*
    (lowest index on ties) — a same-item sample that will be labelled "no match", so grouped samplers
    should keep several items per batch. No gradient flows; computed in float32.

    Returns (neg_text_for_image (B,), neg_image_for_text (B,)) long indices on sim's device. Reproducible
    for a seeded ``generator`` (on sim's device, or CPU: probabilities are moved to it). Raises for B < 2.
    """
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"sample_hard_negatives: sim must be square (B, B), got {tuple(sim.shape)}")
    B = sim.shape[0]
    if item_ids.shape != (B,):
        raise ValueError(f"sample_hard_negatives: item_ids must be ({B},), got {tuple(item_ids.shape)}")
    if B < 2:
        raise ValueError(f"sample_hard_negatives needs at least 2 samples per (micro-)batch, got {B}")
    sim = sim.detach().float()
    item_ids = item_ids.to(sim.device)
    neg_text_for_image = _draw(sim, item_ids, generator)
    neg_image_for_text = _draw(sim.t(), item_ids, generator)
    return neg_text_for_image, neg_image_for_text
