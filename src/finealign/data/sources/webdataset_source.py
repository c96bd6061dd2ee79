"""Source "webdataset": tar shards in img2dataset layout, streamed with the ``webdataset`` library.

Each sample is a group of members sharing a key: ``KEY.jpg|jpeg|png|webp`` plus ``KEY.txt``
(the caption) and/or ``KEY.json`` (``{"caption": ..., "captions": [...], "item_id", "label",
"category", "subcategory", "regions": [{"box", "phrase"}]}``). The split value is a shard pattern such as
``shards/train-{000000..000009}.tar`` (braces expanded), relative to ``cfg.root``; a directory
(all ``*.tar`` inside) or a bare name (``train`` -> ``root/train-*.tar`` / ``root/train/*.tar``)
also works.

``build`` returns a ``WebDatasetSource`` (an ``IterableDataset`` of Samples, stream order,
``image_id`` = position in the stream). Members without an image or a caption are counted as
"unpaired member"; unreadable shards as "corrupt shard"; a key met twice in one shard (adjacent
repeated members, or the key again later) as "duplicate key" (the first sample is kept); keys that
are absolute or contain ``..`` as "unsafe member name" (never extracted: members are read in
memory); a ``.txt`` / ``.json`` member that is not UTF-8 as "invalid utf-8", a ``.json`` member
that is not a JSON object as "malformed json". Captions are cleaned as in
``untrusted.clean_caption`` (fixes counted as notes in the process that reads the stream). Every iteration reads all of its shards
(webdataset's own node / worker splitting is off): the training loader decides who reads what
(``data/streaming.py``). ``with_shards(subset)`` gives the same source over other shards, which is
how the loader deals shards to (rank, worker) slots (``data.shard_split``) or resamples them
(``data.resample``). ``write_shards`` writes Samples into shards (``finealign data shard``).
"""
from __future__ import annotations

import glob
import io
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import braceexpand
import webdataset as wds
from torch.utils.data import IterableDataset

from ...config import DataConfig
from ...registry import SOURCES
from ...types import Region, Sample
from ..skips import SkipLog
from ..transforms import to_rgb
from .common import (DEFAULT_MAX_IMAGE_PIXELS, BytesImage, Skipped, clean_text, parse_box,
                     split_value)
from .untrusted import clean_caption, decode_utf8, note_all, unsafe_member_name

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def expand_shards(cfg: DataConfig, split: str) -> list[str]:
    """Split value -> list of shard paths, those missing included (the reader counts each as a "missing shard"
    skip); raises FileNotFoundError when none of them exists."""
    value = split_value(cfg, split)
    root = Path(cfg.root).expanduser() if cfg.root else None
    rdir = root if root is not None and root.is_dir() else None
    p = Path(value).expanduser()
    base = p if p.is_absolute() or rdir is None else rdir / p
    if base.is_dir():
        shards = sorted(glob.glob(str(base / "*.tar")))
    elif "{" in value or base.suffix == ".tar" or "*" in value:
        shards = [s for pat in braceexpand.braceexpand(str(base))
                  for s in (sorted(glob.glob(pat)) if "*" in pat else [pat])]
    else:
        shards = sorted(glob.glob(f"{base}-*.tar")) or sorted(glob.glob(f"{base}/*.tar"))
    existing = [s for s in shards if os.path.isfile(s)]
    if not existing:
        raise FileNotFoundError(f"data split {split!r} = {value!r}: no shard found "
                                f"(looked for {base}; data.root = {cfg.root!r})")
    return shards


class _Handler:
    """webdataset exception handler: queue the error, keep going (picklable)."""

    def __init__(self):
        self.errors: list[Skipped] = []

    def __call__(self, exn: Exception) -> bool:
        where = " ".join(str(a) for a in getattr(exn, "args", ())[:1]) or type(exn).__name__
        reason = "missing shard" if isinstance(exn, FileNotFoundError) else "corrupt shard"
        if "duplicate file name" in where:   # webdataset: a member name repeated within one sample
            reason, where = "duplicate key", where.split(": duplicate")[0]
        self.errors.append(Skipped(reason, where))
        return True


class _BadMember(ValueError):
    pass


def _decode_json(raw: bytes) -> dict:
    text = decode_utf8(raw)
    if text is None:
        raise _BadMember("invalid utf-8")
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise _BadMember("malformed json") from None
    if not isinstance(obj, dict):
        raise _BadMember("malformed json")
    return obj


