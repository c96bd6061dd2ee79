"""Epoch / rank / resume bookkeeping shared by the batch samplers of :mod:`.samplers` and :mod:`.semi_hard`.

A subclass implements ``_global_batch(epoch, k)`` (global batch ``k`` of ``epoch`` or None past the
epoch's end); this class cuts global batches between ranks (rank ``r`` gets ``k % num_replicas == r``),
yields them (optionally as ``(epoch, index)`` pairs), and saves / restores ``{"epoch", "position"}``.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

__all__ = ["EpochBatchSampler"]


class EpochBatchSampler:
    """Shared epoch / rank / resume bookkeeping. Subclasses implement ``_global_batch``."""

    def __init__(self, item_ids: Sequence[int], batch_size: int, num_replicas: int, rank: int,
                 seed: int, epoch_tuples: bool):
        self.item_ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)      # (N,)
        self._items = self.item_ids.tolist()
        self.n = int(self.item_ids.shape[0])
        self.batch_size, self.num_replicas, self.rank = int(batch_size), int(num_replicas), int(rank)
        self.seed, self.epoch_tuples = int(seed), bool(epoch_tuples)
        self.epoch, self.position = 0, 0
        if self.batch_size < 1 or self.num_replicas < 1:
            raise ValueError(f"batch_size ({batch_size}) and num_replicas ({num_replicas}) must be >= 1")
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {rank} is out of range for num_replicas={num_replicas}")
        if self.n < (need := self.batch_size * self.num_replicas):
            raise ValueError(f"{self.n} samples are fewer than batch_size * num_replicas = {need}")
        if (distinct := len(np.unique(self.item_ids))) < self.batch_size:
            raise ValueError(f"only {distinct} distinct item_ids: a batch of {self.batch_size} "
                             "cannot avoid repeating an item")

    def _global_batch(self, epoch: int, k: int) -> list[int] | None:
        """Global batch ``k`` of ``epoch``, or None past the end of the (trimmed) epoch."""
        raise NotImplementedError

    def _rank_batch(self, epoch: int, position: int) -> list[int] | None:
        return self._global_batch(epoch, position * self.num_replicas + self.rank)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; the position restarts at 0 unless ``epoch`` is already the current one
        (so ``load_state_dict`` followed by ``set_epoch`` of the same epoch still resumes)."""
        if int(epoch) != self.epoch:
            self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self) -> Iterator[list]:
        if self.position > 0 and self._rank_batch(self.epoch, self.position) is None:
            self.epoch, self.position = self.epoch + 1, 0     # resumed exactly at an epoch's end
        while True:
            batch = self._rank_batch(self.epoch, self.position)
            if batch is None:
                break
            self.position += 1
            yield [(self.epoch, i) for i in batch] if self.epoch_tuples else list(batch)
        self.epoch, self.position = self.epoch + 1, 0
