"""ITC: symmetric InfoNCE between L2-normalised image and text embeddings (CLIP)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import OBJECTIVES
from ..types import Batch, Features
from .base import Objective, StepContext, require


def contrastive_loss(image: Tensor, text: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Mean of image->text and text->image cross-entropy over the (B, B) similarity matrix.

    image, text: (B, E) normalised; pair i is (image[i], text[i]). Returns (loss, image->text accuracy).
    """
    logits = scale * image @ text.t()                              # (B, B)
    n = logits.shape[0]
    labels = torch.arange(n, device=logits.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    acc = (logits.argmax(1) == labels).float().mean()
    return loss, acc


@OBJECTIVES.register("itc")
class ITC(Objective):
    scope = "global"
    requires = ("image_embed", "text_embed", "logit_scale")
    gathers = ("image_embed", "text_embed")

    def forward(self, feats: Features, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        img, _ = ctx.gather("image_embed", require(feats, "image_embed", "itc"))   # (B, E)
        txt, _ = ctx.gather("text_embed", require(feats, "text_embed", "itc"))     # (B, E)
        scale = ctx.shared(require(feats, "logit_scale", "itc"))
        loss, acc = contrastive_loss(img, txt, scale)
        return {"loss": loss, "acc": acc.detach(), "logit_scale": scale.detach()}
