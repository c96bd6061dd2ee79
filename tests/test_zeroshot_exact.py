"""Exact checks for MacCap's zero-shot parts that the other MacCap tests leave loose (found by a mutation
audit of ``finealign.zeroshot``): subregion k larger than the patch count, re-ranking in float32, the
CapDec memory (global feature + L noisy copies), the frozen backbone in train mode, the default
seed-0 generator, at least one sample, decoding from BOS, the small LM's PAD mask and length limit,
prompt tokens, per-row decoding of ``generate`` (greedy and beam), beam search on unnormalised logits
and with no finished hypothesis, the Hugging Face LM's tokenize / decode, and the adaptor's layer
norm and learnt queries. Expected values are worked out from the definitions on tiny inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finealign.zeroshot.features import rerank, subregion_features

from test_eval_exact import BEAM_ROWS, _TableLM      # fake LM: next token from the last token only

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["data.num_samples=64", "data.batch_size=8", "maccap.adaptor_width=32", "maccap.adaptor_heads=2",
        "maccap.queries=4", "maccap.copies=3", "lm.width=32", "lm.layers=1", "lm.heads=2",
        "model.image_pool=cls", "model.decoder_layers=0"]
CAPTIONS = ["a small red circle", "a large blue square on the left", "a green triangle"]


@pytest.fixture(scope="module")
def tok():
    from finealign.data.tokenizer import Tokenizer
    return Tokenizer.train(CAPTIONS * 20, vocab_size=300)


@pytest.fixture(scope="module")
def mc(tok):
    """A tiny MacCap over an untrained CLIP backbone (each test sets the inference knobs it needs)."""
    from finealign.config import load_config
    from finealign.models.factory import build_model
    cfg = load_config("maccap", TINY)
    torch.manual_seed(0)
    m = build_model(cfg.model, tok.vocab_size, full=cfg, tokenizer=tok).eval()
    return m


def _images(m, n=2):
    S = m.cfg.image_size
    return torch.randn(n, 3, S, S, generator=torch.Generator().manual_seed(1))


def _knobs(m, **kw):
    base = dict(subregions=0, subregion_weight=1.0, samples=1, rerank=False, noise_var=0.0)
    m.set_inference(**{**base, **kw})


# ---------------------------------------------------------------- features


def test_subregions_keep_at_most_all_patches():
    """k = 10 over N = 3 patches: every patch is a subregion, ordered by the cls row's attention."""
    attn = torch.zeros(1, 4, 4)
    attn[0, 0, 1:] = torch.tensor([0.2, 0.5, 0.3])
    attn[0, 1:, 1:] = torch.eye(3)                                  # each patch attends only to itself
    feats, top = subregion_features(torch.eye(3)[None] * 2.0, attn, k=10)
    assert top.tolist() == [[1, 2, 0]]
    assert torch.allclose(feats[0], torch.eye(3)[[1, 2, 0]])


def test_rerank_scores_bfloat16_embeddings_in_float32():
    """Candidate 1 scores 1 + 2**-9 against the image, candidate 0 exactly 1: a bfloat16 product rounds
    both to 1.0 (spacing 2**-7) and the tie picks candidate 0; in float32 candidate 1 wins."""
    img = torch.tensor([[1.0, 1.0]]).bfloat16()
    cands = torch.tensor([[[1.0, 0.0], [1.0, 2.0 ** -9]]]).bfloat16()
    assert rerank(img, cands).tolist() == [1]


# ---------------------------------------------------------------- MacCap model


