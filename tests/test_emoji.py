"""The emoji dataset builder, its captions and compositional split, and the ``emoji`` source."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from finealign.config import DataConfig
from finealign.data.skips import BadSampleError, SkipLog
from finealign.data.sources import emoji as E
from finealign.registry import SOURCES

needs_font = pytest.mark.skipif(not Path(E.DEFAULT_FONT).is_file(),
                                reason=f"emoji font missing at {E.DEFAULT_FONT} "
                                       "(apt-get install fonts-noto-color-emoji)")


@pytest.mark.parametrize("name, caption", [
    (":man_office_worker_medium-dark_skin_tone:", "a man office worker with medium-dark skin tone"),
    (":couple_with_heart_woman_woman_medium-dark_skin_tone_dark_skin_tone:",
     "a couple with heart of two women with medium-dark and dark skin tones"),
    (":handshake_light_skin_tone:", "a handshake with light skin tone"),
    (":man_red_hair:", "a man with red hair"),
    (":woman_medium_skin_tone_beard:", "a woman with a beard and medium skin tone"),
    (":person_dark_skin_tone_bald:", "a bald person with dark skin tone"),
    (":family_man_woman_girl_boy:", "a family of a man, a woman, a girl and a boy"),
    (":eagle:", "an eagle"),
    (":one_o’clock:", "a one o'clock"),
    (":OK_hand:", "an ok hand"),
    (":clapping_hands:", "clapping hands"),
    (":smiling_face_with_sunglasses:", "a smiling face with sunglasses"),
    (":piñata:", "a pinata"),
    (":Aries:", "the zodiac sign aries"),
])
def test_captions(name, caption):
    assert E.caption_for(name) == caption


def test_flag_caption_and_parse():
    assert E.caption_for(":Réunion:", "\U0001F1F7\U0001F1EA") == "the flag of reunion"
    p = E.parse_name(":man_medium-light_skin_tone_curly_hair:")
    assert (p.base, p.tones, p.hair) == ("man", ("medium-light",), "curly hair")
    assert E.parse_name(":kiss_person_person_light_skin_tone_dark_skin_tone:").base == "kiss"
    assert E.tone_phrase(("dark", "dark")) == "dark skin tone"


def _check_split(rows: list[dict]) -> None:
    """Test (base, tone) pairs never occur in train; every test tone occurs in train elsewhere."""
    train_pairs = {(r["label"], t) for r in rows if r["split"] == "train" for t in r["tones"]}
    tone_bases = defaultdict(set)
    for b, t in train_pairs:
        tone_bases[t].add(b)
    test_tones = set()
    for r in rows:
        if r["split"] == "test":
            for t in r["tones"]:
                assert (r["label"], t) not in train_pairs, r
                assert tone_bases[t] - {r["label"]}, f"tone {t} never seen in train"
                test_tones.add(t)
    assert test_tones == set(E.TONES)


def test_split_property_on_full_list():
    entries = E.emoji_entries()
    E.assign_splits(entries, seed=0)
    rows = [{"label": e["base"], "tones": e["tones"], "split": e["split"]} for e in entries]
    _check_split(rows)
    n = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    assert 0.08 < n["test"] / len(rows) < 0.18 and n["val"] > 0
    toned = {r["label"] for r in rows if r["tones"]}
    # every toned base keeps training images (its other tones) and holds out exactly one tone
    for b in toned:
        held = {t for r in rows if r["label"] == b and r["split"] == "test" for t in r["tones"]}
        assert len(held) == 1, b
        assert any(r["split"] == "train" and r["tones"] for r in rows if r["label"] == b)
    other = E.emoji_entries()
    E.assign_splits(other, seed=1)
    assert [e["split"] for e in other] != [r["split"] for r in rows]


def test_missing_font_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install fonts-noto-color-emoji"):
        E.build_emoji_dataset(tmp_path / "out", font=tmp_path / "nope.ttf", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def small_builds(tmp_path_factory):
    if not Path(E.DEFAULT_FONT).is_file():
        pytest.skip(f"emoji font missing at {E.DEFAULT_FONT} (apt-get install fonts-noto-color-emoji)")
    root = tmp_path_factory.mktemp("emoji")
    stats = [E.build_emoji_dataset(root / name, size=32, limit=12, progress=False) for name in ("a", "b")]
    return root / "a", root / "b", stats


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@needs_font
def test_build_is_deterministic(small_builds):
    a, b, stats = small_builds
    assert stats[0]["total"] == stats[0]["train"] + stats[0]["val"] + stats[0]["test"] > 30
    for split in ("train", "val", "test"):
        assert (a / f"{split}.jsonl").read_bytes() == (b / f"{split}.jsonl").read_bytes()
    pngs = sorted(p.name for p in (a / "images").iterdir())
    assert len(pngs) == stats[0]["total"]
    assert pngs == sorted(p.name for p in (b / "images").iterdir())
    for name in pngs:
        assert (a / "images" / name).read_bytes() == (b / "images" / name).read_bytes()
    meta = json.loads((a / "meta.json").read_text())
    assert meta["size"] == 32 and meta["total"] == stats[0]["total"] and "emoji_version" in meta
    assert not [p for p in a.parent.iterdir() if ".tmp-" in p.name]   # temp dirs are gone


def _category_tones(category: str) -> list[str]:
    """"medium-dark and dark skin tones" -> ["medium-dark", "dark"]; "none" -> []."""
    if category == "none":
        return []
    tones = category.rsplit(" skin tone", 1)[0].replace(" and ", ", ").split(", ")
    assert set(tones) <= set(E.TONES), category
    return tones


@needs_font
def test_built_split_and_rows(small_builds):
    a, _, _ = small_builds
    rows = []
    for split in ("train", "val", "test"):
        for r in _read(a / f"{split}.jsonl"):
            assert set(r) == {"image", "caption", "item_id", "label", "category", "emoji"}
            assert (a / r["image"]).is_file() and r["caption"] == r["caption"].lower()
            rows.append({**r, "split": split, "tones": _category_tones(r["category"])})
    assert any(r["tones"] for r in rows) and any(not r["tones"] for r in rows)
    _check_split(rows)
    by_item = defaultdict(set)
    for r in rows:
        by_item[r["item_id"]].add(r["label"])
    assert all(len(v) == 1 for v in by_item.values())   # one base per item id


@needs_font
def test_rebuild_replaces_but_refuses_foreign_dir(tmp_path, small_builds):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        E.build_emoji_dataset(foreign, limit=2, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"
    out = tmp_path / "ds"
    E.build_emoji_dataset(out, limit=2, size=16, progress=False)
    E.build_emoji_dataset(out, limit=4, size=16, progress=False)
    assert json.loads((out / "meta.json").read_text())["limit"] == 4


@needs_font
def test_source_reads_built_dataset(small_builds):
    a, _, stats = small_builds
    skips = SkipLog()
    ds = SOURCES.get("emoji")(DataConfig(source="emoji", root=str(a)), "train", skips)
    assert len(ds) == stats[0]["train"] and skips.total == 0
    s = ds[3]
    img = s.load_image()
    assert img.mode == "RGB" and img.size == (32, 32)
    assert s.image_id == 3 and s.key.endswith(".png") and s.source.endswith("train.jsonl:4")
    assert s.captions[0] and s.label and s.category and s.item_id >= 0
    assert np.asarray(img).std() > 0


def test_source_skips_malformed_rows(tmp_path):
    rows = [json.dumps({"image": "images/0.png", "caption": "a cat", "item_id": 0, "label": "cat",
                        "category": "none"}),
            "{not json",
            json.dumps({"image": "images/1.png", "caption": "   ", "item_id": 1}),
            json.dumps(["a", "list"]),
            json.dumps({"caption": "no image"}),
            json.dumps({"image": "images/2.png", "caption": "a dog", "item_id": 2})]
    (tmp_path / "val.jsonl").write_text("\n".join(rows) + "\n")
    cfg = DataConfig(source="emoji", root=str(tmp_path))
    skips = SkipLog()
    ds = SOURCES.get("emoji")(cfg, "val", skips)
    assert [s.captions[0] for s in ds] == ["a cat", "a dog"] and [s.image_id for s in ds] == [0, 1]
    assert skips.total == 4 and skips.counts["empty caption"] == 1
    bad = [r for r in skips.counts if r.startswith("malformed jsonl row")]
    assert sum(skips.counts[r] for r in bad) == 3
    where = [w for r in bad for w in skips.samples[r]]
    assert f"{tmp_path / 'val.jsonl'}:2" in where
    with pytest.raises(BadSampleError, match=r"val\.jsonl:2"):
        SOURCES.get("emoji")(cfg, "val", SkipLog(strict=True))


def test_source_missing_dataset(tmp_path):
    cfg = DataConfig(source="emoji", root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="finealign data build emoji --out"):
        SOURCES.get("emoji")(cfg, "train", SkipLog())
