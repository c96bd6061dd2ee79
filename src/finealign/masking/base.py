"""What every patch masker shares: the ``MaskIndices`` result, score -> split, and the builder.

A masker turns a per-patch relevance score (B, N) into a split of the N patches into ``keep`` (visible)
and ``masked`` index sets. Indices are kept sorted so that gathered visible tokens stay in raster
(= positional) order, and every row masks the same number of patches so results stack into tensors.

    masker = build_masker({"type": "attentive", "mask_ratio": 0.5, "mask": "most"})
    idx = masker(relevance)                      # MaskIndices(keep (B, K), masked (B, M))
    visible = gather_tokens(patches, idx.keep)   # (B, K, D)
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class MaskIndices:
    """Per-row split of N patches. Both sorted ascending per row, disjoint, together a permutation of 0..N-1."""
    keep: Tensor    # (B, K) long, visible patches
    masked: Tensor  # (B, M) long, masked patches

    @property
    def num_patches(self) -> int:
        return self.keep.shape[1] + self.masked.shape[1]

    def to_bool(self, N: int | None = None) -> Tensor:
        """(B, N) bool, True at masked patches."""
        N = self.num_patches if N is None else N
        B = self.masked.shape[0]
        out = torch.zeros(B, N, dtype=torch.bool, device=self.masked.device)
        return out.scatter(1, self.masked, True)

    def to(self, device: torch.device | str) -> "MaskIndices":
        return MaskIndices(keep=self.keep.to(device), masked=self.masked.to(device))


def num_to_mask(N: int, ratio: float) -> int:
    """How many of N patches a mask ratio masks: round half up, then at least 1 when ratio > 0 and at
    most N-1 (one patch always stays visible; that bound wins when N == 1)."""
    if N < 1:
        raise ValueError(f"need at least one patch, got N={N}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    m = int(math.floor(N * ratio + 0.5))
    if ratio > 0:
        m = max(m, 1)
    return min(m, N - 1)


def split_by_score(score: Tensor, num_masked: int) -> MaskIndices:
    """Mask the ``num_masked`` highest-scoring patches of each row; ties go to the lower index first.

    score (B, N) -> MaskIndices(keep (B, N-M), masked (B, M)), both sorted ascending.
    """
    B, N = score.shape
    if not 0 <= num_masked <= N:
        raise ValueError(f"cannot mask {num_masked} of {N} patches")
    # a stable descending sort keeps equal scores in index order -> deterministic tie-breaking
    order = torch.sort(score, dim=1, descending=True, stable=True).indices     # (B, N)
    masked = order[:, :num_masked].sort(dim=1).values                          # (B, M)
    keep = order[:, num_masked:].sort(dim=1).values                            # (B, N-M)
    return MaskIndices(keep=keep, masked=masked)


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """Rows of x at per-sample indices: x (B, N, *rest), idx (B, K) long -> (B, K, *rest)."""
    B, K = idx.shape
    index = idx.reshape(B, K, *([1] * (x.dim() - 2))).expand(B, K, *x.shape[2:])
    return torch.gather(x, 1, index)


class Masker:
    """Base class: holds the mask ratio; subclasses implement ``__call__(relevance, generator)``."""

    uses_relevance = True   # whether the pipeline must compute patch-text relevance for this masker

    def __init__(self, mask_ratio: float = 0.5):
        mask_ratio = float(mask_ratio)
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.mask_ratio = mask_ratio

    def num_masked(self, N: int) -> int:
        return num_to_mask(N, self.mask_ratio)

    def __call__(self, relevance: Tensor, generator: torch.Generator | None = None) -> MaskIndices:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({opts})"


def build_masker(spec: dict) -> Masker:
    """``{"type": "random" | "attentive", **options}`` -> a masker instance.

    Unknown type -> the registry's KeyError (with a suggestion); unknown or invalid options -> ValueError.
    """
    from ..registry import MASKERS
    opts = dict(spec)
    if "type" not in opts:
        raise ValueError(f"masker spec needs a 'type' (one of {MASKERS.names()}), got {spec}")
    name = opts.pop("type")
    cls = MASKERS.get(name)
    params = inspect.signature(cls).parameters
    unknown = sorted(set(opts) - set(params))
    if unknown:
        valid = [p for p in params if p not in ("self",)]
        raise ValueError(f"masker {name!r}: unknown option(s) {unknown}; valid options: {valid}")
    try:
        return cls(**opts)
    except (TypeError, ValueError) as e:
        raise ValueError(f"masker {name!r}: bad options {opts}: {e}") from None
