"""TiMix: window selection, λ, soft labels, mixed ITC, PTA labels and head, config checks."""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from finealign.config import ConfigError, load_config
from finealign.mixing import build_mixer, paste_windows, window_side, zscore
from finealign.mixing.cutmix import CutMixMixer
from finealign.mixing.mixup import MixupMixer
from finealign.mixing.timix import TiMixMixer, best_windows
from finealign.models.pta import PTAHead, pta_block_index
from finealign.objectives.itc import contrastive_loss
from finealign.objectives.mixed_itc import mixed_contrastive_loss, soft_targets
from finealign.objectives.pta import patch_labels
from finealign.types import Region

P = 4            # patch size
G = 8            # grid side


def _images(B: int) -> torch.Tensor:
    """Image b is the constant b + 1 (so every pixel tells where it came from)."""
    return torch.arange(1, B + 1, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 3, G * P, G * P).clone()


def test_timix_picks_lowest_target_and_highest_source_windows():
    B = 2
    scores = torch.zeros(B, G, G)
    scores[0, 5:8, 5:8] = -3.0          # image 0: least relevant window at (5, 5)
    scores[0, 0:3, 2:5] = 2.0           # ... and its most relevant at (0, 2)
    scores[1, 1:4, 4:7] = 5.0           # image 1: most relevant at (1, 4)
    scores[1, 4:7, 0:3] = -1.0          # ... and least relevant at (4, 0)
    mixer = TiMixMixer(P, side=(3 / G, 3 / G))
    mix = mixer(_images(B), scores.flatten(1), random.Random(0))
    assert mix.source.tolist() == [1, 0]
    assert mix.target_window.tolist() == [[5, 5, 3], [4, 0, 3]]
    assert mix.source_window.tolist() == [[1, 4, 3], [0, 2, 3]]   # the source's best window
    # image 0's window (rows 5..7, cols 5..7 in patches) now holds image 1's pixels (value 2)
    win = mix.images[0, :, 5 * P:8 * P, 5 * P:8 * P]
    assert torch.all(win == 2.0)
    assert torch.allclose(mix.lam, torch.full((B,), 1 - 9 / 64))


@pytest.mark.parametrize("mixer", [TiMixMixer(P), CutMixMixer(P)])
def test_lambda_is_the_share_of_the_target_that_remains(mixer):
    B = 5
    imgs = _images(B)
    for seed in range(6):
        scores = torch.randn(B, G * G, generator=torch.Generator().manual_seed(seed))
        mix = mixer(imgs, scores, random.Random(seed))
        for i in range(B):
            own = (mix.images[i] == imgs[i]).float().mean()
            assert own.item() == pytest.approx(mix.lam[i].item()) or mix.source[i] == i  # middle row: itself
        s = int(mix.target_window[0, 2])
        assert 3 <= s <= 6                        # ceil(0.35*8)=3 .. floor(0.75*8)=6


def test_cutmix_uses_the_same_window_in_target_and_source():
    mix = CutMixMixer(P)(_images(4), None, random.Random(3))
    assert torch.equal(mix.target_window, mix.source_window)
    assert len({tuple(w) for w in mix.target_window.tolist()}) == 1


def test_mixup_blends_with_the_reversed_batch():
    imgs = torch.randn(4, 3, G * P, G * P)
    mix = MixupMixer(P, alpha=1.0)(imgs, None, random.Random(1))
    lam = float(mix.lam[0])
    assert 0.0 < lam < 1.0
    assert torch.allclose(mix.images, lam * imgs + (1 - lam) * imgs.flip(0))


def test_mixup_draws_lambda_from_beta_alpha_alpha():
    """One λ per batch, drawn as Beta(alpha, alpha) from the given generator."""
    imgs = torch.randn(4, 3, G * P, G * P)
    for alpha in (0.2, 1.0, 4.0):
        mix = MixupMixer(P, alpha=alpha)(imgs, None, random.Random(7))
        assert mix.lam.tolist() == pytest.approx([random.Random(7).betavariate(alpha, alpha)] * 4, abs=1e-6)


