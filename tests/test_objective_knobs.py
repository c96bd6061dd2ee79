"""The objectives' config knobs and rarely-run branches, with values worked out by hand: option
validation at the edges (alpha = 1, momentum = 1, bool steps), ITC's gather list and shared logit
scale, the accuracy metrics of the local / queued / plain ITC paths, token CE's skipped chunks, the
EMA centre of agreement / semantic MIM (its momentum knob, its use on the next call, its reload into a
fresh objective), the teacher-temperature metric, the student temperature of semantic MIM, MLM's
label smoothing through the objective, ITM with no negatives, PTA's grounded knob and its metrics."""
import math

import pytest
import torch
import torch.nn.functional as F

from finealign.objectives import StepContext
from finealign.objectives.agreement import Agreement, usage_entropy
from finealign.objectives.base import EpochRamp
from finealign.objectives.itc import ITC, contrastive_loss
from finealign.objectives.itm import ImageTextMatching, itm_loss
from finealign.objectives.mixed_itc import MixedITC
from finealign.objectives.mlm import MaskedLanguageModeling
from finealign.objectives.pta import PTA, patch_labels
from finealign.objectives.semantic_mim import SemanticMIM
from finealign.objectives.tg_mim import MaskedImageModeling
from finealign.objectives.token_ce import token_cross_entropy
from finealign.types import Batch, Features, Region

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(B, S=16, text=None, captions=None, regions=None):
    extras = {} if regions is None else {"regions": regions}
    text = torch.ones(B, 3, dtype=torch.long) if text is None else text
    return Batch(images=torch.zeros(B, 3, S, S), text=text, text_mask=torch.ones_like(text, dtype=torch.bool),
                 image_ids=torch.arange(B), item_ids=torch.arange(B), captions=captions or [""] * B,
                 keys=[""] * B, extras=extras)


def _soft_ce(logits, y):
    return -(y * logits.log_softmax(1)).sum(1).mean()


# ------------------------------------------------------------------------------------- ramps, options

def test_ramp_and_option_edges():
    with pytest.raises(ValueError, match="number of steps"):
        EpochRamp(True, "k")                                  # a bool is not a number of steps
    with pytest.raises(ValueError, match=r"ramp must be a number of steps >= 0 \(0 = the first epoch\)"):
        MixedITC(ramp=True)
    ITC(distill_alpha=1.0)                                    # the closed ends are valid
    MixedITC(label_alpha=1.0)
    with pytest.raises(ValueError, match="center_momentum"):
        Agreement(center_momentum=1.0)                        # a centre that never moves is refused
    with pytest.raises(ValueError, match="student_temp"):
        SemanticMIM(student_temp=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        token_cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="patch_size"):
        MaskedImageModeling(patch_size=-1)


# ------------------------------------------------------------------------------------------------ ITC

def test_itc_gathers_the_teacher_only_when_distilling():
    assert ITC().gathers == ("image_embed", "text_embed")
    assert ITC(distill_alpha=0.4).gathers == ("image_embed", "text_embed", "teacher_image_embed",
                                              "teacher_text_embed")


def test_itc_alpha_one_is_pure_teacher_targets():
    g = torch.Generator().manual_seed(0)
    img, txt, ti, tt = (F.normalize(torch.randn(3, 4, generator=g), dim=-1) for _ in range(4))
    s = 4.0
    t = s * ti @ tt.t()
    logits = s * img @ txt.t()
    want = (_soft_ce(logits, t.softmax(1)) + _soft_ce(logits.t(), t.t().softmax(1))) / 2
    feats = Features(image_embed=img, text_embed=txt, logit_scale=torch.tensor(s),
                     extras={"teacher_image_embed": ti, "teacher_text_embed": tt})
    out = ITC(distill_alpha=1.0)(feats, None, StepContext())
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6) and out["alpha"].item() == 1.0


def test_itc_logit_scale_gets_its_gradient_in_the_first_micro_batch_only():
    g = torch.Generator().manual_seed(1)
    img, txt = (F.normalize(torch.randn(3, 4, generator=g), dim=-1) for _ in range(2))
    grads = []
    for ctx in (StepContext(), StepContext(micro_index=1)):
        scale = torch.tensor(3.0, requires_grad=True)
        ITC()(Features(image_embed=img, text_embed=txt, logit_scale=scale), None, ctx)["loss"].backward()
        grads.append(scale.grad.item())
    assert grads[0] != 0.0 and grads[1] == 0.0


