"""ALBEF-style multimodal (fusion) encoder and its ITM / MLM heads.

    text tokens (B, T, Dt) from the unimodal text encoder, text_mask (B, T) bool (True on real tokens)
    image tokens (B, N, Dv) from the image encoder (patches, optionally with the cls in front),
    image_mask (B, N) bool (True = may be attended; None = all)
    each of ``layers`` pre-LN blocks (``layers.Block`` with a cross-attention key mask):
        x = x + SelfAttn(LN x)              bidirectional, PAD keys never attended
        x = x + CrossAttn(LN x, LN image)   text queries -> image keys, masked patches never attended
        x = x + MLP(LN x)
    LayerNorm -> tokens (B, T, Dt); cls = tokens[:, 0] (the BOS position plays BERT's [CLS])

Token outputs at real positions depend neither on the PAD positions' features nor on the masked patches'
features. Cross-attention maps (text -> patches, head-averaged) are computed with an explicit softmax only
for the layers asked for (everything else runs through SDPA); they are the weights actually used.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .layers import Block, KVCache, init_weights, run_block


class FusionEncoder(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, image_width: int, mlp_ratio: float = 4.0,
                 grad_checkpointing: bool = False):
        super().__init__()
        self.width = width
        self.grad_checkpointing = grad_checkpointing
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio, cross_dim=image_width) for _ in range(layers)])
        self.ln_final = nn.LayerNorm(width)
        self.apply(init_weights)

    def _layer_indices(self, attn_layers: Sequence[int]) -> list[int]:
        L = len(self.blocks)
        out = []
        for i in attn_layers:
            if not -L <= int(i) < L:
                raise IndexError(f"attention layer {i} out of range for a {L}-layer fusion encoder")
            out.append(int(i) % L)
        return out

    def forward(self, text_tokens: Tensor, text_mask: Tensor, image_tokens: Tensor,
                image_mask: Tensor | None = None, return_attn: bool = False,
                attn_layers: Sequence[int] | None = None, image_index: Tensor | None = None
                ) -> dict[str, Tensor | list[Tensor]]:
        """text_tokens (B, T, Dt), text_mask (B, T) bool True on real tokens, image_tokens (B, N, Dv),
        image_mask (B, N) bool True = may be attended (None = all).

        ``image_index`` (B,) long: row b attends to image ``image_index[b]`` of image_tokens (Bi, N, Dv)
        (image_mask then (Bi, N) too), the same as passing ``image_tokens[image_index]``, but each image's
        cross-attention keys and values are projected once per layer and gathered (ITM's positive and
        negative rows share images; reranking pairs one image with many captions).

        Returns {"tokens": (B, T, Dt), "cls": (B, Dt) = tokens[:, 0], "attn": [(B, T, N), ...]}.
        ``attn`` holds one cross-attention map (text -> image tokens, averaged over heads) per layer in
        ``attn_layers`` (in that order; negative indices count from the end), or per layer when only
        ``return_attn`` is set; it is empty when neither is given. Real-token rows sum to 1 over the
        attended image tokens (0 on masked ones); PAD rows, and rows of samples with no visible patch, are 0.
        """
        B, T, _ = text_tokens.shape
        if image_index is not None:
            image_index = image_index.to(device=image_tokens.device, dtype=torch.long)
            if image_index.shape != (B,):
                raise ValueError(f"image_index must be ({B},) for {B} text rows, got {tuple(image_index.shape)}")
            if image_mask is not None:
                image_mask = image_mask[image_index]                          # (B, N)
        real = text_mask.to(torch.bool)                                      # (B, T)
        # a sample without any real token would softmax over nothing (NaN): let its rows see everything
        self_mask = (real | ~real.any(dim=1, keepdim=True))[:, None, None, :]  # (B, 1, 1, T)
        cross_mask = cross_gate = None
        if image_mask is not None:
            vis = image_mask.to(torch.bool)                                   # (B, N)
            has = vis.any(dim=1)                                              # (B,)
            cross_mask = (vis | ~has[:, None])[:, None, None, :]             # (B, 1, 1, N)
            cross_gate = has[:, None, None].to(text_tokens.dtype)            # (B, 1, 1), 0 = no visible patch

        if attn_layers is not None:
            want = self._layer_indices(attn_layers)
        else:
            want = list(range(len(self.blocks))) if return_attn else []
        want_set = set(want)

        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        if ckpt and image_index is not None:
            # keys/values projected outside the checkpointed blocks would be kept for backward: gather the
            # images instead, so that checkpointing keeps its memory profile
            image_tokens, image_index = image_tokens[image_index], None
        x = text_tokens
        maps: dict[int, Tensor] = {}
        for i, blk in enumerate(self.blocks):
            kw = dict(context=image_tokens, mask=self_mask, cross_mask=cross_mask, cross_gate=cross_gate)
            if image_index is not None:                                      # keys/values once per image
                k, v = blk.cross_attn.project_memory(blk.ln_kv(image_tokens), image_index)  # (B, H, N, Dh)
                kw["cross_cache"] = KVCache()
                kw["cross_cache"].set(k, v)
            if i in want_set:
                x, w = run_block(blk, x, ckpt, need_cross_weights=True, **kw)  # w: (B, H, T, N)
                a = w.mean(dim=1) * real[..., None].to(w.dtype)              # (B, T, N), PAD rows 0
                if cross_gate is not None:
                    a = a * cross_gate                                       # no visible patch: nothing used
                maps[i] = a
            else:
                x = run_block(blk, x, ckpt, **kw)                            # (B, T, D)
        x = self.ln_final(x)                                                 # (B, T, D)
        return {"tokens": x, "cls": x[:, 0], "attn": [maps[i] for i in want]}


class ITMHead(nn.Module):
    """Image-text matching: fusion cls (..., D) -> 2 logits (..., 2); index 1 = "matched" (ALBEF)."""

    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, 2)
        self.apply(init_weights)

    def forward(self, cls: Tensor) -> Tensor:
        return self.fc(cls)


class MLMHead(nn.Module):
    """BERT's prediction head: dense -> GELU -> LayerNorm -> decoder Linear (..., D) -> (..., V).

    Works on any leading shape, so callers can gather the masked positions first ((M, D) -> (M, V))
    instead of computing logits for every token. ``tie_to(embedding)`` shares the decoder weight with
    the text encoder's token embedding (BERT-style tying; the decoder bias stays separate)."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.ln = nn.LayerNorm(width)
        self.decoder = nn.Linear(width, vocab_size)
        self.apply(init_weights)

    def tie_to(self, embedding: nn.Embedding) -> "MLMHead":
        if tuple(embedding.weight.shape) != tuple(self.decoder.weight.shape):
            raise ValueError(f"embedding {tuple(embedding.weight.shape)} does not fit the MLM decoder "
                             f"{tuple(self.decoder.weight.shape)}")
        self.decoder.weight = embedding.weight
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.ln(F.gelu(self.dense(x))))
