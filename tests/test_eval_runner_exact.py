"""Exact behaviour of the eval runner and its helpers, on hand-built inputs whose results are worked out
by hand.

* ``evaluate`` (runner): a tiny colour model (an image embeds as the one-hot of its dominant channel, a
  text as the sum of its colour words) on solid-colour samples: the retrieval recalls by image and by
  item (ungrouped images are their own item), ``num_texts`` / ``num_images``, ``eval.max_images``, the
  zero-shot classification result dict, the caption task's sample spread (first and last image) and its
  per-batch top-p seeds, the tokenizer check, and the model's train mode put back.
* ``shard_bounds``: contiguous whole-batch shares for several ranks; errors propagate without a group.
* ``tgir_ranks`` / ``tgir_metrics``: ties, the excluded reference, chunking, mean recall.
* ``rerank``: the ITC rank kept when the top-k has no correct candidate, both directions' pair order.
* ``normalize_answer`` / ``evaluate_vqa`` details; classification validation; caption result fields.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from finealign.config import load_config
from finealign.data.tokenizer import Tokenizer
from finealign.eval import captioning
from finealign.eval.classification import build_class_embeddings, zero_shot_classify
from finealign.eval.rerank import itm_rerank_metrics, rerank_ranks, score_topk
from finealign.eval.runner import evaluate, format_results
from finealign.eval.shard import Sharding, shard_bounds
from finealign.eval.tgir import tgir_metrics, tgir_ranks
from finealign.eval.vqa import normalize_answer
from finealign.types import Sample

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
WORDS = ["red", "green", "blue", "a", "thing", "of"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([" ".join(WORDS)] * 50, vocab_size=300)


class ColourModel(torch.nn.Module):
    """image -> one-hot of its dominant (normalised) channel; text -> L2-normalised sum of colour words.
    With ``decoder`` set it captions an image with its colour word (recording the top-p generators)."""

    embed_dim = 3

    def __init__(self, tok, decoder: bool = False):
        super().__init__()
        table = torch.zeros(tok.vocab_size, 3)
        for d, w in enumerate(["red", "green", "blue"]):
            (i,) = tok.tokenize([w])[0]
            table[i, d] = 1.0
        self.register_buffer("table", table)
        self.tok, self.modes, self.seeds = tok, [], []
        self.decoder = torch.nn.Identity() if decoder else None

    def encode_image(self, images):
        self.modes.append(self.training)
        return {"embed": F.one_hot(images.mean((2, 3)).argmax(1), 3).float()}

    def encode_text(self, ids, mask):
        return {"embed": F.normalize((self.table[ids] * mask[..., None]).sum(1), dim=-1)}

    def generate(self, images, bos, eos, pad, generator=None, **kw):
        if generator is not None:
            self.seeds.append(generator.initial_seed())
        words = [["red", "green", "blue"][int(c)] for c in images.mean((2, 3)).argmax(1)]
        ids, _ = self.tok.encode_batch(words, 8)
        return ids


def _sample(key, colour, captions, label=None, item=-1, i=0):
    return Sample(key=key, load_image=lambda: Image.new("RGB", (8, 8), COLOURS[colour]), captions=captions,
                  image_id=i, item_id=item, label=label)


def _four():
    # images red, green, green, red; captions (t0, t1) -> img0, t2 -> img1, t3 -> img2, t4 -> img3
    return [_sample("r0", "red", ["red", "a red thing"], "red", 7, 0),
            _sample("g1", "green", ["green"], "green", -1, 1),
            _sample("g2", "green", ["blue"], "blue", -1, 2),
            _sample("r3", "red", ["red"], "red", 7, 3)]


def _cfg(*over):
    return load_config("clip", ["data.eval_batch_size=3", "model.context_length=8",
                                "eval.templates=[\"{}\", \"a {}\"]", *over])


def test_retrieval_and_classification_by_hand(tok, one_thread):
    model = ColourModel(tok).train()
    res = evaluate(model, tok, _cfg(), tasks=["retrieval", "classify"], progress=False, samples=_four())
    assert model.training and model.modes and not any(model.modes)      # evaluated in eval mode, put back
    r = res["retrieval"]
    assert res["num_images"] == 4 and r["num_texts"] == 5 and r["by"] == "image"
    # i2t ranks [1, 0, 4, 2] (img0: t4 ties; img2's "blue" scores 0 like 4 wrong texts); t2i [1, 1, 1, 3, 1]
    assert (r["i2t_r1"], r["i2t_r5"], r["t2i_r1"], r["t2i_r5"]) == (25.0, 100.0, 0.0, 100.0)
    assert r["mean_recall"] == pytest.approx((25 + 100 + 100 + 0 + 100 + 100) / 6)
    # classes sorted [blue, green, red]; img2 (green, labelled blue) ranks 2nd-to-last: blue 0 <= red 0, green 1
    c = res["classify"]
    assert c == {"top1": 75.0, "top5": 100.0, "num_classes": 3, "by": "label"}
    text = format_results(res)
    assert "num_texts" in text and "classify" in text and "num_classes" in text


def test_retrieval_by_item_keeps_ungrouped_images_apart(tok, one_thread):
    res = evaluate(ColourModel(tok), tok, _cfg("eval.retrieval_by=item"), tasks=["retrieval"], progress=False,
                   samples=_four())
    r = res["retrieval"]
    # items [7, own, own, 7]: i2t ranks [0, 0, 4, 0]; t2i: "green" still ties with the other green image
    # (a different, ungrouped item) -> [0, 0, 1, 3, 0]
    assert r["by"] == "item" and (r["i2t_r1"], r["t2i_r1"], r["t2i_r5"]) == (75.0, 60.0, 100.0)


def test_max_images_cuts_the_samples(tok, one_thread):
    model = ColourModel(tok).eval()
    res = evaluate(model, tok, _cfg("eval.max_images=3"), tasks=["retrieval"], progress=False, samples=_four())
    assert not model.training                                             # eval mode stays eval mode
    assert res["num_images"] == 3 and res["retrieval"]["num_texts"] == 4


def test_classify_without_labels_is_skipped(tok, one_thread, caplog):
    samples = [_sample("r", "red", ["red"]), _sample("g", "green", ["green"])]
    with caplog.at_level(logging.WARNING, logger="finealign"):
        res = evaluate(ColourModel(tok), tok, _cfg(), tasks=["classify"], progress=False, samples=samples)
    assert "classify" not in res and res["num_images"] == 2 and "skipping the task" in caplog.text


def test_image_tasks_need_a_tokenizer(tok):
    with pytest.raises(ValueError, match="without a tokenizer"):
        evaluate(ColourModel(tok), None, _cfg(), tasks=["retrieval"], progress=False, samples=_four())


def test_caption_samples_spread_to_the_last_image_and_top_p_seeds_per_batch(tok, one_thread, monkeypatch):
    monkeypatch.setattr(captioning, "java_available", lambda: False)       # simple tokenizer, no METEOR
    names = list(COLOURS)
    samples = [_sample(f"k{i:02d}", names[i % 3], [names[i % 3]]) for i in range(12)]
    cfg = _cfg("eval.decode=top_p", "train.seed=5")
    model = ColourModel(tok, decoder=True)
    res = evaluate(model, tok, cfg, tasks=["caption"], progress=False, samples=samples)
    # 12 images: round(i * 11 / 19), i < 20, hits every index 0..11
    assert [s["key"] for s in res["samples"]] == [s.key for s in samples]
    assert [s["generated"] for s in res["samples"]] == [names[i % 3] for i in range(12)]
    assert res["caption"]["num"] == 12 and res["caption"]["bleu1"] == pytest.approx(100.0)
    # 4 batches of 3: seed * 1_000_003 + batch index
    assert model.seeds == [5 * 1_000_003 + b for b in range(4)]
    # a model without a decoder skips the task
    res = evaluate(ColourModel(tok), tok, cfg, tasks=["caption"], progress=False, samples=samples)
    assert "caption" not in res and "samples" not in res


def test_format_results_notes_and_missing_values():
    text = format_results({"caption": {"bleu1": 12.345, "spice": None, "num": 3, "notes": ["n1"]}})
    assert text.splitlines() == ["caption", f"  {'bleu1':<16} {12.345:8.2f}", f"  {'spice':<16} {'n/a':>8}",
                                 f"  {'num':<16} {3:8d}", "  note: n1"]


# ---------------------------------------------------------------- shard

def test_shard_bounds_split_whole_batches_over_ranks():
    # 10 items, batches of 3 -> 4 batches over 3 ranks: 2, 1, 1 batches; the last batch is short
    assert [shard_bounds(10, 3, r, 3) for r in range(3)] == [(0, 6), (6, 9), (9, 10)]
    # 9 items, batches of 2 -> 5 batches over 2 ranks: 3, 2
    assert [shard_bounds(9, 2, r, 2) for r in range(2)] == [(0, 6), (6, 9)]
    # fewer batches than ranks: the last ranks are idle
    assert [shard_bounds(3, 2, r, 3) for r in range(3)] == [(0, 2), (2, 3), (3, 3)]
    assert shard_bounds(7, 3, 0, 1) == (0, 7)


def test_errors_propagate_without_a_process_group():
    with pytest.raises(ValueError, match="score_pairs must return"):
        score_topk(torch.zeros(2, 2, dtype=torch.long), lambda q, c: torch.zeros(1), batch_size=4)
    assert not Sharding.current(False).enabled and not Sharding.current().enabled


# ---------------------------------------------------------------- tgir

def test_tgir_ranks_ties_exclusion_and_chunks():
    g = torch.eye(4)
    q = torch.tensor([[1.0, 1.0, 0.0, 0.0],      # target 1 ties with gallery 0 (excluded) -> rank 0
                      [1.0, 1.0, 1.0, 0.0],      # target 2 ties with 0 and 1 -> rank 2
                      [0.0, 0.5, 0.0, 1.0]])     # target 1 (0.5) behind 3 (1.0) -> rank 1
    tgt, ref = torch.tensor([1, 2, 1]), torch.tensor([0, 3, 0])
    for chunk in (1, 2, 1024):
        assert tgir_ranks(q, g, tgt, ref, chunk=chunk).tolist() == [0, 2, 1]
    assert tgir_ranks(q, g, tgt, chunk=2).tolist() == [1, 2, 1]
    m = tgir_metrics(q, g, tgt, ref, ks=(1, 2))
    assert m == {"r1": pytest.approx(100 / 3), "r2": pytest.approx(200 / 3), "mean_recall": pytest.approx(50.0)}
    with pytest.raises(ValueError, match="outside"):
        tgir_ranks(q, g, torch.tensor([1, 4, 1]))
    with pytest.raises(ValueError, match="also its excluded"):
        tgir_ranks(q, g, tgt, torch.tensor([1, 3, 0]))


# ---------------------------------------------------------------- rerank

def test_rerank_keeps_itc_rank_when_only_some_topk_are_correct():
    topk = torch.tensor([[0, 1], [2, 3]])
    scores = torch.tensor([[0.2, 0.9], [0.5, 0.5]])
    # query 0: candidate 1 correct (0.9), candidate 0 wrong -> 0; query 1: no correct -> ITC rank 6
    assert rerank_ranks(torch.tensor([1, 6]), topk, scores, torch.tensor([1, 9]),
                        torch.tensor([0, 1, 2, 3])).tolist() == [0, 6]


def test_rerank_scores_pairs_as_image_text_in_both_directions():
    img = torch.eye(2)
    txt = torch.tensor([[0.6, 0.8], [0.8, 0.6], [0.0, 1.0]])     # t0 -> img0, t1 -> img1, t2 -> img1
    t2i = torch.tensor([0, 1, 1])
    pairs = []

    def score(i, t):
        pairs.extend(zip(i.tolist(), t.tolist()))
        return (t2i[t] == i).float()

    m = itm_rerank_metrics(img, txt, t2i, 1, score, ks=(1,), batch_size=2)
    # t2i top-1: t0 -> img1 (wrong: keeps ITC rank 1), t1 -> img0 (wrong), t2 -> img1 (right)
    # i2t top-1: img0 -> t1 (0.8, wrong), img1 -> t2 (right)
    assert sorted(pairs) == sorted([(1, 0), (0, 1), (1, 2), (0, 1), (1, 2)])
    assert m["t2i_r1"] == pytest.approx(100 / 3) and m["i2t_r1"] == 50.0 and m["k_test"] == 1


# ---------------------------------------------------------------- classification / vqa / captions

def test_classification_validates_shapes_and_labels():
    with pytest.raises(ValueError, match="expected"):
        build_class_embeddings(lambda t: torch.ones(len(t) + 1, 2), ["a"], ["{}"])
    emb = torch.eye(2)
    with pytest.raises(ValueError, match="labels must lie"):
        zero_shot_classify(emb, emb, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="labels must lie"):
        zero_shot_classify(emb, emb, torch.tensor([-1, 0]))
    assert zero_shot_classify(emb, emb, torch.tensor([1, 1]), ks=(1, 2)) == {"top1": 50.0, "top2": 100.0}


@pytest.mark.parametrize("text,norm", [
    ("the the red", "red"), ("at the top right", "top-right"), ("bottom_left", "bottom-left"),
    ("-red-", "red"), ("two-tone", "two-tone"), ("top", "top"), ("left top", "left"),
])
def test_normalize_answer_more(text, norm):
    assert normalize_answer(text) == norm


def test_caption_results_count_keys_and_align_predictions(monkeypatch):
    monkeypatch.setattr(captioning, "java_available", lambda: False)
    refs = {"a": ["a red box", "one red box"], "b": ["a blue\nball"]}
    out = captioning.score_captions(refs, {"a": "a red box", "b": "a blue  ball"})
    assert out["num"] == 2 and out["bleu3"] == pytest.approx(100.0) and out["tokenizer"] == "simple"
    assert out["meteor"] is None and out["rouge_l"] == pytest.approx(100.0)
    from pycocoevalcap.cider.cider import Cider
    gts = {"a": ["a red box", "one red box"], "b": ["a blue ball"]}
    cider, _ = Cider().compute_score(gts, {"a": ["a red box"], "b": ["a blue ball"]})
    assert cider > 0 and out["cider"] == pytest.approx(100.0 * cider)           # x 100, like every score
    with pytest.raises(ValueError, match="non-empty list"):
        captioning.score_captions({"a": "a red box"}, {"a": "x"}, meteor=False)
    with pytest.raises(ValueError, match="single string"):
        captioning.score_captions({"a": ["x"]}, {"a": ["x"]}, meteor=False)
    with pytest.raises(RuntimeError, match="needs `java`"):
        captioning.score_captions({"a": ["x"]}, {"a": "x"}, tokenizer="ptb")


class _SaysRed(torch.nn.Module):
    """``answer`` interface: always "Red" (one answer short with ``short``); records templates and modes."""

    def __init__(self, short: bool = False):
        super().__init__()
        self.short, self.templates, self.modes = short, [], []

    def answer(self, images, questions, template, max_new_tokens, beam_size):
        self.templates.append(template)
        self.modes.append(self.training)
        return ["Red"] * (len(questions) - int(self.short))


def test_vqa_template_train_mode_max_images_and_answer_count():
    from finealign.data.sources.shapes_vqa import build_vqa
    from finealign.eval.vqa import evaluate_vqa
    cfg = load_config("clip", ["data.source=shapes", "data.num_samples=4", "data.eval_batch_size=5",
                               'eval.vqa_template="Q: {} A:"', "eval.max_images=2"])
    model = _SaysRed().train()
    res = evaluate_vqa(model, cfg, "test", max_images=2, progress=False)
    assert model.training and model.modes and not any(model.modes)
    assert res["template"] == "Q: {} A:" and set(model.templates) == {"Q: {} A:"}
    items = build_vqa(cfg.data, "test", max_images=2)
    assert res["num_images"] == 2 and res["n"] == len(items)
    assert res["accuracy"] == pytest.approx(100.0 * sum(it.answer == "red" for it in items) / len(items))
    # through the runner: eval.max_images caps the VQA images too
    assert evaluate(_SaysRed(), None, cfg, split="test", tasks=["vqa"], progress=False)["vqa"]["num_images"] == 2
    with pytest.raises(ValueError, match="answers for"):
        evaluate_vqa(_SaysRed(short=True), cfg, "test", progress=False)


def test_runner_tgir_uses_the_asked_split(tok, one_thread):
    from finealign.eval.runner import embed_texts
    from finealign.eval.tgir import evaluate_tgir
    cfg = load_config("clip", ["data.source=shapes", "data.num_samples=8", "data.eval_batch_size=4",
                               "model.context_length=8"])
    model = ColourModel(tok)

    def direct(split):
        return evaluate_tgir(model, cfg, split, embed_text=lambda t: embed_texts(model, tok, t, 8, "cpu"))

    train, test = direct("train"), direct("test")
    assert train["r10"] != test["r10"]             # the splits' scenes differ (else this pins nothing)
    res = evaluate(model, tok, cfg, split="train", tasks=["tgir"], progress=False)["tgir"]
    assert res == train and res["num_queries"] == 8 and res["num_gallery"] == 16


def test_tgir_leaves_out_queries_whose_images_fail_to_load(tok, monkeypatch):
    from finealign.data.sources import tgir as tgir_source
    from finealign.data.sources.tgir import TGIRQuery, TGIRSet
    from finealign.eval.tgir import evaluate_tgir

    def broken():
        raise OSError("unreadable")
    gallery = [_sample("g0", "red", ["x"], i=0), _sample("g1", "green", ["x"], i=1),
               Sample(key="g2", load_image=broken, captions=["x"], image_id=2), _sample("g3", "blue", ["x"], i=3)]
    queries = [TGIRQuery(0, "green", 1), TGIRQuery(2, "blue", 3), TGIRQuery(1, "red", 2), TGIRQuery(3, "red", 0)]
    monkeypatch.setattr(tgir_source, "build_tgir", lambda data, split, max_queries=0: TGIRSet(gallery, queries))
    cfg = load_config("clip", ["data.eval_batch_size=2"])
    model = ColourModel(tok)
    out = evaluate_tgir(model, cfg, "test", lambda t: model.encode_text(*tok.encode_batch(t, 8))["embed"])
    # kept: 0 -> 1 (red + green: green 0.71 > blue 0) and 3 -> 0 (blue + red: red 0.71 > green 0)
    assert out["num_queries"] == 2 and out["num_gallery"] == 3 and out["r10"] == 100.0
    assert out["notes"][-1].startswith("2 queries left out")


def test_itm_scorer_feeds_cls_then_patches_and_the_real_token_mask():
    from finealign.eval.rerank import ITMScorer

    class Fuser(torch.nn.Module):
        """fuse: [CLS] = sum of real tokens + image cls + 10 * sum of patches; itm logits (0, sum)."""

        def fuse(self, tokens, mask, cls, patches, image_index):
            return {"cls": (tokens * mask[..., None]).sum(1) + cls[image_index] + 10 * patches[image_index].sum(1)}

        def itm_head(self, x):
            return torch.stack([torch.zeros(len(x)), x.sum(-1)], dim=1)

    g = torch.Generator().manual_seed(0)
    cls, patches = torch.randn(2, 2, generator=g), torch.randn(2, 3, 2, generator=g)
    tokens, mask = torch.randn(3, 4, 2, generator=g), torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    scorer = ITMScorer(Fuser())
    scorer.add_images({"cls": cls, "patches": patches})
    scorer.set_texts(tokens, mask)
    i, t = torch.tensor([1, 0, 1]), torch.tensor([0, 2, 1])
    want = (tokens[t] * mask[t, :, None]).sum((1, 2)) + cls[i].sum(1) + 10 * patches[i].sum((1, 2))
    torch.testing.assert_close(scorer(i, t), want)
    from finealign.eval.rerank import can_rerank
    assert can_rerank(Fuser()) and not can_rerank(torch.nn.Linear(1, 1))
    head_only = torch.nn.Module()
    head_only.itm_head = torch.nn.Linear(2, 2)
    assert not can_rerank(head_only)                                # a head without a fusion encoder
