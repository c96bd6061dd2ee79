"""Synchronized attentional masking (SyncMask): words and patches masked together from cross-attention.

Input: a text -> patch cross-attention map ``attn`` (B, T, N) (the momentum teacher's fusion encoder, one
layer, averaged over heads; the cls column already removed), the text and which of its tokens may be
masked. With ``M`` the number of patches to mask (``patches`` ratio of N, as for every patch masker):

1. word score ``s_j`` = attention mass word j puts on its ``M`` most attended patches
   (sum of the M largest entries of row j; with ``patches=0``, its single most attended one);
2. the top ``words`` ratio of the maskable words by ``s_j`` are masked (``select_words``);
3. patch score ``p_i`` = attention the selected words put on patch i (sum over the selected rows);
   the ``M`` highest-scoring patches are masked.

So the masked words are those most grounded in the image, and the masked patches are where those words
look: a masked word cannot be read off the (hidden) patches it describes, nor a masked patch off the
(hidden) word, and MLM / MIM must use the rest of both modalities.

    masker = SynchronizedMasker(words=0.15, patches=0.25)
    positions, idx = masker(attn, text_mask, special)   # (M_w, 2) (row, column); MaskIndices over N patches

Deterministic (ties: lower index first). A row without maskable words masks no word and falls back to
the patches with the most attention from all real tokens.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import MaskIndices, num_to_mask, split_by_score
from .text import select_words


class SynchronizedMasker:
    def __init__(self, words: float = 0.15, patches: float = 0.25, layer: int = -1):
        words, patches = float(words), float(patches)
        if not 0.0 <= words < 1.0 or not 0.0 <= patches < 1.0:
            raise ValueError(f"synchronized masking ratios must be in [0, 1), got words={words}, patches={patches}")
        self.words, self.patches, self.layer = words, patches, int(layer)

    def num_masked(self, N: int) -> int:
        return num_to_mask(N, self.patches)

    @torch.no_grad()
    def __call__(self, attn: Tensor, text_mask: Tensor, special: Tensor) -> tuple[Tensor, MaskIndices]:
        """attn (B, T, N) text->patch attention; text_mask (B, T) bool, True on real tokens; special (B, T)
        bool, True on tokens never to mask. Returns (word positions (M_w, 2) long, row-major; MaskIndices)."""
        if attn.dim() != 3 or attn.shape[:2] != text_mask.shape or special.shape != text_mask.shape:
            raise ValueError(f"attn (B, T, N) must match text_mask / special (B, T); got {tuple(attn.shape)}, "
                             f"{tuple(text_mask.shape)}, {tuple(special.shape)}")
        B, T, N = attn.shape
        a = attn.detach().float() * text_mask.to(attn.device, torch.float32)[..., None]   # PAD rows -> 0
        M = self.num_masked(N)
        k = max(M, 1)
        word_score = a.topk(min(k, N), dim=-1).values.sum(-1)                            # (B, T)
        positions = select_words(word_score, text_mask, special, self.words)             # (M_w, 2)
        chosen = torch.zeros(B, T, dtype=a.dtype, device=a.device)
        chosen[positions[:, 0], positions[:, 1]] = 1.0
        # rows with no selected word: use every real token's attention instead
        none = chosen.sum(1) == 0                                                        # (B,)
        chosen = torch.where(none[:, None], text_mask.to(a.device, a.dtype), chosen)
        patch_score = (chosen[..., None] * a).sum(1)                                     # (B, N)
        return positions, split_by_score(patch_score, M)

    def __repr__(self) -> str:
        return f"SynchronizedMasker(words={self.words}, patches={self.patches}, layer={self.layer})"
