"""Exact values of the objectives on tiny tensors, computed by hand in the test (plain torch ops or numbers
written out): the paths a mutation audit of finealign/objectives found unpinned by the other tests."""
import math

import pytest
import torch
import torch.nn.functional as F

from finealign.objectives import StepContext, build_objectives
from finealign.objectives.agreement import Agreement
from finealign.objectives.itc import ITC, contrastive_loss, distilled_contrastive_loss
from finealign.objectives.mixed_itc import MixedITC
from finealign.objectives.pta import PTA, patch_labels
from finealign.objectives.semantic_mim import SemanticMIM
from finealign.objectives.tg_mim import MaskedImageModeling
from finealign.types import Batch, Features, Region


def _unit(g, *shape):
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _soft_ce(logits, y):
    """mean over rows of -sum_j y[r, j] * log softmax(logits[r])[j]"""
    return -(y * (logits - logits.logsumexp(1, keepdim=True))).sum(1).mean()


def _batch(B, S=16, captions=None, regions=None):
    extras = {} if regions is None else {"regions": regions}
    return Batch(images=torch.zeros(B, 3, S, S), text=torch.ones(B, 3, dtype=torch.long),
                 text_mask=torch.ones(B, 3, dtype=torch.bool), image_ids=torch.arange(B), item_ids=torch.arange(B),
                 captions=captions or [""] * B, keys=[""] * B, extras=extras)


# ------------------------------------------------------------------------------------------------ ITC

def test_itc_local_rows_score_their_block_against_every_key():
    """train.local_loss: rows start:start+rows, images against all texts and texts against all images,
    with the labels at their global column; the mean over equal blocks is the full-batch loss."""
    g = torch.Generator().manual_seed(0)
    img, txt, s = _unit(g, 6, 4), _unit(g, 6, 4), 3.0
    feats = Features(image_embed=img, text_embed=txt, logit_scale=torch.tensor(s))
    itc = build_objectives({"itc": {}})["itc"]
    terms = []
    for r in (2, 3):
        li, lt = s * img[r] @ txt.t(), s * txt[r] @ img.t()
        terms.append(((li.logsumexp(0) - li[r]) + (lt.logsumexp(0) - lt[r])) / 2)
    got = itc(feats, None, StepContext(local_rows=(2, 2)))["loss"]
    assert got.item() == pytest.approx(sum(terms).item() / 2, rel=1e-6)
    blocks = [itc(feats, None, StepContext(local_rows=(b, 2)))["loss"] for b in (0, 2, 4)]
    full, _ = contrastive_loss(img, txt, torch.tensor(s))
    assert (sum(blocks) / 3).item() == pytest.approx(full.item(), rel=1e-6)
    assert abs(got.item() - full.item()) > 1e-3                     # the block is not the whole batch


def test_itc_distillation_with_an_asymmetric_teacher_by_hand():
    """y_t2i comes from the teacher's text->image softmax (the transpose), not a copy of y_i2t."""
    g = torch.Generator().manual_seed(1)
    img, txt, ti, tt = (_unit(g, 3, 4) for _ in range(4))
    s, a = 4.0, 0.4
    t = s * ti @ tt.t()
    assert not torch.allclose(t, t.t(), atol=1e-2)                  # the case that tells the directions apart
    eye = torch.eye(3)
    y_i2t = a * t.softmax(1) + (1 - a) * eye
    y_t2i = a * t.t().softmax(1) + (1 - a) * eye
    logits = s * img @ txt.t()
    want = (_soft_ce(logits, y_i2t) + _soft_ce(logits.t(), y_t2i)) / 2
    got, _ = distilled_contrastive_loss(img, txt, torch.tensor(s), ti, tt, a)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    ti_g, tt_g = ti.clone().requires_grad_(), tt.clone().requires_grad_()
    img_g = img.clone().requires_grad_()
    feats = Features(image_embed=img_g, text_embed=txt, logit_scale=torch.tensor(s),
                     extras={"teacher_image_embed": ti_g, "teacher_text_embed": tt_g})
    out = ITC(distill_alpha=a)(feats, None, StepContext())
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    out["loss"].backward()
    assert ti_g.grad is None and tt_g.grad is None                  # the teacher only supplies targets
    assert img_g.grad is not None and img_g.grad.abs().sum() > 0


def test_itc_uses_the_feature_queue_when_the_model_keeps_one():
    g = torch.Generator().manual_seed(2)
    img, txt, ti, tt = (_unit(g, 2, 4) for _ in range(4))
    qi, qt = _unit(g, 3, 4), _unit(g, 3, 4)
    s, a = 5.0, 0.5
    kt, ki = torch.cat([tt, qt]), torch.cat([ti, qi])             # (5, E): the batch's keys first
    hard = torch.tensor([[1.0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0]])
    y_i2t = a * (s * ti @ kt.t()).softmax(1) + (1 - a) * hard
    y_t2i = a * (s * tt @ ki.t()).softmax(1) + (1 - a) * hard
    want = (_soft_ce(s * img @ kt.t(), y_i2t) + _soft_ce(s * txt @ ki.t(), y_t2i)) / 2
    feats = Features(image_embed=img, text_embed=txt, logit_scale=torch.tensor(s),
                     extras={"teacher_image_embed": ti, "teacher_text_embed": tt,
                             "queue_image_embed": qi, "queue_text_embed": qt})
    out = ITC(distill_alpha=a)(feats, None, StepContext())
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    assert out["alpha"].item() == pytest.approx(a)


