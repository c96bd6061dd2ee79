"""Text (word) masking for masked language modelling: BERT-style random selection and score-driven selection.

Patch maskers (``MASKERS``) split image patches; this module masks *tokens* of ``batch.text`` and has
its own functional API (it is not registered):

    masked, pos = mask_tokens(batch.text, batch.text_mask, mask_id=V, vocab_size=V,
                              special_ids=(pad, bos, eos), generator=g)          # random 15%, 80/10/10
    pos = select_words(word_scores, batch.text_mask, special, ratio=0.15)       # top-scoring words (SyncMask)
    masked = corrupt_tokens(batch.text, pos, mask_id=V, vocab_size=V, special_ids=(pad, bos, eos))

``positions`` is always an (M, 2) long tensor of (row, column) in ``text``, in row-major order (the
order of ``bool_mask.nonzero()``), so ``text[pos[:, 0], pos[:, 1]]`` are the original tokens (the MLM
targets) and a model's ``mlm_logits`` rows line up with it.

Randomness is drawn on the ``generator``'s device (the tensors' device when none is given) and moved to
the tensors' device, so a seeded CPU generator reproduces the same masks on any device.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["mask_tokens", "select_words", "corrupt_tokens", "special_positions", "replacement_vocab"]


def special_positions(text: Tensor, special_ids: Sequence[int]) -> Tensor:
    """(B, T) bool, True where ``text`` holds one of ``special_ids`` (pad / bos / eos ...)."""
    ids = torch.as_tensor(list(special_ids), dtype=text.dtype, device=text.device)
    if ids.numel() == 0:
        return torch.zeros_like(text, dtype=torch.bool)
    return torch.isin(text, ids)


def replacement_vocab(vocab_size: int, special_ids: Sequence[int], mask_id: int) -> Tensor:
    """Token ids a "random token" replacement may draw from: ``[0, vocab_size)`` minus the special ids
    and ``mask_id`` (when it lies inside the vocabulary). (K,) long on the CPU; raises if empty."""
    keep = torch.ones(int(vocab_size), dtype=torch.bool)
    for i in list(special_ids) + [mask_id]:
        if 0 <= int(i) < vocab_size:
            keep[int(i)] = False
    ids = keep.nonzero().squeeze(1)
    if ids.numel() == 0:
        raise ValueError(f"no non-special token in a vocabulary of {vocab_size} to draw random replacements from")
    return ids


def _rand(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Uniform [0, 1) noise drawn on the generator's device, returned on ``like``'s device."""
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device).to(like.device)


