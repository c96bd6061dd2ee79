"""MLM: masked language modelling on the fusion encoder (ALBEF / SemMIM / SyncMask).

The model masks the text (``finealign.masking.text``), runs the fusion encoder on the corrupted text
and returns logits at the masked positions only:

* ``feats.extras["mlm_logits"]``    (M, V) float, one row per masked position,
* ``feats.extras["mlm_positions"]`` (M, 2) long, the (row, column) of each row in ``batch.text``.

The objective builds the targets itself from the *original* tokens ``batch.text[row, col]`` (never from
the corrupted input the model saw), so the 10% "unchanged" and 10% "random" tokens are scored correctly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import OBJECTIVES
from ..types import Batch, Features
from .base import Objective, StepContext, require

_HINT = "MLM needs a fusion model that masks the text (e.g. the ALBEF-style model with MLM enabled)"


def _require(feats: Features, name: str) -> Tensor:
    try:
        return require(feats, name, "mlm")
    except ValueError as e:
        raise ValueError(f"{e}; {_HINT}") from None


def mlm_loss(logits: Tensor, positions: Tensor, text: Tensor, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy over masked positions, and top-1 accuracy.

    logits (M, V); positions (M, 2) long (row, column) into text (B, T) long, the ORIGINAL tokens.
    With M == 0 the loss is a zero that still depends on ``logits`` (so backward works) and acc is 0.
    """
    if logits.dim() != 2 or positions.dim() != 2 or positions.shape[1] != 2 or logits.shape[0] != positions.shape[0]:
        raise ValueError(f"mlm: expected mlm_logits (M, V) and mlm_positions (M, 2) with the same M, got "
                         f"{tuple(logits.shape)} and {tuple(positions.shape)}")
    if logits.shape[0] == 0:
        return logits.sum() * 0.0, torch.zeros((), device=logits.device)
    positions = positions.long().to(text.device)
    target = text[positions[:, 0], positions[:, 1]].to(logits.device)          # (M,)
    loss = F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
    acc = (logits.argmax(-1) == target).float().mean()
    return loss, acc


@OBJECTIVES.register("mlm")
class MaskedLanguageModeling(Objective):
    scope = "local"
    requires = ("mlm_logits", "mlm_positions")

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = float(label_smoothing)

    def forward(self, feats: Features, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        logits = _require(feats, "mlm_logits")                                 # (M, V)
        positions = _require(feats, "mlm_positions")                           # (M, 2)
        loss, acc = mlm_loss(logits, positions, batch.text, self.label_smoothing)
        return {"loss": loss, "acc": acc.detach()}
