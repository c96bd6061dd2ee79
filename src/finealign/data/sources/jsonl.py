"""Source "jsonl": one JSON object per line.

Recognised keys (``cfg.image_key`` / ``cfg.caption_key`` are tried first)::

    {"image": "imgs/a.png",                  # or cfg.image_key; or "images": [paths] (multi-image item)
     "caption": "a red circle",              # or cfg.caption_key; or "captions": [...]
     "item_id": 7, "label": "circle", "category": "shape", "subcategory": "round",   # optional
     "regions": [{"box": [x0, y0, x1, y1], "phrase": "red circle", "image": 0}]}  # optional

A multi-image item yields one ``Sample`` per image; they share the captions and ``item_id``.
Region boxes are in pixels of the image; a region applies to every image of its item unless it
names one with ``"image": index``. Lines that name the same image path are merged into one Sample
(captions appended), so ``image_id`` indexes unique images. ``item_id`` values are mapped to dense
integers in first-seen order (lines without one get a fresh id).

Bad lines are reported via ``skips.skip(reason, "file:line")``: "malformed json", "not an object",
"missing image", "missing caption", "empty caption", "bad region", "invalid utf-8" (the line's bytes),
"path outside root" (an image path that is absolute or leaves the file's directory and ``data.root``
via ``..``, unless ``data.allow_outside_root``). Captions are cleaned as in
``untrusted.clean_caption`` (fixes counted as notes).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...config import DataConfig
from ...registry import SOURCES
from ...types import Region, Sample
from ..skips import SkipLog
from .common import (LazyImage, SampleGrouper, clean_text, image_candidates, parse_box,
                     resolve_split_file, root_dir, source_roots)
from .untrusted import clean_caption, has_bad_bytes, note_all


class _BadLine(ValueError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _first_key(obj: dict, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if k in obj and obj[k] is not None:
            return obj[k]
    return None


def _image_paths(obj: dict, cfg: DataConfig) -> list[str]:
    val = _first_key(obj, tuple(dict.fromkeys((cfg.image_key, "image", "images", "image_path",
                                               "file_name", "filepath"))))
    if val is None:
        raise _BadLine("missing image")
    paths = val if isinstance(val, list) else [val]
    if not paths or not all(isinstance(p, str) and p.strip() for p in paths):
        raise _BadLine("missing image")
    return [p.strip() for p in paths]


def _captions(obj: dict, cfg: DataConfig) -> tuple[list[str], list[str]]:
    val = _first_key(obj, tuple(dict.fromkeys((cfg.caption_key, "caption", "captions", "text"))))
    if val is None:
        raise _BadLine("missing caption")
    vals = val if isinstance(val, list) else [val]
    if not all(isinstance(c, str) for c in vals):
        raise _BadLine("missing caption")
    cleaned = [clean_caption(c) for c in vals]
    caps = [c for c, _ in cleaned if c]
    if not caps:
        raise _BadLine("empty caption")
    return caps, sorted({n for _, ns in cleaned for n in ns})


def _regions(obj: dict, n_images: int) -> list[list[Region]]:
    """Per-image region lists (index = image position within the item)."""
    per_image: list[list[Region]] = [[] for _ in range(n_images)]
    raw = obj.get("regions")
    if raw is None:
        return per_image
    if not isinstance(raw, list):
        raise _BadLine("bad region")
    for r in raw:
        if not isinstance(r, dict) or not isinstance(r.get("phrase", ""), str):
            raise _BadLine("bad region")
        try:
            box = parse_box(r.get("box"))
        except ValueError:
            raise _BadLine("bad region") from None
        reg = Region(box=box, phrase=clean_text(r.get("phrase", "")))
        which = r.get("image")
        if which is None:
            for lst in per_image:
                lst.append(reg)
        elif isinstance(which, int) and not isinstance(which, bool) and 0 <= which < n_images:
            per_image[which].append(reg)
        else:
            raise _BadLine("bad region")
    return per_image


def _opt_str(x: Any) -> str | None:
    return None if x is None else str(x)


def read_jsonl(path: Path, cfg: DataConfig, skips: SkipLog) -> list[Sample]:
    """Parse one JSONL file into unique-image Samples."""
    rdir = root_dir(cfg)
    roots = source_roots(cfg, path.parent)
    grouper = SampleGrouper()
    item_ids: dict[str, int] = {}
    cands_of: dict[str, tuple[str, ...]] = {}   # lines repeat image paths (several captions per image)
    next_item = 0
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            if has_bad_bytes(line):
                skips.skip("invalid utf-8", where)
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError):   # RecursionError: absurdly deep nesting
                skips.skip("malformed json", where)
                continue
            if not isinstance(obj, dict):
                skips.skip("not an object", where)
                continue
            try:
                paths = _image_paths(obj, cfg)
                caps, notes = _captions(obj, cfg)
                regions = _regions(obj, len(paths))
                cands_per = [cands_of[p] if p in cands_of else
                             cands_of.setdefault(p, image_candidates(p, path, rdir, roots=roots))
                             for p in paths]
                if not all(cands_per):
                    raise _BadLine("path outside root")
            except _BadLine as e:
                skips.skip(e.reason, where)
                continue
            note_all(skips, notes, where)
            raw_item = obj.get("item_id")
            if raw_item is None:
                item = next_item
                next_item += 1
            else:
                k = f"{type(raw_item).__name__}:{raw_item}"
                if k not in item_ids:
                    item_ids[k] = next_item
                    next_item += 1
                item = item_ids[k]
            for cands, regs in zip(cands_per, regions):
                grouper.add(cands[0], LazyImage(*cands, max_pixels=cfg.max_image_pixels), caps, source=where, item_id=item,
                            label=_opt_str(obj.get("label")),
                            category=_opt_str(obj.get("category")),
                            subcategory=_opt_str(obj.get("subcategory")), regions=regs)
    return grouper.samples


@SOURCES.register("jsonl")
def build_jsonl(cfg: DataConfig, split: str, skips: SkipLog) -> list[Sample]:
    """JSON-lines source; the split value names the file (``train`` -> ``root/train.jsonl``)."""
    path = resolve_split_file(cfg, split, (".jsonl", ".json"))
    return read_jsonl(path, cfg, skips)
