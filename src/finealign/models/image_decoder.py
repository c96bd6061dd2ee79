"""MAE-style image decoder for (text-guided) masked image modeling.

    visible (B, K, Dv) -> Linear -> (B, K, W) scattered to their patch positions
    mask token at the masked positions                 -> (B, N, W), + decoder pos embed (N, W)
    blocks: x + SelfAttn(LN x)  [+ CrossAttn(LN x, LN text), pads never attended]  + MLP(LN x)
    gather masked positions -> LayerNorm -> Linear -> pixel predictions (B, M, patch_dim)

With ``text_width=None`` there is no cross-attention: the plain MIM decoder (random-mask baseline).
``text_from=l``: only blocks l, l+1, ... cross-attend to the text (SemMIM's text injection "from a
configurable layer on"). Blocks are ``layers.Block`` with a key-padding mask on the cross-attention.
``dense(tokens, text)`` runs every patch through the same blocks without masking (SemMIM's teacher:
patch tokens fused with the text before projection).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .layers import Block, init_weights, run_block


def decoder_shape(cfg) -> tuple[int, int]:
    """(width, heads) of the image decoder for a ``ModelConfig``: ``mim_decoder_width`` if set, else
    ``vision_width * mim_decoder_scale`` rounded to a multiple of the heads (at least one head's width)."""
    heads = cfg.mim_decoder_heads or cfg.vision_heads
    if cfg.mim_decoder_width:
        return cfg.mim_decoder_width, heads
    return max(heads, round(cfg.vision_width * cfg.mim_decoder_scale / heads) * heads), heads


def build_image_decoder(cfg, num_patches: int, patch_dim: int, text_width: int | None) -> "ImageDecoder":
    """The image decoder a model config asks for (``cfg.mim_decoder_layers`` > 0)."""
    width, heads = decoder_shape(cfg)
    return ImageDecoder(num_patches=num_patches, encoder_width=cfg.vision_width, width=width,
                        layers=cfg.mim_decoder_layers, heads=heads, patch_dim=patch_dim,
                        text_width=text_width if cfg.mim_text else None, mlp_ratio=cfg.mlp_ratio,
                        grad_checkpointing=cfg.grad_checkpointing, text_from=cfg.mim_text_from)


class ImageDecoder(nn.Module):
    def __init__(self, num_patches: int, encoder_width: int, width: int, layers: int, heads: int,
                 patch_dim: int, text_width: int | None, mlp_ratio: float = 4.0,
                 grad_checkpointing: bool = False, text_from: int = 0):
        super().__init__()
        self.num_patches = num_patches
        self.width = width
        self.has_text = text_width is not None
        self.grad_checkpointing = grad_checkpointing
        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, width))
        if not 0 <= text_from <= layers:
            raise ValueError(f"text_from={text_from} must be in [0, {layers}] for a {layers}-block image decoder")
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio, cross_dim=text_width if i >= text_from else None)
                                     for i in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.head = nn.Linear(width, patch_dim)
        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, visible: Tensor, keep: Tensor, masked: Tensor, text_tokens: Tensor | None = None,
                text_mask: Tensor | None = None, use_text: bool = True) -> Tensor:
        """visible (B, K, Dv) encoder tokens of the kept patches, keep (B, K) / masked (B, M) long patch
        indices (a partition of 0..N-1); text_tokens (B, T, Dt), text_mask (B, T) bool True on real tokens.
        Returns pixel predictions (B, M, patch_dim) at the masked patches, in the order of ``masked``.
        ``use_text=False`` gates the cross-attention output to 0 (the "no text injection" ablation of a
        decoder whose text cross-attention is still used elsewhere, e.g. by a teacher)."""
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
        x = self._blocks(x + self.pos_embed, text_tokens, text_mask, use_text)   # (B, N, W)
        x = torch.gather(x, 1, masked.unsqueeze(-1).expand(B, M, W))             # (B, M, W)
        return self.head(self.ln_post(x))                                        # (B, M, patch_dim)

    def dense(self, tokens: Tensor, text_tokens: Tensor | None = None, text_mask: Tensor | None = None) -> Tensor:
        """Every patch, none masked: tokens (B, N, Dv) -> (B, N, patch_dim)."""
        if tokens.shape[1] != self.num_patches:
            raise ValueError(f"dense() needs all {self.num_patches} patch tokens, got {tokens.shape[1]}")
        if self.has_text and text_tokens is None:
            raise ValueError("this image decoder cross-attends to text: pass text_tokens (and text_mask)")
        x = self._blocks(self.embed(tokens) + self.pos_embed, text_tokens if self.has_text else None, text_mask)
        return self.head(self.ln_post(x))

    def _blocks(self, x: Tensor, text_tokens: Tensor | None, text_mask: Tensor | None,
                use_text: bool = True) -> Tensor:
        kw = {}
        if self.has_text:
            kw["context"] = text_tokens                                          # (B, T, Dt)
            if text_mask is not None:
                real = text_mask.to(torch.bool)                                  # (B, T)
                has = real.any(dim=1)                                            # (B,)
                # a row without real tokens would softmax over nothing (NaN): let it attend, then gate to 0
                kw["cross_mask"] = (real | ~has[:, None])[:, None, None, :]      # (B, 1, 1, T)
                kw["cross_gate"] = has[:, None, None].to(x.dtype)                # (B, 1, 1)
            if not use_text:
                kw["cross_gate"] = torch.zeros(x.shape[0], 1, 1, dtype=x.dtype, device=x.device)
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            x = run_block(blk, x, ckpt, **(kw if blk.has_cross else {}))
        return x
