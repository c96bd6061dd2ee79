"""ContrastiveCaptioner: CLIP and CoCa as one model.

    images -> ViT -> cls (B, Dv), patches (B, N, Dv)
        image_pool == "cls":  embed = proj(cls)                        (CLIP)
        image_pool == "attn": pooler(patches) -> [q0 | q1..qQ]         (CoCa)
                              embed = proj(q0), memory = q1..qQ (B, Q, Dt)
        (with a decoder and cls pooling, a separate pooler with Q queries gives the memory)
    text -> causal TextEncoder -> pooled cls (B, Dt) -> proj -> embed; tokens (B, T, Dt)
    decoder_layers > 0: MultimodalDecoder(tokens, memory) -> caption logits (B, T, V)

No losses here: ``forward`` returns ``Features`` for the objectives.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..config import ModelConfig
from ..types import Batch, Features
from .decoder import MultimodalDecoder
from .heads import AttentionalPooler
from .layers import init_weights
from .text import TextEncoder
from .vision import VisionTransformer

MAX_LOGIT_SCALE = 100.0


class ContrastiveCaptioner(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        if cfg.image_pool not in ("attn", "cls"):
            raise ValueError(f"model.image_pool must be 'attn' or 'cls', got {cfg.image_pool!r}")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.image_pool = cfg.image_pool
        self.has_decoder = cfg.decoder_layers > 0
        Dv, Dt, E = cfg.vision_width, cfg.text_width, cfg.embed_dim

        self.visual = VisionTransformer(cfg)
        self.text = TextEncoder(cfg, vocab_size)
        self.pooler = None  # attentional pooler over the patches (CoCa embedding and/or decoder memory)
        if cfg.image_pool == "attn":
            n_q = 1 + (cfg.caption_queries if self.has_decoder else 0)
            self.pooler = AttentionalPooler(Dt, Dv, n_q, cfg.text_heads)
        elif self.has_decoder:
            self.pooler = AttentionalPooler(Dt, Dv, cfg.caption_queries, cfg.text_heads)
        self.image_proj = nn.Linear(Dt if cfg.image_pool == "attn" else Dv, E, bias=False)
        self.text_proj = nn.Linear(Dt, E, bias=False)
        self.decoder = MultimodalDecoder(cfg, vocab_size) if self.has_decoder else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

        self.apply(init_weights)

    # ------------------------------------------------------------------ encoders

    def get_logit_scale(self) -> Tensor:
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def encode_image(self, images: Tensor, return_attn: bool = False) -> dict[str, Tensor | None]:
        """images (B, 3, H, W) -> embed (B, E) unit-norm, cls (B, Dv), patches (B, N, Dv),
        memory (B, Q, Dt) or None; with return_attn also attn (B, N): last-block cls->patch attention."""
        out = self.visual(images, return_attn=return_attn)
        cls, patches = out[0], out[1]
        memory = None
        if self.image_pool == "attn":
            pooled = self.pooler(patches)                                   # (B, 1[+Q], Dt)
            img = pooled[:, 0]                                              # (B, Dt)
            memory = pooled[:, 1:] if self.has_decoder else None            # (B, Q, Dt)
        else:
            img = cls                                                       # (B, Dv)
            memory = self.pooler(patches) if self.has_decoder else None     # (B, Q, Dt)
        res = {"embed": F.normalize(self.image_proj(img), dim=-1), "cls": cls, "patches": patches,
               "memory": memory}
        if return_attn:
            res["attn"] = out[2]
        return res

    def encode_text(self, text: Tensor, text_mask: Tensor | None = None) -> dict[str, Tensor]:
        """text (B, T) long, text_mask (B, T) bool -> embed (B, E) unit-norm, tokens (B, T, Dt)."""
        pooled, tokens = self.text(text, text_mask)
        return {"embed": F.normalize(self.text_proj(pooled), dim=-1), "tokens": tokens}

    def caption_logits(self, memory: Tensor, text_tokens: Tensor) -> Tensor:
        """memory (B, Q, Dt), unimodal text_tokens (B, T, Dt) -> next-token logits (B, T, V)."""
        if self.decoder is None:
            raise RuntimeError("this model has no caption decoder (model.decoder_layers = 0)")
        return self.decoder(text_tokens, memory)

    def forward(self, batch: Batch) -> Features:
        img = self.encode_image(batch.images)
        txt = self.encode_text(batch.text, batch.text_mask)
        logits = self.caption_logits(img["memory"], txt["tokens"]) if self.has_decoder else None
        return Features(image_embed=img["embed"], text_embed=txt["embed"], logit_scale=self.get_logit_scale(),
                        image_tokens=img["patches"], text_tokens=txt["tokens"], caption_logits=logits)

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
