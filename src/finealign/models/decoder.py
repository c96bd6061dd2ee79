"""Multimodal caption decoder: causal self-attention over the unimodal text tokens, cross-attention to
the image memory (attentional-pooler outputs, width text_width), MLP; final LayerNorm and LM head."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ..config import ModelConfig
from .layers import Block, KVCache, run_block, step_mask


class MultimodalDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        D = cfg.text_width
        self.grad_checkpointing = cfg.grad_checkpointing
        if cfg.decoder_block not in ("fused", "open_clip"):
            raise ValueError(f"model.decoder_block must be 'fused' or 'open_clip', got {cfg.decoder_block!r}")
        self.blocks = nn.ModuleList([Block(D, cfg.text_heads, cfg.mlp_ratio, cross_dim=D,
                                           self_mlp=cfg.decoder_block == "open_clip")
                                     for _ in range(cfg.decoder_layers)])
        self.ln_final = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, vocab_size)

    def new_cache(self) -> dict[str, list[KVCache]]:
        """Self-attention caches grow per step; cross-attention caches hold the memory's keys/values."""
        return {"self": [KVCache() for _ in self.blocks], "cross": [KVCache() for _ in self.blocks]}

    def forward(self, text_tokens: Tensor, memory: Tensor) -> Tensor:
        """text_tokens (B, T, D), memory (B, M, D) -> next-token logits (B, T, V)."""
        x = text_tokens
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            x = run_block(blk, x, ckpt, context=memory, is_causal=True)
        return self.lm_head(self.ln_final(x))

    def forward_step(self, new_text_tokens: Tensor, memory: Tensor, cache: dict[str, list[KVCache]],
                     start_pos: int) -> Tensor:
        """Incremental: new_text_tokens (B, t, D) at positions start_pos.. -> logits (B, t, V)."""
        x = new_text_tokens
        mask = step_mask(x.shape[1], start_pos, x.device)
        for blk, c, cc in zip(self.blocks, cache["self"], cache["cross"]):
            x = blk(x, context=memory, mask=mask, is_causal=mask is None and start_pos == 0,
                    cache=c, cross_cache=cc)
        return self.lm_head(self.ln_final(x))
