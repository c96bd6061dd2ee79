"""Property-based tests (hypothesis): the csv / jsonl / coco / region parsers never fail on arbitrary
input with anything but their documented error (``SourceFormatError`` naming the file, for a file
that is broken as a whole); bad rows are skipped and counted; valid rows round-trip. The tokenizer
round-trips text up to its own normaliser. Deterministic (``derandomize``) and small for CI."""
from __future__ import annotations

import csv
import io
import json
import math
import unicodedata

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from finealign.config import DataConfig
from finealign.data.skips import SkipLog
from finealign.data.sources.coco import _instance_box, build_coco
from finealign.data.sources.common import SourceFormatError, clean_text, parse_box
from finealign.data.sources.csv_source import build_csv, build_tsv
from finealign.data.sources.jsonl import _BadLine, _regions, build_jsonl
from finealign.data.sources.untrusted import MAX_CAPTION_CHARS, clean_caption
from finealign.data.tokenizer import Tokenizer

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=12)
names = st.sampled_from(["a", "b", "c", "sub/d", "e f"])
captions = st.text(max_size=40)
boxes = st.tuples(*[st.floats(-1e6, 1e6, allow_nan=False)] * 2, *[st.floats(0.5, 1e6)] * 2).map(
    lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]]).filter(lambda b: b[0] < b[2] and b[1] < b[3])


def _expected(rows):
    """(name, caption) rows -> {path: [clean captions, first-seen order, deduplicated]}."""
    out: dict[str, list[str]] = {}
    for n, c in rows:
        c = clean_text(c)
        if c:
            lst = out.setdefault(n, [])
            if c not in lst:
                lst.append(c)
    return out


# ------------------------------------------------------------------------------------ csv / tsv

@FUZZ
@given(body=st.binary(max_size=300), header=st.booleans(), tsv=st.booleans())
def test_csv_arbitrary_bytes_never_crash(tmp_path, body, header, tsv):
    ext = "tsv" if tsv else "csv"
    (tmp_path / f"train.{ext}").write_bytes((b"filepath\ttitle\n" if tsv else b"filepath,title\n")
                                           * header + body)
    skips = SkipLog()
    try:
        samples = (build_tsv if tsv else build_csv)(DataConfig(root=str(tmp_path)), "train", skips)
    except SourceFormatError as e:
        assert f"train.{ext}" in str(e)
        return
    for s in samples:
        assert s.captions and all(c == clean_text(c) and len(c) <= MAX_CAPTION_CHARS for c in s.captions)
    assert all(w.startswith(str(tmp_path / f"train.{ext}:")) for ws in skips.samples.values() for w in ws)


@FUZZ
@given(rows=st.lists(st.tuples(names, captions), max_size=12))
def test_csv_valid_rows_round_trip(tmp_path, rows):
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["filepath", "title"])
    w.writerows([(f"{n}.png", c) for n, c in rows])
    (tmp_path / "train.csv").write_text(buf.getvalue(), encoding="utf-8", newline="")
    skips = SkipLog()
    got = build_csv(DataConfig(root=str(tmp_path)), "train", skips)
    assert {s.key: s.captions for s in got} == {str(tmp_path / f"{n}.png"): c for n, c in _expected(rows).items()}
    assert set(skips.counts) <= {"empty caption"}


# ------------------------------------------------------------------------------------ jsonl

@FUZZ
@given(lines=st.lists(st.binary(max_size=60) | json_values.map(lambda v: json.dumps(v).encode()),
                      max_size=8))
def test_jsonl_arbitrary_lines_never_crash(tmp_path, lines):
    (tmp_path / "train.jsonl").write_bytes(b"\n".join(lines))
    skips = SkipLog()
    samples = build_jsonl(DataConfig(root=str(tmp_path)), "train", skips)
    assert all(s.captions for s in samples)


@FUZZ
@given(obj=st.dictionaries(st.sampled_from(["image", "images", "caption", "captions", "regions",
                                            "item_id", "label"]), json_values, max_size=5))
