"""Retrieval, captioning and zero-shot classification metrics against hand-computed values."""
import os
import subprocess

import pytest
import torch
import torch.nn.functional as F

from finealign.eval.captioning import SPICE_NOTE, java_available, score_captions
from finealign.eval.classification import build_class_embeddings, zero_shot_classify
from finealign.eval.retrieval import retrieval_metrics, retrieval_ranks, topk_images

# ---------------------------------------------------------------- retrieval

# similarity[i, t] for 3 images x 6 captions, captions (0,1)->img0, (2,3)->img1, (4,5)->img2
SIM = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.3, 0.0],
                    [0.7, 0.6, 0.4, 0.5, 0.8, 0.2],
                    [0.3, 0.2, 0.6, 0.1, 0.5, 0.4]], dtype=torch.float64)
T2I = torch.tensor([0, 0, 1, 1, 2, 2])


def _hand_embeddings():
    # image_embed = identity, text_embed = SIM.T  =>  image @ text.T == SIM exactly
    return torch.eye(3, dtype=torch.float64), SIM.T.contiguous()


def test_retrieval_hand_example():
    img, txt = _hand_embeddings()
    i2t, t2i = retrieval_ranks(img, txt, T2I)
    # img0: best own caption 0.9, nothing above -> 0; img1: best own 0.5 < 0.7, 0.6, 0.8 -> 3;
    # img2: best own 0.5 < 0.6 -> 1
    assert i2t.tolist() == [0, 3, 1]
    # caption columns: c0 0.9 top; c1 0.1 < 0.6, 0.2; c2 0.4 < 0.8, 0.6; c3 top; c4 0.5 < 0.8; c5 top
    assert t2i.tolist() == [0, 2, 2, 0, 1, 0]
    m = retrieval_metrics(img, txt, T2I, ks=(1, 2, 5))
    assert m["i2t_r1"] == pytest.approx(100 / 3)
    assert m["i2t_r2"] == pytest.approx(200 / 3)
    assert m["i2t_r5"] == pytest.approx(100.0)
    assert m["t2i_r1"] == pytest.approx(50.0)
    assert m["t2i_r2"] == pytest.approx(400 / 6)
    assert m["t2i_r5"] == pytest.approx(100.0)
    assert m["mean_recall"] == pytest.approx((100 / 3 + 200 / 3 + 100 + 50 + 400 / 6 + 100) / 6)
    default = retrieval_metrics(img, txt, T2I)
    assert set(default) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall"}


def test_retrieval_ties_are_pessimistic():
    img, txt = torch.ones(3, 4), torch.ones(6, 4)            # every score ties
    i2t, t2i = retrieval_ranks(img, txt, T2I)
    assert i2t.tolist() == [4] * 3                          # all 4 wrong captions tie -> ranked ahead
    assert t2i.tolist() == [2] * 6
    assert retrieval_metrics(img, txt, T2I)["i2t_r1"] == 0.0


def _brute_force(img, txt, t2i_map):
    sim = img @ txt.T
    i2t = []
    for i in range(sim.shape[0]):
        own = sim[i][t2i_map == i].max()
        i2t.append(int(((sim[i] >= own) & (t2i_map != i)).sum()))
    t2i = []
    for t in range(sim.shape[1]):
        own = sim[t2i_map[t], t]
        t2i.append(int(((sim[:, t] >= own) & (torch.arange(sim.shape[0]) != t2i_map[t])).sum()))
    return i2t, t2i


def test_retrieval_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(7, 16, generator=g), dim=-1)
    txt = F.normalize(torch.randn(20, 16, generator=g), dim=-1)
    t2i_map = torch.cat([torch.arange(7), torch.randint(0, 7, (13,), generator=g)])
    small = retrieval_metrics(img, txt, t2i_map, chunk=3)
    big = retrieval_metrics(img, txt, t2i_map, chunk=1024)
    assert small == big
    i2t, t2i = retrieval_ranks(img, txt, t2i_map, chunk=3)
    assert (i2t.tolist(), t2i.tolist()) == _brute_force(img, txt, t2i_map)
    assert torch.equal(topk_images(img, txt, 3, chunk=3), (txt @ img.T).topk(3, dim=1).indices)


