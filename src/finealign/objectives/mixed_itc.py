"""Mixed ITC (TiMix): contrastive loss of mixed images against the unmixed texts, with soft labels.

Mixed image r holds its own image r (share λ_r) and image src(r) (the rest). With P the detached
image->text target distribution of the *unmixed* batch,

    P      = (1 - label_alpha) · I + label_alpha · softmax(scale · img @ txt.T)       (B, B)
    y_i2t[r]    = λ_r · P[r] + (1 - λ_r) · P[src(r)]                       (= λ·P + (1-λ)·P.flip(0))
    y_t2i[j, r] ∝ λ_r · Pt[j, r] + (1 - λ_r) · Pt[j, src(r)]     Pt likewise from the text->image side
    loss = γ · mean over both directions of -Σ y · log_softmax(scale · mixed_img @ txt.T)

``label_alpha = 1`` is P = the model's own softmax (the METHODS.md reading); the default 0.4 keeps
ALBEF's share of one-hot targets, which TiMix's distilled targets inherit; ``label_alpha = 0`` with
λ = 1 is exactly the standard ITC. γ ramps linearly 0 -> 1 over ``ramp`` steps (0 = the first epoch).
Global scope: under gradient accumulation (and across ranks) every row sees every text; the pipeline
stores ``mix_offset = src(r) - r`` per row, which stays valid after concatenating micro-batches (each
micro-batch is mixed within itself), so labels and images are flipped the same way.
When mixing is off (after ``mixer.stop``), the loss is 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import OBJECTIVES
from ..types import Batch, Features
from .base import EpochRamp, Objective, StepContext, require


def soft_targets(P: Tensor, lam: Tensor, src: Tensor) -> Tensor:
    """Rows mixed like the images: ``y[r] = lam[r] · P[r] + (1 - lam[r]) · P[src[r]]`` (B, B)."""
    lam = lam.to(P.dtype)[:, None]
    return lam * P + (1 - lam) * P[src]


def mixed_contrastive_loss(mixed: Tensor, image: Tensor, text: Tensor, scale: Tensor, lam: Tensor, src: Tensor,
                           label_alpha: float = 0.4) -> tuple[Tensor, Tensor, Tensor]:
    """mixed, image, text (B, E) normalised; lam (B,); src (B,) long. Returns (loss, y_i2t, y_t2i)."""
    B = mixed.shape[0]
    with torch.no_grad():
        eye = torch.eye(B, device=mixed.device, dtype=torch.float32)
        sim = scale.detach().float() * image.detach().float() @ text.detach().float().t()   # (B, B)
        P_i2t = (1 - label_alpha) * eye + label_alpha * sim.softmax(1)
        P_t2i = (1 - label_alpha) * eye + label_alpha * sim.t().softmax(1)
        y_i2t = soft_targets(P_i2t, lam.float(), src)                                     # (B, B) rows: mixed
        lam_c = lam.float()[None, :]
        y_t2i = lam_c * P_t2i + (1 - lam_c) * P_t2i[:, src]                             # (B, B) rows: texts
        y_t2i = y_t2i / y_t2i.sum(1, keepdim=True)
    logits = scale * mixed @ text.t()                                                    # (B, B)
    loss = (-(y_i2t * F.log_softmax(logits.float(), 1)).sum(1).mean()
            - (y_t2i * F.log_softmax(logits.t().float(), 1)).sum(1).mean()) / 2
    return loss, y_i2t, y_t2i


@OBJECTIVES.register("mixed_itc")
class MixedITC(Objective):
    scope = "global"
    requires = ("image_embed", "text_embed", "logit_scale")
    gathers = ("image_embed", "text_embed", "mixed_image_embed", "mix_lambda", "mix_offset")

    def __init__(self, label_alpha: float = 0.4, ramp: int = 0):
        super().__init__()
        if not 0.0 <= label_alpha <= 1.0:
            raise ValueError(f"label_alpha must be in [0, 1], got {label_alpha}")
        if isinstance(ramp, bool) or not isinstance(ramp, int) or ramp < 0:
            raise ValueError(f"ramp must be a number of steps >= 0 (0 = the first epoch), got {ramp!r}")
        self.label_alpha = float(label_alpha)
        self.ramp = EpochRamp(ramp or "epoch", "objectives.mixed_itc.ramp")

    def gamma(self, ctx: StepContext) -> float:
        return self.ramp(ctx)

    def forward(self, feats: Features, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        mixed = feats.extras.get("mixed_image_embed")
        if mixed is None:                                   # mixing is off at this step
            zero = require(feats, "image_embed", "mixed_itc").sum() * 0.0
            return {"loss": zero, "gamma": torch.tensor(0.0)}
        img, _ = ctx.gather("image_embed", require(feats, "image_embed", "mixed_itc"))      # (B, E)
        txt, _ = ctx.gather("text_embed", require(feats, "text_embed", "mixed_itc"))        # (B, E)
        mixed, _ = ctx.gather("mixed_image_embed", mixed)                                   # (B, E)
        lam, _ = ctx.gather("mix_lambda", feats.extras["mix_lambda"])                       # (B,)
        offset, _ = ctx.gather("mix_offset", feats.extras["mix_offset"])                    # (B,)
        src = torch.arange(offset.shape[0], device=offset.device) + offset
        scale = ctx.shared(require(feats, "logit_scale", "mixed_itc"))
        loss, _, _ = mixed_contrastive_loss(mixed, img, txt, scale, lam, src, self.label_alpha)
        gamma = self.gamma(ctx)
        out = {"loss": gamma * loss, "raw": loss.detach(), "gamma": torch.tensor(gamma),
               "lambda": lam.float().mean()}
        if "mix_by_pta" in feats.extras:
            out["by_pta"] = feats.extras["mix_by_pta"]
        return out
