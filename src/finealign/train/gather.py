"""The global batch of "global" objectives (ITC, mixed ITC): micro-batches of every rank.

A step's global batch is ``world_size`` ranks × ``grad_accum`` micro-batches. A gathered feature is laid
out rank-major: ``[rank 0: micro 0, micro 1, ...][rank 1: micro 0, ...]...``, so a rank's rows are one
contiguous block (what ``train.local_loss`` scores) and a micro-batch stays contiguous (TiMix's
``mix_offset`` = source row - row stays valid after concatenation).

Gradient bookkeeping (DDP and FSDP average gradients over ranks; every pass below substitutes its own
features, with gradient, into no-grad copies of the others):

* default: the other ranks' features arrive without gradient. Summed over ranks and micro-batches, the
  per-pass gradients are the full-batch gradient; averaging divides by ``world_size``, so the trainer
  scales global losses by ``world_size`` in the backward pass (``loss_scale``), and a tensor every pass
  uses alike (the temperature, ``StepContext.shared``) takes its gradient on rank 0 only.
* ``gather_with_grad``: the current micro-batch is gathered with autograd (``torch.distributed.nn``):
  every rank's backward reaches every rank's rows, the sum is ``world_size`` × the gradient and the
  average is exact without scaling; each rank takes the shared tensor's gradient.
* ``local_loss`` (with ``gather_with_grad``): a supporting objective scores only this rank's rows
  against every column; the rank average of those losses is the full loss and its gradient.

Single process without accumulation is the identity (``(local, 0)``).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .. import distributed as D


def micro_bounds(n: int, accum: int) -> list[int]:
    """Row boundaries of ``accum`` micro-batches of an ``n``-row batch (``accum + 1`` numbers)."""
    return np.linspace(0, n, accum + 1).astype(int).tolist()


class StepGather:
    """One step's gather function: ``start`` once, then ``gather(name, local, j)`` in pass ``j``."""

    def __init__(self, rank: int = 0, world_size: int = 1, with_grad: bool = False):
        self.rank, self.world, self.with_grad = int(rank), int(world_size), bool(with_grad)
        self.sizes: list[list[int]] = [[0]]
        self.blocks: dict[str, list[list[Tensor]]] = {}

    @property
    def loss_scale(self) -> float:
        """Factor for global losses in the backward pass (see the module doc)."""
        return float(self.world) if self.world > 1 and not self.with_grad else 1.0

    @property
    def owns_shared(self) -> bool:
        """Whether this rank takes the gradient of tensors every pass uses alike."""
        return self.with_grad or self.rank == 0

    def start(self, rank_rows: list[int], accum: int, cache: dict[str, list[Tensor]] | None = None) -> None:
        """``rank_rows``: every rank's batch rows this step (same on all ranks); ``cache``: this rank's
        no-grad features per micro-batch (the accumulation pre-pass), gathered here once."""
        self.sizes = [np.diff(micro_bounds(n, accum)).tolist() for n in rank_rows]
        self.blocks = {}
        for name, parts in (cache or {}).items():
            if self.world == 1:
                self.blocks[name] = [list(parts)]
            else:
                per_rank = D.all_gather(torch.cat(parts))
                self.blocks[name] = [list(t.split(self.sizes[r])) for r, t in enumerate(per_rank)]

    def rows(self) -> tuple[int, int]:
        """``(first row, rows)`` of this rank's block in a gathered feature."""
        return sum(sum(s) for s in self.sizes[:self.rank]), sum(self.sizes[self.rank])

    def offset(self, j: int) -> int:
        return self.rows()[0] + sum(self.sizes[self.rank][:j])

    def __call__(self, name: str, local: Tensor, j: int = 0) -> tuple[Tensor, int]:
        if self.world == 1 and name not in self.blocks:
            return local, 0
        if name in self.blocks:
            blocks = [list(b) for b in self.blocks[name]]
        else:                                   # no pre-pass (one micro-batch): only pass 0 exists
            blocks = [[None] * len(s) for s in self.sizes]
        grad = self.with_grad and local.requires_grad and self.world > 1
        if grad:
            current = D.all_gather_with_grad(local)
        elif name in self.blocks or self.world == 1:
            current = [b[j] for b in blocks]
        else:
            current = D.all_gather(local)
        if not grad:
            current[self.rank] = local
        for r in range(self.world):
            blocks[r][j] = current[r]
        return torch.cat([t for b in blocks for t in b]), self.offset(j)
