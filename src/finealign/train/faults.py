"""Numerical faults in a training step: non-finite losses and gradients.

A step whose loss (any objective's) or gradient norm is not finite takes no optimizer step. Under
``train.skip_nonfinite=N`` the first N such batches are skipped (logged as a warning, counted in the metrics
as ``train/nonfinite_skipped``, the step number not advanced); the next one, or any one with N = 0, stops the
run with a :class:`NonFiniteLossError` naming the step, the objective that produced it and the last good
checkpoint. Under multi-process the decision is taken on values every rank shares (an all-reduced flag and
the all-reduced gradient norm), so all ranks skip or stop together.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..objectives import StepContext

log = logging.getLogger("finealign")


class NonFiniteLossError(RuntimeError):
    """A non-finite loss or gradient (beyond ``train.skip_nonfinite``); the message names the step, the
    objective and the last good checkpoint."""


def nonfinite_params(named_params, limit: int = 3) -> list[str]:
    """Names of (at most ``limit``) parameters whose gradient holds a NaN / inf."""
    bad = []
    for n, p in named_params:
        if p.grad is not None and not torch.isfinite(p.grad).all():
            bad.append(n)
            if len(bad) >= limit:
                break
    return bad


def blame_gradient(trainer, micro) -> list[str]:
    """Objectives whose own gradient is not finite, found by re-running each micro-batch and taking each
    objective's gradient alone (the fault path only; RNG and model / objective state are restored after)."""
    params = [p for p in trainer._params() if p.requires_grad]
    saved = [{k: v.detach().clone() for k, v in m.state_dict().items()}
             for m in (trainer.model, trainer.objectives)]
    blamed: list[str] = []
    try:
        with torch.random.fork_rng(devices=[]), trainer.autocast():
            for j, mb in enumerate(micro):      # micro=j: the step's own seeded draws (masks, mixing)
                ctx = StepContext(step=trainer.step, total_steps=trainer.cfg.train.steps, micro_index=j,
                                  steps_per_epoch=trainer.loader.batches_per_epoch or 0)
                feats = trainer.pipeline(mb, step=trainer.step, micro=j)
                for name, obj in trainer.objectives.items():
                    if name in blamed:
                        continue
                    loss = obj(feats, mb, ctx)["loss"]
                    if not loss.requires_grad:
                        continue
                    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                    if any(g is not None and not torch.isfinite(g).all() for g in grads):
                        blamed.append(name)
    except Exception as e:          # a diagnosis must never hide the fault it diagnoses
        log.debug("could not attribute the non-finite gradient: %s", e)
    finally:
        for m, sd in zip((trainer.model, trainer.objectives), saved):
            m.load_state_dict(sd)
    return blamed


class NonFiniteGuard:
    """Counts skipped batches and raises once ``limit`` is used up."""

    def __init__(self, limit: int, skipped: int = 0):
        self.limit = int(limit)
        self.skipped = int(skipped)        # over the whole run (a resumed run continues the count)
        self.last = ""                     # the last skipped fault, for the metrics

    def handle(self, step: int, what: str, last_checkpoint: Path | None) -> None:
        """Skip (return) or stop (raise) for a fault ``what`` at ``step`` (optimizer steps done)."""
        where = f"step {step}: {what}"
        if self.skipped < self.limit:
            self.skipped += 1
            self.last = where
            log.warning("%s; batch skipped, no optimizer step (%d of train.skip_nonfinite=%d)",
                        where, self.skipped, self.limit)
            return
        budget = (f" after skipping {self.skipped} batch(es) (train.skip_nonfinite={self.limit})"
                  if self.limit else " (train.skip_nonfinite=N skips up to N such batches)")
        raise NonFiniteLossError(f"{where}; run stopped{budget}; last good checkpoint: "
                                 f"{last_checkpoint or 'none yet'}")
