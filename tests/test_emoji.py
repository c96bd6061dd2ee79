"""The emoji dataset builder, its captions and compositional split, and the ``emoji`` source."""
from __future__ import annotations

import dataclasses
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
    (":kiss_man_woman:", "a kiss between a man and a woman"),
    (":family_man_boy_boy:", "a family of a man and two boys"),
    (":man_lifting_weights:", "a man lifting weights"),
    (":Santa_Claus:", "a santa claus"),
    (":NEW_button:", "a new button"),
    (":UP!_button:", "an up! button"),
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


def test_a_font_without_colour_emoji_is_refused(tmp_path):
    """A text font (matplotlib ships DejaVuSans) draws tofu in the default white ink: every image would
    be blank. Refused naming the font, nothing written."""
    import matplotlib
    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    with pytest.raises(ValueError, match=r"DejaVuSans.ttf draws no colour emoji .* NotoColorEmoji.ttf"):
        E.build_emoji_dataset(tmp_path / "out", font=font, progress=False)
    assert not list(tmp_path.iterdir())
    img, why = E.render_emoji("\u2764", E.ImageFont.truetype(str(font), 40), 32)
    assert (img, why) == (None, "blank")


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
    assert meta["format"] == E.FORMAT == 2 and meta["unknown_groups"] == 0 and meta["emoji_data_version"]
    assert not [p for p in a.parent.iterdir() if ".tmp-" in p.name]   # temp dirs are gone


def _phrase_tones(tone: str) -> list[str]:
    """"medium-dark and dark skin tones" -> ["medium-dark", "dark"]; "none" -> []."""
    if tone == "none":
        return []
    tones = tone.rsplit(" skin tone", 1)[0].replace(" and ", ", ").split(", ")
    assert set(tones) <= set(E.TONES), tone
    return tones


@needs_font
def test_built_split_and_rows(small_builds):
    a, _, _ = small_builds
    rows = []
    for split in ("train", "val", "test"):
        for r in _read(a / f"{split}.jsonl"):
            assert set(r) == {"image", "caption", "item_id", "label", "group", "subgroup", "tone", "emoji"}
            assert (a / r["image"]).is_file() and r["caption"] == r["caption"].lower()
            rows.append({**r, "split": split, "tones": _phrase_tones(r["tone"])})
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
    assert (ds[0].category, ds[0].subcategory) == ("none", None)     # pre-group rows: "category" as is
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


# ------------------------------------------------------------------------------ groups / subgroups

def test_group_lookup():
    assert E.group_of("\U0001F600") == ("Smileys & Emotion", "face-smiling")                 # grinning face
    assert E.group_of("\U0001F44D\U0001F3FD") == ("People & Body", "hand-fingers-closed")    # thumbs up, tone
    assert E.group_of("\U0001F3C4\U0001F3FF\u200d\u2640\ufe0f") == ("People & Body", "person-sport")
    assert E.group_of("\U0001F170\ufe0f") == E.group_of("\U0001F170") == ("Symbols", "alphanum")  # FE0F or not
    assert E.group_of("#\ufe0f\u20e3") == ("Symbols", "keycap")                                 # 4-digit codes
    # a tone variant missing from emoji-data's skin_variations falls back to its toneless base
    assert E.group_of("\U0001F93C\U0001F3FF\u200d\u2642\ufe0f") == ("People & Body", "person-sport")
    assert E.group_of("\U0010FFFF") == ("unknown", "unknown")
    assert E.group_of("\U0001F1E8\U0001F1F6") == ("Flags", "country-flag")     # Sark: newer than the table
    entries = E.emoji_entries()
    known = [e for e in entries if e["group"] != E.UNKNOWN]
    assert len(known) > 0.9 * len(entries)
    assert {e["group"] for e in known} >= {"Smileys & Emotion", "People & Body", "Flags", "Symbols"}
    assert "Component" not in {e["group"] for e in known}


@needs_font
def test_built_rows_have_groups(small_builds):
    a, _, _ = small_builds
    rows = [r for split in ("train", "val", "test") for r in _read(a / f"{split}.jsonl")]
    for r in rows:
        assert (r["group"], r["subgroup"]) == E.group_of(r["emoji"]) != ("unknown", "unknown")
    by_label = {(r["label"], r["tone"]): r for r in rows}
    assert (by_label[("1st place medal", "none")]["group"], by_label[("1st place medal", "none")]["subgroup"]) \
        == ("Activities", "award-medal")
    toned = by_label[("backhand index pointing down", "medium skin tone")]               # 👇🏽
    assert toned["emoji"] == "\U0001F447\U0001F3FD"
    assert (toned["group"], toned["subgroup"]) == ("People & Body", "hand-single-finger")
    assert len({r["subgroup"] for r in rows}) >= 5


