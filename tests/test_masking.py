import pytest
import torch

from finealign.masking import (AttentiveMasker, MaskIndices, RandomMasker, build_masker, gather_tokens,
                               num_to_mask, patch_text_relevance, split_by_score)


def _check_partition(idx: MaskIndices, B: int, N: int, M: int):
    assert idx.masked.shape == (B, M) and idx.keep.shape == (B, N - M)
    assert idx.keep.dtype == torch.long and idx.masked.dtype == torch.long
    for k, m in zip(idx.keep, idx.masked):
        assert torch.equal(k, k.sort().values) and torch.equal(m, m.sort().values)   # sorted
        assert not set(k.tolist()) & set(m.tolist())                                  # disjoint
        assert sorted(k.tolist() + m.tolist()) == list(range(N))                      # cover all
    b = idx.to_bool(N)
    assert b.shape == (B, N) and b.dtype == torch.bool and (b.sum(1) == M).all()
    assert b.gather(1, idx.masked).all() and not b.gather(1, idx.keep).any()


def test_num_to_mask_rounding_and_bounds():
    assert num_to_mask(16, 0.5) == 8
    assert num_to_mask(16, 0.75) == 12
    assert num_to_mask(10, 0.25) == 3          # 2.5 rounds half up
    assert num_to_mask(10, 0.24) == 2          # 2.4 rounds down
    assert num_to_mask(10, 0.26) == 3
    assert num_to_mask(49, 0.4) == 20          # 19.6
    assert num_to_mask(16, 0.0) == 0
    assert num_to_mask(16, 0.01) == 1          # >= 1 when ratio > 0
    assert num_to_mask(16, 0.99) == 15         # <= N-1: one patch stays visible
    assert num_to_mask(16, 1.0) == 15
    assert num_to_mask(1, 0.5) == 0
    with pytest.raises(ValueError):
        num_to_mask(16, 1.5)
    with pytest.raises(ValueError):
        num_to_mask(0, 0.5)


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("kind", ["random", "attentive-most", "attentive-least"])
def test_maskers_partition_exact_count(kind, ratio):
    B, N = 3, 10
    if kind == "random":
        masker = RandomMasker(ratio)
    else:
        masker = AttentiveMasker(ratio, mask=kind.split("-")[1])
    idx = masker(torch.randn(B, N), generator=torch.Generator().manual_seed(0))
    _check_partition(idx, B, N, num_to_mask(N, ratio))


def test_split_by_score_highest_and_ties():
    score = torch.tensor([[0.1, 0.9, 0.5, 0.7], [1.0, 1.0, 1.0, 0.0]])
    idx = split_by_score(score, 2)
    assert idx.masked.tolist() == [[1, 3], [0, 1]]       # ties: lower index first
    assert idx.keep.tolist() == [[0, 2], [2, 3]]
    assert torch.equal(split_by_score(score, 2).masked, idx.masked)   # deterministic
    with pytest.raises(ValueError):
        split_by_score(score, 5)


def test_gather_tokens():
    x = torch.arange(2 * 5 * 3).view(2, 5, 3)
    idx = torch.tensor([[0, 4], [2, 3]])
    out = gather_tokens(x, idx)
    assert out.shape == (2, 2, 3)
    assert torch.equal(out[0, 1], x[0, 4]) and torch.equal(out[1, 0], x[1, 2])


