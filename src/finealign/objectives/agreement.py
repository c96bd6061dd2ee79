"""Agreement learning (SemMIM's local-semantics enhancing; DINO's self-distillation).

The model projects the global token of two augmented views through the shared prototype head, for the
student and the momentum teacher, and returns the raw prototype logits:

    feats.extras["agree_student"]  (2, B, K)   student logits of view 1 and view 2
    feats.extras["agree_teacher"]  (2, B, K)   teacher logits of view 1 and view 2 (no gradient)

The objective builds the targets itself: the teacher's logits are centred (an EMA ``center`` of
their batch mean, buffer of this objective) and sharpened with a low temperature,

    p_t = softmax((t - center) / tau_t),   log p_s = log_softmax(s / tau_s)
    loss = 1/2 [ CE(p_t(view 1), p_s(view 2)) + CE(p_t(view 2), p_s(view 1)) ],  CE = -sum p_t log p_s

with ``tau_t`` warmed up linearly from ``teacher_temp`` to ``teacher_temp_final`` over
``teacher_temp_warmup`` steps (DINO: 0.04 -> 0.07 over 30 epochs; 0 = ``teacher_temp_final`` from step 0),
``tau_s`` = 0.1. After the loss the centre moves toward the batch mean:
``center = m * center + (1 - m) * mean(t)`` (m = 0.9).
Centring keeps one prototype from winning every sample, sharpening keeps the targets from going
uniform: together they prevent collapse. ``usage_entropy`` (entropy, in nats, of the mean teacher
distribution over the batch) is logged as the collapse monitor: log K when prototypes are used evenly,
0 when one prototype takes everything.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import OBJECTIVES
from ..types import Batch, Features
from .base import Objective, StepContext, require


def teacher_targets(t_logits: Tensor, center: Tensor, temp: float) -> Tensor:
    """Centred, sharpened teacher distribution: softmax((t - center) / temp) over the last dim."""
    return F.softmax((t_logits.float() - center) / temp, dim=-1)


def soft_cross_entropy(p_t: Tensor, s_logits: Tensor, temp: float) -> Tensor:
    """-sum p_t * log_softmax(s / temp) over the last dim -> one value per row (...,)."""
    return -(p_t * F.log_softmax(s_logits.float() / temp, dim=-1)).sum(-1)


def usage_entropy(p: Tensor) -> Tensor:
    """Entropy (nats) of the mean of distributions p (..., K): how evenly prototypes are used."""
    q = p.reshape(-1, p.shape[-1]).mean(0)
    return -(q * q.clamp_min(1e-12).log()).sum()


class _Centred(Objective):
    """Shared state and schedule: the EMA centre (lazily sized to K) and the teacher temperature."""

    def __init__(self, student_temp: float = 0.1, teacher_temp: float = 0.04, teacher_temp_final: float = 0.07,
                 teacher_temp_warmup: int = 0, center_momentum: float = 0.9):
        super().__init__()
        for name, v in (("student_temp", student_temp), ("teacher_temp", teacher_temp),
                        ("teacher_temp_final", teacher_temp_final)):
            if v <= 0:
                raise ValueError(f"{name} must be > 0, got {v}")
        if not 0.0 <= center_momentum < 1.0:
            raise ValueError(f"center_momentum must be in [0, 1), got {center_momentum}")
        self.student_temp, self.t0, self.t1 = float(student_temp), float(teacher_temp), float(teacher_temp_final)
        self.warmup, self.center_momentum = int(teacher_temp_warmup), float(center_momentum)
        self.register_buffer("center", torch.zeros(0))

    def teacher_temp(self, step: int) -> float:
        if self.warmup <= 0 or step >= self.warmup:
            return self.t1
        return self.t0 + (self.t1 - self.t0) * step / self.warmup

    def _center(self, K: int, device) -> Tensor:
        if self.center.numel() != K:
            self.center = torch.zeros(K, device=device)
        return self.center

    @torch.no_grad()
    def _update_center(self, t_logits: Tensor, ctx: StepContext | None = None) -> None:
        mean = t_logits.float().reshape(-1, t_logits.shape[-1]).mean(0)
        if ctx is not None:
            mean = ctx.mean_over_ranks(mean)              # every rank moves its centre alike
        self.center.mul_(self.center_momentum).add_(mean, alpha=1 - self.center_momentum)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        c = state_dict.get(prefix + "center")
        if c is not None and c.shape != self.center.shape:       # sized on first use: adopt the saved size
            self.center = torch.zeros_like(c)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@OBJECTIVES.register("agreement")
class Agreement(_Centred):
    scope = "local"
    requires = ("agree_student", "agree_teacher")

    def forward(self, feats: Features, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        s = require(feats, "agree_student", "agreement")                      # (2, B, K)
        t = require(feats, "agree_teacher", "agreement").detach()             # (2, B, K)
        if s.shape != t.shape or s.dim() != 3 or s.shape[0] != 2:
            raise ValueError(f"agreement: expected agree_student / agree_teacher of shape (2, B, K), got "
                             f"{tuple(s.shape)} and {tuple(t.shape)}")
        tau_t = self.teacher_temp(ctx.step)
        p_t = teacher_targets(t, self._center(t.shape[-1], t.device), tau_t)  # (2, B, K)
        loss = (soft_cross_entropy(p_t[0], s[1], self.student_temp).mean()
                + soft_cross_entropy(p_t[1], s[0], self.student_temp).mean()) / 2
        out = {"loss": loss, "usage_entropy": usage_entropy(p_t), "teacher_temp": torch.tensor(tau_t)}
        if self.training:
            self._update_center(t, ctx)
        return out
