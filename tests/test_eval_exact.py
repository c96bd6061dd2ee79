"""Exact-value checks for evaluation and zero-shot captioning code paths the other tests leave loose
(found by a mutation audit): every expected number here is worked out by hand on tiny inputs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from finealign.eval.captioning import java_available, score_captions
from finealign.eval.retrieval import retrieval_ranks
from finealign.eval.tgir import compose_queries

# ---------------------------------------------------------------- retrieval


def test_half_precision_embeddings_are_scored_in_float32():
    """Image 0 scores its own caption 1 + 2**-12 and two wrong captions exactly 1. A product rounded to
    float16 / bfloat16 makes all three 1.0 and ties them (pessimistic rank 2); scored in float32, as the
    module documents, the own caption is strictly first."""
    img = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 2.0 ** -12], [1.0, 0.0], [0.0, 1.0]])
    t2i = torch.tensor([0, 1, 1])
    assert [r.tolist() for r in retrieval_ranks(img, txt, t2i)] == [[0, 0], [0, 1, 1]]
    assert [r.tolist() for r in retrieval_ranks(img.bfloat16(), txt.bfloat16(), t2i)] == [[0, 0], [0, 1, 1]]
    assert [r.tolist() for r in retrieval_ranks(img.half(), txt.half(), t2i)] == [[0, 0], [0, 1, 1]]


# ---------------------------------------------------------------- TGIR


def test_compose_queries_adds_unnormalised_embeddings():
    """q = normalize(ref + text): the longer input dominates (no per-input normalisation)."""
    q = compose_queries(torch.tensor([[4.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    assert torch.allclose(q, torch.tensor([[4.0, 1.0]]) / 17 ** 0.5, atol=1e-6)


# ---------------------------------------------------------------- MacCap

TINY_MACCAP = ["data.num_samples=64", "data.batch_size=8", "maccap.adaptor_width=32", "maccap.adaptor_heads=2",
               "maccap.queries=4", "maccap.copies=3", "lm.width=32", "lm.layers=1", "lm.heads=2",
               "model.image_pool=cls", "model.decoder_layers=0"]


@pytest.fixture(scope="module")
def maccap():
    """A tiny MacCap over an untrained CLIP backbone and its own small LM (built in about a second)."""
    from finealign.config import load_config
    from finealign.data.tokenizer import Tokenizer
    from finealign.models.factory import build_model
    cfg = load_config("maccap", TINY_MACCAP)
    tok = Tokenizer.train(["a small red circle", "a large blue square on the left", "a green triangle"] * 20,
                          vocab_size=300)
    torch.manual_seed(0)
    return build_model(cfg.model, tok.vocab_size, full=cfg, tokenizer=tok).eval()


def test_text_only_training_logits_see_the_whole_prefix(maccap):
    """encode(): the LM reads [adaptor prefix (Q positions) | caption ids]; every prefix position is a
    real key for the caption tokens, and extras["prefix_len"] is Q, which the prefix-LM loss uses to put
    the target of caption token t at position Q + t - 1."""
    from finealign.types import Batch
    m = maccap
    Q = m.mc.queries
    captions = ["a small red circle", "a green triangle"]
    text, text_mask = m.tokenizer.encode_batch(captions, m.cfg.context_length)
    batch = Batch(images=torch.zeros(2, 3, 8, 8), text=text, text_mask=text_mask, image_ids=torch.arange(2),
                  item_ids=torch.arange(2), captions=captions, keys=["a", "b"])
    torch.manual_seed(5)
    with torch.no_grad():
        feats = m.encode(batch)
        torch.manual_seed(5)                                     # the same noise draw as inside encode
        e = m.backbone.encode_text(text, text_mask)["embed"]
        prefix = m.adaptor(F.normalize(e[:, None] + 0.016 ** 0.5 * torch.randn(2, m.mc.copies, e.shape[1]), dim=-1))
        ids, mask, start = m.lm.tokenize(captions)
        full = torch.cat([torch.ones(2, Q, dtype=torch.bool), mask], 1)
        want = m.lm.logits(torch.cat([prefix, m.lm.embed(ids)], 1), full)
    assert m.noise_var == pytest.approx(0.016) and start == 1
    assert int(feats.extras["prefix_len"]) == Q and int(feats.extras["lm_start"]) == 1
    assert feats.caption_logits.shape == (2, Q + ids.shape[1], m.tokenizer.vocab_size)
    assert torch.equal(feats.extras["lm_ids"], ids)
    torch.testing.assert_close(feats.caption_logits, want, rtol=1e-4, atol=1e-5)


def test_answer_decodes_each_question_after_its_own_image_prefix(maccap, monkeypatch):
    """answer(): question i is decoded after the prefix of image i (one noisy memory per image, drawn from
    the default seed-0 generator), starting from the template's prompt tokens, with the given beams."""
    import finealign.zeroshot.maccap as mod
    m = maccap
    S = m.cfg.image_size
    images = torch.randn(3, 3, S, S, generator=torch.Generator().manual_seed(2))
    seen = []

    def fake_generate(lm, prefix, start, strategy, max_new_tokens, beam_size):
        seen.append((prefix.clone(), start.tolist(), max_new_tokens, beam_size))
        return [[]]
    monkeypatch.setattr(mod, "generate", fake_generate)
    questions = ["what colour?", "how many?", "where?"]
    assert m.answer(images, questions, template="Q: {} A:", max_new_tokens=3, beam_size=2) == ["", "", ""]
    with torch.no_grad():
        want = m.adaptor(m.image_memory(images, torch.Generator().manual_seed(0))[0])       # (3, Q, D)
    assert len(seen) == 3
    assert not torch.allclose(want[0], want[1], atol=1e-4)                  # the images do differ
    for i, (prefix, start, n, beams) in enumerate(seen):
        torch.testing.assert_close(prefix, want[i:i + 1])
        assert start == [m.lm.prompt_ids(f"Q: {questions[i]} A:")] and (n, beams) == (3, 2)