def test_retrieval_input_errors():
    img, txt = _hand_embeddings()
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(img, txt, torch.tensor([0, 0, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(img, txt, torch.tensor([0, 0, 1, 1, 2, 3]))
    with pytest.raises(ValueError, match="shape"):
        retrieval_metrics(img, txt, T2I[:5])


# ---------------------------------------------------------------- captioning

REFS = {
    "a": ["a man riding a red bike down the street", "a person rides a bicycle on a road"],
    "b": ["two dogs playing with a ball in the park", "dogs chase a ball on the green grass"],
    "c": ["a plate of pasta with tomato sauce", "a bowl of spaghetti covered in red sauce"],
    "d": ["a small boat sailing on a calm lake", "a sailboat on the water at sunset"],
}
GOOD = {k: v[0] for k, v in REFS.items()}
WRONG = {"a": "a bowl of soup on a table", "b": "an airplane flying over the clouds",
         "c": "a cat sleeping on the sofa", "d": "a man riding a red bike"}


def test_bleu_hand_value():
    # tokens: p = the cat sat on the mat, r = the cat sat on a mat (both 6 words -> brevity penalty 1)
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3 -> BLEU-4 = (5/6 * 3/5 * 1/2 * 1/3) ** 0.25
    s = score_captions({0: ["The cat sat on a mat."]}, {0: "the cat sat on the mat"}, meteor=False,
                       tokenizer="simple")
    assert s["bleu1"] == pytest.approx(100 * 5 / 6, abs=1e-4)
    assert s["bleu4"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 2 * 1 / 3) ** 0.25, abs=1e-4)
    assert s["cider"] == 0.0                                 # single image: every IDF is log(1/1) = 0


def test_every_reference_counts():
    """A caption equal to the second of two references is a perfect match (BLEU 100, ROUGE-L 100)."""
    s = score_captions({0: ["a dog on the grass", "the cat sat on the mat"]}, {0: "the cat sat on the mat"},
                       meteor=False, tokenizer="simple")
    assert s["bleu4"] == pytest.approx(100.0, abs=1e-4) and s["rouge_l"] == pytest.approx(100.0, abs=1e-4)


def test_rouge_l_hand_value_is_asymmetric_in_candidate_and_references():
    """ROUGE-L: LCS precision over the candidate and recall over the best reference, F with β = 1.2.
    candidate "a red heart" vs reference "a big red heart on white": LCS 3, P = 3/3, R = 3/6; swapping
    candidate and reference gives P = 1/2, R = 1, a different score, so a swap in the wrapper shows."""
    def f(p, r, beta=1.2):
        return (1 + beta ** 2) * p * r / (r + beta ** 2 * p)
    s = score_captions({0: ["a big red heart on white"]}, {0: "a red heart"}, meteor=False, tokenizer="simple")
    assert s["rouge_l"] == pytest.approx(100 * f(1.0, 0.5), abs=1e-4)
    swapped = score_captions({0: ["a red heart"]}, {0: "a big red heart on white"}, meteor=False, tokenizer="simple")
    assert swapped["rouge_l"] == pytest.approx(100 * f(0.5, 1.0), abs=1e-4)
    assert abs(s["rouge_l"] - swapped["rouge_l"]) > 1.0


def test_caption_scores_order_and_meteor():
    good = score_captions(REFS, GOOD, meteor=java_available())
    wrong = score_captions(REFS, WRONG, meteor=False)
    assert good["bleu4"] > 0 and good["cider"] > 0
    assert good["bleu4"] > wrong["bleu4"] and good["cider"] > wrong["cider"]
    assert good["rouge_l"] > wrong["rouge_l"]
    assert good["spice"] is None and SPICE_NOTE in good["notes"]
    assert good["num"] == 4
    if java_available():
        assert good["tokenizer"] == "ptb"
        # every prediction is one of its references word for word: METEOR 1.0, reported in percent
        assert good["meteor"] == pytest.approx(100.0), good["notes"]
        # the METEOR Java process was closed and reaped: no java child (or zombie) left behind
        ps = subprocess.run(["ps", "-o", "pid=,stat=,comm=", "--ppid", str(os.getpid())],
                            capture_output=True, text=True).stdout
        assert "java" not in ps, ps


def test_caption_without_java(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))               # no java anywhere
    s = score_captions(REFS, GOOD)
    assert s["tokenizer"] == "simple" and s["meteor"] is None
    assert any("METEOR skipped" in n and "java" in n for n in s["notes"])
    assert s["bleu4"] > 0 and s["cider"] > 0 and s["rouge_l"] > 0


def test_caption_key_mismatch():
    with pytest.raises(ValueError, match="same keys.*'d'"):
        score_captions(REFS, {k: v for k, v in GOOD.items() if k != "d"}, meteor=False)
    with pytest.raises(ValueError, match="non-empty list"):
        score_captions({0: "just a string"}, {0: "x"}, meteor=False)


# ---------------------------------------------------------------- classification

def test_zero_shot_hand_example():
    class_embed = torch.eye(6)                               # logits == image rows
    image_embed = torch.tensor([[0.9, 0.1, 0.0, 0.0, 0.0, 0.0],   # label 0: rank 0
                                [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],   # label 5: rank 5 (miss top-5)
                                [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],   # label 1: rank 4 (top-5 hit)
                                [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]])  # label 3: ties with 4 zeros + 1.0 -> 5
    labels = torch.tensor([0, 5, 1, 3])
    assert zero_shot_classify(image_embed, class_embed, labels) == {"top1": 25.0, "top5": 50.0}


def test_template_ensemble_math():
    table = {"cat": [3.0, 4.0, 0.0], "a photo of cat": [0.0, 0.0, 2.0],
             "dog": [0.0, 1.0, 0.0], "a photo of dog": [0.0, 0.0, -5.0]}
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return torch.tensor([table[t] for t in texts])

    emb = build_class_embeddings(encode, ["cat", "dog"], ["{}", "a photo of {}"])
    # cat: mean([.6, .8, 0], [0, 0, 1]) = [.3, .4, .5] -> / sqrt(.5);  dog: mean([0,1,0],[0,0,-1]) -> / sqrt(.5)
    expected = torch.tensor([[0.3, 0.4, 0.5], [0.0, 0.5, -0.5]]) / 0.5 ** 0.5
    assert torch.allclose(emb, expected, atol=1e-6)
    assert calls == [["cat", "a photo of cat", "dog", "a photo of dog"]]
    assert torch.allclose(build_class_embeddings(encode, ["cat", "dog"], ["{}", "a photo of {}"], batch_size=1),
                          emb)
    with pytest.raises(ValueError, match="slot"):
        build_class_embeddings(encode, ["cat"], ["no slot"])
