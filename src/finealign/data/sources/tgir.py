"""Text-guided image retrieval (TGIR, FashionIQ / CIRR style) triplets: (reference image, modification
text) -> target image, and the gallery they are ranked in.

A TGIR set is a gallery of ``Sample`` images plus queries naming gallery indices::

    TGIRSet(gallery=[Sample, ...], queries=[TGIRQuery(reference=3, text="...", target=12), ...])

Sources that can build one register a builder ``(cfg: DataConfig, split, max_queries) -> TGIRSet`` in
:data:`TGIR_SOURCES` under the name of their ordinary source; :func:`build_tgir` raises a clear error
for the others.

``shapes`` (procedural): query ``i`` of a split takes the ``shapes`` scene ``i`` of that split as the
reference (the very image the ``shapes`` source yields) and changes ONE mentioned object's colour,
shape or size (always to a different value; nothing else moves). The text names the object by its
phrase, plus its position when another object shares the phrase::

    "the same scene with the small red circle made blue"
    "make the large green square a star"          "the same scene with the small blue cross made large"

Gallery: the ``n`` reference images (indices ``0..n-1``) then the ``n`` target images (``n..2n-1``);
query ``i`` has ``reference = i`` and ``target = n + i``. ``Sample.image_id`` is the gallery index.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

from ...config import DataConfig
from ...registry import Registry
from ...types import Sample
from .shapes import (COLOURS, IMAGE_SIZE, POSITIONS, SHAPES, SIZES, Scene, _join, _num_images, _rng,
                     _split_name, make_scene, regions, render)

__all__ = ["TGIR_SOURCES", "TGIRQuery", "TGIRSet", "Edit", "build_tgir", "edit_scene", "shapes_tgir"]

TGIR_SOURCES: Registry = Registry("TGIR source")

ATTRIBUTES = ("colour", "shape", "size")
_TEMPLATES = {
    "colour": ("the same scene with the {obj} made {new}", "make the {obj} {new}"),
    "shape": ("the same scene with the {obj} turned into a {new}", "make the {obj} a {new}"),
    "size": ("the same scene with the {obj} made {new}", "make the {obj} {new}"),
}
_VALUES = {"colour": tuple(COLOURS), "shape": SHAPES, "size": tuple(SIZES)}


@dataclass(frozen=True)
class TGIRQuery:
    reference: int      # gallery index of the reference image (excluded from its own candidates)
    text: str           # modification text
    target: int         # gallery index of the target image


@dataclass
class TGIRSet:
    gallery: list[Sample]       # candidate images; ``gallery[g].image_id == g``
    queries: list[TGIRQuery]


@dataclass(frozen=True)
class Edit:
    """One attribute change of one object: ``scene.objects[obj].<attr>`` goes from ``old`` to ``new``."""
    obj: int
    attribute: str      # colour | shape | size
    old: str
    new: str


def _name(scene: Scene, i: int) -> str:
    """The object's phrase, plus its position when another object of the scene shares the phrase."""
    o = scene.objects[i]
    shared = any(p.phrase == o.phrase for j, p in enumerate(scene.objects) if j != i)
    return f"{o.phrase} {POSITIONS[o.cell]}" if shared else o.phrase


def edit_scene(scene: Scene, seed: int, split: str, index: int) -> tuple[Scene, str, Edit]:
    """Reference scene -> ``(target scene, modification text, edit)``; deterministic in its arguments.

    The edited object is one of the mentioned ones; its new attribute value differs from the old one.
    The target keeps the reference's background, positions and jitter; its caption lists its mentioned
    objects with their positions, and its primary object is recomputed (the first large one).
    """
    rng = _rng("tgir", seed, split, index)
    i = rng.choice(scene.mentioned)
    attr = rng.choice(ATTRIBUTES)
    old = getattr(scene.objects[i], attr)
    new = rng.choice([v for v in _VALUES[attr] if v != old])
    text = rng.choice(_TEMPLATES[attr]).format(obj=_name(scene, i), new=new)
    objs = list(scene.objects)
    objs[i] = dataclasses.replace(objs[i], **{attr: new})
    primary = next((j for j, o in enumerate(objs) if o.size == "large"), 0)
    caption = _join([f"a {objs[j].phrase} {POSITIONS[objs[j].cell]}" for j in scene.mentioned])
    target = dataclasses.replace(scene, objects=tuple(objs), primary=primary, caption=caption)
    return target, text, Edit(i, attr, old, new)


def _sample(scene: Scene, key: str, gallery_index: int, item: int) -> Sample:
    primary = scene.objects[scene.primary].shape
    return Sample(key=key, load_image=partial(render, scene, size=IMAGE_SIZE), captions=[scene.caption],
                  image_id=gallery_index, item_id=item, label=primary, category=primary,
                  regions=regions(scene), source=key)


@TGIR_SOURCES.register("shapes")
@TGIR_SOURCES.register("shapes-items")
def shapes_tgir(cfg: DataConfig, split: str, max_queries: int = 0) -> TGIRSet:
    """``n`` queries (``cfg.num_samples``, or the ``shapes`` default size of the split, capped by
    ``max_queries`` when > 0) and a gallery of ``2n`` images (see the module docstring). ``shapes-items``
    (fashion-style: several views per item) gets the same set: its scenes come from the same generator,
    and a TGIR query is about one canonical view."""
    name = _split_name(cfg, split)
    n = _num_images(cfg, name)
    if max_queries > 0:
        n = min(n, max_queries)
    refs, targets, queries = [], [], []
    for i in range(n):
        scene = make_scene(cfg.seed, name, i)
        target, text, _ = edit_scene(scene, cfg.seed, name, i)
        refs.append(_sample(scene, f"shapes-tgir/{name}/{i}/reference", i, i))
        targets.append(_sample(target, f"shapes-tgir/{name}/{i}/target", n + i, i))
        queries.append(TGIRQuery(reference=i, text=text, target=n + i))
    return TGIRSet(gallery=refs + targets, queries=queries)


def build_tgir(cfg: DataConfig, split: str, max_queries: int = 0) -> TGIRSet:
    """The TGIR set of ``cfg.source`` for ``split``; a clear error for sources without one."""
    if cfg.source not in TGIR_SOURCES:
        raise ValueError(f"data source {cfg.source!r} provides no TGIR triplets, so eval task 'tgir' cannot "
                         f"run on it (sources with TGIR triplets: {', '.join(TGIR_SOURCES.names())})")
    return TGIR_SOURCES.get(cfg.source)(cfg, split, max_queries)
