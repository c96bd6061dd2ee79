"""IC: next-token cross-entropy of the caption decoder. The objective builds the shifted labels."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..registry import OBJECTIVES
from ..types import Batch, Features
from .base import Objective, StepContext, require


def caption_loss(logits: Tensor, text: Tensor, text_mask: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """logits (B, T, V) predict token t+1 at position t; text (B, T) ids; text_mask (B, T) real tokens.

    Position t is scored against text[:, t+1] wherever text_mask[:, t+1] is True (pads ignored); the loss
    is the mean over scored tokens.
    """
    pred = logits[:, :-1]                                          # (B, T-1, V)
    target = text[:, 1:].masked_fill(~text_mask[:, 1:], -100)      # (B, T-1)
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]).float(), target.reshape(-1),
                           ignore_index=-100, label_smoothing=label_smoothing)


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
