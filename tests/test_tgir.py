"""Text-guided image retrieval: shapes triplets (target = reference + exactly the described change),
R@10 / R@50 with the reference excluded on a hand-made gallery, and ``evaluate(tasks=["tgir"])``."""
import numpy as np
import pytest
import torch

from finealign.config import DataConfig, load_config
from finealign.data.skips import SkipLog
from finealign.data.sources import shapes
from finealign.data.sources.tgir import build_tgir, edit_scene, shapes_tgir
from finealign.data.tokenizer import Tokenizer
from finealign.data.transforms import ImageTransform
from finealign.eval.runner import evaluate, format_results
from finealign.eval.tgir import compose_queries, tgir_metrics, tgir_ranks
from finealign.models.factory import build_model
from finealign.registry import SOURCES


def _changed_pixels(a, b) -> np.ndarray:
    return np.argwhere((np.asarray(a).astype(int) != np.asarray(b).astype(int)).any(-1))   # (n, 2) (y, x)


def test_shapes_triplets_differ_by_exactly_the_described_change():
    cfg = DataConfig(source="shapes", num_samples=40)
    tg = shapes_tgir(cfg, "test")
    plain = SOURCES.get("shapes")(cfg, "test", SkipLog())
    assert len(tg.queries) == 40 and len(tg.gallery) == 80
    assert [g.image_id for g in tg.gallery] == list(range(80))
    seen = set()
    for i, q in enumerate(tg.queries):
        assert (q.reference, q.target) == (i, 40 + i)
        ref = shapes.make_scene(0, "test", i)
        target, text, e = edit_scene(ref, 0, "test", i)
        seen.add(e.attribute)
        assert text == q.text and e.obj in ref.mentioned and e.old != e.new
        old = ref.objects[e.obj]
        assert old.phrase in text and text.endswith(e.new)           # names the object and the new value
        assert getattr(old, e.attribute) == e.old and getattr(target.objects[e.obj], e.attribute) == e.new
        for j, (a, b) in enumerate(zip(ref.objects, target.objects)):  # nothing else changes
            if j == e.obj:
                assert {f for f in ("shape", "colour", "size", "cell", "jitter")
                        if getattr(a, f) != getattr(b, f)} == {e.attribute}
            else:
                assert a == b
        # the reference image is the plain shapes image; the target differs only around the edited object
        ref_img, tgt_img = tg.gallery[q.reference].load_image(), tg.gallery[q.target].load_image()
        assert np.array_equal(np.asarray(ref_img), np.asarray(plain[i].load_image()))
        diff = _changed_pixels(ref_img, tgt_img)
        assert len(diff) > 0
        cx, cy, _ = shapes._geometry(old, shapes.View(), shapes.IMAGE_SIZE)
        r = shapes.SIZES["large"] * shapes.IMAGE_SIZE / 2 + 1
        assert (abs(diff[:, 1] - cx) <= r).all() and (abs(diff[:, 0] - cy) <= r).all()
    assert seen == {"colour", "shape", "size"}
    again = shapes_tgir(cfg, "test", max_queries=5)                   # deterministic, capped
    assert [q.text for q in again.queries] == [q.text for q in tg.queries[:5]] and len(again.gallery) == 10


def test_ambiguous_object_is_named_with_its_position():
    o = shapes.Obj("circle", "red", "small", (0, 0), (0.0, 0.0))
    scene = shapes.Scene((o, shapes.Obj("circle", "red", "small", (2, 2), (0.0, 0.0))), (0, 1), 0, True, 30, "x")
    _, text, e = edit_scene(scene, 0, "test", 0)
    where = shapes.POSITIONS[scene.objects[e.obj].cell]
    assert f"small red circle {where}" in text


def test_sources_without_triplets_are_named_in_the_error():
    with pytest.raises(ValueError, match="'emoji' provides no TGIR triplets.*shapes"):
        build_tgir(DataConfig(source="emoji"), "test")


def test_tgir_metric_hand_gallery():
    # 1-D embeddings: every query scores gallery image g as 60 - g (g = 0 is the best match)
    gallery = (60.0 - torch.arange(60.0))[:, None]                    # (60, 1)
    queries = torch.ones(4, 1)
    target = torch.tensor([9, 10, 50, 51])
    exclude = torch.tensor([20, 3, 0, 59])
    # q0: 9 better images -> 9; q1: 10 better, one of them (3) excluded -> 9;
    # q2: 50 better, 0 excluded -> 49; q3: 51 better, the excluded 59 is worse -> 51
    assert tgir_ranks(queries, gallery, target, exclude, chunk=3).tolist() == [9, 9, 49, 51]
    assert tgir_ranks(queries, gallery, target).tolist() == [9, 10, 50, 51]
    m = tgir_metrics(queries, gallery, target, exclude)
    assert m == {"r10": 50.0, "r50": 75.0, "mean_recall": 62.5}
    # ties count against the target: 11 candidates tie with it -> rank 10 -> a miss at 10
    flat = tgir_metrics(torch.ones(1, 1), torch.ones(12, 1), torch.tensor([0]), torch.tensor([1]))
    assert flat["r10"] == 0.0 and flat["r50"] == 100.0
    with pytest.raises(ValueError, match="target is also its excluded"):
        tgir_ranks(queries, gallery, target, target)
    with pytest.raises(ValueError, match="outside"):
        tgir_ranks(queries, gallery, torch.tensor([0, 1, 2, 60]))
    q = compose_queries(torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 3.0]]))
    assert torch.allclose(q, torch.tensor([[2 ** -0.5, 2 ** -0.5]]))


def test_evaluate_tgir_end_to_end_on_shapes():
    n = 30
    tok = Tokenizer.train([shapes.make_scene(0, "test", i).caption for i in range(50)], vocab_size=300)
    cfg = load_config("clip", overrides=["data.source=shapes", "data.num_samples=100", f"eval.max_images={n}",
                                         "data.eval_batch_size=16"])
    torch.manual_seed(0)
    model = build_model(cfg.model, tok.vocab_size)
    res = evaluate(model, tok, cfg, split="test", tasks=["tgir"], progress=False)
    assert "num_images" not in res and "retrieval" not in res
    t = res["tgir"]
    assert t["num_queries"] == n and t["num_gallery"] == 2 * n
    # recompute by hand: one query at a time, reference dropped from the candidates
    tg = shapes_tgir(cfg.data, "test", max_queries=n)
    tf = ImageTransform(cfg.model.image_size, train=False)
    with torch.no_grad():
        g = model.encode_image(torch.stack([tf(s.load_image()) for s in tg.gallery]))["embed"]
        ids, mask = tok.encode_batch([q.text for q in tg.queries], cfg.model.context_length)
        txt = model.encode_text(ids, mask)["embed"]
    hits10 = hits50 = 0
    for i, q in enumerate(tg.queries):
        qe = torch.nn.functional.normalize(g[q.reference] + txt[i], dim=0)
        scores = g @ qe
        wrong = [s for j, s in enumerate(scores.tolist()) if j not in (q.reference, q.target)]
        rank = sum(s >= scores[q.target].item() for s in wrong)
        hits10, hits50 = hits10 + (rank < 10), hits50 + (rank < 50)
    assert t["r10"] == pytest.approx(100 * hits10 / n) and t["r50"] == pytest.approx(100 * hits50 / n)
    assert "tgir" in format_results(res) and "r50" in format_results(res)
    with pytest.raises(ValueError, match="'emoji' provides no TGIR"):
        emoji_cfg = load_config("clip", overrides=["data.source=emoji"])
        evaluate(model, tok, emoji_cfg, tasks=["tgir"], progress=False)
