"""ITM re-ranking of the ITC top-k in image-text retrieval (ALBEF / LAVIS ``k_test``).

For fusion models (those with an ``itm_head``) ranking every (image, text) pair with the fusion
encoder is too costly, so, as in ALBEF:

1. rank all candidates of every query by ITC similarity (dot product of the embeddings);
2. score each query's top-``k`` candidates with the ITM head, on the fused [CLS] of the pair;
3. re-order those ``k`` by ITM score; candidates outside the top-``k`` keep their ITC order after them.

Both directions are re-ranked: every text query over the images, every image query over the texts.

ITM score: the log-odds of "match", ``logit[1] - logit[0]``. Ranking by it is exactly ranking by
``softmax(logits)[1]`` (a monotone function of it) without saturating at 1.0 in float32; ALBEF ranks by
``logit[1]`` alone, which is not invariant to a shift of both logits.

Ranks follow :mod:`.retrieval`: 0-based rank of the first correct candidate, ties pessimistic. Let the
query's correct candidates be those whose label equals the query's (``text_to_image`` gives labels:
a text's label is its image; several captions of one image are all correct for that image).

* a correct candidate among the top-k: rank = number of *wrong* top-k candidates whose ITM score is
  ``>=`` the best ITM score of a correct top-k candidate;
* none among the top-k: rank = the ITC rank (already >= k, and unchanged by re-ranking the top-k).

Hence ``k = 0`` (or a model without ``itm_head``) gives exactly the ITC metrics.

Memory: ``Q x k`` scores per direction; the fusion encoder runs on ``batch_size`` pairs at a time.
:class:`ITMScorer` keeps the fusion inputs of the whole eval split on the model's device:
image cls + patches ``(I, 1 + N, Dv)`` and text tokens ``(T, L, Dt)`` (ALBEF keeps the same).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .retrieval import _check_inputs, recall_metrics, retrieval_labels, retrieval_ranks, topk_images
from .shard import Sharding

__all__ = ["ITMScorer", "can_rerank", "itm_rerank_metrics", "rerank_ranks", "score_topk"]

PairScorer = Callable[[Tensor, Tensor], Tensor]      # (image_idx (n,), text_idx (n,)) -> (n,) scores


def can_rerank(model) -> bool:
    """True for models with a fusion encoder and an ITM head (``FusionModel``)."""
    return callable(getattr(model, "itm_head", None)) and callable(getattr(model, "fuse", None))


@torch.no_grad()
def score_topk(topk: Tensor, score_pairs: Callable[[Tensor, Tensor], Tensor], batch_size: int = 256,
               progress: bool = False, desc: str = "itm", shard: Sharding | None = None) -> Tensor:
    """Score every (query, candidate) pair of a top-k table.

    Args:
        topk: (Q, k) long, candidate indices of every query.
        score_pairs: ``(query_idx (n,), cand_idx (n,)) -> (n,)`` float scores, n <= ``batch_size``.
        batch_size: pairs per ``score_pairs`` call.
        shard: split the pair batches over ranks (each rank scores a contiguous run of whole batches,
            the scores are gathered): a collective; ``score_pairs`` must score any pair on every rank.
    Returns:
        (Q, k) float32 scores, ``out[q, j]`` for the pair (q, ``topk[q, j]``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    Q, k = topk.shape
    query = torch.arange(Q, device=topk.device).repeat_interleave(k)          # (Q*k,)
    cand = topk.reshape(-1)                                                   # (Q*k,)
    shard = shard or Sharding()
    lo, hi = shard.bounds(Q * k, batch_size)
    out = torch.empty(hi - lo, dtype=torch.float32, device=topk.device)
    bar = tqdm(total=hi - lo, desc=desc, disable=not progress, unit="pair", dynamic_ncols=True)
    error = None
    try:
        for start in range(lo, hi, batch_size):
            stop = min(start + batch_size, hi)
            s = score_pairs(query[start:stop], cand[start:stop])
            if s.shape != (stop - start,):
                raise ValueError(f"score_pairs must return ({stop - start},) scores, got {tuple(s.shape)}")
            out[start - lo:stop - lo] = s.float().to(out.device)
            bar.update(stop - start)
    except Exception as e:
        error = e
    finally:
        bar.close()
    shard.agree(error)
    return shard.gather_rows(out).view(Q, k)


def rerank_ranks(itc_ranks: Tensor, topk: Tensor, scores: Tensor, query_label: Tensor,
                 cand_label: Tensor) -> Tensor:
    """Ranks after re-ordering each query's top-k by ``scores`` (see the module docstring).

    Args:
        itc_ranks: (Q,) long, ITC rank of each query's first correct candidate.
        topk: (Q, k) long, ITC top-k candidate indices; scores: (Q, k) their re-ranking scores.
        query_label: (Q,) long; cand_label: (C,) long. Candidate c is correct for query q iff
            ``cand_label[c] == query_label[q]``.
    Returns:
        (Q,) long re-ranked ranks.
    """
    correct = cand_label[topk] == query_label[:, None]                         # (Q, k) bool
    best = scores.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)  # (Q, 1)
    ahead = ((scores >= best) & ~correct).sum(dim=1)                           # (Q,)
    return torch.where(correct.any(dim=1), ahead, itc_ranks)


