"""Training batches of streaming sources (webdataset) behind ``TrainLoader``: who reads which shard.

``stream_mode(source, cfg, world_size, workers)`` picks one of three modes; ``StreamBatches`` (an
``IterableDataset`` of item lists, collated in the DataLoader worker by ``collate_stream``) runs it.
``B = data.batch_size`` is the global batch (all ranks), ``L = B // world_size`` a rank's share and
``W = max(data.workers, 1)`` the workers of one rank.

* ``"slice"`` (one process; or ``data.shard_split: false``): every worker of every rank reads the whole
  stream through the same seeded shuffle buffer (seed from (seed, epoch)) and counts global batches;
  worker ``w`` decodes only the batches ``(b - start) % W == w`` and, of those, only its rank's
  contiguous rows ``[rank * L, (rank + 1) * L)``. The DataLoader fetches round-robin, so the order
  does not depend on ``W``, and ranks together see exactly the batches of one process. Resume: skip
  ``start * B`` samples without decoding. Cost: every worker of every rank parses every shard.
* ``"split"`` (``data.shard_split``: true, or auto with world_size > 1): the shard list, shuffled per
  epoch with a seed from (seed, epoch) (the same on every rank), is dealt to ``S = world_size * W``
  slots: slot ``rank * W + w`` reads ``shards[slot::S]`` and forms its own batches of ``L`` through its
  own shuffle buffer; the last partial batch of a slot is dropped. Every shard is read once per
  epoch. Needs ``len(shards) >= S`` (checked: a slot without shards is the hang of other projects).
  A rank's epoch ends when all of its workers have run dry; ranks may hold different numbers of
  batches (``TrainLoader(agree=...)`` makes every rank end the epoch together).
* ``"resample"`` (``data.resample: true``): each slot draws shards with replacement from the whole list
  (RNG seeded by (seed, epoch, rank, worker), like webdataset's ``ResampledShards``): an endless
  stream, no starvation, any shard count. ``data.epoch_batches`` is the epoch length in batches per
  rank; worker ``w`` makes the rank's batches ``b % W == w``.

Split and resample batches carry their local slot (``parts["slot"]``); ``TrainLoader`` counts the
batches consumed per slot, and a resume skips that many batches in each slot (read, not decoded)
and rotates workers so that the round-robin order continues where it stopped.
"""
from __future__ import annotations

import logging
import random
from typing import Any, Iterable, Iterator

from torch.utils.data import IterableDataset, get_worker_info

from .sources.common import Skipped, load_item, sample_seed

log = logging.getLogger("finealign")

__all__ = ["StreamBatches", "can_split", "collate_stream", "epoch_shards", "stream_mode"]

_EMPTY_DRAWS = 1000       # resample: this many shard draws in a row without a sample = broken shards


def can_split(source) -> bool:
    """True if ``source`` lists its shards and can be rebuilt over a subset (``with_shards``)."""
    return bool(getattr(source, "shards", None)) and hasattr(source, "with_shards")


def _split_flag(value: Any) -> bool | str:
    if value in ("auto", True, False):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"data.shard_split must be auto, true or false, got {value!r}")


def stream_mode(source, cfg, world_size: int, workers: int) -> str:
    """``"slice"``, ``"split"`` or ``"resample"`` for ``source`` under ``cfg`` (``data.shard_split``,
    ``data.resample``, ``data.epoch_batches``); raises ValueError on settings that cannot work."""
    split, resample = _split_flag(getattr(cfg, "shard_split", "auto")), bool(getattr(cfg, "resample", False))
    kind = type(source).__name__
    if resample:
        if split is False:
            raise ValueError("data.resample=true draws shards per (rank, worker) slot: it needs "
                             "data.shard_split auto or true, not false")
        if not can_split(source):
            raise ValueError(f"data.resample=true needs a sharded source (webdataset); {kind} has no shard list")
        if int(getattr(cfg, "epoch_batches", 0)) <= 0:
            raise ValueError("data.resample=true streams for ever: set data.epoch_batches (> 0), the "
                             "number of batches per rank that make one epoch")
        return "resample"
    if split == "auto":
        split = world_size > 1 and can_split(source)
        if world_size > 1 and not split:
            log.warning("data.shard_split=auto: %s has no shard list; every rank reads the whole stream "
                        "and keeps its slice of each global batch", kind)
    if not split:
        return "slice"
    if not can_split(source):
        raise ValueError(f"data.shard_split=true needs a sharded source (webdataset); {kind} has no shard list")
    slots, n = world_size * max(int(workers), 1), len(source.shards)
    if n < slots:
        raise ValueError(
            f"data.shard_split: {n} shard(s) for {world_size} rank(s) x {max(int(workers), 1)} "
            f"DataLoader worker(s) = {slots} reader slots; every slot needs at least one shard (a slot "
            f"without one would leave its rank waiting). Fix: write more, smaller shards (finealign data "
            f"shard --maxcount N, so that there are >= {slots}), use fewer workers (data.workers), or "
            f"draw shards with replacement (data.resample=true data.epoch_batches=N)")
    return "split"


def epoch_shards(shards: list[str], seed: int, epoch: int) -> list[str]:
    """The shard list in epoch ``epoch``'s order (seeded shuffle, the same on every rank)."""
    out = list(shards)
    random.Random(sample_seed(seed, epoch, 0x5AAD)).shuffle(out)
    return out


