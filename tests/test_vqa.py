"""Zero-shot VQA on shapes scenes: question/answer definitions on hand-built scenes, determinism and
image identity with the ``shapes`` source, answer normalisation, and the evaluation through a stub
model that implements the ``answer`` interface (and the skip for models without it)."""
import logging
from collections import Counter

import numpy as np
import pytest
import torch

from finealign.config import ConfigError, DataConfig, load_config
from finealign.data.skips import SkipLog
from finealign.data.sources.shapes import Obj, Scene, make_scene
from finealign.data.sources.shapes_vqa import (COLOUR_ANSWERS, COUNT_ANSWERS, POSITION_ANSWERS, build_vqa,
                                               vqa_questions)
from finealign.data.transforms import ImageTransform
from finealign.eval.runner import evaluate, format_results
from finealign.eval.vqa import evaluate_vqa, normalize_answer
from finealign.registry import SOURCES


def _scene(*objs: Obj) -> Scene:
    return Scene(objects=tuple(objs), mentioned=tuple(range(len(objs))), primary=0, dark=False, shade=220,
                 caption="unused")


def _obj(size, colour, shape, cell) -> Obj:
    return Obj(shape=shape, colour=colour, size=size, cell=cell, jitter=(0.0, 0.0))


def test_answers_follow_the_definition_on_hand_built_scenes():
    two = _scene(_obj("large", "red", "circle", (0, 1)), _obj("small", "blue", "square", (2, 2)))
    assert vqa_questions(two) == [
        ("how many shapes are there?", "two", "count"),
        ("what colour is the large circle?", "red", "colour"),
        ("what colour is the small square?", "blue", "colour"),
        ("where is the large red circle?", "left", "position"),
        ("where is the small blue square?", "bottom-right", "position"),
    ]
    # two large circles: no colour question about "the large circle"; the phrases still differ
    dup = _scene(_obj("large", "red", "circle", (0, 0)), _obj("large", "blue", "circle", (1, 1)),
                 _obj("small", "red", "circle", (2, 0)))
    q = vqa_questions(dup)
    assert ("how many shapes are there?", "three", "count") in q
    assert [x for x in q if x[2] == "colour"] == [("what colour is the small circle?", "red", "colour")]
    assert [x[1] for x in q if x[2] == "position"] == ["top-left", "center", "top-right"]
    # identical phrases: neither is asked about (colour nor position); the count still is
    same = _scene(_obj("small", "green", "star", (0, 2)), _obj("small", "green", "star", (1, 2)))
    assert vqa_questions(same) == [("how many shapes are there?", "two", "count")]
    one = _scene(_obj("small", "yellow", "cross", (1, 0)))
    assert [a for _, a, _ in vqa_questions(one)] == ["one", "yellow", "top"]


def test_build_vqa_is_deterministic_and_uses_the_shapes_images():
    cfg = DataConfig(source="shapes", num_samples=30, seed=3)
    a, b = build_vqa(cfg, "test"), build_vqa(cfg, "test")
    assert [(x.key, x.question, x.answer, x.kind) for x in a] == [(x.key, x.question, x.answer, x.kind) for x in b]
    assert len({x.key for x in a}) == 30 and len(a) > 30
    assert {x.kind for x in a} == {"count", "colour", "position"}
    assert {x.answer for x in a if x.kind == "count"} <= set(COUNT_ANSWERS)
    assert {x.answer for x in a if x.kind == "colour"} <= set(COLOUR_ANSWERS)
    assert {x.answer for x in a if x.kind == "position"} <= set(POSITION_ANSWERS)
    assert all(normalize_answer(x.answer) == x.answer for x in a)     # references are normal forms
    plain = SOURCES.get("shapes")(cfg, "test", SkipLog())
    by_key = {s.key: s for s in plain}
    for x in a[::7]:
        s = by_key[x.key]
        assert np.array_equal(np.asarray(x.load_image()), np.asarray(s.load_image()))
    idx = int(a[-1].key.rsplit("/", 1)[1])
    assert [q for q in vqa_questions(make_scene(3, "test", idx))] == \
        [(x.question, x.answer, x.kind) for x in a if x.key == a[-1].key]
    assert {x.key for x in build_vqa(cfg, "test", max_images=4)} == {f"shapes/test/{i}" for i in range(4)}
    # other splits are other scenes
    assert [x.question for x in build_vqa(cfg, "val")] != [x.question for x in a]


def test_build_vqa_shapes_items_view0_and_other_sources():
    cfg = DataConfig(source="shapes-items", num_samples=12)
    items = build_vqa(cfg, "test")
    keys = sorted({x.key for x in items}, key=lambda k: int(k.split("/")[2]))
    assert keys == [f"shapes-items/test/{i}/0" for i in range(4)]
    views = SOURCES.get("shapes-items")(cfg, "test", SkipLog())
    for x in items:
        item = int(x.key.split("/")[2])
        assert np.array_equal(np.asarray(x.load_image()), np.asarray(views[3 * item].load_image()))
    with pytest.raises(ValueError, match="vqa task needs data.source shapes"):
        build_vqa(DataConfig(source="emoji"), "test")


