"""Region boxes follow the image through every transform; the coco source reads instances JSONs."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from finealign.config import DataConfig
from finealign.data.loader import PairDataset, collate_items
from finealign.data.skips import BadSampleError, SkipLog
from finealign.data.sources.coco import build_coco
from finealign.data.sources.common import Skipped, SourceFormatError, load_item
from finealign.data.sources.shapes import IMAGE_SIZE, ShapesDataset
from finealign.data.transforms import (ImageTransform, TwoViewTransform, accepts_boxes,
                                       denormalize, map_box, random_resized_crop_box)
from finealign.types import Region, Sample


def _img(w: int = 200, h: int = 100) -> Image.Image:
    """Grey image with a gradient (so crops differ)."""
    img = Image.new("RGB", (w, h), (128, 128, 128))
    d = ImageDraw.Draw(img)
    for x in range(0, w, 10):
        d.line((x, 0, x, h), fill=(x % 256, 60, 90))
    return img


def _sample(img: Image.Image, regions: list[Region]) -> Sample:
    return Sample(key="k", load_image=lambda: img, captions=["a thing"], image_id=0, item_id=0,
                  regions=regions)


# ------------------------------------------------------------------------------------ map_box

def test_map_box_pure():
    assert map_box((10, 10, 20, 20), (0, 0, 40, 40), 20) == (5.0, 5.0, 10.0, 10.0)
    assert map_box((10, 10, 20, 20), (0, 0, 40, 40), 20, flipped=True) == (10.0, 5.0, 15.0, 10.0)
    assert map_box((-5, 30, 50, 45), (0, 0, 40, 40), 20) == (0.0, 15.0, 20.0, 20.0)   # clipped
    assert map_box((50, 0, 60, 10), (0, 0, 40, 40), 20) is None                      # outside
    assert map_box((40, 0, 60, 10), (0, 0, 40, 40), 20) is None                      # touching edge


# ------------------------------------------------------------------------------------ (a) eval

def test_eval_transform_scales_box_of_non_square_image():
    t = ImageTransform(50, train=False)
    # 200x100 -> center crop (50, 0, 150, 100) -> 50x50: scale 0.5, shift -50 in x
    x, boxes = t(_img(200, 100), None, boxes=[(60, 10, 100, 50), (150, 0, 200, 100)])
    assert x.shape == (3, 50, 50)
    assert boxes[0] == pytest.approx((5.0, 5.0, 25.0, 25.0))
    assert boxes[1] is None                       # (c) entirely in the cropped-away strip
    # partly outside: clipped to the output
    _, (b,) = t(_img(200, 100), None, boxes=[(20, 0, 70, 40)])
    assert b == pytest.approx((0.0, 0.0, 10.0, 20.0))


# ------------------------------------------------------------------------------------ (b) flip

def test_train_transform_hflip_mirrors_box():
    s, seed = 32, 7
    t = ImageTransform(s, train=True, hflip=1.0, jitter=0.0)
    img = _img(120, 90)
    box = (30.0, 20.0, 70.0, 60.0)
    _, (got,) = t(img, random.Random(seed), boxes=[box])
    cx0, cy0, cx1, cy1 = random_resized_crop_box(120, 90, random.Random(seed), t.scale, t.ratio)
    sx, sy = s / (cx1 - cx0), s / (cy1 - cy0)
    nx0, nx1 = (box[0] - cx0) * sx, (box[2] - cx0) * sx
    ny0, ny1 = (box[1] - cy0) * sy, (box[3] - cy0) * sy
    clip = lambda v: min(max(v, 0.0), s)  # noqa: E731
    want = (s - clip(nx1), clip(ny0), s - clip(nx0), clip(ny1))     # x0' = S - x1
    assert got == pytest.approx(want)
    # the unflipped transform gives the mirror image of it
    _, (plain,) = ImageTransform(s, train=True, hflip=0.0, jitter=0.0)(img, random.Random(seed),
                                                                       boxes=[box])
    assert plain == pytest.approx((s - got[2], got[1], s - got[0], got[3]))


# ------------------------------------------------------------------------------------ (c) dropped

def test_box_outside_random_crop_is_none():
    t = ImageTransform(16, train=True, scale=(0.1, 0.1), jitter=0.0)
    img = _img(100, 100)
    for seed in range(20):
        cx0, cy0, cx1, cy1 = random_resized_crop_box(100, 100, random.Random(seed), t.scale, t.ratio)
        far = (0, 0, 1, 1) if cx0 > 1 else (99, 99, 100, 100)
        _, boxes = t(img, random.Random(seed), boxes=[far, (cx0, cy0, cx1, cy1)])
        assert boxes[0] is None
        assert boxes[1] == pytest.approx((0.0, 0.0, 16.0, 16.0))


# ------------------------------------------------------------------------------------ (d) identity

@pytest.mark.parametrize("train", [False, True])
def test_image_identical_with_and_without_boxes(train):
    t = ImageTransform(24, train=train, hflip=0.5)
    img = _img(80, 60)
    for seed in range(5):
        a = t(img, random.Random(seed))
        b, boxes = t(img, random.Random(seed), boxes=[(10, 10, 40, 40)])
        assert torch.equal(a, b) and len(boxes) == 1
    tv = TwoViewTransform(t)
    (v1, v2) = tv(img, random.Random(3))
    (w1, w2), boxes = tv(img, random.Random(3), boxes=[(10, 10, 40, 40)])
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    assert boxes == t(img, random.Random(3), boxes=[(10, 10, 40, 40)])[1]   # boxes follow view 1
    assert accepts_boxes(t) and accepts_boxes(tv)
    assert not accepts_boxes(lambda img, rng: img) and not accepts_boxes(TwoViewTransform(lambda i, r: i))


# ------------------------------------------------------------------------------------ (e) pixels

def _red_bbox(x: torch.Tensor) -> tuple[int, int, int, int] | None:
    """Bounding box (pixel edges) of the clearly red pixels of a normalised (3, S, S) image."""
    rgb = denormalize(x)                                               # (3, S, S) in [0, 1]
    red = (rgb[0] > 0.6) & (rgb[1] < 0.4) & (rgb[2] < 0.4)            # (S, S)
    if not red.any():
        return None
    ys, xs = torch.nonzero(red, as_tuple=True)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.mark.parametrize("hflip", [0.0, 1.0])
def test_transformed_box_covers_red_square(hflip):
    img = Image.new("RGB", (160, 120), (128, 128, 128))
    box = (50, 30, 100, 80)
    ImageDraw.Draw(img).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=(255, 0, 0))
    t = ImageTransform(48, train=True, hflip=hflip, jitter=0.0)
    checked = 0
    for seed in range(12):
        x, (got,) = t(img, random.Random(seed), boxes=[box])
        red = _red_bbox(x)
        if got is None:
            assert red is None
            continue
        assert red is not None
        assert got == pytest.approx(red, abs=1.5)
        checked += 1
    assert checked >= 6


# ------------------------------------------------------------------------------------ (f) load_item

def test_load_item_returns_transformed_regions():
    img = _img(200, 100)
    regions = [Region((60, 10, 100, 50), "left thing"), Region((150, 0, 200, 100), "cut off"),
               Region((90, 20, 130, 60), "middle")]
    s = _sample(img, regions)
    item = load_item(s, "a thing", ImageTransform(50, train=False), None)
    assert [r.phrase for r in item["regions"]] == ["left thing", "middle"]
    assert item["regions"][0].box == pytest.approx((5.0, 5.0, 25.0, 25.0))
    assert item["regions"][1].box == pytest.approx((20.0, 10.0, 40.0, 30.0))
    assert s.regions[0].box == (60, 10, 100, 50)                      # the Sample is untouched
    # two views: regions follow view 1
    two = load_item(s, "a thing", TwoViewTransform(ImageTransform(50, train=False)), None)
    assert isinstance(two["image"], tuple) and two["regions"] == item["regions"]
    # a transform without boxes support: regions pass unchanged (original pixels)
    plain = load_item(s, "a thing", lambda im, rng: torch.zeros(3, 4, 4), None)
    assert plain["regions"] == regions
    # skips stay skips
    assert isinstance(load_item(s, " ", ImageTransform(50, train=False), None), Skipped)
    bad = Sample(key="bad", load_image=lambda: (_ for _ in ()).throw(FileNotFoundError("x")),
                 captions=["c"], regions=regions)
    assert load_item(bad, "c", ImageTransform(50, train=False), None).reason == "missing file"
    with pytest.raises(BadSampleError, match="bad"):
        load_item(bad, "c", ImageTransform(50, train=False), None, strict=True)


def test_batch_regions_in_model_input_pixels():
    s = 32
    ds = PairDataset(ShapesDataset(0, "train", 8), ImageTransform(s, train=True), train=True, seed=1)
    parts = collate_items([ds[(0, i)] for i in range(len(ds))])
    regs = [r for lst in parts["regions"] for r in lst]
    assert regs and all(0 <= r.box[0] < r.box[2] <= s and 0 <= r.box[1] < r.box[3] <= s for r in regs)


# ------------------------------------------------------------------------------------ (h) shapes

def test_shapes_boxes_exact_through_eval_transform():
    ds = ShapesDataset(0, "val", 10)
    t = ImageTransform(IMAGE_SIZE, train=False)
    n = 0
    for sample in ds:
        item = load_item(sample, sample.captions[0], t, None)
        assert [r.phrase for r in item["regions"]] == [r.phrase for r in sample.regions]
        for got, want in zip(item["regions"], sample.regions):
            assert got.box == want.box
            n += 1
    assert n > 0


# ------------------------------------------------------------------------------------ (g) coco

def _png(path: Path, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 10, 10)).save(path)


def test_coco_instances_regions(tmp_path):
    _png(tmp_path / "val2017" / "1.png")
    _png(tmp_path / "val2017" / "2.png")
    caps = {"images": [{"id": 1, "file_name": "1.png"}, {"id": 2, "file_name": "2.png"}],
            "annotations": [{"image_id": 1, "caption": "a dog and a cat"},
                            {"image_id": 2, "caption": "an empty room"}]}
    inst = {"images": caps["images"],
            "categories": [{"id": 18, "name": "dog", "supercategory": "animal"},
                           {"id": 17, "name": "cat", "supercategory": "animal"}],
            "annotations": [{"id": 1, "image_id": 1, "bbox": [2, 3, 10, 5.5], "category_id": 18},
                            {"id": 2, "image_id": 1, "bbox": [20, 1, 4, 4], "category_id": 17},
                            {"id": 3, "image_id": 1, "bbox": [1, 2, 3], "category_id": 17},
                            {"id": 4, "image_id": 1, "bbox": [1, 2, 0, 3], "category_id": 17},
                            {"id": 5, "image_id": 1, "bbox": [1, 2, 3, 4], "category_id": 99},
                            {"id": 6, "image_id": 1, "bbox": "oops", "category_id": 18},
                            "not a dict",
                            {"id": 8, "image_id": 7, "bbox": [1, 2, 3, 4], "category_id": 18}]}
    ann = tmp_path / "annotations"
    ann.mkdir()
    (ann / "captions_val2017.json").write_text(json.dumps(caps))
    f = ann / "instances_val2017.json"
    f.write_text(json.dumps(inst))
    skips = SkipLog()
    samples = build_coco(DataConfig(source="coco", root=str(tmp_path)), "val", skips)
    assert [s.captions for s in samples] == [["a dog and a cat"], ["an empty room"]]
    assert samples[0].regions == [Region((2.0, 3.0, 12.0, 8.5), "dog"),
                                  Region((20.0, 1.0, 24.0, 5.0), "cat")]
    assert samples[1].regions == []
    assert dict(skips.counts) == {"bad instance": 5, "unknown image id": 1}
    assert f"{f}:annotations[2]" in skips.samples["bad instance"]
    # the regions reach the item in model-input pixels (40x30 -> crop (5, 0, 35, 30) -> 15x15)
    item = load_item(samples[0], "a dog and a cat", ImageTransform(15, train=False), None)
    assert item["regions"][0].box == pytest.approx((0.0, 1.5, 3.5, 4.25))
    # strict: the first malformed instance raises
    with pytest.raises(BadSampleError, match="annotations\\[2\\]"):
        build_coco(DataConfig(source="coco", root=str(tmp_path)), "val", SkipLog(strict=True))
    # categories: unnamed / id-less / unhashable-id entries are counted; a non-list is a format error
    inst["categories"] += [{"id": [3], "name": "odd"}, {"name": "no id"}, {"id": 5}, "junk"]
    f.write_text(json.dumps(inst))
    skips = SkipLog()
    assert build_coco(DataConfig(source="coco", root=str(tmp_path)), "val", skips)[0].regions == samples[0].regions
    assert skips.counts["bad category"] == 4 and f"{f}:categories[2]" in skips.samples["bad category"]
    inst["categories"] = True
    f.write_text(json.dumps(inst))
    with pytest.raises(SourceFormatError, match=r"instances_val2017\.json: 'categories' must be a list"):
        build_coco(DataConfig(source="coco", root=str(tmp_path)), "val", SkipLog())


def test_coco_without_instances_or_karpathy_has_no_regions(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "captions_train2014.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1, "caption": "x"}]}))
    (tmp_path / "dataset_coco.json").write_text(json.dumps(
        {"images": [{"filepath": "", "filename": "a.png", "split": "val", "sentences": [{"raw": "y"}]}]}))
    cfg = DataConfig(source="coco", root=str(tmp_path))
    assert [s.regions for s in build_coco(cfg, "train", SkipLog())] == [[]]
    assert [s.regions for s in build_coco(cfg, "val", SkipLog())] == [[]]
