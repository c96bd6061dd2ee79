"""File sources read exactly: hand-worked ids, line numbers, captions and skip counts on small real files.

Each test pins one behaviour of csv / jsonl / coco / webdataset reading (or of the shared helpers
in ``common`` / ``untrusted`` / ``skips``) that a plausible slip in the parser would change."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from finealign.config import DataConfig
from finealign.data.skips import SkipLog
from finealign.data.sources.coco import build_coco
from finealign.data.sources.csv_source import build_csv
from finealign.data.sources.jsonl import build_jsonl
from finealign.data.sources.untrusted import unsafe_member_name
from finealign.data.sources.webdataset_source import build_webdataset


def _png(path: Path, color=(255, 0, 0), size=(4, 3)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ csv

def test_csv_blank_and_separator_only_lines_are_neither_rows_nor_skips(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png", (0, 0, 255))
    # line 1 header, 2 blank, 3 row, 4 only separators, 5 blank-ish spaces, 6 row, 7 bad (3 fields)
    _write(tmp_path / "train.csv",
           "filepath,title\n\na.png,red one\n,\n  ,  \nb.png,blue one\nb.png,x,y\n")
    skips = SkipLog()
    samples = build_csv(DataConfig(source="csv", root=str(tmp_path)), "train", skips)
    assert [s.captions for s in samples] == [["red one"], ["blue one"]]
    assert dict(skips.counts) == {"wrong field count": 1}
    assert skips.samples["wrong field count"] == [f"{tmp_path / 'train.csv'}:7"]


def test_csv_skip_names_the_line_a_multi_line_row_starts_on(tmp_path):
    _png(tmp_path / "a.png")
    # line 1 header, 2 row, 3-4 one row with a quoted two-line caption and a third field, 5 bad row
    _write(tmp_path / "train.csv", 'filepath,title\na.png,ok\na.png,"two\nlines",extra\na.png\n')
    skips = SkipLog()
    samples = build_csv(DataConfig(source="csv", root=str(tmp_path)), "train", skips)
    assert [s.captions for s in samples] == [["ok"]]
    assert skips.samples["wrong field count"] == [f"{tmp_path / 'train.csv'}:{n}" for n in (3, 5)]


# ---------------------------------------------------------------------------------------- jsonl

def test_jsonl_blank_and_whitespace_lines_are_not_counted(tmp_path):
    _png(tmp_path / "a.png")
    lines = ['{"image": "a.png", "caption": "one"}', "", "   \t ", '{"image": "a.png", "caption": "two"}',
             "{not json"]
    _write(tmp_path / "train.jsonl", "\n".join(lines) + "\n")
    skips = SkipLog()
    samples = build_jsonl(DataConfig(source="jsonl", root=str(tmp_path)), "train", skips)
    assert len(samples) == 1 and samples[0].captions == ["one", "two"]
    assert dict(skips.counts) == {"malformed json": 1}
    assert skips.samples["malformed json"] == [f"{tmp_path / 'train.jsonl'}:5"]


def test_jsonl_item_ids_are_dense_first_seen_and_typed(tmp_path):
    for n in "abcde":
        _png(tmp_path / f"{n}.png")
    rows = [{"image": "a.png", "caption": "x", "item_id": 7},
            {"image": "b.png", "caption": "x"},                      # no id: a fresh one
            {"image": "c.png", "caption": "x", "item_id": "7"},      # the string "7" is not the int 7
            {"image": "d.png", "caption": "x", "item_id": 7},        # same item as line 1
            {"image": "e.png", "caption": "x", "item_id": 1}]
    _write(tmp_path / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    samples = build_jsonl(DataConfig(source="jsonl", root=str(tmp_path)), "train", SkipLog())
    assert [Path(s.key).name for s in samples] == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    assert [s.image_id for s in samples] == [0, 1, 2, 3, 4]
    assert [s.item_id for s in samples] == [0, 1, 2, 0, 3]


def test_jsonl_region_image_index_targets_one_image(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    row = {"images": ["a.png", "b.png"], "caption": "two pictures", "item_id": 3,
           "regions": [{"box": [0, 0, 2, 2], "phrase": "left", "image": 1},
                       {"box": [1, 1, 3, 2], "phrase": "both"}]}
    _write(tmp_path / "train.jsonl", json.dumps(row) + "\n")
    samples = build_jsonl(DataConfig(source="jsonl", root=str(tmp_path)), "train", SkipLog())
    assert len(samples) == 2
    assert samples[0].item_id == samples[1].item_id == 0
    assert [(r.box, r.phrase) for r in samples[0].regions] == [((1.0, 1.0, 3.0, 2.0), "both")]
    assert [(r.box, r.phrase) for r in samples[1].regions] == [((0.0, 0.0, 2.0, 2.0), "left"),
                                                              ((1.0, 1.0, 3.0, 2.0), "both")]


def test_sibling_directory_with_root_as_name_prefix_is_outside(tmp_path):
    data = tmp_path / "data"
    _png(data / "in.png")
    _png(tmp_path / "data2" / "x.png")            # "/.../data2" starts with "/.../data" as a string
    rows = [{"image": "in.png", "caption": "inside"}, {"image": "../data2/x.png", "caption": "outside"}]
    _write(data / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    skips = SkipLog()
    samples = build_jsonl(DataConfig(source="jsonl", root=str(data)), "train", skips)
    assert [s.captions for s in samples] == [["inside"]]
    assert dict(skips.counts) == {"path outside root": 1}
    assert skips.samples["path outside root"] == [f"{data / 'train.jsonl'}:2"]


# ----------------------------------------------------------------------------------------- coco

def test_coco_ids_stay_dense_when_an_image_has_no_caption(tmp_path):
    for n, col in (("a", (255, 0, 0)), ("b", (0, 255, 0)), ("c", (0, 0, 255))):
        _png(tmp_path / f"{n}.png", col)
    data = {"images": [{"id": 10, "file_name": "a.png"}, {"id": 20, "file_name": "b.png"},
                       {"id": 30, "file_name": "c.png"}],
            "annotations": [{"image_id": 30, "caption": "blue 1"}, {"image_id": 10, "caption": "red 1"},
                            {"image_id": 30, "caption": "blue 2"}]}
    _write(tmp_path / "captions_val2014.json", json.dumps(data))
    skips = SkipLog()
    samples = build_coco(DataConfig(source="coco", root=str(tmp_path)), "val", skips)
    assert [Path(s.key).name for s in samples] == ["a.png", "c.png"]
    assert [s.captions for s in samples] == [["red 1"], ["blue 1", "blue 2"]]
    assert [s.image_id for s in samples] == [0, 1]
    assert [s.item_id for s in samples] == [0, 1]
    assert samples[1].load_image().getpixel((0, 0)) == (0, 0, 255)
    assert dict(skips.counts) == {"empty caption": 1}
    assert skips.samples["empty caption"] == [f"{tmp_path / 'captions_val2014.json'}:images[1]"]


# ----------------------------------------------------------------------------------- untrusted

def test_long_caption_cut_at_a_word_boundary_keeps_the_full_word(tmp_path):
    _png(tmp_path / "a.png")
    head = "w" * 2000 + " " + "v" * 2095                # 4096 chars: the cut lands exactly before a space
    _write(tmp_path / "train.jsonl", json.dumps({"image": "a.png", "caption": head + " tail"}) + "\n")
    skips = SkipLog()
    samples = build_jsonl(DataConfig(source="jsonl", root=str(tmp_path)), "train", skips)
    assert samples[0].captions == [head]
    assert dict(skips.notes) == {"caption truncated": 1} and skips.total == 0


@pytest.mark.parametrize("key,unsafe", [("C:evil", True), ("\\evil", True), ("/etc/x", True),
                                        ("a/../../x", True), ("a\\..\\x", True), ("dir/ok_1", False),
                                        ("C_ok", False)])
def test_unsafe_member_names_include_windows_anchors(key, unsafe):
    assert unsafe_member_name(key) is unsafe


def _png_bytes(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (3, 2), color).save(buf, format="PNG")
    return buf.getvalue()


def test_shard_member_with_drive_anchor_is_refused(tmp_path):
    shard = tmp_path / "train-000000.tar"
    with wds.TarWriter(str(shard)) as w:
        w.write({"__key__": "good", "png": _png_bytes((0, 255, 0)), "txt": "green"})
        w.write({"__key__": "C:evil", "png": _png_bytes((255, 0, 0)), "txt": "red"})
    skips = SkipLog()
    src = build_webdataset(DataConfig(source="webdataset", root=str(tmp_path), train="train-000000.tar"),
                           "train", skips)
    samples = list(src)
    assert [s.captions for s in samples] == [["green"]]
    assert samples[0].load_image().getpixel((0, 0)) == (0, 255, 0)
    assert dict(skips.counts) == {"unsafe member name": 1}
    assert skips.samples["unsafe member name"] == [f"{shard}:C:evil"]


# -------------------------------------------------------------------------------------- common

def test_image_beside_the_table_wins_over_the_same_name_under_root(tmp_path):
    _png(tmp_path / "a.png", (255, 0, 0))                 # root/a.png: red
    _png(tmp_path / "tables" / "a.png", (0, 0, 255))      # beside the table: blue
    _write(tmp_path / "tables" / "train.csv", "filepath,title\na.png,which one\n")
    samples = build_csv(DataConfig(source="csv", root=str(tmp_path), train="tables/train.csv"), "train",
                        SkipLog())
    assert len(samples) == 1
    assert samples[0].key == str(tmp_path / "tables" / "a.png")
    assert samples[0].load_image().getpixel((0, 0)) == (0, 0, 255)


# --------------------------------------------------------------------------------------- skips

def test_skiplog_update_adds_counts_beyond_the_kept_examples():
    worker = SkipLog(examples=2)
    for i in range(5):
        worker.skip("missing file", f"f{i}")
    for i in range(3):
        worker.note("caption truncated", f"n{i}")
    main = SkipLog(examples=2)
    main.skip("missing file", "m0")
    main.update(worker)
    assert main.counts == {"missing file": 6} and main.total == 6
    assert main.samples["missing file"] == ["m0", "f0"]
    assert main.notes == {"caption truncated": 3}
    assert main.note_samples["caption truncated"] == ["n0", "n1"]


def test_skiplog_keeps_exactly_examples_per_reason():
    log = SkipLog(examples=3)
    for i in range(5):
        log.skip("corrupt image", f"k{i}")
    assert log.counts == {"corrupt image": 5}
    assert log.samples == {"corrupt image": ["k0", "k1", "k2"]}


# ------------------------------------------------------------------------------ more exact reads

def test_csv_header_names_are_stripped(tmp_path):
    _png(tmp_path / "a.png")
    _write(tmp_path / "train.csv", " filepath ,  title \na.png,padded header\n")
    samples = build_csv(DataConfig(source="csv", root=str(tmp_path)), "train", SkipLog())
    assert [s.captions for s in samples] == [["padded header"]]


def test_jsonl_null_key_falls_through_to_the_next_known_key(tmp_path):
    _png(tmp_path / "a.png")
    row = {"filepath": None, "image": "a.png", "title": None, "caption": "from caption key"}
    _write(tmp_path / "train.jsonl", json.dumps(row) + "\n")
    skips = SkipLog()
    samples = build_jsonl(DataConfig(source="jsonl", root=str(tmp_path)), "train", skips)
    assert [s.captions for s in samples] == [["from caption key"]] and skips.total == 0
    assert samples[0].key == str(tmp_path / "a.png")


def test_coco_instances_become_regions_and_unknown_ids_are_counted(tmp_path):
    _png(tmp_path / "a.png")
    caps = {"images": [{"id": 10, "file_name": "a.png"}], "annotations": [{"image_id": 10, "caption": "cat"}]}
    inst = {"categories": [{"id": 1, "name": "cat"}, {"id": 2}],
            "annotations": [{"image_id": 10, "bbox": [1, 2, 3, 4], "category_id": 1},
                            {"image_id": 99, "bbox": [0, 0, 1, 1], "category_id": 1},
                            {"image_id": 10, "bbox": [0, 0, 0, 1], "category_id": 1},
                            {"image_id": 10, "bbox": [0.5, 0, 1, 1], "category_id": 1}]}
    _write(tmp_path / "captions_val2017.json", json.dumps(caps))
    ipath = _write(tmp_path / "instances_val2017.json", json.dumps(inst))
    skips = SkipLog()
    samples = build_coco(DataConfig(source="coco", root=str(tmp_path)), "val", skips)
    assert [(r.box, r.phrase) for r in samples[0].regions] == [((1.0, 2.0, 4.0, 6.0), "cat"),
                                                              ((0.5, 0.0, 1.5, 1.0), "cat")]
    assert dict(skips.counts) == {"bad category": 1, "unknown image id": 1, "bad instance": 1}
    assert skips.samples["unknown image id"] == [f"{ipath}:annotations[1]"]
    assert skips.samples["bad instance"] == [f"{ipath}:annotations[2]"]
    assert skips.samples["bad category"] == [f"{ipath}:categories[1]"]


def test_karpathy_falls_back_to_the_bare_file_name(tmp_path):
    _png(tmp_path / "a.png", (0, 0, 255))                 # not under root/val2014/ as filepath says
    data = {"images": [{"filepath": "val2014", "filename": "a.png", "split": "val",
                        "sentences": [{"raw": "blue"}, {"tokens": ["a", "blue", "tile"]}]},
                       {"filepath": "val2014", "filename": "b.png", "split": "train",
                        "sentences": [{"raw": "other split"}]}]}
    _write(tmp_path / "dataset_coco.json", json.dumps(data))
    samples = build_coco(DataConfig(source="coco", root=str(tmp_path)), "val", SkipLog())
    assert len(samples) == 1 and samples[0].captions == ["blue", "a blue tile"]
    assert samples[0].load_image().getpixel((0, 0)) == (0, 0, 255)


def test_shard_json_metadata_is_read_exactly(tmp_path):
    shard = tmp_path / "train-000000.tar"
    meta = {"caption": "first", "captions": ["first", "second"], "item_id": 42, "label": 5,
            "regions": [{"box": [0, 0, 2, 1], "phrase": "left  half"}, {"box": [2, 0, 1, 1], "phrase": "bad"}]}
    with wds.TarWriter(str(shard)) as w:
        w.write({"__key__": "s0", "png": _png_bytes((9, 8, 7)), "json": json.dumps(meta).encode()})
        w.write({"__key__": "s1", "png": _png_bytes((1, 2, 3)), "txt": "plain"})
    samples = list(build_webdataset(DataConfig(source="webdataset", root=str(tmp_path),
                                               train="train-000000.tar"), "train", SkipLog()))
    assert [s.captions for s in samples] == [["first", "second"], ["plain"]]
    assert [(s.image_id, s.item_id) for s in samples] == [(0, 42), (1, 1)]
    assert samples[0].label == "5" and samples[1].label is None
    assert [(r.box, r.phrase) for r in samples[0].regions] == [((0.0, 0.0, 2.0, 1.0), "left half")]
    assert samples[1].regions == []
    assert samples[1].load_image().getpixel((2, 1)) == (1, 2, 3)
