"""FusionModel: the ALBEF-style family (``model.arch: fusion``).

    images -> ViT -> cls (B, Dv), patches (B, N, Dv);   embed = proj(cls)
    text   -> bidirectional TextEncoder -> tokens (B, T, Dt);   embed = proj(tokens[:, 0])
    fusion: text tokens cross-attend to [cls | patches] -> fused tokens; ITM head on fused[:, 0],
            MLM head on fused tokens of the masked words
    MIM (mim_decoder_layers > 0): ViT over the visible patches -> fusion of the (masked) text with them
            -> ImageDecoder cross-attending to the fused text tokens -> pixels of the masked patches.
            model.masked_pass=joint: MLM and MIM share that one fused pass, so with masks["mim"] the MLM
            words are predicted from the masked image too (SyncMask: masked words and the patches they
            describe are hidden together); separate (SemMIM): MLM reads the whole image, and the decoder
            the clean caption fused with the masked image.
    SemMIM (prototypes > 0): a prototype head shared by global and patch tokens. mim_target=semantic:
            the decoder's outputs go through it (student logits at the masked patches) and the teacher
            gives its logits of the same patches from the whole image (text_fused_targets: after its own
            decoder blocks fused them with the teacher-fused text). Agreement: both views' cls tokens
            through the head, student and teacher (needs batch.images2).

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
from .image_decoder import build_image_decoder
from .prototypes import PrototypeHead
from .pta import PTAHead, pta_block_index
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
        self.image_decoder = None
        if cfg.mim_decoder_layers > 0:
            self.image_decoder = build_image_decoder(
                cfg, self.visual.num_patches, text_width=Dt,
                patch_dim=Dv if cfg.mim_target == "semantic" else 3 * cfg.patch_size ** 2)
        self.proto_head = PrototypeHead(Dv, cfg.prototypes, cfg.proto_dim) if cfg.prototypes > 0 else None
        self.pta_head = PTAHead(Dv, Dt, cfg.pta_width or Dv) if cfg.pta else None
        self.pta_index = pta_block_index(cfg.vision_layers, cfg.pta_block) if cfg.pta else None
        self.teacher = None
        self.queues = None
        if cfg.momentum > 0:         # EMA copy: soft ITC targets (distillation), attention maps for masking
            from .momentum import FeatureQueue, MomentumTeacher
            parts = {"visual": self.visual, "text": self.text, "fusion": self.fusion,
                     "image_proj": self.image_proj, "text_proj": self.text_proj}
            parts.update({k: m for k, m in (("image_decoder", self.image_decoder), ("proto_head", self.proto_head))
                          if m is not None})
            self.teacher = MomentumTeacher(parts, cfg.momentum)
            if cfg.queue_size > 0:   # the teacher's embeddings of past batches (ALBEF's image/text queues)
                self.queues = nn.ModuleDict({"image": FeatureQueue(E, cfg.queue_size),
                                             "text": FeatureQueue(E, cfg.queue_size)})
        self._pending: list[tuple[Tensor, Tensor]] = []   # this step's teacher embeddings, enqueued after it
        self.decoder = None          # no caption decoder: eval skips captioning
        self.has_decoder = False

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def get_logit_scale(self) -> Tensor:
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    # ------------------------------------------------------------------ encoders
    def encode_image(self, images: Tensor, hidden_at: int | None = None, **_) -> dict[str, Tensor | None]:
        out = self.visual(images, hidden_at=hidden_at)
        cls, patches = out[0], out[1]                                        # (B, Dv), (B, N, Dv)
        res = {"embed": F.normalize(self.image_proj(cls), dim=-1), "cls": cls, "patches": patches,
               "memory": None}
        if hidden_at is not None:
            res["hidden"] = out[2]                                           # (B, N, Dv) after that block
        return res

    def encode_text(self, text: Tensor, text_mask: Tensor | None = None) -> dict[str, Tensor]:
        pooled, tokens = self.text(text, text_mask)
        return {"embed": F.normalize(self.text_proj(pooled), dim=-1), "tokens": tokens, "pooled": pooled}

    def encode(self, batch: Batch) -> Features:
        img = self.encode_image(batch.images, hidden_at=self.pta_index)
        txt = self.encode_text(batch.text, batch.text_mask)
        extras = {"image_cls": img["cls"]}
        if self.pta_head is not None:                   # TiMix: (B, N, 2) log p(patch belongs to the text)
            extras["pta_logp"] = self.pta_head(img["hidden"], txt["pooled"])
        if self.teacher is not None:
            t = self.teacher.module
            with torch.no_grad():
                t_cls, t_patches = t.visual(batch.images)                          # (B, Dv), (B, N, Dv)
                t_pooled, t_tokens = t.text(batch.text, batch.text_mask)           # (B, Dt), (B, T, Dt)
                extras["teacher_image_embed"] = F.normalize(t.image_proj(t_cls), dim=-1)
                extras["teacher_text_embed"] = F.normalize(t.text_proj(t_pooled), dim=-1)
                extras["teacher_image"] = (t_cls, t_patches)
                extras["teacher_text_tokens"] = t_tokens
            if self.queues is not None:
                extras["queue_image_embed"] = self.queues["image"].get()           # (Q, E), oldest first
                extras["queue_text_embed"] = self.queues["text"].get()
                if self.training and torch.is_grad_enabled():    # not the no-grad pre-pass of grad accumulation
                    self._pending.append((extras["teacher_image_embed"], extras["teacher_text_embed"]))
        return Features(image_embed=img["embed"], text_embed=txt["embed"], logit_scale=self.get_logit_scale(),
                        image_tokens=img["patches"], text_tokens=txt["tokens"], extras=extras)

    def momentum_update(self, gather=None) -> None:
        """EMA step of the teacher, then this step's teacher embeddings into the queues (the trainer calls
        it after every optimizer step). ``gather(x) -> [x of rank 0, x of rank 1, ...]`` (multi-process,
        passed in by the trainer): every rank enqueues the whole global batch in rank order, so all ranks
        hold identical queues."""
        if self.teacher is not None:
            self.teacher.update()
        if self.queues is not None and self._pending:
            for k, col in (("image", 0), ("text", 1)):
                local = torch.cat([p[col] for p in self._pending])                 # (B_local, E)
                self.queues[k].enqueue(torch.cat(gather(local)) if gather is not None else local)
        self._pending = []

    @torch.no_grad()
    def cross_attention(self, feats: Features, batch: Batch, layer: int = -1) -> Tensor:
        """Text -> patch cross-attention of fusion layer ``layer`` (head-averaged), from the momentum
        teacher when there is one (else the model itself), without gradient: (B, T, N), the cls column
        dropped. PAD rows are 0. This is what synchronized masking reads. A teacher's fused text tokens are
        kept in ``feats.extras["teacher_fused_text"]`` (the same pass SemMIM's text-fused targets need)."""
        teacher = self.teacher is not None and "teacher_image" in feats.extras
        if teacher:
            cls, patches = feats.extras["teacher_image"]
            tokens, fusion = feats.extras["teacher_text_tokens"], self.teacher.module.fusion
        else:
            cls, patches, tokens, fusion = feats.extras["image_cls"], feats.image_tokens, feats.text_tokens, self.fusion
        image = torch.cat([cls[:, None], patches], dim=1)                           # (B, 1+N, Dv)
        out = fusion(tokens, batch.text_mask.bool(), image, attn_layers=[layer])
        if teacher:
            feats.extras["teacher_fused_text"] = out["tokens"]                      # (B, T, Dt)
        return out["attn"][0][..., 1:]                                              # (B, T, N)

    @torch.no_grad()
    def patch_text_relevance(self, patches: Tensor, text_tokens: Tensor, text_mask: Tensor,
                             reduce: str = "max") -> Tensor:
        """Cosine relevance of each patch to the caption's real tokens in the contrastive space (B, N)."""
        from ..masking.attentive import patch_text_relevance
        return patch_text_relevance(self.image_proj(patches), self.text_proj(text_tokens), text_mask, reduce)

    @torch.no_grad()
    def patch_prototypes(self, images: Tensor) -> Tensor:
        """Prototype logits of every patch, (B, N, K) (student ViT, shared head); needs model.prototypes."""
        if self.proto_head is None:
            raise ValueError("this model has no prototype head (model.prototypes = 0)")
        return self.proto_head(self.visual(images)[1])

    def fuse(self, text_tokens: Tensor, text_mask: Tensor, image_cls: Tensor, patches: Tensor, **kw) -> dict:
        """Text (B, T, Dt) attends to [cls | patches] (B, 1+N, Dv) -> fusion outputs (see FusionEncoder;
        with ``image_index`` (B,) the images are (Bi, ...) and row b attends to image image_index[b])."""
        image = torch.cat([image_cls[:, None], patches], dim=1)             # (B, 1+N, Dv)
        return self.fusion(text_tokens, text_mask, image, **kw)

    # ------------------------------------------------------------------ heads
    def heads(self, feats: Features, batch: Batch, masks: dict | None = None, needs: set | None = None
              ) -> Features:
        masks = masks or {}
        needs = {"itm_logits", "mlm_logits", "mim_pred"} if needs is None else needs
        cls, patches, mask = feats.extras["image_cls"], feats.image_tokens, batch.text_mask.bool()
        if "itm_logits" in needs:
            from .negatives import sample_hard_negatives
            with torch.no_grad():
                sim = feats.image_embed.float() @ feats.text_embed.float().t()      # (B, B)
                neg_txt, neg_img = sample_hard_negatives(sim * feats.logit_scale.float(), batch.item_ids)
            txt = torch.cat([feats.text_tokens, feats.text_tokens[neg_txt], feats.text_tokens])   # (3B, T, Dt)
            tmask = torch.cat([mask, mask[neg_txt], mask])
            rows = torch.arange(len(batch), device=neg_img.device)
            # rows: (image b, text b), (image b, negative text), (negative image, text b); each image's
            # cross-attention keys/values are projected once and gathered for its three rows
            fused = self.fuse(txt, tmask, cls, patches, image_index=torch.cat([rows, rows, neg_img]))["cls"]
            feats.extras["itm_logits"] = self.itm_head(fused)                              # (3B, 2)
            feats.extras["itm_num_pos"] = len(batch)
        want_mlm, want_mim = "mlm_logits" in needs, "mim_pred" in needs and self.image_decoder is not None
        if want_mlm or want_mim:
            self._masked_heads(feats, batch, masks, want_mlm, want_mim)
        if "agree_student" in needs:
            self._agreement(feats, batch)
        return feats

    def _need_teacher(self, what: str):
        if self.teacher is None or self.proto_head is None:
            raise ValueError(f"{what} needs a momentum teacher and a prototype head: set model.momentum > 0 "
                             f"and model.prototypes > 0")
        return self.teacher.module

    def _agreement(self, feats: Features, batch: Batch) -> None:
        """Prototype logits of both views' cls tokens, student (grad) and teacher: (2, B, K) each."""
        t = self._need_teacher("agreement")
        if batch.images2 is None:
            raise ValueError("agreement needs two augmented views per image: set data.views: 2")
        s2 = self.visual(batch.images2)[0]                                                   # (B, Dv)
        feats.extras["agree_student"] = self.proto_head(torch.stack([feats.extras["image_cls"], s2]))
        with torch.no_grad():
            t1 = feats.extras["teacher_image"][0]
            t2 = t.visual(batch.images2)[0]
            feats.extras["agree_teacher"] = t.proto_head(torch.stack([t1, t2]))             # (2, B, K)

    @torch.no_grad()
    def _semantic_targets(self, feats: Features, batch: Batch, masked: Tensor) -> Tensor:
        """Teacher prototype logits of the masked patches from the unmasked image: (B, M, K)."""
        t = self._need_teacher("model.mim_target=semantic")
        cls, patches = feats.extras["teacher_image"]                                        # (B, Dv), (B, N, Dv)
        if self.cfg.text_fused_targets:
            mask = batch.text_mask.bool()
            ctx = feats.extras.get("teacher_fused_text")          # already fused for the attention masks
            if ctx is None:
                ctx = t.fusion(feats.extras["teacher_text_tokens"], mask,
                               torch.cat([cls[:, None], patches], 1))["tokens"]            # (B, T, Dt)
            patches = t.image_decoder.dense(patches, ctx if self.cfg.mim_text else None,
                                            mask if self.cfg.mim_text else None)            # (B, N, Dv)
        B, M = masked.shape
        picked = torch.gather(patches, 1, masked[..., None].expand(B, M, patches.shape[-1]))
        return t.proto_head(picked)

    def _masked_heads(self, feats: Features, batch: Batch, masks: dict, want_mlm: bool, want_mim: bool) -> None:
        """MLM and MIM through the fusion encoder. ``model.masked_pass``: joint = one fusion pass of the
        masked text over the masked image feeds both; separate = MLM fuses the masked text with the whole
        image and MIM's decoder reads the clean caption fused with the masked image (one more pass)."""
        mask = batch.text_mask.bool()
        mim = masks.get("mim")
        if want_mim and mim is None:
            raise ValueError("MIM needs masked patches: configure masking.mim (e.g. {type: random, "
                             "mask_ratio: 0.25}) or masking.sync")
        if want_mlm and masks.get("mlm") is None:
            raise ValueError("MLM needs masked words: configure masking.mlm (e.g. {prob: 0.15}) or masking.sync")
        whole = feats.extras["image_cls"], feats.image_tokens
        # the image with the masked patches left out
        masked = self.visual(batch.images, keep=mim.keep) if mim is not None else whole    # (B, Dv), (B, K, Dv)
        separate = self.cfg.masked_pass == "separate"
        fused = None
        if want_mlm:
            text, positions = masks["mlm"]
            _, tokens = self.text(text, mask)                                              # (B, T, Dt)
            fused = self.fuse(tokens, mask, *(whole if separate else masked))["tokens"]    # (B, T, Dt)
            feats.extras["mlm_logits"] = self.mlm_head(fused[positions[:, 0], positions[:, 1]])  # (M, V)
            feats.extras["mlm_positions"] = positions
        if want_mim:
            if fused is None or separate:                  # the clean caption over the masked image
                fused = self.fuse(feats.text_tokens, mask, *masked)["tokens"]              # (B, T, Dt)
            ctx = fused if self.cfg.mim_text else None
            pred = self.image_decoder(masked[1], mim.keep, mim.masked, ctx, mask if ctx is not None else None,
                                      use_text=self.cfg.mim_inject)                        # (B, M, 3p² | Dv)
            if self.cfg.mim_target == "semantic":
                pred = self.proto_head(pred)                                                # (B, M, K)
                feats.extras["mim_teacher_logits"] = self._semantic_targets(feats, batch, mim.masked)
            feats.extras["mim_pred"] = pred
            feats.extras["mim_masked"] = mim.masked

    def forward(self, batch: Batch, masks: dict | None = None) -> Features:
        return self.heads(self.encode(batch), batch, masks, needs=set())
