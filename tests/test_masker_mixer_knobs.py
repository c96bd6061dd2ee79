"""Config knobs and rarely taken branches of the maskers and mixers (second mutation audit).

Pins, against docs/METHODS.md and the docstrings: the defaults of every masker / mixer knob (SyCoCa
ratio 0.5 and ``mask="most"``, relevance ``max``, SyncMask 15% words / 25% patches / last layer, MLM
p=0.15 with 80/10/10, window side [0.35 g, 0.75 g], Mixup alpha 1), cosine (not dot) relevance on the
text side, the validation bounds of the ratios, one corruption draw per text cell (so a token's fate
does not depend on which other tokens were selected), the forced word of a row that drew none, the
at-least-one rule of ``select_words``, ``build_mixer`` passing ``side`` / ``alpha`` through, the z-score's
population std and its eps on constant rows, and the mixers' shape checks."""
from __future__ import annotations

import inspect
import random

import pytest
import torch

from finealign.config import MixerConfig
from finealign.masking import AttentiveMasker, RandomMasker, build_masker, patch_text_relevance
from finealign.masking.sync import SynchronizedMasker
from finealign.masking.text import corrupt_tokens, mask_tokens, select_words
from finealign.mixing import Mixer, build_mixer, window_side, zscore
from finealign.mixing.cutmix import CutMixMixer
from finealign.mixing.mixup import MixupMixer
from finealign.mixing.timix import TiMixMixer, best_windows, window_sums

pytestmark = pytest.mark.usefixtures("one_thread")

PAD, BOS, EOS, MASK, V = 0, 1, 2, 3, 40
SPECIAL = (PAD, BOS, EOS)
P, G = 4, 8


# ------------------------------------------------------------------------------ defaults (METHODS.md)

def test_patch_masker_defaults_match_the_spec():
    """SyCoCa's defaults: ratio 0.5, TG-MIM masks the *most* relevant patches (10 of 20 here)."""
    rel = torch.arange(20, dtype=torch.float32)[None]
    idx = AttentiveMasker()(rel)
    assert idx.masked.tolist() == [list(range(10, 20))]
    assert build_masker({"type": "attentive"})(rel).masked.tolist() == [list(range(10, 20))]
    r = RandomMasker()(rel, generator=torch.Generator().manual_seed(0))
    assert r.masked.shape == (1, 10) and r.keep.shape == (1, 10)


def test_relevance_defaults_to_the_max_over_tokens():
    """r_i = max_j cos(v_i, t_j) unless told otherwise (mean is the knob)."""
    patches = torch.tensor([[[1.0, 0.0]]])
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert patch_text_relevance(patches, tokens).tolist() == [[1.0]]
    assert patch_text_relevance(patches, tokens, reduce="mean").tolist() == [[0.5]]


def test_relevance_is_a_cosine_on_the_text_side_too():
    """A long token vector must not win by its norm: cos(v, 10·e2 + e1) < cos(v, e1) = 1."""
    patches = torch.tensor([[[1.0, 0.0]]])
    tokens = torch.tensor([[[3.0, 0.0], [1.0, 10.0]]])
    rel = patch_text_relevance(patches, tokens, reduce="max")
    assert rel[0].tolist() == pytest.approx([1.0])
    mean = patch_text_relevance(patches, tokens, reduce="mean")
    assert mean[0].tolist() == pytest.approx([(1.0 + 1.0 / 101 ** 0.5) / 2])


def test_sync_masker_defaults_are_15_percent_words_25_percent_patches_last_layer():
    m = SynchronizedMasker()
    assert (m.words, m.patches, m.layer) == (0.15, 0.25, -1)
    # 20 maskable words -> 3; 16 patches -> 4
    T, N = 22, 16
    attn = torch.zeros(1, T, N)
    for j in range(1, 21):
        attn[0, j, j % N] = j / 100.0                   # word j looks at patch j % 16 only
    mask = torch.ones(1, T, dtype=torch.bool)
    special = torch.zeros(1, T, dtype=torch.bool)
    special[0, 0] = special[0, -1] = True
    pos, idx = m(attn, mask, special)
    assert pos[:, 1].tolist() == [18, 19, 20]           # the three strongest words
    # patches they look at: 2, 3, 4 (18, 19, 20 mod 16); the 4th by ties -> lowest index 0
    assert idx.masked.tolist() == [[0, 2, 3, 4]]


