"""data.views=2: a second, independently augmented view of every training image (Batch.images2)."""
from __future__ import annotations

import pickle

import pytest
import torch

from finealign.config import DataConfig
from finealign.data.loader import TrainLoader, build_source
from finealign.data.skips import SkipLog
from finealign.data.sources.webdataset_source import build_webdataset, write_shards
from finealign.data.tokenizer import Tokenizer
from finealign.data.transforms import ImageTransform, TwoViewTransform

S = 16


def _cfg(**kw) -> DataConfig:
    base = dict(source="shapes", num_samples=12, batch_size=4, seed=3, workers=0, augment=True, views=2)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    cfg = _cfg()
    return Tokenizer.train([c for s in build_source(cfg, "train", SkipLog()) for c in s.captions], 300)


def _loader(tok, **kw) -> TrainLoader:
    cfg = _cfg(**kw)
    return TrainLoader(build_source(cfg, "train", SkipLog()), tok, cfg, S, 16)


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def test_two_views_shape_differ_and_reproducible(tok):
    a, b = _take(_loader(tok), 4), _take(_loader(tok), 4)      # 12 pairs -> 3 batches/epoch
    for x, y in zip(a, b):
        assert x.images2 is not None and x.images2.shape == x.images.shape == (4, 3, S, S)
        assert x.images2.dtype == x.images.dtype
        assert torch.equal(x.images, y.images) and torch.equal(x.images2, y.images2)
        # every row: the second view is a different draw of the same image
        assert all(not torch.equal(x.images[i], x.images2[i]) for i in range(len(x)))
    assert not torch.equal(a[0].images2, a[3].images2)          # a new draw in the next epoch too
    other = _take(_loader(tok, seed=4), 1)[0]
    assert not torch.equal(other.images2, a[0].images2)


def test_view_one_equals_single_view_batch(tok):
    two, one = _take(_loader(tok), 3), _take(_loader(tok, views=1), 3)
    for x, y in zip(two, one):
        assert y.images2 is None
        assert x.captions == y.captions and torch.equal(x.images, y.images)


@pytest.mark.parametrize("k", [1, 4])
def test_resume_yields_same_images2(tok, k):
    ref = _take(_loader(tok), 7)
    first = _loader(tok)
    _take(first, k)
    resumed = _loader(tok)
    resumed.load_state_dict(first.state_dict())
    for x, y in zip(_take(resumed, 7 - k), ref[k:]):
        assert torch.equal(x.images, y.images) and torch.equal(x.images2, y.images2)


def test_views_one_has_no_images2(tok):
    assert all(b.images2 is None for b in _take(_loader(tok, views=1), 2))


def test_no_augmentation_views_equal(tok):
    for b in _take(_loader(tok, augment=False), 2):
        assert b.images2 is not None and torch.equal(b.images, b.images2)


def test_bad_views_rejected(tok):
    with pytest.raises(ValueError, match="views"):
        _loader(tok, views=3)


def test_two_view_transform_picklable_and_seeded():
    from PIL import Image
    img = Image.new("RGB", (20, 14), (10, 200, 30))
    img.putpixel((3, 3), (255, 0, 0))
    t = pickle.loads(pickle.dumps(TwoViewTransform(ImageTransform(S, train=True))))
    v1, v2 = t(img, 7)
    w1, w2 = t(img, 7)
    assert torch.equal(v1, w1) and torch.equal(v2, w2) and not torch.equal(v1, v2)
    assert torch.equal(v1, ImageTransform(S, train=True)(img, 7))   # view 1 = the single-view image


def test_streaming_two_views_resume(tok, tmp_path):
    write_shards(list(build_source(_cfg(), "train", SkipLog())), str(tmp_path / "tr-%03d.tar"), maxcount=5)

    def loader():
        c = _cfg(batch_size=3, source="webdataset", root=str(tmp_path), train="tr-{000..002}.tar")
        return TrainLoader(build_webdataset(c, "train", SkipLog()), tok, c, S, 16, shuffle_buffer=4)
    ref = _take(loader(), 5)
    assert all(b.images2 is not None and b.images2.shape == b.images.shape for b in ref)
    assert not torch.equal(ref[0].images, ref[0].images2)
    first = loader()
    _take(first, 2)
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    for x, y in zip(_take(resumed, 3), ref[2:]):
        assert torch.equal(x.images2, y.images2)