def test_itc_accuracy_is_image_to_text_at_the_global_column():
    # logits [[1, .9], [0, .8]]: image->text argmax [0, 1] (acc 1); text->image would be [0, 0] (acc 1/2)
    img, txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.9, 0.8]])
    _, acc = contrastive_loss(img, txt, torch.tensor(1.0))
    assert acc.item() == 1.0
    # local rows 2:4 of an identity-aligned batch: every row finds its own column (global index, not 0, 1)
    e = torch.eye(4)
    out = ITC()(Features(image_embed=e, text_embed=e, logit_scale=torch.tensor(5.0)), None,
                StepContext(local_rows=(2, 2)))
    assert out["acc"].item() == 1.0
    # queued: images match the teacher's texts, texts do not match the teacher's images -> acc 1 (i2t)
    z = torch.zeros(1, 4)
    feats = Features(image_embed=e[:2], text_embed=e[2:], logit_scale=torch.tensor(5.0),
                     extras={"teacher_image_embed": e[[3, 2]], "teacher_text_embed": e[:2],
                             "queue_image_embed": z, "queue_text_embed": z})
    assert ITC(distill_alpha=0.5)(feats, None, StepContext())["acc"].item() == 1.0


# ------------------------------------------------------------------------------------------- token CE

def test_token_ce_rows_of_a_skipped_chunk_get_zero_gradient():
    """chunk_rows=2: chunk 0 (rows 0, 1) holds no label and is skipped; its gradient is exactly 0
    (not left as uninitialised memory); rows 2, 3 get softmax - onehot over 2 scored rows."""
    for V in (5, 64, 1000):
        junk = torch.full((4, V), 123.0)                      # recycled memory for torch.empty_like
        del junk
        x = torch.randn(4, V, generator=torch.Generator().manual_seed(V)).requires_grad_()
        y = torch.tensor([-100, -100, 1, 2])
        token_cross_entropy(x, y, chunk_rows=2).backward()
        assert torch.equal(x.grad[:2], torch.zeros(2, V))
        want = (x.detach()[2:].softmax(1) - F.one_hot(y[2:], V)) / 2
        assert torch.allclose(x.grad[2:], want, atol=1e-7)


# ----------------------------------------------------------------------------- agreement, semantic MIM

def _agree(s, t):
    return Features(extras={"agree_student": s, "agree_teacher": t})


def test_agreement_centre_momentum_knob_and_the_centre_on_the_next_call():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    obj = Agreement(center_momentum=0.5, teacher_temp=0.05, teacher_temp_final=0.05, student_temp=0.2)
    obj(_agree(s, t), None, StepContext())
    c = 0.5 * t.reshape(-1, 5).mean(0)
    assert torch.allclose(obj.center, c, atol=1e-7)
    loss = obj(_agree(s, t), None, StepContext())["loss"]      # the second call centres with c
    p = ((t - c) / 0.05).softmax(-1)
    ls = (s / 0.2).log_softmax(-1)
    want = (-(p[0] * ls[1]).sum(-1).mean() - (p[1] * ls[0]).sum(-1).mean()) / 2
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(obj.center, 0.5 * c + 0.5 * t.reshape(-1, 5).mean(0), atol=1e-7)


def test_agreement_logs_the_teacher_temperature_of_the_step():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 2, 3, generator=g), torch.randn(2, 2, 3, generator=g)
    obj = Agreement(teacher_temp=0.04, teacher_temp_final=0.08, teacher_temp_warmup=4)
    got = [obj(_agree(s, t), None, StepContext(step=k))["teacher_temp"].item() for k in (0, 1, 4, 9)]
    assert got == pytest.approx([0.04, 0.05, 0.08, 0.08])


def test_usage_entropy_is_zero_for_one_prototype_and_log_k_when_even():
    one_hot = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]])
    assert usage_entropy(one_hot).item() == 0.0                # 0 * log 0 counts as 0, not NaN
    spread = torch.eye(3)[None]                                # each sample one prototype, all used once
    assert usage_entropy(spread).item() == pytest.approx(math.log(3), rel=1e-6)


def test_centre_reloads_into_a_fresh_objective():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 2, 6, generator=g), torch.randn(2, 2, 6, generator=g)
    obj = Agreement()
    obj(_agree(s, t), None, StepContext())
    fresh = Agreement()
    fresh.load_state_dict(obj.state_dict())                    # the fresh centre is still unsized
    assert torch.equal(fresh.center, obj.center) and fresh.center.abs().sum() > 0


