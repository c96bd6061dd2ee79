"""ITC: symmetric InfoNCE between L2-normalised image and text embeddings (CLIP)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import OBJECTIVES
from ..types import Batch, Features
from .base import EpochRamp, Objective, StepContext, require


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


def local_contrastive_loss(image: Tensor, text: Tensor, scale: Tensor, start: int, rows: int
                           ) -> tuple[Tensor, Tensor]:
    """``contrastive_loss`` restricted to rows ``start:start + rows`` (open_clip's ``local_loss``): those
    images against every text and those texts against every image. Averaged over the ranks that own
    the blocks of rows, it equals ``contrastive_loss`` of the whole batch."""
    idx = torch.arange(start, start + rows, device=image.device)
    logits_i2t = scale * image[start:start + rows] @ text.t()               # (rows, B)
    logits_t2i = scale * text[start:start + rows] @ image.t()               # (rows, B)
    loss = (F.cross_entropy(logits_i2t, idx) + F.cross_entropy(logits_t2i, idx)) / 2
    acc = (logits_i2t.argmax(1) == idx).float().mean()
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


def queued_contrastive_loss(image: Tensor, text: Tensor, scale: Tensor, t_image: Tensor, t_text: Tensor,
                            q_image: Tensor, q_text: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """ALBEF's ITC with feature queues: the keys are the teacher's embeddings of the batch followed by
    the queued ones, ``K_t = [t_text; q_text]`` (B+Q, E) and ``K_i = [t_image; q_image]``:

        logits_i2t = scale * image @ K_t.T      logits_t2i = scale * text @ K_i.T         (B, B+Q)
        y_i2t = alpha * softmax(scale * t_image @ K_t.T) + (1 - alpha) * [I | 0]          (likewise t2i)
        loss = mean over both directions of -sum(y * log_softmax(logits))

    The student's embeddings are pulled toward the teacher's (not its own) keys, as in ALBEF."""
    keys_t = torch.cat([t_text, q_text.to(t_text.dtype)])                # (B+Q, E)
    keys_i = torch.cat([t_image, q_image.to(t_image.dtype)])
    B = image.shape[0]
    logits_i2t = scale * image @ keys_t.t()                              # (B, B+Q)
    logits_t2i = scale * text @ keys_i.t()
    with torch.no_grad():
        hard = torch.zeros_like(logits_i2t)
        hard[:, :B] = torch.eye(B, device=hard.device, dtype=hard.dtype)
        s = scale.detach()
        y_i2t = alpha * (s * t_image @ keys_t.t()).softmax(1) + (1 - alpha) * hard
        y_t2i = alpha * (s * t_text @ keys_i.t()).softmax(1) + (1 - alpha) * hard
    loss = (-(y_i2t * F.log_softmax(logits_i2t, 1)).sum(1).mean()
            - (y_t2i * F.log_softmax(logits_t2i, 1)).sum(1).mean()) / 2
    acc = (logits_i2t.argmax(1) == torch.arange(B, device=image.device)).float().mean()
    return loss, acc


@OBJECTIVES.register("itc")
class ITC(Objective):
    """Options: ``distill_alpha`` > 0 mixes in the momentum teacher's soft targets (needs model.momentum > 0),
    ramped linearly from 0 over the first ``distill_warmup`` steps (``epoch``: over the first epoch, as ALBEF
    does; 0 = full alpha from step 0). When the model keeps feature queues (``model.queue_size``) and distillation
    is on, the queued teacher embeddings are extra keys (``queued_contrastive_loss``)."""
    scope = "global"
    requires = ("image_embed", "text_embed", "logit_scale")
    local_loss = True           # plain ITC (no distillation) scores only ctx.local_rows when given

    def __init__(self, distill_alpha: float = 0.0, distill_warmup: int | str = 0):
        super().__init__()
        if not 0.0 <= distill_alpha <= 1.0:
            raise ValueError(f"distill_alpha must be in [0, 1], got {distill_alpha}")
        self.alpha = float(distill_alpha)
        self.warmup = EpochRamp(distill_warmup, "objectives.itc.distill_warmup")
        self.gathers = ("image_embed", "text_embed") + (
            ("teacher_image_embed", "teacher_text_embed") if self.alpha > 0 else ())

    def forward(self, feats: Features, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        img, _ = ctx.gather("image_embed", require(feats, "image_embed", "itc"))   # (B, E)
        txt, _ = ctx.gather("text_embed", require(feats, "text_embed", "itc"))     # (B, E)
        scale = ctx.shared(require(feats, "logit_scale", "itc"))
        out = {}
        if self.alpha > 0:
            alpha = self.alpha * self.warmup(ctx)
            t_img, _ = ctx.gather("teacher_image_embed", require(feats, "teacher_image_embed", "itc"))
            t_txt, _ = ctx.gather("teacher_text_embed", require(feats, "teacher_text_embed", "itc"))
            q_img, q_txt = feats.extras.get("queue_image_embed"), feats.extras.get("queue_text_embed")
            if q_img is not None and q_txt is not None:
                loss, acc = queued_contrastive_loss(img, txt, scale, t_img, t_txt, q_img, q_txt, alpha)
            else:
                loss, acc = distilled_contrastive_loss(img, txt, scale, t_img, t_txt, alpha)
            out["alpha"] = torch.tensor(alpha)
        elif ctx.local_rows is not None:
            loss, acc = local_contrastive_loss(img, txt, scale, *ctx.local_rows)
        else:
            loss, acc = contrastive_loss(img, txt, scale)
        return {"loss": loss, "acc": acc.detach(), "logit_scale": scale.detach(), **out}
