"""Loader: bad images / modes, transforms, collation, deterministic + resumable TrainLoader, eval."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from finealign.config import DataConfig
from finealign.data.loader import (Collator, PairDataset, Skipped, TrainLoader, apply_fraction,
                                   build_source, collect_captions, iter_eval_images)
from finealign.data.skips import BadSampleError, SkipLog
from finealign.data.sources.common import LazyImage
from finealign.data.sources.webdataset_source import build_webdataset, write_shards
from finealign.data.tokenizer import Tokenizer
from finealign.data.transforms import ImageTransform, denormalize, to_rgb
from finealign.types import Sample

S = 8


class Pattern:
    """Picklable deterministic image: a gradient whose colour depends on ``i``."""

    def __init__(self, i: int):
        self.i = i

    def __call__(self):
        y, x = np.mgrid[0:12, 0:10]
        arr = np.stack([(x * 20 + self.i * 7) % 256, (y * 15 + self.i * 13) % 256,
                        np.full_like(x, (self.i * 31) % 256)], -1).astype(np.uint8)
        return Image.fromarray(arr)


def make_samples(n: int, caps: int = 2) -> list[Sample]:
    return [Sample(key=f"img{i}", load_image=Pattern(i), image_id=i, item_id=i,
                   captions=[f"image {i} caption {c}" for c in range(caps)]) for i in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([f"image {i} caption {c}" for i in range(20) for c in range(3)], 300)


# ------------------------------------------------------------------------------ bad images, modes

def _write_bad_files(d):
    ok = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (16, 16, 3), dtype=np.uint8)).save(ok, "PNG")
    (d / "empty.png").write_bytes(b"")
    (d / "trunc.png").write_bytes(ok.getvalue()[: len(ok.getvalue()) // 2])
    (d / "noise.png").write_bytes(np.random.RandomState(1).bytes(300))
    (d / "ok.png").write_bytes(ok.getvalue())
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(d / "cmyk.jpg", quality=100)
    p = Image.new("P", (4, 4), 0)
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((1, 1), 1)
    p.save(d / "pal.png", transparency=1)
    la = Image.new("LA", (4, 4), (100, 255))
    la.putpixel((1, 1), (0, 0))
    la.save(d / "la.png")
    Image.fromarray(np.full((4, 4), 257 * 100, dtype=np.uint16)).save(d / "i16.png")
    Image.new("L", (4, 4), 77).save(d / "l.png")


def test_bad_images_are_skipped_with_reasons(tmp_path, monkeypatch):
    _write_bad_files(tmp_path)
    names = {"empty.png": "empty file", "trunc.png": "truncated image", "noise.png": "corrupt image",
             "missing.png": "missing file"}
    samples = [Sample(key=n, load_image=LazyImage(str(tmp_path / n)), captions=["a caption"])
               for n in names]
    samples.append(Sample(key="nocap", load_image=LazyImage(str(tmp_path / "ok.png")), captions=[" "]))
    ds = PairDataset(samples, ImageTransform(S, train=False), train=False)
    got = [ds[i] for i in range(len(ds))]
    assert all(isinstance(g, Skipped) for g in got)
    assert [(g.reason, g.key) for g in got] == list(zip(names.values(), names)) + [("empty caption", "nocap")]
    # strict: raise naming the key and source
    strict = PairDataset([Sample(key="trunc.png", load_image=LazyImage(str(tmp_path / "trunc.png")),
                                 captions=["c"], source="list.csv:3")],
                         ImageTransform(S, train=False), train=False, strict=True)
    with pytest.raises(BadSampleError, match=r"trunc\.png \(from list\.csv:3\): truncated image"):
        strict[0]
    # decompression bombs
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    bomb = PairDataset([Sample(key="ok", load_image=LazyImage(str(tmp_path / "ok.png")),
                               captions=["x"])], ImageTransform(S, train=False), train=False)
    assert bomb[0].reason == "image too large"


@pytest.mark.parametrize("name,xy,rgb,tol", [
    ("cmyk.jpg", (2, 2), (255, 0, 0), 8), ("pal.png", (0, 0), (255, 0, 0), 0),
    ("pal.png", (1, 1), (255, 255, 255), 0), ("la.png", (0, 0), (100, 100, 100), 0),
    ("la.png", (1, 1), (255, 255, 255), 0), ("i16.png", (0, 0), (100, 100, 100), 0),
    ("l.png", (3, 3), (77, 77, 77), 0)])
def test_modes_convert_to_rgb(tmp_path, name, xy, rgb, tol):
    _write_bad_files(tmp_path)
    raw = Image.open(tmp_path / name)
    img = to_rgb(raw)
    assert img.mode == "RGB"
    assert np.abs(np.subtract(img.getpixel(xy), rgb)).max() <= tol
    item = PairDataset([Sample(key=name, load_image=LazyImage(str(tmp_path / name)), captions=["c"])],
                       ImageTransform(S, train=False), train=False)[0]
    assert not isinstance(item, Skipped) and item["image"].shape == (3, S, S)


def test_exif_orientation_applied():
    img = Image.new("RGB", (6, 4), (0, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    assert to_rgb(Image.open(io.BytesIO(buf.getvalue()))).size == (4, 6)


# ------------------------------------------------------------------------------ transforms

def test_transform_shapes_and_determinism():
    img = Pattern(3)()
    ev = ImageTransform(S, train=False)
    x = ev(img)
    assert x.shape == (3, S, S) and x.dtype == torch.float32
    assert torch.equal(ev(img), x)
    assert denormalize(x).min() >= 0 and denormalize(x).max() <= 1
    white = denormalize(ev(Image.new("RGB", (5, 9), (255, 255, 255))))
    assert torch.allclose(white, torch.ones_like(white), atol=1e-5)
    tr = ImageTransform(S, train=True)
    a, b = tr(img, random.Random(5)), tr(img, random.Random(5))
    assert torch.equal(a, b) and a.shape == (3, S, S)
    assert not torch.equal(a, tr(img, random.Random(6)))
    assert torch.equal(tr(img, torch.Generator().manual_seed(1)), tr(img, torch.Generator().manual_seed(1)))
    assert torch.equal(ImageTransform(S, train=True, augment=False)(img, random.Random(0)), x)


# ------------------------------------------------------------------------------ collation

def test_collator_batch_and_all_skipped(tok):
    ds = PairDataset(make_samples(3), ImageTransform(S, train=False), train=False)
    items = [ds[0], Skipped("corrupt image", "k"), ds[3]]
    col = Collator(tok, context_length=16, image_size=S)
    b = col(items)
    assert len(b) == 2 and b.images.shape == (2, 3, S, S) and b.text.shape == (2, 16)
    assert b.captions == ["image 0 caption 0", "image 1 caption 1"]
    assert b.image_ids.tolist() == [0, 1] and b.keys == ["img0", "img1"]
    assert b.skipped == [("corrupt image", "k")] and b.extras["regions"] == [[], []]
    empty = col([Skipped("missing file", "a"), Skipped("empty file", "b")])
    assert len(empty) == 0 and empty.images.shape == (0, 3, S, S) and empty.text.shape == (0, 16)
    assert len(empty.skipped) == 2


# ------------------------------------------------------------------------------ TrainLoader

def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.captions == y.captions
        assert torch.equal(x.images, y.images) and torch.equal(x.text, y.text)


def _cfg(**kw):
    base = dict(batch_size=4, seed=3, workers=0, augment=True)
    base.update(kw)
    return DataConfig(**base)


def test_trainloader_deterministic_epochs(tok):
    samples = make_samples(10)                       # 20 pairs -> 5 batches / epoch
    a = TrainLoader(samples, tok, _cfg(), S, 16)
    b = TrainLoader(samples, tok, _cfg(), S, 16)
    assert a.batches_per_epoch == 5
    ra, rb = _take(a, 6), _take(b, 6)
    _same(ra, rb)
    assert a.state_dict() == {"epoch": 1, "position": 1}
    epoch0 = sorted(c for x in ra[:5] for c in x.captions)
    assert epoch0 == sorted(c for s in samples for c in s.captions)    # each pair once per epoch
    assert ra[0].captions != ra[5].captions
    other = TrainLoader(samples, tok, _cfg(seed=4), S, 16)
    assert next(other).captions != ra[0].captions


@pytest.mark.parametrize("k", [3, 5])
def test_trainloader_resume_exact(tok, k):
    samples = make_samples(10)
    ref = _take(TrainLoader(samples, tok, _cfg(), S, 16), 12)
    first = TrainLoader(samples, tok, _cfg(), S, 16)
    _same(_take(first, k), ref[:k])
    state = first.state_dict()
    resumed = TrainLoader(samples, tok, _cfg(), S, 16)
    resumed.load_state_dict(state)
    _same(_take(resumed, 12 - k), ref[k:])
    first.load_state_dict(state)                     # rewinding a live loader works as well
    _same(_take(first, 2), ref[k:k + 2])


def test_trainloader_workers_match_and_resume(tok):
    samples = make_samples(10)
    ref = _take(TrainLoader(samples, tok, _cfg(), S, 16), 8)
    w = TrainLoader(samples, tok, _cfg(workers=2), S, 16)
    _same(_take(w, 3), ref[:3])
    state = w.state_dict()
    w2 = TrainLoader(samples, tok, _cfg(workers=2), S, 16)
    w2.load_state_dict(state)
    _same(_take(w2, 5), ref[3:8])
    w.close()
    w2.close()


def test_trainloader_skips_bad_samples(tok, tmp_path):
    samples = make_samples(8, caps=1)
    samples[2] = Sample(key="gone.png", load_image=LazyImage(str(tmp_path / "gone.png")),
                        captions=["image 2 caption 0"], image_id=2)
    loader = TrainLoader(samples, tok, _cfg(batch_size=2), S, 16)
    batches = _take(loader, 4)
    assert sum(len(b) for b in batches) == 7
    assert [r for b in batches for r in b.skipped] == [("missing file", "gone.png")]
    assert loader.skips.counts["missing file"] == 1
    with pytest.raises(BadSampleError, match="gone.png"):
        _take(TrainLoader(samples, tok, _cfg(batch_size=2, strict=True), S, 16), 4)


def test_trainloader_streaming_resume_and_workers(tok, tmp_path):
    write_shards(make_samples(14, caps=2), str(tmp_path / "tr-%03d.tar"), maxcount=5)
    with wds.TarWriter(str(tmp_path / "tr-003.tar")) as w:   # one unpaired member at the end
        w.write({"__key__": "orphan", "txt": "caption without image"})

    def loader(**kw):
        c = _cfg(batch_size=3, source="webdataset", root=str(tmp_path), train="tr-{000..003}.tar", **kw)
        return TrainLoader(build_webdataset(c, "train", SkipLog()), tok, c, S, 16, shuffle_buffer=4)
    ref = _take(loader(), 10)                         # 14 samples -> 4 batches / pass
    assert loader().batches_per_epoch is None
    assert len({c.split(" caption")[0] for b in ref[:4] for c in b.captions}) == 12
    assert ref[0].captions != ref[4].captions         # new shuffle each pass
    assert [r for b in ref[:4] for r in b.skipped] == [("unpaired member", f"{tmp_path}/tr-003.tar:orphan")]
    first = loader()
    _take(first, 6)
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    _same(_take(resumed, 4), ref[6:10])
    with_workers = _take(loader(workers=2), 6)
    _same(with_workers, ref[:6])
    assert [r for b in with_workers[:4] for r in b.skipped] == [r for b in ref[:4] for r in b.skipped]
    # a fraction of a stream: deterministic subset by key hash
    c = _cfg(batch_size=3, source="webdataset", root=str(tmp_path), train="tr-{000..003}.tar", fraction=0.5)
    keys = [[s.key for s in build_source(c, "train", SkipLog())] for _ in range(2)]
    assert keys[0] == keys[1] and 0 < len(keys[0]) < 14


# ------------------------------------------------------------------------------ fraction, eval

def test_fraction_deterministic(tmp_path):
    for i in range(10):
        Image.new("RGB", (3, 3), (i, i, i)).save(tmp_path / f"{i}.png")
    (tmp_path / "train.csv").write_text("filepath,title\n" + "".join(f"{i}.png,cap {i}\n" for i in range(10)))
    cfg = DataConfig(source="csv", root=str(tmp_path), fraction=0.5, seed=0)
    a = build_source(cfg, "train", SkipLog())
    b = build_source(cfg, "train", SkipLog())
    assert len(a) == 5 and [s.key for s in a] == [s.key for s in b]
    cfg_val = DataConfig(source="csv", root=str(tmp_path), fraction=0.5, val="train.csv")
    assert len(build_source(cfg_val, "val", SkipLog())) == 10           # only train is cut
    keys = {tuple(s.key for s in apply_fraction(make_samples(10), 0.5, seed)) for seed in range(5)}
    assert len(keys) > 1 and all(len(k) == 5 for k in keys)
    assert len(apply_fraction(make_samples(10), 0.31, 0)) == 4          # ceil


def test_eval_images_and_captions(tmp_path):
    samples = make_samples(5, caps=2)
    samples[1] = Sample(key="bad", load_image=LazyImage(str(tmp_path / "nope.png")), captions=["x"])
    skips = SkipLog()
    out = list(iter_eval_images(samples, ImageTransform(S, train=False), batch_size=2, skips=skips))
    kept = [s for _, batch in out for s in batch]
    assert [s.key for s in kept] == ["img0", "img2", "img3", "img4"]
    assert sum(x.shape[0] for x, _ in out) == 4 and out[0][0].shape[1:] == (3, S, S)
    assert skips.counts["missing file"] == 1
    texts, t2i = collect_captions(kept)
    assert len(texts) == 8 and t2i.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert texts[2] == "image 2 caption 0"
    with pytest.raises(BadSampleError):
        list(iter_eval_images(samples, ImageTransform(S, train=False), 2, skips=SkipLog(strict=True)))
