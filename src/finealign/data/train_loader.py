"""``TrainLoader``: the endless, deterministic, resumable iterator of training ``Batch``es, on one
rank or on each of ``world_size`` ranks (torchrun). Imported as ``finealign.data.loader.TrainLoader``.

``data.batch_size`` is the global batch of one optimizer step (all ranks together); each rank gets
``local_batch_size = batch_size // world_size`` rows. Map-style sources: every rank builds the same
global plan (``batching.py``) and takes its contiguous slice (``RankSlice``), so the ranks' batches are
disjoint and concatenate to the 1-process batch. Streaming sources: see ``streaming.py``
(``data.shard_split``, ``data.resample``, ``data.epoch_batches``).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ..config import DataConfig
from ..types import Batch
from .batching import RankSlice, SemiHardBatches, build_batches
from .loader import Collator, PairDataset, collate_items, is_map_style
from .skips import SkipLog
from .streaming import StreamBatches, collate_stream, stream_mode
from .transforms import ImageTransform, TwoViewTransform

__all__ = ["TrainLoader", "rank_agreement"]


def rank_agreement(device: str | torch.device = "cpu") -> Callable[[bool], bool]:
    """``agree`` for ``TrainLoader`` under torch.distributed: True iff every rank passed True (an
    all-reduce MIN of one integer on ``device``: the rank's CUDA device under NCCL, cpu under gloo).
    Without a process group it returns its argument."""
    import torch.distributed as dist

    def agree(have: bool) -> bool:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return bool(have)
        t = torch.tensor([1 if have else 0], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())
    return agree


class TrainLoader:
    """Endless iterator of training ``Batch``es with a deterministic, resumable order.

    Map-style sources: the batch plan ``cfg.sampler`` names (``data.batching``): random (epoch ``e``
    visits caption pairs in ``randperm(N, seed + e)`` order, ``N // batch_size`` batches, drop_last),
    grouped or semi_hard (``update_embeddings`` feeds it; the embeddings must be the same on every
    rank). Streaming sources (webdataset, random only): shards are read through a seeded shuffle
    buffer (``shuffle_buffer`` samples); one caption per sample is drawn; see ``streaming.py`` for who
    reads which shard (``stream_mode``: slice, split or resample).

    Several ranks: pass ``rank`` and ``world_size`` (``cfg.batch_size`` must be divisible by it: it is
    the global batch). Each rank yields ``local_batch_size`` rows per batch. In map-style and slice
    mode every rank has the same number of batches per epoch. In split mode (``data.shard_split``
    without ``data.resample``) a rank's epoch ends when its own shards are used up, so ranks may hold
    different numbers of batches: give ``agree`` (e.g. ``rank_agreement(device)``), a collective
    ``agree(have_batch: bool) -> bool`` that is True iff every rank has one. The loader then calls it
    exactly once per batch handed out (plus once per epoch end) on every rank, and when any rank ran
    dry every rank ends the epoch there (its remaining batches are dropped, like
    ``DistributedSampler(drop_last=True)``), so epochs and positions stay equal across ranks. Without
    ``agree`` each rank rolls into its next epoch on its own (no hang: the iterator is endless) and
    ``local_exhausted`` tells that this rank's stream has ended. Resample mode has exactly
    ``data.epoch_batches`` batches per rank and epoch.

    Batches may hold fewer rows when samples were skipped (listed in ``Batch.skipped``, counted in
    ``self.skips``); all-skipped batches are not yielded (their skips ride along with the next batch;
    with several map-style ranks that rank then moves one global batch ahead of the others, and the
    epochs end one step apart). ``transform`` overrides the default training ``ImageTransform``; with
    ``views: 2`` it is wrapped in a ``TwoViewTransform`` (``Batch.images2``).

    ``state_dict()`` -> ``{"epoch", "position"}`` (batches consumed in the epoch) plus, for semi_hard,
    ``"sampler": {...}`` and, for split / resample streams, ``"stream": {"rank", "world_size",
    "workers", "consumed" (per worker slot), "next"}``; ``load_state_dict`` continues with exactly the
    next batch. It also takes the list of every rank's state (``all_gather_object``) and uses entry
    ``rank``. A split / resample stream resumed from another rank's or another layout's state skips
    ``position`` batches round-robin over its workers: exact in resample mode, exact in split mode
    unless a worker had run dry before the checkpoint. Restarting never draws from the global torch RNG.
    """

    def __init__(self, source, tokenizer, cfg: DataConfig, image_size: int, context_length: int,
                 skips: SkipLog | None = None, shuffle_buffer: int = 1000, transform=None,
                 rank: int = 0, world_size: int = 1, agree: Callable[[bool], bool] | None = None):
        self.cfg = cfg
        self.collator = Collator(tokenizer, context_length, image_size)
        self.batch_size, self.seed, self.workers = int(cfg.batch_size), int(cfg.seed), int(cfg.workers)
        self.rank, self.world_size = int(rank), int(world_size)
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {rank} is out of range for world_size {world_size}")
        if self.batch_size % self.world_size:
            raise ValueError(f"data.batch_size={self.batch_size} is the global batch of all ranks: it must "
                             f"be divisible by the world size {self.world_size}")
        self.local_batch_size = self.batch_size // self.world_size
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
        self.local_exhausted = False               # this rank's stream of the current epoch has ended
        self.map_style = is_map_style(source)
        self.stream_mode: str | None = None
        self._slots = max(self.workers, 1)
        self._consumed, self._next_slot = [0] * self._slots, 0
        gen = torch.Generator().manual_seed(self.seed)      # iterator seeds: not the global RNG
        if self.map_style:
            if getattr(cfg, "resample", False):
                raise ValueError(f"data.resample=true needs a sharded streaming source (webdataset), "
                                 f"not {type(source).__name__}")
            self.dataset = PairDataset(source, transform, train=True, seed=self.seed, strict=cfg.strict)
            if len(self.dataset) < self.batch_size:
                raise ValueError(f"training split has {len(self.dataset)} (image, caption) pairs, "
                                 f"fewer than data.batch_size={self.batch_size}")
            self._sampler = build_batches(self.dataset, cfg)
            plan = self._sampler if self.world_size == 1 else \
                RankSlice(self._sampler, self.rank, self.world_size, self.batch_size)
            self._dl = DataLoader(self.dataset, batch_sampler=plan, collate_fn=collate_items,
                                  num_workers=self.workers, persistent_workers=self.workers > 0,
                                  generator=gen)
        else:
            if cfg.sampler != "random":
                raise ValueError(f"data.sampler={cfg.sampler} needs a map-style source; "
                                 f"{type(source).__name__} streams (use data.sampler=random)")
            self.stream_mode = stream_mode(source, cfg, self.world_size, self.workers)
            self.dataset = StreamBatches(source, transform, self.batch_size, self.seed, shuffle_buffer,
                                         cfg.strict, rank=self.rank, world_size=self.world_size,
                                         mode=self.stream_mode,
                                         epoch_batches=int(getattr(cfg, "epoch_batches", 0)))
            # not persistent: workers must see the updated epoch/start when re-created
            self._dl = DataLoader(self.dataset, batch_size=None, collate_fn=collate_stream,
                                  num_workers=self.workers, generator=gen)
        self._agree = agree if self.stream_mode == "split" and self.world_size > 1 else None

    @property
    def batches_per_epoch(self) -> int | None:
        """Batches per rank in the current epoch (semi_hard: an upper bound until the epoch's plan is
        complete; resample streams: ``data.epoch_batches``; None for other streams: unknown)."""
        if self.map_style:
            return self._sampler.epoch_length(self.epoch)
        return self.dataset.epoch_batches if self.stream_mode == "resample" else None

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
        pair, dataset order; the whole training set, the same on every rank), used from the next
        batch on (the iterator restarts there)."""
        if self.semi_hard is None:
            raise TypeError(f"update_embeddings needs data.sampler=semi_hard, not {self.cfg.sampler!r}")
        if emb is not None and tuple(emb.shape[:1]) != (len(self.dataset),):
            raise ValueError(f"need one embedding per training pair: ({len(self.dataset)}, E), "
                             f"got {tuple(emb.shape)}")
        self._drop_iterator()
        self.semi_hard.update(self.epoch, self.position, emb)

    def sampler_stats(self) -> dict[str, float]:
        """Semi-hard sampler numbers of the current epoch (see ``SemiHardBatches.stats``); {} else."""
        return self.semi_hard.stats(self.epoch) if self.semi_hard is not None else {}

    # ------------------------------------------------------------------ state
    def _split(self) -> bool:
        return self.stream_mode in ("split", "resample")

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "position": self.position}
        extra = self._sampler.state(self.epoch, self.position) if self.map_style else {}
        if extra:
            state["sampler"] = extra
        if self._split():
            state["stream"] = {"rank": self.rank, "world_size": self.world_size, "workers": self._slots,
                               "consumed": list(self._consumed), "next": self._next_slot}
        return state

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        if isinstance(state, (list, tuple)):                # every rank's state (all_gather_object)
            state = state[self.rank] if len(state) == self.world_size else state[0]
        self._drop_iterator()
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if self.map_style:
            self._sampler.load_state(self.epoch, self.position, state.get("sampler"))
        if self._split():
            st, W = state.get("stream") or {}, self._slots
            if (st.get("rank"), st.get("world_size"), st.get("workers")) == (self.rank, self.world_size, W):
                self._consumed, self._next_slot = [int(c) for c in st["consumed"]], int(st["next"])
            else:                                            # round-robin without a dry worker
                self._consumed = [len(range(j, self.position, W)) for j in range(W)]
                self._next_slot = self.position % W
        self._nonempty = self.position > 0
        self.local_exhausted = False

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> "TrainLoader":
        return self

    def _start(self) -> None:
        target = self._sampler if self.map_style else self.dataset
        target.epoch, target.start = self.epoch, self.position
        if self._split():
            self.dataset.skip, self.dataset.first = list(self._consumed), self._next_slot
        self._it = iter(self._dl)

    def _drop_iterator(self) -> None:
        """Forget the live iterator; a streaming one (never reused) stops its workers now."""
        it, self._it = self._it, None
        if it is not None and not self.map_style and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def _next_local(self) -> Batch | None:
        """This rank's next batch of the current epoch, or None when its stream has ended."""
        while True:
            if self._it is None:
                self._start()
            try:
                parts = next(self._it)
            except StopIteration:
                self._it = None
                self.local_exhausted = True
                return None
            self.position += 1
            if "slot" in parts:
                self._consumed[parts["slot"]] += 1
                self._next_slot = (parts["slot"] + 1) % self._slots
            if parts["skipped"]:
                self.skips.update(list(parts["skipped"]))
            batch = self.collator.finish(parts)
            if len(batch) == 0:
                self._pending.extend(batch.skipped)
                continue
            if self._pending:
                batch.skipped = self._pending + batch.skipped
                self._pending = []
            return batch

    def __next__(self) -> Batch:
        while True:
            batch = self._next_local()
            if self._agree is not None and not self._agree(batch is not None):
                batch = None                                # some rank ran dry: all end the epoch
            if batch is not None:
                self._nonempty = True
                return batch
            self._drop_iterator()                           # the epoch is over
            if not self._nonempty:
                raise ValueError(self._empty_epoch_message())
            self.epoch, self.position, self._nonempty = self.epoch + 1, 0, False
            self._consumed, self._next_slot, self.local_exhausted = [0] * self._slots, 0, False

    def _empty_epoch_message(self) -> str:
        where = "" if self.world_size == 1 else \
            (" on some rank" if self._agree is not None else f" on rank {self.rank}")
        why = self.skips.summary() if self.skips.total else (
            f"the split is smaller than data.batch_size={self.batch_size}" if self.world_size == 1 else
            f"this rank's share of the data is smaller than one batch of {self.local_batch_size}")
        return f"a whole training epoch produced no usable sample{where}: {why}"

    def close(self) -> None:
        """Shut down worker processes."""
        self._it = None
        it = getattr(self._dl, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
