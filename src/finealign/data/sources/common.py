"""Helpers shared by the file-based sources (csv/tsv, jsonl, coco, webdataset).

* ``split_value`` / ``resolve_split_file``: map a split *name* (train/val/test) through
  ``cfg.train/val/test`` and find the data file it designates.
* ``LazyImage`` / ``BytesImage``: picklable ``Sample.load_image`` callables (decode on call,
  return RGB, raise on failure; the loader turns failures into counted skips).
* ``SampleGrouper``: groups rows that share an image into one ``Sample`` with several captions.
* ``Skipped``: marker for a dropped sample, carried through the loader into ``Batch.skipped``.
* ``SourceFormatError`` / ``missing_column_error``: header/key errors naming file and keys.
* ``load_item`` / ``classify_error`` / ``sample_seed``: turning a Sample into a transformed
  (image, caption) item or a short skip reason (used by the loader, in DataLoader workers).
  An item's ``regions`` follow the image: when the transform accepts ``boxes=``
  (``ImageTransform``, ``TwoViewTransform``) the boxes are mapped into pixels of the model input
  (``S x S``, after crop / resize / flip) and regions that fall outside the crop are dropped; a
  custom transform without ``boxes`` support leaves them in original-image pixels.
"""
from __future__ import annotations

import io
import logging
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image

from ...config import DataConfig
from ...types import Region, Sample
from ..skips import BadSampleError
from ..transforms import accepts_boxes, to_rgb
from .untrusted import clean_caption, keep_inside

log = logging.getLogger("finealign")

DEFAULT_MAX_IMAGE_PIXELS = 89_478_485   # PIL's own warning threshold (~ 9459 x 9459); data.max_image_pixels

SPLIT_NAMES = ("train", "val", "test")


class SourceFormatError(ValueError):
    """A data file does not have the expected structure (missing column/key, unknown format)."""


class EmptyImageError(OSError):
    """The image file (or shard member) has zero bytes."""


@dataclass
class Skipped:
    """A sample dropped on the way (bad image, empty caption, unpaired shard member)."""
    reason: str   # short category: "missing file", "corrupt image", ...
    key: str      # path / file:line / shard member


def missing_column_error(file: str | Path, column: str, available: Sequence[str],
                         what: str = "column") -> SourceFormatError:
    avail = ", ".join(repr(a) for a in available) or "(none)"
    return SourceFormatError(f"{file}: no {what} {column!r} (available: {avail}); "
                             f"set data.image_key / data.caption_key")


# ---------------------------------------------------------------------------- split resolution

def split_value(cfg: DataConfig, split: str) -> str:
    """Split name -> configured value (``cfg.train`` for "train", ...). Other names pass through."""
    if split in SPLIT_NAMES:
        return str(getattr(cfg, split))
    return str(split)


def split_name(cfg: DataConfig, split: str) -> str:
    """The split *name* for ``split``: itself if it is train/val/test, else the name whose
    configured value equals it (test, then val, then train), else ``split`` unchanged."""
    if split in SPLIT_NAMES:
        return split
    for name in ("test", "val", "train"):
        if str(getattr(cfg, name)) == split:
            return name
    return split


def root_dir(cfg: DataConfig) -> Path | None:
    """``cfg.root`` if it is a directory, the parent directory if it is a file, else None."""
    if not cfg.root:
        return None
    root = Path(cfg.root).expanduser()
    if root.is_dir():
        return root
    if root.is_file():
        return root.parent
    return None


def resolve_split_file(cfg: DataConfig, split: str, suffixes: Sequence[str],
                       extra_names: Sequence[str] = (), root_file_ok: bool = False) -> Path:
    """Find the data file of ``split``.

    The split value (``cfg.<split>``) may be an absolute path, a path relative to ``cfg.root``
    (when root is a directory) or to the working directory, or a bare name completed with one of
    ``suffixes`` (``"train"`` -> ``root/train.csv``). ``extra_names`` are further file names tried
    under root (format conventions, e.g. ``annotations/captions_val2014.json``). With
    ``root_file_ok`` and ``cfg.root`` naming a file, that file is the fallback for every split
    (a Karpathy JSON carries its own split field).
    """
    value = split_value(cfg, split)
    root = Path(cfg.root).expanduser() if cfg.root else None
    rdir = root if root is not None and root.is_dir() else None
    p = Path(value).expanduser()
    cands: list[Path] = []
    if p.is_absolute():
        cands.append(p)
    else:
        if rdir is not None:
            cands.append(rdir / p)
            cands += [rdir / (value + s) for s in suffixes if not value.endswith(s)]
            cands += [rdir / n for n in extra_names]
        cands.append(p)
        cands += [Path(value + s) for s in suffixes if not value.endswith(s)]
    for c in cands:
        if c.is_file():
            if root is not None and not root.exists() and not p.is_absolute():
                log.warning("data.root=%s does not exist: reading split %r from %s (the working directory)",
                            cfg.root, split, c)
            return c
    if root_file_ok and root is not None and root.is_file():
        return root
    tried = ", ".join(str(c) for c in dict.fromkeys(cands))
    raise FileNotFoundError(f"data split {split!r} = {value!r}: no such file (tried {tried}; "
                            f"data.root = {cfg.root!r})")


