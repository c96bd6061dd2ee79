"""Patch maskers, one per file, registered in ``finealign.registry.MASKERS``; build with ``build_masker``."""
from .base import Masker, MaskIndices, build_masker, gather_tokens, num_to_mask, split_by_score  # noqa: F401
from . import random, attentive  # noqa: F401  (registration)
from .attentive import AttentiveMasker, patch_text_relevance  # noqa: F401
from .random import RandomMasker  # noqa: F401