def test_semantic_mim_student_temperature_centre_and_usage():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    obj = SemanticMIM(student_temp=0.3, teacher_temp=0.05, teacher_temp_final=0.05, center_momentum=0.8)
    feats = Features(extras={"mim_pred": s, "mim_teacher_logits": t})
    out = obj(feats, None, StepContext())
    p = (t / 0.05).softmax(-1)
    assert out["loss"].item() == pytest.approx((-(p * (s / 0.3).log_softmax(-1)).sum(-1).mean()).item(), rel=1e-5)
    q = p.reshape(-1, 4).mean(0)
    assert out["usage_entropy"].item() == pytest.approx((-(q * q.log()).sum()).item(), rel=1e-5)
    c = 0.2 * t.reshape(-1, 4).mean(0)                         # the centre follows the teacher, not the student
    assert torch.allclose(obj.center, c, atol=1e-7)
    loss2 = obj(feats, None, StepContext())["loss"]
    p2 = ((t - c) / 0.05).softmax(-1)
    assert loss2.item() == pytest.approx((-(p2 * (s / 0.3).log_softmax(-1)).sum(-1).mean()).item(), rel=1e-5)


# ------------------------------------------------------------------------------------ mixed ITC extras

def test_mixed_itc_passes_the_pta_flag_through():
    e = torch.eye(2)
    feats = Features(image_embed=e, text_embed=e, logit_scale=torch.tensor(2.0),
                     extras={"mixed_image_embed": e, "mix_lambda": torch.ones(2), "mix_offset": torch.tensor([1, -1]),
                             "mix_by_pta": torch.tensor(1.0)})
    out = MixedITC(ramp=1)(feats, None, StepContext(step=1))
    assert out["by_pta"].item() == 1.0
    logits = 2.0 * e                                            # label_alpha 0.4, lambda 1: y = P
    P = 0.6 * e + 0.4 * logits.softmax(1)
    assert out["loss"].item() == pytest.approx(_soft_ce(logits, P).item(), rel=1e-6)


# ---------------------------------------------------------------------------------------- MLM, ITM, PTA

def test_mlm_objective_applies_its_label_smoothing_and_scores_accuracy():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    text = torch.tensor([[0, 2, 1]])
    positions = torch.tensor([[0, 0], [0, 2]])                 # targets 0 and 1: first right, second wrong
    eps = 0.3
    out = MaskedLanguageModeling(label_smoothing=eps)(
        Features(extras={"mlm_logits": logits, "mlm_positions": positions}), _batch(1, text=text), StepContext())
    terms = []
    for x, y in zip(logits, (0, 1)):
        lse = x.logsumexp(0)
        terms.append((1 - eps) * (lse - x[y]) + eps * (lse - x.mean()))
    assert out["loss"].item() == pytest.approx((sum(terms) / 2).item(), rel=1e-6)
    assert out["acc"].item() == 0.5


def test_itm_all_positive_rows_and_accuracy():
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    loss, acc = itm_loss(logits, 2)                            # no negatives: both labelled "match"
    want = (F.softplus(torch.tensor(-1.0)) + F.softplus(torch.tensor(2.0))) / 2
    assert loss.item() == pytest.approx(want.item(), rel=1e-6) and acc.item() == 0.5
    out = ImageTextMatching()(Features(extras={"itm_logits": torch.tensor([[0.0, 1.0], [0.0, 1.0], [3.0, 0.0], [3.0, 0.0]]),
                                               "itm_num_pos": 1}), None, StepContext())
    assert out["acc"].item() == pytest.approx(3 / 4)             # row 1 says match but is a negative


def test_pta_grounded_caption_knob_skips_none_and_overlaps_stay_one():
    box = Region(box=(0.0, 0.0, 8.0, 8.0), phrase="dog")
    logp = torch.full((1, 16, 2), math.log(0.5))
    out = PTA(grounded="caption")(Features(extras={"pta_logp": logp}),
                                  _batch(1, captions=["a cat"], regions=[[box]]), StepContext())
    assert out["loss"].item() == 0.0 and out["with_regions"].item() == 0.0   # "dog" is not in the caption
    labels, has = patch_labels([[None, box, Region(box=(4.0, 4.0, 12.0, 12.0), phrase="x")]], [""], 4, 16)
    assert has.tolist() == [True] and labels.max().item() == 1 and labels.sum().item() == 7
    # acc: patches 0, 1, 4, 5 positive; predict "positive" on patch 0 and 2 only
    logp = torch.log(torch.tensor([0.9, 0.1])).repeat(1, 16, 1)
    logp[0, [0, 2]] = torch.log(torch.tensor([0.1, 0.9]))
    out = PTA()(Features(extras={"pta_logp": logp}), _batch(1, regions=[[box]]), StepContext())
    assert out["acc"].item() == pytest.approx(12 / 16) and out["positive"].item() == 0.25
