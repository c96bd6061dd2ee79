import math

import pytest
import torch
import torch.nn.functional as F

from finealign.objectives import StepContext, build_objectives
from finealign.objectives.caption import caption_loss
from finealign.objectives.itc import contrastive_loss
from finealign.types import Batch, Features


def test_itc_equals_hand_computed():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    scale = torch.tensor(2.0)
    # logits = 2 * [[0.6, 0], [0.8, 1]]
    l = [[1.2, 0.0], [1.6, 2.0]]
    i2t = (-(1.2 - math.log(math.exp(1.2) + 1)) - (2.0 - math.log(math.exp(1.6) + math.exp(2.0)))) / 2
    t2i = (-(1.2 - math.log(math.exp(1.2) + math.exp(1.6))) - (2.0 - math.log(1 + math.exp(2.0)))) / 2
    loss, acc = contrastive_loss(img, txt, scale)
    assert loss.item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)
    assert acc.item() == 1.0
    assert torch.allclose(scale * img @ txt.t(), torch.tensor(l))   # the matrix the numbers were derived from


def test_caption_loss_shifts_and_ignores_pads():
    V = 5
    text = torch.tensor([[1, 3, 2, 0]])          # BOS=1, token 3, EOS=2, PAD=0
    mask = torch.tensor([[True, True, True, False]])
    logits = torch.randn(1, 4, V)
    # position 0 predicts 3, position 1 predicts EOS(2); position 2 would predict PAD -> ignored
    expected = (F.cross_entropy(logits[0, 0:1], torch.tensor([3])) +
                F.cross_entropy(logits[0, 1:2], torch.tensor([2]))) / 2
    assert caption_loss(logits, text, mask).item() == pytest.approx(expected.item(), abs=1e-6)
    # changing logits at the pad-predicting position does not change the loss
    logits2 = logits.clone()
    logits2[0, 2:] += 100
    assert caption_loss(logits2, text, mask).item() == pytest.approx(expected.item(), abs=1e-6)


def test_token_cross_entropy_by_hand():
    """Two rows over V=3, one ignored: loss = lse(x) - x[y]; gradient = softmax - onehot on the scored row."""
    from finealign.objectives.token_ce import token_cross_entropy
    x = torch.tensor([[[0.0, 1.0, 2.0], [5.0, 5.0, 5.0]]], requires_grad=True)
    y = torch.tensor([[1, -100]])
    lse = math.log(1 + math.e + math.e ** 2)
    loss = token_cross_entropy(x, y)
    assert loss.item() == pytest.approx(lse - 1.0, abs=1e-6)
    loss.backward()
    soft = [math.exp(v - lse) for v in (0.0, 1.0, 2.0)]
    assert x.grad[0, 0].tolist() == pytest.approx([soft[0], soft[1] - 1, soft[2]], abs=1e-6)
    assert x.grad[0, 1].tolist() == [0.0, 0.0, 0.0]
    # label smoothing eps: (1 - eps) * nll + eps * (lse - mean x)
    eps = 0.3
    y2 = torch.tensor([[2, -100]])                                      # nll lse - 2, mean of x is 1
    assert token_cross_entropy(x, y2, eps).item() == pytest.approx((1 - eps) * (lse - 2) + eps * (lse - 1), abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_token_cross_entropy_equals_torch_in_value_and_gradient(dtype, eps):
    from finealign.objectives.token_ce import token_cross_entropy
    torch.manual_seed(0)
    x = (torch.randn(4, 7, 50) * 3).to(dtype)
    y = torch.randint(0, 50, (4, 7))
    y[0, :3] = -100
    y[2, -1] = -100
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = token_cross_entropy(a, y, eps, chunk_rows=3)                  # several chunks, a ragged last one
    want = F.cross_entropy(b.float().reshape(-1, 50), y.reshape(-1), ignore_index=-100, label_smoothing=eps)
    (got * 2).backward()
    (want * 2).backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert a.grad.dtype == dtype
    assert torch.allclose(a.grad.float(), b.grad.float(), atol=1e-7 if dtype == torch.float32 else 0)
    xd = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)
    yd = torch.randint(0, 11, (3, 5))
    yd[1] = -100
    assert torch.autograd.gradcheck(lambda t: token_cross_entropy(t, yd, eps, chunk_rows=4), (xd,))
    assert torch.isnan(token_cross_entropy(x, torch.full((4, 7), -100)))   # nothing scored: NaN, as torch
    with pytest.raises(ValueError, match="disagree on the positions"):
        token_cross_entropy(x, y[:, :-1])


