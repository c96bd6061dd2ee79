"""Glue between sources, transforms, tokenizer and the trainer / evaluator.

* ``build_source(cfg, split, skips)``: registered source + deterministic ``cfg.fraction`` subset.
* ``PairDataset``: map-style (image, caption) pairs; bad samples come back as ``Skipped``.
* ``collate_items`` / ``Collator``: items -> ``Batch`` (tokenisation happens in the main process).
  With ``data.views: 2`` the training transform is a ``TwoViewTransform``: an item's ``image`` is
  a pair of views (decoded once, transformed twice) and the batch gets ``images2``.
* ``TrainLoader`` (defined in ``train_loader.py``, importable from here): endless, deterministic,
  resumable batch iterator (map-style or streaming; one rank or several); the batch orders live in
  ``batching.py`` (random / grouped / semi_hard) and ``streaming.py`` (shards per rank and worker).
* ``iter_eval_images`` / ``collect_captions``: unique images and all captions of an eval split.

Determinism: the order of epoch ``e`` (random sampler) is ``randperm(N, Generator().manual_seed(seed
+ e))`` over caption pairs; augmentation randomness of pair ``i`` in epoch ``e`` is seeded by
``sample_seed(seed, e, i)``. Neither depends on the number of workers, so a run resumed from
``TrainLoader.state_dict()`` sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import replace
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..config import DataConfig
from ..registry import SOURCES
from ..types import Batch, Sample
from .skips import BadSampleError, SkipLog
from .sources.common import Skipped, classify_error, load_item, sample_seed

__all__ = ["BadSampleError", "Collator", "PairDataset", "Skipped", "TrainLoader", "apply_fraction",
           "build_source", "classify_error", "collate_items", "collect_captions",
           "iter_eval_images", "sample_seed", "unique_images"]


def is_map_style(src: Any) -> bool:
    return (not isinstance(src, IterableDataset) and hasattr(src, "__len__")
            and hasattr(src, "__getitem__"))


# ---------------------------------------------------------------------------- sources

def build_source(cfg: DataConfig, split: str, skips: SkipLog):
    """Build ``cfg.source`` for ``split``; the train split is cut to ``cfg.fraction``."""
    from . import sources as _  # noqa: F401  (registers every source)
    src = SOURCES.get(cfg.source)(cfg, split, skips)
    if split == "train" and cfg.fraction < 1.0:
        src = apply_fraction(src, cfg.fraction, cfg.seed)
    return src


def apply_fraction(src, fraction: float, seed: int):
    """Map-style: the first ceil(fraction * N) entries of ``randperm(N)`` seeded by ``seed``
    (kept in their original order). Streams: each sample is kept iff a stable hash of
    (seed, key) falls below ``fraction`` (about that fraction, deterministically)."""
    if fraction >= 1.0:
        return src
    if is_map_style(src):
        n = len(src)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
        keep = sorted(perm[: math.ceil(fraction * n)].tolist())
        return [src[i] for i in keep]
    return FractionStream(src, fraction, seed)


class FractionStream(IterableDataset):
    """Deterministic ~fraction subset of a streaming source (hash of seed and sample key)."""

    def __init__(self, src, fraction: float, seed: int):
        super().__init__()
        self.src, self.fraction, self.seed = src, float(fraction), int(seed)

    def _keep(self, s: Sample) -> bool:
        h = hashlib.blake2b(f"{self.seed}:{s.key}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") / 2.0**64 < self.fraction

    def iter_with_skips(self) -> Iterator[Sample | Skipped]:
        it = self.src.iter_with_skips() if hasattr(self.src, "iter_with_skips") else iter(self.src)
        for x in it:
            if isinstance(x, Skipped) or self._keep(x):
                yield x

    def __iter__(self) -> Iterator[Sample]:
        return (s for s in iter(self.src) if self._keep(s))

    @property
    def shards(self) -> list[str] | None:
        """The wrapped source's shard list (None when it has none)."""
        return getattr(self.src, "shards", None)

    def with_shards(self, shards: list[str], id_stride: int = 1, id_offset: int = 0) -> "FractionStream":
        """The same subset rule over the wrapped source restricted to ``shards``."""
        return FractionStream(self.src.with_shards(shards, id_stride, id_offset), self.fraction, self.seed)


# ---------------------------------------------------------------------------- items

class PairDataset(Dataset):
    """Map-style dataset over (image, caption) pairs: each Sample gives one entry per caption.

    ``dataset[i]`` or ``dataset[(epoch, i)]`` -> item dict or ``Skipped``. With ``train`` the
    transform gets a ``random.Random(sample_seed(seed, epoch, i))``.
    """

    def __init__(self, samples: Sequence[Sample], transform, train: bool, seed: int = 0,
                 strict: bool = False):
        self.samples = samples if isinstance(samples, list) else list(samples)
        self.transform, self.train, self.seed, self.strict = transform, bool(train), int(seed), strict
        counts = np.fromiter((max(len(s.captions), 1) for s in self.samples), dtype=np.int64,
                             count=len(self.samples))
        self._sample_idx = np.repeat(np.arange(len(self.samples), dtype=np.int64), counts)   # (P,)
        starts = np.cumsum(counts) - counts
        self._caption_idx = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(starts, counts)

    def __len__(self) -> int:
        return int(self._sample_idx.shape[0])

    def pair(self, i: int) -> tuple[int, str]:
        """``(index into samples, caption)`` of entry ``i``, without loading the image."""
        si, ci = int(self._sample_idx[i]), int(self._caption_idx[i])
        caps = self.samples[si].captions
        return si, (caps[ci] if ci < len(caps) else "")

    def __getitem__(self, idx) -> dict | Skipped:
        epoch, i = (int(idx[0]), int(idx[1])) if isinstance(idx, tuple) else (0, int(idx))
        si, cap = self.pair(i)
        rng = random.Random(sample_seed(self.seed, epoch, i)) if self.train else None
        return load_item(self.samples[si], cap, self.transform, rng, self.strict)


