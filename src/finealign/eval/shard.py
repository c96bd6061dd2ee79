"""Evaluation split across torch.distributed ranks, with results identical to one process.

Under a process group of ``world_size > 1`` every rank builds the same ordered list of unique images
(or texts), takes one contiguous share of it, computes on that share and gathers the per-item
outputs back in the original order; metrics are then computed from the full, identical tensors.

Shares are cut at multiples of the eval batch size (:func:`shard_bounds`), so every batch a rank
runs holds exactly the items of one batch of the single-process run: kernels see the same inputs
with the same shapes and produce the same bits, whatever the batch composition would otherwise change
(CPU GEMM blocking, padding). The price: a split of fewer batches than ranks leaves ranks idle.

Every helper here is a collective when ``world_size > 1``: all ranks must call it, in the same order.
Without a process group (or with ``enabled=False``) they are the single-process identity.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from .. import distributed as fdist
from ..data.loader import iter_eval_images
from ..data.skips import SkipLog

__all__ = ["ImagePass", "Sharding", "image_pass", "shard_bounds"]


def shard_bounds(n: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[lo, hi)`` of ``n`` items for ``rank``: contiguous, in rank order, cut at multiples of
    ``batch_size`` (whole batches are spread as evenly as possible; the last may be short)."""
    if world_size <= 1:
        return 0, n
    bs = max(1, int(batch_size))
    batches = -(-n // bs)
    per, extra = divmod(batches, world_size)
    b0 = rank * per + min(rank, extra)
    b1 = b0 + per + (1 if rank < extra else 0)
    return min(n, b0 * bs), min(n, b1 * bs)


@dataclass(frozen=True)
class Sharding(fdist.DistInfo):
    """Which share of an evaluation this process computes (``rank``, ``world_size``, ``enabled`` iff
    world_size > 1, ``is_main``: those of :class:`finealign.distributed.DistInfo`)."""

    @classmethod
    def current(cls, enabled: bool | None = None) -> "Sharding":
        """The process group's ranks (``enabled=None``: use it when there is one; False: act alone)."""
        d = fdist.info()
        if enabled is False or d.world_size <= 1:
            return cls()
        return cls(rank=d.rank, world_size=d.world_size)

    def bounds(self, n: int, batch_size: int) -> tuple[int, int]:
        return shard_bounds(n, batch_size, self.rank, self.world_size)

    def gather_rows(self, x: Tensor | None) -> Tensor | None:
        """Concatenate every rank's rows in rank order. ``x`` may be None on a rank with no rows (its
        trailing shape and dtype are taken from another rank); None when no rank has any."""
        if not self.enabled:
            return x
        meta = fdist.all_gather_object(None if x is None else (tuple(x.shape[1:]), str(x.dtype).split(".")[-1]))
        ref = next((m for m in meta if m is not None), None)
        if ref is None:
            return None
        home = x.device if x is not None else torch.device("cpu")
        if x is None:
            x = torch.empty((0,) + ref[0], dtype=getattr(torch, ref[1]))
        comm = _comm_device(home)
        is_bool = x.dtype == torch.bool
        send = (x.to(torch.uint8) if is_bool else x).to(comm)
        out = torch.cat(fdist.all_gather(send)).to(home)
        return out.bool() if is_bool else out

    def gather_list(self, items: list) -> list:
        """Concatenate every rank's Python list in rank order."""
        if not self.enabled:
            return items
        return [x for part in fdist.all_gather_object(list(items)) for x in part]

    def on_main(self, fn: Callable[[], object]):
        """Run ``fn`` on rank 0 only and hand its result to every rank (errors are raised everywhere)."""
        if not self.enabled:
            return fn()
        if not self.is_main:
            ok, value = fdist.broadcast_object(None)
            if not ok:
                raise RuntimeError(f"evaluation failed on rank 0: {value}")
            return value
        try:
            value = fn()
        except Exception as e:
            fdist.broadcast_object((False, f"{type(e).__name__}: {e}"))
            raise
        fdist.broadcast_object((True, value))
        return value

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank if any rank failed (so none waits for ever on a dead peer)."""
        if not self.enabled:
            if error is not None:
                raise error
            return
        errors = fdist.all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        for r, e in enumerate(errors):
            if e is not None:
                raise RuntimeError(f"evaluation failed on rank {r}: {e}")


def _comm_device(home: torch.device) -> torch.device:
    """NCCL moves only CUDA tensors; gloo takes CPU ones (and CUDA ones it copies)."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return home if home.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return home


@dataclass
class ImagePass:
    """One pass over the unique images of a split, gathered in order over every rank.

    ``kept``: positions (in the list given to :func:`image_pass`) of the images that loaded;
    ``tensors[name]``: (len(kept), ...) rows per kept image; ``lists[name]``: one value per kept image.
    """
    kept: list[int]
    tensors: dict[str, Tensor] = field(default_factory=dict)
    lists: dict[str, list] = field(default_factory=dict)


def image_pass(uniq: Sequence, transform, batch_size: int, workers: int, skips: SkipLog,
               step: Callable[[Tensor, int], dict], shard: Sharding, progress: bool = False,
               desc: str = "eval") -> ImagePass:
    """Run ``step(images (B, 3, S, S), batch_index)`` on this rank's share of ``uniq`` (unique samples,
    the same list on every rank) and gather its outputs.

    ``step`` returns ``{name: Tensor (B, ...) or list of B values}``; ``batch_index`` is the batch's
    index in the single-process run (seed per-batch randomness with it). Images that fail to load go to
    ``skips`` (merged over ranks in image order: the same counts and examples as one process); a
    rank's error (e.g. a bad image under ``data.strict``) is raised on every rank.
    """
    lo, hi = shard.bounds(len(uniq), batch_size)
    local_skips = SkipLog(strict=skips.strict, examples=skips.examples) if shard.enabled else skips
    pos = {s.key: lo + j for j, s in enumerate(uniq[lo:hi])}
    kept: list[int] = []
    tensors: dict[str, list[Tensor]] = {}
    lists: dict[str, list] = {}
    error = None
    bar = tqdm(desc=desc, total=hi - lo, disable=not progress, unit="img", dynamic_ncols=True)
    try:
        for images, batch in iter_eval_images(uniq[lo:hi], transform, batch_size, workers, local_skips):
            idx = [pos[s.key] for s in batch]
            for name, v in step(images, idx[0] // max(1, int(batch_size))).items():
                if isinstance(v, Tensor):
                    tensors.setdefault(name, []).append(v)
                else:
                    lists.setdefault(name, []).extend(v)
            kept.extend(idx)
            bar.update(len(batch))
    except Exception as e:
        error = e
    finally:
        bar.close()
    shard.agree(error)
    if shard.enabled:
        for log in fdist.all_gather_object(local_skips):
            skips.update(log)
    out = ImagePass(kept=shard.gather_list(kept))
    for name in sorted(set(shard.gather_list(sorted(tensors)))):     # a rank may have kept no image
        local = torch.cat(tensors[name]) if name in tensors else None
        out.tensors[name] = shard.gather_rows(local)
    for name in sorted(set(shard.gather_list(sorted(lists)))):
        out.lists[name] = shard.gather_list(lists.get(name, []))
    return out
