"""Image-text retrieval metrics (Recall@K), computed in chunks.

Conventions
-----------
* Embeddings are compared with a plain dot product. Pass L2-normalised embeddings to get cosine
  similarity (``Features.image_embed`` / ``Features.text_embed`` already are).
* ``text_to_image[t]`` is the index (row of ``image_embed``) of the image that caption ``t`` describes;
  an image may have several captions (COCO: 5, Flickr30k: 5).
* **image -> text**: image ``i`` is a hit at K if ANY of its captions is among its top-K texts.
  Its rank is the rank of its best-scoring (first correct) caption.
* **text -> image**: caption ``t`` is a hit at K if its image is among its top-K images.
* ``image_groups`` (I,) (optional, e.g. item ids of multi-view fashion data where several images share
  one description): every image of the caption's group is correct, and every caption of the image's
  group — item-level retrieval. Default: each image is its own group (the usual image-level protocol).
* **Ties are resolved pessimistically**: the rank of the first correct item is the number of
  *wrong* items whose score is ``>=`` that item's score (0 = retrieved first). A wrong item tied
  with the correct one is therefore ranked ahead of it, so a degenerate model that outputs constant
  embeddings scores R@K = 0 instead of a flattering, order-dependent number. Ties among the correct
  captions of one image do not matter (only the best one counts).
* Recalls are percentages in [0, 100]; ``mean_recall`` is the mean of all reported recalls
  (the "RSUM / 6" number of the ALBEF / BLIP / CoCa tables for ``ks=(1, 5, 10)``).

Speed and memory: one product ``image_embed @ text_embed.T`` per chunk of ``chunk`` images serves both
directions: image rows give the image -> text ranks, and every caption column adds the images of the
chunk that score >= its correct image to its text -> image rank. The correct pairs are gathered
(index lists, not ``chunk x T`` bool masks); the correct scores each caption is compared against come
from a pre-pass over small blocks of the same product (verified against the chunk's own scores; on a
mismatch the text -> image ranks are recomputed the direct way). At most ``min(chunk, 256) x T`` scores
plus as many bytes exist at once (about 32 MB for 25k captions): ``chunk`` is an upper bound.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["label_ranks", "retrieval_labels", "recall_metrics", "retrieval_metrics", "retrieval_ranks", "single_target_ranks", "topk_images"]


def _check_inputs(image_embed: Tensor, text_embed: Tensor, text_to_image: Tensor) -> Tensor:
    if image_embed.ndim != 2 or text_embed.ndim != 2:
        raise ValueError(f"embeddings must be 2-D, got image {tuple(image_embed.shape)} "
                         f"and text {tuple(text_embed.shape)}")
    if image_embed.shape[1] != text_embed.shape[1]:
        raise ValueError(f"embedding sizes differ: image {image_embed.shape[1]} vs text {text_embed.shape[1]}")
    text_to_image = torch.as_tensor(text_to_image).to(device=image_embed.device, dtype=torch.long)
    if text_to_image.shape != (text_embed.shape[0],):
        raise ValueError(f"text_to_image must have shape ({text_embed.shape[0]},) (one image index per "
                         f"caption), got {tuple(text_to_image.shape)}")
    n_img = image_embed.shape[0]
    if text_to_image.numel() and (int(text_to_image.min()) < 0 or int(text_to_image.max()) >= n_img):
        raise ValueError(f"text_to_image holds indices outside [0, {n_img}): "
                         f"min {int(text_to_image.min())}, max {int(text_to_image.max())}")
    counts = torch.bincount(text_to_image, minlength=n_img)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten()[:10].tolist()
        raise ValueError(f"{int((counts == 0).sum())} image(s) have no caption in text_to_image "
                         f"(e.g. image indices {missing}); image->text recall is undefined for them")
    return text_to_image


def _as_float(x: Tensor) -> Tensor:
    """Half / bfloat16 embeddings are scored in float32 (fewer spurious ties)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


