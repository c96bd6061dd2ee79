"""Text-guided image retrieval (TGIR, FashionIQ / CIRR style): (reference image, modification text) ->
target image, ranked against a gallery of images. Metric: Recall@10 and Recall@50 in percent.

Conventions
-----------
* **The reference image is not a candidate** for its own query (FashionIQ / CIRR practice: the
  reference is trivially similar to the composed query and is never the answer). Every other
  gallery image, other queries' references included, is a candidate.
* One target per query. Rank = number of wrong candidates scoring ``>=`` the target (ties
  pessimistic, as in :mod:`.retrieval`); a hit at K iff rank < K.
* Composed query (zero-shot baseline, works for every finealign model):
  ``q = normalize(image_embed(reference) + text_embed(modification))``, ranked by dot product against
  the L2-normalised gallery image embeddings.

Memory: at most ``chunk x G`` scores exist at once.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["compose_queries", "evaluate_tgir", "tgir_metrics", "tgir_ranks"]


@torch.no_grad()
def tgir_ranks(query_embed: Tensor, gallery_embed: Tensor, target: Tensor, exclude: Tensor | None = None,
               chunk: int = 1024) -> Tensor:
    """0-based rank of each query's target among the gallery minus its excluded (reference) image.

    Args:
        query_embed: (Q, E) composed queries; gallery_embed: (G, E).
        target: (Q,) long gallery index of each query's target.
        exclude: (Q,) long gallery index removed from each query's candidates (its reference), or None.
    Returns:
        (Q,) long: wrong, non-excluded gallery images scoring >= the target.
    """
    if query_embed.ndim != 2 or gallery_embed.ndim != 2 or query_embed.shape[1] != gallery_embed.shape[1]:
        raise ValueError(f"need query (Q, E) and gallery (G, E) embeddings, got {tuple(query_embed.shape)} "
                         f"and {tuple(gallery_embed.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    Q, G = query_embed.shape[0], gallery_embed.shape[0]
    target = torch.as_tensor(target).to(device=query_embed.device, dtype=torch.long)
    for name, idx in (("target", target), ("exclude", exclude)):
        if idx is None:
            continue
        idx = torch.as_tensor(idx)
        if idx.shape != (Q,):
            raise ValueError(f"{name} must have shape ({Q},), got {tuple(idx.shape)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= G):
            raise ValueError(f"{name} holds gallery indices outside [0, {G})")
    if exclude is not None:
        exclude = torch.as_tensor(exclude).to(device=query_embed.device, dtype=torch.long)
        if bool((exclude == target).any()):
            raise ValueError("a query's target is also its excluded reference image")
    q, g = query_embed.float(), gallery_embed.float()
    ranks = torch.empty(Q, dtype=torch.long, device=q.device)
    for start in range(0, Q, chunk):
        stop = min(start + chunk, Q)
        sims = q[start:stop] @ g.T                                               # (c, G)
        tgt = target[start:stop, None]                                           # (c, 1)
        pos = sims.gather(1, tgt)                                                # (c, 1)
        sims.scatter_(1, tgt, float("-inf"))                                     # the target is not "wrong"
        if exclude is not None:
            sims.scatter_(1, exclude[start:stop, None], float("-inf"))           # nor the reference
        ranks[start:stop] = (sims >= pos).sum(dim=1)
    return ranks


def tgir_metrics(query_embed: Tensor, gallery_embed: Tensor, target: Tensor, exclude: Tensor | None = None,
                 ks: Sequence[int] = (10, 50), chunk: int = 1024) -> dict[str, float]:
    """``{"r10", "r50", "mean_recall"}`` (for the default ``ks``) in percent; arguments as :func:`tgir_ranks`."""
    if not ks:
        raise ValueError("ks must name at least one K")
    ranks = tgir_ranks(query_embed, gallery_embed, target, exclude, chunk)
    if ranks.numel() == 0:
        raise ValueError("no TGIR queries")
    out = {f"r{k}": 100.0 * int((ranks < k).sum()) / ranks.numel() for k in ks}
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


def compose_queries(reference_embed: Tensor, text_embed: Tensor) -> Tensor:
    """(Q, E) reference image embeddings + (Q, E) modification text embeddings -> (Q, E) unit queries."""
    if reference_embed.shape != text_embed.shape:
        raise ValueError(f"reference {tuple(reference_embed.shape)} and text {tuple(text_embed.shape)} "
                         f"embeddings differ in shape")
    return F.normalize(reference_embed.float() + text_embed.float(), dim=-1)


@torch.no_grad()
def evaluate_tgir(model, cfg, split: str, embed_text: Callable[[list[str]], Tensor],
                  device: torch.device | str = "cpu", progress: bool = False, skips=None, shard=None) -> dict:
    """Run TGIR on ``cfg.data.source``'s triplets of ``split`` (at most ``cfg.eval.max_images`` queries).

    ``embed_text(texts) -> (T, E)`` embeds the modification texts. Gallery images that fail to load are
    reported to ``skips``; queries whose reference or target is missing are left out (noted). With an
    enabled ``shard`` (:class:`.shard.Sharding`, a collective) the gallery is embedded split over the
    ranks and gathered (``embed_text`` must then return every text on every rank).
    Returns ``{"r10", "r50", "mean_recall", "num_queries", "num_gallery", "notes"}``.
    """
    from ..data.loader import unique_images
    from ..data.skips import SkipLog
    from ..data.sources.tgir import build_tgir
    from ..data.transforms import ImageTransform
    from .shard import Sharding, image_pass

    tg = build_tgir(cfg.data, split, max_queries=cfg.eval.max_images)
    transform = ImageTransform(cfg.model.image_size, train=False)
    uniq = unique_images(tg.gallery)
    run = image_pass(uniq, transform, cfg.data.eval_batch_size, cfg.data.workers,
                     skips if skips is not None else SkipLog(),
                     lambda images, _: {"embed": model.encode_image(images.to(device))["embed"].float()},
                     shard or Sharding(), progress, "tgir gallery")
    rows = {uniq[i].image_id: row for row, i in enumerate(run.kept)}
    queries = [q for q in tg.queries if q.reference in rows and q.target in rows]
    if not queries:
        raise ValueError(f"tgir: no query of split {split!r} has both its reference and target images")
    gallery = run.tensors["embed"]                                               # (G, E)
    ref = torch.tensor([rows[q.reference] for q in queries], device=gallery.device)
    tgt = torch.tensor([rows[q.target] for q in queries], device=gallery.device)
    composed = compose_queries(gallery[ref], embed_text([q.text for q in queries]).to(gallery.device))
    out: dict = tgir_metrics(composed, gallery, tgt, exclude=ref)
    out["num_queries"], out["num_gallery"] = len(queries), int(gallery.shape[0])
    out["notes"] = ["query = normalize(image_embed(reference) + text_embed(modification)); "
                    "the reference image is excluded from its own candidates"]
    if len(queries) < len(tg.queries):
        out["notes"].append(f"{len(tg.queries) - len(queries)} queries left out: reference or target "
                            f"image failed to load")
    return out
