"""MacCap's adaptor-decoder: learnable queries read the (noisy) embeddings and become an LM prefix.

    memory (B, L, E) -> Linear(E, d)                       (B, L, d)
    queries (Q, d) -> transformer decoder layer(s): self-attention over the queries, cross-attention
                      to the memory, MLP                   (B, Q, d)
    -> LayerNorm -> MLP d -> d -> d -> D_lm                (B, Q, D_lm)   the prefix
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ..models.layers import Block, init_weights


class AdaptorDecoder(nn.Module):
    def __init__(self, embed_dim: int, lm_dim: int, width: int = 512, heads: int = 8, queries: int = 32,
                 layers: int = 1):
        super().__init__()
        self.memory_proj = nn.Linear(embed_dim, width)
        self.queries = nn.Parameter(torch.zeros(queries, width))
        self.blocks = nn.ModuleList([Block(width, heads, cross_dim=width) for _ in range(layers)])
        self.ln = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                                 nn.Linear(width, lm_dim))
        self.apply(init_weights)
        nn.init.normal_(self.queries, std=0.02)

    def forward(self, memory: Tensor) -> Tensor:
        """memory (B, L, E) -> prefix (B, Q, D_lm)."""
        mem = self.memory_proj(memory)                                        # (B, L, d)
        x = self.queries[None].expand(memory.shape[0], -1, -1)                # (B, Q, d)
        for blk in self.blocks:
            x = blk(x, context=mem)
        return self.mlp(self.ln(x))
