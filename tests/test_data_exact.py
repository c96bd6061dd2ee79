"""Exact data-pipeline rules, with values worked out from the definitions: ``apply_fraction`` (first
``ceil(f * N)`` of a seeded permutation, kept in order; streams keep ``Skipped`` markers),
``PairDataset`` (one entry per caption, caption-less samples give one "" entry, augmentation seeded by
(seed, epoch, index)), ``collate_items`` (two views, skip tuples), ``unique_images`` /
``collect_captions`` / ``iter_eval_images``, ``TrainLoader`` edge cases (split exactly one batch, resume
at an epoch end, the list of every rank's state, all-skipped batches handing their skips on, stream
slot bookkeeping), ``StreamBatches`` (shuffle buffer, slice resume, caption draw, resample limits
and ids), ``stream_mode`` flags, and ``SkipLog`` counting / example limits."""
from __future__ import annotations

import hashlib
import random

import pytest
import torch

from finealign.config import DataConfig
from finealign.data.loader import (FractionStream, PairDataset, Skipped, TrainLoader, apply_fraction,
                                   collate_items, collect_captions, iter_eval_images, unique_images)
from finealign.data.skips import SkipLog
from finealign.data.sources.common import load_item, sample_seed
from finealign.data.sources.webdataset_source import build_webdataset, write_shards
from finealign.data.streaming import StreamBatches, _shuffled, stream_mode
from finealign.data.tokenizer import Tokenizer
from finealign.data.transforms import ImageTransform
from finealign.types import Sample
from test_sharding import Pattern      # picklable deterministic 10x10 image whose colours depend on i

pytestmark = pytest.mark.usefixtures("one_thread")
S = 8



class Missing:
    """An image that cannot be loaded (a "missing file" skip)."""

    def __call__(self):
        raise FileNotFoundError("gone")


def sample(i: int, caps=None, bad: bool = False) -> Sample:
    caps = [f"image {i} caption {c}" for c in range(1)] if caps is None else caps
    return Sample(key=f"img{i}", load_image=Missing() if bad else Pattern(i), image_id=i, item_id=i,
                  captions=caps)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([f"image {i} caption {c}" for i in range(30) for c in range(2)], 300)


def _cfg(**kw) -> DataConfig:
    return DataConfig(**{"batch_size": 2, "seed": 3, "workers": 0, "augment": False, **kw})


# ------------------------------------------------------------------------------ fraction

def test_map_style_fraction_is_the_sorted_ceil_prefix_of_the_seeded_permutation():
    src = [f"s{i}" for i in range(10)]
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(7)).tolist()
    want = [src[i] for i in sorted(perm[:3])]            # ceil(0.25 * 10) = 3
    assert apply_fraction(src, 0.25, 7) == want
    assert apply_fraction(src, 1.0, 7) is src


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, xs):
        super().__init__()
        self.xs = xs

    def iter_with_skips(self):
        return iter(self.xs)

    def __iter__(self):
        return (x for x in self.xs if not isinstance(x, Skipped))


def test_fraction_stream_keeps_skip_markers_and_the_hash_rule():
    xs = [sample(i) for i in range(40)]
    marks = [Skipped("corrupt image", f"bad{k}") for k in range(8)]
    for k, m in enumerate(marks):
        xs.insert(5 * k, m)
    fs = FractionStream(_Stream(xs), 0.3, 11)

    def keep(k):
        h = hashlib.blake2b(f"11:{k}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") / 2.0 ** 64 < 0.3
    want = [s.key for s in xs if not isinstance(s, Skipped) and keep(s.key)]
    assert 3 < len(want) < 30 and not all(keep(m.key) for m in marks)
    got = list(fs.iter_with_skips())
    assert [x for x in got if isinstance(x, Skipped)] == marks      # markers always pass
    assert [s.key for s in got if not isinstance(s, Skipped)] == want == [s.key for s in fs]


# ------------------------------------------------------------------------------ PairDataset, collation

