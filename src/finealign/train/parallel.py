"""Data-parallel wrapping outside the model: DDP or FSDP2 around one "run this function" forward.

The trainer's forward is not ``model.forward``: the pipeline calls ``model.encode``, the maskers and
``model.heads``. DDP prepares its gradient reduction, and FSDP gathers its sharded parameters, in the
wrapped module's ``forward``; so the model sits inside ``_Run``, whose ``forward(fn, *args)`` just calls
``fn(*args)``, and ``Engine.run(fn, ...)`` goes through the wrapper. The model's code never sees it.

* ``single``: one process, ``run`` is a plain call.
* ``ddp``: ``DistributedDataParallel`` (``find_unused_parameters`` — heads of switched-off paths, a
  mixer that stopped — and ``broadcast_buffers=False``: queues and EMA teachers are kept identical by
  construction). Gradient accumulation reduces only in the last micro-batch (``no_sync``).
* ``fsdp``: FSDP2 (``fully_shard``) on every transformer block, then on the whole model: parameters,
  gradients and optimizer state are sharded over the ranks. Checkpoints hold full (unsharded) weights
  and a full optimizer state keyed by parameter name (``torch.distributed.checkpoint.state_dict``), so a
  checkpoint loads anywhere for evaluation; resuming one needs ``train.strategy=fsdp`` again.
  ``unsharded()`` gathers the weights for code that calls model methods outside ``run`` (evaluation,
  sampler refreshes, EMA teachers read their own shards alike and need nothing).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn

from ..distributed import DistInfo

FSDP_OPTIM = "fsdp-full"          # marker of an FSDP checkpoint's optimizer state format


def compile_blocks(model: nn.Module) -> int:
    """``train.compile``: ``torch.compile`` every transformer block in place (the blocks are where the
    time goes; the model's Python glue — pipeline, maskers, heads — stays eager). Returns how many."""
    from ..models.layers import Block
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for b in blocks:
        b.compile()
    return len(blocks)


class _Run(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(*args, **kwargs)


class _Holder:
    """What ``save_checkpoint`` needs of a model / optimizer: ``state_dict()``."""

    def __init__(self, sd: dict):
        self._sd = sd

    def state_dict(self) -> dict:
        return self._sd


class Engine:
    def __init__(self, model: nn.Module, strategy: str, dist: DistInfo, device: torch.device):
        self.model, self.dist = model, dist
        self.kind = "single" if dist.world_size == 1 else strategy
        self.wrapped: nn.Module | None = None
        if self.kind == "ddp":
            import warnings
            from torch.nn.parallel import DistributedDataParallel as DDP
            with warnings.catch_warnings():      # broadcast_buffers=False is what we mean (see the doc above)
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                self.wrapped = DDP(_Run(model), device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False, find_unused_parameters=True)
        elif self.kind == "fsdp":
            from torch.distributed.fsdp import fully_shard
            from ..models.layers import Block
            # FSDP2 cannot shard 0-d parameters (the temperature): they stay replicated and their
            # gradients are averaged here (finish_backward)
            self.replicated = [p for p in model.parameters() if p.ndim == 0]
            for m in list(model.modules()):
                if isinstance(m, Block):
                    fully_shard(m, ignored_params=set(self.replicated))
            self.wrapped = _Run(model)
            fully_shard(self.wrapped, ignored_params=set(self.replicated))
        elif self.kind != "single":
            raise ValueError(f"train.strategy must be ddp or fsdp, got {strategy!r}")

    replicated: list[nn.Parameter] = []

    def finish_backward(self) -> None:
        """After the last micro-batch's backward: average what the wrapper does not (FSDP's replicated
        0-d parameters)."""
        if self.kind != "fsdp" or not self.replicated:
            return
        import torch.distributed as dist
        for p in self.replicated:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(self.dist.world_size)

    def run(self, fn: Callable, *args, **kwargs) -> Any:
        return fn(*args, **kwargs) if self.wrapped is None else self.wrapped(fn, *args, **kwargs)

    def sync(self, enabled: bool):
        """Context of one backward pass: reduce gradients over ranks only when ``enabled`` (the last
        micro-batch of a step)."""
        if self.kind == "ddp" and not enabled:
            return self.wrapped.no_sync()
        if self.kind == "fsdp":
            self.wrapped.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def unsharded(self):
        """Full weights on every rank for the duration (FSDP); nothing to do otherwise."""
        if self.kind != "fsdp":
            yield
            return
        self.wrapped.unshard()
        try:
            yield
        finally:
            self.wrapped.reshard()

    # ------------------------------------------------------------------ checkpoints
    def model_state(self) -> nn.Module | _Holder:
        """Full weights to save (a collective under FSDP: every rank calls it)."""
        if self.kind != "fsdp":
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(self.wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return _Holder({k.removeprefix("model."): v for k, v in sd.items()})

    def optimizer_state(self, optimizer: torch.optim.Optimizer):
        if self.kind != "fsdp":
            return optimizer
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return _Holder(get_optimizer_state_dict(
            self.wrapped, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))

    def load(self, ckpt_path, optimizer, scheduler, map_location) -> dict:
        """Resume: weights, optimizer and scheduler from a checkpoint dir (every rank reads it)."""
        from . import checkpoint as ckpt
        if self.kind != "fsdp":
            return ckpt.load_checkpoint(ckpt_path, self.model, optimizer, scheduler, map_location=map_location,
                                        restore_rng=True)
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        state = ckpt.load_checkpoint(ckpt_path, None, None, scheduler, map_location="cpu", restore_rng=True)
        if state["extra"].get("optimizer_format") != FSDP_OPTIM:
            raise ckpt.CheckpointError(f"{state['path']} was not saved by train.strategy=fsdp; resume it "
                                       "with the strategy that wrote it (its weights load anywhere)")
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        sd = ckpt.read_weights(state["path"] / "model.safetensors")
        set_model_state_dict(self.wrapped, {f"model.{k}": v for k, v in sd.items()}, options=opts)
        raw = ckpt.read_state(state["path"] / "state.pt")
        set_optimizer_state_dict(self.wrapped, optimizer, raw["optimizer"], options=opts)
        return state
