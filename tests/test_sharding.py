"""Data for several ranks: map-style rank slices, shards split by (rank, worker), resampling, the
too-few-shards error, exact resume, and ``finealign data shard``. Ranks are simulated in one process
(one loader per rank); the epoch-end agreement runs two ranks in threads."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from finealign.cli import main
from finealign.config import ConfigError, DataConfig, load_config
from finealign.data.loader import TrainLoader, build_source
from finealign.data.skips import SkipLog
from finealign.data.sources.webdataset_source import build_webdataset, write_shards
from finealign.data.streaming import epoch_shards
from finealign.data.tokenizer import Tokenizer
from finealign.types import Sample

S = 8


class Pattern:
    """Picklable deterministic image whose colours depend on ``i``."""

    def __init__(self, i: int):
        self.i = i

    def __call__(self):
        y, x = np.mgrid[0:10, 0:10]
        return Image.fromarray(np.stack([(x * 20 + self.i * 7) % 256, (y * 15 + self.i * 13) % 256,
                                         np.full_like(x, (self.i * 31) % 256)], -1).astype(np.uint8))


def make_samples(n: int, caps: int = 1) -> list[Sample]:
    return [Sample(key=f"img{i}", load_image=Pattern(i), image_id=i, item_id=i, category=f"g{i % 3}",
                   captions=[f"image {i} caption {c}" for c in range(caps)]) for i in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([f"image {i} caption {c}" for i in range(40) for c in range(2)], 300)


def _cfg(**kw) -> DataConfig:
    return DataConfig(**{"batch_size": 4, "seed": 3, "workers": 0, "augment": True, **kw})


def _ids(batch) -> list[int]:
    return [int(c.split()[1]) for c in batch.captions]


def _epoch(loader, epoch: int = 0) -> list:
    """The batches of ``epoch`` (the loader is endless: stop at the first batch of the next one)."""
    out = []
    while True:
        b = next(loader)
        if loader.epoch != epoch:
            return out
        out.append(b)


# ------------------------------------------------------------------------------ map-style sources

@pytest.mark.parametrize("sampler", ["random", "grouped"])
def test_map_style_rank_slices_concatenate_to_the_global_batch(tok, sampler):
    samples = make_samples(20, caps=2)                 # 40 pairs, global batch 8 -> 5 batches / epoch
    kw = dict(batch_size=8, sampler=sampler, group_by="category")
    ref = TrainLoader(samples, tok, _cfg(**kw), S, 16)
    ranks = [TrainLoader(samples, tok, _cfg(**kw), S, 16, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == ref.batches_per_epoch
    n = ref.batches_per_epoch + 3                      # crosses an epoch boundary
    for _ in range(n):
        g, parts = next(ref), [next(r) for r in ranks]
        assert [len(p) for p in parts] == [4, 4]
        assert not set(parts[0].captions) & set(parts[1].captions)          # disjoint shares
        assert parts[0].captions + parts[1].captions == g.captions
        assert torch.equal(torch.cat([p.images for p in parts]), g.images)
        assert torch.equal(torch.cat([p.text for p in parts]), g.text)
    assert [r.state_dict() for r in ranks] == [ref.state_dict()] * 2


def test_semi_hard_rank_slices_with_shared_embeddings(tok):
    cfg = load_config("clip", ["data.source=shapes", "data.num_samples=48", "data.batch_size=8",
                               "data.sampler=semi_hard", "data.augment=false"]).data
    src = build_source(cfg, "train", SkipLog())
    ref = TrainLoader(src, tok, cfg, S, 16)
    ranks = [TrainLoader(src, tok, cfg, S, 16, rank=r, world_size=2) for r in range(2)]
    emb = torch.randn(len(ref.dataset), 16, generator=torch.Generator().manual_seed(0))
    for x in [ref, *ranks]:
        next(x)
        x.update_embeddings(emb)                       # the same (whole-set) embeddings on every rank
    for _ in range(4):
        g, parts = next(ref), [next(r) for r in ranks]
        assert parts[0].keys + parts[1].keys == g.keys


def test_global_batch_must_divide_by_world_size(tok):
    with pytest.raises(ValueError, match="divisible by the world size 3"):
        TrainLoader(make_samples(20), tok, _cfg(batch_size=8), S, 16, rank=0, world_size=3)


# ------------------------------------------------------------------------------ webdataset shards

def _shards(tmp_path, n: int, per: int) -> DataConfig:
    write_shards(make_samples(n), str(tmp_path / "tr-%03d.tar"), maxcount=per)
    return _cfg(source="webdataset", root=str(tmp_path), train="tr-*.tar")


def _wds(tok, c: DataConfig, **kw) -> TrainLoader:
    return TrainLoader(build_webdataset(c, "train", SkipLog()), tok, c, S, 16, shuffle_buffer=4, **kw)


def test_split_shards_consume_every_sample_once(tok, tmp_path):
    c = _shards(tmp_path, 24, 6)                      # 4 shards x 6 samples
    c.workers = 2                                     # 2 ranks x 2 workers = 4 slots, 1 shard each
    seen, shards_of = [], []
    for r in range(2):
        loader = _wds(tok, c, rank=r, world_size=2)
        assert loader.stream_mode == "split" and loader.batches_per_epoch is None
        batches = _epoch(loader)
        assert all(len(b) == 2 for b in batches) and len(batches) == 6   # 2 slots x 3 batches of 2
        seen += [i for b in batches for i in _ids(b)]
        shards_of.append({k.split(":")[0] for b in batches for k in b.keys})
        loader.close()
    assert sorted(seen) == list(range(24))            # no overlap, no loss
    assert len(shards_of[0]) == len(shards_of[1]) == 2 and not shards_of[0] & shards_of[1]
    shards = sorted(str(p) for p in tmp_path.glob("tr-*.tar"))
    assert epoch_shards(shards, 3, 0) != epoch_shards(shards, 3, 1)     # a new deal every epoch
    assert sorted(epoch_shards(shards, 3, 1)) == shards


def test_stream_slices_equal_one_process_when_not_split(tok, tmp_path):
    c = _shards(tmp_path, 14, 5)
    one = _wds(tok, c)
    ref = [next(one) for _ in range(5)]               # crosses the end of the 3-batch pass
    c.shard_split = False
    ranks = [_wds(tok, c, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].stream_mode == "slice"
    for g in ref:
        parts = [next(r) for r in ranks]
        assert parts[0].captions + parts[1].captions == g.captions
        assert torch.equal(torch.cat([p.images for p in parts]), g.images)


def test_too_few_shards_is_a_clear_error(tok, tmp_path):
    c = _shards(tmp_path, 12, 4)                      # 3 shards
    c.workers = 2
    with pytest.raises(ValueError, match=r"3 shard\(s\) for 2 rank\(s\) x 2 .*= 4.*--maxcount.*data.workers"
                                         r".*data.resample=true"):
        _wds(tok, c, rank=0, world_size=2)
    c.workers, c.shard_split = 0, True
    assert _wds(tok, c).stream_mode == "split"        # 3 shards for 1 x 1 slot is fine
    c.resample, c.epoch_batches, c.workers = True, 3, 2
    assert _wds(tok, c, rank=1, world_size=2).stream_mode == "resample"  # no starvation when resampling


@pytest.mark.parametrize("k", [3, 9])
def test_split_stream_resumes_exactly_with_uneven_workers(tok, tmp_path, k):
    c = _shards(tmp_path, 20, 6)                      # shards of 6, 6, 6, 2 samples
    c.batch_size, c.shard_split, c.workers = 2, True, 2
    ref_loader = _wds(tok, c)
    ref = [next(ref_loader) for _ in range(13)]       # epoch 0: 10 batches (one worker runs dry first)
    assert ref_loader.state_dict()["epoch"] == 1
    first = _wds(tok, c)
    for _ in range(k):
        next(first)
    state = first.state_dict()
    assert state["stream"]["consumed"] and sum(state["stream"]["consumed"]) == k
    resumed = _wds(tok, c)
    resumed.load_state_dict([state])                  # the list of every rank's state works too
    for g in ref[k:]:
        assert next(resumed).captions == g.captions
    for x in (ref_loader, first, resumed):
        x.close()


def test_agreement_ends_the_epoch_on_every_rank_together(tok, tmp_path):
    c = _shards(tmp_path, 20, 6)                      # 6, 6, 6, 2: the two ranks' shares differ
    c.batch_size, c.shard_split = 4, True
    alone = [len(_epoch(_wds(tok, c, rank=r, world_size=2))) for r in range(2)]
    assert alone[0] != alone[1]
    barrier, votes, log = threading.Barrier(2, timeout=60), [None, None], [[], []]

    def agree_for(r):
        def agree(have: bool) -> bool:
            votes[r] = have
            barrier.wait()
            out = all(votes)
            barrier.wait()
            return out
        return agree

    def run(r):
        loader = _wds(tok, c, rank=r, world_size=2, agree=agree_for(r))
        for _ in range(min(alone) + 3):
            b = next(loader)
            log[r].append((loader.epoch, loader.position, len(b)))
    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [e for e, _, _ in log[0]] == [e for e, _, _ in log[1]]        # lockstep epochs
    assert sum(e == 0 for e, _, _ in log[0]) == min(alone)


def test_resample_is_seeded_endless_and_uses_every_shard(tok, tmp_path):
    c = _shards(tmp_path, 24, 6)
    c.resample, c.epoch_batches, c.workers = True, 5, 2
    a = _wds(tok, c, rank=0, world_size=2)
    assert a.batches_per_epoch == 5
    ra = [next(a) for _ in range(12)]
    assert a.state_dict()["epoch"] == 2 and a.state_dict()["position"] == 2
    assert next(_wds(tok, c, rank=0, world_size=2)).captions == ra[0].captions   # seeded
    r1 = _wds(tok, c, rank=1, world_size=2)
    other = [next(r1) for _ in range(12)]
    assert [b.captions for b in other] != [b.captions for b in ra]      # ranks draw differently
    urls = {k.split(":")[0] for b in ra + other for k in b.keys}
    assert len(urls) == 4                              # draws reach every shard
    resumed = _wds(tok, c, rank=0, world_size=2)
    first = _wds(tok, c, rank=0, world_size=2)
    for _ in range(3):
        next(first)
    resumed.load_state_dict({"epoch": 0, "position": 3})   # no per-slot record: round-robin, exact
    for g in ra[3:8]:
        assert next(resumed).captions == g.captions
    for x in (a, r1, resumed, first):
        x.close()


def test_streaming_config_checks():
    with pytest.raises(ConfigError, match="data.epoch_batches"):
        load_config("clip", ["data.resample=true"])
    with pytest.raises(ConfigError, match="needs data.resample=true"):
        load_config("clip", ["data.epoch_batches=10"])
    with pytest.raises(ConfigError, match="data.shard_split must be auto, true or false"):
        load_config("clip", ["data.shard_split=sometimes"])
    assert load_config("clip", ["data.shard_split=false"]).data.shard_split is False


# ------------------------------------------------------------------------------ finealign data shard

def test_cli_data_shard_writes_shards_any_source_reads_back(tmp_path, capsys):
    out = tmp_path / "sh" / "train-%06d.tar"
    rc = main(["data", "shard", "--source", "shapes", "--split", "train", "--out", str(out),
               "--maxcount", "10", "data.num_samples=25"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "wrote 3 shard(s), 25 sample(s)" in printed and "skipped 0" in printed
    c = DataConfig(source="webdataset", root=str(tmp_path / "sh"), train="train")
    back = list(build_source(c, "train", SkipLog()))
    orig = list(build_source(DataConfig(source="shapes", num_samples=25), "train", SkipLog()))
    assert [s.captions for s in back] == [s.captions for s in orig]
    assert [s.item_id for s in back] == [s.item_id for s in orig]
    assert main(["data", "shard", "--source", "shapez", "--out", str(out)]) == 2     # unknown source
