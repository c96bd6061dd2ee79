"""Bad data and untrusted files (issue I): every fault is skipped and counted per reason with an
example path (or raised naming file and line under strict), and never ends a training epoch.

Existing tests that already show a case (not repeated here): tests/test_loader.py::
test_bad_images_are_skipped_with_reasons (zero-byte / truncated / corrupt / missing, strict names
the file), ::test_modes_convert_to_rgb (CMYK, P + transparency, LA, I;16, L pixel values),
::test_exif_orientation_applied, ::test_trainloader_skips_bad_samples; tests/test_file_sources.py
(malformed csv / jsonl rows, unpaired shard members, missing shards); tests/test_train.py::
test_bad_images_are_skipped_counted_and_strict_names_file (a Trainer epoch over bad files).
"""
from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finealign.config import ConfigError, DataConfig, load_config
from finealign.data.loader import PairDataset, Skipped, TrainLoader
from finealign.data.skips import BadSampleError, SkipLog
from finealign.data.sources.coco import build_coco
from finealign.data.sources.common import SourceFormatError
from finealign.data.sources.csv_source import build_csv
from finealign.data.sources.jsonl import build_jsonl
from finealign.data.sources.untrusted import MAX_CAPTION_CHARS
from finealign.data.sources.webdataset_source import build_webdataset
from finealign.data.tokenizer import Tokenizer
from finealign.data.transforms import ImageTransform