def _captions(rec: dict, meta: dict, caption_key: str) -> tuple[list[str], set[str]]:
    raw: list = []
    if "txt" in rec:
        text = decode_utf8(rec["txt"])
        if text is None:
            raise _BadMember("invalid utf-8")
        raw.append(text)
    for k in dict.fromkeys((caption_key, "caption", "captions")):
        v = meta.get(k)
        raw += v if isinstance(v, list) else [v]
    caps: list[str] = []
    notes: set[str] = set()
    for c in raw:
        if isinstance(c, str):
            c, ns = clean_caption(c)
            if c and c not in caps:
                caps.append(c)
                notes.update(ns)
    return caps, notes


def _regions(meta: dict) -> list[Region]:
    out = []
    regions = meta.get("regions")
    for r in regions if isinstance(regions, list) else []:
        try:
            out.append(Region(box=parse_box(r.get("box")), phrase=clean_text(r.get("phrase", ""))))
        except (ValueError, AttributeError):
            continue
    return out


class WebDatasetSource(IterableDataset):
    """Iterable of Samples read from tar shards (stream order, no shuffling here)."""

    def __init__(self, shards: list[str], skips: SkipLog | None = None, caption_key: str = "caption",
                 id_stride: int = 1, id_offset: int = 0, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        super().__init__()
        self.shards = list(shards)
        self.skips = skips if skips is not None else SkipLog()
        self.caption_key = caption_key
        self.max_pixels = int(max_pixels)
        # positional ids (image_id; item_id when the json has none) are n * id_stride + id_offset, so
        # that the streams of several (rank, worker) slots never hand out the same id
        self.id_stride, self.id_offset = int(id_stride), int(id_offset)

    def __repr__(self) -> str:
        return f"WebDatasetSource({len(self.shards)} shard(s), first={self.shards[:1]})"

    def with_shards(self, shards: list[str], id_stride: int = 1, id_offset: int = 0) -> "WebDatasetSource":
        """The same source (skip log, caption key) over ``shards``, positional ids strided."""
        return WebDatasetSource(shards, self.skips, self.caption_key, id_stride, id_offset,
                                self.max_pixels)

    def iter_with_skips(self) -> Iterator[Sample | Skipped]:
        """Samples in stream order, with ``Skipped`` markers for bad members/shards in place."""
        handler = _Handler()
        ds = wds.WebDataset(self.shards, shardshuffle=False, empty_check=False, handler=handler,
                            workersplitter=None, nodesplitter=None)
        n = 0
        seen: set[str] = set()           # keys of the current shard (reset when the shard changes)
        cur_url = None
        for rec in ds:
            while handler.errors:
                yield handler.errors.pop(0)
            key, url = str(rec.get("__key__", "?")), str(rec.get("__url__", "?"))
            where = f"{url}:{key}"
            if unsafe_member_name(key):
                yield Skipped("unsafe member name", where)
                continue
            if url != cur_url:
                seen, cur_url = set(), url
            if key in seen:
                yield Skipped("duplicate key", where)
                continue
            seen.add(key)
            img_ext = next((e for e in IMAGE_EXTS if e in rec), None)
            try:
                meta = _decode_json(rec["json"]) if "json" in rec else {}
                caps, notes = _captions(rec, meta, self.caption_key)
            except _BadMember as e:
                yield Skipped(str(e), where)
                continue
            if img_ext is None or not caps:
                has_text = "txt" in rec or "json" in rec
                yield Skipped("empty caption" if img_ext and has_text else "unpaired member", where)
                continue
            note_all(self.skips, sorted(notes), where)
            item, pos = meta.get("item_id"), n * self.id_stride + self.id_offset
            yield Sample(key=where, load_image=BytesImage(rec[img_ext], where, self.max_pixels),
                         captions=caps,
                         image_id=pos, item_id=int(item) if isinstance(item, int) else pos,
                         label=None if meta.get("label") is None else str(meta["label"]),
                         category=None if meta.get("category") is None else str(meta["category"]),
                         subcategory=(None if meta.get("subcategory") is None
                                      else str(meta["subcategory"])),
                         regions=_regions(meta), source=where)
            n += 1
        while handler.errors:
            yield handler.errors.pop(0)

    def __iter__(self) -> Iterator[Sample]:
        for x in self.iter_with_skips():
            if isinstance(x, Skipped):
                self.skips.skip(x.reason, x.key)
            else:
                yield x


@SOURCES.register("webdataset")
def build_webdataset(cfg: DataConfig, split: str, skips: SkipLog) -> WebDatasetSource:
    """Shard-pattern source; missing shards of an expanded pattern are counted as skips."""
    shards = expand_shards(cfg, split)
    present = []
    for s in shards:
        if os.path.isfile(s):
            present.append(s)
        else:
            skips.skip("missing shard", s)
    return WebDatasetSource(present, skips, caption_key=cfg.caption_key,
                            max_pixels=cfg.max_image_pixels)


def write_shards(samples: Iterable[Sample], pattern: str, maxcount: int = 1000,
                 image_format: str = "png", skips: SkipLog | None = None) -> list[str]:
    """Write Samples as img2dataset-style shards; returns the shard paths written.

    ``pattern`` is a printf pattern (``out/train-%06d.tar``). Each sample becomes
    ``KEY.<png|jpg>`` + ``KEY.txt`` (first caption) + ``KEY.json`` (all captions, ids, label,
    category, subcategory, regions, original key). Samples whose image cannot be loaded are skipped
    (``skips`` counts them as "unreadable image"; without ``skips`` the error is raised).
    """
    if "%" not in pattern:
        raise ValueError(f"shard pattern needs a printf field such as %06d, got {pattern!r}")
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[image_format.lower()]
    ext = "jpg" if fmt == "JPEG" else image_format.lower()
    Path(pattern % 0).parent.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0, post=written.append) as sink:
        for i, s in enumerate(samples):
            try:
                img = to_rgb(s.load_image())
                buf = io.BytesIO()
                img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
            except Exception as e:
                if skips is None:
                    raise
                skips.skip("unreadable image", f"{s.key} ({type(e).__name__})")
                continue
            meta = {"caption": s.captions[0] if s.captions else "", "captions": list(s.captions),
                    "item_id": s.item_id, "image_id": s.image_id, "label": s.label,
                    "category": s.category, "subcategory": s.subcategory, "key": s.key,
                    "regions": [{"box": list(r.box), "phrase": r.phrase} for r in s.regions]}
            sink.write({"__key__": f"{i:09d}", ext: buf.getvalue(),
                        "txt": meta["caption"], "json": json.dumps(meta).encode("utf-8")})
    return written


