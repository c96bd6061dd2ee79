"""Image mixers, one per file, registered in ``finealign.registry.MIXERS``; build with ``build_mixer``."""
from ..registry import MIXERS  # noqa: F401
from .base import Mix, Mixer, build_mixer, paste_windows, window_side, zscore  # noqa: F401
from . import timix, cutmix, mixup  # noqa: F401  (registration)
