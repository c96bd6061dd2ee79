"""Source "coco": COCO captions JSON or a Karpathy split JSON (detected automatically).

* COCO captions (``captions_train2014.json``): ``{"images": [{"id", "file_name"}],
  "annotations": [{"image_id", "caption"}]}``. Images live in ``cfg.root`` or a
  ``root/<split><year>`` sub-directory (``val2014``), found per image at load time.
* Karpathy (``dataset_coco.json``, ``dataset_flickr30k.json``): ``{"images": [{"filepath",
  "filename", "split", "sentences": [{"raw"}]}]}``; the split *name* selects images
  ("train" also takes "restval"); image paths are ``root/filepath/filename``.

Split files: ``cfg.<split>`` may name the JSON (absolute or relative to root); otherwise the usual
names are tried under root (``annotations/captions_val2014.json``, ``dataset_coco.json``, ...), and a
``cfg.root`` that is itself a JSON file is used for every split. Each image becomes one Sample
with all its captions; ``image_id`` is the index within the split, ``item_id`` the same.
Skips ("file:images[i]" / "file:annotations[i]"): "bad image entry", "bad annotation",
"unknown image id", "empty caption", "path outside root" (a file name that is absolute or leaves
``data.root``, the JSON's directory and the image directories via ``..``, unless
``data.allow_outside_root``). Captions are cleaned as in ``untrusted.clean_caption`` (fixes
counted as notes). A file that is not UTF-8 JSON, or whose ``annotations`` is not a list, raises
``SourceFormatError`` naming it.

Regions (COCO captions format only): if an instances JSON sits beside the captions file under the
matching name (``captions_X.json`` -> ``instances_X.json``, e.g. ``captions_train2017.json`` ->
``instances_train2017.json``), each of its annotations ``{"image_id", "bbox": [x, y, w, h],
"category_id"}`` becomes ``Region(box=(x, y, x + w, y + h), phrase=<category "name">)`` of that
image (original-image pixels; crowd annotations included). Nothing to configure; without that
file Samples have no regions. Malformed instance annotations (no image id, bbox not 4 finite
numbers with w, h > 0, unknown category) are skipped as "bad instance" ("file:annotations[i]"),
instances of images absent from the captions JSON as "unknown image id"; categories without an
id or a name as "bad category" ("file:categories[i]"); a file that is not valid JSON with an
``annotations`` list (and, if present, a ``categories`` list) raises ``SourceFormatError``.
Karpathy split JSONs never get regions (their images carry no COCO ids to match).
"""
from __future__ import annotations

import json
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any

from ...config import DataConfig
from ...registry import SOURCES
from ...types import Region, Sample
from ..skips import SkipLog
from .common import (LazyImage, SourceFormatError, clean_text, image_candidates, parse_box,
                     resolve_split_file, source_roots, split_name)
from .untrusted import clean_caption, note_all

KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def detect_format(data: Any) -> str:
    """'karpathy' | 'coco' (raises SourceFormatError otherwise)."""
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        imgs = data["images"]
        if "annotations" in data:
            return "coco"
        if not imgs or (isinstance(imgs[0], dict) and "sentences" in imgs[0]):
            return "karpathy"
    keys = list(data)[:10] if isinstance(data, dict) else type(data).__name__
    raise SourceFormatError("not a COCO captions JSON (images + annotations) nor a Karpathy split "
                            f"JSON (images with sentences); top-level keys: {keys}")


def _candidate_files(split: str) -> list[str]:
    out = []
    for year in ("2014", "2017"):
        out += [f"annotations/captions_{split}{year}.json", f"captions_{split}{year}.json"]
    out += ["dataset_coco.json", "dataset_flickr30k.json", "dataset_flickr8k.json"]
    return out


def _image_dirs(root: Path | None, json_path: Path, split: str) -> list[Path]:
    """``root/<split><year>`` style image sub-directories that exist."""
    names = []
    m = re.search(r"(train|val|test)(20\d\d)", json_path.name)
    if m:
        names.append(m.group(1) + m.group(2))
    names += [f"{split}2014", f"{split}2017", split, "images"]
    bases = [b for b in (root, json_path.parent, json_path.parent.parent) if b is not None]
    dirs = [b / n for b in bases for n in dict.fromkeys(names)]
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def instances_path(captions: Path) -> Path | None:
    """``.../captions_X.json`` -> ``.../instances_X.json`` if that file exists, else None."""
    if not captions.name.startswith("captions_"):
        return None
    p = captions.with_name("instances_" + captions.name[len("captions_"):])
    return p if p.is_file() else None