def _shuffled(stream: Iterable, rnd: random.Random, size: int) -> Iterator:
    """Shuffle buffer; ``Skipped`` markers pass straight through."""
    buf: list = []
    for x in stream:
        if isinstance(x, Skipped) or size <= 1:
            yield x
        elif len(buf) < size:
            buf.append(x)
        else:
            j = rnd.randrange(size)
            yield buf[j]
            buf[j] = x
    rnd.shuffle(buf)
    yield from buf


def _samples(src) -> Iterator:
    return src.iter_with_skips() if hasattr(src, "iter_with_skips") else iter(src)


def collate_stream(x) -> dict:
    """DataLoader ``collate_fn`` of ``StreamBatches``: items -> parts dict (+ ``"slot"`` when split)."""
    from .loader import collate_items
    if isinstance(x, tuple):
        slot, items = x
        parts = collate_items(items)
        parts["slot"] = slot
        return parts
    return collate_items(x)


class StreamBatches(IterableDataset):
    """Batches (lists of items / ``Skipped``) of a streaming source for epoch ``epoch`` (see the module
    docstring for the modes). ``slice``: from global batch ``start`` on. ``split`` / ``resample``: local
    slot ``j`` first skips ``skip[j]`` of its batches; DataLoader worker ``w`` serves local slot
    ``(w + first) % W``; items come as ``(j, items)``. ``Skipped`` markers of the source ride with the
    batch being filled when they arrive (markers in a dropped last partial batch are lost).
    """

    def __init__(self, source, transform, batch_size: int, seed: int, shuffle_buffer: int,
                 strict: bool, rank: int = 0, world_size: int = 1, mode: str = "slice",
                 epoch_batches: int = 0):
        super().__init__()
        self.source, self.transform, self.batch_size = source, transform, int(batch_size)
        self.seed, self.shuffle_buffer, self.strict = seed, shuffle_buffer, strict
        self.rank, self.world_size, self.mode = int(rank), int(world_size), mode
        self.local = self.batch_size // self.world_size
        self.epoch_batches = int(epoch_batches)
        self.epoch, self.start = 0, 0
        self.skip: list[int] = []          # split / resample: batches already consumed per local slot
        self.first = 0                     # split / resample: local slot of DataLoader worker 0

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.mode == "slice":
            return self._slice(wid, nw)
        return self._slot((wid + self.first) % nw, nw)

    def _item(self, x, p_seed: int):
        r = random.Random(p_seed)
        cap = x.captions[r.randrange(len(x.captions))] if x.captions else ""
        return load_item(x, cap, self.transform, r, self.strict)

    def _slice(self, wid: int, nw: int) -> Iterator[list]:
        B, lo, hi = self.batch_size, self.rank * self.local, (self.rank + 1) * self.local
        rnd = random.Random(sample_seed(self.seed, self.epoch, 0x5EED))
        p, items = 0, []
        for x in _shuffled(_samples(self.source), rnd, self.shuffle_buffer):
            b = p // B
            mine = b >= self.start and (b - self.start) % nw == wid
            if isinstance(x, Skipped):
                if mine and lo <= p % B < hi:
                    items.append(x)
                continue
            if mine and lo <= p % B < hi:
                items.append(self._item(x, sample_seed(self.seed, self.epoch, p)))
            p += 1
            if p % B == 0 and mine:
                yield items
                items = []

    def _slot(self, j: int, nw: int) -> Iterator[tuple[int, list]]:
        slots, slot = self.world_size * nw, self.rank * nw + j
        skip = self.skip[j] if j < len(self.skip) else 0
        limit = None
        if self.mode == "resample":
            limit = len(range(j, self.epoch_batches, nw)) - skip
            if limit <= 0:
                return
        if self.mode == "split":
            mine = epoch_shards(self.source.shards, self.seed, self.epoch)[slot::slots]
            stream = _samples(self.source.with_shards(mine, id_stride=slots, id_offset=slot))
        else:
            stream = self._resampled(j, slot, slots)
        L, rnd = self.local, random.Random(sample_seed(self.seed, self.epoch, 0x5EED, slot + 1))
        p, items, made = 0, [], 0
        for x in _shuffled(stream, rnd, self.shuffle_buffer):
            keep = p // L >= skip
            if isinstance(x, Skipped):
                if keep:
                    items.append(x)
                continue
            if keep:
                items.append(self._item(x, sample_seed(self.seed, self.epoch, 0x5107, slot, p)))
            p += 1
            if p % L == 0 and keep:
                yield j, items
                items, made = [], made + 1
                if limit is not None and made >= limit:
                    return

    def _resampled(self, j: int, slot: int, slots: int) -> Iterator:
        """Endless stream of shards drawn with replacement (RNG from (seed, epoch, rank, worker))."""
        shards = list(self.source.shards)
        rnd = random.Random(sample_seed(self.seed, self.epoch, 0x4E5A, self.rank, j))
        count, dry = 0, 0
        while True:
            shard = shards[rnd.randrange(len(shards))]
            got = 0
            for x in _samples(self.source.with_shards([shard], id_stride=slots, id_offset=slot + count * slots)):
                got += not isinstance(x, Skipped)
                yield x
            count, dry = count + got, 0 if got else dry + 1
            if dry >= _EMPTY_DRAWS:
                raise RuntimeError(f"data.resample: {dry} shard draws in a row gave no usable sample "
                                   f"(are the {len(shards)} shard(s) empty or corrupt?)")
