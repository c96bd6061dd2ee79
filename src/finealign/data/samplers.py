"""Batch samplers that put hard negatives into a batch (SyncMask; usable by any recipe).

* ``GroupedBatchSampler``: each batch is filled from a few groups (category / sub-category).
* ``SemiHardBatchSampler``: each batch grows around a seed sample from its neighbours whose
  similarity lies in a "semi-hard" band, never taking near-duplicates.
* ``semi_hard_negative_mask``: the same rule for a (B, B) similarity matrix (objectives).
* ``pair_metadata``: ``(groups, item_ids)`` per entry of a ``PairDataset`` (integration helper).

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
from typing import Any, Callable, Hashable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["GroupedBatchSampler", "SemiHardBatchSampler", "pair_metadata", "semi_hard_negative_mask"]


def semi_hard_negative_mask(sim: Tensor, item_ids: Tensor, upper: float = 0.95,
                            band: tuple[float, float] = (0.3, 0.9)) -> Tensor:
    """``(B, B)`` bool: ``[i, j]`` is True iff ``j`` is an allowed semi-hard negative of ``i``.

    ``sim`` (B, B): similarities (row = anchor, e.g. image; column = candidate, e.g. text);
    ``item_ids`` (B,). False on the diagonal (positives), for the same item id (false negatives),
    for ``sim > upper`` (near-duplicates) and outside ``band[0] <= sim <= band[1]``.
    """
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1] or item_ids.shape != sim.shape[:1]:
        raise ValueError(f"need sim (B, B) and item_ids (B,), got {tuple(sim.shape)} and "
                         f"{tuple(item_ids.shape)}")
    lo, hi = float(band[0]), min(float(band[1]), float(upper))
    same = item_ids.view(-1, 1) == item_ids.view(1, -1)            # (B, B), includes the diagonal
    return ~same & (sim >= lo) & (sim <= hi)


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


class _EpochBatchSampler:
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


class GroupedBatchSampler(_EpochBatchSampler):
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


class SemiHardBatchSampler(_EpochBatchSampler):
    """Batches grown around seed samples from their semi-hard neighbours in embedding space.

    Global batch ``k`` of epoch ``e`` uses the samples still unused in the epoch: the seed is the
    first of them in ``randperm(N, seed + e)``; the seed's neighbours with similarity in ``band`` are
    tried nearest first (at most ``candidates``), each taken if its item id is new to the batch and
    its highest similarity to the members so far is ``<= band[1]`` (so in the band, never a
    near-duplicate). Then unused samples in permutation order fill the batch under the hard rules
    only (new item id, similarity ``<= upper`` to every member). Without embeddings batches are
    random (item rule only). The epoch ends at the first group of ``num_replicas`` batches that
    cannot be filled. Built lazily, per batch one ``(N, E)`` mat-vec, a ``candidates²`` and a few
    ``chunk x batch`` products (never ``N x N``; embeddings may live on the GPU). ``__len__`` is an
    upper bound until the epoch is complete: stop at ``StopIteration``. All ranks need the same
    embeddings.

    ``update_embeddings(emb)`` applies from this rank's next batch (``position``); batches built
    past it are rebuilt, so restart the DataLoader iterator (with prefetching, ``load_state_dict``
    the consumed position first). ``state_dict()`` holds the epoch's used-sample mask and, unless
    ``include_embeddings=False``, the embeddings in force (N x E floats): a resume is then exact.
    Given only ``{"epoch", "position"}`` the epoch is replayed with the current embeddings.

    Args: ``embeddings`` (N, E) (normalised here) or None; ``item_ids``, ``batch_size``,
    ``num_replicas``, ``rank``, ``seed``, ``epoch_tuples`` as for ``GroupedBatchSampler``;
    ``upper``: above it two samples are near-duplicates (never in one batch); ``band``: preferred
    ``(low, high)`` similarity of a new member to the batch; ``refresh_every``: steps between
    embedding refreshes (``needs_refresh``; 0 = never); ``candidates``: seed neighbours examined
    per batch (0 = ``8 * batch_size``).
    """

    def __init__(self, embeddings: Tensor | None, item_ids: Sequence[int], batch_size: int, *,
                 num_replicas: int = 1, rank: int = 0, seed: int = 0, upper: float = 0.95,
                 band: tuple[float, float] = (0.3, 0.9), refresh_every: int = 0,
                 candidates: int = 0, epoch_tuples: bool = False):
        super().__init__(item_ids, batch_size, num_replicas, rank, seed, epoch_tuples)
        self.upper, self.band = float(upper), (float(band[0]), float(band[1]))
        if self.band[0] > self.band[1]:
            raise ValueError(f"band {band} must be (low, high) with low <= high")
        self._hi = min(self.band[1], self.upper)
        self.refresh_every = int(refresh_every)
        self.candidates = int(candidates) or 8 * self.batch_size
        self.embeddings: Tensor | None = None
        self._set_embeddings(embeddings)
        self._reset_plan(None)

    # -------------------------------------------------------------- embeddings / state
    def _set_embeddings(self, emb: Tensor | None, normalise: bool = True) -> None:
        if emb is not None:
            emb = torch.as_tensor(emb)
            if emb.dim() != 2 or emb.shape[0] != self.n:
                raise ValueError(f"embeddings must be ({self.n}, E), got {tuple(emb.shape)}")
            emb = emb.detach().float()
            emb = torch.nn.functional.normalize(emb, dim=-1) if normalise else emb
        self.embeddings = emb

    def update_embeddings(self, emb: Tensor | None) -> None:
        """Use ``emb`` (N, E) from this rank's next batch (``position``) on."""
        self._set_embeddings(emb)
        self._rollback(self.epoch, self.position * self.num_replicas)

    def needs_refresh(self, step: int) -> bool:
        """True when the training loop should call ``update_embeddings`` at ``step``."""
        return self.refresh_every > 0 and int(step) % self.refresh_every == 0

    def state_dict(self, include_embeddings: bool = True) -> dict[str, Any]:
        """``{"epoch", "position", "used" (N,) bool, "embeddings" (N, E) or None}``."""
        k, used = self.position * self.num_replicas, np.zeros(self.n, dtype=bool)
        if k > 0:                                       # (k == 0: keep a finished epoch's stats)
            self._ensure(self.epoch, k)
            used = self._used.copy()
            for b in self._plan[max(k - self._base, 0):]:
                used[b] = False
        state = {"epoch": self.epoch, "position": self.position, "used": torch.from_numpy(used)}
        if include_embeddings:
            state["embeddings"] = None if self.embeddings is None else self.embeddings.cpu()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "embeddings" in state:             # stored normalised: again would change the last bits
            self._set_embeddings(state["embeddings"], normalise=False)
        k = self.position * self.num_replicas
        if state.get("used") is not None:
            used = torch.as_tensor(state["used"]).cpu().numpy().astype(bool).reshape(-1)
            if used.shape[0] != self.n:
                raise ValueError(f"state has {used.shape[0]} samples, this sampler {self.n}")
            self._reset_plan(self.epoch)
            self._used, self._base = used.copy(), k
        else:
            self._rollback(self.epoch, k)

    def epoch_stats(self, epoch: int | None = None) -> dict[str, Any]:
        """``{"batches" (global, built so far), "placed", "complete", "left_out" (N - placed once
        complete, else None)}`` of ``epoch`` (default: the current one; a finished epoch's numbers
        stay available after the iterator has moved on, until the next epoch starts building)."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._plan_epoch != epoch:
            return {"batches": 0, "placed": 0, "complete": False, "left_out": None}
        placed = int(self._used.sum())
        return {"batches": self._base + len(self._plan), "placed": placed, "complete": self._done,
                "left_out": self.n - placed if self._done else None}

    def __len__(self) -> int:
        if self._plan_epoch == self.epoch and self._done:
            return (self._base + len(self._plan)) // self.num_replicas
        return self.n // self.batch_size // self.num_replicas

    # -------------------------------------------------------------- the lazy plan
    def _reset_plan(self, epoch: int | None) -> None:
        self._plan_epoch, self._base, self._plan, self._done, self._ptr = epoch, 0, [], False, 0
        self._used = np.zeros(self.n, dtype=bool)
        if epoch is not None:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(self.n, generator=g).numpy()

    def _rollback(self, epoch: int, k: int) -> None:
        """Forget the built batches from global index ``k`` on (replay if ``k`` precedes them)."""
        if self._plan_epoch != epoch or k < self._base:
            self._reset_plan(epoch)
            return
        for b in self._plan[k - self._base:]:
            self._used[b] = False
        del self._plan[k - self._base:]
        self._done, self._ptr = False, 0

    def _ensure(self, epoch: int, k: int) -> None:
        """Build batches until global batch ``k - 1`` exists or the epoch is over."""
        if self._plan_epoch != epoch:
            self._reset_plan(epoch)
        R = self.num_replicas
        while self._base + len(self._plan) < k and not self._done:
            group = []
            for _ in range(R):
                b = self._make_batch()
                if b is None:
                    break
                self._used[b] = True
                group.append(b)
            if len(group) < R:                          # cannot serve every rank: epoch over
                for b in group:
                    self._used[b] = False
                self._done = True
            else:
                self._plan += group

    def _global_batch(self, epoch: int, k: int) -> list[int] | None:
        self._ensure(epoch, k + 1)
        j = k - self._base
        return self._plan[j] if 0 <= j < len(self._plan) else None

    def _make_batch(self) -> list[int] | None:
        """One batch from the unused samples (``self._used``), or None if none can be formed."""
        used, perm, items, B, X = self._used, self._perm, self._items, self.batch_size, self.embeddings
        while self._ptr < self.n and used[perm[self._ptr]]:
            self._ptr += 1
        if self._ptr >= self.n or self.n - int(used.sum()) < B:
            return None
        s = int(perm[self._ptr])
        members, seen = [s], {items[s]}
        if X is not None:
            sim = (X @ X[s]).cpu().numpy()                                   # (N,)
            cand = np.flatnonzero(~used & (sim >= self.band[0]) & (sim <= self._hi))
            cand = cand[cand != s]
            cand = cand[np.argsort(-sim[cand], kind="stable")[: self.candidates]]  # nearest first
            if len(cand):
                ct = torch.from_numpy(cand).to(X.device)
                S = (X[ct] @ X[ct].T).cpu().numpy()                         # (C, C)
                mx = sim[cand].copy()                   # highest similarity to the batch so far
                for j in range(len(cand)):
                    if len(members) == B:
                        break
                    if items[cand[j]] in seen or mx[j] > self._hi:
                        continue
                    members.append(int(cand[j]))
                    seen.add(items[cand[j]])
                    np.maximum(mx, S[j], out=mx)
        if len(members) < B:
            self._fill(members, seen)
        return members if len(members) == B else None

    def _fill(self, members: list[int], seen: set) -> None:
        """Top ``members`` up with unused samples in permutation order (hard rules only)."""
        rest = self._perm[self._ptr + 1:]
        rest = rest[~self._used[rest] & ~np.isin(rest, members)]
        X, B, pos = self.embeddings, self.batch_size, 0
        while len(members) < B and pos < len(rest):
            chunk = rest[pos: pos + max(2 * (B - len(members)), 16)]
            pos += len(chunk)
            if X is None:
                mx = np.full(len(chunk), -np.inf)
            else:
                ct = torch.from_numpy(chunk).to(X.device)
                mt = torch.tensor(members, device=X.device)
                mx = (X[ct] @ X[mt].T).amax(1).cpu().numpy()                # (K,)
                S = (X[ct] @ X[ct].T).cpu().numpy()                         # (K, K)
            for a in range(len(chunk)):
                if len(members) == B:
                    break
                it = self._items[chunk[a]]
                if it in seen or mx[a] > self.upper:
                    continue
                members.append(int(chunk[a]))
                seen.add(it)
                if X is not None:
                    np.maximum(mx, S[a], out=mx)
