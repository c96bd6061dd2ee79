"""Zero-shot image classification with prompt-template ensembles (CLIP recipe).

1. Every class name is written into every template (``"a photo of a {}."``), the prompts are encoded
   and L2-normalised, averaged over templates and re-normalised -> one (E,) classifier row per class.
2. Each image is assigned the class whose row has the largest dot product with its (normalised)
   embedding.

Accuracies are percentages in [0, 100]. Ties are resolved pessimistically, as in
``finealign.eval.retrieval``: the true class's rank is the number of *other* classes scoring ``>=``
it, so constant embeddings score 0 % instead of an order-dependent number.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .retrieval import single_target_ranks

__all__ = ["build_class_embeddings", "zero_shot_classify", "class_ranks"]


@torch.no_grad()
def build_class_embeddings(encode_text_fn: Callable[[list[str]], Tensor], class_names: Sequence[str],
                           templates: Sequence[str], batch_size: int = 256) -> Tensor:
    """Template-ensembled class embeddings.

    Args:
        encode_text_fn: ``list[str] -> (n, E)`` text embeddings (normalised or not: every prompt
            embedding is re-normalised here before averaging). Called under ``torch.no_grad``.
        class_names: C class names.
        templates: format strings with one ``{}`` slot, e.g. ``["{}", "a picture of {}"]``.
        batch_size: prompts encoded per call of ``encode_text_fn``.
    Returns:
        (C, E) float tensor, rows L2-normalised:
        ``normalize(mean_t normalize(encode(template_t.format(name))))``.
    """
    if not class_names:
        raise ValueError("class_names is empty")
    if not templates:
        raise ValueError("templates is empty")
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"template {t!r} has no '{{}}' slot for the class name")
    prompts = [t.format(name) for name in class_names for t in templates]      # C*P, class-major
    chunks = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        emb = encode_text_fn(batch)
        if emb.ndim != 2 or emb.shape[0] != len(batch):
            raise ValueError(f"encode_text_fn returned shape {tuple(emb.shape)} for {len(batch)} prompts; "
                             f"expected ({len(batch)}, E)")
        chunks.append(emb.float())
    emb = F.normalize(torch.cat(chunks), dim=-1)                                # (C*P, E)
    emb = emb.view(len(class_names), len(templates), -1).mean(dim=1)            # (C, E)
    return F.normalize(emb, dim=-1)


@torch.no_grad()
def class_ranks(image_embed: Tensor, class_embed: Tensor, labels: Tensor, chunk: int = 4096) -> Tensor:
    """(I,) long: number of wrong classes scoring >= the true class (0 = correct top-1)."""
    if image_embed.ndim != 2 or class_embed.ndim != 2 or image_embed.shape[1] != class_embed.shape[1]:
        raise ValueError(f"expected image_embed (I, E) and class_embed (C, E), got "
                         f"{tuple(image_embed.shape)} and {tuple(class_embed.shape)}")
    labels = torch.as_tensor(labels).to(device=image_embed.device, dtype=torch.long)
    if labels.shape != (image_embed.shape[0],):
        raise ValueError(f"labels must have shape ({image_embed.shape[0]},), got {tuple(labels.shape)}")
    n_cls = class_embed.shape[0]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_cls):
        raise ValueError(f"labels must lie in [0, {n_cls}), got min {int(labels.min())}, max {int(labels.max())}")
    return single_target_ranks(image_embed.float(), class_embed.float().to(image_embed.device), labels, chunk)


def zero_shot_classify(image_embed: Tensor, class_embed: Tensor, labels: Tensor,
                       ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-K zero-shot accuracy in percent.

    Args:
        image_embed: (I, E) image embeddings (normalised).
        class_embed: (C, E) class embeddings from :func:`build_class_embeddings`.
        labels: (I,) long true class indices.
        ks: K values; with fewer than K classes top-K is trivially 100.
    Returns:
        ``{"top1": float, "top5": float}`` for the default ``ks``.
    """
    ranks = class_ranks(image_embed, class_embed, labels)
    return {f"top{k}": 100.0 * int((ranks < k).sum()) / ranks.numel() for k in ks}