def test_capdec_memory_is_copies_of_the_noised_global_embedding(mc):
    """subregions = 0 (CapDec): memory (B, L, E) = normalise(g + sqrt(var) ε_l), ε drawn from the given
    generator, L = maccap.copies; the second output is the backbone's global image embedding."""
    var = 0.05
    _knobs(mc, noise_var=var)
    images = _images(mc)
    mem, g = mc.image_memory(images, torch.Generator().manual_seed(4))
    want_g = mc.backbone.encode_image(images, memory=False)["embed"]
    eps = torch.randn((2, mc.mc.copies, want_g.shape[1]), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(g, want_g)
    torch.testing.assert_close(mem, F.normalize(want_g[:, None] + var ** 0.5 * eps, dim=-1), rtol=1e-5, atol=1e-5)


def test_train_mode_keeps_the_backbone_frozen_and_in_eval(mc):
    try:
        mc.train()
        assert not mc.backbone.training and mc.adaptor.training and mc.lm.training
        assert all(not p.requires_grad for p in mc.backbone.parameters())
        assert all(p.requires_grad for p in mc.adaptor.parameters())
    finally:
        mc.eval()


def test_caption_images_decodes_greedily_from_bos(mc, tok):
    """One sample, no noise: the caption is the greedy continuation of [BOS] after the adaptor prefix."""
    from finealign.zeroshot.lm import generate
    _knobs(mc, subregions=2, subregion_weight=0.5)
    images = _images(mc)
    got = mc.caption_images(images, strategy="greedy", max_new_tokens=4)
    prefix = mc.adaptor(mc.image_memory(images)[0])
    want = [tok.decode(t) for t in generate(mc.lm, prefix, torch.tensor([[tok.bos_id]] * 2), "greedy", 4)]
    assert got == want
    # samples = 0 still draws one candidate per image
    _knobs(mc, subregions=2, subregion_weight=0.5, samples=0, rerank=True)
    assert mc.caption_images(images, strategy="greedy", max_new_tokens=4) == want


def test_caption_images_default_generator_is_seed_zero(mc):
    _knobs(mc, subregions=2, noise_var=0.5, samples=2, rerank=False)
    images = _images(mc)
    kw = dict(strategy="top_p", top_p=1.0, temperature=3.0, max_new_tokens=6)
    a = mc.caption_images(images, **kw)
    assert a == mc.caption_images(images, generator=torch.Generator().manual_seed(0), **kw)
    assert any(a != mc.caption_images(images, generator=torch.Generator().manual_seed(s), **kw) for s in (1, 2))


# ---------------------------------------------------------------- the small LM


def _small_lm(max_len=6):
    from types import SimpleNamespace
    from finealign.zeroshot.lm import SmallCausalLM
    t = SimpleNamespace(vocab_size=11, eos_id=2, pad_id=0, bos_id=1)
    torch.manual_seed(0)
    return SmallCausalLM(t, width=16, layers=1, heads=2, max_len=max_len).eval()


def test_small_lm_hides_pad_keys_and_takes_max_len_positions():
    lm = _small_lm(max_len=6)
    x = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, 2] = torch.randn(16, generator=torch.Generator().manual_seed(1)) * 5   # a PAD position changes
    mask = torch.tensor([[True, True, False, True, True, True]])
    with torch.no_grad():
        a, b = lm.logits(x, mask), lm.logits(y, mask)
        torch.testing.assert_close(a[:, 3:], b[:, 3:])          # later positions do not read the PAD key
        full = torch.ones(1, 6, dtype=torch.bool)
        assert not torch.allclose(lm.logits(x, full)[:, 3:], lm.logits(y, full)[:, 3:], atol=1e-4)
        # a row whose own position is PAD with no real key before it still attends to itself (no NaN)
        assert torch.isfinite(lm.logits(x, torch.tensor([[False, True, True, True, True, True]]))).all()
        with pytest.raises(ValueError, match="max_len"):
            lm.logits(torch.randn(1, 7, 16), torch.ones(1, 7, dtype=torch.bool))


def test_prompt_ids_are_bos_and_the_prompt_cut_to_context_minus_two(mc, tok):
    ctx = mc.lm.context_length
    long = " ".join(["red circle"] * ctx)
    toks = tok.tokenize([long])[0]
    assert len(toks) > ctx
    assert mc.lm.prompt_ids(long) == [tok.bos_id] + toks[:ctx - 2]
    assert mc.lm.prompt_ids("a red circle") == [tok.bos_id] + tok.tokenize(["a red circle"])[0]


# ---------------------------------------------------------------- decoding


def test_generate_decodes_each_row_from_its_own_start_and_stops_it_at_eos():
    """Row 0 starts at BOS (-> EOS at once), row 1 at "b" (-> "a" -> EOS). After EOS a row adds nothing
    more, although from EOS the table would pick "b"."""
    from finealign.zeroshot.lm import generate
    lm = _TableLM({3: [0.7, 0.1, 0.1, 0.1], 2: [0.1, 0.7, 0.1, 0.1], 1: [0.7, 0.1, 0.1, 0.1],
                   0: [0.1, 0.1, 0.7, 0.1]})
    prefix, start = torch.zeros(2, 1, 4), torch.tensor([[3], [2]])
    assert generate(lm, prefix, start, "greedy", max_new_tokens=4) == [[], [1]]
    assert generate(lm, prefix, start, "beam", max_new_tokens=4, beam_size=2) == [[], [1]]
    with pytest.raises(ValueError, match="decode strategy"):
        generate(lm, prefix, start, "sample", max_new_tokens=4)


