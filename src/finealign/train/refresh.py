"""Re-embedding the training set for the semi-hard batch sampler (``data.sampler=semi_hard``).

``refresh_sampler`` embeds every (image, caption) pair of the training loader with the current
model -- eval mode, no gradient, eval transform (no augmentation) -- and hands the (N, E)
embeddings to ``TrainLoader.update_embeddings``. It leaves every RNG (Python, numpy, torch CPU and
the model's CUDA device) as it found it and restores the model's train / eval mode, so the
training that follows does not depend on whether a refresh happened in this process or in the
run a checkpoint came from.

The embeddings are centred (their mean over the training set subtracted) before the sampler
normalises them. A contrastive tower trained from scratch puts a large component common to every
sample into its embeddings (on shapes-items after 60 steps the median cosine between two different
captions is 0.99): raw cosines are then all above any near-duplicate bound and carry no neighbourhood
information, while the centred ones spread around 0 (median 0.00, 31% in the default band [0.3, 0.9],
0.3% above 0.95). Ranking among the pairs is what the sampler needs, and centring keeps it.
"""
from __future__ import annotations

import contextlib
import logging
import random
import time
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data.sources.common import Skipped, load_item
from ..data.transforms import ImageTransform

log = logging.getLogger("finealign")

__all__ = ["embed_pairs", "refresh_sampler"]


class _Images(Dataset):
    """Sample ``i`` -> ``(i, image (3, S, S))``, or ``(i, None)`` when it cannot be loaded."""

    def __init__(self, samples, transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        item = load_item(self.samples[i], "-", self.transform, None, strict=False)
        return i, (None if isinstance(item, Skipped) else item["image"])


def _collate(items):
    good = [(i, x) for i, x in items if x is not None]
    images = torch.stack([x for _, x in good]) if good else None             # (B, 3, S, S)
    return images, [i for i, _ in good], len(items) - len(good)


@torch.no_grad()
def embed_pairs(model, dataset, which: str, *, tokenizer=None, context_length: int = 0,
                image_size: int = 0, device: torch.device | str = "cpu", batch_size: int = 128,
                workers: int = 0, progress: bool = False) -> Tensor:
    """(N, E) float32 CPU embeddings, one row per entry of a ``PairDataset`` (dataset order).

    ``which="image"``: ``model.encode_image(images)["embed"]`` of every distinct sample (eval
    transform), repeated for each of its captions; images that fail to load get a zero row.
    ``which="text"``: ``model.encode_text(text, text_mask)["embed"]`` of each pair's caption
    (needs ``tokenizer`` and ``context_length``). The caller picks the model mode (eval).
    """
    if which not in ("image", "text"):
        raise ValueError(f"which must be image or text, got {which!r}")
    device = torch.device(device)
    n = len(dataset)
    owner = [dataset.pair(i) for i in range(n)]                          # (sample index, caption)
    bar = tqdm(total=n if which == "text" else len(dataset.samples), desc=f"embed {which}s",
               disable=not progress, leave=False, dynamic_ncols=True)
    rows: list[Tensor] = []
    try:
        if which == "text":
            if tokenizer is None or context_length <= 0:
                raise ValueError("text embeddings need a tokenizer and context_length > 0")
            texts = [" ".join(c.split()) for _, c in owner]
            for a in range(0, n, batch_size):
                ids, mask = tokenizer.encode_batch(texts[a:a + batch_size], context_length)  # (B, T)
                rows.append(model.encode_text(ids.to(device), mask.to(device))["embed"].float().cpu())
                bar.update(ids.shape[0])
            return torch.cat(rows)                                                      # (N, E)
        if image_size <= 0:
            raise ValueError("image embeddings need image_size > 0")
        dl = DataLoader(_Images(dataset.samples, ImageTransform(image_size, train=False)),
                        batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                        generator=torch.Generator())
        per_sample: Tensor | None = None
        bad = 0
        for images, idx, skipped in dl:
            bad += skipped
            if images is not None:
                e = model.encode_image(images.to(device))["embed"].float().cpu()        # (B, E)
                if per_sample is None:
                    per_sample = torch.zeros(len(dataset.samples), e.shape[1])
                per_sample[torch.tensor(idx)] = e
            bar.update(len(idx) + skipped)
        if per_sample is None:
            raise RuntimeError("no training image could be loaded for the semi-hard sampler refresh")
        if bad:
            log.warning("semi-hard refresh: %d training image(s) failed to load (zero embeddings)", bad)
        return per_sample[torch.tensor([si for si, _ in owner], dtype=torch.long)]       # (N, E)
    finally:
        bar.close()


def refresh_sampler(model, loader, which: str, *, tokenizer, context_length: int, image_size: int,
                    device: torch.device | str, batch_size: int = 128, workers: int = 0,
                    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                    progress: bool = False, compute: bool = True,
                    share: Callable[[Tensor | None], Tensor] | None = None) -> dict[str, float]:
    """Embed ``loader.dataset`` with ``model`` (see ``embed_pairs``) and call
    ``loader.update_embeddings``; returns ``{"refresh_s", **loader.sampler_stats()}``.

    Multi-process: one rank embeds (``compute``) and ``share`` hands its (N, E) result to every rank
    (``distributed.broadcast_tensor``), so all ranks build the same global batch plan."""
    t0 = time.perf_counter()
    if not compute:
        emb = share(None)
        loader.update_embeddings(emb)
        return {"refresh_s": time.perf_counter() - t0, **loader.sampler_stats()}
    device = torch.device(device)
    was_training = model.training
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    py, npy = random.getstate(), np.random.get_state()
    model.eval()
    try:
        with torch.random.fork_rng(devices=cuda), autocast():
            emb = embed_pairs(model, loader.dataset, which, tokenizer=tokenizer,
                              context_length=context_length, image_size=image_size, device=device,
                              batch_size=batch_size, workers=workers, progress=progress)
    finally:
        model.train(was_training)
        random.setstate(py)
        np.random.set_state(npy)
    emb = emb.float()
    emb = emb - emb.mean(dim=0, keepdim=True)                                  # centred (see above)
    if share is not None:
        emb = share(emb)
    loader.update_embeddings(emb)
    return {"refresh_s": time.perf_counter() - t0, **loader.sampler_stats()}