class _TableLM:
    """A fake LM for decoding: the next-token log-probabilities depend only on the last input token.
    Tokens: 0 = EOS, 1 = "a", 2 = "b", 3 = BOS; embeddings are one-hot, so a zero prefix row adds nothing.
    ``offset`` adds a constant per row (unnormalised logits). test_zeroshot_exact uses it too."""
    eos_id = 0

    def __init__(self, rows: dict[int, list[float]], offset: list[float] | None = None):
        table = torch.full((4, 4), 0.25)
        for tok, p in rows.items():
            table[tok] = torch.tensor(p)
        self.table = table.log() + (torch.tensor(offset)[:, None] if offset is not None else 0.0)

    def embed(self, ids):
        return F.one_hot(ids, 4).float()

    def logits(self, embeds, mask):
        return embeds @ self.table                                              # (B, L, 4)


BEAM_ROWS = {3: [math.exp(-1.0), math.exp(-0.5), 1 - math.exp(-1.0) - math.exp(-0.5) - 1e-6, 1e-6],
             1: [math.exp(-0.6), 0.4, 1 - math.exp(-0.6) - 0.4 - 1e-6, 1e-6]}


def test_beam_search_ranks_finished_captions_by_mean_log_probability():
    """From BOS: EOS has log-prob -1.0, "a" -0.5; after "a": EOS -0.6, "a" log 0.4. Finished hypotheses,
    EOS included in the length: [] -> -1.0 / 1; [a] -> -1.1 / 2 = -0.55; the open [a, a] -> -1.416 / 2.
    Length-normalised, [a] wins (by the raw sum [] would)."""
    from finealign.zeroshot.lm import generate
    lm = _TableLM(BEAM_ROWS)
    prefix, start = torch.zeros(1, 2, 4), torch.tensor([[3]])
    assert generate(lm, prefix, start, "beam", max_new_tokens=5, beam_size=2) == [[1]]
    assert generate(lm, prefix, start, "greedy", max_new_tokens=5) == [[1]]


def test_top_p_keeps_the_smallest_set_reaching_p_and_always_the_top_token():
    from finealign.models.generation import top_p_sample
    logp = torch.tensor([[0.6, 0.3, 0.1]]).log().expand(300, -1)
    g = torch.Generator().manual_seed(0)
    # p = 0.85: tokens 0 (0.6) and 1 (mass before it 0.6 < 0.85) are kept, token 2 (0.9 before it) is not
    assert set(top_p_sample(logp, 0.85, generator=g).tolist()) == {0, 1}
    # p = 0.5 is below the top token's 0.6: only the top token remains
    assert set(top_p_sample(logp, 0.5, generator=g).tolist()) == {0}


def test_top_p_stops_once_the_mass_before_a_token_reaches_p():
    """Four tokens of exactly 0.25: top-p 0.5 keeps two (0.5 is reached by them), 0.51 keeps three;
    top-p 0 still keeps the top token."""
    from finealign.models.generation import top_p_sample
    logits = torch.zeros(400, 4)
    g = torch.Generator().manual_seed(0)
    assert len(set(top_p_sample(logits, 0.5, generator=g).tolist())) == 2
    assert len(set(top_p_sample(logits, 0.51, generator=g).tolist())) == 3
    assert len(set(top_p_sample(logits, 0.0, generator=g).tolist())) == 1


