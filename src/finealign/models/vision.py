"""Vision Transformer image tower: patchify -> [cls] + patches + pos [-> LayerNorm] -> pre-LN blocks -> LayerNorm.

The optional LayerNorm before the blocks (``model.vision_ln_pre``, CLIP's ``ln_pre``) and the MLP
activation (``model.act``) exist so that imported CLIP weights compute the same embeddings
(finealign/interop/hf_clip.py); the defaults are the original layers.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ..config import ModelConfig
from .layers import Block, run_block


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        self.patch_size = cfg.patch_size
        self.grid = cfg.image_size // cfg.patch_size
        self.num_patches = self.grid * self.grid
        self.width = cfg.vision_width
        self.grad_checkpointing = cfg.grad_checkpointing
        D = cfg.vision_width
        # a Linear on flattened (C, p, p) patches: same maths as Conv2d(stride=p), ~2x faster on CPU
        self.patch_embed = nn.Linear(3 * cfg.patch_size * cfg.patch_size, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, D))
        self.ln_pre = nn.LayerNorm(D) if cfg.vision_ln_pre else None
        self.blocks = nn.ModuleList([Block(D, cfg.vision_heads, cfg.mlp_ratio, act=cfg.act)
                                     for _ in range(cfg.vision_layers)])
        self.ln_post = nn.LayerNorm(D)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def patchify(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, N, 3*p*p), patches in raster order, each flattened as (C, p, p)."""
        B, C, H, W = images.shape
        p = self.patch_size
        gh, gw = H // p, W // p
        if gh * gw != self.num_patches or H % p or W % p:
            raise ValueError(f"expected {self.grid * p}x{self.grid * p} images, got {H}x{W}")
        x = images.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, p, p)
        return x.reshape(B, gh * gw, C * p * p)

    def forward(self, images: Tensor, return_attn: bool = False, keep: Tensor | None = None,
                hidden_at: int | None = None):
        """images (B, 3, H, W) -> cls (B, D), patches (B, N, D) [, cls->patch attention (B, N)].

        With ``hidden_at`` (0-based block index) the patch tokens after that block (before the final
        norm) are returned as a third element instead of the attention: (B, N, D) (TiMix's PTA head).

        With ``keep`` (B, K) patch indices only those patches are encoded (MAE-style: masked patches never
        enter the encoder) and ``patches`` is (B, K, D) in the order of ``keep``.

        The attention map is the last block's, from the cls query to the patch keys, renormalised over
        the patches (so it sums to 1) and averaged over heads; ``return_attn="full"`` gives the whole
        head-averaged map (B, 1+N, 1+N) instead (row 0: the cls query; MacCap's subregions).
        """
        x = self.patch_embed(self.patchify(images)) + self.pos_embed[:, 1:]  # (B, N, D)
        if keep is not None:
            x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))   # (B, K, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)                                     # (B, 1+N, D)
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        if return_attn and hidden_at is not None:
            raise ValueError("return_attn and hidden_at cannot be combined")
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        attn = hidden = None
        for i, blk in enumerate(self.blocks):
            if return_attn and i == len(self.blocks) - 1:
                x, w = blk(x, need_weights=True)                           # w: (B, H, 1+N, 1+N)
                if return_attn == "full":
                    attn = w.mean(dim=1)                                   # (B, 1+N, 1+N) head-averaged
                else:
                    w = w[:, :, 0, 1:]                                     # (B, H, N) cls query -> patches
                    attn = (w / w.sum(dim=-1, keepdim=True)).mean(dim=1)   # (B, N)
            else:
                x = run_block(blk, x, ckpt)
            if i == hidden_at:
                hidden = x[:, 1:]                                          # (B, N, D)
        x = self.ln_post(x)
        cls, patches = x[:, 0], x[:, 1:]                                   # (B, D), (B, N, D)
        if hidden_at is not None:
            return cls, patches, hidden
        return (cls, patches, attn) if return_attn else (cls, patches)

    def cls_attention(self, images: Tensor) -> Tensor:
        """Last-block cls->patch attention, head-averaged: (B, N), sums to 1 over patches."""
        return self.forward(images, return_attn=True)[2]
