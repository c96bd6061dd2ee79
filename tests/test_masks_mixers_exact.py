"""Exact checks of maskers, mixers and batch samplers against their definitions (mutation audit).

Every expectation is computed by hand or by a plain reference in the test: tie-breaking of patch
masks beyond small N, relevance of a row without text, word-count rounding, CutMix window positions,
window-side bounds, where pasted pixels come from, the semi-hard band edges and ``upper``, the
candidate budget, grouped-queue order, and the batch plans' shapes."""
from __future__ import annotations

import random

import pytest
import torch

from finealign.config import DataConfig
from finealign.data.batching import GroupedBatches, RandomBatches, RankSlice, SemiHardBatches
from finealign.data.loader import PairDataset
from finealign.data.samplers import GroupedBatchSampler, SemiHardBatchSampler, semi_hard_negative_mask
from finealign.masking import AttentiveMasker, patch_text_relevance, split_by_score
from finealign.masking.sync import SynchronizedMasker
from finealign.masking.text import select_words
from finealign.mixing import paste_windows, window_side
from finealign.mixing.cutmix import CutMixMixer
from finealign.mixing.timix import TiMixMixer
from finealign.types import Sample

P, G = 4, 8          # patch size, grid side (images 32 x 32)


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ patch masks

def _ref_most(score: list[float], m: int) -> list[int]:
    """The m highest scores, ties to the lower index: sort by (-score, index)."""
    return sorted(sorted(range(len(score)), key=lambda i: (-score[i], i))[:m])


@pytest.mark.parametrize("N", [20, 49])
def test_split_by_score_breaks_ties_by_lower_index_beyond_small_rows(N):
    """Many ties in rows longer than 16 (where an unstable sort reorders equal keys)."""
    g = torch.Generator().manual_seed(N)
    score = torch.randint(0, 3, (6, N), generator=g).float()
    for m in (1, N // 3, N // 2):
        idx = split_by_score(score, m)
        want = [_ref_most(row, m) for row in score.tolist()]
        assert idx.masked.tolist() == want
        assert idx.keep.tolist() == [sorted(set(range(N)) - set(w)) for w in want]


def test_attentive_least_with_ties_keeps_the_reference_most_relevant():
    N = 24
    rel = torch.randint(0, 2, (4, N), generator=torch.Generator().manual_seed(3)).float()
    most = AttentiveMasker(0.25, mask="most")(rel)              # 6 masked
    least = AttentiveMasker(0.75, mask="least")(rel)            # 18 masked, keep 6
    want = [_ref_most(row, 6) for row in rel.tolist()]
    assert most.masked.tolist() == want and least.keep.tolist() == want


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_relevance_of_a_row_without_real_tokens_is_zero(reduce):
    patches = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 1.0]]])
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])
    mask = torch.tensor([[True, False], [False, False]])        # row 1 has no real token
    rel = patch_text_relevance(patches, tokens, mask, reduce)
    assert torch.equal(rel[1], torch.zeros(2))                  # finite zeros, not -inf
    assert torch.allclose(rel[0], torch.tensor([1.0, 0.0]))     # only token 0 counts


def test_select_words_rounds_half_up_per_row():
    """floor(ratio * n + 0.5) of the n maskable words: 7 * 0.15 = 1.05 -> 1; 5 * 0.5 = 2.5 -> 3;
    7 * 0.3 = 2.1 -> 2; with the highest scores (ties: lower column)."""
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.0]])
    mask = torch.ones(1, 8, dtype=torch.bool)
    special = torch.zeros(1, 8, dtype=torch.bool)
    special[0, 7] = True                                         # 7 maskable
    assert select_words(scores, mask, special, 0.15).tolist() == [[0, 0]]
    assert select_words(scores, mask, special, 0.3).tolist() == [[0, 0], [0, 2]]
    five = special.clone()
    five[0, 5:] = True                                           # 5 maskable: columns 0..4
    assert select_words(scores, mask, five, 0.5).tolist() == [[0, 0], [0, 2], [0, 4]]



def test_sync_masker_without_patches_still_ranks_words_by_their_top_attention():
    """patches=0 masks no patch (M = 0); words are then ranked by their single most attended patch
    (the code's ``max(M, 1)``): w2 (top .5) beats w1 (top .3, though w1 has the larger total)."""
    attn = torch.zeros(1, 4, 8)
    attn[0, 1] = torch.tensor([.3, .2, .2, .2, .1, 0, 0, 0])   # w1
    attn[0, 2] = torch.tensor([0, 0, 0, 0, 0, .5, 0, 0])       # w2
    mask = torch.ones(1, 4, dtype=torch.bool)
    special = torch.tensor([[True, False, False, True]])
    pos, idx = SynchronizedMasker(words=0.5, patches=0.0)(attn, mask, special)
    assert pos.tolist() == [[0, 2]]
    assert idx.masked.shape == (1, 0) and idx.keep.tolist() == [list(range(8))]