@torch.no_grad()
def retrieval_ranks(image_embed: Tensor, text_embed: Tensor, text_to_image: Tensor,
                    chunk: int = 1024, image_groups: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """0-based rank of the first correct item, ties pessimistic (see module docstring).

    Args:
        image_embed: (I, E) image embeddings.
        text_embed: (T, E) caption embeddings.
        text_to_image: (T,) long, image index of every caption.
        chunk: at most this many rows of the similarity matrix are scored at once.
        image_groups: (I,) long group (item) of every image, or None (each image its own group).
    Returns:
        ``(i2t_ranks (I,), t2i_ranks (T,))`` long tensors on the embeddings' device.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    t2i = _check_inputs(image_embed, text_embed, text_to_image)
    img, txt = _as_float(image_embed), _as_float(text_embed)
    g_img, g_txt = retrieval_labels(t2i, img.shape[0], image_groups)
    return _joint_label_ranks(img, txt, g_img, g_txt, chunk)


def retrieval_labels(text_to_image: Tensor, num_images: int, image_groups: Tensor | None = None
                     ) -> tuple[Tensor, Tensor]:
    """(image labels (I,), text labels (T,)): an image and a caption match iff their labels are equal."""
    device = text_to_image.device
    if image_groups is None:
        g = torch.arange(num_images, device=device)
    else:
        g = torch.as_tensor(image_groups, device=device).long()
        if g.shape != (num_images,):
            raise ValueError(f"image_groups must have shape ({num_images},), got {tuple(g.shape)}")
    return g, g[text_to_image]


# rows per product (at most ``chunk``): 256 x 25k fp32 scores (25 MB) stay in a 32 MB L3 cache between the
# product and the counting passes that read them (5k x 25k, E 512: 1.16 s instead of 1.25 s with 1024 rows)
_ROWS = 256

# a query's correct keys are gathered as a padded (Q, m) index table when that stays small; otherwise
# (huge label groups) the chunk x K bool-mask path below is used
_MAX_PAIRS_PER_ROW = 64


def _correct_keys(query_label: Tensor, key_label: Tensor) -> tuple[Tensor, Tensor] | None:
    """Keys with each query's label: ``(idx (Q, m) long, valid (Q, m) bool)``, m = the most keys any query
    has (at least 1); padding repeats the query's last correct key (index 0 if it has none) and is
    marked invalid. None when the table would be large (m > _MAX_PAIRS_PER_ROW and Q*m > Q + K)."""
    Q, K = query_label.shape[0], key_label.shape[0]
    device = key_label.device
    order = torch.argsort(key_label, stable=True)                            # keys grouped by label
    labels, counts = torch.unique_consecutive(key_label[order], return_counts=True)
    if labels.numel() == 0:
        return torch.zeros(Q, 1, dtype=torch.long, device=device), torch.zeros(Q, 1, dtype=torch.bool,
                                                                               device=device)
    starts = counts.cumsum(0) - counts
    at = torch.searchsorted(labels, query_label).clamp(max=labels.numel() - 1)  # (Q,)
    n = torch.where(labels[at] == query_label, counts[at], torch.zeros_like(counts[at]))
    m = max(int(n.max()) if Q else 0, 1)
    if m > _MAX_PAIRS_PER_ROW and Q * m > Q + K:
        return None
    j = torch.arange(m, device=device)[None, :]                               # (1, m)
    valid = j < n[:, None]                                                    # (Q, m)
    slot = starts[at][:, None] + torch.minimum(j, (n - 1).clamp(min=0)[:, None])
    return torch.where(n[:, None] > 0, order[slot], torch.zeros_like(slot)), valid


def _count_ge(scores: Tensor, threshold: Tensor, dim: int, buf: Tensor) -> Tensor:
    """How many ``scores >= threshold`` (broadcast) along ``dim``, via a reused byte buffer: int32."""
    return torch.ge(scores, threshold, out=buf).view(torch.uint8).sum(dim, dtype=torch.int32)


def label_ranks(queries: Tensor, keys: Tensor, query_label: Tensor, key_label: Tensor,
                chunk: int = 1024) -> Tensor:
    """queries (Q, E), keys (K, E); key k is correct for query q iff key_label[k] == query_label[q] ->
    (Q,) long: how many wrong keys score >= the best correct one (0 = top-1; ties count against)."""
    pairs = _correct_keys(query_label, key_label)
    if pairs is None:
        return _label_ranks_masked(queries, keys, query_label, key_label, chunk)
    idx, valid = pairs
    Q, K = queries.shape[0], keys.shape[0]
    ranks = torch.empty(Q, dtype=torch.long, device=queries.device)
    rows = min(chunk, _ROWS)
    c = min(rows, Q)
    sims_buf = queries.new_empty(c, K)
    ge_buf = torch.empty(c, K, dtype=torch.bool, device=queries.device)
    for start in range(0, Q, rows):
        stop = min(start + rows, Q)
        n = stop - start
        sims = torch.mm(queries[start:stop], keys.T, out=sims_buf[:n])          # (c, K)
        own = sims.gather(1, idx[start:stop])                                   # (c, m) correct keys' scores
        ok = valid[start:stop]
        best = own.masked_fill(~ok, float("-inf")).amax(dim=1, keepdim=True)   # (c, 1)
        ranks[start:stop] = _count_ge(sims, best, 1, ge_buf[:n]) - ((own >= best) & ok).sum(dim=1)
    return ranks


def _label_ranks_masked(queries: Tensor, keys: Tensor, query_label: Tensor, key_label: Tensor,
                        chunk: int = 1024) -> Tensor:
    """``label_ranks`` with chunk x K bool masks (for label groups too large to gather)."""
    ranks = torch.empty(queries.shape[0], dtype=torch.long, device=queries.device)
    for start in range(0, queries.shape[0], chunk):
        stop = min(start + chunk, queries.shape[0])
        sims = queries[start:stop] @ keys.T                                      # (c, K)
        correct = key_label[None, :] == query_label[start:stop, None]            # (c, K) bool
        best = sims.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)  # (c, 1)
        sims.masked_fill_(correct, float("-inf"))                                # wrong keys only
        ranks[start:stop] = (sims >= best).sum(dim=1)
        del sims, correct
    return ranks


def _joint_label_ranks(img: Tensor, txt: Tensor, g_img: Tensor, g_txt: Tensor, chunk: int
                       ) -> tuple[Tensor, Tensor]:
    """(i2t (I,), t2i (T,)) ranks as two ``label_ranks`` calls would give, from one product per chunk.

    Image rows of S = img @ txt.T give i2t as in ``label_ranks``. For t2i, caption t needs the score of
    its best correct image, pos[t], before any chunk is counted: a pre-pass takes the scores of all
    correct pairs from small blocks img[a:b] @ txt[cols].T, and each chunk checks them against its own
    scores. Then rank[t] = #(images with S[i, t] >= pos[t]) - #(correct ones among them)."""
    pairs = _correct_keys(g_img, g_txt)
    if pairs is None:
        return (_label_ranks_masked(img, txt, g_img, g_txt, chunk),
                _label_ranks_masked(txt, img, g_txt, g_img, chunk))
    idx, valid = pairs                                                        # (I, m): correct texts
    I, T = img.shape[0], txt.shape[0]
    # pre-pass: scores of every correct (image, text) pair, as blocks of the same product give them
    own = img.new_empty(idx.shape)                                            # (I, m)
    block = min(chunk, _ROWS)
    for a in range(0, I, block):
        b = min(a + block, I)
        cols, where = torch.unique(idx[a:b], return_inverse=True)             # texts of these images
        own[a:b] = (img[a:b] @ txt[cols].T).gather(1, where)                  # (c, m)
    t_of, s_of = idx[valid], own[valid]                                       # all correct pairs
    pos = torch.full((T,), float("-inf"), dtype=img.dtype, device=img.device)
    pos.scatter_reduce_(0, t_of, s_of, reduce="amax")                        # (T,) best correct image
    correct_ge = torch.zeros(T, dtype=torch.long, device=img.device)
    correct_ge.index_add_(0, t_of, (s_of >= pos[t_of]).long())               # correct images >= pos

    i2t = torch.empty(I, dtype=torch.long, device=img.device)
    t2i = torch.zeros(T, dtype=torch.long, device=img.device)
    rows = min(chunk, _ROWS)
    c = min(rows, I)
    sims_buf = img.new_empty(c, T)
    ge_buf = torch.empty(c, T, dtype=torch.bool, device=img.device)
    consistent = True
    for start in range(0, I, rows):
        stop = min(start + rows, I)
        n = stop - start
        sims = torch.mm(img[start:stop], txt.T, out=sims_buf[:n])               # (c, T)
        got = sims.gather(1, idx[start:stop])                                   # (c, m)
        consistent = consistent and torch.equal(got, own[start:stop])
        ok = valid[start:stop]
        best = got.masked_fill(~ok, float("-inf")).amax(dim=1, keepdim=True)   # (c, 1)
        i2t[start:stop] = _count_ge(sims, best, 1, ge_buf[:n]) - ((got >= best) & ok).sum(dim=1)
        t2i += _count_ge(sims, pos[None, :], 0, ge_buf[:n])                     # (T,)
    del sims_buf, ge_buf
    if not consistent:        # the blocked pre-pass rounded differently (or NaN scores): direct t2i
        return i2t, label_ranks(txt, img, g_txt, g_img, chunk)
    return i2t, t2i - correct_ge


def single_target_ranks(queries: Tensor, keys: Tensor, target: Tensor, chunk: int = 1024) -> Tensor:
    """queries (Q, E), keys (K, E), target (Q,) index of each query's one correct key ->
    (Q,) long: how many wrong keys score >= the correct one (0 = top-1; ties count against)."""
    ranks = torch.empty(queries.shape[0], dtype=torch.long, device=queries.device)
    for start in range(0, queries.shape[0], chunk):
        stop = min(start + chunk, queries.shape[0])
        sims = queries[start:stop] @ keys.T                                      # (c, K)
        tgt = target[start:stop, None]                                           # (c, 1)
        pos = sims.gather(1, tgt)                                                # (c, 1)
        sims.scatter_(1, tgt, float("-inf"))                                     # wrong keys only
        ranks[start:stop] = (sims >= pos).sum(dim=1)
        del sims
    return ranks


def retrieval_metrics(image_embed: Tensor, text_embed: Tensor, text_to_image: Tensor,
                      ks: Sequence[int] = (1, 5, 10), chunk: int = 1024,
                      image_groups: Tensor | None = None) -> dict[str, float]:
    """Recall@K in both directions, in percent.

    Args:
        image_embed: (I, E) image embeddings (L2-normalised for cosine similarity).
        text_embed: (T, E) caption embeddings.
        text_to_image: (T,) long, index into ``image_embed`` of each caption's image.
        ks: the K values to report.
        chunk: at most this many rows of the similarity matrix exist at once (memory ~ chunk x max(I, T)).
        image_groups: (I,) long, optional item of every image (item-level retrieval, see above).
    Returns:
        ``{"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall"}`` (for the
        default ``ks``) as Python floats in [0, 100].
    """
    i2t, t2i = retrieval_ranks(image_embed, text_embed, text_to_image, chunk=chunk, image_groups=image_groups)
    return recall_metrics(i2t, t2i, ks)


def recall_metrics(i2t_ranks: Tensor, t2i_ranks: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """0-based ranks ``i2t (I,)``, ``t2i (T,)`` -> ``{"i2t_r{k}", "t2i_r{k}", "mean_recall"}`` in percent."""
    if not ks:
        raise ValueError("ks must name at least one K")
    i2t, t2i = i2t_ranks, t2i_ranks
    out: dict[str, float] = {}
    for k in ks:                                   # exact integer counts: same numbers on CPU and GPU
        out[f"i2t_r{k}"] = 100.0 * int((i2t < k).sum()) / i2t.numel()
    for k in ks:
        out[f"t2i_r{k}"] = 100.0 * int((t2i < k).sum()) / t2i.numel()
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


@torch.no_grad()
def topk_images(image_embed: Tensor, text_embed: Tensor, k: int, chunk: int = 1024) -> Tensor:
    """Indices of the ``k`` most similar images for every caption, best first.

    Args:
        image_embed: (I, E); text_embed: (T, E); k: clipped to I.
    Returns:
        (T, min(k, I)) long tensor. Ties follow ``torch.topk`` (unspecified order).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    img, txt = _as_float(image_embed), _as_float(text_embed)
    k = min(k, img.shape[0])
    out = torch.empty(txt.shape[0], k, dtype=torch.long, device=img.device)
    for start in range(0, txt.shape[0], chunk):
        stop = min(start + chunk, txt.shape[0])
        sims = txt[start:stop] @ img.T                                           # (c, I)
        out[start:stop] = sims.topk(k, dim=1).indices
    return out
