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
"unknown image id", "empty caption".
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ...config import DataConfig
from ...registry import SOURCES
from ...types import Sample
from ..skips import SkipLog
from .common import (LazyImage, SourceFormatError, clean_text, image_candidates,
                     resolve_split_file, split_name)

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


def read_coco(path: Path, data: dict, root: Path | None, split: str, skips: SkipLog) -> list[Sample]:
    """COCO captions format -> one Sample per image that has at least one caption."""
    extra = _image_dirs(root, path, split)
    images: dict[Any, dict] = {}
    order: list[Any] = []
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            skips.skip("bad image entry", f"{path}:images[{i}]")
            continue
        if im["id"] not in images:
            order.append(im["id"])
        images[im["id"]] = im
    caps: dict[Any, list[str]] = {k: [] for k in order}
    for i, ann in enumerate(data.get("annotations") or []):
        where = f"{path}:annotations[{i}]"
        if not isinstance(ann, dict) or "image_id" not in ann:
            skips.skip("bad annotation", where)
            continue
        if ann["image_id"] not in caps:
            skips.skip("unknown image id", where)
            continue
        c = clean_text(ann.get("caption")) if isinstance(ann.get("caption"), str) else ""
        if not c:
            skips.skip("empty caption", where)
            continue
        caps[ann["image_id"]].append(c)
    out: list[Sample] = []
    for i, iid in enumerate(order):
        if not caps[iid]:
            skips.skip("empty caption", f"{path}:images[{i}]")
            continue
        fn = images[iid]["file_name"]
        # root first, then root/<split><year>/, then next to the JSON
        bases = [d for d in ([root] if root else []) + extra]
        cands = image_candidates(fn, None, None, bases + [path.parent])
        n = len(out)
        out.append(Sample(key=cands[0], load_image=LazyImage(*cands), captions=caps[iid],
                          image_id=n, item_id=n, source=f"{path}:images[{i}]"))
    return out


def read_karpathy(path: Path, data: dict, root: Path | None, split: str,
                  skips: SkipLog) -> list[Sample]:
    """Karpathy split JSON -> Samples of the selected split (train = train + restval)."""
    wanted = KARPATHY_SPLITS.get(split, (split,))
    bases = [b for b in (root, path.parent) if b is not None]
    out: list[Sample] = []
    for i, im in enumerate(data["images"]):
        where = f"{path}:images[{i}]"
        if not isinstance(im, dict) or not isinstance(im.get("filename"), str):
            skips.skip("bad image entry", where)
            continue
        if im.get("split") not in wanted:
            continue
        caps = []
        for s in im.get("sentences") or []:
            if isinstance(s, dict):
                raw = s.get("raw")
                if not isinstance(raw, str) and isinstance(s.get("tokens"), list):
                    raw = " ".join(map(str, s["tokens"]))
                c = clean_text(raw) if isinstance(raw, str) else ""
                if c:
                    caps.append(c)
        if not caps:
            skips.skip("empty caption", where)
            continue
        rel = str(Path(im.get("filepath") or "") / im["filename"])
        cands = image_candidates(rel, None, None, bases)
        if im.get("filepath"):
            cands = tuple(dict.fromkeys(cands + image_candidates(im["filename"], None, None, bases)))
        n = len(out)
        out.append(Sample(key=cands[0], load_image=LazyImage(*cands), captions=caps,
                          image_id=n, item_id=n, source=where))
    return out


@SOURCES.register("coco")
def build_coco(cfg: DataConfig, split: str, skips: SkipLog) -> list[Sample]:
    """COCO captions / Karpathy JSON source (format detected from the file's content)."""
    name = split_name(cfg, split)  # a split value passed in (cfg.test) maps back to "test"
    path = resolve_split_file(cfg, split, (".json",), extra_names=_candidate_files(name),
                              root_file_ok=True)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise SourceFormatError(f"{path}: invalid JSON ({e})") from None
    try:
        fmt = detect_format(data)
    except SourceFormatError as e:
        raise SourceFormatError(f"{path}: {e}") from None
    root = Path(cfg.root).expanduser() if cfg.root else None
    root = root if root is not None and root.is_dir() else path.parent
    if fmt == "karpathy":
        return read_karpathy(path, data, root, name, skips)
    return read_coco(path, data, root, name, skips)
