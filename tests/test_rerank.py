"""ITM re-ranking of the ITC top-k (eval.k_test): hand-computed toy ranks, k=0 == ITC, and a real tiny
FusionModel through ``evaluate`` checked against a brute-force full ITM score matrix."""
import pytest
import torch

from finealign.config import load_config
from finealign.data.sources.shapes import make_scene
from finealign.data.tokenizer import Tokenizer
from finealign.eval.rerank import can_rerank, itm_rerank_metrics, rerank_ranks
from finealign.eval.retrieval import retrieval_metrics
from finealign.eval.runner import evaluate, format_results
from finealign.models.factory import build_model

# similarity[i, t] for 3 images x 6 captions, captions (0,1)->img0, (2,3)->img1, (4,5)->img2
SIM = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.3, 0.0],
                    [0.7, 0.6, 0.4, 0.5, 0.8, 0.2],
                    [0.3, 0.2, 0.6, 0.1, 0.5, 0.4]], dtype=torch.float64)
T2I = torch.tensor([0, 0, 1, 1, 2, 2])
IMG, TXT = torch.eye(3, dtype=torch.float64), SIM.T.contiguous()       # IMG @ TXT.T == SIM


class OracleITM:
    """Perfect ITM: 1 for a matching (image, text) pair, 0 otherwise; records every pair it scores."""

    def __init__(self, constant: bool = False):
        self.constant, self.pairs, self.calls = constant, [], []

    def __call__(self, image_idx, text_idx):
        self.calls.append(len(image_idx))
        self.pairs += list(zip(image_idx.tolist(), text_idx.tolist()))
        if self.constant:
            return torch.zeros(len(image_idx))
        return (T2I[text_idx] == image_idx).float()


def test_rerank_fixes_wrong_itc_order_within_top_k():
    itc = retrieval_metrics(IMG, TXT, T2I)
    # ITC ranks (see test_eval_metrics): i2t [0, 3, 1], t2i [0, 2, 2, 0, 1, 0]
    assert itc["i2t_r1"] == pytest.approx(100 / 3) and itc["t2i_r1"] == pytest.approx(50.0)
    oracle = OracleITM()
    m = itm_rerank_metrics(IMG, TXT, T2I, k=2, score_pairs=oracle, batch_size=4)
    # t2i top-2 images: c0 {0,1} c1 {1,2} c2 {0,2} c3 {1,0} c4 {1,2} c5 {2,1}: the correct image is in the
    # top-2 for c0, c3, c4, c5 -> rank 0; c1, c2 keep ITC rank 2 -> ranks [0, 2, 2, 0, 0, 0]
    assert m["t2i_r1"] == pytest.approx(400 / 6) and m["t2i_r5"] == 100.0
    # i2t top-2 texts: img0 {t0, t2} -> 0; img1 {t4, t0} none correct -> ITC rank 3; img2 {t2, t4} -> 0
    assert m["i2t_r1"] == pytest.approx(200 / 3) and m["i2t_r5"] == 100.0
    # the ITC-only numbers stay visible, unchanged
    assert {k: m[f"itc_{k}"] for k in itc} == itc and m["k_test"] == 2
    # only top-2 pairs were scored (as (image, text)), in chunks of <= 4 pairs
    assert len(oracle.pairs) == 6 * 2 + 3 * 2 and max(oracle.calls) <= 4
    assert (1, 1) in oracle.pairs and (0, 1) not in oracle.pairs       # c1's top-2 are images 1 and 2
    # k covering every candidate: a perfect ITM head gives perfect recall in both directions
    full = itm_rerank_metrics(IMG, TXT, T2I, k=6, score_pairs=OracleITM())
    assert full["i2t_r1"] == full["t2i_r1"] == full["mean_recall"] == 100.0


def test_rerank_ranks_by_hand():
    """Within the top-k, the rank is the number of wrong candidates scoring >= the best correct one; a query
    whose top-k holds no correct candidate keeps its ITC rank (beyond k)."""
    topk = torch.tensor([[4, 7, 2], [1, 3, 5]])
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.3, 0.2, 0.1]])
    cand_label = torch.arange(8)
    query_label = torch.tensor([2, 6])                     # query 0: candidate 2 (3rd by ITC); query 1: none
    ranks = rerank_ranks(torch.tensor([2, 11]), topk, scores, query_label, cand_label)
    assert ranks.tolist() == [1, 11]                       # only candidate 4 (0.9) outscores it


