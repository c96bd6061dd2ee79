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

    def forward(self, tokens: Tensor, key_mask: Tensor | None = None, queries: slice = slice(None)) -> Tensor:
        """tokens (B, N, Dkv), key_mask (B, N) bool True = keep -> (B, Q, Dq) for the selected ``queries``
        (queries attend independently, so a subset gives exactly those rows of the full output)."""
        B = tokens.shape[0]
        q = self.ln_q(self.query[queries]).expand(B, -1, -1)                # (B, Q, Dq)
        mask = None if key_mask is None else key_mask.bool()[:, None, None, :]  # (B, 1, 1, N)
        return self.ln_out(self.attn(q, context=self.ln_kv(tokens), mask=mask))

    def query_attention(self, tokens: Tensor, query: int = 0) -> Tensor:
        """How much query ``query`` attends to each token: (B, N), averaged over heads (rows sum to 1)."""
        B = tokens.shape[0]
        q = self.ln_q(self.query[query:query + 1]).expand(B, -1, -1)         # (B, 1, Dq)
        _, att = self.attn(q, context=self.ln_kv(tokens), need_weights=True)  # (B, H, 1, N)
        return att[:, :, 0].mean(1)

    def dense(self, tokens: Tensor) -> Tensor:
        """Per-token value path (B, N, Dkv) -> (B, N, Dq): what each token would contribute to a pooled
        output if a query attended to it alone (MaskCLIP's trick for dense features of a pooled model)."""
        D = self.query.shape[-1]
        v = self.attn.kv(self.ln_kv(tokens))[..., D:]                      # (B, N, Dq) value half
        return self.ln_out(self.attn.proj(v))


class Projection(nn.Module):
    """Bias-free linear projection into the contrastive space, optionally L2-normalised."""

    def __init__(self, dim_in: int, dim_out: int, normalize: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=False)
        self.normalize = normalize

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        return F.normalize(x, dim=-1) if self.normalize else x