def test_pair_dataset_entries_and_caption_less_samples():
    ds = PairDataset([sample(0, ["a0", "a1"]), sample(1, []), sample(2, ["c0"])], None, train=False)
    assert len(ds) == 4
    assert [ds.pair(i) for i in range(4)] == [(0, "a0"), (0, "a1"), (1, ""), (2, "c0")]


def test_pair_dataset_augmentation_seeded_by_seed_epoch_and_index():
    t = ImageTransform(S, train=True, augment=True)
    s = sample(4, ["x", "y"])
    ds = PairDataset([sample(0), s], t, train=True, seed=5)
    for epoch in (0, 1):
        want = load_item(s, "y", t, random.Random(sample_seed(5, epoch, 2)))
        assert torch.equal(ds[(epoch, 2)]["image"], want["image"])
    assert not torch.equal(ds[(0, 2)]["image"], ds[(1, 2)]["image"])
    assert torch.equal(ds[2]["image"], ds[(0, 2)]["image"])


def test_collate_two_views_and_skip_tuples():
    ds = PairDataset([sample(0), sample(1)], ImageTransform(S, train=False), train=False)
    a, b = ds[0], ds[1]
    pa, pb = dict(a, image=(a["image"], a["image"] + 1)), dict(b, image=(b["image"], b["image"] + 2))
    out = collate_items([pa, Skipped("missing file", "k9"), pb])
    assert torch.equal(out["images"], torch.stack([a["image"], b["image"]]))
    assert torch.equal(out["images2"], torch.stack([a["image"] + 1, b["image"] + 2]))
    assert out["skipped"] == [("missing file", "k9")] and out["item_ids"].tolist() == [0, 1]
    assert collate_items([a])["images2"] is None


# ------------------------------------------------------------------------------ eval helpers

def test_unique_images_merge_and_collect_captions_drop_blank_ones():
    s1, s2, s3 = sample(0, ["  a   b "]), sample(1, ["", "   "]), sample(0, ["c"])
    u = unique_images([s1, s2, s3])
    assert [x.key for x in u] == ["img0", "img1"] and u[0].captions == ["  a   b ", "c"]
    texts, owner = collect_captions([s1, s2, s3])
    assert texts == ["a b", "c"] and owner.tolist() == [0, 0]


def test_iter_eval_images_reports_skips_by_reason():
    skips = SkipLog()
    out = list(iter_eval_images([sample(0), sample(1, bad=True), sample(2)],
                                ImageTransform(S, train=False), batch_size=2, skips=skips))
    assert [[s.key for s in ss] for _, ss in out] == [["img0"], ["img2"]]
    assert dict(skips.counts) == {"missing file": 1} and skips.samples == {"missing file": ["img1"]}


# ------------------------------------------------------------------------------ TrainLoader

def test_split_of_exactly_one_batch_and_resume_at_an_epoch_end(tok):
    one = TrainLoader([sample(0), sample(1)], tok, _cfg(), S, 16)
    assert one.batches_per_epoch == 1 and len(next(one)) == 2 and len(next(one)) == 2
    assert one.state_dict() == {"epoch": 1, "position": 1}
    ref = TrainLoader([sample(i) for i in range(6)], tok, _cfg(), S, 16)
    want = [next(ref).captions for _ in range(5)]        # 3 batches / epoch
    res = TrainLoader([sample(i) for i in range(6)], tok, _cfg(), S, 16)
    res.load_state_dict({"epoch": 0, "position": 3})     # the whole epoch was consumed
    assert next(res).captions == want[3] and res.epoch == 1


def test_load_state_takes_this_ranks_entry(tok):
    r1 = TrainLoader([sample(i) for i in range(8)], tok, _cfg(batch_size=4), S, 16, rank=1, world_size=2)
    r1.load_state_dict([{"epoch": 0, "position": 0}, {"epoch": 0, "position": 1}])
    assert r1.state_dict() == {"epoch": 0, "position": 1}
    ref = TrainLoader([sample(i) for i in range(8)], tok, _cfg(batch_size=4), S, 16)
    next(ref)
    assert next(r1).captions == next(ref).captions[2:]


