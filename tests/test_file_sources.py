"""File sources read small real files: csv/tsv, jsonl, coco captions + Karpathy, webdataset shards."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from finealign.config import DataConfig
from finealign.data.skips import BadSampleError, SkipLog
from finealign.data.sources.coco import build_coco
from finealign.data.sources.common import SourceFormatError, resolve_split_file
from finealign.data.sources.csv_source import build_csv, build_tsv
from finealign.data.sources.jsonl import build_jsonl
from finealign.data.sources.webdataset_source import build_webdataset, write_shards
from finealign.registry import SOURCES
from finealign.types import Sample

COLORS = {"a": (255, 0, 0), "b": (0, 0, 255), "c": (0, 255, 0), "d": (200, 200, 0)}


def make_png(path: Path, color, size=(6, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def make_images(d: Path, sub: str = "imgs") -> None:
    for name, col in COLORS.items():
        make_png(d / sub / f"{name}.png", col)


def pixel(sample: Sample):
    img = sample.load_image()
    assert img.mode == "RGB"
    return img.getpixel((0, 0))


def test_registered():
    import finealign.data.sources  # noqa: F401
    for name in ("csv", "tsv", "jsonl", "coco", "webdataset"):
        assert name in SOURCES


# ------------------------------------------------------------------------------------ csv / tsv

CSV = """filepath,title
imgs/a.png,a red square
imgs/a.png,"a red box, on the left"
imgs/b.png,a blue square
imgs/c.png,
,a caption without image
imgs/d.png,too,many,fields
imgs/c.png,a green square
"""


def test_csv_groups_captions_and_counts_bad_rows(tmp_path):
    make_images(tmp_path)
    (tmp_path / "train.csv").write_text(CSV)
    skips = SkipLog()
    cfg = DataConfig(source="csv", root=str(tmp_path))
    samples = build_csv(cfg, "train", skips)   # "train" -> root/train.csv
    assert [len(s.captions) for s in samples] == [2, 1, 1]
    assert samples[0].captions == ["a red square", "a red box, on the left"]
    assert [s.image_id for s in samples] == [0, 1, 2]
    assert [pixel(s) for s in samples] == [COLORS["a"], COLORS["b"], COLORS["c"]]
    f = tmp_path / "train.csv"
    assert dict(skips.counts) == {"empty caption": 1, "empty image path": 1, "wrong field count": 1}
    assert skips.samples["empty caption"] == [f"{f}:5"]
    assert skips.samples["empty image path"] == [f"{f}:6"]
    assert skips.samples["wrong field count"] == [f"{f}:7"]


def test_csv_strict_raises_with_file_and_line(tmp_path):
    make_images(tmp_path)
    (tmp_path / "train.csv").write_text(CSV)
    cfg = DataConfig(source="csv", root=str(tmp_path))
    with pytest.raises(BadSampleError, match=r"train\.csv:5: empty caption"):
        build_csv(cfg, "train", SkipLog(strict=True))


def test_csv_missing_column_names_file_and_columns(tmp_path):
    (tmp_path / "x.csv").write_text("path,caption\nimgs/a.png,hi\n")
    cfg = DataConfig(source="csv", root=str(tmp_path), train="x.csv")
    with pytest.raises(SourceFormatError) as e:
        build_csv(cfg, "train", SkipLog())
    msg = str(e.value)
    assert "x.csv" in msg and "'filepath'" in msg and "'path'" in msg and "'caption'" in msg


def test_tsv_custom_keys_quotes_and_subdir(tmp_path):
    make_images(tmp_path / "data")
    (tmp_path / "data" / "val.tsv").write_text(
        'image\ttext\nimgs/a.png\ta "quoted" red square\nimgs/b.png\ta blue\tsquare\n'
        "imgs/b.png\tanother blue one\n")
    cfg = DataConfig(source="tsv", root=str(tmp_path), val="data/val.tsv",
                     image_key="image", caption_key="text")
    skips = SkipLog()
    samples = build_tsv(cfg, "val", skips)
    assert [s.captions for s in samples] == [['a "quoted" red square'], ["another blue one"]]
    assert pixel(samples[1]) == COLORS["b"]
    assert skips.counts["wrong field count"] == 1
    assert skips.samples["wrong field count"][0].endswith("val.tsv:3")


def test_resolve_split_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "t.jsonl").write_text("")
    (tmp_path / "test.jsonl").write_text("")
    cfg = DataConfig(root=str(tmp_path), train="sub/t.jsonl")
    assert resolve_split_file(cfg, "train", (".jsonl",)) == tmp_path / "sub" / "t.jsonl"
    assert resolve_split_file(cfg, "test", (".jsonl",)) == tmp_path / "test.jsonl"
    with pytest.raises(FileNotFoundError, match="'val'"):
        resolve_split_file(cfg, "val", (".jsonl",))


# ------------------------------------------------------------------------------------ jsonl

def test_jsonl_regions_multi_image_and_bad_lines(tmp_path):
    make_images(tmp_path)
    lines = [
        {"image": "imgs/a.png", "caption": "a red square", "label": "square",
         "regions": [{"box": [0, 0, 4, 3], "phrase": "red square"}]},
        {"images": ["imgs/b.png", "imgs/c.png"], "captions": ["two views", "a pair"], "item_id": "obj7"},
        "{not json",
        {"caption": "no image"},
        {"image": "imgs/d.png"},
        {"image": "imgs/d.png", "caption": "x", "regions": [{"box": [5, 5, 1, 1], "phrase": "bad"}]},
        [1, 2],
        {"image": "imgs/a.png", "caption": "another red one"},
    ]
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    skips = SkipLog()
    samples = build_jsonl(DataConfig(source="jsonl", root=str(tmp_path)), "train", skips)
    assert len(samples) == 3
    a, b, c = samples
    assert a.captions == ["a red square", "another red one"] and a.label == "square"
    assert len(a.regions) == 1 and a.regions[0].box == (0.0, 0.0, 4.0, 3.0)
    assert a.regions[0].phrase == "red square"
    assert b.item_id == c.item_id != a.item_id
    assert b.captions == c.captions == ["two views", "a pair"]
    assert [s.image_id for s in samples] == [0, 1, 2]
    assert pixel(c) == COLORS["c"]
    assert dict(skips.counts) == {"malformed json": 1, "missing image": 1, "missing caption": 1,
                                  "bad region": 1, "not an object": 1}
    assert skips.samples["bad region"] == [f"{f}:6"]
    with pytest.raises(BadSampleError, match=r"train\.jsonl:3: malformed json"):
        build_jsonl(DataConfig(source="jsonl", root=str(tmp_path)), "train", SkipLog(strict=True))


# ------------------------------------------------------------------------------------ coco

def test_coco_captions_json_with_split_image_dir(tmp_path):
    make_png(tmp_path / "val2014" / "COCO_val2014_1.jpg", COLORS["a"])
    make_png(tmp_path / "val2014" / "COCO_val2014_2.jpg", COLORS["b"])
    data = {"images": [{"id": 1, "file_name": "COCO_val2014_1.jpg"},
                       {"id": 2, "file_name": "COCO_val2014_2.jpg"},
                       {"id": 3, "file_name": "COCO_val2014_3.jpg"}],
            "annotations": [{"image_id": 1, "caption": "a red thing"},
                            {"image_id": 2, "caption": "a blue thing "},
                            {"image_id": 1, "caption": "red again"},
                            {"image_id": 9, "caption": "orphan"},
                            {"image_id": 2, "caption": ""}]}
    (tmp_path / "annotations").mkdir()
    f = tmp_path / "annotations" / "captions_val2014.json"
    f.write_text(json.dumps(data))
    skips = SkipLog()
    samples = build_coco(DataConfig(source="coco", root=str(tmp_path)), "val", skips)
    assert [s.captions for s in samples] == [["a red thing", "red again"], ["a blue thing"]]
    assert [s.image_id for s in samples] == [0, 1]
    for s, col in zip(samples, [COLORS["a"], COLORS["b"]]):  # JPEG: lossy
        assert np.abs(np.subtract(pixel(s), col)).max() <= 3
    assert dict(skips.counts) == {"unknown image id": 1, "empty caption": 2}
    assert f"{f}:annotations[3]" in skips.samples["unknown image id"]


def test_karpathy_json_split_selection(tmp_path):
    make_images(tmp_path, "train2014")
    make_png(tmp_path / "val2014" / "v.png", (9, 9, 9))

    def im(fp, fn, split, *caps):
        return {"filepath": fp, "filename": fn, "split": split,
                "sentences": [{"raw": c, "tokens": c.split()} for c in caps]}
    data = {"images": [im("train2014", "a.png", "train", "red one", "still red"),
                       im("train2014", "b.png", "restval", "blue one"),
                       im("val2014", "v.png", "val", "grey"),
                       im("train2014", "c.png", "test", "green one"),
                       im("train2014", "d.png", "test")],
            "dataset": "coco"}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    cfg = DataConfig(source="coco", root=str(tmp_path))
    skips = SkipLog()
    train = build_coco(cfg, "train", skips)
    assert [s.captions for s in train] == [["red one", "still red"], ["blue one"]]
    assert [pixel(s) for s in train] == [COLORS["a"], COLORS["b"]]
    assert [s.captions for s in build_coco(cfg, "val", skips)] == [["grey"]]
    test = build_coco(cfg, "test", skips)
    assert [s.captions for s in test] == [["green one"]] and test[0].image_id == 0
    assert skips.counts["empty caption"] == 1
    # a split value passed in place of the name (as evaluators do) maps back to the name
    cfg2 = DataConfig(source="coco", root=str(tmp_path / "dataset_coco.json"), test="dataset_coco.json")
    assert [s.captions for s in build_coco(cfg2, "dataset_coco.json", SkipLog())] == [["green one"]]


def test_coco_unknown_format(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(SourceFormatError, match="x.json"):
        build_coco(DataConfig(source="coco", root=str(tmp_path), train="x.json"), "train", SkipLog())


# ------------------------------------------------------------------------------------ webdataset

class _Solid:
    def __init__(self, color):
        self.color = color

    def __call__(self):
        return Image.new("RGB", (5, 5), self.color)


def test_webdataset_roundtrip_and_unpaired(tmp_path):
    cols = [(10 * i, 0, 255 - 10 * i) for i in range(5)]
    samples = [Sample(key=f"s{i}", load_image=_Solid(c), captions=[f"caption {i}", f"alt {i}"],
                      item_id=100 + i, label=f"l{i % 2}") for i, c in enumerate(cols)]
    out = tmp_path / "shards"
    written = write_shards(samples, str(out / "train-%06d.tar"), maxcount=2)
    assert [Path(w).name for w in written] == [f"train-{i:06d}.tar" for i in range(3)]
    with wds.TarWriter(str(out / "train-000003.tar")) as w:
        w.write({"__key__": "x", "txt": "caption without image"})
        w.write({"__key__": "y", "png": b"\x89PNG..."})
    cfg = DataConfig(source="webdataset", root=str(tmp_path),
                     train="shards/train-{000000..000003}.tar")
    skips = SkipLog()
    got = list(build_webdataset(cfg, "train", skips))
    assert [s.captions for s in got] == [[f"caption {i}", f"alt {i}"] for i in range(5)]
    assert [s.item_id for s in got] == [100 + i for i in range(5)]
    assert [s.label for s in got] == [f"l{i % 2}" for i in range(5)]
    assert [pixel(s) for s in got] == cols
    assert [s.image_id for s in got] == list(range(5))
    assert skips.counts["unpaired member"] == 2
    assert any("train-000003.tar:x" in k for k in skips.samples["unpaired member"])
    with pytest.raises(BadSampleError, match="unpaired member"):
        list(build_webdataset(cfg, "train", SkipLog(strict=True)))
    # a bare split name finds root/<name>-*.tar ; missing shards of a pattern are counted
    cfg2 = DataConfig(source="webdataset", root=str(out), val="train",
                      test="train-{000000..000009}.tar")
    assert len(list(build_webdataset(cfg2, "val", SkipLog()))) == 5
    sk = SkipLog()
    build_webdataset(cfg2, "test", sk)
    assert sk.counts["missing shard"] == 6
    with pytest.raises(FileNotFoundError):
        build_webdataset(DataConfig(source="webdataset", root=str(out), train="nope-{0..3}.tar"),
                         "train", SkipLog())


def _png_bytes(color) -> bytes:
    import io
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return buf.getvalue()


def test_webdataset_reads_the_caption_from_data_caption_key(tmp_path):
    with wds.TarWriter(str(tmp_path / "train-000000.tar")) as w:
        w.write({"__key__": "000000", "png": _png_bytes((255, 0, 0)),
                 "json": json.dumps({"text": "a red square", "item_id": 7}).encode()})
        w.write({"__key__": "000001", "png": _png_bytes((0, 0, 255)),
                 "json": json.dumps({"text": ["a blue square", "blue"], "caption": "a blue box"}).encode()})
    cfg = DataConfig(source="webdataset", root=str(tmp_path), train="train-000000.tar", caption_key="text")
    skips = SkipLog()
    got = list(build_webdataset(cfg, "train", skips))
    assert [s.captions for s in got] == [["a red square"], ["a blue square", "blue", "a blue box"]]
    assert [s.item_id for s in got] == [7, 1] and [pixel(s) for s in got] == [(255, 0, 0), (0, 0, 255)]
    assert skips.total == 0
    # under the default key ("title") the first sample has no caption at all
    other = SkipLog()
    got = list(build_webdataset(DataConfig(source="webdataset", root=str(tmp_path), train="train-000000.tar"),
                                "train", other))
    assert [s.captions for s in got] == [["a blue box"]] and other.counts["empty caption"] == 1


def test_webdataset_same_keys_in_different_shards_are_not_duplicates(tmp_path):
    cols = {0: [(255, 0, 0), (0, 255, 0)], 1: [(0, 0, 255), (200, 200, 0)]}
    for shard, colors in cols.items():
        with wds.TarWriter(str(tmp_path / f"train-{shard:06d}.tar")) as w:
            for j, c in enumerate(colors):           # both shards use the keys 000000, 000001
                w.write({"__key__": f"{j:06d}", "png": _png_bytes(c), "txt": f"shard {shard} sample {j}"})
    cfg = DataConfig(source="webdataset", root=str(tmp_path), train="train-{000000..000001}.tar")
    skips = SkipLog()
    got = list(build_webdataset(cfg, "train", skips))
    assert [s.captions for s in got] == [[f"shard {i} sample {j}"] for i in range(2) for j in range(2)]
    assert [pixel(s) for s in got] == cols[0] + cols[1]
    assert [s.image_id for s in got] == [0, 1, 2, 3]
    assert skips.total == 0 and skips.counts.get("duplicate key", 0) == 0
