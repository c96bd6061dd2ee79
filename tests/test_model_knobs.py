"""Each ``model:`` config knob reaches the code path it documents (config_schema.ModelConfig comments).

Pinned here on tiny float64 models whose text width (8) differs from the vision width (16), so that a knob
read from the wrong field shows up as a shape or a value:
- image_pool / decoder_layers / caption_queries: the pooler's query count (1 contrastive query, + the
  caption queries only with a decoder; cls pooling with a decoder: every query is memory), the image
  projection's input width, no decoder at decoder_layers=0, cls-pooled dense embeddings and the cls row of
  the attention map; init_temperature and the logit-scale clamp (both archs).
- mim_visible: shared = the first pass's tokens at the kept patches, reencode = a second ViT pass over them;
  mim_text=false: the CoCa decoder gets no text.
- image decoder: mim_decoder_layers / heads / mlp_ratio / grad_checkpointing reach the decoder.
- pta / pta_block / pta_width: the head's width and the block it reads (both archs).
- fusion arch: fusion_layers, momentum, queue_size (both queues), proto_dim, the teacher copying the image
  decoder, the semantic-target decoder width, mim_inject / mim_text in the MIM decoder call, the queue
  filling only on gradient passes.
- factory: model.vocab_size wins over the tokenizer's; attn_low_precision reaches every Attention and stays
  within tolerance of the fp32 path.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from finealign.config_schema import ModelConfig
from finealign.masking.base import MaskIndices, gather_tokens
from finealign.models.factory import build_model
from finealign.models.image_decoder import build_image_decoder
from finealign.models.layers import Attention
from finealign.types import Batch

pytestmark = pytest.mark.usefixtures("one_thread")
V = 40
CFG = ModelConfig(image_size=8, patch_size=2, vision_width=16, vision_layers=4, vision_heads=2, text_width=8,
                  text_layers=1, text_heads=2, decoder_layers=1, context_length=8, embed_dim=6,
                  caption_queries=3, mlp_ratio=2.0, fusion_layers=2)


def _cfg(**over) -> ModelConfig:
    return dataclasses.replace(CFG, **over)


def _model(seed=0, **over):
    torch.manual_seed(seed)
    m = build_model(_cfg(**over), V)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():                                   # away from the (zero / identity) init
        for name, p in m.named_parameters():
            if "logit_scale" not in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return m.double().eval()


def _batch(B=2, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(5, V, (B, T), generator=g)
    text[:, 0] = 1
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    return Batch(images=torch.randn(B, 3, 8, 8, generator=g, dtype=torch.float64), text=text, text_mask=mask,
                 image_ids=torch.arange(B), item_ids=torch.arange(B), captions=[""] * B, keys=[""] * B)


def _mim_mask():
    keep = torch.tensor([[0, 3, 5, 6, 9, 12, 14, 15], [1, 2, 4, 7, 8, 10, 11, 13]])
    masked = torch.tensor([[1, 2, 4, 7, 8, 10, 11, 13], [0, 3, 5, 6, 9, 12, 14, 15]])
    return MaskIndices(keep=keep, masked=masked)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- CoCa arch: pooling and decoder knobs


def test_pool_queries_projection_width_and_decoder_presence():
    coca = _model()
    assert coca.pooler.n_queries == 1 + 3 and coca.image_proj.in_features == 8 and coca.decoder is not None
    clip_attn = _model(decoder_layers=0)                    # CLIP with the attentional pooler
    assert clip_attn.decoder is None and not clip_attn.has_decoder and clip_attn.pooler.n_queries == 1
    assert clip_attn.encode_image(_batch().images)["memory"] is None
    clip_cls = _model(image_pool="cls")
    assert clip_cls.pooler.n_queries == 3 and clip_cls.image_proj.in_features == 16
    assert _model(image_pool="cls", decoder_layers=0).pooler is None


@torch.no_grad()
def test_cls_pool_memory_dense_embed_and_global_attention():
    m = _model(image_pool="cls")
    b = _batch()
    out = m.encode_image(b.images)
    _close(out["embed"], F.normalize(m.image_proj(out["cls"]), dim=-1))
    assert out["memory"].shape == (2, 3, 8)
    _close(out["memory"], m.pooler(out["patches"]))
    _close(m.dense_image_embed(out["patches"]), F.normalize(m.image_proj(out["patches"]), dim=-1))
    attn = torch.arange(2 * 17 * 17, dtype=torch.float64).view(2, 17, 17)
    _close(m.global_attention(out["patches"], attn), attn[:, 0, 1:])


@pytest.mark.parametrize("arch", ["coca", "fusion"])
def test_init_temperature_sets_the_logit_scale_and_it_is_clamped_at_100(arch):
    assert math.isclose(float(_model(arch=arch, init_temperature=0.05).get_logit_scale().detach()), 20.0, rel_tol=1e-6)
    assert float(_model(arch=arch, init_temperature=0.005).get_logit_scale().detach()) == 100.0


# ---------------------------------------------------------------- CoCa arch: MIM knobs


@torch.no_grad()
@pytest.mark.parametrize("visible", ["shared", "reencode"])
def test_mim_visible_picks_the_tokens_the_image_decoder_reads(visible):
    m = _model(mim_decoder_layers=1, mim_visible=visible)
    b, mim = _batch(), _mim_mask()
    f = m.heads(m.encode(b), b, {"mim": mim}, needs={"mim_pred"})
    shared = gather_tokens(f.image_tokens, mim.keep)
    reencoded = m.visual(b.images, keep=mim.keep)[1]
    want = shared if visible == "shared" else reencoded
    _close(f.extras["mim_pred"], m.image_decoder(want, mim.keep, mim.masked, f.text_tokens, b.text_mask))
    assert not torch.allclose(shared, reencoded, atol=1e-3)
    assert f.caption_logits is None                         # needs gates the caption head


@torch.no_grad()
def test_plain_mim_decoder_gets_no_text():
    m = _model(mim_decoder_layers=1, mim_text=False)
    b, mim = _batch(), _mim_mask()
    f = m.heads(m.encode(b), b, {"mim": mim}, needs={"mim_pred"})
    _close(f.extras["mim_pred"], m.image_decoder(m.visual(b.images, keep=mim.keep)[1], mim.keep, mim.masked))


def test_image_decoder_reads_its_own_layers_heads_mlp_ratio_and_checkpointing():
    cfg = _cfg(mim_decoder_layers=3, mim_decoder_heads=4, mlp_ratio=3.0, grad_checkpointing=True)
    dec = build_image_decoder(cfg, num_patches=16, patch_dim=12, text_width=8)
    assert len(dec.blocks) == 3 and dec.width == 16 and dec.grad_checkpointing
    assert {blk.attn.heads for blk in dec.blocks} == {4} and {blk.mlp.fc.out_features for blk in dec.blocks} == {48}
    assert dec.head.out_features == 12 and dec.embed.in_features == 16


# ---------------------------------------------------------------- PTA knobs (both archs)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["coca", "fusion"])
def test_pta_block_and_width_reach_the_head(arch):
    m = _model(arch=arch, pta=True, pta_block=4, pta_width=8)
    assert m.pta_head.width == 8 and m.pta_index == 3
    b = _batch()
    f = m.encode(b)
    hidden = m.visual(b.images, hidden_at=3)[2]
    _close(f.extras["pta_logp"], m.pta_head(hidden, m.encode_text(b.text, b.text_mask)["pooled"]))
    assert not torch.allclose(hidden, f.image_tokens, atol=1e-3)      # a block's output, not the final tokens
    assert _model(arch=arch, pta=True).pta_index == 1 and _model(arch=arch, pta=True).pta_head.width == 16


# ---------------------------------------------------------------- fusion arch


def test_fusion_layers_momentum_queue_and_prototype_knobs():
    m = _model(arch="fusion", fusion_layers=1, momentum=0.9, queue_size=1, prototypes=5, proto_dim=7,
               mim_decoder_layers=1, mim_target="semantic")
    assert len(m.fusion.blocks) == 1 and len(m.text.blocks) == 1 + 0 * len(m.fusion.blocks)
    assert m.teacher.momentum == 0.9
    assert m.queues["image"].size == 1 and m.queues["text"].size == 1
    assert m.proto_head.prototypes.in_features == 7 and m.proto_head.num_prototypes == 5
    assert "image_decoder" in m.teacher.module and "proto_head" in m.teacher.module
    assert m.image_decoder.head.out_features == 16                    # semantic: back to the ViT width
    assert _model(arch="fusion", mim_decoder_layers=1).image_decoder.head.out_features == 3 * 2 * 2
    assert _model(arch="fusion", fusion_layers=3).fusion.blocks.__len__() == 3
    assert _model(arch="fusion").teacher is None and _model(arch="fusion", momentum=0.5).queues is None


def test_queue_collects_teacher_embeddings_only_on_gradient_passes():
    m = _model(arch="fusion", momentum=0.5, queue_size=4).train()
    b = _batch()
    with torch.no_grad():
        m.encode(b)                                       # grad-accumulation pre-pass: nothing queued
    assert m._pending == []
    m.encode(b)
    assert len(m._pending) == 1
    m.eval()
    m.encode(b)
    assert len(m._pending) == 1


@torch.no_grad()
@pytest.mark.parametrize("inject, text", [(True, True), (False, True), (True, False)])
def test_fusion_mim_decoder_call_follows_mim_inject_and_mim_text(inject, text):
    m = _model(arch="fusion", mim_decoder_layers=1, mim_inject=inject, mim_text=text)
    b, mim = _batch(), _mim_mask()
    f = m.heads(m.encode(b), b, {"mim": mim}, needs={"mim_pred"})
    cls, vis = m.visual(b.images, keep=mim.keep)
    fused = m.fuse(f.text_tokens, b.text_mask, cls, vis)["tokens"]
    ctx = fused if text else None
    want = m.image_decoder(vis, mim.keep, mim.masked, ctx, b.text_mask if text else None, use_text=inject)
    _close(f.extras["mim_pred"], want)
    if text:
        other = m.image_decoder(vis, mim.keep, mim.masked, ctx, b.text_mask, use_text=not inject)
        assert not torch.allclose(want, other, atol=1e-4)


# ---------------------------------------------------------------- factory


@torch.no_grad()
def test_config_vocab_wins_and_low_precision_attention_is_switched_on_within_tolerance():
    assert build_model(_cfg(vocab_size=30), 64).vocab_size == 30
    assert build_model(_cfg(), 64).vocab_size == 64
    torch.manual_seed(0)
    lo = build_model(_cfg(arch="fusion", attn_low_precision=True), V)
    attns = [mod for mod in lo.modules() if isinstance(mod, Attention)]
    assert attns and all(a.low_precision for a in attns)
    torch.manual_seed(0)
    hi = build_model(_cfg(arch="fusion"), V)
    assert not any(mod.low_precision for mod in hi.modules() if isinstance(mod, Attention))
    b = _batch()
    images = b.images.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = lo.eval().encode_image(images)["embed"].float()
        c = hi.eval().encode_image(images)["embed"].float()
    torch.testing.assert_close(a, c, rtol=0, atol=5e-2)
