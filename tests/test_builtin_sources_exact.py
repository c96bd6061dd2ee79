"""Exact behaviour of the built-in procedural / emoji sources, pinned line by line.

* ``emoji``: the regional-indicator fallback of ``group_of``, the multi-glyph refusal and centring of
  ``render_emoji``, the compositional split rules of ``assign_splits`` on hand-made entries (held tone
  rotated with the seed and always present, single-tone -> test, two-tone -> val, toneless bases by
  their hash percent), ``emoji_entries`` (fully-qualified only, sorted, ``limit`` halves), the stats and
  atomic swap of a tiny build, and the ``EmojiJsonl`` row checks (bad bytes, blank lines, bool/missing
  ``item_id``, paths outside the root, ``max_pixels``, split names).
* captions: articles, group phrases, tone lists and tag-sequence flags.
* ``shapes``: geometry / drawing / regions on hand-built scenes and views, scene and view invariants
  from the module docstring, dataset indexing, keys and split names.
* ``shapes_vqa`` and ``tgir``: ``visible``, ``max_images``, object naming, target primary / caption /
  item ids / regions.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import emoji as emoji_lib
import numpy as np
import pytest
from PIL import Image

from finealign.config import DataConfig
from finealign.data.skips import SkipLog
from finealign.data.sources import emoji as E
from finealign.data.sources import emoji_captions as C
from finealign.data.sources import shapes as S
from finealign.data.sources.shapes_vqa import build_vqa, vqa_questions
from finealign.data.sources.tgir import edit_scene, shapes_tgir
from finealign.registry import SOURCES

needs_font = pytest.mark.skipif(not Path(E.DEFAULT_FONT).is_file(), reason="emoji font missing")


# ----------------------------------------------------------------------------- emoji: groups, rendering

def test_regional_indicator_pairs_fall_back_to_flags_only_as_pairs():
    zz = "\U0001F1FF\U0001F1FF"                        # "ZZ": no such flag, but a regional-indicator pair
    assert E.group_of(zz) == ("Flags", "country-flag")
    assert E.group_of("\U0001F1E6" * 3) == ("unknown", "unknown")      # three indicators: not a flag
    assert E._unified_key("1F3C4-200D-2640-FE0F") == (0x1F3C4, 0x200D, 0x2640)   # its docstring example


@needs_font
def test_render_refuses_several_glyphs_and_centres_the_crop():
    font = E.load_font()
    assert E.render_emoji("\U0001F600\U0001F600", font, 32) == (None, "multi_glyph")
    img, why = E.render_emoji("\u2796", font, 64)            # heavy minus sign: much wider than tall
    assert why == "" and img.size == (64, 64)
    ink = (np.asarray(img).astype(int) < 250).any(-1)
    rows = np.flatnonzero(ink.any(1))
    top, bottom = rows[0], 63 - rows[-1]
    assert top > 10 and abs(top - bottom) <= 2                  # pasted in the middle of the square


# ----------------------------------------------------------------------------- emoji: split

def _entry(base, *tones):
    return {"base": base, "tones": list(tones)}


def _held(entries, base):
    return {t for e in entries if e["base"] == base and e["split"] == "test" for t in e["tones"]}


def test_assign_splits_rotation_presence_and_multi_tone_rules():
    five = [_entry(b, t) for b in "abcde" for t in E.TONES]
    entries = five + [_entry("f"), _entry("f", "dark"), _entry("g", "light"), _entry("g", "dark", "dark"),
                      _entry("g", "light", "dark")]
    E.assign_splits(entries, seed=0)
    assert [next(iter(_held(entries, b))) for b in "abcde"] == list(E.TONES)   # base i holds out TONES[i]
    assert [e["split"] for e in entries if e["base"] == "f"] == ["train", "test"]  # only tone present: dark
    assert [e["split"] for e in entries if e["base"] == "g"] == ["train", "test", "val"]
    again = [dict(e) for e in five]
    E.assign_splits(again, seed=1)                               # the seed shifts the rotation by one
    assert [next(iter(_held(again, b))) for b in "abcde"] == list(E.TONES[1:] + E.TONES[:1])


def test_toneless_bases_split_by_hash_percent():
    want = {}
    k = 0
    while set(want) != {0, 9, 10, 19, 20}:
        name = f"plain {k}"
        h = E._hash_percent(3, name)
        if h in (0, 9, 10, 19, 20) and h not in want:
            want[h] = name
        k += 1
    entries = [_entry(n) for n in want.values()]
    E.assign_splits(entries, seed=3)
    got = {h: e["split"] for h, e in zip(want, entries)}
    assert got == {0: "val", 9: "val", 10: "test", 19: "test", 20: "train"}


def test_emoji_entries_fully_qualified_sorted_and_limited():
    full = E.emoji_entries()
    fq = emoji_lib.STATUS["fully_qualified"]
    assert len(full) == sum(d.get("status") == fq for d in emoji_lib.EMOJI_DATA.values())
    assert all(emoji_lib.EMOJI_DATA[e["emoji"]]["status"] == fq for e in full)
    assert [e["cldr"] for e in full] == sorted(e["cldr"] for e in full)
    small = E.emoji_entries(3)                     # (3 + 1) // 2 = 2 toned bases, 3 // 2 = 1 plain one
    toned = {e["base"] for e in small if e["tones"]}
    assert len(toned) == 2 and len({e["base"] for e in small} - toned) == 1


# ----------------------------------------------------------------------------- emoji: build

@needs_font
def test_tiny_build_stats_item_ids_and_swap(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()                                                # an existing empty dir may be replaced
    stats = E.build_emoji_dataset(out, size=16, limit=10, progress=False)   # 5 toned + 5 plain bases
    assert out.stat().st_mode & 0o777 == 0o755
    rows = [json.loads(line) for s in ("train", "val", "test")
            for line in (out / f"{s}.jsonl").read_text(encoding="utf-8").splitlines()]
    labels = sorted({r["label"] for r in rows})
    assert stats["bases"] == len(labels) == 10 and stats["toned_bases"] == 5
    assert stats["groups"] == len({r["group"] for r in rows})
    # ids follow the sorted bases (":AB_button..." comes before ":A_button..." in CLDR order)
    assert all(r["item_id"] == labels.index(r["label"]) for r in rows)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError):
        E.build_emoji_dataset(tmp_path / "foreign", size=16, limit=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "foreign"]      # no temp dir left


# ----------------------------------------------------------------------------- emoji: the source

def test_emoji_rows_bad_bytes_blank_lines_item_ids_and_root(tmp_path):
    lines = [json.dumps({"image": "a.png", "caption": "a cat"}).encode(),
             b'{"image": "b.png", "caption": "bad \xff byte", "item_id": 1}',
             b"   ",
             json.dumps({"image": "c.png", "caption": "a dog", "item_id": True}).encode(),
             json.dumps({"image": "../d.png", "caption": "a cow", "item_id": 4}).encode(),
             json.dumps({"image": "e.png", "caption": "a hen", "item_id": 5}).encode()]
    (tmp_path / "holdout.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    cfg = DataConfig(source="emoji", root=str(tmp_path), val="holdout")
    skips = SkipLog()
    ds = SOURCES.get("emoji")(cfg, "val", skips)                 # "val" -> cfg.val -> holdout.jsonl
    assert [(s.captions[0], s.item_id, s.image_id) for s in ds] == [("a cat", -1, 0), ("a hen", 5, 1)]
    assert skips.total == 3 and skips.counts["invalid utf-8"] == 1 and skips.counts["path outside root"] == 1
    assert skips.counts["malformed jsonl row: 'item_id' is not an integer"] == 1
    loose = SOURCES.get("emoji")(DataConfig(source="emoji", root=str(tmp_path / "elsewhere"),
                                            allow_outside_root=True), str(tmp_path / "holdout.jsonl"), SkipLog())
    assert [s.captions[0] for s in loose] == ["a cat", "a cow", "a hen"]    # a .jsonl path is used as is
    with pytest.raises(FileNotFoundError, match="no split 'nope'"):
        SOURCES.get("emoji")(cfg, "nope", SkipLog())


def test_emoji_max_pixels_is_a_strict_bound(tmp_path):
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "a.png")
    (tmp_path / "train.jsonl").write_text(json.dumps({"image": "a.png", "caption": "x", "item_id": 0}) + "\n")
    for limit, ok in ((16, True), (15, False)):
        cfg = DataConfig(source="emoji", root=str(tmp_path), max_image_pixels=limit)
        s = SOURCES.get("emoji")(cfg, "train", SkipLog())[0]
        if ok:
            assert s.load_image().getpixel((0, 0)) == (1, 2, 3)
        else:
            with pytest.raises(Image.DecompressionBombError):
                s.load_image()


# ----------------------------------------------------------------------------- captions

def test_articles_tones_and_tag_flags():
    assert [C._article([w]) for w in ("8", "11", "18", "1", "user", "umbrella")] == \
        ["an ", "an ", "an ", "a ", "a ", "an "]
    assert C.tone_phrase(("light", "medium", "dark", "light")) == "light, medium and dark skin tones"
    scotland = "\U0001F3F4\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F"
    assert C.caption_for(":Scotland:", scotland) == "the flag of scotland"


# ----------------------------------------------------------------------------- shapes: geometry, drawing

def _obj(shape="circle", colour="red", size="large", cell=(1, 1), jitter=(0.0, 0.0)):
    return S.Obj(shape=shape, colour=colour, size=size, cell=cell, jitter=jitter)


def _scene(*objs, shade=30):
    return S.Scene(tuple(objs), tuple(range(len(objs))), 0, True, shade, "unused")


def test_geometry_by_hand():
    o = _obj(cell=(2, 0), jitter=(0.01, -0.02))
    cx, cy, r = S._geometry(o, S.View(), 64)
    assert (cx, cy, r) == pytest.approx(((5 / 6 + 0.01) * 64, (1 / 6 - 0.02) * 64, 0.27 * 32))
    cx2, cy2, r2 = S._geometry(o, S.View(shift=(2.0, -3.0), scale=0.5), 64)
    assert (cx2, cy2, r2) == pytest.approx(((cx - 32) * 0.5 + 34, (cy - 32) * 0.5 + 29, 0.27 * 16))


def test_square_half_cover_and_regions():
    px = np.asarray(S.render(_scene(_obj("square"))))
    red = (px == S.COLOURS["red"]).all(-1)
    assert 200 < red.sum() < 270                 # side 2 * 0.9 * 8.64 = 15.6 px, not 2 * 8.64 = 17.3
    scene = _scene(_obj("circle"), _obj("square", "blue", "small", (0, 0)))
    half = S.View(half=0)
    px = np.asarray(S.render(scene, half))
    red = (px == S.COLOURS["red"]).all(-1)
    cols = np.flatnonzero(red.any(0))
    assert cols.min() < 26 and cols.max() <= 32               # only the left half of the circle is drawn
    cx, cy, r = S._geometry(scene.objects[0], half, 64)
    assert S.regions(scene, half)[0].box == tuple(round(b, 2) for b in (cx - r, cy - r, cx, cy + r))
    edge = S.View(shift=(-12.0, 0.0))
    x0 = S.regions(scene, edge)[1].box[0]
    assert x0 == 0.0                                          # 32/3 - 12 - 5.44 < 0: clipped


def test_scene_and_view_invariants():
    darks = set()
    for i in range(150):
        sc = S.make_scene(0, "train", i)
        first_large = next((j for j, o in enumerate(sc.objects) if o.size == "large"), 0)
        assert sc.primary == first_large
        assert (15 <= sc.shade <= 55) if sc.dark else (200 <= sc.shade <= 240)
        if "background" in sc.caption:
            assert sc.caption.endswith("on a dark background" if sc.dark else "on a light background")
            darks.add(sc.dark)
        for v in (1, 2):
            view = S.make_view(sc, 0, "train", i, v)
            assert (15 <= view.shade <= 55) if sc.dark else (200 <= view.shade <= 240)
            for k in (view.hidden, view.half):
                assert k is None or (k != sc.primary and k in sc.mentioned)
    assert darks == {True, False}


def test_dataset_index_keys_and_split_names():
    ds = SOURCES.get("shapes")(DataConfig(source="shapes", num_samples=7), "train", SkipLog())
    assert ds[-1].key == ds[6].key == "shapes/train/6" and ds[-7].image_id == 0
    items = SOURCES.get("shapes-items")(DataConfig(source="shapes-items", num_samples=9), "train", SkipLog())
    assert [items[k].key for k in (0, 5)] == ["shapes-items/train/0/0", "shapes-items/train/1/2"]
    assert len(SOURCES.get("shapes")(DataConfig(source="shapes"), "dev", SkipLog())) == 500
    renamed = SOURCES.get("shapes")(DataConfig(source="shapes", num_samples=2, val="holdout"), "val", SkipLog())
    assert renamed[1].key == "shapes/holdout/1"
    assert renamed[1].captions == [S.make_scene(0, "holdout", 1).caption]
    with pytest.raises(ValueError):
        S.ShapesDataset(0, "train", 3, views=0)


# ----------------------------------------------------------------------------- vqa, tgir

def test_vqa_visible_and_max_images():
    sc = _scene(_obj("circle", "red", "large", (0, 0)), _obj("star", "green", "small", (2, 2)))
    assert vqa_questions(sc, visible=(1,)) == [("how many shapes are there?", "one", "count"),
                                               ("what colour is the small star?", "green", "colour"),
                                               ("where is the small green star?", "bottom-right", "position")]
    got = build_vqa(DataConfig(source="shapes", num_samples=4), "test", max_images=10)
    assert sorted({x.key for x in got}) == [f"shapes/test/{i}" for i in range(4)]
    items = build_vqa(DataConfig(source="shapes-items", num_samples=7), "test")
    assert sorted({x.key for x in items}) == ["shapes-items/test/0/0", "shapes-items/test/1/0"]


def test_tgir_naming_targets_and_gallery():
    sc = _scene(_obj("circle", "red", "large", (0, 0)), _obj("star", "green", "small", (2, 2)))
    _, text, e = edit_scene(sc, 0, "test", 0)
    assert sc.objects[e.obj].phrase in text and not any(p in text for p in S.POSITIONS.values())
    moved = 0
    for i in range(40):
        ref = S.make_scene(0, "test", i)
        tgt, _, e = edit_scene(ref, 0, "test", i)
        assert tgt.primary == next((j for j, o in enumerate(tgt.objects) if o.size == "large"), 0)
        moved += tgt.primary != ref.primary
        o = tgt.objects[e.obj]
        assert f"a {o.phrase} {S.POSITIONS[o.cell]}" in tgt.caption
        assert len(tgt.caption.split(" and ")) + tgt.caption.count(", ") == len(ref.mentioned)
    assert moved > 0
    tg = shapes_tgir(DataConfig(source="shapes", num_samples=3), "test")
    assert [g.item_id for g in tg.gallery] == [0, 1, 2, 0, 1, 2]
    for g in tg.gallery:
        assert g.regions and all(r.phrase in g.captions[0] for r in g.regions)
    assert math.isclose(len(tg.gallery) / len(tg.queries), 2)
