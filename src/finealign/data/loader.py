"""Glue between sources, transforms, tokenizer and the trainer / evaluator.

* ``build_source(cfg, split, skips)``: registered source + deterministic ``cfg.fraction`` subset.
* ``PairDataset``: map-style (image, caption) pairs; bad samples come back as ``Skipped``.
* ``collate_items`` / ``Collator``: items -> ``Batch`` (tokenisation happens in the main process).
  With ``data.views: 2`` the training transform is a ``TwoViewTransform``: an item's ``image`` is
  a pair of views (decoded once, transformed twice) and the batch gets ``images2``.
* ``TrainLoader``: endless, deterministic, resumable batch iterator (map-style or streaming);
  the batch orders themselves (random / grouped / semi_hard, streaming) live in ``batching.py``.
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
from .batching import SemiHardBatches, StreamBatches, build_batches
from .skips import BadSampleError, SkipLog
from .sources.common import Skipped, classify_error, load_item, sample_seed
from .transforms import ImageTransform, TwoViewTransform

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

class TrainLoader:
    """Endless iterator of training ``Batch``es with a deterministic, resumable order.

    Map-style sources: the batch plan ``cfg.sampler`` names (``data.batching``): random (epoch ``e``
    visits caption pairs in ``randperm(N, seed + e)`` order, ``N // batch_size`` batches, drop_last),
    grouped or semi_hard (``update_embeddings`` feeds it). Streaming sources (webdataset, random
    only): shards are read in order through a seeded shuffle buffer (``shuffle_buffer`` samples,
    seed from (seed, epoch)); one caption per sample is drawn; an epoch is one pass. A resume
    replays the stream and skips the consumed ``position * batch_size`` samples without decoding.

    Batches may hold fewer than ``batch_size`` rows when samples were skipped (listed in
    ``Batch.skipped`` and counted in ``self.skips``); all-skipped batches are not yielded (their
    skips ride along with the next batch). Settings come from ``cfg`` (batch_size, workers,
    seed, augment, strict, sampler, views); ``transform`` overrides the default training
    ``ImageTransform``; with ``views: 2`` it is wrapped in a ``TwoViewTransform`` (``Batch.images2``).
    ``state_dict()`` -> ``{"epoch", "position"}`` (batches consumed in the epoch) plus, for
    semi_hard, ``"sampler": {"kind", "used" (N,) bool, "embeddings" (N, E) or None}``;
    ``load_state_dict`` continues with exactly the next batch. Restarting an iterator never
    draws from the global torch RNG (the DataLoader has its own generator).
    """

    def __init__(self, source, tokenizer, cfg: DataConfig, image_size: int, context_length: int,
                 skips: SkipLog | None = None, shuffle_buffer: int = 1000, transform=None):
        self.cfg = cfg
        self.collator = Collator(tokenizer, context_length, image_size)
        self.batch_size, self.seed, self.workers = int(cfg.batch_size), int(cfg.seed), int(cfg.workers)
        transform = transform or ImageTransform(image_size, train=True, augment=cfg.augment)
        self.views = int(getattr(cfg, "views", 1))
        if self.views not in (1, 2):
            raise ValueError(f"data.views must be 1 or 2, got {self.views}")
        if self.views == 2:
            transform = TwoViewTransform(transform)
        self.skips = skips if skips is not None else SkipLog(strict=cfg.strict)
        self.epoch, self.position = 0, 0
        self._it: Iterator | None = None
        self._nonempty = False
        self._pending: list[tuple[str, str]] = []  # skips of dropped all-skipped batches
        self.map_style = is_map_style(source)
        gen = torch.Generator().manual_seed(self.seed)      # iterator seeds: not the global RNG
        if self.map_style:
            self.dataset = PairDataset(source, transform, train=True, seed=self.seed, strict=cfg.strict)
            if len(self.dataset) < self.batch_size:
                raise ValueError(f"training split has {len(self.dataset)} (image, caption) pairs, "
                                 f"fewer than data.batch_size={self.batch_size}")
            self._sampler = build_batches(self.dataset, cfg)
            self._dl = DataLoader(self.dataset, batch_sampler=self._sampler, collate_fn=collate_items,
                                  num_workers=self.workers, persistent_workers=self.workers > 0,
                                  generator=gen)
        else:
            if cfg.sampler != "random":
                raise ValueError(f"data.sampler={cfg.sampler} needs a map-style source; "
                                 f"{type(source).__name__} streams (use data.sampler=random)")
            self.dataset = StreamBatches(source, transform, self.batch_size, self.seed,
                                          shuffle_buffer, cfg.strict)
            # not persistent: workers must see the updated epoch/start when re-created
            self._dl = DataLoader(self.dataset, batch_size=None, collate_fn=collate_items,
                                  num_workers=self.workers, generator=gen)

    @property
    def batches_per_epoch(self) -> int | None:
        """Batches in the current epoch (None for streaming sources, where it is unknown;
        semi_hard: an upper bound until the epoch's plan is complete)."""
        return self._sampler.epoch_length(self.epoch) if self.map_style else None

    # ------------------------------------------------------------------ semi-hard sampler
    @property
    def semi_hard(self) -> SemiHardBatches | None:
        """The semi-hard batch plan, or None for other samplers."""
        s = getattr(self, "_sampler", None)
        return s if isinstance(s, SemiHardBatches) else None

    def needs_refresh(self, step: int) -> bool:
        """True when the trainer should call ``update_embeddings`` before step ``step + 1``."""
        return self.semi_hard is not None and self.semi_hard.needs_refresh(step)

    def update_embeddings(self, emb: Tensor | None) -> None:
        """Semi-hard sampler: (N, E) embeddings, one per ``self.dataset`` entry ((image, caption)
        pair, dataset order), used from the next batch on (the iterator restarts there)."""
        if self.semi_hard is None:
            raise TypeError(f"update_embeddings needs data.sampler=semi_hard, not {self.cfg.sampler!r}")
        if emb is not None and tuple(emb.shape[:1]) != (len(self.dataset),):
            raise ValueError(f"need one embedding per training pair: ({len(self.dataset)}, E), "
                             f"got {tuple(emb.shape)}")
        self._it = None
        self.semi_hard.update(self.epoch, self.position, emb)

    def sampler_stats(self) -> dict[str, float]:
        """Semi-hard sampler numbers of the current epoch (see ``SemiHardBatches.stats``); {} else."""
        return self.semi_hard.stats(self.epoch) if self.semi_hard is not None else {}

    # ------------------------------------------------------------------ state / iteration
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "position": self.position}
        extra = self._sampler.state(self.epoch, self.position) if self.map_style else {}
        if extra:
            state["sampler"] = extra
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if self.map_style:
            self._sampler.load_state(self.epoch, self.position, state.get("sampler"))
        self._it = None
        self._nonempty = self.position > 0

    def __iter__(self) -> "TrainLoader":
        return self

    def _start(self) -> None:
        target = self._sampler if self.map_style else self.dataset
        target.epoch, target.start = self.epoch, self.position
        self._it = iter(self._dl)

    def __next__(self) -> Batch:
        while True:
            if self._it is None:
                self._start()
            try:
                parts = next(self._it)
            except StopIteration:                           # the epoch is over
                self._it = None
                if not self._nonempty:
                    raise RuntimeError("a whole training epoch produced no usable sample: "
                                       + (self.skips.summary() if self.skips.total else
                                          f"the split is smaller than data.batch_size={self.batch_size}"))
                self.epoch, self.position, self._nonempty = self.epoch + 1, 0, False
                continue
            self.position += 1
            if parts["skipped"]:
                self.skips.update(list(parts["skipped"]))
            batch = self.collator.finish(parts)
            if len(batch) == 0:
                self._pending.extend(batch.skipped)
                continue
            if self._pending:
                batch.skipped = self._pending + batch.skipped
                self._pending = []
            self._nonempty = True
            return batch

    def close(self) -> None:
        """Shut down worker processes."""
        self._it = None
        it = getattr(self._dl, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


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
