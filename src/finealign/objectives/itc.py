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


def distilled_contrastive_loss(image: Tensor, text: Tensor, scale: Tensor, t_image: Tensor, t_text: Tensor,
                               alpha: float) -> tuple[Tensor, Tensor]:
    """ALBEF's momentum distillation: the one-hot targets are mixed with the teacher's similarity
    distribution, ``y = alpha * softmax(scale * t_image @ t_text.T) + (1 - alpha) * I``; the loss is the
    mean over both directions of ``-sum(y * log_softmax(logits))``. alpha = 0 is ``contrastive_loss``."""
    logits = scale * image @ text.t()                                  # (B, B)
    eye = torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype)
    with torch.no_grad():
        t_logits = scale.detach() * t_image @ t_text.t()               # (B, B)
        y_i2t = alpha * t_logits.softmax(1) + (1 - alpha) * eye
        y_t2i = alpha * t_logits.t().softmax(1) + (1 - alpha) * eye
    loss = (-(y_i2t * F.log_softmax(logits, 1)).sum(1).mean()
            - (y_t2i * F.log_softmax(logits.t(), 1)).sum(1).mean()) / 2
    acc = (logits.argmax(1) == torch.arange(logits.shape[0], device=logits.device)).float().mean()
    return loss, acc


@OBJECTIVES.register("itc")
class ITC(Objective):
    """Options: ``distill_alpha`` > 0 mixes in the momentum teacher's soft targets (needs model.momentum > 0)."""
    scope = "global"
    requires = ("image_embed", "text_embed", "logit_scale")

    def __init__(self, distill_alpha: float = 0.0):
        super().__init__()
        if not 0.0 <= distill_alpha <= 1.0:
            raise ValueError(f"distill_alpha must be in [0, 1], got {distill_alpha}")
        self.alpha = float(distill_alpha)
        self.gathers = ("image_embed", "text_embed") + (
            ("teacher_image_embed", "teacher_text_embed") if self.alpha > 0 else ())

    def forward(self, feats: Features, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        img, _ = ctx.gather("image_embed", require(feats, "image_embed", "itc"))   # (B, E)
        txt, _ = ctx.gather("text_embed", require(feats, "text_embed", "itc"))     # (B, E)
        scale = ctx.shared(require(feats, "logit_scale", "itc"))
        if self.alpha > 0:
            t_img, _ = ctx.gather("teacher_image_embed", require(feats, "teacher_image_embed", "itc"))
            t_txt, _ = ctx.gather("teacher_text_embed", require(feats, "teacher_text_embed", "itc"))
            loss, acc = distilled_contrastive_loss(img, txt, scale, t_img, t_txt, self.alpha)
        else:
            loss, acc = contrastive_loss(img, txt, scale)
        return {"loss": loss, "acc": acc.detach(), "logit_scale": scale.detach()}
