"""MacCap (and CapDec as its special case): captioning trained on text only over a frozen backbone.

    training (text only)  caption -> frozen backbone text tower -> e (B, E)
                          -> L noisy copies (B, L, E) -> adaptor -> prefix (B, Q, D) -> LM(prefix ⊕ caption)
    inference             image -> frozen backbone: global g, subregions s_1..s_k (features.py)
                          -> memory normalise(normalise(g + w s_i) + noise) (B, k, E)   [k = 0: L noisy
                             copies of g, CapDec] -> adaptor -> LM decoding; N samples with fresh noise,
                             the one whose text embedding is closest to the image is kept (re-ranking)

``MacCap`` follows the finealign model interface: ``encode`` / ``heads`` (features for
``objectives.prefix_lm``, no loss), ``encode_image`` / ``encode_text`` (the backbone's, so retrieval
evaluation is the backbone's) and ``generate`` (token ids in the backbone tokenizer, what ``finealign
eval --task caption`` and ``finealign caption`` decode). The backbone is any ``coca``-arch checkpoint
(CLIP, CoCa, SyCoCa); ``resolve_backbone`` copies its model config into the run's, so a MacCap checkpoint
rebuilds without the backbone directory.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn as nn
from torch import Tensor

from ..models.coca import ContrastiveCaptioner
from ..types import Batch, Features
from .adaptor import AdaptorDecoder
from .features import aggregate, inject_noise, rerank, subregion_features
from .lm import build_lm, generate

log = logging.getLogger("finealign")


class MacCap(nn.Module):
    def __init__(self, cfg, mc, lm_cfg, tokenizer):
        super().__init__()
        self.cfg, self.mc, self.tokenizer = cfg, mc, tokenizer
        self.backbone = ContrastiveCaptioner(dataclasses.replace(cfg, arch="coca"), tokenizer.vocab_size)
        self.backbone.requires_grad_(False)
        self.lm = build_lm(lm_cfg, tokenizer, cfg.context_length, mc.queries)
        self.adaptor = AdaptorDecoder(cfg.embed_dim, self.lm.hidden_size, mc.adaptor_width, mc.adaptor_heads,
                                      mc.queries, mc.adaptor_layers)
        self.visual = self.backbone.visual
        self.decoder = self.adaptor                     # "can caption" for the evaluation runner
        self.has_decoder = True
        self.noise_var = float(mc.noise_var)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()                           # frozen
        return self

    INFERENCE_KEYS = ("subregions", "subregion_weight", "samples", "rerank", "noise_var")

    def set_inference(self, **knobs) -> None:
        """Change inference-time settings of a trained model (``finealign eval RUN maccap.subregions=0``):
        ``subregions``, ``subregion_weight``, ``samples``, ``rerank``, ``noise_var`` (a number). The other
        ``maccap`` keys shape the trained adaptor and cannot change after training."""
        from ..config import ConfigError
        fixed = sorted(set(knobs) - set(self.INFERENCE_KEYS))
        if fixed:
            raise ConfigError(f"maccap.{fixed[0]} is fixed by training; at inference only "
                              f"{', '.join('maccap.' + k for k in self.INFERENCE_KEYS)} can change")
        if "noise_var" in knobs and isinstance(knobs["noise_var"], str):
            raise ConfigError("maccap.noise_var at inference must be a number (auto is resolved when training)")
        self.mc = dataclasses.replace(self.mc, **knobs)
        self.noise_var = float(self.mc.noise_var)

    # ------------------------------------------------------------------ backbone (frozen)
    def encode_image(self, images: Tensor, **kw) -> dict:
        return self.backbone.encode_image(images, memory=False)

    def encode_text(self, text: Tensor, text_mask: Tensor | None = None) -> dict:
        return self.backbone.encode_text(text, text_mask)

    # ------------------------------------------------------------------ training (text only)
    def encode(self, batch: Batch) -> Features:
        """Text-only: the captions' backbone embeddings, noised, as the LM prefix; the images are not read."""
        with torch.no_grad():
            e = self.backbone.encode_text(batch.text, batch.text_mask)["embed"]         # (B, E)
        memory = inject_noise(e, self.noise_var, self.mc.copies)                      # (B, L, E)
        prefix = self.adaptor(memory)                                                 # (B, Q, D)
        ids, mask, start = self.lm.tokenize(batch.captions)
        ids, mask = ids.to(prefix.device), mask.to(prefix.device)
        emb = torch.cat([prefix, self.lm.embed(ids).to(prefix.dtype)], dim=1)        # (B, Q+T, D)
        full = torch.cat([torch.ones(prefix.shape[:2], dtype=torch.bool, device=mask.device), mask], 1)
        logits = self.lm.logits(emb, full)                                            # (B, Q+T, V)
        return Features(text_embed=e, caption_logits=logits,
                        extras={"lm_ids": ids, "lm_mask": mask, "lm_start": torch.tensor(start),
                                "prefix_len": torch.tensor(prefix.shape[1])})

    def heads(self, feats: Features, batch: Batch, masks=None, needs=None) -> Features:
        return feats

    def forward(self, batch: Batch, masks=None) -> Features:
        return self.encode(batch)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def image_memory(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """images (B, 3, H, W) -> (memory (B, k or L, E), global embedding (B, E))."""
        bb = self.backbone
        if self.mc.subregions > 0:
            cls, patches, attn = bb.visual(images, return_attn="full")               # attn (B, 1+N, 1+N)
            g = bb.global_embed(cls, patches)                                        # (B, E)
            sub, _ = subregion_features(bb.dense_image_embed(patches), attn, self.mc.subregions,
                                        bb.global_attention(patches, attn))
            feats = aggregate(g, sub, self.mc.subregion_weight)                      # (B, k, E)
            noise = inject_noise(feats.flatten(0, 1), self.noise_var, 1, generator)    # (B*k, 1, E)
            return noise.view_as(feats), g
        g = bb.encode_image(images, memory=False)["embed"]
        return inject_noise(g, self.noise_var, self.mc.copies, generator), g

    @torch.no_grad()
    def caption_images(self, images: Tensor, strategy: str = "beam", max_new_tokens: int = 16,
                       beam_size: int = 4, top_p: float = 0.9, temperature: float = 1.0,
                       generator: torch.Generator | None = None) -> list[str]:
        """Captions as text: ``mc.samples`` candidates per image (fresh noise each), re-ranked by the
        backbone's image-text similarity when ``mc.rerank`` (else the first)."""
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        cands: list[list[str]] = [[] for _ in range(images.shape[0])]
        g = None
        for _ in range(max(1, self.mc.samples)):
            memory, g = self.image_memory(images, generator)
            prefix = self.adaptor(memory)
            ids, _, start = self.lm.tokenize([""] * images.shape[0])
            out = generate(self.lm, prefix, ids[:, :start].to(prefix.device), strategy, max_new_tokens,
                           beam_size, top_p, temperature, generator)
            for i, toks in enumerate(out):
                cands[i].append(self.lm.decode(toks))
        if not self.mc.rerank or len(cands[0]) == 1:
            return [c[0] for c in cands]
        flat = [c for row in cands for c in row]
        ids, mask = self.tokenizer.encode_batch(flat, self.cfg.context_length)
        emb = self.backbone.encode_text(ids.to(images.device), mask.to(images.device))["embed"]
        best = rerank(g, emb.view(len(cands), -1, emb.shape[-1]))
        return [row[int(b)] for row, b in zip(cands, best)]

    @torch.no_grad()
    def answer(self, images: Tensor, questions: list[str], template: str = "Question: {} Short answer:",
               max_new_tokens: int = 5, beam_size: int = 5, generator: torch.Generator | None = None) -> list[str]:
        """Zero-shot VQA: the continuation of ``template.format(question)`` after the image prefix, by beam
        search with ``beam_size`` beams (MacCap: 5; 1 = greedy); one noisy memory per image, no re-ranking."""
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        memory, _ = self.image_memory(images, generator)
        prefix = self.adaptor(memory)                                                  # (B, Q, D)
        strategy = "beam" if beam_size > 1 else "greedy"
        out = []
        for i, q in enumerate(questions):
            start = torch.tensor([self.lm.prompt_ids(template.format(q))], device=prefix.device)
            toks = generate(self.lm, prefix[i:i + 1], start, strategy, max_new_tokens, beam_size)[0]
            out.append(self.lm.decode(toks).strip())
        return out

    @torch.no_grad()
    def generate(self, images: Tensor, bos_id: int, eos_id: int, pad_id: int, strategy: str = "beam",
                 max_new_tokens: int = 16, beam_size: int = 4, top_p: float = 0.9, temperature: float = 1.0,
                 use_cache: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """The model-interface captioner: token ids (B, L) in the backbone tokenizer (BOS ... EOS PAD)."""
        texts = self.caption_images(images, strategy, max_new_tokens, beam_size, top_p, temperature, generator)
        ids, _ = self.tokenizer.encode_batch(texts, self.cfg.context_length)
        return ids.to(images.device)


def resolve_backbone(cfg):
    """A MacCap config whose ``model`` section is the backbone checkpoint's (arch set to ``maccap``) and
    whose tokenizer is the backbone's; returns (cfg, backbone checkpoint path). No-op without
    ``maccap.backbone`` (e.g. when a MacCap checkpoint is reloaded: its config is already resolved)."""
    from ..config import from_dict
    from ..train import checkpoint as ckpt
    if not cfg.maccap.backbone:
        return cfg, None
    path = ckpt.find_checkpoint(cfg.maccap.backbone, "latest")
    state = ckpt.load_checkpoint(path)
    bb = from_dict(state["config"])
    if bb.model.arch != "coca":
        raise ValueError(f"maccap.backbone {path}: a coca-arch checkpoint (CLIP, CoCa, SyCoCa) is needed, "
                         f"got model.arch={bb.model.arch}")
    raw = cfg.to_dict()
    raw["model"] = {**bb.model.__dict__, "arch": "maccap"}
    if cfg.maccap.noise_var == "auto":
        raw["maccap"]["noise_var"] = measured_noise_var(path)
    return from_dict(raw), path


def measured_noise_var(checkpoint) -> float:
    """``suggested_noise_var`` of the backbone run's gap analysis (``RUN/gap/gap.json``)."""
    import json
    from pathlib import Path
    run = Path(checkpoint).parent.parent
    f = run / "gap" / "gap.json"
    if not f.is_file():
        raise FileNotFoundError(f"maccap.noise_var=auto reads the backbone's measured modality gap from {f}; "
                                f"run `finealign analyze gap {run}` first (or give a number)")
    value = float(json.loads(f.read_text())["suggested_noise_var"])
    log.info("maccap.noise_var=auto: %.4g from %s", value, f)
    return value
