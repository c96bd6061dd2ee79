"""Prefix LM cross-entropy (MacCap / CapDec): next-token CE on the caption tokens only.

The LM input is ``prefix (P positions) ⊕ caption ids (T)``; caption token t is predicted at position
``P + t - 1``. Prefix positions, the first ``lm_start`` given tokens (the own LM's BOS) and PADs are
not targets.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..registry import OBJECTIVES
from ..types import Batch, Features
from .base import Objective, StepContext, require
from .token_ce import IGNORE, token_cross_entropy


def prefix_lm_targets(ids: Tensor, mask: Tensor, prefix_len: int, start: int) -> Tensor:
    """(B, T) caption ids -> labels (B, P+T) aligned with the LM logits; -100 where nothing is predicted."""
    B, T = ids.shape
    labels = torch.full((B, prefix_len + T), IGNORE, dtype=torch.long, device=ids.device)
    tgt = ids.masked_fill(~mask.bool(), IGNORE)
    tgt[:, :start] = IGNORE
    labels[:, prefix_len - 1: prefix_len - 1 + T] = tgt                     # position P+t-1 predicts ids[t]
    return labels


@OBJECTIVES.register("prefix_lm")
class PrefixLM(Objective):
    requires = ("caption_logits",)

    def forward(self, feats: Features, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        logits = require(feats, "caption_logits", "prefix_lm")                  # (B, P+T, V)
        labels = prefix_lm_targets(feats.extras["lm_ids"], feats.extras["lm_mask"],
                                   int(feats.extras["prefix_len"]), int(feats.extras["lm_start"]))
        loss = token_cross_entropy(logits, labels)
        with torch.no_grad():
            ok = labels != IGNORE
            acc = (logits.argmax(-1)[ok] == labels[ok]).float().mean()
        return {"loss": loss, "acc": acc}
