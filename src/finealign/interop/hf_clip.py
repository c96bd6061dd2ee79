"""Hugging Face ``CLIPModel`` directories -> finealign's dual encoder (``finealign.load(DIR)``).

Reading needs no ``transformers``: DIR/config.json and the weights (model.safetensors, sharded safetensors
with model.safetensors.index.json, or pytorch_model.bin read with ``weights_only=True``) are read directly.

Config (CLIPConfig -> model.*; the result is model.arch coca, image_pool cls, decoder_layers 0 = ``clip``):

    vision_config.image_size, patch_size            -> image_size, patch_size
    vision_config.hidden_size, num_hidden_layers,
                  num_attention_heads               -> vision_width, vision_layers, vision_heads
    vision_config.intermediate_size / hidden_size   -> mlp_ratio
    text_config.hidden_size, num_hidden_layers,
                num_attention_heads                 -> text_width, text_layers, text_heads
    text_config.intermediate_size / hidden_size     -> text_mlp_ratio
    text_config.vocab_size, max_position_embeddings -> vocab_size, context_length
    projection_dim                                  -> embed_dim
    hidden_act (both towers)                        -> act: quick_gelu | gelu | gelu_tanh (gelu_new, ...)
    always                                          -> vision_ln_pre true (CLIP's pre_layrnorm), text_pool eos

Weights (HF name -> finealign name; V = vision_model, T = text_model, L = block index):

    V.embeddings.class_embedding (D,)               -> visual.cls_token (1, 1, D)
    V.embeddings.patch_embedding.weight (D, 3, p, p) -> visual.patch_embed.weight (D, 3*p*p); bias := 0
        (finealign's patch Linear reads each patch flattened as (C, p, p), the conv kernel's own order)
    V.embeddings.position_embedding.weight (1+N, D) -> visual.pos_embed (1, 1+N, D)   (row 0: the cls)
    V.pre_layrnorm, V.post_layernorm                -> visual.ln_pre, visual.ln_post
        (HF normalises only the pooled cls token; finealign every token: the cls, hence the embedding,
        is the same -- the patch tokens are not comparable)
    {V,T}.encoder.layers.L.self_attn.{q,k,v}_proj   -> {visual,text}.blocks.L.attn.qkv (rows q | k | v)
    {V,T}.encoder.layers.L.self_attn.out_proj       -> ...attn.proj
    {V,T}.encoder.layers.L.layer_norm1, layer_norm2 -> ...ln_1, ln_2
    {V,T}.encoder.layers.L.mlp.fc1, fc2             -> ...mlp.fc, mlp.proj
    T.embeddings.token_embedding.weight             -> text.tok_embed.weight
    T.embeddings.position_embedding.weight (C, D)   -> text.pos_embed (1, C, D)
    T.final_layer_norm                              -> text.ln_final
    visual_projection, text_projection (no bias)    -> image_proj, text_proj
    logit_scale (log of 1/temperature)              -> logit_scale (finealign clamps exp() at 100)

Text: both attend causally and never to padding keys. HF pools the hidden state at the EOS token (the first
``eos_token_id``; the largest id for configs with the legacy ``eos_token_id: 2``), finealign at the last real
token, which its Tokenizer makes the EOS: inputs laid out ``[BOS, tokens..., EOS, PAD...]`` give the same
embedding. DIR/tokenizer.json (what ``CLIPTokenizerFast.save_pretrained`` writes) becomes the model's
Tokenizer (BOS <|startoftext|>, EOS and PAD <|endoftext|>); without it the tokenizer is None (images only).
Layer norms must use eps 1e-5 (finealign's), as every released CLIP does.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

IGNORED_SUFFIXES = ("position_ids",)          # buffers some transformers versions saved; not weights
ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}


class HFConversionError(ValueError):
    """A Hugging Face directory that finealign cannot read or convert; the message names the file / key."""


def read_hf_config(path: str | Path) -> dict:
    cj = Path(path) / "config.json"
    if not cj.is_file():
        raise HFConversionError(f"{cj} is missing: not a Hugging Face model directory")
    try:
        return json.loads(cj.read_text())
    except ValueError as e:
        raise HFConversionError(f"{cj} is not valid JSON: {e}") from None


def read_hf_weights(path: str | Path) -> dict[str, Tensor]:
    """The state dict saved by ``save_pretrained`` in ``path`` (safetensors, sharded or not, or a .bin)."""
    from safetensors.torch import load_file
    p = Path(path)
    try:
        if (p / "model.safetensors").is_file():
            return load_file(str(p / "model.safetensors"))
        index = p / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            sd: dict[str, Tensor] = {}
            for shard in shards:
                sd.update(load_file(str(p / shard)))
            return sd
        if (p / "pytorch_model.bin").is_file():
            return torch.load(p / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except Exception as e:          # safetensors / torch raise their own error types
        raise HFConversionError(f"{p}: cannot read the weights: {e}") from e
    raise HFConversionError(f"{p}: no weights (model.safetensors, model.safetensors.index.json or "
                            f"pytorch_model.bin)")


def _ratio(sub: dict, name: str) -> float:
    width, hidden = int(sub["hidden_size"]), int(sub["intermediate_size"])
    ratio = hidden / width
    if int(width * ratio) != hidden:        # MLP hidden = int(width * ratio)
        raise HFConversionError(f"{name}: intermediate_size {hidden} is not reachable as int({width} * ratio)")
    return ratio


def clip_model_config(hf: dict) -> dict:
    """finealign ``model.*`` keys for a CLIPConfig dict (see the table in this module's docstring)."""
    if hf.get("model_type") != "clip":
        raise HFConversionError(f"config.json has model_type {hf.get('model_type')!r}: finealign.load reads "
                                f"CLIPModel directories (model_type 'clip'); a text encoder is used with "
                                f"model.text_tower=hf model.text_path=DIR")
    v, t = hf.get("vision_config") or {}, hf.get("text_config") or {}
    need = {"vision_config": (v, ("image_size", "patch_size", "hidden_size", "num_hidden_layers",
                                  "num_attention_heads", "intermediate_size")),
            "text_config": (t, ("vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers",
                                "num_attention_heads", "intermediate_size"))}
    for name, (sub, keys) in need.items():
        missing = [k for k in keys if k not in sub]
        if missing:
            raise HFConversionError(f"config.json {name} lacks {missing}")
    acts = {v.get("hidden_act", "quick_gelu"), t.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or next(iter(acts)) not in ACTIVATIONS:
        raise HFConversionError(f"unsupported hidden_act {sorted(acts)} (one of {sorted(ACTIVATIONS)} for both towers)")
    for name, sub in (("vision_config", v), ("text_config", t)):
        if float(sub.get("layer_norm_eps", 1e-5)) != 1e-5:
            raise HFConversionError(f"{name}.layer_norm_eps {sub['layer_norm_eps']} is not supported (only 1e-5)")
    return {
        "arch": "coca", "image_pool": "cls", "decoder_layers": 0,
        "image_size": int(v["image_size"]), "patch_size": int(v["patch_size"]),
        "vision_width": int(v["hidden_size"]), "vision_layers": int(v["num_hidden_layers"]),
        "vision_heads": int(v["num_attention_heads"]), "mlp_ratio": _ratio(v, "vision_config"),
        "text_width": int(t["hidden_size"]), "text_layers": int(t["num_hidden_layers"]),
        "text_heads": int(t["num_attention_heads"]), "text_mlp_ratio": _ratio(t, "text_config"),
        "vocab_size": int(t["vocab_size"]), "context_length": int(t["max_position_embeddings"]),
        "embed_dim": int(hf.get("projection_dim", 512)), "act": ACTIVATIONS[next(iter(acts))],
        "vision_ln_pre": True, "text_pool": "eos",
    }


def convert_clip_state_dict(sd: dict[str, Tensor], vision_layers: int, text_layers: int) -> dict[str, Tensor]:
    """HF CLIPModel state dict -> finealign ContrastiveCaptioner state dict (every HF weight used once)."""
    src = {k: v for k, v in sd.items() if not k.endswith(IGNORED_SUFFIXES)}
    out: dict[str, Tensor] = {}

    def take(name: str) -> Tensor:
        if name not in src:
            raise HFConversionError(f"HF weights lack {name!r} (not a CLIPModel checkpoint?)")
        return src.pop(name).float()

    def norm(hf: str, ours: str) -> None:
        out[f"{ours}.weight"], out[f"{ours}.bias"] = take(f"{hf}.weight"), take(f"{hf}.bias")

    def blocks(hf: str, ours: str, n: int) -> None:
        for i in range(n):
            a, b = f"{hf}.encoder.layers.{i}", f"{ours}.blocks.{i}"
            for kind in ("weight", "bias"):
                out[f"{b}.attn.qkv.{kind}"] = torch.cat([take(f"{a}.self_attn.{x}_proj.{kind}") for x in "qkv"])
                out[f"{b}.attn.proj.{kind}"] = take(f"{a}.self_attn.out_proj.{kind}")
                out[f"{b}.mlp.fc.{kind}"] = take(f"{a}.mlp.fc1.{kind}")
                out[f"{b}.mlp.proj.{kind}"] = take(f"{a}.mlp.fc2.{kind}")
            norm(f"{a}.layer_norm1", f"{b}.ln_1")
            norm(f"{a}.layer_norm2", f"{b}.ln_2")

    V, T = "vision_model", "text_model"
    out["visual.cls_token"] = take(f"{V}.embeddings.class_embedding").reshape(1, 1, -1)     # (1, 1, D)
    conv = take(f"{V}.embeddings.patch_embedding.weight")                                   # (D, 3, p, p)
    out["visual.patch_embed.weight"] = conv.reshape(conv.shape[0], -1)                      # (D, 3*p*p)
    out["visual.patch_embed.bias"] = torch.zeros(conv.shape[0])
    out["visual.pos_embed"] = take(f"{V}.embeddings.position_embedding.weight")[None]       # (1, 1+N, D)
    norm(f"{V}.pre_layrnorm", "visual.ln_pre")
    blocks(V, "visual", vision_layers)
    norm(f"{V}.post_layernorm", "visual.ln_post")
    out["text.tok_embed.weight"] = take(f"{T}.embeddings.token_embedding.weight")
    out["text.pos_embed"] = take(f"{T}.embeddings.position_embedding.weight")[None]         # (1, C, D)
    blocks(T, "text", text_layers)
    norm(f"{T}.final_layer_norm", "text.ln_final")
    out["image_proj.weight"] = take("visual_projection.weight")
    out["text_proj.weight"] = take("text_projection.weight")
    out["logit_scale"] = take("logit_scale").reshape(())
    if src:
        extra = sorted(src)
        raise HFConversionError(f"HF weights not used by the conversion: {extra[:10]}"
                                + (f" ... (+{len(extra) - 10})" if len(extra) > 10 else ""))
    return out


def load_hf_clip(path: str | Path, device: str | torch.device = "cpu"):
    """A Hugging Face CLIPModel directory -> ``finealign.api.Loaded`` (model in eval mode, tokenizer, config)."""
    from ..api import Loaded
    from ..config import from_dict
    from ..data.tokenizer import Tokenizer
    from ..models.factory import build_model
    p = Path(path)
    model_cfg = clip_model_config(read_hf_config(p))
    tokenizer = None
    if (p / "tokenizer.json").is_file():
        tokenizer = Tokenizer.load(p)
        if tokenizer.vocab_size > model_cfg["vocab_size"]:
            raise HFConversionError(f"{p}/tokenizer.json has {tokenizer.vocab_size} tokens, more than the "
                                    f"model's vocab_size {model_cfg['vocab_size']}")
    else:
        log.warning("%s has no tokenizer.json: images only (save CLIPTokenizerFast there for text)", p)
    raw = {"recipe": "hf-clip", "model": model_cfg, "objectives": {"itc": {"weight": 1.0}},
           "eval": {"tasks": ["retrieval", "classify"]}}
    if tokenizer is not None:
        raw["tokenizer"] = {"path": str(p)}
    cfg = from_dict(raw)
    model = build_model(cfg.model, model_cfg["vocab_size"], full=cfg, tokenizer=tokenizer)
    sd = convert_clip_state_dict(read_hf_weights(p), cfg.model.vision_layers, cfg.model.text_layers)
    missing = sorted(set(model.state_dict()) - set(sd))
    if missing:
        raise HFConversionError(f"conversion left finealign weights unset: {missing[:10]}")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:           # shape mismatches: config.json and weights disagree
        raise HFConversionError(f"{p}: weights do not fit config.json: {e}") from e
    model.to(device).eval()
    return Loaded(model=model, tokenizer=tokenizer, config=cfg, path=p)
