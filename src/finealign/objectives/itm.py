"""ITM: image-text matching on the fusion encoder's [CLS] (ALBEF), plus ALBEF's hard-negative sampler.

The model scores B positive pairs and 2B' hard-negative pairs with a 2-way head and returns

* ``feats.extras["itm_logits"]``  (B + 2B', 2) float: rows [0, B) are (image i, text i); then B' rows of
  (image i, hard-negative text), then B' rows of (hard-negative image, text j). Column 1 = "match".
* ``feats.extras["itm_num_pos"]`` int B (python int or 0-d tensor): how many leading rows are positives.

The objective builds the labels (1 for the first B rows, 0 after) and returns the mean cross-entropy.

The negatives are chosen by the model with ``models.negatives.sample_hard_negatives`` (re-exported
here): models never import objectives.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.negatives import sample_hard_negatives  # noqa: F401  (re-export)
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
