"""Causal text encoder with a learnable [cls] appended after the (padded) sequence.

Layout of the full forward, for a batch padded to T:

    positions   0 .. T-1                       T
    inputs      tok + pos (BOS .. EOS, PAD..)  cls_emb (no positional embedding)
    attention   causal, never to PAD keys      every real token (never PAD)

Real tokens are causal so they never see PADs (right padding) nor the cls; the cls sees exactly the
real tokens. Hence the pooled feature does not depend on how far a caption was padded, and the token
features are those of a plain causal LM, which ``forward_step`` reproduces incrementally.

``model.text_pool`` = eos (CLIP) or mean pools the token features instead (the last real token, i.e. the
tokenizer's EOS, or the masked mean of the real tokens): no cls is appended and there is no ``cls_emb``.
``model.act`` / ``model.text_mlp_ratio`` set the MLPs (imported CLIP weights, finealign/interop/hf_clip.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ..config import ModelConfig
from .layers import Block, KVCache, pool_tokens, run_block, step_mask


class TextEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        D = cfg.text_width
        self.width = D
        self.context_length = cfg.context_length
        self.grad_checkpointing = cfg.grad_checkpointing
        self.causal = cfg.arch != "fusion"   # the fusion family uses a bidirectional (BERT-style) encoder
        if cfg.text_pool not in ("cls", "eos", "mean"):
            raise ValueError(f"model.text_pool must be cls, eos or mean, got {cfg.text_pool!r}")
        self.pool = cfg.text_pool if self.causal else "cls"
        self.tok_embed = nn.Embedding(vocab_size, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.context_length, D))
        self.cls_emb = nn.Parameter(torch.zeros(1, 1, D)) if self.pool == "cls" else None
        ratio = cfg.text_mlp_ratio or cfg.mlp_ratio
        self.blocks = nn.ModuleList([Block(D, cfg.text_heads, ratio, act=cfg.act) for _ in range(cfg.text_layers)])
        self.ln_final = nn.LayerNorm(D)
        nn.init.normal_(self.pos_embed, std=0.02)
        if self.cls_emb is not None:
            nn.init.normal_(self.cls_emb, std=0.02)

    def _embed(self, text: Tensor, start_pos: int = 0) -> Tensor:
        T = text.shape[1]
        if start_pos + T > self.context_length:
            raise ValueError(f"text of {start_pos + T} tokens exceeds context_length {self.context_length}")
        return self.tok_embed(text) + self.pos_embed[:, start_pos:start_pos + T]  # (B, T, D)

    def new_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.blocks]

    def forward(self, text: Tensor, text_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """text (B, T) long, text_mask (B, T) bool (True on real tokens) -> pooled (B, D), tokens (B, T, D)."""
        if not self.causal:
            return self._forward_bidirectional(text, text_mask)
        if self.pool != "cls":
            return self._forward_pooled(text, text_mask)
        B, T = text.shape
        x = self._embed(text)                                               # (B, T, D)
        x = torch.cat([x, self.cls_emb.expand(B, -1, -1)], dim=1)           # (B, T+1, D)
        if text_mask is None:
            text_mask = torch.ones(B, T, dtype=torch.bool, device=text.device)
        key_ok = torch.cat([text_mask.bool(), text_mask.new_ones(B, 1, dtype=torch.bool)], dim=1)  # (B, T+1)
        causal = torch.ones(T + 1, T + 1, dtype=torch.bool, device=text.device).tril()
        # causal AND key-is-real; the diagonal keeps PAD query rows from being fully masked (NaN)
        mask = (causal & key_ok[:, None, :]) | torch.eye(T + 1, dtype=torch.bool, device=text.device)
        mask = mask[:, None]                                                # (B, 1, T+1, T+1)
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            x = run_block(blk, x, ckpt, mask=mask)
        x = self.ln_final(x)
        return x[:, -1], x[:, :-1]                                          # (B, D), (B, T, D)

    def _forward_pooled(self, text: Tensor, text_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Causal, no cls: pooled = the last real token (eos) or the mean of the real tokens (mean)."""
        B, T = text.shape
        x = self._embed(text)                                               # (B, T, D)
        if text_mask is None:
            text_mask = torch.ones(B, T, dtype=torch.bool, device=text.device)
        text_mask = text_mask.bool()
        causal = torch.ones(T, T, dtype=torch.bool, device=text.device).tril()
        mask = (causal & text_mask[:, None, :]) | torch.eye(T, dtype=torch.bool, device=text.device)
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            x = run_block(blk, x, ckpt, mask=mask[:, None])                 # mask (B, 1, T, T)
        x = self.ln_final(x)
        return pool_tokens(x, text_mask, self.pool), x                      # (B, D), (B, T, D)

    def _forward_bidirectional(self, text: Tensor, text_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """BERT-style (fusion arch): every token sees every real token; pooled = the BOS position."""
        x = self._embed(text)                                               # (B, T, D)
        mask = None if text_mask is None else text_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            x = run_block(blk, x, ckpt, mask=mask)
        x = self.ln_final(x)
        return x[:, 0], x                                                   # (B, D), (B, T, D)

    def encode_tokens(self, text: Tensor) -> Tensor:
        """Token features only (no cls), plain causal attention: (B, T) -> (B, T, D)."""
        x = self._embed(text)
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            x = run_block(blk, x, ckpt, is_causal=True)
        return self.ln_final(x)

    def forward_step(self, new_tokens: Tensor, cache: list[KVCache], start_pos: int) -> Tensor:
        """Incremental token features: new_tokens (B, t) at positions start_pos.. -> (B, t, D).

        ``cache`` (from ``new_cache()``) holds the keys/values of positions < start_pos and is extended.
        """
        x = self._embed(new_tokens, start_pos)                              # (B, t, D)
        t = new_tokens.shape[1]
        mask = step_mask(t, start_pos, x.device)
        for blk, c in zip(self.blocks, cache):
            x = blk(x, mask=mask, is_causal=mask is None and start_pos == 0, cache=c)
        return self.ln_final(x)