def test_skips_of_an_all_skipped_batch_ride_with_the_next_batch(tok):
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(3)).tolist()
    bad = set(perm[:2])                                   # epoch 0's first batch: all bad
    loader = TrainLoader([sample(i, bad=i in bad) for i in range(4)], tok, _cfg(), S, 16)
    b = next(loader)
    assert b.captions == [f"image {i} caption 0" for i in perm[2:]]
    assert b.skipped == [("missing file", f"img{i}") for i in perm[:2]]
    assert loader.skips.counts["missing file"] == 2 and loader.state_dict()["position"] == 2


# ------------------------------------------------------------------------------ streams

def _wds(tmp_path, n: int, per: int, caps: int = 1, **kw):
    write_shards([sample(i, [f"image {i} caption {c}" for c in range(caps)]) for i in range(n)],
                 str(tmp_path / "tr-%03d.tar"), maxcount=per)
    c = _cfg(source="webdataset", root=str(tmp_path), train="tr-*.tar", **kw)
    return build_webdataset(c, "train", SkipLog()), c


def test_stream_mode_flags(tmp_path):
    src, c = _wds(tmp_path, 4, 1)
    assert stream_mode(src, c, 1, 0) == "slice"           # auto, one process: no split
    c.shard_split = "true"
    assert stream_mode(src, c, 1, 0) == "split"
    c.shard_split = "FALSE"
    assert stream_mode(src, c, 2, 0) == "slice"


def test_shuffle_buffer_flushes_in_seeded_shuffled_order():
    want = list(range(6))
    random.Random(1).shuffle(want)
    assert list(_shuffled(iter(range(6)), random.Random(1), 10)) == want
    assert list(_shuffled(iter(range(6)), random.Random(1), 1)) == list(range(6))


def test_slice_stream_worker_batches_caption_draw_and_resume(tmp_path):
    src, _ = _wds(tmp_path, 8, 8, caps=3)
    sb = StreamBatches(src, None, 2, 4, shuffle_buffer=1, strict=False)
    sb.transform = ImageTransform(S, train=False)
    caps = [[x["caption"] for x in b] for b in sb._slice(0, 1)]
    want = [f"image {p} caption {random.Random(sample_seed(4, 0, p)).randrange(3)}" for p in range(8)]
    assert caps == [want[0:2], want[2:4], want[4:6], want[6:8]]
    sb.start = 1                                           # resume at global batch 1, two workers
    assert [[x["caption"] for x in b] for b in sb._slice(0, 2)] == [want[2:4], want[6:8]]
    assert [[x["caption"] for x in b] for b in sb._slice(1, 2)] == [want[4:6]]


def test_resample_slot_limit_and_distinct_ids(tmp_path):
    src, _ = _wds(tmp_path, 2, 2)                          # one shard of two samples
    sb = StreamBatches(src, ImageTransform(S, train=False), 2, 0, shuffle_buffer=1, strict=False,
                       mode="resample", epoch_batches=5)
    batches = list(sb._slot(0, 1))
    assert len(batches) == 5 and all(j == 0 for j, _ in batches)
    ids = [x["image_id"] for _, b in batches for x in b]
    assert ids == list(range(10))                          # redraws of the shard get new ids
    sb.skip = [2]
    assert len(list(sb._slot(0, 1))) == 3


def test_foreign_stream_state_rotates_round_robin(tok, tmp_path):
    src, c = _wds(tmp_path, 4, 1, resample=True, epoch_batches=6, workers=2)
    loader = TrainLoader(src, tok, c, S, 16, shuffle_buffer=1)
    assert loader.batches_per_epoch == 6
    loader.load_state_dict({"epoch": 0, "position": 3})   # no "stream" entry: another layout
    assert loader.state_dict()["stream"] == {"rank": 0, "world_size": 1, "workers": 2,
                                             "consumed": [2, 1], "next": 1}


# ------------------------------------------------------------------------------ SkipLog

