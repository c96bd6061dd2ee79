"""What every objective shares: the step context and the interface.

An objective is an ``nn.Module`` built from its recipe options; ``forward(feats, batch, ctx)`` returns a
dict of named scalars in which ``"loss"`` is the term the trainer weights and sums; other entries are
logged as metrics. Objectives build their own targets from the batch — the model never does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import Tensor, nn

from ..types import Batch, Features


@dataclass
class StepContext:
    """Per-step information an objective may need.

    ``gather(name, local)`` returns ``(all, offset)``: the feature over the whole *global* batch (other
    micro-batches' cached features under gradient accumulation, other ranks' under DDP) and the row at
    which this call's local features start. Only the local rows carry gradient (ranks: see distributed).
    """
    step: int = 0
    total_steps: int = 1
    gather_fn: Callable[[str, Tensor], tuple[Tensor, int]] | None = None
    micro_index: int = 0              # which micro-batch of the step this pass is
    steps_per_epoch: int = 0          # optimizer steps per epoch (0 = unknown, e.g. streaming sources)
    state: dict = field(default_factory=dict)

    def shared(self, t: Tensor) -> Tensor:
        """A tensor a global loss uses identically in every micro-batch pass (e.g. the temperature):
        its gradient is taken in the first pass only, so it is counted once per step."""
        return t if self.micro_index == 0 else t.detach()

    def gather(self, name: str, local: Tensor) -> tuple[Tensor, int]:
        if self.gather_fn is None:
            return local, 0
        return self.gather_fn(name, local)


class Objective(nn.Module):
    #: "local" losses are averaged over micro-batches; "global" losses see the whole batch through
    #: ``ctx.gather`` and are exact under gradient accumulation (see train/loop.py).
    scope: str = "local"
    #: Features this objective reads (checked against the model at build time).
    requires: tuple[str, ...] = ()
    #: Feature names gathered across micro-batches / ranks for "global" objectives.
    gathers: tuple[str, ...] = ()

    def forward(self, feats: Features, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError


def require(feats: Features, name: str, objective: str) -> Tensor:
    value = getattr(feats, name, None)
    if value is None:
        value = feats.extras.get(name)
    if value is None:
        raise ValueError(f"objective {objective!r} needs feature {name!r}, which the model did not produce "
                         f"(e.g. captioning needs model.decoder_layers > 0)")
    return value


def build_objectives(spec: dict[str, dict]) -> nn.ModuleDict:
    """``{"itc": {"weight": 1}, "ic": {"weight": 2, "label_smoothing": 0.1}}`` -> ModuleDict of objectives.
    Entries with weight 0 are left out."""
    from ..registry import OBJECTIVES
    out = nn.ModuleDict()
    for name, opts in spec.items():
        opts = dict(opts)
        weight = float(opts.pop("weight", 1.0))
        if weight == 0.0:
            continue
        cls = OBJECTIVES.get(name)
        try:
            obj = cls(**opts)
        except TypeError as e:
            raise ValueError(f"objectives.{name}: bad options {opts}: {e}") from None
        obj.weight = weight
        out[name] = obj
    return out


