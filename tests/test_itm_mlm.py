import math

import pytest
import torch
import torch.nn.functional as F

from finealign.objectives.base import StepContext, build_objectives
from finealign.objectives.itm import ImageTextMatching, itm_loss, sample_hard_negatives
from finealign.objectives.mlm import MaskedLanguageModeling, mlm_loss
from finealign.types import Batch, Features


def _batch(text, item_ids=None):
    B, T = text.shape
    return Batch(images=torch.zeros(B, 3, 4, 4), text=text, text_mask=text != 0, image_ids=torch.arange(B),
                 item_ids=torch.arange(B) if item_ids is None else item_ids, captions=[""] * B, keys=[""] * B)


# ---------------------------------------------------------------------------------------------- MLM

def test_mlm_equals_hand_computed_ce_and_uses_original_tokens():
    text = torch.tensor([[1, 4, 5, 2], [1, 6, 2, 0]])
    positions = torch.tensor([[0, 2], [1, 1]])            # targets: 5 and 6
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0],
                           [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    lse0 = math.log(6 + math.exp(2.0))
    lse1 = math.log(6 + math.e)
    expected = ((lse0 - 2.0) + (lse1 - 0.0)) / 2
    feats = Features(extras={"mlm_logits": logits, "mlm_positions": positions})
    obj = MaskedLanguageModeling()
    out = obj(feats, _batch(text), StepContext())
    assert out["loss"].item() == pytest.approx(expected, abs=1e-6)
    assert out["acc"].item() == pytest.approx(0.5)         # row 0 right (5), row 1 argmax 0 != 6
    # the targets are read from the text passed in at the given positions: had batch.text held the
    # corrupted copy the model saw (mask id 3 at both positions), the loss would be CE against 3s
    corrupted = text.clone()
    corrupted[positions[:, 0], positions[:, 1]] = 3
    other = mlm_loss(logits, positions, corrupted)[0]
    assert other.item() == pytest.approx(F.cross_entropy(logits, torch.tensor([3, 3])).item(), abs=1e-6)
    assert abs(other.item() - expected) > 0.5


def test_mlm_label_smoothing_by_hand():
    """label_smoothing ε: (1 - ε) · CE + ε · the mean over the V classes of -log p."""
    text = torch.tensor([[1, 4, 5, 2], [1, 6, 2, 0]])
    positions = torch.tensor([[0, 2], [1, 1]])            # targets: 5 and 6
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0],
                           [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    eps, V = 0.2, 7
    rows = []
    for row, target in zip(logits.tolist(), (5, 6)):
        lse = math.log(sum(math.exp(x) for x in row))
        nll = [lse - x for x in row]
        rows.append((1 - eps) * nll[target] + eps * sum(nll) / V)
    out = MaskedLanguageModeling(label_smoothing=eps)(
        Features(extras={"mlm_logits": logits, "mlm_positions": positions}), _batch(text), StepContext())
    assert out["loss"].item() == pytest.approx(sum(rows) / 2, abs=1e-6)


def test_mlm_gradient_and_empty_and_errors():
    text = torch.tensor([[1, 4, 5, 2]])
    logits = torch.randn(0, 7, requires_grad=True)
    loss, acc = mlm_loss(logits, torch.zeros(0, 2, dtype=torch.long), text)
    loss.backward()
    assert loss.item() == 0.0 and acc.item() == 0.0
    with pytest.raises(ValueError, match="mlm_logits.*ALBEF"):
        MaskedLanguageModeling()(Features(), _batch(text), StepContext())
    with pytest.raises(ValueError, match="same M"):
        mlm_loss(torch.randn(3, 7), torch.zeros(2, 2, dtype=torch.long), text)


def test_mlm_and_itm_build_from_registry():
    objs = build_objectives({"mlm": {"weight": 1.0}, "itm": {"weight": 1.0}})
    assert isinstance(objs["mlm"], MaskedLanguageModeling) and isinstance(objs["itm"], ImageTextMatching)
    assert objs["mlm"].scope == objs["itm"].scope == "local"


# ---------------------------------------------------------------------------------------------- ITM

def test_itm_labels_and_loss_hand_computed():
    # B = 2 positives, B' = 1 -> 2 negatives
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
    labels = [1, 1, 0, 0]
    ce = [math.log(math.exp(logits[i, 0].item()) + math.exp(logits[i, 1].item())) - logits[i, labels[i]].item()
          for i in range(4)]
    for num_pos in (2, torch.tensor(2)):
        out = ImageTextMatching()(Features(extras={"itm_logits": logits, "itm_num_pos": num_pos}),
                                  _batch(torch.ones(2, 3, dtype=torch.long)), StepContext())
        assert out["loss"].item() == pytest.approx(sum(ce) / 4, abs=1e-6)
        # predictions: 1, 0, 0 (tie -> index 0), 1 -> correct on rows 0 and 2
        assert out["acc"].item() == pytest.approx(0.5)
    assert itm_loss(logits, 2)[0].item() == pytest.approx(
        F.cross_entropy(logits, torch.tensor(labels)).item(), abs=1e-6)


def test_itm_errors():
    batch = _batch(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="itm_logits.*ITM head"):
        ImageTextMatching()(Features(), batch, StepContext())
    with pytest.raises(ValueError, match="itm_num_pos"):
        ImageTextMatching()(Features(extras={"itm_logits": torch.zeros(4, 2)}), batch, StepContext())
    with pytest.raises(ValueError, match="outside"):
        itm_loss(torch.zeros(4, 2), 5)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        itm_loss(torch.zeros(4, 3), 2)


# ------------------------------------------------------------------------------------ hard negatives

def test_hard_negatives_never_diagonal_or_same_item():
    B = 12
    item_ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5, 6, 7])
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(B, B, generator=g) * 3
    same = item_ids[:, None] == item_ids[None, :]
    for _ in range(200):
        nt, ni = sample_hard_negatives(sim, item_ids, generator=g)
        assert nt.dtype == ni.dtype == torch.long and nt.shape == ni.shape == (B,)
        assert not same[torch.arange(B), nt].any()
        assert not same[ni, torch.arange(B)].any()


