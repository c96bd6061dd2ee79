"""Grouped / semi-hard batch samplers: item exclusion, coverage, determinism, ranks, resume."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from finealign.data.loader import PairDataset
from finealign.data.samplers import (GroupedBatchSampler, SemiHardBatchSampler, pair_metadata,
                                     semi_hard_negative_mask)
from finealign.types import Sample


pytestmark = pytest.mark.usefixtures("one_thread")


def grouped_data(n: int = 300, seed: int = 0):
    """Groups of uneven size; items of 1-3 images, each item inside one group."""
    rng = np.random.default_rng(seed)
    groups, items, item = [], [], 0
    while len(groups) < n:
        g, k = int(rng.integers(0, 7)), int(rng.integers(1, 4))
        groups += [g] * k
        items += [item] * k
        item += 1
    return groups[:n], items[:n]


def check_epoch(batches, items, n, stats):
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat)), "a sample appears twice in one epoch"
    for b in batches:
        assert len({items[i] for i in b}) == len(b), "two samples of one item in a batch"
    assert stats["placed"] == len(flat) and stats["left_out"] == n - len(flat)


# ------------------------------------------------------------------------------ grouped

def test_grouped_items_coverage_and_left_out():
    groups, items = grouped_data()
    for drop_last in (True, False):
        s = GroupedBatchSampler(groups, items, 16, seed=3, drop_last=drop_last)
        batches = list(s)
        assert len(batches) == len(s) == s.epoch_stats(0)["batches"]
        check_epoch(batches, items, len(items), s.epoch_stats(0))
        sizes = [len(b) for b in batches]
        assert all(x == 16 for x in sizes[:-1]) and (sizes[-1] == 16 or not drop_last)
        assert s.epoch_stats(0)["left_out"] < 16 + 3      # remainder (+ a few collisions)
        assert s.state_dict() == {"epoch": 1, "position": 0}


def test_grouped_batches_use_few_groups():
    groups = [g for g in range(6) for _ in range(32)]
    items = list(range(len(groups)))
    s = GroupedBatchSampler(groups, items, 16, groups_per_batch=2, seed=1)
    batches = list(s)
    assert len(batches) == 12
    assert all(len({groups[i] for i in b}) <= 2 for b in batches)
    s = GroupedBatchSampler(groups, items, 16, seed=1)              # default: 16 // 4 groups
    assert all(len({groups[i] for i in b}) <= 4 for b in s)
    g2, i2 = grouped_data(seed=5)                                    # uneven groups: still few
    counts = [len({g2[i] for i in b}) for b in GroupedBatchSampler(g2, i2, 16, groups_per_batch=2)]
    assert np.mean(counts) <= 3.0


def test_grouped_order_is_seeded_per_epoch():
    groups, items = grouped_data()
    a = GroupedBatchSampler(groups, items, 16, seed=0)
    e0, e1 = list(a), list(a)                                         # auto-advances the epoch
    assert e0 != e1
    b = GroupedBatchSampler(groups, items, 16, seed=0)
    b.set_epoch(1)
    assert list(b) == e1
    c = GroupedBatchSampler(groups, items, 16, seed=1)
    assert list(c) != e0


def test_grouped_ranks_are_disjoint_and_cover_the_epoch():
    groups, items = grouped_data(n=9 * 16 + 5)
    full = list(GroupedBatchSampler(groups, items, 16, seed=2))
    assert len(full) % 2 == 1                                         # forces a trimmed batch
    ranks = [GroupedBatchSampler(groups, items, 16, num_replicas=2, rank=r, seed=2) for r in (0, 1)]
    got = [list(s) for s in ranks]
    assert len(got[0]) == len(got[1]) == len(ranks[0]) == len(full) // 2
    assert got[0] == full[0:-1:2] and got[1] == full[1:-1:2]
    s0, s1 = (set(itertools.chain(*g)) for g in got)
    assert not s0 & s1 and s0 | s1 == set(itertools.chain(*full[:-1]))
    stats = ranks[0].epoch_stats(0)
    assert stats["trimmed"] == 16 and stats["left_out"] == len(items) - 16 * (len(full) - 1)


def test_grouped_resume_mid_epoch_and_at_epoch_end():
    groups, items = grouped_data()
    ref = GroupedBatchSampler(groups, items, 16, seed=4, epoch_tuples=True)
    stream = list(itertools.islice(itertools.chain(iter(ref), iter(ref)), 30))
    n0 = len(ref)
    for cut in (3, n0):                                               # mid-epoch, exact epoch end
        a = GroupedBatchSampler(groups, items, 16, seed=4, epoch_tuples=True)
        it = iter(a)
        head = [next(it) for _ in range(cut)]
        state = a.state_dict()
        b = GroupedBatchSampler(groups, items, 16, seed=4, epoch_tuples=True)
        b.load_state_dict(state)
        b.set_epoch(state["epoch"])                                   # same epoch: keeps position
        tail = list(itertools.islice(itertools.chain(iter(b), iter(b)), 30 - cut))
        assert head + tail == stream
    assert stream[n0][0][0] == 1 and stream[0][0][0] == 0            # (epoch, index) pairs


def test_grouped_errors():
    with pytest.raises(ValueError, match="differ in length"):
        GroupedBatchSampler([0, 1], [0, 1, 2], 1)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        GroupedBatchSampler([0] * 10, list(range(10)), 11)
    with pytest.raises(ValueError, match="num_replicas"):
        GroupedBatchSampler([0] * 10, list(range(10)), 6, num_replicas=2)
    with pytest.raises(ValueError, match="rank 2"):
        GroupedBatchSampler([0] * 10, list(range(10)), 2, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="distinct item"):
        GroupedBatchSampler([0] * 10, [i // 5 for i in range(10)], 4)


# ------------------------------------------------------------------------------ semi-hard

def cluster_data(k: int = 6, m: int = 24, dups: int = 4, hard: int = 2, seed: int = 0):
    """Clusters with intra-cluster similarity ~0.7, near-duplicate copies (sim > 0.99, new item),
    too-hard copies (sim ~0.93: above the band, below ``upper``) and pairs of images sharing an
    item. Returns (embeddings, item_ids, dup_pairs)."""
    g = torch.Generator().manual_seed(seed)
    e = 64
    xs, items, dup_pairs = [], [], []
    for c in range(k):
        centre = torch.zeros(e)
        centre[c] = 1.0
        for j in range(m):
            xs.append(centre + torch.randn(e, generator=g) * (0.6 / e) ** 0.5)
            items.append(c * 1000 + j // 2)                           # two images per item
        for j in range(dups):
            src = len(xs) - m + j * 3
            xs.append(xs[src] + torch.randn(e, generator=g) * 0.01)
            items.append(c * 1000 + 500 + j)
            dup_pairs.append((src, len(xs) - 1))
        for j in range(hard):
            src = xs[len(xs) - m - dups - j + j * 5 + 1]
            src = src / src.norm()
            u = torch.randn(e, generator=g)
            u = u - (u @ src) * src
            xs.append(src + 0.39 * u / u.norm())                      # cos = 1 / sqrt(1 + 0.39²)
            items.append(c * 1000 + 700 + j)
    return torch.nn.functional.normalize(torch.stack(xs), dim=-1), items, dup_pairs


def test_semi_hard_batches_respect_band_upper_items_and_duplicates():
    x, items, dups = cluster_data()
    sim = x @ x.T
    s = SemiHardBatchSampler(x, items, 8, seed=0, upper=0.95, band=(0.3, 0.9))
    batches = list(s)
    stats = s.epoch_stats(0)
    assert stats["complete"] and len(batches) == stats["batches"]
    check_epoch(batches, items, len(items), stats)
    assert all(len(b) == 8 for b in batches) and len(batches) >= len(items) // 8 - 3
    in_band = []
    for b in batches:
        sb = sim[b][:, b] - 2 * torch.eye(8)
        assert sb.max() <= 0.95 + 1e-5                                     # never a near-duplicate
        assert not any(p in b and q in b for p, q in dups)
        prev_max = [sb[j, :j].max().item() for j in range(1, 8)]       # members in build order
        in_band.append(all(0.3 <= v <= 0.9 for v in prev_max))
    assert sum(in_band[: len(batches) // 2]) == len(batches) // 2     # band fills early batches
    assert np.mean(in_band) >= 0.6
    rnd = list(SemiHardBatchSampler(None, items, 8, seed=0))          # no embeddings: random
    rnd_band = [all(0.3 <= (sim[b][:, b] - 2 * torch.eye(8))[j, :j].max() <= 0.9 for j in range(1, 8))
                for b in rnd]
    assert np.mean(rnd_band) < np.mean(in_band)


def test_semi_hard_fallback_keeps_the_hard_rules():
    x, items, dups = cluster_data(seed=3)
    sim = x @ x.T - 2 * torch.eye(len(items))
    s = SemiHardBatchSampler(x, items, 8, band=(-1.0, -0.9))          # empty band: fallback only
    for epoch in range(3):
        batches = list(s)
        check_epoch(batches, items, len(items), s.epoch_stats(epoch))
        assert all(sim[b][:, b].max() <= 0.95 + 1e-5 for b in batches)
        assert not any(p in b and q in b for p, q in dups for b in batches)


def test_semi_hard_ranks_and_determinism():
    x, items, _ = cluster_data(seed=1)
    full = list(SemiHardBatchSampler(x, items, 8, seed=5))
    again = SemiHardBatchSampler(x, items, 8, seed=5)
    assert list(again) == full and list(again) != full               # epoch 1 differs
    ranks = [SemiHardBatchSampler(x, items, 8, seed=5, num_replicas=2, rank=r) for r in (0, 1)]
    got = [list(s) for s in ranks]
    keep = len(full) - len(full) % 2
    assert got[0] == full[0:keep:2] and got[1] == full[1:keep:2]
    assert not set(itertools.chain(*got[0])) & set(itertools.chain(*got[1]))


def test_semi_hard_resume_with_refresh_and_prefetch():
    x, items, _ = cluster_data(seed=2)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    x2 = torch.nn.functional.normalize(x + 0.3 * noise, dim=-1)
    kw = dict(seed=3, refresh_every=3)
    ref = SemiHardBatchSampler(x, items, 8, **kw)                    # refresh at position 3
    it = iter(ref)
    want = [next(it) for _ in range(3)]
    assert ref.needs_refresh(3) and not ref.needs_refresh(4)
    ref.update_embeddings(x2)
    want += list(it)

    a = SemiHardBatchSampler(x, items, 8, **kw)                      # prefetching consumer
    it = iter(a)
    got = [next(it) for _ in range(6)][:3]                            # 3 batches fetched too many
    a.load_state_dict({"epoch": 0, "position": 3})                    # roll back to what was used
    a.update_embeddings(x2)
    it = iter(a)
    got += [next(it) for _ in range(2)]
    state = a.state_dict()                                            # used mask + embeddings
    b = SemiHardBatchSampler(x, items, 8, **kw)                       # stale embeddings on purpose
    b.load_state_dict(state)
    got += list(b)
    assert got == want and b.state_dict()["epoch"] == 1

    c = SemiHardBatchSampler(x, items, 8, **kw)                       # no refresh: replay path
    full = list(c)
    d = SemiHardBatchSampler(x, items, 8, **kw)
    d.load_state_dict({"epoch": 0, "position": 4})
    assert list(d) == full[4:]


def test_semi_hard_errors():
    x, items, _ = cluster_data(k=2, m=8, dups=0)
    with pytest.raises(ValueError, match="embeddings must be"):
        SemiHardBatchSampler(x[:-1], items, 4)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        SemiHardBatchSampler(x, items, len(items) + 1)
    with pytest.raises(ValueError, match="rank"):
        SemiHardBatchSampler(x, items, 4, num_replicas=2, rank=-1)
    with pytest.raises(ValueError, match="band"):
        SemiHardBatchSampler(x, items, 4, band=(0.8, 0.2))


def test_semi_hard_negative_mask_hand_example():
    sim = torch.tensor([[1.00, 0.50, 0.97, 0.10],
                        [0.50, 1.00, 0.92, 0.60],
                        [0.97, 0.92, 1.00, 0.40],
                        [0.10, 0.60, 0.40, 1.00]])
    item_ids = torch.tensor([0, 1, 2, 1])
    got = semi_hard_negative_mask(sim, item_ids, upper=0.95, band=(0.3, 0.9))
    want = torch.tensor([[False, True, False, False],     # 0.97 near-dup, 0.10 below band
                         [True, False, False, False],     # 0.92 above band, item 1 == item 1
                         [False, False, False, True],
                         [False, False, True, False]])
    assert torch.equal(got, want)
    with pytest.raises(ValueError):
        semi_hard_negative_mask(sim[:3], item_ids)
    # image -> text similarities: a negative must also lie below the anchor's own positive (the diagonal)
    it = torch.tensor([[0.60, 0.50, 0.70, 0.35],
                       [0.40, 0.80, 0.85, 0.60],
                       [0.45, 0.30, 0.50, 0.55],
                       [0.20, 0.60, 0.40, 0.90]])
    ids = torch.arange(4)
    below = torch.tensor([[False, True, False, True],      # 0.70 in the band but above the positive 0.60
                          [True, False, False, True],      # 0.85 above the positive 0.80
                          [True, True, False, False],      # 0.55 above the positive 0.50
                          [False, True, True, False]])     # 0.20 below the band
    assert torch.equal(semi_hard_negative_mask(it, ids), below)
    anywhere = below.clone()
    anywhere[0, 2] = anywhere[1, 2] = anywhere[2, 3] = True
    assert torch.equal(semi_hard_negative_mask(it, ids, below_positive=False), anywhere)


def test_pair_metadata_from_pair_dataset():
    samples = [Sample(key="a", load_image=lambda: None, captions=["x", "y"], item_id=7, category="shoe"),
               Sample(key="b", load_image=lambda: None, captions=["z"], category="bag")]
    groups, items = pair_metadata(PairDataset(samples, transform=None, train=False))
    assert groups == ["shoe", "shoe", "bag"] and items == [7, 7, -2]


def test_grouped_batches_spread_over_groups_per_batch():
    """A batch takes ceil(space / groups_left) members from each group it visits, so large groups
    spread a batch over exactly ``groups_per_batch`` groups: B=16, gpb=2 -> 8 + 8; default gpb
    (16 // 4 = 4) -> 4 x 4; B=12, gpb=3 -> 4 x 3; B=10, gpb=4 -> 3, 3, 2, 2 in visiting order (the
    last batch of that epoch is topped up from the short groups left). With uneven groups (items inside
    one group), every batch formed while >= gpb groups still have members spans >= gpb groups."""
    groups = [g for g in range(6) for _ in range(32)]
    items = list(range(len(groups)))

    def runs(batch, groups):                                          # members per group, visiting order
        return [len(list(r)) for _, r in itertools.groupby(groups[i] for i in batch)]

    for B, gpb, want in ((16, 2, [8, 8]), (16, 0, [4, 4, 4, 4]), (12, 3, [4, 4, 4])):
        s = GroupedBatchSampler(groups, items, B, groups_per_batch=gpb, seed=1)
        batches = list(s)
        assert len(batches) == len(items) // B
        assert all(runs(b, groups) == want for b in batches), (B, gpb)
        assert all(len({groups[i] for i in b}) == len(want) for b in batches)
    batches = list(GroupedBatchSampler(groups, items, 10, groups_per_batch=4, seed=1))
    assert len(batches) == 19 and all(runs(b, groups) == [3, 3, 2, 2] for b in batches[:-1])
    g2, i2 = grouped_data(seed=5)
    for gpb in (2, 4):
        left = {g: g2.count(g) for g in set(g2)}
        for b in GroupedBatchSampler(g2, i2, 16, groups_per_batch=gpb, seed=5):
            if sum(v > 0 for v in left.values()) >= gpb:
                assert len({g2[i] for i in b}) >= gpb, (gpb, runs(b, g2))
            for i in b:
                left[g2[i]] -= 1


def test_semi_hard_prefers_nearest_eligible_candidates(semi_hard_star):
    """The seed's neighbours in the band are tried nearest first. Hand-built embeddings: sample j has
    similarity c_j to the seed and c_i * c_j to sample i (own orthogonal direction each). Around the seed:
    0.97 (near-duplicate) and 0.93 (above the band) are not candidates, 0.88 shares the seed's item, so
    the eligible in-band ones in order are 0.85, 0.75, 0.6, 0.45, 0.35 (0.2 is below the band); a batch of
    3 is [seed, the 0.85 one, the 0.75 one] (their similarity 0.6375 is in the band)."""
    seed = 0
    x, items, s, at = semi_hard_star(seed)
    sim = x @ x.T
    assert abs(sim[s, at[0.85]].item() - 0.85) < 1e-6 and abs(sim[at[0.85], at[0.75]].item() - 0.6375) < 1e-6
    sampler = SemiHardBatchSampler(x, items, 3, seed=seed, upper=0.95, band=(0.3, 0.9))
    assert next(iter(sampler)) == [s, at[0.85], at[0.75]]


def test_semi_hard_negative_mask_excludes_ties_with_the_positive():
    """``below_positive``: a negative must lie strictly below the anchor's positive; a candidate whose
    similarity equals ``sim[i, i]`` (in the band, another item) is excluded, one just below is kept;
    without ``below_positive`` both are allowed."""
    sim = torch.tensor([[0.60, 0.60, 0.59],
                        [0.70, 0.80, 0.80],
                        [0.50, 0.40, 0.50]])
    ids = torch.arange(3)
    want = torch.tensor([[False, False, True],           # 0.60 ties the positive 0.60, 0.59 below it
                         [True, False, False],           # 0.80 ties the positive 0.80
                         [False, True, False]])          # 0.50 ties the positive 0.50
    assert torch.equal(semi_hard_negative_mask(sim, ids), want)
    assert torch.equal(semi_hard_negative_mask(sim, ids, below_positive=False), ~torch.eye(3, dtype=torch.bool))