# ---------------------------------------------------------------------------- collation

def collate_items(items: Sequence[dict | Skipped]) -> dict:
    """Items -> dict of stacked images and lists (no tokenisation; safe in workers).

    Items whose ``image`` is a ``(view1, view2)`` pair (``TwoViewTransform``) give ``images``
    (view 1) and ``images2`` (view 2); otherwise ``images2`` is None."""
    good = [x for x in items if not isinstance(x, Skipped)]
    two = bool(good) and isinstance(good[0]["image"], (tuple, list))
    first = [g["image"][0] if two else g["image"] for g in good]
    return {
        "images": torch.stack(first) if good else None,                      # (B, 3, S, S)
        "images2": torch.stack([g["image"][1] for g in good]) if two else None,   # (B, 3, S, S)
        "captions": [g["caption"] for g in good],
        "image_ids": torch.tensor([g["image_id"] for g in good], dtype=torch.long),   # (B,)
        "item_ids": torch.tensor([g["item_id"] for g in good], dtype=torch.long),     # (B,)
        "keys": [g["key"] for g in good],
        "regions": [g["regions"] for g in good],
        "labels": [g["label"] for g in good],
        "categories": [g["category"] for g in good],
        "subcategories": [g.get("subcategory") for g in good],
        "skipped": [(x.reason, x.key) for x in items if isinstance(x, Skipped)],
    }


class Collator:
    """List of items / ``Skipped`` -> ``Batch``; ``finish`` tokenises an already collated dict.

    An all-skipped list gives a Batch with zero rows (images ``(0, 3, S, S)`` with
    ``S = image_size`` or 0 if unknown).
    """

    def __init__(self, tokenizer, context_length: int, image_size: int | None = None):
        self.tokenizer, self.context_length, self.image_size = tokenizer, int(context_length), image_size

    def __call__(self, items: Sequence[dict | Skipped]) -> Batch:
        return self.finish(collate_items(items))

    def finish(self, parts: dict) -> Batch:
        text, mask = self.tokenizer.encode_batch(parts["captions"], self.context_length)  # (B, T)
        images = parts["images"]
        if images is None:
            s = int(self.image_size or 0)
            images = torch.zeros((0, 3, s, s))
        return Batch(images=images, text=text, text_mask=mask, image_ids=parts["image_ids"],
                     item_ids=parts["item_ids"], captions=parts["captions"], keys=parts["keys"],
                     skipped=parts["skipped"], images2=parts.get("images2"),
                     extras={"regions": parts["regions"], "labels": parts["labels"],
                             "categories": parts["categories"],
                             "subcategories": parts.get("subcategories", [None] * len(parts["captions"]))})


# ---------------------------------------------------------------------------- training loader

def __getattr__(name: str):
    # ``TrainLoader`` lives in train_loader.py (which imports this module): resolved on first use
    if name == "TrainLoader":
        from .train_loader import TrainLoader
        return TrainLoader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------- evaluation

def unique_images(samples: Iterable[Sample]) -> list[Sample]:
    """Deduplicate by ``key`` keeping the first occurrence (later captions are merged into a
    copy). Sources already yield unique images; streaming sources are materialised."""
    seen: dict[str, int] = {}
    out: list[Sample] = []
    for s in samples:
        j = seen.get(s.key)
        if j is None:
            seen[s.key] = len(out)
            out.append(s)
        else:
            out[j] = replace(out[j], captions=out[j].captions + list(s.captions))
    return out


def collect_captions(samples: Iterable[Sample]) -> tuple[list[str], Tensor]:
    """All captions of the unique images -> ``(texts, text_to_image (N_texts,) long)``;
    ``text_to_image[k]`` is the position of caption k's image in ``unique_images(samples)``
    (for the Samples kept by ``iter_eval_images``: the row of the stacked image embeddings)."""
    texts, owner = [], []
    for i, s in enumerate(unique_images(samples)):
        for c in s.captions:
            c = " ".join(c.split())
            if c:
                texts.append(c)
                owner.append(i)
    return texts, torch.tensor(owner, dtype=torch.long)


class _EvalImages(Dataset):
    def __init__(self, samples: list[Sample], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        item = load_item(self.samples[i], "-", self.transform, None, strict=False)
        return item if isinstance(item, Skipped) else (i, item["image"])


def _collate_eval(items: list) -> tuple[Tensor | None, list[int], list[tuple[str, str]]]:
    good = [x for x in items if not isinstance(x, Skipped)]
    images = torch.stack([x[1] for x in good]) if good else None            # (B, 3, S, S)
    return images, [x[0] for x in good], [(x.reason, x.key) for x in items if isinstance(x, Skipped)]


def iter_eval_images(samples: Iterable[Sample], transform, batch_size: int, workers: int = 0,
                     skips: SkipLog | None = None) -> Iterator[tuple[Tensor, list[Sample]]]:
    """Yield ``(images (B, 3, S, S), samples)`` over the unique images of an eval split, in order.

    Bad images are left out and reported to ``skips`` (raising there under ``skips.strict``).
    Streaming sources are materialised first (eval splits are small).
    """
    uniq = unique_images(samples)
    dl = DataLoader(_EvalImages(uniq, transform), batch_size=int(batch_size), shuffle=False,
                    num_workers=int(workers), collate_fn=_collate_eval)
    for images, idx, skipped in dl:
        for reason, key in skipped:
            if skips is not None:
                skips.skip(reason, key)
        if images is not None:
            yield images, [uniq[i] for i in idx]