def test_itm_scorer_scores_are_the_match_log_odds():
    """ITMScorer's score of (image i, text t) is the ITM head's logit for "match" minus "no match" on the
    fusion of that pair: a head that says "match" more strongly scores higher."""
    from finealign.config import load_config
    from finealign.eval.rerank import ITMScorer
    from finealign.models.factory import build_model
    cfg = load_config("albef", ["model.preset=tiny", "model.momentum=0", "objectives.itc.distill_alpha=0"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 64).eval()
    S = cfg.model.image_size
    images = torch.randn(3, 3, S, S)
    text = torch.randint(5, 64, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    scorer = ITMScorer(model)
    with torch.no_grad():
        img = model.encode_image(images)
        txt = model.encode_text(text, mask)
        scorer.add_images(img)
        scorer.set_texts(txt["tokens"], mask)
        image_idx, text_idx = torch.tensor([0, 2, 1, 2]), torch.tensor([1, 0, 0, 1])
        got = scorer(image_idx, text_idx)
        fused = model.fuse(txt["tokens"][text_idx], mask[text_idx], img["cls"][image_idx],
                           img["patches"][image_idx])["cls"]
        logits = model.itm_head(fused)
    torch.testing.assert_close(got, logits[:, 1] - logits[:, 0], rtol=1e-4, atol=1e-5)
    assert got.std() > 0


def test_rerank_ties_are_pessimistic_and_k0_is_exactly_itc():
    m = itm_rerank_metrics(IMG, TXT, T2I, k=2, score_pairs=OracleITM(constant=True))
    # all ITM scores tie: a correct top-2 candidate ranks behind the wrong one -> rank 1;
    # t2i ranks [1, 2, 2, 1, 1, 1], i2t [1, 3, 1]
    assert m["t2i_r1"] == 0.0 and m["t2i_r5"] == 100.0
    assert m["i2t_r1"] == 0.0 and m["i2t_r5"] == 100.0
    assert itm_rerank_metrics(IMG, TXT, T2I, k=0, score_pairs=None) == retrieval_metrics(IMG, TXT, T2I)
    with pytest.raises(ValueError, match="k must be >= 0"):
        itm_rerank_metrics(IMG, TXT, T2I, k=-1, score_pairs=None)


@pytest.fixture(scope="module")
def shapes_setup():
    caps = [make_scene(0, "test", i).caption for i in range(50)]
    tok = Tokenizer.train(caps, vocab_size=300)
    return tok


def _full_itm_metrics(model, tok, cfg, n):
    """Brute force: every (image, text) pair of the eval split through the fusion encoder + ITM head."""
    from finealign.data.loader import build_source
    from finealign.data.skips import SkipLog
    from finealign.data.transforms import ImageTransform
    samples = list(build_source(cfg.data, "test", SkipLog()))[:n]
    tf = ImageTransform(cfg.model.image_size, train=False)
    with torch.no_grad():
        enc = model.encode_image(torch.stack([tf(s.load_image()) for s in samples]))
        ids, mask = tok.encode_batch([s.captions[0] for s in samples], cfg.model.context_length)
        tokens = model.encode_text(ids, mask)["tokens"]
        M = torch.empty(n, n)
        for i in range(n):
            fused = model.fuse(tokens, mask, enc["cls"][i:i + 1].expand(n, -1),
                               enc["patches"][i:i + 1].expand(n, -1, -1))["cls"]
            logits = model.itm_head(fused)
            M[i] = logits[:, 1] - logits[:, 0]
    return retrieval_metrics(torch.eye(n), M.T.contiguous(), torch.arange(n))   # eye @ M == M


def test_fusion_model_reranks_end_to_end(shapes_setup):
    tok, n = shapes_setup, 8
    base = ["data.source=shapes", f"data.num_samples={n}", "data.eval_batch_size=3", "model.momentum=0",
            "objectives.itc.distill_alpha=0"]
    cfg = load_config("albef", overrides=base + [f"eval.k_test={n}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, tok.vocab_size)
    assert can_rerank(model)
    res = evaluate(model, tok, cfg, split="test", tasks=["retrieval"], progress=False)["retrieval"]
    assert res["k_test"] == n and res["num_texts"] == n
    # k_test = all images: the re-ranked ranks are the ITM-only ranks of the full score matrix
    full = _full_itm_metrics(model, tok, cfg, n)
    for key, v in full.items():
        assert res[key] == pytest.approx(v), key
    # k_test = 0: exactly the ITC numbers, no itc_ duplicates
    cfg0 = load_config("albef", overrides=base + ["eval.k_test=0"])
    res0 = evaluate(model, tok, cfg0, split="test", tasks=["retrieval"], progress=False)["retrieval"]
    assert not any(k.startswith("itc_") for k in res0) and "k_test" not in res0
    assert {k: res[f"itc_{k}"] for k in full} == {k: res0[k] for k in full}
    text = format_results({"retrieval": res})
    assert "itc_mean_recall" in text and "k_test" in text


def test_dual_encoder_is_not_reranked(shapes_setup):
    tok = shapes_setup
    cfg = load_config("clip", overrides=["data.source=shapes", "data.num_samples=6", "eval.k_test=4"])
    torch.manual_seed(0)
    model = build_model(cfg.model, tok.vocab_size)
    assert not can_rerank(model)
    res = evaluate(model, tok, cfg, split="test", tasks=["retrieval"], progress=False)["retrieval"]
    assert "k_test" not in res and not any(k.startswith("itc_") for k in res)


def test_item_level_retrieval_counts_every_view_of_the_item():
    """Two items x two views, one shared caption per item (fashion data): image-level retrieval calls the
    other view wrong (and, with the tied identical captions, ranks every view's own caption behind the
    other one), item-level retrieval accepts any view of the item."""
    from finealign.eval.retrieval import retrieval_metrics
    img = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0]]), dim=-1)
    txt = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), dim=-1)
    t2i = torch.tensor([0, 1, 2, 3])
    by_image = retrieval_metrics(img, txt, t2i, ks=(1,))
    assert by_image["i2t_r1"] == 0.0 and by_image["t2i_r1"] == 0.0          # ties count against
    by_item = retrieval_metrics(img, txt, t2i, ks=(1,), image_groups=torch.tensor([7, 7, 9, 9]))
    assert by_item["i2t_r1"] == 100.0 and by_item["t2i_r1"] == 100.0
    # ITM re-ranking uses the same labels: a scorer that prefers the right item keeps R@1 at 100
    score = lambda i, t: (img[i] * txt[t]).sum(-1)
    re = itm_rerank_metrics(img, txt, t2i, 2, score, ks=(1,), image_groups=torch.tensor([7, 7, 9, 9]))
    assert re["i2t_r1"] == 100.0 and re["t2i_r1"] == 100.0