def test_hard_negatives_follow_softmax():
    B = 4
    item_ids = torch.arange(B)
    sim = torch.zeros(B, B)
    sim[0, 2] = 5.0                       # image 0 is very similar to text 2 -> its negative text
    sim[3, 1] = 5.0                       # text 1's negative image is 3
    sim[0, 0] = sim[1, 1] = 100.0         # diagonal is huge but excluded
    g = torch.Generator().manual_seed(1)
    text_for_0 = torch.zeros(B)
    image_for_1 = torch.zeros(B)
    n = 400
    for _ in range(n):
        nt, ni = sample_hard_negatives(sim, item_ids, generator=g)
        text_for_0[nt[0]] += 1
        image_for_1[ni[1]] += 1
    p = math.exp(5) / (math.exp(5) + 2)   # ~0.987
    assert text_for_0[0] == 0 and image_for_1[1] == 0
    assert text_for_0[2] / n > p - 0.05
    assert image_for_1[3] / n > p - 0.05
    # gradients never flow from the sampler
    s = sim.clone().requires_grad_(True)
    nt, _ = sample_hard_negatives(s, item_ids)
    assert not nt.requires_grad


def test_hard_negatives_seeded_reproducibility():
    sim = torch.randn(16, 16, generator=torch.Generator().manual_seed(3))
    ids = torch.arange(16)
    a = sample_hard_negatives(sim, ids, generator=torch.Generator().manual_seed(7))
    b = sample_hard_negatives(sim, ids, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = [sample_hard_negatives(sim, ids, generator=torch.Generator().manual_seed(s)) for s in range(8, 12)]
    assert any(not torch.equal(a[0], x[0]) for x in c)


def test_hard_negatives_fallback_least_similar_other():
    # all three share one item -> no valid negative anywhere -> least similar other sample
    sim = torch.tensor([[9.0, 1.0, 0.5],
                        [2.0, 9.0, 3.0],
                        [0.1, 0.2, 9.0]])
    ids = torch.zeros(3, dtype=torch.long)
    for seed in range(5):
        nt, ni = sample_hard_negatives(sim, ids, generator=torch.Generator().manual_seed(seed))
        assert nt.tolist() == [2, 0, 0]   # row-wise argmin off the diagonal
        assert ni.tolist() == [2, 2, 0]   # column-wise argmin off the diagonal
    # mixed: rows 0, 1 share an item with each other, 2 is alone -> 0 and 1 must pick 2; 2 samples softly
    ids = torch.tensor([0, 0, 1])
    nt, ni = sample_hard_negatives(sim, ids, generator=torch.Generator().manual_seed(0))
    assert nt[:2].tolist() == [2, 2] and ni[:2].tolist() == [2, 2] and nt[2] in (0, 1)
    with pytest.raises(ValueError, match="at least 2"):
        sample_hard_negatives(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="square"):
        sample_hard_negatives(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