# ------------------------------------------------------------------------------ mixers

def _coded(B: int) -> torch.Tensor:
    """Pixel (b, c, y, x) = 10000 b + 100 y + x: every pixel says where it came from."""
    y = torch.arange(G * P, dtype=torch.float32).view(1, 1, -1, 1)
    x = torch.arange(G * P, dtype=torch.float32).view(1, 1, 1, -1)
    b = torch.arange(B, dtype=torch.float32).view(-1, 1, 1, 1)
    return (10000 * b + 100 * y + x).expand(B, 3, G * P, G * P).clone()


def _expected_paste(imgs, source, tw, sw):
    out = imgs.clone()
    for i in range(imgs.shape[0]):
        (tr, tc, s), (sr, sc, _) = tw[i], sw[i]
        for dy in range(s * P):
            for dx in range(s * P):
                out[i, :, tr * P + dy, tc * P + dx] = imgs[source[i], :, sr * P + dy, sc * P + dx]
    return out


def test_paste_windows_copies_the_source_window_pixel_by_pixel():
    imgs = _coded(2)
    source, tw, sw = [1, 0], [(5, 4, 2), (0, 1, 2)], [(1, 6, 2), (6, 0, 2)]
    got = paste_windows(imgs, torch.tensor(source), torch.tensor(tw), torch.tensor(sw), P)
    assert torch.equal(got, _expected_paste(imgs, source, tw, sw))


def test_timix_pastes_the_sources_best_window_at_the_targets_worst():
    scores = torch.zeros(2, G, G)
    scores[0, 5:8, 5:8] = -3.0          # image 0: worst window (5, 5)
    scores[0, 0:3, 2:5] = 2.0           # image 0: best window (0, 2)
    scores[1, 1:4, 4:7] = 5.0           # image 1: best window (1, 4)
    scores[1, 4:7, 0:3] = -1.0          # image 1: worst window (4, 0)
    imgs = _coded(2)
    mix = TiMixMixer(P, side=(3 / G, 3 / G))(imgs, scores.flatten(1), random.Random(0))
    want = _expected_paste(imgs, [1, 0], [(5, 5, 3), (4, 0, 3)], [(1, 4, 3), (0, 2, 3)])
    assert torch.equal(mix.images, want)
    assert torch.equal(mix.lam, torch.full((2,), 1 - 9 / 64))


def test_cutmix_windows_cover_every_position_and_paste_in_place():
    mixer = CutMixMixer(P, side=(3 / G, 3 / G))                  # side 3: corners 0..5 each way
    imgs = _coded(3)
    seen = set()
    for seed in range(400):
        mix = mixer(imgs, None, random.Random(seed))
        r, c, s = mix.target_window[0].tolist()
        assert s == 3 and 0 <= r <= G - s and 0 <= c <= G - s
        seen.add((r, c))
        if seed < 3:
            w = [(r, c, s)] * 3
            assert torch.equal(mix.images, _expected_paste(imgs, [2, 1, 0], w, w))
            assert torch.allclose(mix.lam, torch.full((3,), 1 - 9 / 64))
    assert seen == {(r, c) for r in range(6) for c in range(6)}  # incl. the last row / column, r != c


@pytest.mark.parametrize("grid, side, want", [(7, (0.35, 0.75), {3, 4, 5}), (10, (0.35, 0.75), {4, 5, 6, 7}),
                                               (8, (0.25, 0.5), {2, 3, 4}), (5, (0.0, 0.1), {1})])
def test_window_side_is_uniform_over_the_integers_in_the_range(grid, side, want):
    rnd = random.Random(1)
    draws = [window_side(grid, side, rnd) for _ in range(300)]
    assert set(draws) == want
    assert min(draws.count(s) for s in want) > 300 / len(want) * 0.6


# ------------------------------------------------------------------------------ semi-hard mask

def test_semi_hard_mask_band_edges_are_inclusive_and_upper_caps_the_band():
    ids = torch.arange(5)
    sim = torch.tensor([[1.0, 0.3, 0.9, 0.2999, 0.9001]] * 5, dtype=torch.float64)
    got = semi_hard_negative_mask(sim, ids, upper=0.95, band=(0.3, 0.9), below_positive=False)
    assert got[0].tolist() == [False, True, True, False, False]
    # band reaching above upper: upper still decides (sim == upper allowed, above it not)
    sim2 = torch.tensor([[1.0, 0.95, 0.96, 0.5, 0.99]] * 5, dtype=torch.float64)
    got = semi_hard_negative_mask(sim2, ids, upper=0.95, band=(0.3, 0.99), below_positive=False)
    assert got[0].tolist() == [False, True, False, True, False]


# ------------------------------------------------------------------------------ semi-hard sampler

