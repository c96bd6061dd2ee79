"""FusionModel: the ALBEF-style family (``model.arch: fusion``).

    images -> ViT -> cls (B, Dv), patches (B, N, Dv);   embed = proj(cls)
    text   -> bidirectional TextEncoder -> tokens (B, T, Dt);   embed = proj(tokens[:, 0])
    fusion: text tokens cross-attend to [cls | patches] -> fused tokens; ITM head on fused[:, 0],
            MLM head on fused tokens of the masked words

Two stages like every finealign model: ``encode(batch)`` (both towers) and ``heads(feats, batch,
masks, needs)``. ``needs`` is the set of features the active objectives read, so a head whose
objective is switched off (weight 0) costs nothing. Hard negatives for ITM follow ALBEF: for each
image a text drawn from softmax(similarity) excluding the positive and same-item samples, and for
each text an image likewise. No losses here.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..config import ModelConfig
from ..types import Batch, Features
from .fusion import FusionEncoder, ITMHead, MLMHead
from .layers import init_weights
from .text import TextEncoder
from .vision import VisionTransformer

MAX_LOGIT_SCALE = 100.0


class FusionModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        Dv, Dt, E = cfg.vision_width, cfg.text_width, cfg.embed_dim
        self.visual = VisionTransformer(cfg)
        self.text = TextEncoder(cfg, vocab_size)
        self.image_proj = nn.Linear(Dv, E, bias=False)
        self.text_proj = nn.Linear(Dt, E, bias=False)
        self.apply(init_weights)
        self.fusion = FusionEncoder(Dt, cfg.fusion_layers, cfg.text_heads, Dv, cfg.mlp_ratio,
                                    grad_checkpointing=cfg.grad_checkpointing)
        self.itm_head = ITMHead(Dt)
        self.mlm_head = MLMHead(Dt, vocab_size)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        self.teacher = None
        if cfg.momentum > 0:         # EMA copy of the unimodal towers: soft ITC targets (distillation)
            from .momentum import MomentumTeacher
            self.teacher = MomentumTeacher({"visual": self.visual, "text": self.text,
                                            "image_proj": self.image_proj, "text_proj": self.text_proj},
                                           cfg.momentum)
        self.decoder = None          # no caption decoder: eval skips captioning
        self.image_decoder = None
        self.has_decoder = False

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def get_logit_scale(self) -> Tensor:
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    # ------------------------------------------------------------------ encoders
    def encode_image(self, images: Tensor, **_) -> dict[str, Tensor | None]:
        cls, patches = self.visual(images)                                   # (B, Dv), (B, N, Dv)
        return {"embed": F.normalize(self.image_proj(cls), dim=-1), "cls": cls, "patches": patches,
                "memory": None}

    def encode_text(self, text: Tensor, text_mask: Tensor | None = None) -> dict[str, Tensor]:
        pooled, tokens = self.text(text, text_mask)
        return {"embed": F.normalize(self.text_proj(pooled), dim=-1), "tokens": tokens}

    def encode(self, batch: Batch) -> Features:
        img = self.encode_image(batch.images)
        txt = self.encode_text(batch.text, batch.text_mask)
        extras = {"image_cls": img["cls"]}
        if self.teacher is not None:
            t = self.teacher.module
            with torch.no_grad():
                extras["teacher_image_embed"] = F.normalize(t.image_proj(t.visual(batch.images)[0]), dim=-1)
                extras["teacher_text_embed"] = F.normalize(t.text_proj(t.text(batch.text, batch.text_mask)[0]),
                                                           dim=-1)
        return Features(image_embed=img["embed"], text_embed=txt["embed"], logit_scale=self.get_logit_scale(),
                        image_tokens=img["patches"], text_tokens=txt["tokens"], extras=extras)

    def momentum_update(self) -> None:
        """EMA step of the teacher (the trainer calls it after every optimizer step)."""
        if self.teacher is not None:
            self.teacher.update()

    def fuse(self, text_tokens: Tensor, text_mask: Tensor, image_cls: Tensor, patches: Tensor, **kw) -> dict:
        """Text (B, T, Dt) attends to [cls | patches] (B, 1+N, Dv) -> fusion outputs (see FusionEncoder)."""
        image = torch.cat([image_cls[:, None], patches], dim=1)             # (B, 1+N, Dv)
        return self.fusion(text_tokens, text_mask, image, **kw)

    # ------------------------------------------------------------------ heads
    def heads(self, feats: Features, batch: Batch, masks: dict | None = None, needs: set | None = None
              ) -> Features:
        masks = masks or {}
        needs = {"itm_logits", "mlm_logits"} if needs is None else needs
        cls, patches, mask = feats.extras["image_cls"], feats.image_tokens, batch.text_mask.bool()
        if "itm_logits" in needs:
            from ..objectives.itm import sample_hard_negatives
            with torch.no_grad():
                sim = feats.image_embed.float() @ feats.text_embed.float().t()      # (B, B)
                neg_txt, neg_img = sample_hard_negatives(sim * feats.logit_scale.float(), batch.item_ids)
            txt = torch.cat([feats.text_tokens, feats.text_tokens[neg_txt], feats.text_tokens])   # (3B, T, Dt)
            tmask = torch.cat([mask, mask[neg_txt], mask])
            icls = torch.cat([cls, cls, cls[neg_img]])                                     # (3B, Dv)
            ipat = torch.cat([patches, patches, patches[neg_img]])                         # (3B, N, Dv)
            fused = self.fuse(txt, tmask, icls, ipat)["cls"]                               # (3B, Dt)
            feats.extras["itm_logits"] = self.itm_head(fused)                              # (3B, 2)
            feats.extras["itm_num_pos"] = len(batch)
        if "mlm_logits" in needs:
            mlm = masks.get("mlm")
            if mlm is None:
                raise ValueError("MLM needs masked words: configure masking.mlm (e.g. {prob: 0.15})")
            masked_text, positions = mlm
            _, tokens = self.text(masked_text, mask)                                       # (B, T, Dt)
            fused = self.fuse(tokens, mask, cls, patches)["tokens"]                        # (B, T, Dt)
            feats.extras["mlm_logits"] = self.mlm_head(fused[positions[:, 0], positions[:, 1]])  # (M, V)
            feats.extras["mlm_positions"] = positions
        return feats

    def forward(self, batch: Batch, masks: dict | None = None) -> Features:
        return self.heads(self.encode(batch), batch, masks, needs=set())