def _instance_box(bbox: Any) -> tuple[float, float, float, float]:
    """COCO ``[x, y, w, h]`` -> ``(x0, y0, x1, y1)``; ValueError unless 4 numbers whose corners pass
    ``parse_box`` (finite, x0 < x1, y0 < y1: w, h > 0 and not lost to rounding or overflow in the sums)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) for v in bbox):
        raise ValueError(f"bad bbox {bbox!r}")
    x, y, w, h = bbox
    try:
        corners = (x, y, x + w, y + h)
    except OverflowError:                     # an integer beyond float range added to a float
        raise ValueError(f"bad bbox {bbox!r}") from None
    return parse_box(corners)


def load_json(path: Path) -> Any:
    """Parse a JSON file; not UTF-8, not JSON or absurdly nested -> ``SourceFormatError`` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise SourceFormatError(f"{path}: invalid JSON ({type(e).__name__}: {e})") from None


def read_instances(path: Path, image_ids: set, skips: SkipLog) -> dict[Any, list[Region]]:
    """COCO instances JSON -> regions per image id (annotation order); bad entries are skipped."""
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise SourceFormatError(f"{path}: not a COCO instances JSON (no 'annotations' list)")
    cats = data.get("categories", [])
    if not isinstance(cats, list):
        raise SourceFormatError(f"{path}: 'categories' must be a list, got {type(cats).__name__}")
    names: dict[Any, str] = {}
    for i, c in enumerate(cats):
        name = clean_text(c["name"]) if isinstance(c, dict) and isinstance(c.get("name"), str) else ""
        if name and "id" in c and isinstance(c["id"], Hashable):  # JSON lists / objects as ids are not
            names[c["id"]] = name
        else:                                                    # no name / no id / an unhashable id
            skips.skip("bad category", f"{path}:categories[{i}]")
    out: dict[Any, list[Region]] = {}
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}:annotations[{i}]"
        try:
            if not isinstance(ann, dict) or "image_id" not in ann:
                raise ValueError("no image id")
            box = _instance_box(ann.get("bbox"))
            phrase = names[ann.get("category_id")]
        except (ValueError, KeyError, TypeError):  # TypeError: unhashable category id
            skips.skip("bad instance", where)
            continue
        try:
            known = ann["image_id"] in image_ids
        except TypeError:                            # unhashable image id
            known = False
        if not known:
            skips.skip("unknown image id", where)
            continue
        out.setdefault(ann["image_id"], []).append(Region(box=box, phrase=phrase))
    return out


def read_coco(path: Path, data: dict, root: Path | None, split: str, skips: SkipLog,
              cfg: DataConfig | None = None) -> list[Sample]:
    """COCO captions format -> one Sample per image that has at least one caption."""
    cfg = cfg if cfg is not None else DataConfig(root=str(root or path.parent))
    extra = _image_dirs(root, path, split)
    roots = source_roots(cfg, root, path.parent, *extra)
    images: dict[Any, dict] = {}
    order: list[Any] = []
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            skips.skip("bad image entry", f"{path}:images[{i}]")
            continue
        try:
            hash(im["id"])
        except TypeError:        # a list / dict id cannot key anything
            skips.skip("bad image entry", f"{path}:images[{i}]")
            continue
        if im["id"] not in images:
            order.append(im["id"])
        images[im["id"]] = im
    caps: dict[Any, list[str]] = {k: [] for k in order}
    anns = data.get("annotations")
    if not isinstance(anns, list):
        raise SourceFormatError(f"{path}: 'annotations' must be a list of caption entries, got "
                                f"{type(anns).__name__}")
    for i, ann in enumerate(anns):
        where = f"{path}:annotations[{i}]"
        if not isinstance(ann, dict) or "image_id" not in ann:
            skips.skip("bad annotation", where)
            continue
        try:
            known = ann["image_id"] in caps
        except TypeError:        # unhashable image id
            skips.skip("bad annotation", where)
            continue
        if not known:
            skips.skip("unknown image id", where)
            continue
        c, notes = clean_caption(ann["caption"]) if isinstance(ann.get("caption"), str) else ("", [])
        if not c:
            skips.skip("empty caption", where)
            continue
        note_all(skips, notes, where)
        caps[ann["image_id"]].append(c)
    inst = instances_path(path)
    regions = read_instances(inst, set(order), skips) if inst is not None else {}
    out: list[Sample] = []
    for i, iid in enumerate(order):
        if not caps[iid]:
            skips.skip("empty caption", f"{path}:images[{i}]")
            continue
        fn = images[iid]["file_name"]
        # root first, then root/<split><year>/, then next to the JSON
        bases = [d for d in ([root] if root else []) + extra]
        cands = image_candidates(fn, None, None, bases + [path.parent], roots=roots)
        if not cands:
            skips.skip("path outside root", f"{path}:images[{i}]")
            continue
        n = len(out)
        out.append(Sample(key=cands[0], load_image=LazyImage(*cands, max_pixels=cfg.max_image_pixels),
                          captions=caps[iid],
                          image_id=n, item_id=n, regions=regions.get(iid, []),
                          source=f"{path}:images[{i}]"))
    return out