def test_sync_masker_rejects_ratios_of_one():
    for kw in ({"words": 1.0}, {"patches": 1.0}, {"words": -0.1}):
        with pytest.raises(ValueError, match="ratios"):
            SynchronizedMasker(**kw)
    SynchronizedMasker(words=0.0, patches=0.0)


def test_mask_tokens_defaults_are_p015_and_80_10_10():
    """Many rows of 20 maskable words: selection rate ~0.15 and an ~80/10/10 corruption split."""
    B, T = 400, 22
    g = torch.Generator().manual_seed(0)
    text = torch.randint(4, V, (B, T), generator=g)
    text[:, 0], text[:, -1] = BOS, EOS
    mask = torch.ones(B, T, dtype=torch.bool)
    masked, pos = mask_tokens(text, mask, mask_id=MASK, vocab_size=V, special_ids=SPECIAL,
                              generator=torch.Generator().manual_seed(1))
    rate = pos.shape[0] / (B * 20)
    assert 0.14 < rate < 0.165                            # forced picks add ~0.04 / 20 per row
    new, orig = masked[pos[:, 0], pos[:, 1]], text[pos[:, 0], pos[:, 1]]
    n = pos.shape[0]
    f_mask = float((new == MASK).float().sum()) / n
    f_keep = float((new == orig).float().sum()) / n
    assert abs(f_mask - 0.8) < 0.03 and abs(f_keep - 0.1) < 0.025 and abs(1 - f_mask - f_keep - 0.1) < 0.025


def test_corrupt_tokens_default_ratio_is_80_10_10():
    T = 2000
    text = torch.full((1, T), 10)
    pos = torch.stack([torch.zeros(T, dtype=torch.long), torch.arange(T)], 1)
    out = corrupt_tokens(text, pos, mask_id=MASK, vocab_size=V, special_ids=SPECIAL,
                         generator=torch.Generator().manual_seed(0))[0]
    f_mask = float((out == MASK).float().mean())
    f_keep = float((out == 10).float().mean())
    assert abs(f_mask - 0.8) < 0.03 and 0.07 < f_keep < 0.13     # keep 0.1 (+0.1/36 random hits)


def test_mixer_side_and_alpha_defaults():
    """Window side U{ceil(0.35 g) .. floor(0.75 g)}; Mixup alpha 1 (λ uniform on [0, 1])."""
    imgs = torch.zeros(2, 3, 20 * P, 20 * P)                    # g = 20: sides 7..15
    for cls in (CutMixMixer, TiMixMixer):
        mixer = cls(P)
        sides = set()
        for seed in range(300):
            scores = torch.zeros(2, 400) if cls is TiMixMixer else None
            sides.add(int(mixer(imgs, scores, random.Random(seed)).target_window[0, 2]))
        assert sides == set(range(7, 16)), cls
    assert MixupMixer(P).alpha == 1.0
    lam = [float(MixupMixer(P)(imgs, None, random.Random(s)).lam[0]) for s in range(400)]
    assert sum(x < 0.25 for x in lam) > 60 and sum(x > 0.75 for x in lam) > 60   # uniform: ~100 each
    with pytest.raises(ValueError, match="alpha"):
        MixupMixer(P, alpha=0.0)


def test_config_defaults_match_the_spec():
    cfg = MixerConfig()
    assert list(cfg.side) == [0.35, 0.75] and cfg.alpha == 1.0
    assert inspect.signature(mask_tokens).parameters["prob"].default == 0.15


# ------------------------------------------------------------------------------ corruption draws

