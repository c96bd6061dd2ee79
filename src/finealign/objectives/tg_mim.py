"""(TG-)MIM: MSE between predicted and true pixels of the masked patches (MAE loss).

The model puts its predictions and the masked indices in ``Features.extras``:
    mim_pred   (B, M, 3*p*p)  decoder output at the masked patches, in the order of mim_masked
    mim_masked (B, M) long    masked patch indices (raster order of the ViT's patchify)
The objective builds the targets from ``batch.images``: patchify exactly as the ViT does, keep the
masked patches, optionally normalise each patch by its own pixel mean / variance (MAE ``norm_pix_loss``,
unbiased variance as in MAE), and averages the squared error over pixels, then over masked patches.
Visible patches never enter the loss. The same objective serves random-mask MIM and text-guided MIM:
what differs is the masker and whether the decoder attends to the text.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..registry import OBJECTIVES
from ..types import Batch, Features
from .base import Objective, StepContext, require


def patchify(images: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, N, C*p*p): patches in raster order, each flattened as (C, p, p) —
    the same layout as ``VisionTransformer.patchify``."""
    B, C, H, W = images.shape
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not a multiple of patch size {p}")
    gh, gw = H // p, W // p
    x = images.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)     # (B, gh, gw, C, p, p)
    return x.reshape(B, gh * gw, C * p * p)


def normalize_patches(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-patch normalisation over the last dim: (x - mean) / sqrt(var + eps), unbiased var (MAE)."""
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True)
    return (x - mean) / (var + eps).sqrt()


def mim_loss(pred: Tensor, images: Tensor, masked: Tensor, p: int, norm_pix: bool = True) -> Tensor:
    """pred (B, M, C*p*p) at patches ``masked`` (B, M) of images (B, C, H, W) -> scalar MSE, float32."""
    target = patchify(images.float(), p)                                   # (B, N, C*p*p)
    B, M = masked.shape
    target = torch.gather(target, 1, masked.unsqueeze(-1).expand(B, M, target.shape[-1]))  # (B, M, C*p*p)
    if norm_pix:
        target = normalize_patches(target)
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)                # (B, M)
    return per_patch.mean()


def infer_patch_size(patch_dim: int, channels: int) -> int:
    p = math.isqrt(patch_dim // channels) if patch_dim % channels == 0 else 0
    if p < 1 or channels * p * p != patch_dim:
        raise ValueError(f"cannot infer the patch size: prediction width {patch_dim} is not "
                         f"{channels} * p * p; set objectives.tg_mim.patch_size")
    return p


@OBJECTIVES.register("tg_mim")
class MaskedImageModeling(Objective):
    scope = "local"
    requires = ("mim_pred", "mim_masked")

    def __init__(self, norm_pix: bool = True, patch_size: int = 0):
        super().__init__()
        if patch_size < 0:
            raise ValueError(f"patch_size must be >= 0 (0 = infer), got {patch_size}")
        self.norm_pix = bool(norm_pix)
        self.patch_size = int(patch_size)

    name = "tg_mim"

    def forward(self, feats: Features, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        pred = require(feats, "mim_pred", self.name)                       # (B, M, C*p*p)
        masked = require(feats, "mim_masked", self.name)                   # (B, M)
        images = batch.images                                              # (B, C, H, W)
        if pred.dim() != 3 or masked.shape != pred.shape[:2] or masked.shape[0] != images.shape[0]:
            raise ValueError(f"{self.name}: mim_pred {tuple(pred.shape)} and mim_masked {tuple(masked.shape)} "
                             f"must be (B, M, patch_dim) and (B, M) for {images.shape[0]} images")
        p = self.patch_size or infer_patch_size(pred.shape[-1], images.shape[1])
        if pred.shape[-1] != images.shape[1] * p * p:
            raise ValueError(f"{self.name}: prediction width {pred.shape[-1]} != {images.shape[1]}*{p}*{p}")
        return {"loss": mim_loss(pred, images, masked.long(), p, self.norm_pix)}


@OBJECTIVES.register("mim")
class PixelMIM(MaskedImageModeling):
    """The same loss under its generic name (fusion-model MIM, random-mask baselines): whether it is
    text-guided is the model's choice (``model.mim_text``), not the objective's."""
    name = "mim"