@pytest.mark.parametrize("text,norm", [
    ("Red.", "red"), ("2", "two"), (" 3!", "three"), ("It is BLUE, I think", "blue"), ("on the left.", "left"),
    ("top left", "top-left"), ("Bottom-Right", "bottom-right"), ("in the centre", "center"),
    ("upper right corner", "top-right"), ("there are two shapes", "two"), ("", ""), ("...", ""),
    ("the", ""), ("it's purple", "purple"),
])
def test_normalize_answer(text, norm):
    assert normalize_answer(text) == norm


class _Answerer(torch.nn.Module):
    """Stub with the MacCap ``answer`` interface: looks the truth up by (image, question); answers colour
    as "Red." and count as a digit (exercising normalisation), and position always wrongly."""

    def __init__(self, truth: dict):
        super().__init__()
        self.truth, self.calls, self.beams, self.lengths = truth, [], [], []

    def answer(self, images, questions, template="Question: {} Short answer:", max_new_tokens=5, beam_size=1):
        assert images.ndim == 4 and len(images) == len(questions)
        self.calls.append((len(questions), template))
        self.lengths.append(max_new_tokens)
        self.beams.append(beam_size)
        out = []
        for img, q in zip(images, questions):
            kind, ans = self.truth[(img.numpy().tobytes(), q)]
            if kind == "colour":
                out.append(ans.capitalize() + ".")
            elif kind == "count":
                out.append(str(COUNT_ANSWERS.index(ans) + 1))
            else:
                out.append("nowhere")
        return out


def _cfg(n: int):
    return load_config("clip", overrides=["data.source=shapes", f"data.num_samples={n}", "data.eval_batch_size=5"])


def _truth(cfg, items) -> dict:
    tf = ImageTransform(cfg.model.image_size, train=False)
    return {(tf(x.load_image()).numpy().tobytes(), x.question): (x.kind, x.answer) for x in items}


def test_evaluate_vqa_scores_exact_match_by_kind():
    cfg = _cfg(16)
    items = build_vqa(cfg.data, "test")
    model = _Answerer(_truth(cfg, items))
    res = evaluate_vqa(model, cfg, "test", progress=False)
    n = Counter(x.kind for x in items)
    assert res["n"] == len(items) and res["num_images"] == 16 and res["n_by_kind"] == dict(n)
    assert res["by_kind"] == {"colour": 100.0, "count": 100.0, "position": 0.0}
    assert res["accuracy"] == pytest.approx(100.0 * (n["colour"] + n["count"]) / len(items))
    prior = {k: Counter(x.answer for x in items if x.kind == k).most_common(1)[0][1] for k in n}
    assert res["answer_prior_by_kind"] == {k: pytest.approx(100.0 * prior[k] / n[k]) for k in n}
    assert res["answer_prior"] == pytest.approx(100.0 * sum(prior.values()) / len(items))
    assert len(res["samples"]) == 10 and res["samples"][0]["question"] == items[0].question
    first = res["samples"][0]                                   # a count question, answered with a digit
    assert first["prediction"].isdigit() and first["normalized"] == first["answer"] == items[0].answer
    assert all(t == "Question: {} Short answer:" for _, t in model.calls)
    assert [c for c, _ in model.calls] == [5] * (len(items) // 5) + ([len(items) % 5] if len(items) % 5 else [])
    assert set(model.beams) == {5} and res["beam_size"] == 5         # MacCap's beam 5 unless configured
    assert set(model.lengths) == {5}                                  # answers of up to 5 tokens unless configured
    small = evaluate_vqa(model, cfg, "test", max_images=3, progress=False)
    assert small["num_images"] == 3
    model.beams.clear()
    model.lengths.clear()
    greedy = load_config("clip", overrides=["data.source=shapes", "data.num_samples=3", "eval.vqa_beam_size=1",
                                            "eval.vqa_max_new_tokens=3"])
    assert evaluate_vqa(model, greedy, "test", progress=False)["beam_size"] == 1 and set(model.beams) == {1}
    assert set(model.lengths) == {3}
    with pytest.raises(ConfigError, match="eval.vqa_beam_size"):
        load_config("clip", overrides=["eval.vqa_beam_size=0"])
    with pytest.raises(ConfigError, match="eval.vqa_max_new_tokens must be >= 1"):
        load_config("clip", overrides=["eval.vqa_max_new_tokens=0"])


def test_evaluate_runs_vqa_and_skips_models_without_answer(caplog):
    cfg = _cfg(6)
    items = build_vqa(cfg.data, "test")
    res = evaluate(_Answerer(_truth(cfg, items)), None, cfg, split="test", tasks=["vqa"], progress=False)
    assert res["vqa"]["by_kind"]["colour"] == 100.0 and "num_images" not in res
    text = format_results(res)
    assert "vqa" in text and "accuracy" in text and "by_kind" in text

    class NoAnswer(torch.nn.Module):
        pass
    with caplog.at_level(logging.WARNING, logger="finealign"):
        res = evaluate(NoAnswer(), None, cfg, split="test", tasks=["vqa"], progress=False)
    assert "vqa" not in res and "num_images" not in res
    assert "skipping the vqa task" in caplog.text