def image_candidates(path: str, data_file: Path | None, root: Path | None,
                     extra_dirs: Iterable[Path] = (), roots: Iterable[Path] | None = None
                     ) -> tuple[str, ...]:
    """Where a path written in a data file may live: absolute as is; relative paths against
    the data file's directory, then ``root``, then ``extra_dirs``, then the working directory.
    With ``roots``, only candidates inside them are kept (empty: the path leaves every root)."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return keep_inside((str(p),), roots)
    bases: list[Path] = []
    if data_file is not None:
        bases.append(data_file.parent)
    if root is not None:
        bases.append(root)
    bases += list(extra_dirs)
    out = [str(b / p) for b in bases] + [str(p)]
    return keep_inside(tuple(dict.fromkeys(out)), roots)


# ---------------------------------------------------------------------------- lazy images

def open_image_bytes(data: bytes, name: str = "<bytes>",
                     max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an encoded image fully (``load``) and convert it to RGB.

    An image with more than ``max_pixels`` pixels (0 = no own limit) raises
    ``Image.DecompressionBombError`` from its header, before any pixel is decoded. PIL's process-wide
    limit (``2 * PIL.Image.MAX_IMAGE_PIXELS``, ~179 M pixels) applies on top."""
    if len(data) == 0:
        raise EmptyImageError(f"{name}: empty file")
    with warnings.catch_warnings():   # PIL's warning band (1-2x its limit): our own check decides
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise Image.DecompressionBombError(f"{name}: {e} (PIL's process-wide limit; "
                                               f"data.max_image_pixels = {max_pixels})") from None
    w, h = img.size
    if max_pixels and w * h > max_pixels:
        raise Image.DecompressionBombError(
            f"{name}: {w}x{h} = {w * h} pixels exceeds data.max_image_pixels = {max_pixels}")
    img.load()
    return to_rgb(img)


