"""PTA (TiMix): per-patch "belongs to the text" classification against labels from region boxes.

Patch labels: patch (r, c) of a g×g grid over an S×S input covers pixels [c·p, (c+1)·p) × [r·p, (r+1)·p)
with p = S / g; its label is 1 when its centre lies inside the box of a grounded phrase of the sample
(``batch.extras["regions"]``, boxes already in input pixels: the transforms move them with the image),
else 0. ``grounded: all`` counts every region of the sample (``shapes``: each region is an object the
caption mentions); ``grounded: caption`` only regions whose phrase occurs in the caption (COCO
instances, where a box's category name may not be mentioned). Samples without regions are left out of
the loss (``with_regions`` logs their share); a batch without any gives loss 0.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import OBJECTIVES
from ..types import Batch, Features
from .base import Objective, StepContext, require

log = logging.getLogger(__name__)


def patch_labels(regions: Sequence[Sequence], captions: Sequence[str], grid: int, image_size: int,
                 grounded: str = "all") -> tuple[Tensor, Tensor]:
    """Per-sample region lists -> labels (B, g*g) long (1 = patch centre inside a grounded box) and
    has (B,) bool (the sample has at least one grounded region)."""
    p = image_size / grid
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) * p                 # (g,)
    cy, cx = centres[:, None].expand(grid, grid), centres[None, :].expand(grid, grid)
    labels = torch.zeros(len(regions), grid, grid, dtype=torch.long)
    has = torch.zeros(len(regions), dtype=torch.bool)
    for i, (regs, cap) in enumerate(zip(regions, captions)):
        for r in regs or ():
            if r is None:
                continue
            if grounded == "caption" and r.phrase.lower() not in cap.lower():
                continue
            x0, y0, x1, y1 = r.box
            inside = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
            labels[i][inside] = 1
            has[i] = True
    return labels.flatten(1), has


@OBJECTIVES.register("pta")
class PTA(Objective):
    requires = ("pta_logp",)

    def __init__(self, grounded: str = "all"):
        super().__init__()
        if grounded not in ("all", "caption"):
            raise ValueError(f"grounded must be all or caption, got {grounded!r}")
        self.grounded = grounded
        self._warned = False

    def forward(self, feats: Features, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        logp = require(feats, "pta_logp", "pta")                                   # (B, N, 2)
        B, N, _ = logp.shape
        grid = math.isqrt(N)
        regions = batch.extras.get("regions") or [[] for _ in range(B)]
        labels, has = patch_labels(regions, batch.captions, grid, batch.images.shape[-1], self.grounded)
        labels, has = labels.to(logp.device), has.to(logp.device)
        share = has.float().mean()
        if not bool(has.any()):
            if not self._warned:
                log.warning("objectives.pta: a batch without region boxes%s gives loss 0; the PTA head learns only "
                            "from samples with regions (with_regions logs their share)",
                            " in the caption" if self.grounded == "caption" and any(regions) else "")
                self._warned = True
            return {"loss": logp.sum() * 0.0, "with_regions": share}
        lp, y = logp[has].reshape(-1, 2), labels[has].reshape(-1)                  # (B'N, 2), (B'N,)
        loss = F.nll_loss(lp.float(), y)
        acc = (lp.argmax(-1) == y).float().mean()
        return {"loss": loss, "acc": acc.detach(), "positive": y.float().mean(), "with_regions": share}
