"""Batch plans behind ``TrainLoader`` (map-style sources): random, grouped and semi-hard orders.

Every plan is a DataLoader ``batch_sampler`` with the same small interface: the loader sets ``epoch``
and ``start`` before it creates an iterator; iterating yields lists of ``(epoch, index)`` pairs
(``PairDataset`` keys) of that epoch, from batch ``start`` on, and stops at the epoch's end.
``state(epoch, position)`` returns what, beyond ``(epoch, position)``, a resume needs to be exact
(``{}`` when nothing); ``load_state(epoch, position, extra)`` restores it. ``epoch_length(epoch)``
is the number of batches of an epoch (semi-hard: an upper bound until its plan is complete).

* ``RandomBatches``: ``randperm(N, seed + epoch)`` cut into ``N // batch_size`` batches.
* ``GroupedBatches``: ``data.samplers.GroupedBatchSampler`` over ``pair_metadata`` (``data.group_by``).
* ``SemiHardBatches``: ``data.samplers.SemiHardBatchSampler``; starts without embeddings (random
  batches under the item rule) until ``update(epoch, position, emb)`` hands it (N, E) embeddings.

Several ranks: ``RankSlice(plan, rank, world_size, batch_size)`` hands rank ``r`` the ``r``-th contiguous
slice of each global batch. Streaming sources: ``streaming.StreamBatches`` (re-exported here).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from ..config import ConfigError, DataConfig
from .streaming import StreamBatches

log = logging.getLogger("finealign")

__all__ = ["GroupedBatches", "RandomBatches", "RankSlice", "SemiHardBatches", "StreamBatches",
           "build_batches"]


def build_batches(dataset, cfg: DataConfig):
    """The batch plan ``cfg.sampler`` names for a ``PairDataset``."""
    if cfg.sampler == "grouped":
        return GroupedBatches(dataset, cfg)
    if cfg.sampler == "semi_hard":
        return SemiHardBatches(dataset, cfg)
    if cfg.sampler != "random":
        raise ValueError(f"unknown data.sampler {cfg.sampler!r}: choose random, grouped or semi_hard")
    return RandomBatches(len(dataset), int(cfg.batch_size), int(cfg.seed))


class RandomBatches:
    """Batches of ``(epoch, index)`` of epoch ``epoch`` starting at batch ``start`` (drop_last)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.start = 0, 0

    def epoch_length(self, epoch: int) -> int:
        return self.n // self.batch_size

    def state(self, epoch: int, position: int) -> dict[str, Any]:
        return {}

    def load_state(self, epoch: int, position: int, extra: dict[str, Any] | None) -> None:
        pass

    def __len__(self) -> int:
        return max(self.n // self.batch_size - self.start, 0)

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        perm, B = perm.tolist(), self.batch_size
        for b in range(self.start, self.n // B):
            yield [(self.epoch, i) for i in perm[b * B:(b + 1) * B]]


class GroupedBatches(RandomBatches):
    """``GroupedBatchSampler`` (groups from ``cfg.group_by``) behind the plan interface."""

    def __init__(self, dataset, cfg: DataConfig):
        from .samplers import GroupedBatchSampler, pair_metadata
        groups, items = pair_metadata(dataset, cfg.group_by)
        distinct, unset = set(groups), sum(g is None for g in groups)
        if len(distinct) < 2:
            raise ConfigError(f"data.sampler=grouped: every training pair has the same data.group_by="
                              f"{cfg.group_by} ({next(iter(distinct), None)!r}), so the batches would be random; "
                              f"group by a field this data fills in (category, subcategory, label, item_id)")
        if unset:
            log.warning("data.group_by=%s: %d of %d training pairs have none; they form one group of their own",
                        cfg.group_by, unset, len(groups))
        self.inner = GroupedBatchSampler(groups, items, int(cfg.batch_size), seed=int(cfg.seed),
                                         epoch_tuples=True)
        self.epoch, self.start = 0, 0

    def epoch_length(self, epoch: int) -> int:
        return len(self.inner)

    def __len__(self) -> int:
        return max(len(self.inner) - self.start, 0)

    def __iter__(self):
        self.inner.load_state_dict({"epoch": self.epoch, "position": self.start})
        for b, batch in enumerate(self.inner, start=self.start):
            if b >= len(self.inner):
                return
            yield batch


class SemiHardBatches(RandomBatches):
    """``SemiHardBatchSampler`` (``data.semi_hard_*``, ``refresh_every``) behind the plan interface.

    Embeddings live on the CPU (sampling is then the same wherever training runs). Embeddings
    that cannot form a single batch from a whole epoch (e.g. an early model puts most pairs above
    ``semi_hard_upper``: checked on ``update`` and at each epoch start) are dropped with a warning:
    batches are random (item rule only) until the next ``update``.
    """

    def __init__(self, dataset, cfg: DataConfig):
        from .samplers import SemiHardBatchSampler, pair_metadata
        _, items = pair_metadata(dataset)
        self.inner = SemiHardBatchSampler(
            None, items, int(cfg.batch_size), seed=int(cfg.seed), upper=float(cfg.semi_hard_upper),
            band=(float(cfg.semi_hard_band[0]), float(cfg.semi_hard_band[1])),
            refresh_every=int(cfg.refresh_every), epoch_tuples=True)
        self.n, self.batch_size = self.inner.n, self.inner.batch_size
        self.epoch, self.start = 0, 0
        self.dropped = 0                 # times embeddings were dropped because no batch could form

    @property
    def embeddings(self) -> Tensor | None:
        """(N, E) normalised embeddings in force, or None (random batches)."""
        return self.inner.embeddings

    def epoch_length(self, epoch: int) -> int:
        st = self.inner.epoch_stats(epoch)
        if st["complete"]:
            return st["batches"] // self.inner.num_replicas
        return self.n // self.batch_size // self.inner.num_replicas

    def __len__(self) -> int:
        return max(self.epoch_length(self.epoch) - self.start, 0)

    def __iter__(self):
        inner = self.inner
        for _ in range(2):
            inner.load_state_dict({"epoch": self.epoch, "position": self.start})   # rolls back
            got = 0
            for batch in inner:
                if batch[0][0] != self.epoch:       # the inner sampler moved on to the next epoch
                    return
                got += 1
                yield batch
            if got or self.start or inner.embeddings is None:
                return
            self._drop(self.epoch, inner.embeddings)

    def update(self, epoch: int, position: int, emb: Tensor | None) -> None:
        """Use ``emb`` (N, E), one row per ``PairDataset`` entry, from batch ``position`` of ``epoch``
        on (batches the DataLoader prefetched past it are rebuilt). Embeddings that cannot form
        one batch even from a whole epoch's samples are dropped (random batches, a warning)."""
        if emb is not None:
            emb = torch.as_tensor(emb).detach().float().cpu()
            if not self._formable(epoch, emb):
                self._drop(epoch, emb)
                emb = None
        self.inner.load_state_dict({"epoch": int(epoch), "position": int(position)})
        self.inner.update_embeddings(emb)

    def _formable(self, epoch: int, emb: Tensor) -> bool:
        from .samplers import SemiHardBatchSampler
        i = self.inner
        probe = SemiHardBatchSampler(emb, i.item_ids, i.batch_size, seed=i.seed, upper=i.upper,
                                     band=i.band)
        probe.set_epoch(epoch)
        return next(iter(probe), None) is not None

    def _drop(self, epoch: int, emb: Tensor) -> None:
        """Warn that ``emb`` cannot form a batch and switch to random batches."""
        e = torch.nn.functional.normalize(emb.float(), dim=-1)
        sims = "" if len(e) > 4096 else \
            f" ({float((e @ e.T > self.inner.upper).float().mean()):.0%} of the pairs are above it)"
        log.warning("semi-hard sampler: the embeddings cannot form one batch of %d in epoch %d under "
                    "data.semi_hard_upper=%g%s; random batches until the next refresh",
                    self.batch_size, epoch, self.inner.upper, sims)
        self.inner.update_embeddings(None)
        self.dropped += 1

    def needs_refresh(self, step: int) -> bool:
        """Before step 1 always (``data.refresh_every=0``: only then), then every ``refresh_every`` steps."""
        return int(step) == 0 or self.inner.needs_refresh(step)

    def stats(self, epoch: int) -> dict[str, float]:
        """``{"epoch", "batches", "placed", "complete", ["left_out"], "has_embeddings", "dropped"}``
        of ``epoch``'s plan as built so far (numbers only, for metric logs)."""
        st = self.inner.epoch_stats(epoch)
        out = {"epoch": float(epoch), "batches": float(st["batches"]), "placed": float(st["placed"]),
               "complete": float(st["complete"]), "has_embeddings": float(self.embeddings is not None),
               "dropped": float(self.dropped)}
        if st["left_out"] is not None:
            out["left_out"] = float(st["left_out"])
        return out

    def state(self, epoch: int, position: int) -> dict[str, Any]:
        """``{"kind", "used" (N,) bool, "embeddings" (N, E) float or None}`` after ``position``
        batches of ``epoch`` (the DataLoader may have prefetched further: not counted)."""
        inner = self.inner
        ahead = inner.epoch, inner.position
        inner.epoch, inner.position = int(epoch), int(position)
        try:
            st = inner.state_dict(include_embeddings=True)
        finally:
            inner.epoch, inner.position = ahead
        return {"kind": "semi_hard", "used": st["used"], "embeddings": st["embeddings"]}

    def load_state(self, epoch: int, position: int, extra: dict[str, Any] | None) -> None:
        """Restore ``state()``; without it (an older run) the epoch is replayed up to ``position``
        with the embeddings in force."""
        state: dict[str, Any] = {"epoch": int(epoch), "position": int(position)}
        if extra:
            if extra.get("kind") != "semi_hard":
                raise ValueError(f"loader state was saved by a {extra.get('kind')!r} sampler, "
                                 "not data.sampler=semi_hard")
            emb = extra.get("embeddings")
            state["used"] = torch.as_tensor(extra["used"]).cpu()
            state["embeddings"] = None if emb is None else torch.as_tensor(emb).float().cpu()
        self.inner.load_state_dict(state)


# ---------------------------------------------------------------------------- several ranks

class RankSlice:
    """Rank ``rank``'s share of every global batch (``batch_size`` rows) of ``plan``: the contiguous
    rows ``[rank * L, (rank + 1) * L)`` with ``L = batch_size // world_size``.

    Every rank builds the same global plan (same seed, ``data.batch_size`` = the global batch), so
    the shares are disjoint and, concatenated in rank order, give the batch one process would see.
    The loader still sets ``epoch`` / ``start`` (and reads state) on the plan itself; the length is
    the plan's (one share per global batch)."""

    def __init__(self, plan, rank: int, world_size: int, batch_size: int):
        self.plan, self.rank, self.world_size = plan, int(rank), int(world_size)
        self.local = int(batch_size) // self.world_size

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self):
        lo = self.rank * self.local
        for batch in self.plan:
            yield batch[lo: lo + self.local]
