"""Zero-shot VQA on the ``shapes`` scenes (see :mod:`finealign.data.sources.shapes_vqa`), exact match.

The model answers with ``model.answer(images, questions, template=..., max_new_tokens=..., beam_size=...)``
(MacCap models; ``eval.vqa_beam_size``, 5 as in MacCap; ``eval.vqa_max_new_tokens``, 5). Predictions and
references go through :func:`normalize_answer` and are compared exactly.
Reported: accuracy (%), per question kind, and a chance baseline ``answer_prior``: the accuracy of
always answering each kind's most frequent reference answer.
"""
from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict

import torch
from tqdm.auto import tqdm

__all__ = ["DEFAULT_TEMPLATE", "can_answer", "normalize_answer", "evaluate_vqa"]

log = logging.getLogger("finealign")
DEFAULT_TEMPLATE = "Question: {} Short answer:"

_NUMBERS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "6": "six",
            "7": "seven", "8": "eight", "9": "nine", "10": "ten"}
_SYNONYMS = {"centre": "center", "middle": "center", "upper": "top", "lower": "bottom", **_NUMBERS}
# leading filler words dropped before taking the first word ("it is red", "on the left", "there are 2")
_FILLER = frozenset(("a", "an", "the", "in", "on", "at", "it", "its", "is", "there", "are"))


def can_answer(model) -> bool:
    """Whether the model has a VQA interface (``answer``)."""
    return callable(getattr(model, "answer", None))


def normalize_answer(text: str) -> str:
    """Free text -> one answer word: lowercase; punctuation stripped (hyphens inside words kept,
    apostrophes dropped); leading fillers (articles, ``in/on/at``, ``it is``, ``there are``) dropped;
    digits -> number words, ``centre/middle`` -> ``center``, ``upper/lower`` -> ``top/bottom``;
    ``top left`` -> ``top-left`` (likewise the other corners); then the first word (``""`` if none)."""
    s = str(text).lower().replace("'", "").replace("\u2019", "").replace("_", " ")
    s = re.sub(r"[^\w\s-]", " ", s)
    s = re.sub(r"(?<![a-z0-9])-+|-+(?![a-z0-9])", " ", s)        # keep only word-internal hyphens
    words = [_SYNONYMS.get(w, w) for w in s.split()]
    while words and words[0] in _FILLER:
        words.pop(0)
    if not words:
        return ""
    if len(words) > 1 and words[0] in ("top", "bottom") and words[1] in ("left", "right"):
        return f"{words[0]}-{words[1]}"
    return words[0]


def _percent(num: int, den: int) -> float:
    return 100.0 * num / den if den else 0.0


@torch.no_grad()
def evaluate_vqa(model, cfg, split: str, device: torch.device | str = "cpu", max_images: int = 0,
                 progress: bool = True) -> dict:
    """Exact-match VQA on ``split`` of ``cfg.data`` (``shapes`` / ``shapes-items``) with at most
    ``max_images`` images (0 = all). Template: ``cfg.eval.vqa_template`` when the config has one, else
    :data:`DEFAULT_TEMPLATE`; beams: ``cfg.eval.vqa_beam_size``. Returns ``{"accuracy", "n", "num_images",
    "by_kind", "n_by_kind", "answer_prior", "answer_prior_by_kind", "template", "beam_size", "samples"}``
    (percentages; ``samples``: the first 10 questions with reference, raw and normalised prediction)."""
    from ..data.sources.shapes_vqa import build_vqa
    from ..data.transforms import ImageTransform

    if not can_answer(model):
        raise TypeError(f"{type(model).__name__} has no answer(images, questions) method: cannot run vqa")
    items = build_vqa(cfg.data, split, max_images=max_images)
    if not items:
        raise ValueError(f"vqa: split {split!r} has no questions")
    template = getattr(cfg.eval, "vqa_template", None) or DEFAULT_TEMPLATE
    beam_size, max_new = int(cfg.eval.vqa_beam_size), int(cfg.eval.vqa_max_new_tokens)
    transform = ImageTransform(cfg.model.image_size, train=False)
    device = torch.device(device)
    batch_size = max(1, int(cfg.data.eval_batch_size))

    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    preds: list[str] = []
    try:
        bar = tqdm(total=len(items), desc="vqa", disable=not progress, unit="q", dynamic_ncols=True)
        cache_key, cache_img = None, None       # consecutive questions share their image
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            images = []
            for it in batch:
                if it.key != cache_key:
                    cache_key, cache_img = it.key, transform(it.load_image())
                images.append(cache_img)
            out = model.answer(torch.stack(images).to(device), [it.question for it in batch],
                               template=template, max_new_tokens=max_new, beam_size=beam_size)
            if len(out) != len(batch):
                raise ValueError(f"model.answer returned {len(out)} answers for {len(batch)} questions")
            preds.extend(str(p) for p in out)
            bar.update(len(batch))
        bar.close()
    finally:
        if was_training:
            model.train(True)

    normed = [normalize_answer(p) for p in preds]
    correct: Counter = Counter()
    total: Counter = Counter()
    answers: dict[str, Counter] = defaultdict(Counter)
    for it, p in zip(items, normed):
        total[it.kind] += 1
        correct[it.kind] += int(p == normalize_answer(it.answer))
        answers[it.kind][it.answer] += 1
    kinds = sorted(total)
    prior = {k: answers[k].most_common(1)[0][1] for k in kinds}
    n = len(items)
    return {
        "accuracy": _percent(sum(correct.values()), n),
        "n": n,
        "num_images": len({it.key for it in items}),
        "by_kind": {k: _percent(correct[k], total[k]) for k in kinds},
        "n_by_kind": {k: total[k] for k in kinds},
        "answer_prior": _percent(sum(prior.values()), n),
        "answer_prior_by_kind": {k: _percent(prior[k], total[k]) for k in kinds},
        "template": template,
        "beam_size": beam_size,
        "samples": [{"key": it.key, "question": it.question, "answer": it.answer, "prediction": p,
                     "normalized": q} for it, p, q in list(zip(items, preds, normed))[:10]],
    }