def test_semi_hard_candidate_budget_counts_only_in_band_neighbours(semi_hard_star):
    """candidates=2: the two nearest *in-band* neighbours are 0.88 (same item as the seed) and 0.85;
    the 0.93 one lies above the band and must not use up the budget. So the batch is the seed, the
    0.85 one, then the first unused sample in permutation order that passes the hard rules."""
    n, seed = 10, 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    x, items, s, at = semi_hard_star(seed)
    sim = x @ x.T
    members = [s, at[0.85]]
    for j in perm[1:]:                                   # fill: permutation order, hard rules only
        if len(members) == 3:
            break
        if j in members or items[j] in {items[m] for m in members}:
            continue
        if max(float(sim[j, m]) for m in members) <= 0.95:
            members.append(j)
    sampler = SemiHardBatchSampler(x, items, 3, seed=seed, upper=0.95, band=(0.3, 0.9), candidates=2)
    assert next(iter(sampler)) == members


def test_semi_hard_sampler_band_above_upper_still_excludes_near_duplicates(semi_hard_star):
    """band (0.3, 0.99) with upper 0.95: the 0.97 neighbour is a near-duplicate, never a member; the
    nearest allowed ones are 0.93, then 0.88 (seed's item: skipped), then 0.85 (0.85 * 0.93 to 0.93)."""
    x, items, s, at = semi_hard_star(0)
    sampler = SemiHardBatchSampler(x, items, 3, seed=0, upper=0.95, band=(0.3, 0.99))
    batch = next(iter(sampler))
    assert batch == [s, at[0.93], at[0.85]]
    sim = x @ x.T
    assert float((sim[batch][:, batch] - 2 * torch.eye(3)).max()) <= 0.95


def test_semi_hard_unserved_rank_group_is_returned_to_the_pool():
    """10 samples, batches of 3, 2 ranks, no embeddings: 3 batches can be built but only one group of
    2 is served; the third batch's samples are not placed (left out, not counted as used)."""
    s0, s1 = (SemiHardBatchSampler(None, list(range(10)), 3, num_replicas=2, rank=r, seed=1) for r in (0, 1))
    b0, b1 = list(s0), list(s1)
    assert len(b0) == len(b1) == 1
    st = s0.epoch_stats(0)
    assert st["complete"] and st["batches"] == 2
    assert st["placed"] == 6 and st["left_out"] == 4
    assert not set(b0[0]) & set(b1[0])


# ------------------------------------------------------------------------------ grouped sampler

def _perm_from_api(n: int, seed: int) -> list[int]:
    """One group, distinct items, batches of 1: the batches are the epoch's shuffled order."""
    return [b[0] for b in GroupedBatchSampler([0] * n, list(range(n)), 1, seed=seed, drop_last=False)]


