"""MAE-style image decoder for (text-guided) masked image modeling.

    visible (B, K, Dv) -> Linear -> (B, K, W) scattered to their patch positions
    mask token at the masked positions                 -> (B, N, W), + decoder pos embed (N, W)
    blocks: x + SelfAttn(LN x)  [+ CrossAttn(LN x, LN text), pads never attended]  + MLP(LN x)
    gather masked positions -> LayerNorm -> Linear -> pixel predictions (B, M, patch_dim)

With ``text_width=None`` there is no cross-attention: the plain MIM decoder (random-mask baseline).
Blocks are ``layers.Block`` with a key-padding mask on the cross-attention.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .layers import Block, init_weights, run_block


class ImageDecoder(nn.Module):
    def __init__(self, num_patches: int, encoder_width: int, width: int, layers: int, heads: int,
                 patch_dim: int, text_width: int | None, mlp_ratio: float = 4.0,
                 grad_checkpointing: bool = False):
        super().__init__()
        self.num_patches = num_patches
        self.width = width
        self.has_text = text_width is not None
        self.grad_checkpointing = grad_checkpointing
        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, width))
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio, cross_dim=text_width) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.head = nn.Linear(width, patch_dim)
        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, visible: Tensor, keep: Tensor, masked: Tensor, text_tokens: Tensor | None = None,
                text_mask: Tensor | None = None) -> Tensor:
        """visible (B, K, Dv) encoder tokens of the kept patches, keep (B, K) / masked (B, M) long patch
        indices (a partition of 0..N-1); text_tokens (B, T, Dt), text_mask (B, T) bool True on real tokens.
        Returns pixel predictions (B, M, patch_dim) at the masked patches, in the order of ``masked``."""
        B, K, _ = visible.shape
        M, N, W = masked.shape[1], self.num_patches, self.width
        if keep.shape != (B, K) or masked.shape[0] != B or K + M != N:
            raise ValueError(f"keep {tuple(keep.shape)} + masked {tuple(masked.shape)} must partition "
                             f"{N} patches for {B} images with {K} visible tokens")
        if self.has_text and text_tokens is None:
            raise ValueError("this image decoder cross-attends to text: pass text_tokens (and text_mask)")
        if not self.has_text and text_tokens is not None:
            raise ValueError("this image decoder was built without text (text_width=None) but got text_tokens")

        v = self.embed(visible)                                                  # (B, K, W)
        x = self.mask_token.to(v.dtype).expand(B, N, W)                          # (B, N, W)
        x = x.scatter(1, keep.unsqueeze(-1).expand(B, K, W), v)                  # visible tokens in place
        x = x + self.pos_embed                                                   # (B, N, W)

        kw = {}
        if self.has_text:
            kw["context"] = text_tokens                                          # (B, T, Dt)
            if text_mask is not None:
                real = text_mask.to(torch.bool)                                  # (B, T)
                has = real.any(dim=1)                                            # (B,)
                # a row without real tokens would softmax over nothing (NaN): let it attend, then gate to 0
                kw["cross_mask"] = (real | ~has[:, None])[:, None, None, :]      # (B, 1, 1, T)
                kw["cross_gate"] = has[:, None, None].to(x.dtype)                # (B, 1, 1)
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            x = run_block(blk, x, ckpt, **kw)
        x = torch.gather(x, 1, masked.unsqueeze(-1).expand(B, M, W))             # (B, M, W)
        return self.head(self.ln_post(x))                                        # (B, M, patch_dim)