def test_jsonl_arbitrary_objects_skip_with_reason(tmp_path, obj):
    (tmp_path / "train.jsonl").write_text(json.dumps(obj) + "\n")
    skips = SkipLog()
    samples = build_jsonl(DataConfig(root=str(tmp_path)), "train", skips)
    assert len(samples) + skips.total >= 1            # every line is a sample or a counted skip
    assert skips.total <= 1


@FUZZ
@given(rows=st.lists(st.tuples(names, captions, st.lists(st.tuples(boxes, st.text(max_size=10)),
                                                         max_size=3)), max_size=8))
def test_jsonl_valid_rows_round_trip(tmp_path, rows):
    objs = [{"image": f"{n}.png", "caption": c,
             "regions": [{"box": b, "phrase": p} for b, p in regs]} for n, c, regs in rows]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(o) + "\n" for o in objs))
    skips = SkipLog()
    got = build_jsonl(DataConfig(root=str(tmp_path)), "train", skips)
    assert {s.key: s.captions for s in got} == {str(tmp_path / f"{n}.png"): c
                                                for n, c in _expected([(n, c) for n, c, _ in rows]).items()}
    want_boxes: dict[str, list] = {}
    for n, c, regs in rows:
        if clean_text(c):
            want_boxes.setdefault(str(tmp_path / f"{n}.png"), []).extend(tuple(b) for b, _ in regs)
    assert {s.key: [r.box for r in s.regions] for s in got} == want_boxes


# ------------------------------------------------------------------------------------ coco

@FUZZ
@given(images=json_values, annotations=json_values, raw=st.none() | st.binary(max_size=80))
def test_coco_arbitrary_structures_never_crash(tmp_path, images, annotations, raw):
    f = tmp_path / "c.json"
    if raw is not None:
        f.write_bytes(raw)
    else:
        f.write_text(json.dumps({"images": images, "annotations": annotations}))
    try:
        samples = build_coco(DataConfig(source="coco", root=str(tmp_path), train="c.json"), "train", SkipLog())
    except SourceFormatError as e:
        assert "c.json" in str(e)
        return
    assert all(s.captions for s in samples)


@FUZZ
@given(items=st.lists(st.tuples(st.integers(0, 5), captions), max_size=10))
def test_coco_valid_round_trip(tmp_path, items):
    ids = sorted({i for i, _ in items})
    data = {"images": [{"id": i, "file_name": f"{i}.png"} for i in ids],
            "annotations": [{"image_id": i, "caption": c} for i, c in items]}
    (tmp_path / "c.json").write_text(json.dumps(data))
    got = build_coco(DataConfig(source="coco", root=str(tmp_path), train="c.json"), "train", SkipLog())
    want = {i: [clean_text(c) for j, c in items if j == i and clean_text(c)] for i in ids}
    assert [s.captions for s in got] == [v for v in want.values() if v]


# ------------------------------------------------------------------------------------ regions

@FUZZ
@given(v=json_values)
@example(v=[0, 0, 10**400, 1])                       # found by reading: int beyond float range
@example(v=[0, 0, 1e400, 1])
@example(v=[0, 9007199254740992, 1, 1])             # found by hypothesis 6.170: y + h rounds back to y (2**53 + 1)
@example(v=[1e308, 0, 1e308, 1])                     # x + w overflows to inf
def test_region_parsers_raise_only_value_error(v):
    for fn in (parse_box, _instance_box):
        try:
            out = fn(v)
        except ValueError:
            continue
        assert len(out) == 4 and all(math.isfinite(x) for x in out) and out[0] < out[2] and out[1] < out[3]
    try:
        per_image = _regions({"regions": v}, 2)
    except _BadLine as e:
        assert e.reason == "bad region"
    else:
        assert len(per_image) == 2


@FUZZ
@given(b=boxes)
def test_boxes_round_trip(b):
    assert parse_box(b) == tuple(b)
    x0, y0, x1, y1 = b
    assert _instance_box([x0, y0, x1 - x0, y1 - y0]) == pytest.approx((x0, y0, x1, y1))