def test_window_side_range_and_paste_rejects_unequal_sides():
    rnd = random.Random(0)
    sides = {window_side(8, (0.35, 0.75), rnd) for _ in range(200)}
    assert sides == {3, 4, 5, 6}
    with pytest.raises(ValueError, match="sides differ"):
        paste_windows(_images(2), torch.tensor([1, 0]), torch.tensor([[0, 0, 2]] * 2),
                      torch.tensor([[0, 0, 3]] * 2), P)


def test_best_windows_ties_take_the_first_in_raster_order():
    w = best_windows(torch.zeros(1, 4, 4), 2, lowest=True)
    assert w.tolist() == [[0, 0, 2]]


def test_zscore_per_image():
    z = zscore(torch.tensor([[1.0, 2.0, 3.0], [10.0, 10.0, 40.0]]))
    assert torch.allclose(z.mean(1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(z.std(1, unbiased=False), torch.ones(2), atol=1e-4)


# ------------------------------------------------------------------ soft labels and mixed ITC

def test_soft_labels_sum_to_one_per_row_in_both_directions():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    lam = torch.tensor([0.3, 0.3, 0.3, 0.8, 0.8, 0.8])            # two micro-batches, their own λ
    src = torch.tensor([2, 1, 0, 5, 4, 3])                         # each flipped within itself
    _, y_i2t, y_t2i = mixed_contrastive_loss(img, img, txt, torch.tensor(10.0), lam, src, label_alpha=0.7)
    assert torch.allclose(y_i2t.sum(1), torch.ones(6), atol=1e-6)
    assert torch.allclose(y_t2i.sum(1), torch.ones(6), atol=1e-6)
    assert (y_i2t >= 0).all() and (y_t2i >= 0).all()


def test_soft_targets_mix_rows_like_the_images():
    Pm = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    y = soft_targets(Pm, torch.full((3,), 0.25), torch.tensor([2, 1, 0]))
    assert torch.allclose(y[0], 0.25 * Pm[0] + 0.75 * Pm[2])
    assert torch.allclose(y, 0.25 * Pm + 0.75 * Pm.flip(0))     # = λ·P + (1-λ)·P.flip(0)


def test_mixed_itc_equals_standard_itc_when_lambda_is_one():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(5, 16, generator=g), dim=-1)
    txt = F.normalize(torch.randn(5, 16, generator=g), dim=-1)
    scale = torch.tensor(14.0)
    mixed_loss, _, _ = mixed_contrastive_loss(img, img, txt, scale, torch.ones(5), torch.arange(4, -1, -1),
                                              label_alpha=0.0)
    ref, _ = contrastive_loss(img, txt, scale)
    assert mixed_loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_mixed_itc_by_hand_for_two_pairs():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mixed = F.normalize(torch.tensor([[1.0, 1.0], [1.0, 0.0]]), dim=-1)
    lam, src, s = torch.tensor([0.75, 0.75]), torch.tensor([1, 0]), torch.tensor(2.0)
    loss, y_i2t, _ = mixed_contrastive_loss(mixed, img, txt, s, lam, src, label_alpha=0.0)
    y = torch.tensor([[0.75, 0.25], [0.25, 0.75]])
    assert torch.allclose(y_i2t, y)
    logits = s * mixed @ txt.t()
    ref = (-(y * logits.log_softmax(1)).sum(1).mean() - (y * logits.t().log_softmax(1)).sum(1).mean()) / 2
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_mixed_itc_soft_labels_by_hand_in_both_directions():
    """label_alpha 0.5, an asymmetric similarity, a λ per image and a 3-cycle source (src is not its own
    inverse): y_i2t[r] = λ_r P[r] + (1 - λ_r) P[src r] with P from the image->text softmax, and text j's
    target over mixed image r ∝ λ_r Pt[j, r] + (1 - λ_r) Pt[j, src r] with Pt from the text->image softmax."""
    g = torch.Generator().manual_seed(4)
    img = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    txt = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    mixed = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    lam, src, scale, a = torch.tensor([0.9, 0.6, 0.3]), torch.tensor([1, 2, 0]), torch.tensor(3.0), 0.5
    loss, y_i2t, y_t2i = mixed_contrastive_loss(mixed, img, txt, scale, lam, src, label_alpha=a)
    sim = [[3.0 * float(img[i] @ txt[j]) for j in range(3)] for i in range(3)]

    def softmax(xs):
        e = [math.exp(x) for x in xs]
        return [x / sum(e) for x in e]

    P = [[(1 - a) * (i == j) + a * p for j, p in enumerate(softmax(sim[i]))] for i in range(3)]
    Pt = [[(1 - a) * (j == r) + a * p for r, p in enumerate(softmax([sim[r][j] for r in range(3)]))]
          for j in range(3)]
    lam_, src_ = lam.tolist(), src.tolist()
    want_i2t = [[lam_[r] * P[r][j] + (1 - lam_[r]) * P[src_[r]][j] for j in range(3)] for r in range(3)]
    raw_t2i = [[lam_[r] * Pt[j][r] + (1 - lam_[r]) * Pt[j][src_[r]] for r in range(3)] for j in range(3)]
    want_t2i = [[x / sum(row) for x in row] for row in raw_t2i]
    assert torch.allclose(y_i2t, torch.tensor(want_i2t), atol=1e-6)
    assert torch.allclose(y_t2i, torch.tensor(want_t2i), atol=1e-6)
    logits = [[3.0 * float(mixed[r] @ txt[j]) for j in range(3)] for r in range(3)]
    i2t = -sum(want_i2t[r][j] * math.log(softmax(logits[r])[j]) for r in range(3) for j in range(3)) / 3
    t2i = -sum(want_t2i[j][r] * math.log(softmax([logits[q][j] for q in range(3)])[r])
               for j in range(3) for r in range(3)) / 3
    assert loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-5)


