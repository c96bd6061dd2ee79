"""AdamW with decay / no-decay parameter groups, warm-up + cosine schedule, LR scaling rule.

Weight-decay rule (nanoGPT-style, plus the usual VLP exceptions)::

    decay  <=> p.requires_grad and p.ndim >= 2 and not special(name)

``special`` matches learned tokens and positions that are 2-D/3-D but should not be shrunk: a
keyword from :data:`NO_DECAY_KEYWORDS` (``pos_embed``, ``cls``, ``logit_scale``, ``query``, ``queries``,
...) in the parameter's *own* name, i.e. the last dotted component (``visual.cls_token``,
``pooler.query``, ``text.positional_embedding``), or a ``.weight`` whose owner is named like a position
table (``text.pos_embed.weight`` of an ``nn.Embedding``). The weight of an ``nn.Linear`` called
``query`` (a q-projection) still decays. Biases, norm gains and scalars (``ndim < 2``) never decay.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

__all__ = ["NO_DECAY_KEYWORDS", "no_decay_by_name", "param_groups", "build_optimizer", "build_scheduler",
           "lr_lambda", "scale_lr"]

NO_DECAY_KEYWORDS = ("pos_embed", "positional_embedding", "cls", "class_embedding", "logit_scale",
                     "query", "queries", "temperature")
POSITION_KEYWORDS = ("pos_embed", "positional_embedding", "position_embedding")


def no_decay_by_name(name: str) -> bool:
    """True if ``name`` is a learned token / position / temperature (see the module docstring)."""
    parts = name.split(".")
    if any(kw in parts[-1] for kw in NO_DECAY_KEYWORDS):
        return True
    return parts[-1] == "weight" and len(parts) > 1 and any(kw in parts[-2] for kw in POSITION_KEYWORDS)


def _named_trainable(model, extra_params: Iterable = ()) -> list[tuple[str, nn.Parameter]]:
    """Distinct trainable ``(name, param)`` pairs from a module or an iterable, then ``extra_params``."""
    items = model.named_parameters() if isinstance(model, nn.Module) else (model or ())
    out: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()                       # tied / repeated parameters count once (first name wins)
    for i, item in enumerate(list(items) + list(extra_params)):
        name, p = item if isinstance(item, tuple) else (f"param.{i}", item)
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"expected a Parameter or a (name, Parameter) pair, got {type(p).__name__} ({name})")
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        out.append((name, p))
    return out


def param_groups(model, weight_decay: float, extra_params: Iterable = ()) -> list[dict]:
    """Two AdamW groups, ``{"params", "weight_decay", "group", "names"}``; empty groups are left out.

    ``names`` (a list of parameter names) is kept in the optimizer's param groups, so it shows up in
    its state dict: handy for logging and for checking that a resumed run has the same layout.
    """
    decay, no_decay = [], []
    for name, p in _named_trainable(model, extra_params):
        (no_decay if p.ndim < 2 or no_decay_by_name(name) else decay).append((name, p))
    groups = []
    for label, items, wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
        if items:
            groups.append({"params": [p for _, p in items], "weight_decay": wd, "group": label,
                           "names": [n for n, _ in items]})
    if not groups:
        raise ValueError("no trainable parameters (all requires_grad=False?)")
    return groups


def build_optimizer(model, cfg, extra_params: Iterable = ()) -> torch.optim.AdamW:
    """AdamW(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps) over :func:`param_groups`.

    Args:
        model: the module whose trainable parameters are optimised, or an iterable of
            ``(name, Parameter)`` pairs (e.g. model + objective parameters) or bare Parameters.
        cfg: a ``TrainConfig`` (``lr, weight_decay, beta1, beta2, eps, optimizer``). ``optimizer``: ``auto``
            = PyTorch's default (multi-tensor ``foreach`` kernels on CUDA, a loop over parameters on CPU),
            ``foreach``, or ``fused`` (``AdamW(fused=True)``: one kernel per parameter group); the three agree
            to float rounding, not bit for bit.
        extra_params: further parameters living outside ``model`` (e.g. in an objective), as
            ``Parameter``s or ``(name, Parameter)`` pairs; duplicates of model parameters are ignored.
    """
    groups = param_groups(model, cfg.weight_decay, extra_params)
    impl = getattr(cfg, "optimizer", "auto")
    kind = {"auto": {}, "fused": {"fused": True}, "foreach": {"foreach": True}}.get(impl)
    if kind is None:
        raise ValueError(f"train.optimizer must be auto, foreach or fused, got {impl!r}")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kind)


def lr_lambda(step: int, warmup: int, steps: int, min_lr_ratio: float) -> float:
    """LR multiplier at optimizer step ``step`` (0-based).

    * ``step < warmup``: ``step / warmup`` (0 at step 0, as in HF ``get_cosine_schedule_with_warmup``).
    * then cosine from 1 to ``min_lr_ratio``, reached at ``step == steps`` and held afterwards:
      ``r + (1 - r) * 0.5 * (1 + cos(pi * (step - warmup) / (steps - warmup)))``.
    """
    if warmup > 0 and step < warmup:
        return step / warmup
    progress = min(1.0, max(0.0, (step - warmup) / max(1, steps - warmup)))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over ``cfg.warmup`` steps, then cosine to ``cfg.min_lr_ratio * lr`` at ``cfg.steps``.

    Call ``scheduler.step()`` once after every ``optimizer.step()``. The multiplier is a plain
    closure, so ``scheduler.state_dict()`` holds only numbers (checkpoint-safe, ``weights_only``).
    """
    warmup, steps, ratio = int(cfg.warmup), int(cfg.steps), float(cfg.min_lr_ratio)
    if warmup < 0 or steps < 0 or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"bad schedule: warmup={warmup}, steps={steps}, min_lr_ratio={ratio}")

    def fn(step: int) -> float:
        return lr_lambda(step, warmup, steps, ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def scale_lr(base_lr: float, batch_size: int, base_batch: int = 256) -> float:
    """Linear scaling rule (Goyal et al., 2017): ``base_lr * batch_size / base_batch``.

    A helper for recipes; never applied automatically (``train.lr`` is used as given).
    """
    if batch_size <= 0 or base_batch <= 0:
        raise ValueError(f"batch sizes must be positive, got {batch_size} and {base_batch}")
    return base_lr * batch_size / base_batch
