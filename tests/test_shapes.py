"""The procedural ``shapes`` / ``shapes-items`` sources: determinism, regions, captions, multi-view items."""
from __future__ import annotations

import numpy as np
import pytest

from finealign.config import DataConfig
from finealign.data.skips import SkipLog
from finealign.data.sources import shapes
from finealign.registry import SOURCES


def _ds(split="train", seed=0, n=0, source="shapes"):
    cfg = DataConfig(source=source, seed=seed, num_samples=n)
    return SOURCES.get(source)(cfg, split, SkipLog())


def _pixels(sample) -> np.ndarray:
    img = sample.load_image()
    assert img.mode == "RGB" and img.size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
    return np.asarray(img)


def test_registered_and_default_sizes():
    assert "shapes" in SOURCES and "shapes-items" in SOURCES
    assert len(_ds("train")) == 5000
    assert len(_ds("val")) == 500 and len(_ds("test")) == 500
    assert len(_ds("train", n=37)) == 37
    items = _ds("train", n=40, source="shapes-items")
    assert len(items) == 39  # rounded down to whole items of VIEWS images
    with pytest.raises(IndexError):
        _ds("val", n=5)[5]


def test_deterministic_per_seed_split_index():
    a, b = _ds("train", n=50), _ds("train", n=50)
    for i in (0, 7, 49):
        assert a[i].captions == b[i].captions
        assert np.array_equal(_pixels(a[i]), _pixels(b[i]))
        assert np.array_equal(_pixels(a[i]), _pixels(a[i]))  # load_image is repeatable
    val, other_seed = _ds("val", n=50), _ds("train", seed=1, n=50)
    for other in (val, other_seed):
        diff = sum(a[i].captions != other[i].captions or not np.array_equal(_pixels(a[i]), _pixels(other[i]))
                   for i in range(20))
        assert diff == 20


def _check_regions(sample) -> None:
    px = _pixels(sample).astype(int)
    cap = sample.captions[0]
    assert sample.regions, "at least one object is described"
    for r in sample.regions:
        x0, y0, x1, y1 = r.box
        assert 0 <= x0 < x1 <= shapes.IMAGE_SIZE and 0 <= y0 < y1 <= shapes.IMAGE_SIZE
        assert r.phrase in cap
        size, colour, shape = r.phrase.split()
        assert size in shapes.SIZES and colour in shapes.COLOURS and shape in shapes.SHAPES
        patch = px[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))]
        hits = (np.abs(patch - np.array(shapes.COLOURS[colour])).sum(-1) == 0).sum()
        assert hits >= 8, f"{sample.key}: box of {r.phrase!r} holds {hits} {colour} pixels"


@pytest.mark.parametrize("source", ["shapes", "shapes-items"])
def test_regions_inside_image_and_cover_their_colour(source):
    ds = _ds("train", n=300, source=source)
    for i in range(len(ds)):
        _check_regions(ds[i])


def test_caption_and_labels():
    ds = _ds("train", n=600)
    caps = []
    for i in range(len(ds)):
        s = ds[i]
        assert s.image_id == i and s.item_id == i and s.captions[0] == s.captions[0].lower()
        assert s.label in shapes.SHAPES and s.category == s.label
        # the primary (label) object is always described
        assert any(r.phrase.endswith(s.label) for r in s.regions)
        caps.append(s.captions[0])
    assert len(set(caps)) > 0.9 * len(caps), "captions should be varied"
    n_regions = [len(ds[i].regions) for i in range(len(ds))]
    assert {1, 2, 3} <= set(n_regions)


def test_items_share_caption_and_item_id():
    ds = _ds("train", n=90, source="shapes-items")
    hidden = 0
    for item in range(len(ds) // shapes.VIEWS):
        views = [ds[item * shapes.VIEWS + v] for v in range(shapes.VIEWS)]
        assert len({tuple(s.captions) for s in views}) == 1
        assert {s.item_id for s in views} == {item}
        assert [s.image_id for s in views] == [item * shapes.VIEWS + v for v in range(shapes.VIEWS)]
        pix = [_pixels(s) for s in views]
        assert not np.array_equal(pix[0], pix[1]) and not np.array_equal(pix[0], pix[2])
        hidden += sum(len(s.regions) < len(views[0].regions) for s in views[1:])
    assert hidden > 0, "some views hide a described object"
    # view 0 of an item is the scene of the plain source at that index
    plain = _ds("train", n=30)
    assert plain[4].captions == ds[4 * shapes.VIEWS].captions
    assert np.array_equal(_pixels(plain[4]), _pixels(ds[4 * shapes.VIEWS]))