def test_skiplog_examples_are_capped_and_updates_add_counts():
    a = SkipLog(examples=2)
    for k in range(4):
        a.skip("corrupt image", f"k{k}")
        a.note("caption cut", f"n{k}")
    assert a.counts["corrupt image"] == 4 and a.samples["corrupt image"] == ["k0", "k1"]
    assert a.notes["caption cut"] == 4 and a.note_samples["caption cut"] == ["n0", "n1"]
    b = SkipLog(examples=3)
    b.update(a)
    assert b.counts["corrupt image"] == 4 and b.notes["caption cut"] == 4 and b.total == 4
    b.update([("missing file", "x"), ("missing file", "y"), ("empty caption", "z")])
    assert b.counts == {"corrupt image": 4, "missing file": 2, "empty caption": 1}
    assert b.samples["missing file"] == ["x", "y"]


# ------------------------------------------------------------------------------ semi-hard sampler

def _gram_embeddings(pairs: dict, n: int = 6, default: float = 0.1) -> torch.Tensor:
    """(n, n) unit rows whose dot products are ``pairs[(i, j)]`` (``default`` elsewhere)."""
    g = torch.full((n, n), default, dtype=torch.float64)
    g.fill_diagonal_(1.0)
    for (i, j), v in pairs.items():
        g[i, j] = g[j, i] = v
    return torch.linalg.cholesky(g).float()


def _first_batch(x: torch.Tensor, **kw) -> list[int]:
    from finealign.data.samplers import SemiHardBatchSampler
    assert torch.randperm(6, generator=torch.Generator().manual_seed(2)).tolist() == [0, 3, 1, 2, 4, 5]
    return next(iter(SemiHardBatchSampler(x, list(range(6)), 3, seed=2, **kw)))


def test_semi_hard_growth_checks_every_member_against_the_band_top():
    # seed 0; in band: 1 (0.8), 2 (0.7), 3 (0.5); 1 and 2 are 0.93 apart (> band top 0.9, < upper)
    x = _gram_embeddings({(0, 1): 0.8, (0, 2): 0.7, (1, 2): 0.93, (0, 3): 0.5, (1, 3): 0.4, (2, 3): 0.4})
    assert _first_batch(x) == [0, 1, 3]


def test_semi_hard_fill_applies_upper_to_every_member():
    # nothing in band around seed 0: the batch is filled in permutation order 3, 1, 2, ...
    assert _first_batch(_gram_embeddings({(3, 1): 0.92})) == [0, 3, 1]     # 0.92 <= upper: allowed
    assert _first_batch(_gram_embeddings({(3, 1): 0.97})) == [0, 3, 2]     # near-duplicate of 3


def test_semi_hard_epoch_end_releases_a_partial_rank_group():
    from finealign.data.samplers import SemiHardBatchSampler
    s = SemiHardBatchSampler(None, list(range(10)), 3, num_replicas=2, rank=0)
    assert len(list(s)) == 1                               # groups of 2 batches: only one fits 10
    assert s.epoch_stats(0) == {"batches": 2, "placed": 6, "complete": True, "left_out": 4}


def test_set_epoch_of_the_current_epoch_keeps_the_position():
    from finealign.data.samplers import GroupedBatchSampler
    g = GroupedBatchSampler([i % 2 for i in range(12)], list(range(12)), 2)
    g.load_state_dict({"epoch": 1, "position": 2})
    g.set_epoch(1)
    assert g.state_dict() == {"epoch": 1, "position": 2}
    g.set_epoch(2)
    assert g.state_dict() == {"epoch": 2, "position": 0}
    ref = GroupedBatchSampler([i % 2 for i in range(12)], list(range(12)), 2)
    n0 = len(list(ref))                                    # epoch 0; the sampler moves on to 1
    g.load_state_dict({"epoch": 0, "position": n0})        # resumed exactly at epoch 0's end
    assert list(g) == list(ref) and g.state_dict() == {"epoch": 2, "position": 0}


class _Stop(BaseException):
    """Escapes ``load_item``'s skip handling: a loader that never gives up fails the test."""


