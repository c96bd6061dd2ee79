"""Pooling and projection heads."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .layers import Attention


class AttentionalPooler(nn.Module):
    """CoCa's attentional pooler: ``n_queries`` learnable queries cross-attend to the (LayerNormed)
    tokens; the pooled outputs are LayerNormed."""

    def __init__(self, dim_q: int, dim_kv: int, n_queries: int, heads: int):
        super().__init__()
        self.n_queries = n_queries
        self.query = nn.Parameter(torch.zeros(n_queries, dim_q))
        self.ln_q = nn.LayerNorm(dim_q)
        self.ln_kv = nn.LayerNorm(dim_kv)
        self.attn = Attention(dim_q, heads, kv_dim=dim_kv, cross=True)
        self.ln_out = nn.LayerNorm(dim_q)
        nn.init.normal_(self.query, std=0.02)

    def forward(self, tokens: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """tokens (B, N, Dkv), key_mask (B, N) bool True = keep -> (B, n_queries, Dq)."""
        B = tokens.shape[0]
        q = self.ln_q(self.query).expand(B, -1, -1)                         # (B, Q, Dq)
        mask = None if key_mask is None else key_mask.bool()[:, None, None, :]  # (B, 1, 1, N)
        return self.ln_out(self.attn(q, context=self.ln_kv(tokens), mask=mask))


class Projection(nn.Module):
    """Bias-free linear projection into the contrastive space, optionally L2-normalised."""

    def __init__(self, dim_in: int, dim_out: int, normalize: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=False)
        self.normalize = normalize

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        return F.normalize(x, dim=-1) if self.normalize else x