def write_split_shards(cfg: DataConfig, split: str, pattern: str, maxcount: int = 1000,
                       image_format: str = "png", force: bool = False) -> dict:
    """Write split ``split`` of the registered source ``cfg.source`` as shards (``finealign data shard``).

    The shards are written into a temporary directory beside the target and moved into place at the
    end, so the source may be the very shards being replaced (re-sharding in place) and an interrupted
    or empty write changes nothing. Shards already matching ``pattern`` are refused unless ``force``
    (then they are all replaced, none left stale). Returns ``{"shards": [paths], "samples": written,
    "skipped": n, "skips": {reason: count}}``; bad samples are skipped and counted."""
    import re
    import shutil
    import tempfile
    from ..loader import build_source
    if maxcount < 1:
        raise ValueError(f"--maxcount must be >= 1, got {maxcount}")
    target = Path(pattern).expanduser()
    fields = re.findall(r"%[-+ #0]*\d*[a-zA-Z%]", target.name)
    if str(target.parent).count("%") or len(fields) != 1 or not re.fullmatch(r"%0?\d*d", fields[0]) \
            or target.suffix != ".tar":
        raise ValueError(f"--out {pattern}: a shard pattern is a file name with one integer field and the .tar "
                         f"suffix, e.g. shards/train-%06d.tar")
    head, tail = target.name.split(fields[0])
    number = re.compile(re.escape(head) + r"\d+" + re.escape(tail))
    out_dir = target.parent
    existing = sorted(p for p in out_dir.glob("*") if number.fullmatch(p.name)) if out_dir.is_dir() else []
    if existing and not force:
        raise FileExistsError(f"{out_dir} already holds {len(existing)} shard(s) matching {target.name} "
                              f"({existing[0].name}, ...): pass --force to replace them all")
    out_dir.mkdir(parents=True, exist_ok=True)
    read, write = SkipLog(), SkipLog()
    seen = 0

    def counted(samples: Iterable[Sample]) -> Iterator[Sample]:
        nonlocal seen
        for s in samples:
            seen += 1
            yield s
    tmp = Path(tempfile.mkdtemp(prefix=".shards-tmp-", dir=out_dir))
    try:
        paths = write_shards(counted(build_source(cfg, split, read)), str(tmp / target.name), maxcount=maxcount,
                             image_format=image_format, skips=write)
        read.update(write)
        if seen - write.total <= 0:
            why = read.reasons() or "the split is empty"
            raise ValueError(f"split {split!r} of {cfg.source} gave no sample to write (skipped: {why}); "
                             f"nothing written to {out_dir}")
        for old in existing:
            old.unlink()
        final = []
        for p in paths:
            os.replace(p, out_dir / Path(p).name)
            final.append(str(out_dir / Path(p).name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"shards": final, "samples": seen - write.total, "skipped": read.total, "skips": dict(read.counts),
            "replaced": len(existing)}
