"""torch.distributed glue: the process group torchrun describes, rank helpers and gathers.

``init_distributed()`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and starts
the process group (NCCL on CUDA, gloo on CPU) once; without those variables everything here is the
single-process identity, so library code calls these helpers unconditionally. Models never call them:
the trainer and the evaluator pass gathers in (ARCHITECTURE: models compute features, nothing else).

Gathers take tensors whose first dimension may differ between ranks (a rank whose batch lost a bad
sample): sizes are exchanged first and rows padded to the largest, then trimmed. ``all_gather_with_grad``
is autograd-aware: the backward pass sums every rank's gradient for this rank's rows
(``torch.distributed.nn``), which is what open_clip's ``gather_with_grad`` does.

A command-line process that started a process group ends through ``exit_process`` (see there): gloo's
worker threads outlive the group and must not be running when the interpreter shuts down.
"""
from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger("finealign")

__all__ = ["DistInfo", "all_gather", "all_gather_object", "all_gather_with_grad", "all_reduce_mean",
           "barrier", "broadcast_object", "broadcast_tensor", "destroy", "exit_process", "get_rank", "get_world_size", "info", "init_distributed",
           "is_main"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world() -> DistInfo:
    """What torchrun's environment variables say (no process group is started)."""
    return DistInfo(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                    local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Start the default process group if torchrun launched more than one process (idempotent).

    Backend: NCCL when the run trains on CUDA, else gloo. ``timeout_s`` bounds every collective, so a
    rank that died makes the others fail with an error instead of hanging for ever."""
    env = env_world()
    if dist.is_available() and dist.is_initialized():
        return info()
    if not env.enabled:
        return env
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda") or str(device).startswith("cuda")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    global _started_group
    _started_group = True
    log.info("torch.distributed: rank %d of %d (%s)", env.rank, env.world_size, backend)
    return info()


def info() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                        local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def get_rank() -> int:
    return info().rank


def get_world_size() -> int:
    return info().world_size


def is_main() -> bool:
    return info().rank == 0


def destroy() -> None:
    """Leave the process group (a local call, no collective). The group's gloo threads may outlive it
    (see ``exit_process``)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_started_group = False          # this process called init_process_group (a multi-rank torchrun run)


def exit_process(rc: int) -> NoReturn:
    """End the ``finealign`` command with status ``rc``. After a multi-rank run: flush stdout, stderr and
    the log handlers, then ``os._exit`` without the interpreter's shutdown; otherwise ``sys.exit``.

    Why: gloo's worker threads outlive ``destroy_process_group`` whenever DDP or an autograd collective
    (``torch.distributed.nn``) was used: both keep the group referenced from C++, so its threads are never
    joined. Such a thread drops the last collectives' work objects just after their waiters return, and
    those hold tensors owned by Python objects, so it needs the GIL. If the main thread is already
    finalizing the interpreter then, Python ends the thread from inside a C++ destructor and the process
    aborts ("terminate called without an active exception", SIGABRT) after a run that succeeded. A core dump
    of such a rank showed exactly that: the main thread in ``Py_FinalizeEx``, a ``pt_gloo_runloop``
    thread in ``~AsyncBarrierWork`` → ``~AsyncAllgatherWork`` → ``decref_pyobject`` → ``take_gil``. About
    1 in 7 two-rank CPU runs hit it on a loaded machine. Everything the command writes is closed by then
    (checkpoints, metrics, results), so skipping the shutdown loses nothing."""
    if not _started_group:
        sys.exit(rc)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):            # a closed pipe: nothing left to deliver
            pass
    logging.shutdown()
    os._exit(rc)


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def _sizes(x: Tensor) -> list[int]:
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    out = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(out, n)
    return [int(s) for s in out]


def _pad(x: Tensor, rows: int) -> Tensor:
    if x.shape[0] == rows:
        return x
    return F.pad(x, [0, 0] * (x.ndim - 1) + [0, rows - x.shape[0]])


def all_gather(x: Tensor) -> list[Tensor]:
    """Every rank's ``x`` (rank order), no gradient; first dimensions may differ."""
    if get_world_size() == 1:
        return [x]
    sizes = _sizes(x)
    buf = [torch.empty((max(sizes),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device) for _ in sizes]
    dist.all_gather(buf, _pad(x.detach().contiguous(), max(sizes)))
    return [b[:s] for b, s in zip(buf, sizes)]


def all_gather_with_grad(x: Tensor) -> list[Tensor]:
    """As :func:`all_gather`, but gradients of every rank's copy flow back (summed) to the owner's rows."""
    if get_world_size() == 1:
        return [x]
    import torch.distributed.nn.functional as dnn
    sizes = _sizes(x)
    parts = dnn.all_gather(_pad(x.contiguous(), max(sizes)))
    return [p[:s] for p, s in zip(parts, sizes)]


def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` over ranks (a new tensor; no gradient)."""
    if get_world_size() == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / get_world_size()


def broadcast_tensor(x: Tensor | None, src: int = 0) -> Tensor:
    """``src``'s tensor on every rank (CPU tensors; others pass None). Shape and dtype travel first."""
    if get_world_size() == 1:
        return x
    meta = broadcast_object((tuple(x.shape), str(x.dtype).removeprefix("torch.")) if get_rank() == src else None, src)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    buf = x.to(device).contiguous() if get_rank() == src else torch.empty(meta[0], dtype=getattr(torch, meta[1]),
                                                                           device=device)
    dist.broadcast(buf, src=src)
    return buf.cpu()


def all_gather_object(obj: Any) -> list[Any]:
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