def test_corruption_of_a_token_does_not_depend_on_the_other_selected_tokens():
    """One draw per (row, column) cell: corrupting a subset of positions with the same seed gives the
    same result at the shared positions as corrupting all of them."""
    g = torch.Generator().manual_seed(5)
    text = torch.randint(4, V, (6, 12), generator=g)
    allpos = torch.ones(6, 12, dtype=torch.bool).nonzero()
    keep = torch.zeros(6, 12, dtype=torch.bool)
    keep[::2, 1::3] = True
    keep[1::2, ::2] = True
    sub = keep.nonzero()
    kw = dict(mask_id=MASK, vocab_size=V, special_ids=SPECIAL, replace_ratio=(0.3, 0.5, 0.2))
    full = corrupt_tokens(text, allpos, generator=torch.Generator().manual_seed(9), **kw)
    part = corrupt_tokens(text, sub, generator=torch.Generator().manual_seed(9), **kw)
    assert torch.equal(part[keep], full[keep])
    assert torch.equal(part[~keep], text[~keep])
    assert (full != text).sum() > 30                       # the draws do corrupt (mask and random)


def test_replacement_never_draws_the_mask_id_or_special_tokens():
    T = 600
    text = torch.full((1, T), 10)
    pos = torch.stack([torch.zeros(T, dtype=torch.long), torch.arange(T)], 1)
    out = corrupt_tokens(text, pos, mask_id=MASK, vocab_size=6, special_ids=SPECIAL,
                         generator=torch.Generator().manual_seed(0), replace_ratio=(0, 1, 0))
    assert set(out[0].tolist()) == {4, 5}


# ------------------------------------------------------------------------------ word selection rules

def test_forced_word_is_never_special_even_when_a_special_has_the_lowest_noise():
    """prob tiny: every row is forced to one word, always a maskable one, never a pad or special."""
    text = torch.tensor([[BOS, 5, 6, EOS, PAD, PAD]] * 300)
    mask = text != PAD
    _, pos = mask_tokens(text, mask, prob=1e-9, mask_id=MASK, vocab_size=V, special_ids=SPECIAL,
                         generator=torch.Generator().manual_seed(0))
    assert pos[:, 0].tolist() == list(range(300))
    assert set(pos[:, 1].tolist()) == {1, 2}


def test_prob_zero_masks_nothing_and_rows_without_words_get_none():
    text = torch.tensor([[BOS, 5, 6, EOS], [BOS, EOS, PAD, PAD]])
    mask = text != PAD
    kw = dict(mask_id=MASK, vocab_size=V, special_ids=SPECIAL, generator=torch.Generator().manual_seed(0))
    out, pos = mask_tokens(text, mask, prob=0.0, **kw)
    assert pos.shape == (0, 2) and torch.equal(out, text)
    _, pos = mask_tokens(text, mask, prob=1e-9, **kw)
    assert pos[:, 0].tolist() == [0]


def test_special_ids_are_never_selected_even_at_prob_one():
    text = torch.tensor([[BOS, 5, EOS, 7, BOS]])
    _, pos = mask_tokens(text, torch.ones_like(text, dtype=torch.bool), prob=1.0, mask_id=MASK, vocab_size=V,
                         special_ids=SPECIAL, generator=torch.Generator().manual_seed(0))
    assert pos.tolist() == [[0, 1], [0, 3]]


def test_select_words_takes_at_least_one_word_and_never_a_pad():
    """2 maskable words at 0.15 -> floor(0.3 + 0.5) = 0, raised to 1; a pad with the top score and no
    special flag is still not a word."""
    scores = torch.tensor([[0.1, 0.5, 0.9, 0.3]])
    mask = torch.tensor([[True, True, False, True]])
    special = torch.tensor([[True, False, False, False]])
    assert select_words(scores, mask, special, 0.15).tolist() == [[0, 1]]
    assert select_words(scores, mask, special, 0.0).shape == (0, 2)


# ------------------------------------------------------------------------------ mixers

def test_build_mixer_passes_side_and_alpha_through():
    imgs = torch.zeros(2, 3, G * P, G * P)
    cut = build_mixer(MixerConfig(type="cutmix", side=[0.25, 0.25]), P)
    assert isinstance(cut, CutMixMixer) and cut.side == (0.25, 0.25)
    assert int(cut(imgs, None, random.Random(0)).target_window[0, 2]) == 2
    tim = build_mixer(MixerConfig(type="timix", side=[0.5, 0.5]), P)
    assert int(tim(imgs, torch.zeros(2, G * G), random.Random(0)).target_window[0, 2]) == 4
    mix = build_mixer(MixerConfig(type="mixup", alpha=0.3), P)
    assert mix.alpha == pytest.approx(0.3)
    assert float(mix(imgs, None, random.Random(4)).lam[0]) == pytest.approx(random.Random(4).betavariate(0.3, 0.3))
    assert build_mixer(MixerConfig(type=""), P) is None and build_mixer(None, P) is None


