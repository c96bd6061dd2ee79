"""Exact checks of the CoCa / ALBEF model wiring that other tests only touch through shapes.

Pinned here, each against a hand re-composition from the real sub-modules:
- ContrastiveCaptioner: the attentional pooler's query 0 is the contrastive embedding and queries 1.. the
  caption memory (CoCa); with cls pooling the embedding is proj(cls) and every pooler query is memory;
  dense patch embeddings; the "ic" mask's kept patches feed the caption memory; ``needs`` gates the head.
- FusionEncoder: a sample with no visible patch ignores the image entirely; MLMHead is
  dense -> GELU -> LayerNorm -> decoder.
- FusionModel: ITM rows are (image b, text b), (image b, negative text), (negative image, text b); MLM
  logits at the masked positions; cross_attention drops the cls column and reads the teacher; teacher
  embeddings; momentum_update enqueues this step's teacher embeddings (image / text, micro-batch order).
- MomentumTeacher: a teacher of another dtype still gets m*t + (1-m)*s.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finealign.config import load_config
from finealign.masking.base import gather_tokens
from finealign.models.factory import build_model
from finealign.models.fusion import FusionEncoder, MLMHead
from finealign.models.momentum import FeatureQueue, MomentumTeacher
from finealign.models.negatives import sample_hard_negatives
from finealign.types import Batch

V = 64


def _batch(S, B=3, T=8, items=(0, 0, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(5, V, (B, T), generator=g)
    text[:, 0] = 1
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 5:] = False
    text[1, 5:] = 0
    return Batch(images=torch.randn(B, 3, S, S, generator=g), text=text, text_mask=mask,
                 image_ids=torch.arange(B), item_ids=torch.tensor(items[:B]), captions=[""] * B, keys=[""] * B)


def _coca(pool="attn", seed=0):
    torch.manual_seed(seed)
    cfg = load_config("coca", ["model.preset=tiny", f"model.image_pool={pool}"]).model
    return build_model(cfg, V).eval()


def _albef(*over, seed=0):
    torch.manual_seed(seed)
    cfg = load_config("albef", ["model.preset=tiny", *over]).model
    return build_model(cfg, V).eval()


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- CoCa


@torch.no_grad()
def test_coca_query_zero_is_the_embedding_and_the_other_queries_are_memory(one_thread):
    m = _coca("attn")
    b = _batch(m.cfg.image_size)
    out = m.encode_image(b.images)
    full = m.pooler(out["patches"])                                       # (B, 1+Q, Dt) all queries
    assert full.shape[1] == 1 + m.cfg.caption_queries
    _close(out["embed"], F.normalize(m.image_proj(full[:, 0]), dim=-1))
    _close(out["memory"], full[:, 1:])
    _close(m.dense_image_embed(out["patches"]), F.normalize(m.image_proj(m.pooler.dense(out["patches"])), dim=-1))
    _close(m.global_attention(out["patches"], None), m.pooler.query_attention(out["patches"], 0))
    assert m.encode_image(b.images, memory=False)["memory"] is None


@torch.no_grad()
def test_clip_pool_embeds_the_cls_and_uses_every_query_as_memory(one_thread):
    m = _coca("cls")
    b = _batch(m.cfg.image_size)
    out = m.encode_image(b.images)
    _close(out["embed"], F.normalize(m.image_proj(out["cls"]), dim=-1))
    _, _, attn = m.visual(b.images, return_attn="full")                   # (B, 1+N, 1+N)
    full = m.pooler(out["patches"])
    assert full.shape[1] == m.cfg.caption_queries
    _close(out["memory"], full)
    _close(m.dense_image_embed(out["patches"]), F.normalize(m.image_proj(out["patches"]), dim=-1))
    _close(m.global_attention(out["patches"], attn), attn[:, 0, 1:])


@torch.no_grad()
def test_caption_head_reads_only_the_patches_the_ic_mask_keeps_and_follows_needs(one_thread):
    m = _coca("attn")
    b = _batch(m.cfg.image_size)
    keep = torch.tensor([[0, 2, 5], [1, 3, 4], [7, 6, 0]])
    mask = type("M", (), {"keep": keep, "masked": None})()
    f = m.heads(m.encode(b), b, {"ic": mask})
    kept = gather_tokens(f.image_tokens, keep)
    _close(kept[1, 1], f.image_tokens[1, 3])
    want = m.decoder(f.text_tokens, m.pooler(kept)[:, 1:])
    _close(f.caption_logits, want)
    txt = m.encode_text(b.text, b.text_mask)
    _close(f.text_embed, F.normalize(m.text_proj(txt["pooled"]), dim=-1))
    assert m.heads(m.encode(b), b, None, needs={"image_embed"}).caption_logits is None


# ---------------------------------------------------------------- fusion encoder / heads


@torch.no_grad()
def test_sample_without_visible_patch_ignores_the_image(one_thread):
    torch.manual_seed(0)
    enc = FusionEncoder(16, 2, 2, 12, mlp_ratio=2.0).eval()
    for p in enc.parameters():                                             # away from the (zero) init
        p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(3)
    text, image = torch.randn(2, 4, 16, generator=g), torch.randn(2, 5, 12, generator=g)
    tm = torch.ones(2, 4, dtype=torch.bool)
    im = torch.ones(2, 5, dtype=torch.bool)
    im[1] = False                                                          # sample 1: nothing visible
    a = enc(text, tm, image, im)["tokens"]
    b = enc(text, tm, torch.randn(2, 5, 12, generator=g), im)["tokens"]
    _close(a[1], b[1])
    assert not torch.allclose(a[0], b[0], atol=1e-3)                      # sample 0 does read its image
    # no cross-attention at all: the blocks' self-attention + MLP only
    x = text[1:]
    for blk in enc.blocks:
        x = x + blk.attn(blk.ln_1(x))
        x = x + blk.mlp(blk.ln_2(x))
    _close(a[1:], enc.ln_final(x))


@torch.no_grad()
def test_sample_without_real_token_lets_its_rows_see_every_token(one_thread):
    torch.manual_seed(0)
    enc = FusionEncoder(16, 2, 2, 12, mlp_ratio=2.0).eval()
    for p in enc.parameters():
        p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(4)
    text, image = torch.randn(2, 4, 16, generator=g), torch.randn(2, 5, 12, generator=g)
    none = torch.tensor([[True, True, False, False], [False] * 4])
    every = torch.tensor([[True, True, False, False], [True] * 4])
    _close(enc(text, none, image)["tokens"], enc(text, every, image)["tokens"])


@torch.no_grad()
def test_mlm_head_is_dense_gelu_layernorm_decoder():
    torch.manual_seed(0)
    head = MLMHead(8, 11)
    x = torch.randn(3, 8)
    h = x @ head.dense.weight.T + head.dense.bias
    h = 0.5 * h * (1 + torch.erf(h / 2 ** 0.5))
    h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + head.ln.eps)
    h = h * head.ln.weight + head.ln.bias
    _close(head(x), h @ head.decoder.weight.T + head.decoder.bias)


# ---------------------------------------------------------------- FusionModel (ALBEF)


@torch.no_grad()
def test_itm_rows_are_positive_then_negative_text_then_negative_image(one_thread):
    m = _albef()
    b = _batch(m.cfg.image_size)
    f = m.encode(b)
    torch.manual_seed(123)
    f = m.heads(f, b, needs={"itm_logits"})
    sim = (f.image_embed @ f.text_embed.t()) * f.logit_scale
    torch.manual_seed(123)
    neg_txt, neg_img = sample_hard_negatives(sim, b.item_ids)
    assert neg_txt[:2].tolist() == [2, 2] and neg_img[:2].tolist() == [2, 2]   # item 0 -> only sample 2
    cls, tok, mask = f.extras["image_cls"], f.text_tokens, b.text_mask

    def itm(ti, ii):
        return m.itm_head(m.fuse(tok[ti], mask[ti], cls[ii], f.image_tokens[ii])["cls"])
    r = torch.arange(3)
    want = torch.cat([itm(r, r), itm(neg_txt, r), itm(r, neg_img)])
    _close(f.extras["itm_logits"], want)
    assert f.extras["itm_num_pos"] == 3 and "mlm_logits" not in f.extras


@torch.no_grad()
def test_mlm_logits_are_the_fused_masked_text_at_the_masked_positions(one_thread):
    m = _albef()
    b = _batch(m.cfg.image_size)
    f = m.encode(b)
    masked_text = b.text.clone()
    positions = torch.tensor([[0, 3], [1, 2], [2, 6], [2, 1]])
    masked_text[positions[:, 0], positions[:, 1]] = 4
    f = m.heads(f, b, {"mlm": (masked_text, positions)}, needs={"mlm_logits"})
    _, tokens = m.text(masked_text, b.text_mask)
    fused = m.fuse(tokens, b.text_mask, f.extras["image_cls"], f.image_tokens)["tokens"]
    _close(f.extras["mlm_logits"], m.mlm_head(fused[positions[:, 0], positions[:, 1]]))
    assert torch.equal(f.extras["mlm_positions"], positions)


@torch.no_grad()
def test_cross_attention_drops_the_cls_column_and_reads_the_teacher(one_thread):
    for momentum in ("0", "0.9"):
        m = _albef(f"model.momentum={momentum}", "model.queue_size=0", "objectives.itc.distill_alpha=0")
        b = _batch(m.cfg.image_size)
        if m.teacher is not None:                                         # make teacher != student
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        f = m.encode(b)
        att = m.cross_attention(f, b, layer=0)
        if m.teacher is None:
            fusion, (cls, patches), tok = m.fusion, (f.extras["image_cls"], f.image_tokens), f.text_tokens
        else:
            fusion, (cls, patches), tok = m.teacher.module.fusion, f.extras["teacher_image"], f.extras["teacher_text_tokens"]
            t = m.teacher.module
            t_cls, t_patches = t.visual(b.images)
            _close(cls, t_cls)
            _close(f.extras["teacher_image_embed"], F.normalize(t.image_proj(t_cls), dim=-1))
            _close(f.extras["teacher_text_embed"], F.normalize(t.text_proj(t.text(b.text, b.text_mask)[0]), dim=-1))
        full = fusion(tok, b.text_mask, torch.cat([cls[:, None], patches], 1), attn_layers=[0])
        assert att.shape == (3, 8, patches.shape[1])
        _close(att, full["attn"][0][..., 1:])
        assert torch.all(att[1, 5:] == 0)                                 # PAD rows
        if m.teacher is not None:
            _close(f.extras["teacher_fused_text"], full["tokens"])
            assert not torch.allclose(f.extras["teacher_image_embed"], f.image_embed, atol=1e-3)


def test_momentum_update_enqueues_this_steps_teacher_embeddings_in_order(one_thread):
    m = _albef("model.momentum=0.5", "model.queue_size=16").train()
    S = m.cfg.image_size
    b1, b2 = _batch(S, seed=1), _batch(S, seed=2)
    f1, f2 = m.encode(b1), m.encode(b2)                                   # two micro-batches, one step
    m.eval()
    m.encode(b1)                                                          # eval pass: nothing pending
    m.train()
    with torch.no_grad():
        m.encode(b2)                                                      # no-grad pre-pass: nothing pending
    assert f1.extras["queue_image_embed"].shape == (0, m.cfg.embed_dim)
    t_before = m.teacher.module.image_proj.weight.clone()
    with torch.no_grad():
        m.image_proj.weight.add_(1.0)
    m.momentum_update()
    _close(m.teacher.module.image_proj.weight, 0.5 * t_before + 0.5 * m.image_proj.weight.detach())
    img = torch.cat([f1.extras["teacher_image_embed"], f2.extras["teacher_image_embed"]])
    txt = torch.cat([f1.extras["teacher_text_embed"], f2.extras["teacher_text_embed"]])
    _close(m.queues["image"].get(), img)
    _close(m.queues["text"].get(), txt)
    m.momentum_update()                                                   # nothing pending: unchanged
    assert len(m.queues["image"]) == 6
    f3 = m.encode(b1)
    _close(f3.extras["queue_text_embed"], txt)
    m.momentum_update(gather=lambda x: [x, -x])                           # rank order: rank 0 then rank 1
    q = m.queues["image"].get()
    _close(q[6:], torch.cat([f3.extras["teacher_image_embed"], -f3.extras["teacher_image_embed"]]))


# ---------------------------------------------------------------- momentum


def test_teacher_in_another_dtype_still_follows_the_ema():
    torch.manual_seed(0)
    s = torch.nn.Linear(3, 2)
    t = MomentumTeacher(s, momentum=0.75)
    t.module.double()
    before = t.module.weight.clone()
    with torch.no_grad():
        s.weight.add_(2.0)
    t.update()
    assert t.module.weight.dtype == torch.float64
    torch.testing.assert_close(t.module.weight, 0.75 * before + 0.25 * s.weight.detach().double())


if __name__ == "__main__":
    pytest.main([__file__, "-q"])


def test_queue_counts_every_row_written_even_past_its_size_and_reloads_the_pointer():
    """``count`` is rows ever written (a 5-row batch into 3 slots counts 5), not rows kept; the pointer
    lands where the last kept row ended, and a reloaded queue continues from it."""
    q = FeatureQueue(dim=1, size=3)
    q.enqueue(torch.arange(5.0)[:, None])                  # keeps rows 2, 3, 4
    assert int(q.count) == 5 and len(q) == 3
    assert q.get().flatten().tolist() == [2.0, 3.0, 4.0]
    fresh = FeatureQueue(dim=1, size=3)
    fresh.load_state_dict(q.state_dict())
    fresh.enqueue(torch.tensor([[7.0]]))                   # overwrites the oldest (2)
    assert fresh.get().flatten().tolist() == [3.0, 4.0, 7.0] and int(fresh.count) == 6
