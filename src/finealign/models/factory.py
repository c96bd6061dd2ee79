"""Build a model from a ``ModelConfig`` (``model.arch`` picks the family), checking the shapes first."""
from __future__ import annotations

import torch.nn as nn

from ..config import ConfigError, ModelConfig
from .coca import ContrastiveCaptioner
from .layers import set_low_precision_attention


def validate_model_config(cfg: ModelConfig, vocab_size: int) -> None:
    errors = []
    for width, heads, name in [(cfg.vision_width, cfg.vision_heads, "vision"), (cfg.text_width, cfg.text_heads, "text")]:
        if heads <= 0 or width % heads:
            errors.append(f"model.{name}_width ({width}) must be divisible by model.{name}_heads ({heads})")
    if cfg.image_size % cfg.patch_size:
        errors.append(f"model.image_size ({cfg.image_size}) must be a multiple of model.patch_size ({cfg.patch_size})")
    if cfg.image_pool not in ("attn", "cls"):
        errors.append(f"model.image_pool must be 'attn' or 'cls', got {cfg.image_pool!r}")
    if cfg.decoder_layers > 0 and cfg.caption_queries <= 0:
        errors.append("model.caption_queries must be > 0 when the model has a decoder")
    if vocab_size <= 0:
        errors.append(f"vocabulary size must be > 0 (model.vocab_size or the tokenizer's), got {vocab_size}")
    if errors:
        raise ConfigError("invalid model config: " + "; ".join(errors))


def build_model(cfg: ModelConfig, vocab_size: int = 0, full=None, tokenizer=None, pretrained: bool = True
                ) -> nn.Module:
    """``model.arch``: coca -> ContrastiveCaptioner (CLIP / CoCa / SyCoCa), fusion -> FusionModel (ALBEF),
    maccap -> MacCap (needs the whole config ``full`` and the ``tokenizer``; zeroshot/maccap.py).
    ``cfg.vocab_size`` wins when > 0, else the tokenizer's ``vocab_size``. ``pretrained=False``: a Hugging
    Face text tower (``model.text_tower: hf``) is built from its stored config only (weights follow from a
    checkpoint), so loading needs no ``model.text_path``."""
    vocab = cfg.vocab_size if cfg.vocab_size > 0 else vocab_size
    validate_model_config(cfg, vocab)
    if cfg.arch == "maccap":
        if full is None or tokenizer is None:
            raise ValueError("model.arch=maccap is built from the whole config and the tokenizer")
        from ..zeroshot.maccap import MacCap
        model = MacCap(cfg, full.maccap, full.lm, tokenizer)
    elif cfg.arch == "fusion":
        from .albef import FusionModel
        model = FusionModel(cfg, vocab)
    else:
        model = ContrastiveCaptioner(cfg, vocab, pretrained=pretrained)
    if cfg.attn_low_precision:
        set_low_precision_attention(model, True)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