# ------------------------------------------------------------------------------------ captions

@settings(FUZZ, max_examples=30)
@given(s=st.text(max_size=300) | st.text(alphabet=" ab\x00\x1b", min_size=4000, max_size=5000))
def test_clean_caption_properties(s):
    out, notes = clean_caption(s)
    assert out == clean_caption(out)[0]                              # idempotent
    assert len(out) <= MAX_CAPTION_CHARS and out == out.strip()
    assert not any(ord(ch) < 32 or 0xD800 <= ord(ch) <= 0xDFFF for ch in out)
    bad = [ch for ch in s if unicodedata.category(ch) == "Cs"
           or (unicodedata.category(ch) == "Cc" and not ch.isspace())]
    ref = " ".join("".join(" " if ch in bad else ch for ch in s).split())   # specification, uncut
    assert ("control characters removed" in notes) == bool(bad)
    assert ("caption truncated" in notes) == (len(ref) > MAX_CAPTION_CHARS)
    assert out == ref if len(ref) <= MAX_CAPTION_CHARS else (ref.startswith(out) and ref[len(out)] == " ")


# ------------------------------------------------------------------------------------ tokenizer

@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(["a red circle left of a blue square", "Zwei Katzen schlafen",
                            "émoji 🐱 cat", "数字 123"] * 5, 400)


@FUZZ
@given(s=st.text(max_size=60))
def test_tokenizer_round_trip_up_to_its_normaliser(tok, s):
    """decode(encode(s)) == s after the tokenizer's normaliser (NFKC, lower-case, whitespace collapsed
    and stripped); the special tokens' spellings (e.g. "<pad>") are the only text not round-tripped."""
    if any(sp in s.lower() for sp in ("<pad>", "<bos>", "<eos>", "<unk>", "<mask>")):
        return
    ids, mask = tok.encode(s, 4 * len(s.encode()) + 8)
    want = " ".join(tok.hf.normalizer.normalize_str(s).split())
    assert tok.decode(ids) == want
    assert int(ids[mask][-1]) == tok.eos_id and int(ids[0]) == tok.bos_id


@FUZZ
@given(s=st.text(max_size=80), T=st.integers(2, 12))
def test_tokenizer_truncation_keeps_eos(tok, s, T):
    ids, mask = tok.encode(s, T)
    n = int(mask.sum())
    assert ids.shape == (T,) and 2 <= n <= T and bool(mask[:n].all()) and not bool(mask[n:].any())
    assert int(ids[n - 1]) == tok.eos_id


# ------------------------------------------------------------------------------------ webdataset

@settings(FUZZ, max_examples=25)
@given(members=st.lists(st.tuples(st.sampled_from(["a", "b", "../a", "/b", "a/../../b", "c/d", "./e"])
                                  | st.text(alphabet="ab./", min_size=1, max_size=6),
                                  st.sampled_from(["png", "txt", "json"]),
                                  st.binary(max_size=40) | st.text(min_size=1, max_size=20).map(str.encode)),
                        max_size=10).map(lambda ms: [m for k, e, d in ms                  # mostly pairs
                                                     for m in ([(k, e, d)] if e == "json" else
                                                               [(k, "png", d), (k, "txt", d)])]))
def test_webdataset_arbitrary_members_never_crash_or_escape(tmp_path, members):
    import tarfile
    from pathlib import PurePosixPath

    from finealign.data.sources.webdataset_source import build_webdataset
    with tarfile.open(tmp_path / "s.tar", "w") as t:
        for key, ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    skips = SkipLog()
    got = list(build_webdataset(DataConfig(source="webdataset", root=str(tmp_path), train="s.tar"),
                                "train", skips))
    keys = [s.key.split("s.tar:", 1)[1] for s in got]
    assert len(keys) == len(set(keys))                                # no duplicate keys
    for k in keys:
        assert not k.startswith("/") and ".." not in PurePosixPath(k).parts
    assert all(s.captions and all(c == clean_text(c) for c in s.captions) for s in got)