@torch.no_grad()
def itm_rerank_metrics(image_embed: Tensor, text_embed: Tensor, text_to_image: Tensor, k: int,
                       score_pairs: PairScorer | None, ks: Sequence[int] = (1, 5, 10), batch_size: int = 256,
                       chunk: int = 1024, progress: bool = False,
                       image_groups: Tensor | None = None, shard: Sharding | None = None) -> dict[str, float]:
    """Recall@K with ITM re-ranking of the ITC top-``k``, plus the ITC-only recalls.

    Args:
        image_embed: (I, E), text_embed: (T, E) embeddings; text_to_image: (T,) long (see retrieval.py).
        k: candidates re-ranked per query (clipped to I for texts, to T for images); 0 = no re-ranking.
        score_pairs: ``(image_idx (n,), text_idx (n,)) -> (n,)`` ITM scores (higher = better match),
            e.g. an :class:`ITMScorer`; unused (may be None) when ``k == 0``.
        shard: spread the ITM scoring over ranks (see :func:`score_topk`); every rank gets the results.
    Returns:
        ``k == 0``: exactly :func:`.retrieval.retrieval_metrics`. Otherwise the re-ranked
        ``{"i2t_r1", ..., "mean_recall"}``, the ITC-only ones as ``"itc_i2t_r1", ..., "itc_mean_recall"``
        and ``"k_test": k`` (int).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0 (0 = no re-ranking), got {k}")
    i2t_itc, t2i_itc = retrieval_ranks(image_embed, text_embed, text_to_image, chunk=chunk,
                                       image_groups=image_groups)
    itc = recall_metrics(i2t_itc, t2i_itc, ks)
    if k == 0:
        return itc
    if score_pairs is None:
        raise ValueError("itm_rerank_metrics with k > 0 needs score_pairs")
    t2i = _check_inputs(image_embed, text_embed, text_to_image)
    g_img, g_txt = retrieval_labels(t2i, image_embed.shape[0], image_groups)    # match iff labels equal

    # text queries over images: query q is text q, candidate c is image c
    top_t = topk_images(image_embed, text_embed, k, chunk)                            # (T, k)
    s_t = score_topk(top_t, lambda q, c: score_pairs(c, q), batch_size, progress, "itm t2i", shard)
    t2i_ranks = rerank_ranks(t2i_itc, top_t, s_t, g_txt, g_img)
    # image queries over texts: query q is image q, candidate c is text c
    top_i = topk_images(text_embed, image_embed, k, chunk)                            # (I, k)
    s_i = score_topk(top_i, score_pairs, batch_size, progress, "itm i2t", shard)
    i2t_ranks = rerank_ranks(i2t_itc, top_i, s_i, g_img, g_txt)

    out: dict = recall_metrics(i2t_ranks, t2i_ranks, ks)
    out.update({f"itc_{name}": v for name, v in itc.items()})
    out["k_test"] = int(k)
    return out


class ITMScorer:
    """ITM log-odds of (image, text) pairs of an eval split, for :func:`itm_rerank_metrics`.

    Fill it with :meth:`add_images` (once per image batch, in eval order) and :meth:`set_texts`, then
    call ``scorer(image_idx (n,), text_idx (n,)) -> (n,)`` float32 ``logit[1] - logit[0]``.
    """

    def __init__(self, model):
        if not can_rerank(model):
            raise TypeError(f"{type(model).__name__} has no fusion encoder / itm_head: no ITM re-ranking")
        self.model = model
        self._images: list[Tensor] = []
        self.images: Tensor | None = None            # (I, 1 + N, Dv): [cls | patches]
        self.text_tokens: Tensor | None = None       # (T, L, Dt)
        self.text_mask: Tensor | None = None         # (T, L) bool

    @staticmethod
    def image_features(image_out: dict) -> Tensor:
        """(B, 1 + N, Dv) fusion inputs from ``model.encode_image(images)`` (``cls`` (B, Dv), ``patches``)."""
        return torch.cat([image_out["cls"][:, None], image_out["patches"]], dim=1)

    def add_images(self, image_out: dict) -> None:
        """``image_out``: ``model.encode_image(images)`` with ``cls`` (B, Dv) and ``patches`` (B, N, Dv)."""
        self._images.append(self.image_features(image_out))
        self.images = None

    def set_images(self, features: Tensor) -> None:
        """All images at once: (I, 1 + N, Dv) rows of :meth:`image_features`, in eval order."""
        self.images, self._images = features, [features]

    def set_texts(self, tokens: Tensor, mask: Tensor) -> None:
        """tokens (T, L, Dt) from ``model.encode_text(...)["tokens"]``, mask (T, L) True on real tokens."""
        if tokens.shape[:2] != mask.shape:
            raise ValueError(f"text tokens {tuple(tokens.shape)} and mask {tuple(mask.shape)} disagree")
        self.text_tokens, self.text_mask = tokens, mask.bool()

    @torch.no_grad()
    def __call__(self, image_idx: Tensor, text_idx: Tensor) -> Tensor:
        if self.images is None:
            if not self._images:
                raise RuntimeError("ITMScorer: no images added")
            self.images = torch.cat(self._images)
            self._images = [self.images]
        if self.text_tokens is None:
            raise RuntimeError("ITMScorer: call set_texts first")
        # each distinct image once: its cross-attention keys/values are projected once for all its pairs
        uniq, inv = torch.unique(image_idx.to(self.images.device), return_inverse=True)
        img = self.images[uniq]                                              # (u, 1 + N, Dv)
        t = text_idx.to(self.text_tokens.device)
        fused = self.model.fuse(self.text_tokens[t], self.text_mask[t], img[:, 0], img[:, 1:],
                                image_index=inv)["cls"]                      # (n, Dt)
        logits = self.model.itm_head(fused).float()                          # (n, 2)
        return logits[:, 1] - logits[:, 0]