class LazyImage:
    """``Sample.load_image`` for a file: tries each candidate path, returns an RGB image.

    Raises ``FileNotFoundError`` (no candidate exists), ``EmptyImageError`` (zero bytes) or the
    PIL error (corrupt / truncated / decompression bomb). Picklable (DataLoader workers).
    """

    __slots__ = ("candidates", "max_pixels")

    def __init__(self, *candidates: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        if not candidates:
            raise ValueError("LazyImage needs at least one path")
        self.candidates = tuple(str(c) for c in candidates)
        self.max_pixels = int(max_pixels)

    @property
    def path(self) -> str:
        """First existing candidate (or the primary one if none exists)."""
        for c in self.candidates:
            if os.path.isfile(c):
                return c
        return self.candidates[0]

    def __call__(self) -> Image.Image:
        path = self.path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image not found: {path}")
        with open(path, "rb") as f:   # read fully: no file handle outlives the call
            data = f.read()
        return open_image_bytes(data, path, self.max_pixels)

    def __getstate__(self):
        return (self.candidates, self.max_pixels)

    def __setstate__(self, state):
        self.candidates, self.max_pixels = state

    def __repr__(self) -> str:
        return f"LazyImage({self.candidates[0]!r})"


class BytesImage:
    """``Sample.load_image`` for encoded bytes held in memory (webdataset members)."""

    __slots__ = ("data", "name", "max_pixels")

    def __init__(self, data: bytes, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.data = data
        self.name = name
        self.max_pixels = int(max_pixels)

    def __call__(self) -> Image.Image:
        return open_image_bytes(self.data, self.name, self.max_pixels)

    def __getstate__(self):
        return (self.data, self.name, self.max_pixels)

    def __setstate__(self, state):
        self.data, self.name, self.max_pixels = state

    def __repr__(self) -> str:
        return f"BytesImage({self.name!r}, {len(self.data)} bytes)"


# ---------------------------------------------------------------------------- rows -> samples

def clean_text(x: Any) -> str:
    """Caption normalisation done by every source: str, control characters removed, whitespace
    collapsed, cut to ``MAX_CAPTION_CHARS`` (``untrusted.clean_caption``, which also says what it fixed)."""
    return clean_caption(x)[0]


def source_roots(cfg: DataConfig, *dirs: Path | None) -> list[Path] | None:
    """Directories image paths of a data file may resolve into: ``dirs`` (data file's directory,
    image directories) plus ``data.root``; None (no restriction) under ``data.allow_outside_root``."""
    if getattr(cfg, "allow_outside_root", False):
        return None
    out = [d for d in dirs if d is not None]
    r = root_dir(cfg)
    if r is not None:
        out.append(r)
    return [Path(os.path.abspath(d)) for d in dict.fromkeys(out)]


def parse_box(box: Any) -> tuple[float, float, float, float]:
    """``[x0, y0, x1, y1]`` -> floats; raises ValueError unless finite with x0 < x1, y0 < y1."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise ValueError(f"box must be [x0, y0, x1, y1], got {box!r}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in box):
        raise ValueError(f"box coordinates must be numbers, got {box!r}")
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except OverflowError:                     # an integer beyond float range (JSON allows any)
        raise ValueError(f"box coordinates out of range, got {box!r}") from None
    if not all(abs(v) < float("inf") for v in (x0, y0, x1, y1)) or not (x0 < x1 and y0 < y1):
        raise ValueError(f"box must satisfy x0 < x1 and y0 < y1, got {box!r}")
    return (x0, y0, x1, y1)


class SampleGrouper:
    """Collect rows into unique-image Samples: rows with the same image key add captions
    (and regions) to the first Sample; ``image_id`` is the index of the unique image."""

    def __init__(self):
        self._by_key: dict[str, Sample] = {}
        self.samples: list[Sample] = []

    def add(self, key: str, load_image, captions: Sequence[str], source: str = "",
            item_id: int | None = None, label: str | None = None, category: str | None = None,
            regions: Sequence[Region] = (), subcategory: str | None = None) -> Sample:
        s = self._by_key.get(key)
        if s is None:
            image_id = len(self.samples)
            s = Sample(key=key, load_image=load_image, captions=list(captions), image_id=image_id,
                       item_id=image_id if item_id is None else int(item_id), label=label,
                       category=category, subcategory=subcategory, regions=list(regions),
                       source=source)
            self._by_key[key] = s
            self.samples.append(s)
        else:
            s.captions.extend(c for c in captions if c not in s.captions)
            s.regions.extend(regions)
            if s.label is None:
                s.label = label
            if s.category is None:
                s.category = category
            if s.subcategory is None:
                s.subcategory = subcategory
        return s

    def __len__(self) -> int:
        return len(self.samples)


# ---------------------------------------------------------------------------- items (loader)

_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def sample_seed(*parts: int) -> int:
    """Well-mixed 64-bit seed from integers, e.g. ``sample_seed(seed, epoch, index)``."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _M64))
    return h


def classify_error(exc: BaseException) -> str:
    """Exception raised while loading/transforming an image -> short skip reason."""
    if isinstance(exc, FileNotFoundError):
        return "missing file"
    if isinstance(exc, EmptyImageError):
        return "empty file"
    if isinstance(exc, (Image.DecompressionBombError, MemoryError)):
        return "image too large"
    msg = str(exc).lower()
    if "truncated" in msg or "broken data stream" in msg:
        return "truncated image"
    if "unsupported image mode" in msg:
        return "unsupported mode"
    if isinstance(exc, (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
                        IndexError, KeyError)):
        return "corrupt image"
    return f"load error ({type(exc).__name__})"


def load_item(sample: Sample, caption: str, transform, rng: random.Random | None,
              strict: bool = False) -> dict | Skipped:
    """Load, convert and transform one (image, caption) pair; failures -> ``Skipped``
    (or ``BadSampleError`` naming key and source when ``strict``)."""
    caption = clean_text(caption) if isinstance(caption, str) else ""
    try:
        if not caption:
            raise _EmptyCaption()
        img = sample.load_image()
        if hasattr(img, "load"):
            img.load()  # PIL is lazy: decode errors must happen inside this try
        regions = list(sample.regions)
        if regions and accepts_boxes(transform):
            x, boxes = transform(to_rgb(img), rng, boxes=[r.box for r in regions])  # (3, S, S)
            regions = [Region(box=b, phrase=r.phrase) for r, b in zip(regions, boxes)
                       if b is not None]
        else:
            x = transform(to_rgb(img), rng)                                  # (3, S, S)
    except Exception as e:
        reason = "empty caption" if isinstance(e, _EmptyCaption) else classify_error(e)
        if strict:
            src = f" (from {sample.source})" if sample.source and sample.source != sample.key else ""
            raise BadSampleError(f"{sample.key}{src}: {reason} ({type(e).__name__}: {e})") from e
        return Skipped(reason, sample.key)
    return {"image": x, "caption": caption, "image_id": sample.image_id, "item_id": sample.item_id,
            "key": sample.key, "regions": regions, "label": sample.label,
            "category": sample.category, "subcategory": sample.subcategory}


class _EmptyCaption(Exception):
    pass
