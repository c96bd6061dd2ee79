"""The feature side of MacCap: noise injection, subregion features, aggregation, re-ranking.

    training   e = normalise(E_txt(caption))                      (B, E)
               copies_l = normalise(e + ε_l), ε_l ~ N(0, σ² I)    (B, L, E)   L independent draws
    inference  A = last-layer attention of the image encoder (head-averaged); a = the global token's
               attention over the patches (CLIP: the cls row A[0, 1:]; CoCa: the attentional pooler's
               contrastive query); top-k patches by a; subregion_i = normalise(Σ_j A[i, j] · P(v_j)),
               P = projection into the contrastive space; memory_i = normalise(normalise(g + w · subregion_i) + ε_i)
Both give the adaptor a (B, L or k, E) memory of unit vectors around the caption / image embedding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def inject_noise(e: Tensor, variance: float, copies: int, generator: torch.Generator | None = None,
                 normalize: bool = True) -> Tensor:
    """(B, E) -> (B, copies, E): each copy ``normalise(e + N(0, variance I))`` with its own draw (drawn on
    the CPU from ``generator``, so it is reproducible on any device); ``normalize=False`` skips the
    re-normalisation."""
    x = e[:, None].expand(-1, copies, -1)
    if variance > 0:
        noise = torch.randn(x.shape, generator=generator, device="cpu", dtype=torch.float32)
        x = x + noise.to(x.device, x.dtype) * variance ** 0.5
    return F.normalize(x, dim=-1) if normalize else x


def subregion_features(dense: Tensor, attn: Tensor, k: int,
                       global_attn: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """dense (B, N, E) projected patch tokens, attn (B, 1+N, 1+N) head-averaged last-layer attention ->
    (features (B, k, E) unit-norm, top (B, k) patch indices).

    The top-k patches are those the global token attends to most: ``global_attn`` (B, N) when given (a
    pooled model's contrastive query, ``ContrastiveCaptioner.global_attention``), else the cls row of
    ``attn``; subregion i is the pool of all patches weighted by patch i's own attention row over the
    patches (renormalised)."""
    N = dense.shape[1]
    k = min(k, N)
    row = attn[:, 0, 1:] if global_attn is None else global_attn          # (B, N)
    if row.shape != dense.shape[:2]:
        raise ValueError(f"global attention {tuple(row.shape)} does not match the patches {tuple(dense.shape[:2])}")
    top = row.topk(k, dim=1).indices                                       # (B, k)
    rows = attn[:, 1:, 1:]                                                 # (B, N, N) patch -> patch
    w = rows.gather(1, top[..., None].expand(-1, -1, N))                  # (B, k, N)
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    return F.normalize(w @ dense, dim=-1), top                            # (B, k, E)


def aggregate(global_embed: Tensor, subregions: Tensor, weight: float) -> Tensor:
    """(B, E) global + (B, k, E) subregions -> (B, k, E): ``normalise(g + weight · s_i)``."""
    return F.normalize(global_embed[:, None] + weight * subregions, dim=-1)


def rerank(image_embed: Tensor, caption_embeds: Tensor) -> Tensor:
    """image_embed (B, E), caption_embeds (B, N, E) (unit-norm) -> (B,) index of the candidate with the
    highest cosine similarity to its image."""
    return torch.einsum("be,bne->bn", image_embed.float(), caption_embeds.float()).argmax(1)
