"""Random-number-generator state of every library a run draws from, in a ``torch.load(weights_only=True)``-safe
form (checkpoints restore it so that a resumed run reproduces the uninterrupted one)."""
from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)


def get_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU (and all CUDA devices if initialised) RNG states, weights_only-safe."""
    np_state = np.random.get_state()   # ('MT19937', uint32[624], pos, has_gauss, cached_gaussian)
    state: dict[str, Any] = {
        "python": random.getstate(),   # (version, tuple of 625 ints, gauss_next)
        "numpy": {"kind": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`get_rng_state`; missing entries are left alone."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        s = state["numpy"]
        keys = s["keys"].detach().cpu().numpy() if isinstance(s["keys"], Tensor) else s["keys"]
        keys = np.asarray(keys, dtype=np.uint32)
        np.random.set_state((s["kind"], keys, s["pos"], s["has_gauss"], s["cached_gaussian"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        cuda = [t.cpu() for t in state["cuda"]]
        n = torch.cuda.device_count()
        if len(cuda) != n:
            log.warning("checkpoint holds CUDA RNG states for %d device(s), this machine has %d; "
                        "restoring the first %d", len(cuda), n, min(n, len(cuda)))
        for i, s in enumerate(cuda[:n]):
            torch.cuda.set_rng_state(s, i)