def test_random_masker_seeded_reproducible():
    rel = torch.zeros(4, 16)
    m = RandomMasker(0.5)
    a = m(rel, generator=torch.Generator().manual_seed(1))
    b = m(rel, generator=torch.Generator().manual_seed(1))
    c = m(rel, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.masked, b.masked) and torch.equal(a.keep, b.keep)
    assert not torch.equal(a.masked, c.masked)
    # relevance values are ignored
    d = m(torch.randn(4, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.masked, d.masked)


def test_random_masker_roughly_uniform():
    N, draws = 8, 4000
    counts = RandomMasker(0.25)(torch.zeros(draws, N), generator=torch.Generator().manual_seed(0)).to_bool(N)
    freq = counts.float().mean(0)                  # expected 2/8 = 0.25 per patch
    assert (freq - 0.25).abs().max() < 0.03


def test_attentive_picks_most_relevant_and_ignores_pads():
    E = 4
    e = torch.eye(E)
    # 4 patches pointing at basis directions 0..3; real tokens along e0 and e1; a pad along e3
    patches = e[None]                                            # (1, 4, E)
    tokens = torch.stack([e[0], e[1], e[3]])[None]               # (1, 3, E)
    text_mask = torch.tensor([[True, True, False]])
    rel = patch_text_relevance(patches, tokens, text_mask, "max")
    assert rel.shape == (1, 4) and rel.dtype == torch.float32 and not rel.requires_grad
    assert torch.allclose(rel, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))   # patch 3 matches only the pad
    idx = AttentiveMasker(0.5, mask="most")(rel)
    assert idx.masked.tolist() == [[0, 1]]
    idx = AttentiveMasker(0.5, mask="least")(rel)
    assert idx.keep.tolist() == [[0, 1]] and idx.masked.tolist() == [[2, 3]]
    # the pad would otherwise make patch 3 the most relevant
    rel_all = patch_text_relevance(patches, tokens, None, "max")
    assert rel_all[0, 3] == pytest.approx(1.0)


def test_relevance_max_vs_mean():
    # patch 0 matches one token perfectly and is orthogonal to the other: max 1, mean 0.5
    # patch 1 is halfway between both tokens: max = mean = cos(45deg)
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])   # last is a pad
    patches = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    r_max = patch_text_relevance(patches, tokens, mask, "max")
    r_mean = patch_text_relevance(patches, tokens, mask, "mean")
    c = 2 ** -0.5
    assert torch.allclose(r_max, torch.tensor([[1.0, c]]), atol=1e-6)
    assert torch.allclose(r_mean, torch.tensor([[0.5, c]]), atol=1e-6)
    # the orderings differ: "max" prefers patch 0, "mean" patch 1
    m = AttentiveMasker(0.5, mask="most")
    assert m(r_max).masked.tolist() == [[0]] and m(r_mean).masked.tolist() == [[1]]
    assert not r_max.requires_grad
    with pytest.raises(ValueError):
        patch_text_relevance(patches, tokens, mask, "sum")


@pytest.mark.parametrize("ties", [False, True])
def test_ic_and_mim_selections_are_complementary(ties):
    B, N = 5, 16
    g = torch.Generator().manual_seed(0)
    rel = torch.randint(0, 3, (B, N), generator=g).float() if ties else torch.randn(B, N, generator=g)
    ic = AttentiveMasker(0.5, mask="least")(rel)
    mim = AttentiveMasker(0.5, mask="most")(rel)
    assert torch.equal(ic.keep, mim.masked) and torch.equal(ic.masked, mim.keep)
    # the MIM-masked patches are the most relevant ones
    assert (rel.gather(1, mim.masked).min(1).values >= rel.gather(1, mim.keep).max(1).values).all()


def test_build_masker():
    m = build_masker({"type": "attentive", "mask_ratio": 0.3, "mask": "least"})
    assert isinstance(m, AttentiveMasker) and m.mask_ratio == 0.3 and m.mask == "least"
    assert isinstance(build_masker({"type": "random"}), RandomMasker)
    with pytest.raises(KeyError, match="did you mean 'random'"):
        build_masker({"type": "randm"})
    with pytest.raises(ValueError, match="ratio"):
        build_masker({"type": "random", "ratio": 0.5})
    with pytest.raises(ValueError, match="mask"):
        build_masker({"type": "attentive", "mask": "middle"})
    with pytest.raises(ValueError, match="mask_ratio"):
        build_masker({"type": "random", "mask_ratio": 1.0})
    with pytest.raises(ValueError, match="type"):
        build_masker({"mask_ratio": 0.5})
