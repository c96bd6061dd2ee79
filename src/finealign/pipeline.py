"""One training forward: ``model.encode`` -> maskers -> ``model.heads``.

The maskers sit between the model's two stages (ARCHITECTURE: Batch -> encode -> maskers -> heads ->
objectives). Attentive maskers read the model's own patch-text relevance, computed without gradient
from the encoded batch; random maskers draw from the global torch RNG, which checkpoints restore.
The synchronized masker (``masking.sync``, fusion models) reads the teacher's text->patch
cross-attention and produces the MLM words and the MIM patches together; it replaces ``masking.mlm``
and ``masking.mim``.
"""
from __future__ import annotations

import torch

from .config import MaskingConfig
from .masking import build_masker
from .types import Batch, Features

ROLES = ("ic", "mim")


class Pipeline:
    """``needs``: the features the active objectives read (heads of switched-off objectives are skipped);
    ``tokenizer``: needed for word masking (``masking.mlm``)."""

    def __init__(self, model: torch.nn.Module, masking: MaskingConfig | None = None, tokenizer=None,
                 needs: set[str] | None = None):
        self.model = model
        masking = masking or MaskingConfig()
        self.relevance_reduce = masking.relevance
        self.maskers = {role: build_masker(getattr(masking, role)) for role in ROLES if getattr(masking, role)}
        self.needs_relevance = any(getattr(m, "uses_relevance", True) for m in self.maskers.values())
        self.needs = needs
        self.mlm = dict(masking.mlm)
        self.sync = None
        if masking.sync:
            from .masking.sync import SynchronizedMasker
            self.sync = SynchronizedMasker(**masking.sync)
            self.maskers.pop("mim", None)
            self.mlm = {}
        if (self.mlm or self.sync) and tokenizer is None:
            raise ValueError("word masking (masking.mlm / masking.sync) needs the tokenizer (mask id, special ids)")
        self.tokenizer = tokenizer

    def _word_masks(self, batch: Batch) -> dict:
        if not self.mlm:
            return {}
        from .masking.text import mask_tokens
        tok = self.tokenizer
        return {"mlm": mask_tokens(batch.text, batch.text_mask, prob=float(self.mlm.get("prob", 0.15)),
                                   mask_id=tok.mask_id, vocab_size=tok.vocab_size, special_ids=tok.special_ids)}

    def _sync_masks(self, feats: Features, batch: Batch) -> dict:
        from .masking.text import corrupt_tokens, special_positions
        tok = self.tokenizer
        attn = self.model.cross_attention(feats, batch, self.sync.layer)            # (B, T, N), no grad
        special = special_positions(batch.text, tok.special_ids)
        positions, patches = self.sync(attn, batch.text_mask.bool(), special)
        masked = corrupt_tokens(batch.text, positions, mask_id=tok.mask_id, vocab_size=tok.vocab_size,
                                special_ids=tok.special_ids)
        return {"mlm": (masked, positions), "mim": patches}

    def __call__(self, batch: Batch) -> Features:
        feats = self.model.encode(batch)
        words = self._sync_masks(feats, batch) if self.sync is not None else self._word_masks(batch)
        if not self.maskers:
            return self.model.heads(feats, batch, words, needs=self.needs)
        patches = feats.image_tokens                                            # (B, N, Dv)
        if self.needs_relevance:
            if self.relevance_reduce == "attention":     # (teacher's) fusion text->patch attention, over words
                rel = self.model.cross_attention(feats, batch).sum(1)             # (B, N), no grad
            else:
                rel = self.model.patch_text_relevance(patches, feats.text_tokens, batch.text_mask,
                                                      self.relevance_reduce)    # (B, N), no grad
        else:
            rel = torch.zeros(patches.shape[:2], device=patches.device)
        masks = {role: m(rel) for role, m in self.maskers.items()}
        feats.extras["relevance"] = rel
        return self.model.heads(feats, batch, {**masks, **words}, needs=self.needs)