@pytest.mark.parametrize("temperature,eos_kept", [(0.5, False), (2.0, True)])
def test_maccap_top_p_cuts_the_tempered_distribution(temperature, eos_kept):
    """From BOS: EOS 0.1, "a" 0.6, "b" 0.3. Top-p 0.9 applies to softmax(log p / T): at T = 0.5 that is
    (0.01, 0.36, 0.09) / 0.46 = (0.022, 0.783, 0.196), so EOS (0.978 of mass before it) is cut; at T = 2
    it is (0.316, 0.775, 0.548) / 1.639 = (0.193, 0.473, 0.334), so EOS (0.807 before it) stays. (Cutting
    the unnormalised exp(log p / T) kept EOS at T = 0.5 and dropped it at T = 2.)"""
    from finealign.zeroshot.lm import generate
    lm = _TableLM({3: [0.1, 0.6, 0.3 - 1e-6, 1e-6]})
    B = 400
    out = generate(lm, torch.zeros(B, 2, 4), torch.full((B, 1), 3), "top_p", max_new_tokens=1, top_p=0.9,
                   temperature=temperature, generator=torch.Generator().manual_seed(0))
    empty = sum(o == [] for o in out)                                  # the first token drawn was EOS
    assert all(o in ([], [1], [2]) for o in out)
    assert (empty > 40) if eos_kept else (empty == 0)                  # expected 77 of 400 when kept


def test_small_lm_is_causal():
    from types import SimpleNamespace
    from finealign.zeroshot.lm import SmallCausalLM
    tok = SimpleNamespace(vocab_size=11, eos_id=2, pad_id=0, bos_id=1)
    torch.manual_seed(0)
    lm = SmallCausalLM(tok, width=16, layers=1, heads=2, max_len=8).eval()
    x = torch.randn(1, 6, 16)
    y = x.clone()
    y[:, 4:] = torch.randn(1, 2, 16)                                                      # change positions 4, 5 only
    mask = torch.ones(1, 6, dtype=torch.bool)
    with torch.no_grad():
        a, b = lm.logits(x, mask), lm.logits(y, mask)
    torch.testing.assert_close(a[:, :4], b[:, :4])                           # earlier outputs unchanged
    assert not torch.allclose(a[:, 4:], b[:, 4:], atol=1e-3)


# ---------------------------------------------------------------- eval image pass


def test_image_pass_batch_index_counts_batches_and_skips_keep_their_slot():
    """image_pass hands step() the batch's index in the single-process run (per-batch seeds), not an item
    index; an image that fails to load is left out of ``kept`` without shifting later batches."""
    from PIL import Image
    from finealign.data.skips import SkipLog
    from finealign.data.transforms import ImageTransform
    from finealign.eval.shard import Sharding, image_pass
    from finealign.types import Sample

    def load(i):
        if i == 3:
            raise OSError("broken file")
        return Image.new("RGB", (8, 8), (10 * i, 0, 0))
    uniq = [Sample(key=f"k{i}", load_image=lambda i=i: load(i), captions=["x"], image_id=i) for i in range(7)]
    calls = []

    def step(images, batch_index):
        calls.append((batch_index, images.shape[0]))
        return {"red": images[:, 0, 0, 0].clone(), "n": [batch_index] * images.shape[0]}
    skips = SkipLog()
    run = image_pass(uniq, ImageTransform(8, train=False), 3, 0, skips, step, Sharding())
    assert calls == [(0, 3), (1, 2), (2, 1)]                                  # images 0-2, 3-5 (3 fails), 6
    assert run.kept == [0, 1, 2, 4, 5, 6] and run.lists["n"] == [0, 0, 0, 1, 1, 2]
    assert sum(skips.counts.values()) == 1
    red = run.tensors["red"]
    assert red.shape == (6,) and bool((red[1:] > red[:-1]).all())            # rows stay in image order


