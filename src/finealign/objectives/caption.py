"""IC: next-token cross-entropy of the caption decoder. The objective builds the shifted labels."""
from __future__ import annotations

import torch
from torch import Tensor

from ..registry import OBJECTIVES
from ..types import Batch, Features
from .base import Objective, StepContext, require
from .token_ce import IGNORE, token_cross_entropy


def caption_loss(logits: Tensor, text: Tensor, text_mask: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """logits (B, T, V) predict token t+1 at position t; text (B, T) ids; text_mask (B, T) real tokens.

    Position t is scored against text[:, t+1] wherever text_mask[:, t+1] is True (pads ignored); the loss
    is the mean over scored tokens (``token_cross_entropy``: no fp32 copy of the logits).
    """
    labels = torch.full_like(text, IGNORE)                         # (B, T): the last position predicts nothing
    labels[:, :-1] = text[:, 1:].masked_fill(~text_mask[:, 1:], IGNORE)
    return token_cross_entropy(logits, labels, label_smoothing)


@OBJECTIVES.register("ic")
class ImageCaptioning(Objective):
    scope = "local"
    requires = ("caption_logits",)

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, feats: Features, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        logits = require(feats, "caption_logits", "ic")
        return {"loss": caption_loss(logits, batch.text, batch.text_mask, self.label_smoothing)}
