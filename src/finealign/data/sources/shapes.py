"""Procedural compositional scenes: coloured shapes on a plain background, generated on the fly.

Every image is a pure function of ``(cfg.seed, split, index)``: no files, no state, so any worker can
rebuild any sample. A scene holds 1-3 objects, each a (size, colour, shape) triple placed in one cell
of a 3x3 grid (so objects never overlap in the canonical view). The caption lists the objects it
mentions -- all of them usually, sometimes all but one, never the primary (largest) object left out --
e.g. ``"a large red circle on the left and a small blue square at the bottom"``. Each mentioned object
also becomes a ``Region`` whose box covers its pixels and whose phrase (``"large red circle"``) is a
substring of the caption, for grounding / fine-grained objectives.

Two registered sources:

* ``shapes``: one image per scene; ``item_id == image_id == index``.
* ``shapes-items``: ``VIEWS`` (3) images per scene sharing ``item_id`` and the caption. Views > 0 are
  re-rendered with a small shift / zoom / background-shade change and may hide or half-occlude one
  mentioned non-primary object (its region is dropped when hidden). See :func:`shapes_items`.

Splits draw from disjoint generators: the split name is hashed into every per-sample seed.
``cfg.num_samples`` (0 = :data:`DEFAULT_SIZES`) counts images; for ``shapes-items`` it is rounded down
to a multiple of ``VIEWS``.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from functools import partial
from typing import Sequence

from PIL import Image, ImageDraw

from ...config import DataConfig
from ...registry import SOURCES
from ...types import Region, Sample
from ..skips import SkipLog

IMAGE_SIZE = 64
VIEWS = 3
DEFAULT_SIZES = {"train": 5000, "val": 500, "test": 500}
DEFAULT_SIZE_OTHER = 500           # any other split name

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 235),
    "yellow": (245, 215, 30),
    "purple": (150, 60, 200),
    "orange": (250, 135, 20),
}
SIZES = {"small": 0.17, "large": 0.27}     # object side as a fraction of the image side
# 3x3 grid cells (col, row) -> phrase used in captions
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "in the top left", (1, 0): "at the top", (2, 0): "in the top right",
    (0, 1): "on the left", (1, 1): "in the center", (2, 1): "on the right",
    (0, 2): "in the bottom left", (1, 2): "at the bottom", (2, 2): "in the bottom right",
}
_CELLS = list(POSITIONS)
_TEMPLATES = ("{}", "{}", "{}", "a picture of {}", "an image of {}", "there is {}", "{} on a {bg} background")


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    cell: tuple[int, int]
    jitter: tuple[float, float]    # offset of the centre from the cell centre, in fractions of the image

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    mentioned: tuple[int, ...]     # indices into objects, in caption order
    primary: int                   # index of the largest (first large) object: the label
    dark: bool                     # dark or light background
    shade: int                     # background grey level
    caption: str


@dataclass(frozen=True)
class View:
    """How one rendering of a scene departs from the canonical view."""
    shift: tuple[float, float] = (0.0, 0.0)   # pixels
    scale: float = 1.0                        # zoom about the image centre
    shade: int | None = None                  # background grey level (None = the scene's)
    hidden: int | None = None                 # object index not drawn at all
    half: int | None = None                   # object index with one half covered by background


def _rng(*parts: object) -> random.Random:
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def make_scene(seed: int, split: str, index: int) -> Scene:
    """The scene (objects + caption) for one index; deterministic in its arguments."""
    rng = _rng("shapes", seed, split, index)
    n = rng.choices((1, 2, 3), weights=(0.2, 0.4, 0.4))[0]
    cells = rng.sample(_CELLS, n)
    objs = tuple(Obj(shape=rng.choice(SHAPES), colour=rng.choice(list(COLOURS)),
                     size=rng.choice(list(SIZES)), cell=c,
                     jitter=(rng.uniform(-0.02, 0.02), rng.uniform(-0.02, 0.02))) for c in cells)
    primary = next((i for i, o in enumerate(objs) if o.size == "large"), 0)
    mentioned = list(range(n))
    if n >= 2 and rng.random() < 0.15:      # leave one non-primary object out of the caption
        mentioned.remove(rng.choice([i for i in mentioned if i != primary]))
    rng.shuffle(mentioned)
    with_pos = rng.random() < 0.85
    parts = []
    for i in mentioned:
        o = objs[i]
        parts.append(f"a {o.phrase} {POSITIONS[o.cell]}" if with_pos else f"a {o.phrase}")
    dark = rng.random() < 0.5
    shade = rng.randint(15, 55) if dark else rng.randint(200, 240)
    caption = rng.choice(_TEMPLATES).format(_join(parts), bg="dark" if dark else "light")
    return Scene(objs, tuple(mentioned), primary, dark, shade, caption)


def make_view(scene: Scene, seed: int, split: str, index: int, view: int) -> View:
    """Canonical view for ``view == 0``; otherwise a small random re-rendering of the same scene."""
    if view == 0:
        return View()
    rng = _rng("view", seed, split, index, view)
    shade = (rng.randint(15, 55) if scene.dark else rng.randint(200, 240))
    hidden = half = None
    others = [i for i in scene.mentioned if i != scene.primary]
    if others and rng.random() < 0.3:
        if rng.random() < 0.5:
            hidden = rng.choice(others)
        else:
            half = rng.choice(others)
    return View(shift=(rng.uniform(-3, 3), rng.uniform(-3, 3)), scale=rng.uniform(0.85, 1.1),
                shade=shade, hidden=hidden, half=half)


def _geometry(o: Obj, v: View, size: int) -> tuple[float, float, float]:
    """Centre x, centre y and half-side (pixels) of an object in a view."""
    cx = ((o.cell[0] + 0.5) / 3 + o.jitter[0]) * size
    cy = ((o.cell[1] + 0.5) / 3 + o.jitter[1]) * size
    c = size / 2
    cx = (cx - c) * v.scale + c + v.shift[0]
    cy = (cy - c) * v.scale + c + v.shift[1]
    return cx, cy, SIZES[o.size] * size / 2 * v.scale


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.9
        d.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        d.polygon(pts, fill=fill)
    elif shape == "cross":
        t = r * 0.38
        d.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        d.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, view: View = View(), size: int = IMAGE_SIZE) -> Image.Image:
    """Draw a scene (RGB, ``size`` x ``size``)."""
    shade = scene.shade if view.shade is None else view.shade
    bg = (shade, shade, shade)
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    for i, o in enumerate(scene.objects):
        if i == view.hidden:
            continue
        cx, cy, r = _geometry(o, view, size)
        _draw_shape(d, o.shape, cx, cy, r, COLOURS[o.colour])
        if i == view.half:       # cover the right half with background
            d.rectangle((cx, cy - r - 0.5, cx + r + 0.5, cy + r + 0.5), fill=bg)
    return img


def regions(scene: Scene, view: View = View(), size: int = IMAGE_SIZE) -> list[Region]:
    """One region per mentioned object visible in the view (caption order), boxes clipped to the image."""
    out = []
    for i in scene.mentioned:
        if i == view.hidden:
            continue
        o = scene.objects[i]
        cx, cy, r = _geometry(o, view, size)
        x1 = cx if i == view.half else cx + r
        box = (max(0.0, cx - r), max(0.0, cy - r), min(float(size), x1), min(float(size), cy + r))
        out.append(Region(box=tuple(round(b, 2) for b in box), phrase=o.phrase))
    return out


class ShapesDataset(Sequence[Sample]):
    """Map-style procedural dataset. ``views`` > 1 gives that many images per scene (item)."""

    def __init__(self, seed: int, split: str, num_images: int, views: int = 1, size: int = IMAGE_SIZE):
        if views < 1:
            raise ValueError("views must be >= 1")
        self.seed, self.split, self.views, self.size = seed, split, views, size
        self.num_items = num_images // views
        self.name = "shapes" if views == 1 else "shapes-items"

    def __len__(self) -> int:
        return self.num_items * self.views

    def __getitem__(self, index: int) -> Sample:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}[{self.split}] index {index} out of range (len {len(self)})")
        item, v = divmod(index, self.views)
        scene = make_scene(self.seed, self.split, item)
        view = make_view(scene, self.seed, self.split, item, v)
        primary = scene.objects[scene.primary].shape
        key = f"{self.name}/{self.split}/{item}" + (f"/{v}" if self.views > 1 else "")
        return Sample(key=key, load_image=partial(render, scene, view, self.size),
                      captions=[scene.caption], image_id=index, item_id=item, label=primary,
                      category=primary, regions=regions(scene, view, self.size),
                      source=f"{self.name}:{self.split}:{index}")


def _split_name(cfg: DataConfig, split: str) -> str:
    """"train"/"val"/"test" go through ``cfg.train/val/test`` (defaults: themselves); others pass."""
    return str(getattr(cfg, split)) if split in ("train", "val", "test") else split


def _num_images(cfg: DataConfig, name: str) -> int:
    return cfg.num_samples if cfg.num_samples > 0 else DEFAULT_SIZES.get(name, DEFAULT_SIZE_OTHER)


def shapes_items(cfg: DataConfig, split: str, views: int = VIEWS) -> ShapesDataset:
    """Multi-view variant: ``views`` images per item, all sharing the item's caption and ``item_id``."""
    name = _split_name(cfg, split)
    return ShapesDataset(cfg.seed, name, _num_images(cfg, name), views=views)


@SOURCES.register("shapes")
def build(cfg: DataConfig, split: str, skips: SkipLog) -> ShapesDataset:
    """One procedural image per scene (nothing can be malformed, so ``skips`` is unused)."""
    name = _split_name(cfg, split)
    return ShapesDataset(cfg.seed, name, _num_images(cfg, name), views=1)


@SOURCES.register("shapes-items")
def build_items(cfg: DataConfig, split: str, skips: SkipLog) -> ShapesDataset:
    """``VIEWS`` images per scene sharing caption and ``item_id`` (see :func:`shapes_items`)."""
    return shapes_items(cfg, split)