@needs_font
def test_source_sample_carries_group_and_subgroup(small_builds):
    a, _, _ = small_builds
    rows = _read(a / "train.jsonl")
    ds = SOURCES.get("emoji")(DataConfig(source="emoji", root=str(a)), "train", SkipLog())
    assert [(s.category, s.subcategory) for s in ds] == [(r["group"], r["subgroup"]) for r in rows]
    assert [s.label for s in ds] == [r["label"] for r in rows]


def test_source_reads_pre_group_rows(tmp_path):
    """Rows written before format 2 (``category`` = tone phrase, no group/subgroup) still load."""
    rows = [{"image": "images/00000.png", "caption": "a man with dark skin tone", "item_id": 0,
             "label": "man", "category": "dark skin tone", "emoji": "\U0001F468\U0001F3FF"},
            {"image": "images/00001.png", "caption": "an eagle", "item_id": 1, "label": "eagle",
             "category": "none", "emoji": "\U0001F985"},
            {"image": "images/00002.png", "caption": "a cat", "item_id": 2}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    skips = SkipLog()
    ds = SOURCES.get("emoji")(DataConfig(source="emoji", root=str(tmp_path)), "train", skips)
    assert skips.total == 0
    assert [(s.label, s.category, s.subcategory) for s in ds] == [
        ("man", "dark skin tone", None), ("eagle", "none", None), (None, None, None)]


def test_grouped_sampler_by_subcategory(tmp_path):
    """data.group_by=subcategory on emoji rows (every fully-qualified emoji; images never loaded)."""
    from finealign.data.batching import build_batches
    from finealign.data.loader import PairDataset
    from finealign.data.samplers import pair_metadata

    entries = E.emoji_entries()
    bases = {b: i for i, b in enumerate(sorted({e["base"] for e in entries}))}
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(
        {"image": f"images/{k:05d}.png", "caption": e["caption"], "item_id": bases[e["base"]],
         "label": e["base"], "group": e["group"], "subgroup": e["subgroup"], "tone": e["tone"]}) + "\n"
        for k, e in enumerate(entries)))
    samples = list(SOURCES.get("emoji")(DataConfig(source="emoji", root=str(tmp_path)), "train", SkipLog()))
    ds = PairDataset(samples, transform=None, train=True)
    groups, items = pair_metadata(ds, "subcategory")
    assert groups == [e["subgroup"] for e in entries] and len(set(groups)) > 50

    cfg = DataConfig(source="emoji", root=str(tmp_path), batch_size=16)
    grouped = list(build_batches(ds, dataclasses.replace(cfg, sampler="grouped", group_by="subcategory")))
    shuffled = list(build_batches(ds, cfg))
    assert len(grouped) > 100
    for b in grouped:
        assert len(b) == 16 and len({items[i] for _, i in b}) == 16                # no item twice

    def spans(batches):
        return np.mean([len({groups[i] for _, i in b}) for b in batches])
    assert spans(grouped) <= 6 < 10 < spans(shuffled)      # default: ~16 // 4 subgroups per batch


def test_jsonl_and_shards_carry_subcategory(tmp_path):
    """The generic ``jsonl`` source reads ``subcategory``; shards and collated batches keep it."""
    import torch
    from PIL import Image

    from finealign.data.loader import collate_items, load_item
    from finealign.data.sources.webdataset_source import build_webdataset, write_shards

    for name in ("a", "b", "c"):
        Image.new("RGB", (4, 4), (200, 0, 0)).save(tmp_path / f"{name}.png")
    rows = [{"images": ["a.png", "b.png"], "caption": "a red shoe", "item_id": "s1",
             "category": "shoes", "subcategory": "sneakers"},
            {"image": "c.png", "caption": "a bag", "category": "bags", "subcategory": 7},   # -> "7"
            {"image": "a.png", "caption": "a red sneaker"}]                               # merged into a.png
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    skips = SkipLog()
    got = SOURCES.get("jsonl")(DataConfig(source="jsonl", root=str(tmp_path)), "train", skips)
    assert skips.total == 0
    assert [(s.category, s.subcategory) for s in got] == [("shoes", "sneakers"), ("shoes", "sneakers"),
                                                          ("bags", "7")]
    assert got[0].item_id == got[1].item_id != got[2].item_id and len(got[0].captions) == 2

    write_shards(got, str(tmp_path / "shards" / "train-%06d.tar"))
    back = list(build_webdataset(DataConfig(source="webdataset", root=str(tmp_path / "shards")), "train",
                                 SkipLog()))
    assert [(s.category, s.subcategory) for s in back] == [(s.category, s.subcategory) for s in got]

    parts = collate_items([load_item(s, s.captions[0], lambda img, rng: torch.zeros(3, 2, 2), None)
                           for s in got])
    assert parts["subcategories"] == ["sneakers", "sneakers", "7"]