def _ref_one_group(perm, items, B, drop_last):
    """Each batch takes the first members in queue order whose item is new to the batch; skipped
    members keep their place at the front of the queue."""
    q, out = list(perm), []
    while True:
        batch, seen = [], set()
        for i in list(q):
            if len(batch) == B:
                break
            if items[i] not in seen:
                batch.append(i)
                seen.add(items[i])
                q.remove(i)
        if len(batch) < B:
            if batch and not drop_last:
                out.append(batch)
            return out
        out.append(batch)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_colliding_members_keep_their_place_in_the_queue(seed):
    n = 15
    items = [i // 3 for i in range(n)]                            # 5 items of 3 samples each
    perm = _perm_from_api(n, seed)
    for drop_last in (True, False):
        got = list(GroupedBatchSampler([0] * n, items, 4, groups_per_batch=1, seed=seed, drop_last=drop_last))
        assert got == _ref_one_group(perm, items, 4, drop_last)


def test_grouped_no_empty_batch_when_the_epoch_divides_evenly():
    s = GroupedBatchSampler([0] * 16 + [1] * 16, list(range(32)), 16, seed=0, drop_last=False)
    batches = list(s)
    assert [len(b) for b in batches] == [16, 16] and len(s) == 2
    assert s.epoch_stats(0) == {"batches": 2, "placed": 32, "left_out": 0, "trimmed": 0}



def _rotation_from_api(groups: list[int], seed: int):
    """Distinct items, batches of 1: the groups give one member each in their rotation, so the
    batches reveal the visiting order and every group's queue (the epoch's shuffled order)."""
    n = len(groups)
    seq = [b[0] for b in GroupedBatchSampler(groups, list(range(n)), 1, seed=seed, drop_last=False)]
    order = list(dict.fromkeys(groups[i] for i in seq))
    return order, {g: [i for i in seq if groups[i] == g] for g in order}


def _ref_grouped(order, queues, items, B, gpb):
    """The documented plan (drop_last): visit groups in rotation, ceil(space / groups_left) from each,
    colliders stay queued in place, then top up from the groups that gave; those go to the back,
    visited groups that gave nothing keep their place at the front. Returns (batches, barren events)."""
    queues = {g: list(q) for g, q in queues.items()}
    active, out, barren_events = [g for g in order if queues[g]], [], 0

    def take(g, k, seen):
        got = []
        for i in list(queues[g]):
            if len(got) == k:
                break
            if items[i] not in seen:
                got.append(i)
                seen.add(items[i])
                queues[g].remove(i)
        return got
    while True:
        batch, seen, gave, barren = [], set(), [], []
        while active and len(batch) < B:
            g = active.pop(0)
            got = take(g, -(-(B - len(batch)) // max(gpb - len(gave), 1)), seen)
            batch += got
            (gave if got else barren).append(g)
        for g in gave:
            if len(batch) == B:
                break
            batch += take(g, B - len(batch), seen)
        barren_events += bool(barren and active and len(batch) == B)    # order then matters
        active = barren + active + [g for g in gave if queues[g]]
        if len(batch) < B:
            return out, barren_events
        out.append(batch)


def test_grouped_plan_matches_the_documented_rotation_with_colliding_items():
    """Items shared across groups, so groups collide with each other and some visited groups give
    nothing (they must keep their place in the rotation); uneven group sizes."""
    designs = [([i % 5 for i in range(20)], [i % 4 for i in range(20)]),
               ([i % 6 for i in range(30)], [i % 5 for i in range(30)]),
               ([0] * 12 + [1] * 4 + [2] * 4, list(range(12)) + [0, 1, 2, 3, 4, 5, 6, 7])]
    barren = 0
    for groups, items in designs:
        for seed in range(6):
            order, queues = _rotation_from_api(groups, seed)
            for B, gpb in ((4, 2), (3, 2), (4, 3), (3, 1)):
                want, events = _ref_grouped(order, queues, items, B, gpb)
                barren += events
                got = list(GroupedBatchSampler(groups, items, B, groups_per_batch=gpb, seed=seed))
                assert got == want, (seed, B, gpb)
    assert barren > 0              # a group that gave nothing was passed over with others still unvisited

# ------------------------------------------------------------------------------ batch plans

def test_random_batches_are_full_consecutive_slices_of_the_epoch_permutation():
    plan = RandomBatches(10, 4, seed=3)
    for epoch in (0, 1):
        plan.epoch, plan.start = epoch, 0
        perm = torch.randperm(10, generator=torch.Generator().manual_seed(3 + epoch)).tolist()
        got = list(plan)
        assert len(plan) == plan.epoch_length(epoch) == 2
        assert got == [[(epoch, i) for i in perm[:4]], [(epoch, i) for i in perm[4:8]]]   # 2 left out
    plan.start = 1
    assert len(plan) == 1 and [b[0][1] for b in plan] == [perm[4]]


def test_rank_slices_are_contiguous_and_concatenate_to_the_global_batch():
    plan = RandomBatches(12, 6, seed=0)
    full = list(plan)
    shares = [list(RankSlice(plan, r, 3, 6)) for r in range(3)]
    for k, batch in enumerate(full):
        assert [shares[r][k] for r in range(3)] == [batch[0:2], batch[2:4], batch[4:6]]


def _pair_dataset(n: int) -> PairDataset:
    samples = [Sample(key=f"s{i}", load_image=lambda: None, captions=[f"c{i}"], item_id=i) for i in range(n)]
    return PairDataset(samples, transform=None, train=False)


def test_semi_hard_plan_started_at_the_epoch_end_yields_nothing():
    cfg = DataConfig(sampler="semi_hard", batch_size=4, seed=0)
    plan = SemiHardBatches(_pair_dataset(10), cfg)
    plan.epoch, plan.start = 0, 0
    full = list(plan)
    assert len(full) == 2 and all(len(b) == 4 and b[0][0] == 0 for b in full)
    plan.epoch, plan.start = 0, 2                                  # resumed exactly at the end
    assert list(plan) == []
    plan.epoch, plan.start = 0, 1
    assert list(plan) == full[1:]


def test_grouped_plan_started_at_the_epoch_end_yields_nothing():
    samples = [Sample(key=f"s{i}", load_image=lambda: None, captions=[f"c{i}"], item_id=i,
                      category="ab"[i % 2]) for i in range(16)]
    cfg = DataConfig(sampler="grouped", group_by="category", batch_size=4, seed=0)
    plan = GroupedBatches(PairDataset(samples, transform=None, train=False), cfg)
    full = list(plan)
    assert len(full) == plan.epoch_length(0) == 4 and all(b[0][0] == 0 for b in full)
    plan.start = 4                                                  # resumed exactly at the end
    assert len(plan) == 0 and list(plan) == []
    plan.start = 1
    assert list(plan) == full[1:]