def test_beam_search_normalises_the_logits_first():
    """The probabilities of test_eval_exact's beam test ([a] wins by mean log-prob -0.55 over [] -1.0),
    but the logits after "a" are offset by -10: log-softmax removes the offset and [a] still wins;
    raw logits would score [a] (-0.5 - 10.6) / 2 and pick []."""
    from finealign.zeroshot.lm import generate
    lm = _TableLM(BEAM_ROWS, offset=[0.0, -10.0, 0.0, 0.0])
    assert generate(lm, torch.zeros(1, 2, 4), torch.tensor([[3]]), "beam", max_new_tokens=5, beam_size=2) == [[1]]


def test_beam_search_returns_the_best_open_hypothesis_when_none_finished():
    """EOS is never in the top 2 within 2 steps: the open hypotheses compete by mean log-prob; [a, a]
    (0.6 · 0.9) beats [b, b] (0.39 · 0.9)."""
    from finealign.zeroshot.lm import generate
    lm = _TableLM({3: [0.01, 0.6, 0.39 - 1e-6, 1e-6], 1: [0.01, 0.9, 0.09 - 1e-6, 1e-6],
                   2: [0.01, 0.09, 0.9 - 1e-6, 1e-6]})
    assert generate(lm, torch.zeros(1, 1, 4), torch.tensor([[3]]), "beam", max_new_tokens=2, beam_size=2) == [[1, 1]]


# ---------------------------------------------------------------- Hugging Face LM


def test_hf_lm_tokenize_decode_and_prompt(tmp_path, tok):
    transformers = pytest.importorskip("transformers")
    from finealign.zeroshot.lm import HFCausalLM
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.hf, bos_token="<bos>", eos_token="<eos>",
                                                  unk_token="<unk>")                   # no pad token
    config = transformers.GPT2Config(vocab_size=tok.vocab_size, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    hf_tok.save_pretrained(tmp_path)
    lm = HFCausalLM(tmp_path, context_length=4)
    eos = tok.eos_id
    assert lm.pad_id == eos and lm.hidden_size == 16                 # no pad token: EOS pads
    long, short = "a large blue square on the left", "a red"
    tl, ts = tok.tokenize([long])[0], tok.tokenize([short])[0]
    assert len(tl) > 3 and len(ts) == 2
    ids, mask, start = lm.tokenize([long, short])
    assert start == 0
    assert ids.tolist() == [tl[:3] + [eos], ts + [eos, eos]]        # cut to context - 1, EOS, padded
    assert mask.tolist() == [[True] * 4, [True, True, True, False]]
    assert lm.prompt_ids(long) == tl[:3]
    assert lm.decode(ts + [eos] + tl) == short                       # stops at EOS
    assert lm.decode(ts) == short
    assert not lm.train().model.training                             # frozen: no dropout in train mode


# ---------------------------------------------------------------- adaptor


def test_adaptor_layer_norms_the_queries_before_the_mlp():
    """With no decoder layer the prefix is MLP(LN(queries)): an affine change of each query (scale and
    shift of all its channels) leaves it unchanged; the learnt queries start distinct, so the Q prefix
    positions differ."""
    from finealign.zeroshot.adaptor import AdaptorDecoder
    torch.manual_seed(0)
    a = AdaptorDecoder(embed_dim=6, lm_dim=5, width=8, heads=2, queries=3, layers=0)
    mem = torch.randn(2, 4, 6)
    with torch.no_grad():
        a.queries.mul_(100.0)                              # well above LayerNorm's eps
        p = a(mem)
        assert p.shape == (2, 3, 5)
        assert not torch.allclose(p[:, 0], p[:, 1], rtol=0.1, atol=0.0)        # (tiny init weights)
        a.queries.mul_(7.0).add_(3.0)
        torch.testing.assert_close(a(mem), p, rtol=1e-3, atol=1e-9)
    torch.manual_seed(0)
    b = AdaptorDecoder(embed_dim=6, lm_dim=5, width=8, heads=2, queries=3, layers=1)
    with torch.no_grad():
        assert not torch.allclose(b(mem[:1]), b(mem[1:]), rtol=0.1, atol=0.0)            # reads the memory
