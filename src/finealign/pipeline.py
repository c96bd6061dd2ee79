"""One training forward: ``model.encode`` -> maskers -> ``model.heads``.

The maskers sit between the model's two stages (ARCHITECTURE: Batch -> encode -> maskers -> heads ->
objectives). Attentive maskers read the model's own patch-text relevance, computed without gradient
from the encoded batch; random maskers draw from the global torch RNG, which checkpoints restore.
The synchronized masker (``masking.sync``, fusion models) reads the teacher's text->patch
cross-attention and produces the MLM words and the MIM patches together; it replaces ``masking.mlm``
and ``masking.mim``.

Mixing (``mixer``, TiMix and its baselines) happens in ``encode``: after ``model.encode`` the mixer
builds mixed images from the batch (TiMix scores patches with the PTA head's z-scored log-probability
where the batch has regions and the model a PTA head, else with the patch-text relevance; the first
fallback is logged) and the image tower encodes them: ``extras["mixed_image_embed"]`` (B, E),
``"mix_lambda"`` (B,), ``"mix_offset"`` (B,) = source row - row. The mixer's draws come from a
``random.Random`` seeded by (train.seed, step, micro-batch), so the no-grad pre-pass of gradient
accumulation and a resumed run mix exactly alike. After ``stop · total_steps`` steps nothing is mixed.
"""
from __future__ import annotations

import logging
import random

import torch

from .config import MaskingConfig, MixerConfig
from .masking import build_masker
from .types import Batch, Features

log = logging.getLogger("finealign")

ROLES = ("ic", "mim")


class Pipeline:
    """``needs``: the features the active objectives read (heads of switched-off objectives are skipped);
    ``tokenizer``: needed for word masking (``masking.mlm``)."""

    def __init__(self, model: torch.nn.Module, masking: MaskingConfig | None = None, tokenizer=None,
                 needs: set[str] | None = None, mixer: MixerConfig | None = None, total_steps: int = 1,
                 seed: int = 0):
        self.model = model
        from .mixing import build_mixer
        self.mix_cfg = mixer or MixerConfig()
        self.mixer = build_mixer(self.mix_cfg, model.cfg.patch_size) if self.mix_cfg.type else None
        self.mix_until = int(round(self.mix_cfg.stop * total_steps))
        self.seed = int(seed)
        self.fallback_logged = False
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

    def mixing(self, step: int) -> bool:
        return self.mixer is not None and step < self.mix_until

    def encode(self, batch: Batch, step: int = 0, micro: int = 0) -> Features:
        """``model.encode`` plus, while mixing is on, the mixed images' embeddings (see the module doc)."""
        feats = self.model.encode(batch)
        if self.mixing(step):
            from .data.sources.common import sample_seed
            rnd = random.Random(sample_seed(self.seed, step, micro))
            scores = self.mix_scores(feats, batch) if self.mixer.needs_scores else None
            mix = self.mixer(batch.images, scores, rnd)
            feats.extras["mixed_image_embed"] = self.model.encode_image(mix.images, memory=False)["embed"]
            feats.extras["mix_lambda"] = mix.lam                                        # (B,)
            feats.extras["mix_offset"] = mix.source - torch.arange(len(batch), device=mix.source.device)
        return feats

    @torch.no_grad()
    def mix_scores(self, feats: Features, batch: Batch) -> torch.Tensor:
        """TiMix patch scores (B, N), z-scored per image: the PTA head's log p(patch belongs to the text)
        or, without region data / PTA head (or with ``mixer.scores: relevance``), the patch-text relevance."""
        from .mixing import zscore
        regions = batch.extras.get("regions") or []
        use_pta = "pta_logp" in feats.extras and self.mix_cfg.scores != "relevance" and (
            self.mix_cfg.scores == "pta" or any(regions))
        feats.extras["mix_by_pta"] = torch.tensor(float(use_pta))
        if use_pta:
            return zscore(feats.extras["pta_logp"][..., 1])
        if not self.fallback_logged:
            why = "the batch has no region boxes" if "pta_logp" in feats.extras else "the model has no PTA head"
            log.warning("mixer %s: %s, so patches are scored by their patch-text relevance (masking.relevance=%s)",
                        self.mix_cfg.type, why, self.relevance_reduce)
            self.fallback_logged = True
        return zscore(self.relevance(feats, batch))

    def relevance(self, feats: Features, batch: Batch) -> torch.Tensor:
        """The model's patch-text relevance of the encoded batch, (B, N), no gradient."""
        if self.relevance_reduce == "attention":     # (teacher's) fusion text->patch attention, over words
            return self.model.cross_attention(feats, batch).sum(1)
        return self.model.patch_text_relevance(feats.image_tokens, feats.text_tokens, batch.text_mask,
                                                self.relevance_reduce)

    def __call__(self, batch: Batch, step: int = 0, micro: int = 0) -> Features:
        feats = self.encode(batch, step, micro)
        words = self._sync_masks(feats, batch) if self.sync is not None else self._word_masks(batch)
        if not self.maskers:
            return self.model.heads(feats, batch, words, needs=self.needs)
        patches = feats.image_tokens                                            # (B, N, Dv)
        if self.needs_relevance:
            rel = self.relevance(feats, batch)                                  # (B, N), no grad
        else:
            rel = torch.zeros(patches.shape[:2], device=patches.device)
        masks = {role: m(rel) for role, m in self.maskers.items()}
        feats.extras["relevance"] = rel
        return self.model.heads(feats, batch, {**masks, **words}, needs=self.needs)
