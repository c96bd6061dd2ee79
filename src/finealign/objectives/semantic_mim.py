"""Semantic MIM (SemMIM): predict the teacher's prototype distribution at the masked patches.

The model returns, for the patches of ``mim_masked`` (B, M):

    feats.extras["mim_pred"]            (B, M, K)  student prototype logits (decoder output -> shared head)
    feats.extras["mim_teacher_logits"]  (B, M, K)  teacher prototype logits of the same patches, from the
                                                   unmasked image (fused with the text first when
                                                   model.text_fused_targets), no gradient

The objective centres and sharpens the teacher logits exactly as ``agreement`` does (its own EMA centre,
since patch and global statistics differ — iBOT keeps two) and averages the soft cross-entropy over the
masked patches. Visible patches are never predicted, so they never enter the loss.
"""
from __future__ import annotations

from torch import Tensor

from ..registry import OBJECTIVES
from ..types import Batch, Features
from .agreement import _Centred, soft_cross_entropy, teacher_targets, usage_entropy
from .base import StepContext, require


@OBJECTIVES.register("semantic_mim")
class SemanticMIM(_Centred):
    scope = "local"
    requires = ("mim_pred", "mim_teacher_logits")

    def forward(self, feats: Features, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        s = require(feats, "mim_pred", "semantic_mim")                        # (B, M, K)
        t = require(feats, "mim_teacher_logits", "semantic_mim").detach()     # (B, M, K)
        if s.shape != t.shape or s.dim() != 3:
            raise ValueError(f"semantic_mim: mim_pred {tuple(s.shape)} and mim_teacher_logits {tuple(t.shape)} "
                             f"must both be (B, M, K) (is model.mim_target: semantic?)")
        p_t = teacher_targets(t, self._center(t.shape[-1], t.device), self.teacher_temp(ctx.step))
        loss = soft_cross_entropy(p_t, s, self.student_temp).mean()
        out = {"loss": loss, "usage_entropy": usage_entropy(p_t)}
        if self.training:
            self._update_center(t, ctx)
        return out