def test_evaluate_tgir_composes_from_the_reference_and_excludes_it(monkeypatch):
    """evaluate_tgir: query = normalize(embed(reference image) + embed(text)), ranked against the whole
    gallery with the reference excluded (checked on the arguments it hands tgir_metrics)."""
    from PIL import Image
    from finealign.config import load_config
    from finealign.data.sources import tgir as tgir_source
    from finealign.data.sources.tgir import TGIRQuery, TGIRSet
    from finealign.data.transforms import ImageTransform
    from finealign.eval import tgir as tgir_eval
    from finealign.types import Sample

    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0), (0, 250, 250)]
    gallery = [Sample(key=f"g{i}", load_image=lambda c=c: Image.new("RGB", (8, 8), c), captions=["x"], image_id=i)
               for i, c in enumerate(colours)]
    queries = [TGIRQuery(0, "make it green", 1), TGIRQuery(3, "make it blue", 2), TGIRQuery(4, "red", 0)]
    cfg = load_config("clip", ["data.source=shapes", "data.eval_batch_size=2"])
    monkeypatch.setattr(tgir_source, "build_tgir", lambda data, split, max_queries=0: TGIRSet(gallery, queries))
    texts = {"make it green": [0.0, 2.0, 0.0], "make it blue": [0.0, 0.0, 0.5], "red": [1.0, 0.0, 0.0]}

    class Model:
        def encode_image(self, images):
            return {"embed": F.normalize(images.mean((2, 3)), dim=-1)}
    seen = {}
    real = tgir_eval.tgir_metrics

    def spy(composed, gallery_embed, target, exclude=None, **kw):
        seen.update(composed=composed, gallery=gallery_embed, target=target, exclude=exclude)
        return real(composed, gallery_embed, target, exclude, **kw)
    monkeypatch.setattr(tgir_eval, "tgir_metrics", spy)
    out = tgir_eval.evaluate_tgir(Model(), cfg, "test", lambda t: torch.tensor([texts[x] for x in t]))
    tf = ImageTransform(cfg.model.image_size, train=False)
    g = Model().encode_image(torch.stack([tf(s.load_image()) for s in gallery]))["embed"]
    torch.testing.assert_close(seen["gallery"], g)
    assert seen["target"].tolist() == [1, 2, 0] and seen["exclude"].tolist() == [0, 3, 4]
    want = F.normalize(g[[0, 3, 4]] + torch.tensor([texts[q.text] for q in queries]), dim=-1)
    torch.testing.assert_close(seen["composed"], want)
    assert out["num_queries"] == 3 and out["num_gallery"] == 5


# ---------------------------------------------------------------- ITM re-ranking


def test_rerank_uses_the_best_scoring_of_several_correct_candidates():
    """An image with two captions in its top-k: its rank counts the wrong candidates at or above its
    BEST-scoring caption (not its worst, nor its first)."""
    from finealign.eval.rerank import itm_rerank_metrics, rerank_ranks
    topk = torch.tensor([[0, 1, 2], [2, 1, 0]])
    scores = torch.tensor([[0.5, 0.9, 0.7], [0.7, 0.5, 0.9]])
    ranks = rerank_ranks(torch.tensor([7, 7]), topk, scores, torch.tensor([5, 5]), torch.tensor([5, 5, 6]))
    assert ranks.tolist() == [0, 0]
    # end to end, image -> text over 2 images x 3 captions (t0, t1 of image 0; t2 of image 1), k = 3:
    # ITM prefers t1 (0.9) over the wrong t2 (0.7) over t0 (0.5) for image 0 -> rank 0 (R@1 100)
    itm = torch.tensor([[0.5, 0.9, 0.7], [0.0, 0.0, 1.0]])
    img, txt = torch.eye(2), torch.tensor([[1.0, 0.0], [0.2, 0.0], [0.0, 1.0]])
    m = itm_rerank_metrics(img, txt, torch.tensor([0, 0, 1]), 3, lambda i, t: itm[i, t], ks=(1,))
    assert m["i2t_r1"] == 100.0 and m["t2i_r1"] == 100.0


# ---------------------------------------------------------------- captioning


def test_simple_tokenizer_drops_runs_of_punctuation():
    """"A dog's toy..." -> "a dog 's toy": the run "..." is punctuation too, so the caption equals the
    reference token for token (BLEU-1 100, not 4/5)."""
    s = score_captions({0: ["a dog's toy"]}, {0: "A dog's toy..."}, meteor=False, tokenizer="simple")
    assert s["bleu1"] == pytest.approx(100.0, abs=1e-4) and s["bleu4"] == pytest.approx(100.0, abs=1e-4)


@pytest.mark.skipif(not java_available(), reason="PTBTokenizer needs java")
def test_ptb_tokens_drop_the_toolkits_punctuation():
    """PTB splits "cat," and "mat!" and the toolkit's punctuation list removes "," and "!": a perfect
    match (BLEU-1 100), not 6 of 8 tokens."""
    s = score_captions({0: ["the cat sat on the mat"]}, {0: "The cat, sat on the mat!"}, meteor=False,
                       tokenizer="ptb")
    assert s["tokenizer"] == "ptb"
    assert s["bleu1"] == pytest.approx(100.0, abs=1e-4) and s["rouge_l"] == pytest.approx(100.0, abs=1e-4)
