"""ITM: image-text matching on the fusion encoder's [CLS] (ALBEF), plus ALBEF's hard-negative sampler.

The model scores B positive pairs and 2B' hard-negative pairs with a 2-way head and returns

* ``feats.extras["itm_logits"]``  (B + 2B', 2) float: rows [0, B) are (image i, text i); then B' rows of
  (image i, hard-negative text), then B' rows of (hard-negative image, text j). Column 1 = "match".
* ``feats.extras["itm_num_pos"]`` int B (python int or 0-d tensor): how many leading rows are positives.

The objective builds the labels (1 for the first B rows, 0 after) and returns the mean cross-entropy.

``sample_hard_negatives`` is a pure helper the fusion model calls to choose the negatives from the ITC
similarities (it holds no objective state, so models may import it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import OBJECTIVES
from ..types import Batch, Features
from .base import Objective, StepContext, require

_HINT = "ITM needs a fusion model with an ITM head (e.g. the ALBEF-style model)"


def _require(feats: Features, name: str):
    try:
        return require(feats, name, "itm")
    except ValueError as e:
        raise ValueError(f"{e}; {_HINT}") from None


def itm_loss(logits: Tensor, num_pos: int) -> tuple[Tensor, Tensor]:
    """logits (N, 2) with the first ``num_pos`` rows positive -> (mean CE over all N rows, accuracy)."""
    if logits.dim() != 2 or logits.shape[1] != 2:
        raise ValueError(f"itm: expected itm_logits of shape (N, 2), got {tuple(logits.shape)}")
    N = logits.shape[0]
    if not 0 <= num_pos <= N:
        raise ValueError(f"itm: itm_num_pos={num_pos} is outside [0, {N}] (rows of itm_logits)")
    labels = torch.zeros(N, dtype=torch.long, device=logits.device)
    labels[:num_pos] = 1
    loss = F.cross_entropy(logits.float(), labels)
    acc = (logits.argmax(-1) == labels).float().mean()
    return loss, acc


@OBJECTIVES.register("itm")
class ImageTextMatching(Objective):
    scope = "local"
    requires = ("itm_logits", "itm_num_pos")

    def forward(self, feats: Features, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        logits = _require(feats, "itm_logits")                                 # (B + 2B', 2)
        num_pos = int(_require(feats, "itm_num_pos"))
        loss, acc = itm_loss(logits, num_pos)
        return {"loss": loss, "acc": acc.detach()}


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
