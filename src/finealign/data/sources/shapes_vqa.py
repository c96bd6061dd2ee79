"""Zero-shot VQA on the procedural ``shapes`` scenes: (image, question) -> one-word answer, exact match.

The images are the ``shapes`` source's own (same ``(seed, split, index)`` scenes, same rendering, same
``key``), so a model evaluated on ``shapes`` sees identical pixels here. Each scene gives several
questions, in this fixed order (all deterministic, no sampling):

* ``count`` (always one): ``"how many shapes are there?"`` -> ``"one"`` / ``"two"`` / ``"three"``.
* ``colour`` (one per object whose (size, shape) pair is unique in the scene):
  ``"what colour is the large circle?"`` -> a colour name (:data:`COLOUR_ANSWERS`).
* ``position`` (one per object whose (size, colour, shape) phrase is unique in the scene):
  ``"where is the small blue square?"`` -> the object's 3x3 grid cell as one word
  (:data:`POSITION_ANSWERS`)::

      top-left     top     top-right
      left         center  right
      bottom-left  bottom  bottom-right

  (the cells of the captions' ``"in the top left"``, ``"at the top"``, ... phrases; corners are
  hyphenated so that every answer is a single word).

Questions only ask about objects drawn in the image: every object of the canonical (view 0) rendering
is visible, and only canonical renderings are used. Supported sources: ``shapes`` and ``shapes-items``
(view 0 of every item, which is the same picture as ``shapes``' image of that index; keys end in
``/0``). Other sources raise ``ValueError``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Callable

from PIL import Image

from ...config import DataConfig
from .shapes import COLOURS, IMAGE_SIZE, VIEWS, Scene, _num_images, _split_name, make_scene, render

__all__ = ["VQAItem", "KINDS", "COUNT_ANSWERS", "COLOUR_ANSWERS", "POSITION_ANSWERS", "CELL_ANSWERS",
           "vqa_questions", "build_vqa"]

KINDS = ("count", "colour", "position")
COUNT_ANSWERS = ("one", "two", "three")
COLOUR_ANSWERS = tuple(COLOURS)
# 3x3 grid cell (col, row) -> one-word position answer
CELL_ANSWERS: dict[tuple[int, int], str] = {
    (0, 0): "top-left", (1, 0): "top", (2, 0): "top-right",
    (0, 1): "left", (1, 1): "center", (2, 1): "right",
    (0, 2): "bottom-left", (1, 2): "bottom", (2, 2): "bottom-right",
}
POSITION_ANSWERS = tuple(CELL_ANSWERS.values())
SUPPORTED = ("shapes", "shapes-items")


@dataclass(frozen=True)
class VQAItem:
    key: str                                # image key (== the ``shapes`` Sample key of that image)
    load_image: Callable[[], Image.Image]
    question: str
    answer: str                             # one word from the kind's answer vocabulary
    kind: str                               # "count" | "colour" | "position"


def vqa_questions(scene: Scene, visible: tuple[int, ...] | None = None) -> list[tuple[str, str, str]]:
    """``(question, answer, kind)`` triples for a scene (see the module doc); ``visible`` restricts the
    objects asked about and counted (default: all, as in the canonical rendering)."""
    idx = list(range(len(scene.objects))) if visible is None else sorted(visible)
    objs = [scene.objects[i] for i in idx]
    if not 1 <= len(objs) <= len(COUNT_ANSWERS):
        raise ValueError(f"cannot ask about a scene with {len(objs)} visible objects")
    out = [("how many shapes are there?", COUNT_ANSWERS[len(objs) - 1], "count")]
    size_shape = Counter((o.size, o.shape) for o in objs)
    phrases = Counter(o.phrase for o in objs)
    for o in objs:
        if size_shape[(o.size, o.shape)] == 1:
            out.append((f"what colour is the {o.size} {o.shape}?", o.colour, "colour"))
    for o in objs:
        if phrases[o.phrase] == 1:
            out.append((f"where is the {o.phrase}?", CELL_ANSWERS[o.cell], "position"))
    return out


def build_vqa(cfg: DataConfig, split: str, max_images: int = 0) -> list[VQAItem]:
    """All VQA items of a split, scene by scene (several per image), deterministic in ``cfg.seed`` and
    ``split``. Images and keys are those of the ``shapes`` source (``shapes-items``: view 0 of each
    item). ``max_images`` > 0 keeps the first that many images."""
    if cfg.source not in SUPPORTED:
        raise ValueError(f"vqa task needs data.source shapes (or shapes-items, asked on view 0); "
                         f"got data.source={cfg.source!r}")
    name = _split_name(cfg, split)
    n = _num_images(cfg, name)
    if cfg.source == "shapes-items":
        n //= VIEWS
    if max_images > 0:
        n = min(n, max_images)
    items = []
    for index in range(n):
        scene = make_scene(cfg.seed, name, index)
        key = f"{cfg.source}/{name}/{index}" + ("/0" if cfg.source == "shapes-items" else "")
        load = partial(render, scene, size=IMAGE_SIZE)
        items.extend(VQAItem(key, load, q, a, k) for q, a, k in vqa_questions(scene))
    return items
