"""Batch samplers that put hard negatives into a batch (SyncMask; usable by any recipe).

* ``GroupedBatchSampler``: each batch is filled from a few groups (category / sub-category).
* ``SemiHardBatchSampler``: each batch grows around a seed sample from its neighbours whose
  similarity lies in a "semi-hard" band, never taking near-duplicates.
* ``semi_hard_negative_mask``: the same rule for a (B, B) similarity matrix (objectives).
* ``pair_metadata``: ``(groups, item_ids)`` per entry of a ``PairDataset`` (integration helper).

The semi-hard sampler and mask live in :mod:`.semi_hard`, the shared epoch / rank / resume
bookkeeping in :mod:`.epoch_sampler`; all are importable from here.

Common rules: no batch holds two samples with the same ``item_id`` (several images of one item
share one description: false negatives); a sample is used at most once per epoch, leftovers are
counted (``epoch_stats()["left_out"]``); the order depends on ``seed + epoch`` only. Distributed:
all ranks compute the same global batches, cut to a multiple of ``num_replicas``; rank ``r`` gets
batches ``i % num_replicas == r`` (disjoint; their union is the epoch). Iteration yields lists of
dataset indices (``epoch_tuples=True``: ``(epoch, index)`` pairs for ``PairDataset``) and advances
``position``; an epoch iterated to its end moves on to the next one. ``state_dict()`` ->
``{"epoch", "position"}`` (this rank's batches handed out); ``load_state_dict`` resumes exactly.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, Hashable, Sequence

import torch

from .epoch_sampler import EpochBatchSampler
from .semi_hard import SemiHardBatchSampler, semi_hard_negative_mask

__all__ = ["GroupedBatchSampler", "SemiHardBatchSampler", "pair_metadata", "semi_hard_negative_mask"]


def pair_metadata(dataset, group_by: str | Callable[[Any], Hashable] = "category"
                  ) -> tuple[list[Hashable], list[int]]:
    """``(groups, item_ids)`` for every entry of a ``PairDataset`` (one per caption).

    ``group_by``: a ``Sample`` attribute name or ``callable(sample) -> key``. A sample without
    an item (``item_id < 0``) gets the unique id ``-(sample_index + 1)``, so that the captions of
    one image never share a batch.
    """
    key = group_by if callable(group_by) else (lambda s: getattr(s, group_by))
    groups, items = [], []
    for si in dataset._sample_idx.tolist():
        s = dataset.samples[si]
        groups.append(key(s))
        items.append(int(s.item_id) if s.item_id >= 0 else -(si + 1))
    return groups, items


class GroupedBatchSampler(EpochBatchSampler):
    """Batches of ``batch_size`` dataset indices drawn from a few groups each (hard negatives).

    Epoch ``e`` (seeded ``seed + e``): samples are shuffled, groups keep their members in that order
    and are visited in a random rotation. A batch takes ``ceil(space / groups_left)`` members from
    each next group (``groups_per_batch`` large groups fill it; small ones make room for more),
    skipping members whose ``item_id`` is already in the batch (they stay queued); groups that gave
    members go to the back. When the rest cannot fill a batch the epoch ends: ``drop_last`` leaves
    it out, else it forms one partial batch (members colliding with it are left out). The batch
    count is cut to a multiple of ``num_replicas``; ``epoch_stats()`` counts what was left out.

    Args: ``groups`` one hashable key per dataset index (category, (category, sub-category), ...);
    ``item_ids`` one id per index; ``batch_size`` per rank; ``groups_per_batch`` target groups per
    batch (0 = ``max(batch_size // 4, 1)``); ``num_replicas``, ``rank``; ``seed``; ``drop_last``;
    ``epoch_tuples`` (yield ``(epoch, index)`` pairs).
    """

    def __init__(self, groups: Sequence[Hashable], item_ids: Sequence[int], batch_size: int, *,
                 groups_per_batch: int = 0, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 drop_last: bool = True, epoch_tuples: bool = False):
        if len(groups) != len(item_ids):
            raise ValueError(f"groups ({len(groups)}) and item_ids ({len(item_ids)}) differ in length")
        super().__init__(item_ids, batch_size, num_replicas, rank, seed, epoch_tuples)
        gpb = int(groups_per_batch) or max(self.batch_size // 4, 1)
        if not 1 <= gpb <= self.batch_size:
            raise ValueError(f"groups_per_batch={groups_per_batch} must be in [0, batch_size]")
        self.groups_per_batch, self.drop_last = gpb, bool(drop_last)
        codes: dict[Hashable, int] = {}                 # first-appearance order: no hash() randomness
        self._group = [codes.setdefault(g, len(codes)) for g in groups]
        self.num_groups = len(codes)
        self._plan_epoch, self._plan, self._stats = None, [], {}

    def __len__(self) -> int:
        """Batches of this rank in the current epoch."""
        return len(self._epoch_plan(self.epoch)) // self.num_replicas

    def epoch_stats(self, epoch: int | None = None) -> dict[str, int]:
        """``{"batches" (global, all ranks), "placed", "left_out", "trimmed"}`` of an epoch;
        ``left_out = N - placed`` includes ``trimmed`` (samples of batches cut for the ranks)."""
        self._epoch_plan(self.epoch if epoch is None else int(epoch))
        return dict(self._stats)

    def _global_batch(self, epoch: int, k: int) -> list[int] | None:
        plan = self._epoch_plan(epoch)
        return plan[k] if k < len(plan) else None

    def _epoch_plan(self, epoch: int) -> list[list[int]]:
        if self._plan_epoch != epoch:
            (self._plan, self._stats), self._plan_epoch = self._build(epoch), epoch
        return self._plan

    def _take(self, q: deque, k: int, seen: set) -> list[int]:
        """Pop up to ``k`` members of ``q`` whose item is not in ``seen``; colliders stay queued."""
        out, kept = [], []
        while q and len(out) < k:
            i = q.popleft()
            if self._items[i] in seen:
                kept.append(i)
            else:
                out.append(i)
                seen.add(self._items[i])
        q.extendleft(reversed(kept))
        return out

    def _build(self, epoch: int) -> tuple[list[list[int]], dict[str, int]]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        order = torch.randperm(self.num_groups, generator=g).tolist()
        queues = [deque() for _ in range(self.num_groups)]
        for i in perm:
            queues[self._group[i]].append(i)
        active = deque(gq for gq in order if queues[gq])
        B, gpb, batches = self.batch_size, self.groups_per_batch, []
        while True:
            batch, seen, gave, barren = [], set(), [], []
            while active and len(batch) < B:            # pass 1: spread over ~gpb groups
                gq = active.popleft()
                space = B - len(batch)
                got = self._take(queues[gq], -(-space // max(gpb - len(gave), 1)), seen)
                batch += got
                (gave if got else barren).append(gq)
            for gq in gave:                             # pass 2: top up from the same groups
                if len(batch) == B:
                    break
                batch += self._take(queues[gq], B - len(batch), seen)
            active.extendleft(reversed(barren))
            active.extend(gq for gq in gave if queues[gq])
            if len(batch) < B:
                if batch and not self.drop_last:
                    batches.append(batch)
                break
            batches.append(batch)
        keep = len(batches) - len(batches) % self.num_replicas
        trimmed, placed = sum(map(len, batches[keep:])), sum(map(len, batches[:keep]))
        return batches[:keep], {"batches": keep, "placed": placed, "left_out": self.n - placed,
                                "trimmed": trimmed}
