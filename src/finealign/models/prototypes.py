"""DINO-style projection head into K prototypes, shared by global and patch tokens (SemMIM).

    x (..., D) -> MLP D -> H -> H -> bottleneck (GELU between) -> L2-normalise
               -> weight-normalised Linear bottleneck -> K (no bias)  = prototype logits (..., K)

Applied to the ViT's global (cls) token for agreement learning and to patch tokens for semantic MIM:
one head, one prototype space ("shared encoding space"), so patch targets carry the semantics the
global agreement learns. The last layer's weight is normalised per prototype (its norm fixed at 1, as
DINO's ``norm_last_layer``), which keeps any prototype from dominating through its scale.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .layers import init_weights


class PrototypeHead(nn.Module):
    def __init__(self, in_dim: int, num_prototypes: int, bottleneck: int = 256, hidden: int = 0):
        super().__init__()
        if num_prototypes < 2:
            raise ValueError(f"need at least 2 prototypes, got {num_prototypes}")
        hidden = hidden or 4 * in_dim
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Linear(bottleneck, num_prototypes, bias=False)
        self.apply(init_weights)
        self.num_prototypes = num_prototypes

    def forward(self, x: Tensor) -> Tensor:
        z = F.normalize(self.mlp(x), dim=-1)                                   # (..., bottleneck)
        w = F.normalize(self.prototypes.weight, dim=-1)                         # (K, bottleneck), unit rows
        return z @ w.t()                                                        # (..., K), cosines in [-1, 1]
