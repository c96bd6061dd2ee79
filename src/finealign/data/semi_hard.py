"""Semi-hard negatives (SyncMask): a batch sampler that grows batches from semi-hard neighbours in
embedding space, and the same rule as a (B, B) mask for objectives. See :mod:`.samplers` for the rules
every sampler shares (item ids, epochs, ranks, resume)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .epoch_sampler import EpochBatchSampler

__all__ = ["SemiHardBatchSampler", "semi_hard_negative_mask"]


def semi_hard_negative_mask(sim: Tensor, item_ids: Tensor, upper: float = 0.95,
                            band: tuple[float, float] = (0.3, 0.9), below_positive: bool = True) -> Tensor:
    """``(B, B)`` bool: ``[i, j]`` is True iff ``j`` is an allowed semi-hard negative of ``i``.

    ``sim`` (B, B): similarities (row = anchor, e.g. image; column = candidate, e.g. text; the diagonal
    holds each anchor's positive); ``item_ids`` (B,). False on the diagonal (positives), for the same item
    id (false negatives), for ``sim > upper`` (near-duplicates), outside ``band[0] <= sim <= band[1]``
    and, with ``below_positive``, at or above the anchor's positive ``sim[i, i]`` (SyncMask: the band lies
    below the positive). With sample-to-sample similarities (diagonal 1) that last rule changes nothing.
    ``SemiHardBatchSampler`` builds batches in one embedding space, where a sample's positive (its other
    modality) is not a candidate, so it applies the band and ``upper`` only.
    """
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1] or item_ids.shape != sim.shape[:1]:
        raise ValueError(f"need sim (B, B) and item_ids (B,), got {tuple(sim.shape)} and "
                         f"{tuple(item_ids.shape)}")
    lo, hi = float(band[0]), min(float(band[1]), float(upper))
    same = item_ids.view(-1, 1) == item_ids.view(1, -1)            # (B, B), includes the diagonal
    ok = ~same & (sim >= lo) & (sim <= hi)
    return ok & (sim < sim.diagonal()[:, None]) if below_positive else ok


class SemiHardBatchSampler(EpochBatchSampler):
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