def test_mixed_itc_weight_ramps_linearly_over_its_steps(caplog):
    """γ = step / ramp up to 1; ramp 0 takes the epoch's length; with neither known γ is 1 (said once)."""
    from finealign.objectives.base import StepContext
    from finealign.objectives.mixed_itc import MixedITC
    obj = MixedITC(ramp=4)
    assert [obj.gamma(StepContext(step=s)) for s in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert MixedITC().gamma(StepContext(step=3, steps_per_epoch=12)) == 0.25
    unknown = MixedITC()
    with caplog.at_level("WARNING"):
        assert [unknown.gamma(StepContext(step=s)) for s in (0, 1)] == [1.0, 1.0]
    assert sum("objectives.mixed_itc.ramp: a ramp over one epoch, but this run's epoch length is unknown"
               in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(ValueError, match="ramp must be a number of steps"):
        MixedITC(ramp=-2)


def test_no_gradient_flows_into_the_label_distribution():
    g = torch.Generator().manual_seed(2)
    img = F.normalize(torch.randn(4, 8, generator=g), dim=-1).requires_grad_()
    mixed = F.normalize(torch.randn(4, 8, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(4, 8, generator=g), dim=-1).requires_grad_()
    loss, _, _ = mixed_contrastive_loss(mixed, img, txt, torch.tensor(10.0), torch.full((4,), 0.6),
                                        torch.arange(3, -1, -1), label_alpha=1.0)
    loss.backward()
    assert img.grad is None                      # the unmixed images only shape P (detached)
    assert mixed.grad is not None and mixed.grad.abs().sum() > 0
    assert txt.grad is not None and txt.grad.abs().sum() > 0


# ------------------------------------------------------------------ PTA

def test_patch_labels_follow_the_box_definition():
    # 32x32 input, 8x8 grid of 4-px patches; box covers pixels [4, 12) x [8, 20): patch centres at
    # 2, 6, 10, 14, ...: columns with centre in [4, 12) -> 1, 2; rows with centre in [8, 20) -> 2, 3, 4
    regions = [[Region(box=(4.0, 8.0, 12.0, 20.0), phrase="red circle")], []]
    labels, has = patch_labels(regions, ["a red circle", "nothing"], grid=8, image_size=32)
    grid = labels.view(2, 8, 8)
    expected = torch.zeros(8, 8, dtype=torch.long)
    expected[2:5, 1:3] = 1
    assert torch.equal(grid[0], expected)
    assert has.tolist() == [True, False] and grid[1].sum() == 0
    # grounded=caption keeps only regions whose phrase the caption mentions
    labels, has = patch_labels(regions, ["a blue square", "x"], grid=8, image_size=32, grounded="caption")
    assert labels.sum() == 0 and not has.any()


def test_pta_objective_without_regions_is_zero_and_says_so_once(caplog):
    from finealign.objectives.base import StepContext
    from finealign.objectives.pta import PTA
    from finealign.types import Batch, Features
    logp = torch.randn(2, 16, 2, requires_grad=True).log_softmax(-1)
    batch = Batch(images=torch.zeros(2, 3, 16, 16), text=torch.ones(2, 3, dtype=torch.long),
                  text_mask=torch.ones(2, 3, dtype=torch.bool), image_ids=torch.arange(2), item_ids=torch.arange(2),
                  captions=["a", "b"], keys=["a", "b"])
    obj = PTA()
    with caplog.at_level("WARNING", logger="finealign.objectives.pta"):
        outs = [obj(Features(extras={"pta_logp": logp}), batch, StepContext()) for _ in range(2)]
    assert all(o["loss"].item() == 0.0 and o["with_regions"].item() == 0.0 for o in outs)
    assert caplog.text.count("without region boxes") == 1


def test_pta_head_outputs_log_probabilities_and_uses_the_text():
    torch.manual_seed(0)
    head = PTAHead(16, 12, 8)
    patches, text = torch.randn(2, 9, 16), torch.randn(2, 12)
    out = head(patches, text)
    assert out.shape == (2, 9, 2)
    assert torch.allclose(out.exp().sum(-1), torch.ones(2, 9), atol=1e-6)
    assert not torch.allclose(out, head(patches, torch.randn(2, 12)))


def test_pta_block_index_defaults_to_the_middle_block():
    assert pta_block_index(3, 0) == 1 and pta_block_index(12, 0) == 5 and pta_block_index(12, 12) == 11


# ------------------------------------------------------------------ config

def test_config_checks_for_mixing():
    with pytest.raises(ConfigError, match="objectives.mixed_itc"):
        load_config("clip", ["mixer=timix"])
    with pytest.raises(ConfigError, match="mixer.type"):
        load_config("clip", ["objectives.mixed_itc.weight=1"])
    with pytest.raises(ConfigError, match="model.pta=true"):
        load_config("clip", ["objectives.pta.weight=1"])
    with pytest.raises(ConfigError, match="did you mean 'timix'"):
        load_config("clip", ["mixer.type=timx", "objectives.mixed_itc.weight=1"])
    # TiMix would read its windows off a PTA head that no objective trains (a random network)
    with pytest.raises(ConfigError, match="no objective trains it: add objectives.pta"):
        load_config("clip", ["mixer=timix", "objectives.mixed_itc.weight=1", "model.pta=true"])
    with pytest.raises(ConfigError, match="no objective trains it"):
        load_config("timix", ["objectives.pta.weight=0"])
    assert load_config("timix", ["objectives.pta.weight=0", "mixer.scores=relevance"]).mixer.scores == "relevance"
    cfg = load_config("timix")
    assert cfg.mixer.type == "timix" and cfg.model.pta and build_mixer(cfg.mixer, 4).needs_scores
