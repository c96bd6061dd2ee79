"""ContrastiveCaptioner: CLIP and CoCa as one model.

    images -> ViT -> cls (B, Dv), patches (B, N, Dv)
        image_pool == "cls":  embed = proj(cls)                        (CLIP)
        image_pool == "attn": pooler(patches) -> [q0 | q1..qQ]         (CoCa)
                              embed = proj(q0), memory = q1..qQ (B, Q, Dt)
        (with a decoder and cls pooling, a separate pooler with Q queries gives the memory)
    text -> causal TextEncoder -> pooled cls (B, Dt) -> proj -> embed; tokens (B, T, Dt)
        (model.text_tower == "hf": a Hugging Face encoder from model.text_path, finealign/interop/hf_text.py)
    decoder_layers > 0: MultimodalDecoder(tokens, memory) -> caption logits (B, T, V)
    mim_decoder_layers > 0: ViT over the visible patches -> ImageDecoder(+ text) -> masked patches' pixels

Training runs in two stages so that maskers can sit between them (see finealign/pipeline.py):
``encode(batch)`` -> Features (embeddings, patch and text tokens); maskers choose patches (e.g. from
``patch_text_relevance``); ``heads(feats, batch, masks)`` adds caption logits (over the patches the "ic"
mask keeps) and MIM predictions (for the patches the "mim" mask hides). ``forward`` = both, no masks.
No losses here: objectives read the ``Features``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..config import ModelConfig
from ..masking.base import gather_tokens
from ..types import Batch, Features
from .decoder import MultimodalDecoder
from .heads import AttentionalPooler
from .image_decoder import build_image_decoder
from .layers import init_weights
from .pta import PTAHead, pta_block_index
from .text import TextEncoder
from .vision import VisionTransformer

MAX_LOGIT_SCALE = 100.0


class ContrastiveCaptioner(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, pretrained: bool = True):
        """``pretrained`` (hf text tower only): load its weights from model.text_path; False builds it from
        model.text_hf_config with random weights (a checkpoint's weights are loaded next)."""
        super().__init__()
        if cfg.image_pool not in ("attn", "cls"):
            raise ValueError(f"model.image_pool must be 'attn' or 'cls', got {cfg.image_pool!r}")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.image_pool = cfg.image_pool
        self.has_decoder = cfg.decoder_layers > 0
        Dv, Dt, E = cfg.vision_width, cfg.text_width, cfg.embed_dim

        self.visual = VisionTransformer(cfg)
        hf_text = None
        if cfg.text_tower == "hf":
            from ..interop.hf_text import HFTextTower
            hf_text = HFTextTower(cfg, pretrained=pretrained)
            Dt = hf_text.width
        self.text = hf_text if hf_text is not None else TextEncoder(cfg, vocab_size)
        self.pooler = None  # attentional pooler over the patches (CoCa embedding and/or decoder memory)
        if cfg.image_pool == "attn":
            n_q = 1 + (cfg.caption_queries if self.has_decoder else 0)
            self.pooler = AttentionalPooler(Dt, Dv, n_q, cfg.text_heads)
        elif self.has_decoder:
            self.pooler = AttentionalPooler(Dt, Dv, cfg.caption_queries, cfg.text_heads)
        self.image_proj = nn.Linear(Dt if cfg.image_pool == "attn" else Dv, E, bias=False)
        self.text_proj = nn.Linear(Dt, E, bias=False)
        self.decoder = MultimodalDecoder(cfg, vocab_size) if self.has_decoder else None
        self.image_decoder = None
        if cfg.mim_decoder_layers > 0:
            self.image_decoder = build_image_decoder(cfg, self.visual.num_patches,
                                                     patch_dim=3 * cfg.patch_size ** 2, text_width=Dt)
        self.pta_head = PTAHead(Dv, Dt, cfg.pta_width or Dv) if cfg.pta else None
        self.pta_index = pta_block_index(cfg.vision_layers, cfg.pta_block) if cfg.pta else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

        if hf_text is None:
            self.apply(init_weights)
        else:                           # the pretrained text tower keeps its weights
            for child in self.children():
                if child is not hf_text:
                    child.apply(init_weights)

    # ------------------------------------------------------------------ encoders

    @property
    def embed_dim(self) -> int:
        """Width of the contrastive space (``embed`` of encode_image / encode_text), as FusionModel has."""
        return self.cfg.embed_dim

    def get_logit_scale(self) -> Tensor:
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def encode_image(self, images: Tensor, return_attn: bool = False, memory: bool = True,
                     hidden_at: int | None = None) -> dict[str, Tensor | None]:
        """images (B, 3, H, W) -> embed (B, E) unit-norm, cls (B, Dv), patches (B, N, Dv),
        memory (B, Q, Dt) or None (caption memory over all patches; skipped with memory=False);
        with return_attn also attn (B, N): last-block cls->patch attention; with hidden_at also
        hidden (B, N, Dv): the patch tokens after that vision block."""
        out = self.visual(images, return_attn=return_attn, hidden_at=hidden_at)
        cls, patches = out[0], out[1]
        res = {"embed": self.global_embed(cls, patches), "cls": cls, "patches": patches,
               "memory": self.caption_memory(patches) if memory and self.has_decoder else None}
        if return_attn:
            res["attn"] = out[2]
        if hidden_at is not None:
            res["hidden"] = out[2]
        return res

    def global_embed(self, cls: Tensor, patches: Tensor) -> Tensor:
        """The contrastive image embedding (B, E), unit-norm, from the ViT outputs: the attentional
        pooler's contrastive query (CoCa) or the cls token (CLIP), projected."""
        if self.image_pool == "attn":
            img = self.pooler(patches, queries=slice(0, 1))[:, 0]           # (B, Dt) contrastive query
        else:
            img = cls                                                       # (B, Dv)
        return F.normalize(self.image_proj(img), dim=-1)

    @torch.no_grad()
    def global_attention(self, patches: Tensor, attn: Tensor) -> Tensor:
        """How much the token behind ``global_embed`` attends to each patch (B, N), head-averaged: the
        attentional pooler's contrastive query (CoCa; the ViT's cls output is not trained there) or the
        cls row of the ViT's last-layer attention ``attn`` (B, 1+N, 1+N) (CLIP)."""
        if self.image_pool == "attn":
            return self.pooler.query_attention(patches, 0)
        return attn[:, 0, 1:]

    def caption_memory(self, patches: Tensor) -> Tensor:
        """Patch tokens (B, K, Dv) (all, or the ones a mask keeps) -> decoder memory (B, Q, Dt)."""
        return self.pooler(patches, queries=slice(1, None) if self.image_pool == "attn" else slice(None))

    def dense_image_embed(self, patches: Tensor) -> Tensor:
        """Per-patch embeddings (B, N, E), unit-norm, in the contrastive space."""
        x = self.pooler.dense(patches) if self.image_pool == "attn" else patches
        return F.normalize(self.image_proj(x), dim=-1)

    @torch.no_grad()
    def patch_text_relevance(self, patches: Tensor, text_tokens: Tensor, text_mask: Tensor,
                             reduce: str = "max") -> Tensor:
        """Cosine relevance of each patch to the caption's real tokens, no gradient: (B, N)."""
        from ..masking.attentive import patch_text_relevance
        tok = F.normalize(self.text_proj(text_tokens), dim=-1)             # (B, T, E)
        return patch_text_relevance(self.dense_image_embed(patches), tok, text_mask, reduce)

    def encode_text(self, text: Tensor, text_mask: Tensor | None = None) -> dict[str, Tensor]:
        """text (B, T) long, text_mask (B, T) bool -> embed (B, E) unit-norm, tokens (B, T, Dt),
        pooled (B, Dt)."""
        pooled, tokens = self.text(text, text_mask)
        return {"embed": F.normalize(self.text_proj(pooled), dim=-1), "tokens": tokens, "pooled": pooled}

    def caption_logits(self, memory: Tensor, text_tokens: Tensor) -> Tensor:
        """memory (B, Q, Dt), unimodal text_tokens (B, T, Dt) -> next-token logits (B, T, V)."""
        if self.decoder is None:
            raise RuntimeError("this model has no caption decoder (model.decoder_layers = 0)")
        return self.decoder(text_tokens, memory)

    def encode(self, batch: Batch) -> Features:
        """Stage 1: both towers over the whole batch (no head that a mask could change)."""
        img = self.encode_image(batch.images, memory=False, hidden_at=self.pta_index)
        txt = self.encode_text(batch.text, batch.text_mask)
        extras = {}
        if self.pta_head is not None:                   # TiMix: (B, N, 2) log p(patch belongs to the text)
            extras["pta_logp"] = self.pta_head(img["hidden"], txt["pooled"])
        return Features(image_embed=img["embed"], text_embed=txt["embed"], logit_scale=self.get_logit_scale(),
                        image_tokens=img["patches"], text_tokens=txt["tokens"], extras=extras)

    def heads(self, feats: Features, batch: Batch, masks: dict | None = None, needs: set | None = None
              ) -> Features:
        """Stage 2: caption logits (patches kept by masks["ic"], else all) and MIM predictions for the
        patches hidden by masks["mim"]. A mask has ``keep`` (B, K) and ``masked`` (B, M) indices.
        ``needs``: the features the active objectives read; a head none of them reads is skipped (None = all),
        so e.g. ``objectives.tg_mim.weight=0`` also saves the second ViT pass and the image decoder."""
        masks = masks or {}
        if self.has_decoder and (needs is None or "caption_logits" in needs):
            patches = feats.image_tokens
            if masks.get("ic") is not None:
                keep = masks["ic"].keep
                patches = gather_tokens(patches, keep)                                  # (B, K, Dv)
            feats.caption_logits = self.caption_logits(self.caption_memory(patches), feats.text_tokens)
        if self.image_decoder is not None and (needs is None or "mim_pred" in needs):
            mim = masks.get("mim")
            if mim is None:
                raise ValueError("the image decoder needs masks['mim'] (configure masking.mim)")
            if self.cfg.mim_visible == "shared":                                     # first pass's tokens
                visible = gather_tokens(feats.image_tokens, mim.keep)                # (B, K, Dv)
            else:                                                                     # masked patches unseen
                _, visible = self.visual(batch.images, keep=mim.keep)                # (B, K, Dv)
            text = feats.text_tokens if self.cfg.mim_text else None
            feats.extras["mim_pred"] = self.image_decoder(visible, mim.keep, mim.masked, text,
                                                          batch.text_mask if text is not None else None)
            feats.extras["mim_masked"] = mim.masked
        return feats

    def forward(self, batch: Batch, masks: dict | None = None) -> Features:
        return self.heads(self.encode(batch), batch, masks)

    # ------------------------------------------------------------------ captioning

    @torch.no_grad()
    def generate(self, images: Tensor, bos_id: int, eos_id: int, pad_id: int, strategy: str = "greedy",
                 max_new_tokens: int = 20, beam_size: int = 3, top_p: float = 0.9, temperature: float = 1.0,
                 use_cache: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """Caption images: (B, 3, H, W) -> token ids (B, L) starting with BOS; PAD after each EOS."""
        from .generation import generate
        return generate(self, images, bos_id, eos_id, pad_id, strategy=strategy, max_new_tokens=max_new_tokens,
                        beam_size=beam_size, top_p=top_p, temperature=temperature, use_cache=use_cache,
                        generator=generator)