S = 8


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def huge_png(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR claims ``width x height`` (CRC fixed): a decompression bomb's header,
    made without allocating the pixels."""
    data = bytearray(png_bytes(Image.new("RGB", (1, 1), (1, 2, 3))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def write_image_zoo(d: Path) -> dict[str, str | None]:
    """Files of every kind -> expected skip reason (None: loads as an RGB image)."""
    d.mkdir(parents=True, exist_ok=True)
    ok = png_bytes(Image.fromarray(np.random.RandomState(0).randint(0, 255, (16, 16, 3), np.uint8)))
    (d / "ok.png").write_bytes(ok)
    (d / "zero.png").write_bytes(b"")
    (d / "trunc.png").write_bytes(ok[: len(ok) // 2])
    (d / "corrupt.jpg").write_bytes(b"GIF89a" + np.random.RandomState(1).bytes(200))     # bad header
    (d / "notes.png").write_text("this is a text file, not an image\n")       # non-image, image name
    (d / "readme.txt").write_text("plain text\n")                             # non-image, text name
    (d / "huge.png").write_bytes(huge_png(20_000, 20_000))
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(d / "cmyk.jpg")
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.save(d / "pal.png", transparency=1)
    Image.new("LA", (4, 4), (100, 128)).save(d / "la.png")
    Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16)).save(d / "i16.png")
    Image.new("1", (5, 3), 1).save(d / "bw.png")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(d / "tiny.png")
    rot = Image.new("RGB", (6, 2), (0, 0, 0))
    exif = rot.getexif()
    exif[0x0112] = 8                                                            # rotate 90 CCW
    rot.save(d / "rot.jpg", exif=exif.tobytes())
    return {"ok.png": None, "zero.png": "empty file", "trunc.png": "truncated image",
            "corrupt.jpg": "corrupt image", "notes.png": "corrupt image", "readme.txt": "corrupt image",
            "missing.png": "missing file", "huge.png": "image too large", "cmyk.jpg": None,
            "pal.png": None, "la.png": None, "i16.png": None, "bw.png": None, "tiny.png": None,
            "rot.jpg": None}


def csv_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(source="csv", root=str(root), augment=False, **kw)


# ------------------------------------------------------------------------------------ images

def test_every_bad_image_is_skipped_with_reason_and_good_modes_load(tmp_path):
    zoo = write_image_zoo(tmp_path / "img")
    (tmp_path / "train.csv").write_text("filepath,title\n" + "".join(
        f"img/{n},caption {i}\n" for i, n in enumerate(zoo)))
    samples = build_csv(csv_cfg(tmp_path), "train", SkipLog())
    ds = PairDataset(samples, ImageTransform(S, train=False), train=False)
    got = {Path(s.key).name: ds[i] for i, s in enumerate(samples)}
    assert {n: (g.reason if isinstance(g, Skipped) else None) for n, g in got.items()} == zoo
    for n, reason in zoo.items():
        if reason is None:
            assert got[n]["image"].shape == (3, S, S) and bool(got[n]["image"].isfinite().all()), n
        else:
            assert got[n].key.endswith(n)                 # the example path names the file
    rot = samples[list(zoo).index("rot.jpg")].load_image()
    assert rot.size == (2, 6)                            # EXIF orientation applied
    assert samples[list(zoo).index("bw.png")].load_image().getpixel((0, 0)) == (255, 255, 255)


def test_decompression_limit_is_a_config_knob_checked_before_decoding(tmp_path):
    zoo = write_image_zoo(tmp_path / "img")
    assert "huge.png" in zoo
    (tmp_path / "img" / "big.png").write_bytes(huge_png(12_000, 12_000))   # 144 M: PIL only warns
    (tmp_path / "train.csv").write_text("filepath,title\nimg/huge.png,huge\nimg/ok.png,small\n"
                                        "img/big.png,big\n")
    # default limit: the 400 M / 144 M pixel headers are refused; their 1x1 payload was never decoded
    # (a decode would report a truncated / corrupt image, not "image too large")
    ds = PairDataset(build_csv(csv_cfg(tmp_path), "train", SkipLog()), ImageTransform(S, train=False),
                     train=False, strict=True)
    with pytest.raises(BadSampleError, match=r"huge\.png.*image too large.*max_image_pixels = 89478485"):
        ds[0]
    with pytest.raises(BadSampleError, match=r"big\.png.*image too large.*12000x12000 = 144000000 pixels"
                                             r" exceeds data\.max_image_pixels = 89478485"):
        ds[2]
    # a lower limit skips the 16x16 image too; a higher one admits it
    small = build_csv(csv_cfg(tmp_path, max_image_pixels=255), "train", SkipLog())
    ds = PairDataset(small, ImageTransform(S, train=False), train=False)
    assert [ds[i].reason for i in range(3)] == ["image too large"] * 3
    big = build_csv(csv_cfg(tmp_path, max_image_pixels=256), "train", SkipLog())
    assert not isinstance(PairDataset(big, ImageTransform(S, train=False), train=False)[1], Skipped)
    assert load_config("clip", ["data.max_image_pixels=1000"]).data.max_image_pixels == 1000


# ------------------------------------------------------------------------------------ captions

LONG = " ".join(["word"] * 2000)                        # 9999 characters
CAPTIONS = {"empty": "", "blank": " \t  ", "long": LONG, "ctrl": "a\x00red\x07 \x1b[31mcat\x7f",
            "good": "a plain caption"}


def _caption_outcomes(samples, skips):
    caps = {s.key.split(":")[-1].rsplit("/", 1)[-1].split(".")[0]: s.captions[0] for s in samples}
    return caps, dict(skips.counts), dict(skips.notes)


def _check_captions(caps, counts, notes, invalid_utf8=True):
    assert set(caps) == {"long", "ctrl", "good"}
    assert caps["good"] == "a plain caption"
    assert caps["ctrl"] == "a red [31mcat"               # control characters -> spaces, collapsed
    assert len(caps["long"]) <= MAX_CAPTION_CHARS and LONG.startswith(caps["long"])
    assert caps["long"].endswith("word")                 # cut at a word boundary
    assert counts == {"empty caption": 2, **({"invalid utf-8": 1} if invalid_utf8 else {})}
    assert notes == {"caption truncated": 1, "control characters removed": 1}


def test_captions_csv_jsonl_coco_webdataset_same_outcomes(tmp_path):
    import webdataset as wds
    for k in [*CAPTIONS, "badutf8"]:
        Image.new("RGB", (2, 2)).save(tmp_path / f"{k}.png")
    bad = b"caf\xe9 au lait"                              # latin-1 bytes: not UTF-8
    # csv
    rows = [f'{k}.png,"{c}"'.encode() for k, c in CAPTIONS.items()] + [b"badutf8.png," + bad]
    (tmp_path / "train.csv").write_bytes(b"filepath,title\n" + b"\n".join(rows) + b"\n")
    sk = SkipLog()
    _check_captions(*_caption_outcomes(build_csv(csv_cfg(tmp_path), "train", sk), sk))
    assert sk.samples["invalid utf-8"] == [f"{tmp_path / 'train.csv'}:7"]
    # jsonl
    lines = [json.dumps({"image": f"{k}.png", "caption": c}).encode() for k, c in CAPTIONS.items()]
    lines.append(b'{"image": "badutf8.png", "caption": "' + bad + b'"}')
    (tmp_path / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    sk = SkipLog()
    _check_captions(*_caption_outcomes(build_jsonl(DataConfig(source="jsonl", root=str(tmp_path)),
                                                   "train", sk), sk))
    (tmp_path / "strict.jsonl").write_bytes(lines[-2] + b"\n" + lines[-1] + b"\n")
    with pytest.raises(BadSampleError, match=r"strict\.jsonl:2: invalid utf-8"):
        build_jsonl(DataConfig(source="jsonl", root=str(tmp_path), train="strict.jsonl"), "train",
                    SkipLog(strict=True))
    # coco (a JSON file is UTF-8 as a whole: see test_malformed_coco for a non-UTF-8 file)
    names = list(CAPTIONS)
    coco = {"images": [{"id": i, "file_name": f"{k}.png"} for i, k in enumerate(names)],
            "annotations": [{"image_id": i, "caption": CAPTIONS[k]} for i, k in enumerate(names)]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    sk = SkipLog()
    got = build_coco(DataConfig(source="coco", root=str(tmp_path), train="c.json"), "train", sk)
    caps, counts, notes = _caption_outcomes(got, sk)
    # coco counts each empty annotation, then the image left without captions
    _check_captions(caps, {"empty caption": 2}, notes, invalid_utf8=False)
    assert counts == {"empty caption": 4}
    # webdataset: .txt members
    with wds.TarWriter(str(tmp_path / "s-0.tar")) as w:
        for k, c in CAPTIONS.items():
            w.write({"__key__": k, "png": (tmp_path / f"{k}.png").read_bytes(), "txt": c.encode()})
        w.write({"__key__": "badutf8", "png": (tmp_path / "badutf8.png").read_bytes(), "txt": bad})
    sk = SkipLog()
    got = list(build_webdataset(DataConfig(source="webdataset", root=str(tmp_path), train="s-0.tar"),
                                "train", sk))
    _check_captions(*_caption_outcomes(got, sk))
    assert sk.samples["invalid utf-8"] == [f"{tmp_path}/s-0.tar:badutf8"]
    assert "caption truncated" in sk.summary() and sk.to_dict()["fixed"]["counts"]["caption truncated"] == 1


# ------------------------------------------------------------------------------------ malformed rows

def test_malformed_csv_rows_and_broken_table(tmp_path):
    Image.new("RGB", (2, 2)).save(tmp_path / "a.png")
    (tmp_path / "train.csv").write_text('filepath,title\na.png,fine\na.png\n,"no image"\n'
                                        'a.png,"x","y"\na.png,"unterminated\n')
    sk = SkipLog()
    got = build_csv(csv_cfg(tmp_path), "train", sk)
    assert [s.captions for s in got] == [["fine", "unterminated"]]
    assert dict(sk.counts) == {"wrong field count": 2, "empty image path": 1}
    assert sk.samples["wrong field count"][0].endswith("train.csv:3")
    (tmp_path / "v.csv").write_bytes(b"")
    with pytest.raises(SourceFormatError, match=r"v\.csv: empty file"):
        build_csv(csv_cfg(tmp_path, val="v.csv"), "val", SkipLog())


def test_malformed_coco(tmp_path):
    Image.new("RGB", (2, 2)).save(tmp_path / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png"}, {"id": [1], "file_name": "b.png"},
                       {"file_name": "c.png"}, "junk", {"id": 2, "file_name": 7}],
            "annotations": [{"image_id": 1, "caption": "ok"}, {"caption": "no id"}, 5,
                            {"image_id": {"x": 1}, "caption": "unhashable"},
                            {"image_id": 1, "caption": ["not", "a", "string"]}]}
    f = tmp_path / "c.json"
    f.write_text(json.dumps(data))
    sk = SkipLog()
    got = build_coco(DataConfig(source="coco", root=str(tmp_path), train="c.json"), "train", sk)
    assert [s.captions for s in got] == [["ok"]]
    assert dict(sk.counts) == {"bad image entry": 4, "bad annotation": 3, "empty caption": 1}
    assert f"{f}:images[1]" in sk.samples["bad image entry"]
    with pytest.raises(BadSampleError, match=r"c\.json:images\[1\]: bad image entry"):
        build_coco(DataConfig(source="coco", root=str(tmp_path), train="c.json"), "train",
                   SkipLog(strict=True))
    for name, raw in [("latin1.json", b'{"images": [], "annotations": [], "x": "caf\xe9"}'),
                      ("trunc.json", json.dumps(data).encode()[:40]), ("deep.json", b"[" * 100_000)]:
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(SourceFormatError, match=name.replace(".", r"\.")):
            build_coco(DataConfig(source="coco", root=str(tmp_path), train=name), "train", SkipLog())
    # "annotations" that is not a list (found by the fuzz test: true crashed with a TypeError)
    for i, anns in enumerate([True, None, "a caption", {"image_id": 1, "caption": "ok"}, 3]):
        (tmp_path / f"anns{i}.json").write_text(json.dumps({"images": data["images"], "annotations": anns}))
        with pytest.raises(SourceFormatError, match=rf"anns{i}\.json: 'annotations' must be a list"):
            build_coco(DataConfig(source="coco", root=str(tmp_path), train=f"anns{i}.json"), "train", SkipLog())


# ------------------------------------------------------------------------------------ webdataset

def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def test_webdataset_unsafe_names_duplicates_unpaired_and_bad_members(tmp_path):
    img = png_bytes(Image.new("RGB", (3, 3), (5, 6, 7)))
    _tar(tmp_path / "s-0.tar", [
        ("a.png", img), ("a.txt", b"first a"),
        ("../up.png", img), ("../up.txt", b"escapes"),
        ("/abs/root.png", img), ("/abs/root.txt", b"absolute"),
        ("d/../../e.png", img), ("d/../../e.txt", b"climbs"),
        ("b.png", img), ("b.txt", b"b caption"), ("b.txt", b"b repeated member"),
        ("lonely.txt", b"no image"),
        ("j.png", img), ("j.json", b"[1, 2]"),
        ("a.png", img), ("a.txt", b"a again, later"),
        ("sub/ok.png", img), ("sub/ok.txt", b"a nested key is fine"),
    ])
    cfg = DataConfig(source="webdataset", root=str(tmp_path), train="s-0.tar")
    sk = SkipLog()
    got = list(build_webdataset(cfg, "train", sk))
    assert [s.captions for s in got] == [["first a"], ["b caption"], ["a nested key is fine"]]
    assert dict(sk.counts) == {"unsafe member name": 3, "duplicate key": 2, "unpaired member": 1,
                               "malformed json": 1}
    shard = f"{tmp_path}/s-0.tar"
    assert sorted(sk.samples["unsafe member name"]) == sorted(
        f"{shard}:{k}" for k in ("../up", "/abs/root", "d/../../e"))
    assert f"{shard}:a" in sk.samples["duplicate key"]
    assert not (tmp_path.parent / "up.png").exists()              # nothing extracted anywhere
    with pytest.raises(BadSampleError, match=r"s-0\.tar:\.\./up: unsafe member name"):
        list(build_webdataset(cfg, "train", SkipLog(strict=True)))


# ------------------------------------------------------------------------------------ paths

def _outside_layout(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    Image.new("RGB", (2, 2), (1, 1, 1)).save((root / "imgs").mkdir(parents=True) or root / "imgs" / "in.png")
    Image.new("RGB", (2, 2), (2, 2, 2)).save(tmp_path / "secret.png")
    return root


def test_paths_cannot_leave_the_root_unless_allowed(tmp_path):
    root = _outside_layout(tmp_path)
    secret = tmp_path / "secret.png"
    (root / "ann").mkdir()
    # csv in a sub-directory: ../imgs stays inside data.root; absolute and ../../ paths leave it
    (root / "ann" / "train.csv").write_text(
        f"filepath,title\n../imgs/in.png,inside\n{secret},absolute\n../../secret.png,climbs\n"
        f"{root / 'imgs' / 'in.png'},absolute but inside\n")
    cfg = DataConfig(source="csv", root=str(root), train="ann/train.csv")
    sk = SkipLog()
    got = build_csv(cfg, "train", sk)
    assert [s.captions for s in got] == [["inside"], ["absolute but inside"]]
    assert sk.counts == {"path outside root": 2}
    assert sk.samples["path outside root"] == [f"{root}/ann/train.csv:3", f"{root}/ann/train.csv:4"]
    with pytest.raises(BadSampleError, match=r"train\.csv:3: path outside root"):
        build_csv(cfg, "train", SkipLog(strict=True))
    allowed = build_csv(DataConfig(source="csv", root=str(root), train="ann/train.csv",
                                   allow_outside_root=True), "train", SkipLog())
    assert [s.load_image().getpixel((0, 0)) for s in allowed] == [(1, 1, 1), (2, 2, 2), (2, 2, 2),
                                                                   (1, 1, 1)]
    # jsonl (one of several images outside -> the whole line)
    (root / "train.jsonl").write_text("\n".join(json.dumps(x) for x in [
        {"image": "imgs/in.png", "caption": "ok"}, {"image": str(secret), "caption": "abs"},
        {"images": ["imgs/in.png", "../secret.png"], "caption": "pair"}]) + "\n")
    sk = SkipLog()
    assert len(build_jsonl(DataConfig(source="jsonl", root=str(root)), "train", sk)) == 1
    assert sk.counts == {"path outside root": 2}
    assert len(build_jsonl(DataConfig(source="jsonl", root=str(root), allow_outside_root=True),
                           "train", SkipLog())) == 3
    # coco captions and Karpathy
    (root / "c.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "imgs/in.png"}, {"id": 2, "file_name": "../secret.png"}],
        "annotations": [{"image_id": 1, "caption": "in"}, {"image_id": 2, "caption": "out"}]}))
    (root / "k.json").write_text(json.dumps({"images": [
        {"filepath": "imgs", "filename": "in.png", "split": "train", "sentences": [{"raw": "in"}]},
        {"filepath": "..", "filename": "secret.png", "split": "train", "sentences": [{"raw": "out"}]}]}))
    for name in ("c.json", "k.json"):
        sk = SkipLog()
        got = build_coco(DataConfig(source="coco", root=str(root), train=name), "train", sk)
        assert [s.captions for s in got] == [["in"]] and sk.counts == {"path outside root": 1}, name
        got = build_coco(DataConfig(source="coco", root=str(root), train=name, allow_outside_root=True),
                         "train", SkipLog())
        assert len(got) == 2, name


def test_emoji_source_same_rules(tmp_path):
    from finealign.data.sources.emoji import build as build_emoji
    root = _outside_layout(tmp_path)
    Image.new("RGB", (4, 4)).save(root / "imgs" / "four.png")
    (root / "train.jsonl").write_bytes(b"\n".join([
        json.dumps({"image": "imgs/four.png", "caption": "a\x07b", "item_id": 0}).encode(),
        json.dumps({"image": "../secret.png", "caption": "out", "item_id": 1}).encode(),
        b'{"image": "imgs/in.png", "caption": "caf\xe9", "item_id": 2}']) + b"\n")
    sk = SkipLog()
    got = build_emoji(DataConfig(source="emoji", root=str(root), max_image_pixels=15), "train", sk)
    assert [s.captions for s in got] == [["a b"]] and sk.notes == {"control characters removed": 1}
    assert sk.counts == {"path outside root": 1, "invalid utf-8": 1}
    item = PairDataset(got, ImageTransform(S, train=False), train=False)[0]
    assert isinstance(item, Skipped) and item.reason == "image too large"      # 16 px > 15
    assert len(build_emoji(DataConfig(source="emoji", root=str(root), allow_outside_root=True), "train",
                           SkipLog())) == 2


# ------------------------------------------------------------------------------------ end to end

def test_train_loader_epoch_survives_a_mix_of_bad_samples(tmp_path):
    root = _outside_layout(tmp_path)
    zoo = write_image_zoo(root / "img")
    rows = [f"img/{n},caption {i}" for i, n in enumerate(zoo)]
    rows += ["img/ok.png,", "img/ok.png", "../secret.png,outside"]
    (root / "train.csv").write_text("filepath,title\n" + "\n".join(rows) + "\n")
    cfg = csv_cfg(root, batch_size=5)                     # 15 rows: every row once per epoch
    skips = SkipLog()
    samples = build_csv(cfg, "train", skips)
    tok = Tokenizer.train([f"caption {i}" for i in range(20)], 300)
    loader = TrainLoader(samples, tok, cfg, S, 16, skips=skips)
    n = loader.batches_per_epoch
    batches = [next(loader) for _ in range(2 * n)]        # two epochs: no exception
    good = {f"caption {i}" for i, r in enumerate(zoo.values()) if r is None}
    assert {c for b in batches for c in b.captions} == good
    assert all(b.images.shape[1:] == (3, S, S) and len(b) > 0 for b in batches)
    bad = {r for r in zoo.values() if r}
    assert bad <= set(skips.counts), skips.summary()
    assert {"empty caption", "wrong field count", "path outside root"} <= set(skips.counts)
    assert any("huge.png" in w for w in skips.samples["image too large"])


# ------------------------------------------------------------------------------------ configs

def test_yaml_python_tags_are_refused_naming_the_file(tmp_path):
    marker = tmp_path / "pwned"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"base: clip\ndata:\n  root: !!python/object/apply:os.system [\"touch {marker}\"]\n")
    with pytest.raises(ConfigError, match=r"evil\.yaml: invalid YAML.*python/object/apply"):
        load_config(str(recipe))
    with pytest.raises(ConfigError, match=r"override .data\.root=.*invalid YAML"):
        load_config("clip", [f"data.root=!!python/object/apply:os.system ['touch {marker}']"])
    (tmp_path / "latin1.yaml").write_bytes(b"recipe: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1\.yaml"):
        load_config(str(tmp_path / "latin1.yaml"))
    assert not marker.exists()