def test_shared_tensors_take_their_gradient_in_the_first_pass_only():
    for ctx, grad in ((StepContext(), 2.0), (StepContext(micro_index=1), 0.0),
                      (StepContext(owns_shared=False), 0.0)):
        t = torch.tensor(3.0, requires_grad=True)
        y = ctx.shared(t)
        assert y.item() == 3.0
        (2 * y).backward()
        assert t.grad.item() == grad


# ------------------------------------------------------------------------------------------------ IC

def test_caption_label_smoothing_reaches_the_loss():
    """ic's label_smoothing eps: per scored position (1 - eps) * (lse - x[y]) + eps * (lse - mean x)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 4, 5, generator=g)
    text = torch.tensor([[1, 3, 2, 0]])
    mask = torch.tensor([[True, True, True, False]])
    batch = Batch(images=torch.zeros(1, 3, 4, 4), text=text, text_mask=mask, image_ids=torch.arange(1),
                  item_ids=torch.arange(1), captions=[""], keys=[""])
    eps, terms = 0.2, []
    for pos, y in ((0, 3), (1, 2)):                                  # position 2 predicts a pad: not scored
        x = logits[0, pos]
        lse = x.logsumexp(0)
        terms.append((1 - eps) * (lse - x[y]) + eps * (lse - x.mean()))
    ic = build_objectives({"ic": {"label_smoothing": eps}})["ic"]
    got = ic(Features(caption_logits=logits), batch, StepContext())["loss"]
    assert got.item() == pytest.approx((sum(terms) / 2).item(), rel=1e-6)


# ------------------------------------------------------------------------------------------ mixed ITC

def test_mixed_itc_objective_reads_offsets_and_ramps_gamma():
    """Two micro-batches of 2, each flipped within itself: mix_offset [1, -1, 1, -1] -> src [1, 0, 3, 2]
    (not the global flip); gamma = step / ramp = 2 / 4 scales the loss, raw is the unscaled one."""
    g = torch.Generator().manual_seed(4)
    img, txt, mixed = _unit(g, 4, 4), _unit(g, 4, 4), _unit(g, 4, 4)
    lam = torch.tensor([0.9, 0.6, 0.7, 0.8])
    s, a = 3.0, 0.5
    feats = Features(image_embed=img, text_embed=txt, logit_scale=torch.tensor(s),
                     extras={"mixed_image_embed": mixed, "mix_lambda": lam,
                             "mix_offset": torch.tensor([1, -1, 1, -1])})
    src = [1, 0, 3, 2]
    sim = s * img @ txt.t()
    P = (1 - a) * torch.eye(4) + a * sim.softmax(1)
    Pt = (1 - a) * torch.eye(4) + a * sim.t().softmax(1)
    y_i2t = torch.stack([lam[r] * P[r] + (1 - lam[r]) * P[src[r]] for r in range(4)])
    raw = torch.stack([torch.stack([lam[r] * Pt[j, r] + (1 - lam[r]) * Pt[j, src[r]] for r in range(4)])
                       for j in range(4)])
    y_t2i = raw / raw.sum(1, keepdim=True)
    logits = s * mixed @ txt.t()
    want = (_soft_ce(logits, y_i2t) + _soft_ce(logits.t(), y_t2i)) / 2
    out = MixedITC(label_alpha=a, ramp=4)(feats, None, StepContext(step=2))
    assert out["raw"].item() == pytest.approx(want.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.5 * want.item(), rel=1e-5)
    assert out["gamma"].item() == 0.5 and out["lambda"].item() == pytest.approx(0.75)
    off = MixedITC()(Features(image_embed=img, text_embed=txt, logit_scale=torch.tensor(s)), None, StepContext())
    assert off["loss"].item() == 0.0 and off["gamma"].item() == 0.0       # mixing stopped: no loss


# ------------------------------------------------------------------------------------------------ PTA

def test_patch_labels_include_the_low_edge_and_exclude_the_high_edge():
    # 16 px, 4x4 grid, centres at 2, 6, 10, 14: box [2, 10) x [6, 14) holds columns 0, 1 and rows 1, 2
    labels, has = patch_labels([[Region(box=(2.0, 6.0, 10.0, 14.0), phrase="x")]], [""], grid=4, image_size=16)
    want = torch.zeros(4, 4, dtype=torch.long)
    want[1:3, 0:2] = 1
    assert torch.equal(labels.view(4, 4), want) and has.tolist() == [True]
    # grounded=caption matches the phrase regardless of case
    labels, has = patch_labels([[Region(box=(0.0, 0.0, 8.0, 8.0), phrase="Red Circle")]], ["A RED circle here"],
                               grid=4, image_size=16, grounded="caption")
    assert has.tolist() == [True] and labels.sum().item() == 4


def test_pta_loss_by_hand_over_the_samples_with_regions_only():
    g = torch.Generator().manual_seed(5)
    logp = torch.randn(2, 16, 2, generator=g).log_softmax(-1)
    regions = [[Region(box=(0.0, 0.0, 8.0, 8.0), phrase="a")], []]    # sample 0: patches 0, 1, 4, 5
    out = PTA()(Features(extras={"pta_logp": logp}), _batch(2, regions=regions), StepContext())
    pos = {0, 1, 4, 5}
    want = -sum(logp[0, n, 1 if n in pos else 0].item() for n in range(16)) / 16
    assert out["loss"].item() == pytest.approx(want, rel=1e-6)
    assert out["with_regions"].item() == 0.5 and out["positive"].item() == pytest.approx(4 / 16)


# ------------------------------------------------------------------------------ agreement, semantic MIM

def test_agreement_keeps_the_teacher_out_of_the_graph_and_the_centre_still_in_eval():
    g = torch.Generator().manual_seed(6)
    s = torch.randn(2, 3, 5, generator=g).requires_grad_()
    t = torch.randn(2, 3, 5, generator=g).requires_grad_()
    obj = Agreement()
    obj(Features(extras={"agree_student": s, "agree_teacher": t}), None, StepContext())["loss"].backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0
    obj = Agreement().eval()
    obj(Features(extras={"agree_student": s, "agree_teacher": t}), None, StepContext())
    assert torch.equal(obj.center, torch.zeros(5))                      # evaluation does not move the centre


def test_agreement_centre_moves_toward_the_mean_over_ranks():
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    other = torch.randn(5, generator=g)
    obj = Agreement(center_momentum=0.9)
    ctx = StepContext(reduce_mean=lambda m: (m + other) / 2)            # a second rank whose batch mean is `other`
    obj(Features(extras={"agree_student": s, "agree_teacher": t}), None, ctx)
    want = 0.1 * (t.reshape(-1, 5).mean(0) + other) / 2
    assert torch.allclose(obj.center, want, atol=1e-7)


def test_semantic_mim_mid_warmup_temperature_detached_teacher_and_eval_centre():
    """tau_t at step 2 of a 4-step warm-up 0.04 -> 0.08 is 0.06; loss = mean over patches of
    -sum softmax(t / 0.06) * log_softmax(s / 0.1) (centre 0 at the first call)."""
    g = torch.Generator().manual_seed(8)
    s = (0.3 * torch.randn(1, 3, 4, generator=g)).requires_grad_()
    t = (0.3 * torch.randn(1, 3, 4, generator=g)).requires_grad_()
    obj = SemanticMIM(student_temp=0.1, teacher_temp=0.04, teacher_temp_final=0.08, teacher_temp_warmup=4)
    feats = Features(extras={"mim_pred": s, "mim_teacher_logits": t})
    loss = obj(feats, None, StepContext(step=2))["loss"]
    p = (t.detach() / 0.06).softmax(-1)
    want = -(p * (s.detach() / 0.1).log_softmax(-1)).sum(-1).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    assert t.grad is None and s.grad is not None
    ev = SemanticMIM().eval()
    ev(feats, None, StepContext())
    assert torch.equal(ev.center, torch.zeros(4))


# ------------------------------------------------------------------------------------------- pixel MIM

def test_norm_pix_eps_sits_inside_the_square_root():
    """MAE: (x - mean) / sqrt(var + 1e-6). One 3x2x2 patch of pixels 1e-3 * k, k = 0..11: unbiased var =
    13e-6, so the target is (k - 5.5) * 1e-3 / sqrt(14e-6) and, with a zero prediction, the loss is
    mean (k - 5.5)^2 / 14 = (143 / 12) / 14 = 143 / 168."""
    images = (1e-3 * torch.arange(12, dtype=torch.float32)).reshape(1, 3, 2, 2)
    out = MaskedImageModeling(norm_pix=True)(Features(extras={"mim_pred": torch.zeros(1, 1, 12),
                                                              "mim_masked": torch.tensor([[0]])}),
                                             Batch(images=images, text=torch.ones(1, 2, dtype=torch.long),
                                                   text_mask=torch.ones(1, 2, dtype=torch.bool),
                                                   image_ids=torch.arange(1), item_ids=torch.arange(1),
                                                   captions=[""], keys=[""]), StepContext())
    assert out["loss"].item() == pytest.approx(143 / 168, rel=1e-4)
    assert not math.isclose(143 / 168, (143 / 12) * 1e-6 / (math.sqrt(13e-6) + 1e-6) ** 2, rel_tol=1e-2)
