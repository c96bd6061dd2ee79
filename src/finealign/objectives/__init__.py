"""Objectives, one per file, registered in ``finealign.registry.OBJECTIVES``."""
from .base import Objective, StepContext, build_objectives  # noqa: F401
from . import itc, caption, tg_mim, itm, mlm, agreement, semantic_mim, pta, mixed_itc, prefix_lm  # noqa: F401  (registration)