def read_karpathy(path: Path, data: dict, root: Path | None, split: str,
                  skips: SkipLog, cfg: DataConfig | None = None) -> list[Sample]:
    """Karpathy split JSON -> Samples of the selected split (train = train + restval)."""
    cfg = cfg if cfg is not None else DataConfig(root=str(root or path.parent))
    wanted = KARPATHY_SPLITS.get(split, (split,))
    bases = [b for b in (root, path.parent) if b is not None]
    roots = source_roots(cfg, *bases)
    out: list[Sample] = []
    for i, im in enumerate(data["images"]):
        where = f"{path}:images[{i}]"
        if not isinstance(im, dict) or not isinstance(im.get("filename"), str):
            skips.skip("bad image entry", where)
            continue
        if im.get("split") not in wanted:
            continue
        caps, notes = [], set()
        sents = im.get("sentences")
        for s in sents if isinstance(sents, list) else []:
            if isinstance(s, dict):
                raw = s.get("raw")
                if not isinstance(raw, str) and isinstance(s.get("tokens"), list):
                    raw = " ".join(map(str, s["tokens"]))
                c, ns = clean_caption(raw) if isinstance(raw, str) else ("", [])
                if c:
                    caps.append(c)
                    notes.update(ns)
        if not caps:
            skips.skip("empty caption", where)
            continue
        fp = im.get("filepath")
        fp = fp if isinstance(fp, str) else ""
        rel = str(Path(fp) / im["filename"])
        cands = image_candidates(rel, None, None, bases, roots=roots)
        if not cands:             # filepath/filename leaves the roots: no fallback to the bare name
            skips.skip("path outside root", where)
            continue
        if fp:
            cands = tuple(dict.fromkeys(cands + image_candidates(im["filename"], None, None, bases,
                                                                 roots=roots)))
        note_all(skips, sorted(notes), where)
        n = len(out)
        out.append(Sample(key=cands[0], load_image=LazyImage(*cands, max_pixels=cfg.max_image_pixels),
                          captions=caps,
                          image_id=n, item_id=n, source=where))
    return out


@SOURCES.register("coco")
def build_coco(cfg: DataConfig, split: str, skips: SkipLog) -> list[Sample]:
    """COCO captions / Karpathy JSON source (format detected from the file's content)."""
    name = split_name(cfg, split)  # a split value passed in (cfg.test) maps back to "test"
    path = resolve_split_file(cfg, split, (".json",), extra_names=_candidate_files(name),
                              root_file_ok=True)
    data = load_json(path)
    try:
        fmt = detect_format(data)
    except SourceFormatError as e:
        raise SourceFormatError(f"{path}: {e}") from None
    root = Path(cfg.root).expanduser() if cfg.root else None
    root = root if root is not None and root.is_dir() else path.parent
    if fmt == "karpathy":
        return read_karpathy(path, data, root, name, skips, cfg)
    return read_coco(path, data, root, name, skips, cfg)