def _check_ratio(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def corrupt_tokens(text: Tensor, positions: Tensor, *, mask_id: int, vocab_size: int,
                   special_ids: Sequence[int] = (), generator: torch.Generator | None = None,
                   replace_ratio: Sequence[float] = (0.8, 0.1, 0.1)) -> Tensor:
    """Apply BERT's corruption to the selected positions; returns a new (B, T) tensor (``text`` untouched).

    Each selected token independently becomes ``mask_id`` with probability ``replace_ratio[0]``, a
    random token drawn uniformly from ``replacement_vocab(vocab_size, special_ids, mask_id)`` with
    probability ``replace_ratio[1]``, and stays unchanged with probability ``replace_ratio[2]`` (a random
    replacement may coincide with the original token). text (B, T) long; positions (M, 2) long.
    """
    ratios = [float(r) for r in replace_ratio]
    if len(ratios) != 3 or min(ratios) < 0 or not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
        raise ValueError(f"replace_ratio must be 3 non-negative numbers summing to 1 "
                         f"(mask, random, keep), got {tuple(replace_ratio)}")
    out = text.clone()
    if positions.numel() == 0:
        return out
    B, T = text.shape
    rows, cols = positions[:, 0], positions[:, 1]
    # one draw per (B, T) cell (not per selected position) so that the corruption of a token does not
    # depend on how many tokens were selected before it
    u = _rand((B, T), text, generator)[rows, cols]                             # (M,)
    vocab = replacement_vocab(vocab_size, special_ids, mask_id)                # (K,)
    device = generator.device if generator is not None else text.device
    pick = torch.randint(vocab.numel(), (B, T), generator=generator, device=device).to(text.device)
    rand_tok = vocab.to(text.device)[pick[rows, cols]].to(text.dtype)           # (M,)
    orig = text[rows, cols]                                                     # (M,)
    new = torch.where(u < ratios[0], torch.full_like(orig, int(mask_id)),
                      torch.where(u < ratios[0] + ratios[1], rand_tok, orig))
    out[rows, cols] = new
    return out


def mask_tokens(text: Tensor, text_mask: Tensor, *, prob: float = 0.15, mask_id: int, vocab_size: int,
                special_ids: Sequence[int], generator: torch.Generator | None = None,
                replace_ratio: Sequence[float] = (0.8, 0.1, 0.1)) -> tuple[Tensor, Tensor]:
    """BERT-style random masking. text (B, T) long, text_mask (B, T) bool (True on real tokens).

    Every real token whose id is not in ``special_ids`` is selected independently with probability
    ``prob``; a row that has a maskable token but drew none gets one, chosen uniformly among its
    maskable tokens (only when ``prob > 0``: ``prob=0`` masks nothing). Pads and special tokens are
    never selected. The selected tokens are corrupted by ``corrupt_tokens`` (80% ``mask_id`` / 10%
    random non-special token / 10% unchanged by default).

    Returns ``(masked_text (B, T) long, positions (M, 2) long)`` with positions the selected
    (row, column) pairs in row-major order. Reproducible for a seeded ``generator``.
    """
    prob = _check_ratio("prob", prob)
    if text.shape != text_mask.shape:
        raise ValueError(f"text {tuple(text.shape)} and text_mask {tuple(text_mask.shape)} differ in shape")
    B, T = text.shape
    maskable = text_mask.bool() & ~special_positions(text, special_ids)        # (B, T)
    u = _rand((B, T), text, generator)                                         # (B, T)
    selected = (u < prob) & maskable
    if prob > 0 and B > 0 and T > 0:
        # rows with a maskable token but no selection: take the maskable token of lowest noise, which is
        # uniform among the row's maskable tokens (the noise is i.i.d.)
        need = maskable.any(1) & ~selected.any(1)                              # (B,)
        lowest = u.masked_fill(~maskable, 2.0).argmin(1)                       # (B,)
        forced = torch.zeros_like(selected)
        forced[torch.arange(B, device=text.device), lowest] = True
        selected = selected | (forced & need[:, None])
    positions = selected.nonzero()                                             # (M, 2), row-major
    masked = corrupt_tokens(text, positions, mask_id=mask_id, vocab_size=vocab_size, special_ids=special_ids,
                            generator=generator, replace_ratio=replace_ratio)
    return masked, positions


def select_words(scores: Tensor, text_mask: Tensor, special: Tensor, ratio: float) -> Tensor:
    """Pick the top-``ratio`` scoring maskable words of each row (SyncMask: attention-derived scores).

    scores (B, T) float; text_mask (B, T) bool, True on real tokens; special (B, T) bool, True where a
    token must never be masked (build it with ``special_positions(text, special_ids)``); ratio in [0, 1].

    A row with n maskable tokens (real and not special) gets ``floor(ratio * n + 0.5)`` of them, at least
    one when ``ratio > 0`` and n > 0, at most n. Ties go to the lower column first. Returns positions
    (M, 2) long, row-major order (columns ascending within a row).
    """
    ratio = _check_ratio("ratio", ratio)
    if not (scores.shape == text_mask.shape == special.shape):
        raise ValueError(f"scores {tuple(scores.shape)}, text_mask {tuple(text_mask.shape)} and special "
                         f"{tuple(special.shape)} must have the same (B, T) shape")
    B, T = scores.shape
    maskable = text_mask.bool() & ~special.bool()                              # (B, T)
    n = maskable.sum(1)                                                        # (B,)
    k = torch.floor(n.float() * ratio + 0.5).long()
    if ratio > 0:
        k = torch.maximum(k, (n > 0).long())
    k = torch.minimum(k, n)                                                    # (B,)
    # descending by score (stable: ties by column), then maskable tokens before the others (stable again,
    # so a genuine -inf score of a maskable word still ranks before every non-maskable position)
    order = torch.sort(scores.detach().float(), dim=1, descending=True, stable=True).indices     # (B, T)
    first = torch.sort(maskable.gather(1, order).to(torch.uint8), dim=1, descending=True, stable=True).indices
    order = order.gather(1, first)                                             # (B, T)
    take = torch.arange(T, device=scores.device)[None, :] < k[:, None]         # (B, T) in sorted order
    selected = torch.zeros_like(maskable).scatter(1, order, take)              # back to column order
    return selected.nonzero()                                                  # (M, 2)