class _Flaky:
    """Loads on the first ``ok`` calls, then is a missing file; after 40 calls stops the test."""

    def __init__(self, i: int, ok: int, calls: list):
        self.i, self.ok, self.calls = i, ok, calls

    def __call__(self):
        self.calls.append(self.i)
        if len(self.calls) > 40:
            raise _Stop()
        if len(self.calls) > self.ok:
            raise FileNotFoundError("gone")
        return Pattern(self.i)()


def test_a_later_epoch_without_usable_samples_is_an_error(tok):
    calls: list = []
    samples = [Sample(key=f"img{i}", load_image=_Flaky(i, 2, calls), captions=[f"image {i} caption 0"])
               for i in range(2)]
    loader = TrainLoader(samples, tok, _cfg(), S, 16)
    assert len(next(loader)) == 2                          # epoch 0 is fine
    with pytest.raises(ValueError, match="no usable sample"):
        next(loader)                                       # epoch 1: both images are gone
    assert dict(loader.skips.counts) == {"missing file": 2}


def test_semi_hard_plan_resumed_at_its_end_keeps_the_embeddings():
    from finealign.data.batching import SemiHardBatches
    ds = PairDataset([Sample(key=f"s{i}", load_image=None, captions=[f"c{i}"], item_id=i)
                      for i in range(12)], None, train=False)
    plan = SemiHardBatches(ds, DataConfig(sampler="semi_hard", batch_size=4, seed=0))
    plan.update(0, 0, torch.randn(12, 8, generator=torch.Generator().manual_seed(0)))
    plan.epoch, plan.start = 0, 0
    k = len(list(plan))
    assert k >= 1 and plan.embeddings is not None
    plan.epoch, plan.start = 0, k
    assert list(plan) == [] and plan.dropped == 0 and plan.embeddings is not None


def test_semi_hard_plan_drops_unusable_embeddings_at_update_and_checks_state_kind():
    from finealign.data.batching import SemiHardBatches
    ds = PairDataset([Sample(key=f"s{i}", load_image=None, captions=[f"c{i}"], item_id=i)
                      for i in range(8)], None, train=False)
    plan = SemiHardBatches(ds, DataConfig(sampler="semi_hard", batch_size=4, seed=0))
    plan.update(0, 0, torch.ones(8, 3))                    # all near-duplicates: no batch can form
    assert plan.embeddings is None and plan.dropped == 1
    with pytest.raises(ValueError, match="'grouped' sampler"):
        plan.load_state(0, 1, {"kind": "grouped", "used": torch.zeros(8, dtype=torch.bool)})


def test_grouped_batches_visit_groups_in_the_seeded_rotation():
    from finealign.data.samplers import GroupedBatchSampler
    groups = [i % 4 for i in range(8)]                     # 4 groups of 2; batch 2, one group each
    g = torch.Generator().manual_seed(5 + 1)
    perm = torch.randperm(8, generator=g).tolist()
    order = torch.randperm(4, generator=g).tolist()
    assert order != sorted(order)
    s = GroupedBatchSampler(groups, list(range(8)), 2, groups_per_batch=1, seed=5)
    s.set_epoch(1)
    want = [[i for i in perm if groups[i] == gq] for gq in order]
    assert list(s) == want


def test_semi_hard_examines_up_to_eight_batches_of_candidates():
    # in band around seed 0, nearest first: 1, 2, 3, 4; 2 and 3 are within 0.93 of 1 (> band top)
    x = _gram_embeddings({(0, 1): 0.6, (0, 2): 0.55, (0, 3): 0.5, (0, 4): 0.45, (1, 2): 0.93,
                          (1, 3): 0.93, (2, 3): 0.9})
    assert _first_batch(x) == [0, 1, 4]                     # default: 8 * 3 candidates
    assert _first_batch(x, candidates=3) == [0, 1, 3]       # 4 not examined: filled in order


def test_a_batch_needs_as_many_distinct_items_as_rows():
    from finealign.data.samplers import GroupedBatchSampler
    with pytest.raises(ValueError, match="only 2 distinct item_ids"):
        GroupedBatchSampler([0] * 8, [0, 1] * 4, 3)
    assert len(list(GroupedBatchSampler([0] * 8, [0, 1, 2, 3] * 2, 4))) == 2