def _batch(B=4, T=6):
    text = torch.randint(3, 10, (B, T))
    text[:, 0] = 1
    return Batch(images=torch.zeros(B, 3, 8, 8), text=text, text_mask=torch.ones(B, T, dtype=torch.bool),
                 image_ids=torch.arange(B), item_ids=torch.arange(B), captions=[""] * B, keys=[""] * B)


def test_build_objectives_weights_and_errors():
    objs = build_objectives({"itc": {"weight": 1.0}, "ic": {"weight": 0.0}})
    assert list(objs) == ["itc"]
    with pytest.raises(ValueError, match="objectives.ic: bad options"):
        build_objectives({"ic": {"weight": 1.0, "smoothing": 0.1}})
    feats = Features(image_embed=F.normalize(torch.randn(4, 8), dim=-1),
                     text_embed=F.normalize(torch.randn(4, 8), dim=-1), logit_scale=torch.tensor(10.0))
    out = objs["itc"](feats, _batch(), StepContext())
    assert set(out) >= {"loss", "acc"}
    ic = build_objectives({"ic": {"weight": 2.0}})["ic"]
    assert ic.weight == 2.0
    with pytest.raises(ValueError, match="caption_logits.*decoder_layers"):
        ic(feats, _batch(), StepContext())


def test_itc_gather_sees_other_microbatches():
    """Accumulation: the loss over cached + local features equals the full-batch loss."""
    img = F.normalize(torch.randn(6, 8), dim=-1)
    txt = F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(5.0)
    full, _ = contrastive_loss(img, txt, scale)
    cache = {"image_embed": [img[:3], img[3:]], "text_embed": [txt[:3], txt[3:]]}

    def gather(name, local):
        parts = list(cache[name]); parts[1] = local
        return torch.cat(parts), 3
    itc = build_objectives({"itc": {}})["itc"]
    feats = Features(image_embed=img[3:], text_embed=txt[3:], logit_scale=scale)
    out = itc(feats, _batch(3), StepContext(gather_fn=gather))
    assert out["loss"].item() == pytest.approx(full.item(), abs=1e-6)


def test_momentum_distillation_targets_by_hand():
    from finealign.objectives.itc import distilled_contrastive_loss
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    scale = torch.tensor(2.0)
    plain, _ = contrastive_loss(img, txt, scale)
    same, _ = distilled_contrastive_loss(img, txt, scale, img, txt, alpha=0.0)
    assert same.item() == pytest.approx(plain.item(), abs=1e-6)
    # teacher = identity embeddings: teacher logits 2*I -> softmax rows [e^2, 1] / (e^2 + 1)
    t = torch.eye(2)
    p = math.exp(2) / (math.exp(2) + 1)
    y = [[0.4 * p + 0.6, 0.4 * (1 - p)], [0.4 * (1 - p), 0.4 * p + 0.6]]       # same both directions
    logits = [[1.2, 0.0], [1.6, 2.0]]                                          # 2 * img @ txt.T

    def ce(rows, targets):
        tot = 0.0
        for r, yr in zip(rows, targets):
            lse = math.log(sum(math.exp(v) for v in r))
            tot += -sum(yi * (v - lse) for yi, v in zip(yr, r))
        return tot / len(rows)
    cols = [[logits[0][0], logits[1][0]], [logits[0][1], logits[1][1]]]
    expected = (ce(logits, y) + ce(cols, y)) / 2
    got, _ = distilled_contrastive_loss(img, txt, scale, t, t, alpha=0.4)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="distill_alpha"):
        build_objectives({"itc": {"distill_alpha": 1.5}})
