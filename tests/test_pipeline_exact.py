"""Exact checks of the one-way step flow (pipeline.Pipeline) and of the small heads it feeds: the attentional
pooler, the prototype head, the MAE-style image decoder and the PTA head. Tiny modules, hand-built
stand-in models, expectations worked out from the documented layouts."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from finealign.config import MaskingConfig, MixerConfig
from finealign.mixing import zscore
from finealign.models.heads import AttentionalPooler, Projection
from finealign.models.image_decoder import ImageDecoder
from finealign.models.prototypes import PrototypeHead
from finealign.models.pta import PTAHead
from finealign.pipeline import Pipeline
from finealign.types import Batch, Features


class _Stub:
    """A model with the two-stage interface: ``encode`` returns fixed patch/text tokens, ``heads`` records the
    masks and needs it was given, ``cross_attention`` the layer asked for, ``encode_image`` returns the
    flattened pixels, relevance is a fixed table."""

    def __init__(self, rel=None, attn=None, patch_size=2):
        self.cfg = SimpleNamespace(patch_size=patch_size)
        self.rel, self.attn = rel, attn
        self.got = self.needs = self.layer = None

    def encode(self, batch):
        B = len(batch)
        return Features(image_tokens=torch.zeros(B, 4, 3), text_tokens=torch.zeros(B, 2, 3))

    def encode_image(self, images, memory=True):
        return {"embed": images.flatten(1).clone()}

    def patch_text_relevance(self, patches, text_tokens, text_mask, reduce):
        return self.rel.clone()

    def cross_attention(self, feats, batch, layer=-1):
        self.layer = layer
        return self.attn.clone()

    def heads(self, feats, batch, masks, needs=None):
        self.got, self.needs = masks, needs
        return feats


def _batch(B=2, size=4, regions=None):
    g = torch.Generator().manual_seed(0)
    extras = {} if regions is None else {"regions": regions}
    return Batch(images=torch.randn(B, 3, size, size, generator=g), text=torch.ones(B, 2, dtype=torch.long),
                 text_mask=torch.ones(B, 2, dtype=torch.bool), image_ids=torch.arange(B), item_ids=torch.arange(B),
                 captions=[""] * B, keys=[""] * B, extras=extras)


_TOK = SimpleNamespace(mask_id=2, vocab_size=50, special_ids=[0, 1])


def _text_batch(B=2):
    g = torch.Generator().manual_seed(0)
    text = torch.tensor([[1, 7, 8, 9, 0], [1, 10, 11, 0, 0]])[:B]          # 1 = CLS, 0 = pad
    return Batch(images=torch.randn(B, 3, 4, 4, generator=g), text=text, text_mask=text != 0,
                 image_ids=torch.arange(B), item_ids=torch.arange(B), captions=[""] * B, keys=[""] * B)


# ---------------------------------------------------------------- pipeline: maskers


def test_attentive_mim_follows_relevance_even_when_ic_is_random(one_thread):
    rel = torch.tensor([[0.1, 0.9, 0.3, 0.7], [0.8, 0.2, 0.6, 0.4]])
    stub = _Stub(rel=rel)
    masking = MaskingConfig(ic={"type": "random", "mask_ratio": 0.5},
                            mim={"type": "attentive", "mask_ratio": 0.5, "mask": "most"})
    Pipeline(stub, masking)(_batch())
    assert set(stub.got) == {"ic", "mim"}
    assert [sorted(r) for r in stub.got["mim"].masked.tolist()] == [[1, 3], [0, 2]]   # the two most relevant


def test_attention_relevance_sums_the_cross_attention_over_words(one_thread):
    # word 0 puts everything on patch 0, words 1-2 spread over patches 1-3: sum ranks patch 3 first, max patch 0
    attn = torch.tensor([[[0.6, 0.1, 0.1, 0.2], [0.0, 0.3, 0.2, 0.5], [0.0, 0.2, 0.3, 0.5]]])
    stub = _Stub(attn=attn)
    pipe = Pipeline(stub, MaskingConfig(relevance="attention"))
    b = _batch(B=1)
    rel = pipe.relevance(stub.encode(b), b)
    assert torch.allclose(rel, torch.tensor([[0.6, 0.6, 0.6, 1.2]]))


def test_word_masking_uses_the_configured_probability_and_needs_a_tokenizer(one_thread):
    with pytest.raises(ValueError, match="needs the tokenizer"):
        Pipeline(_Stub(), MaskingConfig(mlm={"prob": 1.0}))
    stub = _Stub()
    Pipeline(stub, MaskingConfig(mlm={"prob": 1.0}), _TOK, needs={"mlm_logits"})(_text_batch())
    _, positions = stub.got["mlm"]
    assert positions.tolist() == [[0, 1], [0, 2], [0, 3], [1, 1], [1, 2]]   # every real non-special word
    assert stub.needs == {"mlm_logits"}


def test_heads_get_the_needs_and_the_relevance_the_maskers_read(one_thread):
    rel = torch.tensor([[0.1, 0.9, 0.3, 0.7], [0.8, 0.2, 0.6, 0.4]])
    stub = _Stub(rel=rel)
    masking = MaskingConfig(mim={"type": "attentive", "mask_ratio": 0.5, "mask": "most"})
    feats = Pipeline(stub, masking, needs={"mim_pred"})(_text_batch())
    assert stub.needs == {"mim_pred"} and set(stub.got) == {"mim"}
    assert torch.equal(feats.extras["relevance"], rel)


def test_sync_masker_reads_the_configured_layer_and_replaces_the_mim_masker(one_thread):
    attn = torch.full((2, 5, 4), 0.25)
    stub = _Stub(rel=torch.zeros(2, 4), attn=attn)
    masking = MaskingConfig(mim={"type": "random", "mask_ratio": 0.5},
                            sync={"words": 0.34, "patches": 0.5, "layer": 1})
    Pipeline(stub, masking, _TOK)(_text_batch())
    assert stub.layer == 1
    assert set(stub.got) == {"mlm", "mim"}



# ---------------------------------------------------------------- pipeline: mixing


def test_mixing_stops_at_the_rounded_fraction_of_the_steps():
    pipe = Pipeline(_Stub(), mixer=MixerConfig(type="mixup", stop=0.5), total_steps=4)   # mix steps 0, 1
    assert [pipe.mixing(s) for s in range(4)] == [True, True, False, False]
    pipe = Pipeline(_Stub(), mixer=MixerConfig(type="mixup", stop=0.7), total_steps=5)   # 3.5 -> 4, not 3
    assert [pipe.mixing(s) for s in range(5)] == [True, True, True, True, False]


def test_mix_draws_depend_on_seed_step_and_micro_batch_only(one_thread):
    def lam(seed, step, micro):
        pipe = Pipeline(_Stub(), mixer=MixerConfig(type="mixup"), total_steps=100, seed=seed)
        return pipe.encode(_text_batch(), step, micro).extras["mix_lambda"][0].item()
    base = lam(3, 5, 0)
    assert lam(3, 5, 0) == base                                  # reproducible (resume, no-grad pre-pass)
    assert lam(3, 5, 1) != base and lam(4, 5, 0) != base and lam(3, 6, 0) != base


def test_mix_offset_is_source_row_minus_row_and_embeds_the_mixed_images(one_thread):
    stub = _Stub()
    pipe = Pipeline(stub, mixer=MixerConfig(type="mixup"), total_steps=10)
    b = _batch(B=3)
    feats = pipe(b, step=0)
    assert feats.extras["mix_offset"].tolist() == [2, 0, -2]          # the batch reversed
    lam = feats.extras["mix_lambda"]
    x = b.images.flatten(1)
    want = lam[:, None] * x + (1 - lam[:, None]) * x.flip(0)
    assert torch.allclose(feats.extras["mixed_image_embed"], want, atol=1e-6)
    assert "mixed_image_embed" not in pipe(b, step=9).extras             # past stop: nothing mixed


def _pta_logp():
    p = torch.tensor([[0.1, 0.6, 0.3, 0.8], [0.5, 0.2, 0.9, 0.4]], requires_grad=True)
    return torch.stack([torch.log1p(-p), torch.log(p)], dim=-1)          # (B, N, 2): class 1 = belongs


@pytest.mark.parametrize("scores, regions, by_pta", [("auto", [[(0, 0, 2, 2)], []], True),
                                                    ("auto", [[], []], False),
                                                    ("pta", [[], []], True),
                                                    ("relevance", [[(0, 0, 2, 2)], []], False)])
def test_mix_scores_read_the_class_one_log_probability_without_gradient(scores, regions, by_pta):
    rel = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    pipe = Pipeline(_Stub(rel=rel), mixer=MixerConfig(type="timix", scores=scores))
    b = _batch(regions=regions)
    logp = _pta_logp()
    feats = Features(image_tokens=torch.zeros(2, 4, 3), text_tokens=torch.zeros(2, 2, 3), extras={"pta_logp": logp})
    got = pipe.mix_scores(feats, b)
    assert not got.requires_grad
    assert feats.extras["mix_by_pta"].item() == float(by_pta)
    want = zscore(logp[..., 1].detach()) if by_pta else zscore(rel)
    assert torch.allclose(got, want, atol=1e-6)


# ---------------------------------------------------------------- attentional pooler


def _pooler():
    torch.manual_seed(0)
    return AttentionalPooler(dim_q=4, dim_kv=6, n_queries=3, heads=2).eval()


def test_pooler_over_one_kept_token_equals_its_dense_value(one_thread):
    pool = _pooler()
    tokens = torch.randn(2, 5, 6)
    keep = torch.zeros(2, 5, dtype=torch.bool)
    keep[0, 3], keep[1, 1] = True, True
    with torch.no_grad():
        out = pool(tokens, key_mask=keep)                                # (2, 3, 4): every query sees one token
        dense = pool.dense(tokens)                                       # (2, 5, 4)
    for q in range(3):
        assert torch.allclose(out[0, q], dense[0, 3], atol=1e-5)
        assert torch.allclose(out[1, q], dense[1, 1], atol=1e-5)


def test_pooler_query_attention_averages_the_heads(one_thread):
    pool = _pooler()
    with torch.no_grad():
        pool.attn.q.weight.zero_()
        pool.attn.q.bias.zero_()
        pool.attn.q.bias[:2] = 50.0                       # head 0 (channels 0-1) attends sharply, head 1 uniformly
    tokens = torch.randn(1, 4, 6)
    att = pool.query_attention(tokens, 0)[0]
    assert att.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert att.min().item() >= 0.125 - 1e-6                             # at least half of the uniform 1/4
    assert att.max().item() == pytest.approx(0.625, abs=1e-3)         # 0.5 * 1 + 0.5 * 1/4


def test_projection_is_unit_length_only_when_asked(one_thread):
    proj = Projection(3, 2)
    with torch.no_grad():
        proj.proj.weight.copy_(torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]]))
        x = torch.tensor([[1.0, 1.0, 5.0]])
        assert torch.allclose(proj(x), torch.tensor([[0.6, 0.8]]))               # (3, 4) / 5
        proj.normalize = False
        assert torch.allclose(proj(x), torch.tensor([[3.0, 4.0]]))


# ---------------------------------------------------------------- prototype head


def test_prototype_logits_are_cosines_with_unit_prototypes(one_thread):
    torch.manual_seed(0)
    head = PrototypeHead(in_dim=5, num_prototypes=4, bottleneck=4, hidden=8)
    with torch.no_grad():
        head.prototypes.weight.copy_(torch.diag(torch.tensor([3.0, 0.5, 7.0, 2.0])))   # scaled axes
        x = torch.randn(3, 5)
        out = head(x)
        z = head.mlp(x)
    assert torch.allclose(out, F.normalize(z, dim=-1), atol=1e-6)       # cos(z, e_k) = z_k / |z|
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)


# ---------------------------------------------------------------- image decoder


def _decoder(text_width=5, layers=1, text_from=0):
    torch.manual_seed(0)
    dec = ImageDecoder(num_patches=6, encoder_width=4, width=8, layers=layers, heads=2, patch_dim=3,
                       text_width=text_width, text_from=text_from).eval()
    with torch.no_grad():                     # the MAE init is nearly silent: large weights make every path count
        for p in dec.parameters():
            p.normal_(0.0, 0.5)
    return dec


def _text():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 5, generator=g), torch.tensor([[True, True, False], [True, False, False]])


@torch.no_grad()
def test_decoder_places_each_visible_token_at_its_own_index(one_thread):
    dec = _decoder(text_width=None)
    vis = torch.randn(2, 3, 4)
    keep, masked = torch.tensor([[0, 2, 5], [1, 3, 4]]), torch.tensor([[1, 3, 4], [0, 2, 5]])
    base = dec(vis, keep, masked)
    perm = [1, 2, 0]
    assert torch.allclose(dec(vis[:, perm], keep[:, perm], masked), base, atol=1e-5)   # same pairs, other order
    assert not torch.allclose(dec(vis.flip(1), keep, masked), base, atol=1e-3)


@torch.no_grad()
def test_decoder_mask_tokens_differ_only_by_position(one_thread):
    dec = _decoder(text_width=None)
    vis = torch.ones(1, 2, 4)
    out = dec(vis, torch.tensor([[0, 5]]), torch.tensor([[1, 2, 3, 4]]))
    assert not torch.allclose(out[0, 0], out[0, 1], atol=1e-4)         # same mask token, other pos embed
    dense = dec.dense(torch.ones(1, 6, 4))
    assert not torch.allclose(dense[0, 0], dense[0, 1], atol=1e-4)


@torch.no_grad()
def test_decoder_cross_attention_never_reads_padding_and_use_text_false_ignores_text(one_thread):
    dec = _decoder()
    text, tmask = _text()
    vis = torch.randn(2, 3, 4)
    keep, masked = torch.tensor([[0, 2, 5], [1, 3, 4]]), torch.tensor([[1, 3, 4], [0, 2, 5]])
    base = dec(vis, keep, masked, text, tmask)
    pads = text.clone()
    pads[~tmask] += 10.0
    assert torch.allclose(dec(vis, keep, masked, pads, tmask), base, atol=1e-5)
    tokens = torch.randn(2, 6, 4)
    assert torch.allclose(dec.dense(tokens, pads, tmask), dec.dense(tokens, text, tmask), atol=1e-5)
    off = dec(vis, keep, masked, text, tmask, use_text=False)
    assert torch.allclose(dec(vis, keep, masked, text.flip(-1), tmask, use_text=False), off, atol=1e-6)
    assert not torch.allclose(off, base, atol=1e-4)


@torch.no_grad()
def test_decoder_text_from_makes_later_blocks_cross_attend(one_thread):
    dec = _decoder(layers=2, text_from=1)
    assert [b.has_cross for b in dec.blocks] == [False, True]
    assert [b.has_cross for b in _decoder(layers=1, text_from=0).blocks] == [True]
    text, tmask = _text()
    vis = torch.randn(2, 3, 4)
    keep, masked = torch.tensor([[0, 2, 5], [1, 3, 4]]), torch.tensor([[1, 3, 4], [0, 2, 5]])
    assert not torch.allclose(dec(vis, keep, masked, text, tmask), dec(vis, keep, masked, text.flip(-1), tmask), atol=1e-4)


# ---------------------------------------------------------------- PTA head


def test_pta_keeps_the_first_half_per_patch_and_averages_the_second(one_thread):
    torch.manual_seed(0)
    head = PTAHead(vision_width=4, text_width=3, width=6).eval()
    seen = {}
    head.proj.register_forward_hook(lambda m, i, o: seen.__setitem__("proj", o))
    head.mlp[0].register_forward_hook(lambda m, i, o: seen.__setitem__("mlp_in", i[0]))
    patches, text = torch.randn(2, 5, 4), torch.randn(2, 3)
    with torch.no_grad():
        out = head(patches, text)
        x = F.gelu(seen["proj"])                                          # (2, 5, 6)
        t = head.text_proj(text)                                          # (2, 6)
    got = seen["mlp_in"]                                                  # (2, 5, 12)
    assert torch.allclose(got[..., :3], x[..., :3], atol=1e-6)
    for n in range(5):
        assert torch.allclose(got[:, n, 3:6], x[..., 3:].mean(1), atol=1e-6)
        assert torch.allclose(got[:, n, 6:], t, atol=1e-6)
    assert torch.allclose(out.exp().sum(-1), torch.ones(2, 5), atol=1e-5)