def test_window_side_never_exceeds_the_grid():
    rnd = random.Random(0)
    assert {window_side(4, (0.5, 1.5), rnd) for _ in range(100)} == {2, 3, 4}


def test_zscore_uses_the_population_std_and_survives_constant_rows():
    z = zscore(torch.tensor([[0.0, 2.0], [5.0, 5.0]]))
    assert z[0].tolist() == pytest.approx([-1.0, 1.0], abs=1e-5)      # std (pop.) = 1, not sqrt(2)
    assert z[1].tolist() == [0.0, 0.0]                                # finite, not nan


def test_window_sums_are_sums_and_windows_count_every_patch():
    """window_sums gives the plain sum of each s x s window; a 2x2 window of 4 small positives beats
    one large patch (sums, not maxima)."""
    grid = torch.arange(9, dtype=torch.float32).view(1, 3, 3)
    assert window_sums(grid, 2).tolist() == [[[8.0, 12.0], [20.0, 24.0]]]
    s = torch.zeros(1, 4, 4)
    s[0, 0, 0] = 3.0                                  # windows containing (0, 0) sum to 3
    s[0, 2:4, 2:4] = 1.0                              # window (2, 2) sums to 4
    assert best_windows(s, 2, lowest=False).tolist() == [[2, 2, 2]]


def test_mixers_check_the_grid_and_the_score_shape():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        Mixer(P).grid(torch.zeros(1, 3, 30, 30))
    with pytest.raises(ValueError, match="square"):
        Mixer(P).grid(torch.zeros(1, 3, 32, 16))
    imgs = torch.zeros(2, 3, G * P, G * P)
    with pytest.raises(ValueError, match="patch scores"):
        TiMixMixer(P)(imgs, torch.zeros(1, 2 * G * G), random.Random(0))
    with pytest.raises(ValueError, match="needs patch scores"):
        TiMixMixer(P)(imgs, None, random.Random(0))


# ------------------------------------------------------------------------------ option validation

def test_masker_options_are_validated():
    with pytest.raises(ValueError, match="unknown option"):
        build_masker({"type": "attentive", "ratio": 0.5})
    with pytest.raises(ValueError, match="mask must be"):
        RandomMasker(0.5, mask="middle")
    RandomMasker(0.5, mask="least")                       # accepted (ablations swap the type only)
    with pytest.raises(ValueError, match="replace_ratio"):
        corrupt_tokens(torch.tensor([[5]]), torch.tensor([[0, 0]]), mask_id=MASK, vocab_size=V,
                       replace_ratio=(1.2, -0.1, -0.1))
    with pytest.raises(ValueError, match="patch_size"):
        CutMixMixer(0)


def test_select_words_ties_go_to_the_lower_column_in_long_rows():
    """40 equal scores (beyond the 16 where an unstable sort reorders): 0.25 -> the first 10 columns."""
    T = 40
    pos = select_words(torch.zeros(2, T), torch.ones(2, T, dtype=torch.bool), torch.zeros(2, T, dtype=torch.bool),
                       0.25)
    assert pos.tolist() == [[r, c] for r in range(2) for c in range(10)]


def test_sync_word_score_is_the_mass_on_exactly_m_patches():
    """M = 2 of 8 patches: w1 puts .8 on its top 2, w2 .7 on its top 2 (but 1.0 on its top 3), so w1
    is the most grounded word and its two patches are masked."""
    attn = torch.zeros(1, 4, 8)
    attn[0, 1, :2] = 0.4                                          # w1
    attn[0, 2] = torch.tensor([0, 0, 0, 0, .35, .35, .3, 0])       # w2
    special = torch.tensor([[True, False, False, True]])
    pos, idx = SynchronizedMasker(words=0.5, patches=0.25)(attn, torch.ones(1, 4, dtype=torch.bool), special)
    assert pos.tolist() == [[0, 1]]
    assert idx.masked.tolist() == [[0, 1]]
