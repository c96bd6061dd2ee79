"""The only contracts between stages: ``Sample`` (source -> transforms), ``Batch`` (collate -> model)
and ``Features`` (model -> objectives / eval)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

import torch
from torch import Tensor


@dataclass
class Region:
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels of the sample's image
    phrase: str


@dataclass
class Sample:
    """One image with its caption(s), as yielded by every data source.

    ``load_image`` is lazy so that map-style sources stay cheap to index; it returns an RGB
    ``PIL.Image`` or raises (the loader turns that into a counted skip).
    """
    key: str                          # stable id: file path or generated name (used in skip reports)
    load_image: Callable[[], Any]     # () -> PIL.Image.Image (RGB)
    captions: list[str]               # one or more reference captions
    image_id: int = -1                # index of the image within its split (retrieval ground truth)
    item_id: int = -1                 # item / group id (several images of one item share it)
    label: str | None = None          # class name for zero-shot classification, if any
    category: str | None = None       # coarse group (e.g. emoji group "People & Body")
    subcategory: str | None = None    # finer group within the category (e.g. "person-sport")
    regions: list[Region] = field(default_factory=list)
    source: str = ""                  # "file:line" or shard member, for error messages


@dataclass
class Batch:
    images: Tensor                    # (B, 3, H, W) float, normalised
    text: Tensor                      # (B, T) long token ids: [BOS, ..., EOS, PAD...]
    text_mask: Tensor                 # (B, T) bool, True on real tokens (BOS..EOS)
    image_ids: Tensor                 # (B,) long
    item_ids: Tensor                  # (B,) long
    captions: list[str]
    keys: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (reason, key) dropped by collate
    extras: dict[str, Any] = field(default_factory=dict)           # e.g. regions, labels
    images2: Tensor | None = None     # (B, 3, H, W) a second augmented view of each image (data.views=2)

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v
        return Batch(**moved)

    def slice(self, start: int, stop: int) -> "Batch":
        """Micro-batch view (gradient accumulation)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                out[f.name] = None
            elif isinstance(v, Tensor) or (isinstance(v, list) and f.name != "skipped"):
                out[f.name] = v[start:stop]
            elif f.name == "skipped":
                out[f.name] = v if start == 0 else []
            else:
                out[f.name] = {k: (x[start:stop] if isinstance(x, (Tensor, list)) else x) for k, x in v.items()}
        return Batch(**out)


@dataclass
class Features:
    """What a model computes for a batch. No losses here: objectives read these fields."""
    image_embed: Tensor | None = None      # (B, E) L2-normalised contrastive image embedding
    text_embed: Tensor | None = None       # (B, E) L2-normalised contrastive text embedding
    logit_scale: Tensor | None = None      # () exp(learned log-scale), clamped to <= 100
    image_tokens: Tensor | None = None     # (B, N, Dv) patch tokens after the final norm (no cls)
    text_tokens: Tensor | None = None      # (B, T, Dt) unimodal text tokens
    caption_logits: Tensor | None = None   # (B, T, V) next-token logits at every text position
    extras: dict[str, Tensor] = field(default_factory=dict)

    def replace(self, **kw) -> "Features":
        return replace(self, **kw)
