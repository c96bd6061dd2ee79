"""A Hugging Face text encoder (``transformers.AutoModel``: BERT, MiniLM, RoBERTa, ...) as the text tower.

Recipe / CLI (optional extra ``finealign[hf]``)::

    finealign train clip model.text_tower=hf model.text_path=DIR model.text_pool=mean

Config, resolved once when the config is loaded (:func:`resolve_text_tower`, called by ``from_dict``):

    model.text_path        DIR: config.json, weights (model.safetensors / pytorch_model.bin), tokenizer.json
    model.text_hf_config   := DIR/config.json, kept in the resolved config so that checkpoints and exports
                           rebuild the tower without DIR (``build_model(..., pretrained=False)``)
    model.text_width       := the encoder's ``hidden_size`` (the text projection and poolers read it)
    tokenizer.path         := DIR unless set: the encoder's own tokenizer.json, so ids are its vocabulary

Forward (``HFTextTower``), text laid out by finealign's Tokenizer as ``[BOS, tok..., EOS, PAD...]`` -- for a
BERT tokenizer that is ``[CLS] ... [SEP] [PAD]...``, the encoder's own layout:

    ids (B, T), text_mask (B, T) -> attention_mask -> AutoModel -> last_hidden_state = tokens (B, T, D)
    pooled (B, D): model.text_pool = mean (masked mean of the real tokens; sentence-transformers' mean
                   pooling) | cls (token 0, BERT's [CLS]) | eos (the last real token)

The encoder's parameters sit under ``text.hf.`` in finealign's state dict with their Hugging Face names.
The encoder's own pooler (BERT's dense+tanh over [CLS]) is not built: no pooling mode uses it, and
parameters without gradient would break DDP. The tower is bidirectional, so it cannot feed CoCa's caption
decoder (checked: ``model.decoder_layers`` must be 0). Dropout follows the encoder's config in train mode.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from ..config import ConfigError
from ..models.layers import pool_tokens


def require_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("model.text_tower=hf needs transformers: pip install 'finealign[hf]'") from e
    return transformers


def read_encoder_config(path: str | Path) -> dict:
    """DIR/config.json as a dict, with errors that name the directory."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"model.text_path: {p} is not a directory (a local Hugging Face encoder: "
                          f"config.json, model.safetensors, tokenizer.json)")
    cj = p / "config.json"
    if not cj.is_file():
        raise ConfigError(f"model.text_path: {cj} is missing (save the encoder with save_pretrained)")
    try:
        return json.loads(cj.read_text())
    except ValueError as e:
        raise ConfigError(f"model.text_path: {cj} is not valid JSON: {e}") from None


def resolve_text_tower(cfg) -> None:
    """Fill model.text_hf_config, model.text_width and tokenizer.path of a ``text_tower: hf`` config (in place).

    A stored ``text_hf_config`` (a checkpoint's or export's config) wins, so those load without the directory."""
    m = cfg.model
    path = Path(m.text_path) if m.text_path else None
    if not m.text_hf_config:
        if path is None:
            raise ConfigError("model.text_tower=hf needs model.text_path=DIR (a local Hugging Face text encoder)")
        m.text_hf_config = read_encoder_config(path)
    hc = m.text_hf_config
    if hc.get("model_type") == "clip":
        raise ConfigError("model.text_path holds a whole CLIPModel: load it with finealign.load(DIR) "
                          "(its own text tower) instead of model.text_tower=hf")
    if "hidden_size" not in hc:
        raise ConfigError(f"model.text_path: config of model_type {hc.get('model_type')!r} has no hidden_size "
                          f"(not a text encoder transformers' AutoModel can build)")
    m.text_width = int(hc["hidden_size"])
    max_pos = hc.get("max_position_embeddings")
    if max_pos and m.context_length > int(max_pos):
        raise ConfigError(f"model.context_length ({m.context_length}) exceeds the encoder's "
                          f"max_position_embeddings ({max_pos})")
    if not cfg.tokenizer.path:
        if path is None or not (path / "tokenizer.json").is_file():
            where = f"{path}/tokenizer.json" if path is not None else "model.text_path"
            raise ConfigError(f"model.text_tower=hf needs the encoder's tokenizer: {where} is missing (write it "
                              f"with AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)) or set tokenizer.path")
        cfg.tokenizer.path = str(path)


def _hf_config(d: dict):
    tf = require_transformers()
    mt = d.get("model_type")
    if mt not in tf.CONFIG_MAPPING:
        raise ValueError(f"model.text_hf_config: unknown model_type {mt!r} for this transformers version")
    return tf.CONFIG_MAPPING[mt].from_dict({k: v for k, v in d.items() if k != "model_type"})


def _without_pooler(build, *args):
    """``AutoModel`` loaders with ``add_pooling_layer=False`` where the model class takes it (BERT family)."""
    try:
        model = build(*args, add_pooling_layer=False)
    except TypeError:
        model = build(*args)
    if isinstance(getattr(model, "pooler", None), nn.Module):
        model.pooler = None
    return model


class HFTextTower(nn.Module):
    """Text tower around ``AutoModel``: ``forward(ids, mask) -> pooled (B, D), tokens (B, T, D)``."""

    def __init__(self, cfg, pretrained: bool = True):
        super().__init__()
        tf = require_transformers()
        if cfg.text_pool not in ("cls", "eos", "mean"):
            raise ValueError(f"model.text_pool must be cls, eos or mean, got {cfg.text_pool!r}")
        if pretrained:
            if not cfg.text_path:
                raise ValueError("model.text_tower=hf needs model.text_path=DIR to load pretrained weights")
            read_encoder_config(cfg.text_path)                  # clear errors for bad directories
            hf = _without_pooler(tf.AutoModel.from_pretrained, str(cfg.text_path))
        else:
            if not cfg.text_hf_config:
                raise ValueError("model.text_hf_config is empty: resolve the config with finealign.config.from_dict")
            hf = _without_pooler(tf.AutoModel.from_config, _hf_config(cfg.text_hf_config))
        self.hf = hf.float()
        self.width = int(self.hf.config.hidden_size)
        self.context_length = cfg.context_length
        self.pool = cfg.text_pool
        if cfg.grad_checkpointing:
            self.hf.gradient_checkpointing_enable()

    def forward(self, text: Tensor, text_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """text (B, T) long, text_mask (B, T) bool -> pooled (B, D), tokens (B, T, D)."""
        if text.shape[1] > self.context_length:
            raise ValueError(f"text of {text.shape[1]} tokens exceeds context_length {self.context_length}")
        attn = torch.ones_like(text) if text_mask is None else text_mask.long()
        tokens = self.hf(input_ids=text, attention_mask=attn).last_hidden_state     # (B, T, D)
        return pool_tokens(tokens, text_mask, self.pool), tokens
