"""What every objective shares: the step context and the interface.

An objective is an ``nn.Module`` built from its recipe options; ``forward(feats, batch, ctx)`` returns a
dict of named scalars in which ``"loss"`` is the term the trainer weights and sums; other entries are
logged as metrics. Objectives build their own targets from the batch — the model never does.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from torch import Tensor, nn

from ..types import Batch, Features

log = logging.getLogger(__name__)


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
    #: multi-process: whether this rank takes the gradient of ``shared`` tensors (see train/gather.py)
    owns_shared: bool = True
    #: ``train.local_loss``: ``(first row, rows)`` of this rank's block in gathered features; objectives
    #: that support it (``local_loss = True``) score only those rows; None = score every row
    local_rows: tuple[int, int] | None = None
    #: mean over ranks of a no-grad statistic (e.g. a centre's batch mean); identity in one process
    reduce_mean: Callable[[Tensor], Tensor] | None = None

    def shared(self, t: Tensor) -> Tensor:
        """A tensor a global loss uses identically in every micro-batch pass (e.g. the temperature):
        its gradient is taken in the first pass only, so it is counted once per step (and, across ranks,
        as train/gather.py says)."""
        if self.micro_index == 0 and self.owns_shared:
            return t
        # a zero gradient rather than none: data-parallel wrappers expect every used parameter's hook
        return t.detach() + 0.0 * t

    def mean_over_ranks(self, t: Tensor) -> Tensor:
        return t if self.reduce_mean is None else self.reduce_mean(t)

    def gather(self, name: str, local: Tensor) -> tuple[Tensor, int]:
        if self.gather_fn is None:
            return local, 0
        return self.gather_fn(name, local)


class Objective(nn.Module):
    #: "local" losses are averaged over micro-batches; "global" losses see the whole batch through
    #: ``ctx.gather`` and are exact under gradient accumulation (see train/loop.py).
    scope: str = "local"
    #: Features this objective reads: the model computes them when an active objective asks (a model that
    #: cannot raises a ValueError naming the objective and the feature, see ``require``).
    requires: tuple[str, ...] = ()
    #: Feature names gathered across micro-batches / ranks for "global" objectives.
    gathers: tuple[str, ...] = ()
    #: Whether the objective honours ``ctx.local_rows`` (``train.local_loss``).
    local_loss: bool = False

    def forward(self, feats: Features, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError


class EpochRamp:
    """A linear 0 -> 1 ramp over ``steps`` optimizer steps; ``"epoch"`` = one epoch of the run being
    trained (``ctx.steps_per_epoch``), the unit ALBEF and TiMix ramp over. When the epoch length is
    unknown (a stream without ``data.resample``) there is no ramp, with one warning naming ``key``."""

    def __init__(self, steps: int | str, key: str):
        if not (steps == "epoch" or (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0)):
            raise ValueError(f"{key} must be a number of steps >= 0 or 'epoch', got {steps!r}")
        self.steps, self.key, self._warned = steps, key, False

    def __call__(self, ctx: StepContext) -> float:
        steps = self.steps
        if steps == "epoch":
            steps = ctx.steps_per_epoch
            if not steps and not self._warned:
                log.warning("%s: a ramp over one epoch, but this run's epoch length is unknown (a stream without "
                            "data.resample): no ramp; set %s to a number of steps", self.key, self.key)
                self._warned = True
        return min(1.0, ctx.step / steps) if steps else 1.0


def require(feats: Features, name: str, objective: str) -> Tensor:
    value = getattr(feats, name, None)
    if value is None:
        value = feats.extras.get(name)
    if value is None:
        hint = next((h for prefix, h in _FEATURE_HINTS if name.startswith(prefix)), None)
        raise ValueError(f"objective {objective!r} needs feature {name!r}, which the model did not produce"
                         + (f" ({hint})" if hint else ""))
    return value


#: what makes a model produce a feature, by name prefix (the first match is shown)
_FEATURE_HINTS = (
    ("caption_", "a caption decoder: model.arch: coca with model.decoder_layers > 0"),
    ("teacher_", "a momentum teacher: model.arch: fusion with model.momentum > 0"),
    ("agree_", "model.arch: fusion with model.momentum > 0, model.prototypes > 0 and data.views: 2"),
    ("mim_", "an image decoder and a masker: model.mim_decoder_layers > 0 and masking.mim"),
    ("pta_", "the patch-text alignment head: model.pta=true"),
    ("mixed_", "a mixer: mixer.type (timix, cutmix or mixup)"),
)


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


