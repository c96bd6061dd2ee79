"""TiMix's patch-text alignment (PTA) head: which patches the caption talks about.

    patches (B, N, Dv) from vision block l -> LayerNorm -> Linear(Dv, C) -> GELU     (B, N, C)
    half the channels stay per patch, the other half are averaged over the patches   (B, N, C/2) x 2
    concatenated with the text global feature projected to C                         (B, N, 2C)
    MLP 2C -> C/2 -> C/4 -> 2, log-softmax -> log p(patch belongs to the text)       (B, N, 2)

The head computes features only; ``objectives.pta`` builds the patch labels from region boxes and
the mixers read the class-1 log-probability (z-scored per image) as patch scores.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def pta_block_index(vision_layers: int, pta_block: int) -> int:
    """0-based index of the vision block the head reads: ``pta_block`` is 1-based, 0 = the middle one."""
    return (vision_layers - 1) // 2 if pta_block == 0 else pta_block - 1


class PTAHead(nn.Module):
    def __init__(self, vision_width: int, text_width: int, width: int):
        super().__init__()
        if width < 4:
            raise ValueError(f"PTA width must be >= 4, got {width}")
        self.width = width
        self.norm = nn.LayerNorm(vision_width)
        self.proj = nn.Linear(vision_width, width)
        self.text_proj = nn.Linear(text_width, width)
        self.mlp = nn.Sequential(nn.Linear(2 * width, width // 2), nn.GELU(),
                                 nn.Linear(width // 2, width // 4), nn.GELU(), nn.Linear(width // 4, 2))

    def forward(self, patches: Tensor, text_global: Tensor) -> Tensor:
        """patches (B, N, Dv), text_global (B, Dt) -> log-probabilities (B, N, 2)."""
        x = F.gelu(self.proj(self.norm(patches)))                         # (B, N, C)
        h = self.width // 2
        local = x[..., :h]                                                # (B, N, C/2)
        pooled = x[..., h:].mean(1, keepdim=True).expand(-1, x.shape[1], -1)   # (B, N, C - C/2)
        text = self.text_proj(text_global)[:, None].expand(-1, x.shape[1], -1)  # (B, N, C)
        return F.log_softmax(self.mlp(torch.cat([local, pooled, text], dim=-1)).float(), dim=-1)
