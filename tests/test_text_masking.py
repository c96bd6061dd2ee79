import math

import pytest
import torch

from finealign.masking.text import (corrupt_tokens, mask_tokens, replacement_vocab, select_words,
                                    special_positions)

PAD, BOS, EOS, MASK, V = 0, 1, 2, 3, 50          # mask id inside the vocabulary here
SPECIAL = (PAD, BOS, EOS)


def _text(B=64, T=32, seed=0):
    """[BOS, words..., EOS, PAD...] rows with lengths 3..T, words in [4, V)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(4, V, (B, T), generator=g)
    lengths = torch.randint(3, T + 1, (B,), generator=g)
    cols = torch.arange(T)[None, :]
    mask = cols < lengths[:, None]
    text[:, 0] = BOS
    text[torch.arange(B), lengths - 1] = EOS
    text[~mask] = PAD
    return text, mask


def _mask(text, mask, seed=None, **kw):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    opts = dict(mask_id=MASK, vocab_size=V, special_ids=SPECIAL, generator=g)
    opts.update(kw)
    return mask_tokens(text, mask, **opts)


def test_selection_rate_matches_prob_and_never_special_or_pad():
    text, mask = _text(B=256, T=40)
    maskable = mask & ~special_positions(text, SPECIAL)
    n = int(maskable.sum())
    total = 0
    for s in range(5):
        _, pos = _mask(text, mask, seed=s, prob=0.15)
        sel = torch.zeros_like(mask)
        sel[pos[:, 0], pos[:, 1]] = True
        assert not (sel & ~maskable).any()                 # no pads, no bos/eos
        total += pos.shape[0]
    rate = total / (5 * n)
    # binomial std over 5n ~ 2.5e4 draws is ~0.0023; forced picks add at most B / n per draw
    assert abs(rate - 0.15) < 0.015, rate


def test_at_least_one_per_row_and_row_without_words():
    text = torch.tensor([[BOS, 7, EOS, PAD], [BOS, EOS, PAD, PAD], [BOS, 9, 10, EOS]])
    mask = text != PAD
    for s in range(20):
        _, pos = _mask(text, mask, seed=s, prob=0.01)
        rows = pos[:, 0].tolist()
        assert 0 in rows and 2 in rows and 1 not in rows
        assert pos.shape[0] == 2                            # exactly one forced pick per row at p=0.01
    _, pos = _mask(text, mask, seed=0, prob=0.0)            # prob 0 disables masking entirely
    assert pos.shape == (0, 2)


def test_forced_pick_is_uniform_over_maskable_tokens():
    text = torch.tensor([[BOS, 5, 6, 7, 8, EOS]])
    mask = torch.ones_like(text, dtype=torch.bool)
    counts = torch.zeros(6)
    for s in range(800):
        _, pos = _mask(text, mask, seed=s, prob=1e-6)
        counts[pos[:, 1]] += 1
    assert counts[0] == 0 and counts[5] == 0
    assert (counts[1:5] > 140).all(), counts                # ~200 each


def test_80_10_10_split():
    text, mask = _text(B=256, T=40, seed=1)
    n_mask = n_rand = n_keep = 0
    for s in range(5):
        masked, pos = _mask(text, mask, seed=s, prob=0.5)
        orig = text[pos[:, 0], pos[:, 1]]
        new = masked[pos[:, 0], pos[:, 1]]
        n_mask += int((new == MASK).sum())
        n_keep += int((new == orig).sum())
        changed = (new != orig) & (new != MASK)
        n_rand += int(changed.sum())
        # random tokens are never special nor the mask id
        assert not torch.isin(new[changed], torch.tensor([PAD, BOS, EOS, MASK])).any()
    total = n_mask + n_rand + n_keep
    assert abs(n_mask / total - 0.8) < 0.02
    # a random draw equals the original with prob 1/46, so "keep" gains ~0.1/46 and "random" loses it
    assert abs(n_rand / total - 0.1) < 0.015
    assert abs(n_keep / total - 0.1) < 0.015


def test_positions_consistent_with_changed_tokens():
    text, mask = _text(B=32, T=20, seed=2)
    masked, pos = _mask(text, mask, seed=3)
    sel = torch.zeros_like(mask)
    sel[pos[:, 0], pos[:, 1]] = True
    assert torch.equal(masked[~sel], text[~sel])            # nothing outside positions changes
    assert torch.equal(pos, sel.nonzero())                  # row-major, unique
    assert pos.dtype == torch.long
    assert (masked == MASK).sum() > 0 and ((masked == MASK) <= sel).all()
    assert text.ne(MASK).all()                              # input untouched


def test_seeded_reproducibility():
    text, mask = _text(seed=4)
    a = _mask(text, mask, seed=11)
    b = _mask(text, mask, seed=11)
    c = _mask(text, mask, seed=12)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_mask_id_outside_vocab_and_bad_options():
    text, mask = _text(B=8, T=10)
    masked, pos = _mask(text, mask, seed=0, mask_id=V, vocab_size=V)
    assert (masked == V).any()
    assert replacement_vocab(6, SPECIAL, 3).tolist() == [4, 5]
    with pytest.raises(ValueError, match="replace_ratio"):
        _mask(text, mask, seed=0, replace_ratio=(0.8, 0.1))
    with pytest.raises(ValueError, match="prob"):
        _mask(text, mask, seed=0, prob=1.5)
    with pytest.raises(ValueError, match="no non-special token"):
        replacement_vocab(3, SPECIAL, 5)


def test_corrupt_tokens_all_mask():
    text = torch.tensor([[BOS, 5, 6, EOS]])
    pos = torch.tensor([[0, 1], [0, 2]])
    out = corrupt_tokens(text, pos, mask_id=MASK, vocab_size=V, special_ids=SPECIAL, replace_ratio=(1, 0, 0))
    assert out.tolist() == [[BOS, MASK, MASK, EOS]]
    out = corrupt_tokens(text, pos[:0], mask_id=MASK, vocab_size=V, special_ids=SPECIAL)
    assert torch.equal(out, text)


def test_select_words_top_scores_ignores_pads_and_specials():
    text = torch.tensor([[BOS, 5, 6, 7, 8, EOS, PAD, PAD],
                         [BOS, 5, 6, EOS, PAD, PAD, PAD, PAD]])
    mask = text != PAD
    special = special_positions(text, SPECIAL)
    scores = torch.tensor([[9.0, 0.1, 0.5, 0.3, 0.4, 9.0, 9.0, 9.0],
                           [9.0, 0.2, 0.1, 9.0, 9.0, 9.0, 9.0, 9.0]])
    pos = select_words(scores, mask, special, ratio=0.5)    # row 0: 2 of 4 words; row 1: 1 of 2
    assert pos.tolist() == [[0, 2], [0, 4], [1, 1]]
    pos = select_words(scores, mask, special, ratio=0.01)   # at least one per row
    assert pos.tolist() == [[0, 2], [1, 1]]
    pos = select_words(scores, mask, special, ratio=1.0)    # every word, still no pad / special
    assert pos.tolist() == [[0, 1], [0, 2], [0, 3], [0, 4], [1, 1], [1, 2]]
    assert select_words(scores, mask, special, ratio=0.0).shape == (0, 2)


def test_select_words_ties_and_inf_scores():
    mask = torch.ones(1, 5, dtype=torch.bool)
    special = torch.tensor([[True, False, False, False, True]])
    scores = torch.tensor([[math.inf, -math.inf, -math.inf, -math.inf, math.inf]])
    assert select_words(scores, mask, special, ratio=0.5).tolist() == [[0, 1], [0, 2]]   # ties: low column
    empty = select_words(scores, torch.zeros_like(mask), special, ratio=0.5)
    assert empty.shape == (0, 2)
    with pytest.raises(ValueError, match="same"):
        select_words(scores, mask[:, :3], special, ratio=0.5)
