"""Exact checks of what tests/test_pipeline_exact.py and tests/test_decode_exact.py leave loose:

* ITM hard negatives (models/negatives.py): draw frequencies equal softmax(sim) over the valid columns (no
  extra temperature, not uniform), the item_ids shape check, fallback ties at the lowest index.
* Attentional pooler: the whole forward by hand (LayerNormed queries and keys, per-head softmax, proj, LN),
  a query subset gives exactly those rows, ``query_attention(q)`` reads query q.
* Caption decoder block check; image decoder shape rules (``decoder_shape``), config wiring
  (``mim_text``, ``mim_text_from``), output order = ``masked`` order, text-less rows gated to no text,
  partition / missing-text errors.
* PTA head: patches LayerNormed first (affine invariance), MLP 2C -> C/2 -> C/4 -> 2 with GELUs, width >= 4.
* Prototype head: hidden 4 * in_dim by default, prototypes normalised per row, GELU layout, K >= 2.
* Factory: every validation rule, maccap needs the whole config, ``count_parameters(trainable_only)``.
* Image transform: F / I;16 scaling, EXIF mirror, int and torch.Generator seeds, centre crop of odd
  margins, random-crop geometry (inclusive offsets, log-uniform ratio, area range, ratio range), eval
  resample is bicubic, jitter draw protocol (crop, b, c, order) and ranges, empty images, denormalize
  clamp, ``accepts_boxes`` flag.
"""
from __future__ import annotations

import dataclasses
import io
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from finealign.config import ConfigError, ModelConfig
from finealign.data.transforms import (ImageTransform, _brightness, _contrast, accepts_boxes, center_crop_box,
                                       denormalize, normalize, pil_to_tensor, random_resized_crop_box, to_rgb)
from finealign.models.decoder import MultimodalDecoder
from finealign.models.factory import build_model, count_parameters, validate_model_config
from finealign.models.heads import AttentionalPooler
from finealign.models.image_decoder import ImageDecoder, build_image_decoder, decoder_shape
from finealign.models.negatives import sample_hard_negatives
from finealign.models.prototypes import PrototypeHead
from finealign.models.pta import PTAHead

from test_pipeline_exact import _decoder     # a 1-layer image decoder with large random weights

# ---------------------------------------------------------------- hard negatives


def test_negative_draws_follow_softmax_of_the_valid_columns_exactly(one_thread):
    """Row 0: columns 1, 2 valid with logits 0 and ln 3 -> P(2) = 3 / 4 (not 1/2 uniform, not a tempered
    softmax). Column 0 (texts draw images from sim.t()): rows 1, 2 with logits ln 4, 0 -> P(1) = 4 / 5."""
    sim = torch.tensor([[50.0, 0.0, math.log(3.0)], [math.log(4.0), 50.0, 0.0], [0.0, 0.0, 50.0]])
    g = torch.Generator().manual_seed(0)
    n, t2, i1 = 3000, 0, 0
    for _ in range(n):
        nt, ni = sample_hard_negatives(sim, torch.arange(3), generator=g)
        t2 += int(nt[0] == 2)
        i1 += int(ni[0] == 1)
    assert abs(t2 / n - 0.75) < 0.03 and abs(i1 / n - 0.8) < 0.03


def test_negative_item_ids_shape_is_checked_and_fallback_ties_take_the_lowest_index():
    with pytest.raises(ValueError, match=r"item_ids must be \(3,\)"):
        sample_hard_negatives(torch.zeros(3, 3), torch.zeros(2, dtype=torch.long))
    nt, ni = sample_hard_negatives(torch.ones(3, 3), torch.zeros(3, dtype=torch.long))   # one item, all ties
    assert nt.tolist() == ni.tolist() == [1, 0, 0]


# ---------------------------------------------------------------- attentional pooler


def _by_hand(pool, tokens, rows):
    """LN queries (rows) attend to LN tokens: per head softmax(q k / sqrt(dh)) v, heads concatenated, proj, LN."""
    a = pool.attn
    H, dh = a.heads, a.head_dim
    D = H * dh
    q = a.q(pool.ln_q(pool.query[rows]))                                  # (Q, D)
    kv = a.kv(pool.ln_kv(tokens))                                         # (B, N, 2D)
    k, v = kv[..., :D], kv[..., D:]
    outs, atts = [], []
    for h in range(H):
        sl = slice(h * dh, (h + 1) * dh)
        att = torch.softmax(q[None, :, sl] @ k[..., sl].transpose(1, 2) / math.sqrt(dh), dim=-1)   # (B, Q, N)
        atts.append(att)
        outs.append(att @ v[..., sl])
    return pool.ln_out(a.proj(torch.cat(outs, -1))), torch.stack(atts).mean(0)


@torch.no_grad()
def test_pooler_forward_subset_and_query_attention_by_hand(one_thread):
    torch.manual_seed(0)
    pool = AttentionalPooler(dim_q=4, dim_kv=6, n_queries=3, heads=2).eval()
    for p in pool.parameters():
        p.normal_(0.0, 0.7)                                               # LN affine too: every path counts
    tokens = torch.randn(2, 5, 6) * 3 + 1
    want, att = _by_hand(pool, tokens, slice(None))
    assert torch.allclose(pool(tokens), want, atol=1e-5)
    sub = pool(tokens, queries=slice(1, 3))
    assert sub.shape == (2, 2, 4) and torch.allclose(sub, want[:, 1:3], atol=1e-5)
    for q in range(3):
        assert torch.allclose(pool.query_attention(tokens, q), att[:, q], atol=1e-5)


# ---------------------------------------------------------------- caption decoder


def test_caption_decoder_block_must_be_fused_or_open_clip():
    cfg = dataclasses.replace(ModelConfig(), text_width=8, text_heads=2, decoder_layers=1, decoder_block="mlp")
    with pytest.raises(ValueError, match="decoder_block must be 'fused' or 'open_clip'"):
        MultimodalDecoder(cfg, 10)


# ---------------------------------------------------------------- image decoder


def _shape_cfg(**kw):
    base = dict(mim_decoder_heads=0, vision_heads=4, vision_width=48, mim_decoder_scale=1.0, mim_decoder_width=0,
                mim_decoder_layers=2, mlp_ratio=2.0, grad_checkpointing=False, mim_text=True, mim_text_from=0)
    return SimpleNamespace(**{**base, **kw})


def test_decoder_shape_rounds_to_the_nearest_head_multiple_with_at_least_one_head():
    assert decoder_shape(_shape_cfg(mim_decoder_heads=3, mim_decoder_scale=0.5)) == (24, 3)   # own heads win
    assert decoder_shape(_shape_cfg(vision_width=40, mim_decoder_heads=3, mim_decoder_scale=0.5)) == (21, 3)  # 6.67 -> 7
    assert decoder_shape(_shape_cfg(vision_width=4, vision_heads=2, mim_decoder_scale=0.25)) == (2, 2)  # 0 -> 1 head


def test_build_image_decoder_wires_mim_text_and_text_from():
    dec = build_image_decoder(_shape_cfg(mim_text_from=1), num_patches=4, patch_dim=3, text_width=8)
    assert dec.has_text and [b.has_cross for b in dec.blocks] == [False, True]
    plain = build_image_decoder(_shape_cfg(mim_text=False), num_patches=4, patch_dim=3, text_width=8)
    assert not plain.has_text and not any(b.has_cross for b in plain.blocks)
    assert not any(b.has_cross for b in ImageDecoder(4, 4, 8, 2, 2, 3, text_width=5, text_from=2).blocks)
    with pytest.raises(ValueError, match=r"text_from=3 must be in \[0, 2\]"):
        ImageDecoder(4, 4, 8, 2, 2, 3, text_width=5, text_from=3)


@torch.no_grad()
def test_image_decoder_output_order_and_text_less_rows(one_thread):
    dec = _decoder()
    vis, text = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    keep, masked = torch.tensor([[0, 2, 5], [1, 3, 4]]), torch.tensor([[1, 3, 4], [0, 2, 5]])
    tmask = torch.tensor([[True, True, False], [False, False, False]])   # row 1 has no real token
    base = dec(vis, keep, masked, text, tmask)
    perm = [2, 0, 1]
    assert torch.allclose(dec(vis, keep, masked[:, perm], text, tmask), base[:, perm], atol=1e-5)
    off = dec(vis, keep, masked, text, tmask, use_text=False)
    assert torch.isfinite(base).all()
    assert torch.allclose(base[1], off[1], atol=1e-5)                   # no real token: no text at all
    assert not torch.allclose(base[0], off[0], atol=1e-3)
    with pytest.raises(ValueError, match="must partition"):
        dec(vis[:, :2], keep[:, :2], masked, text, tmask)
    with pytest.raises(ValueError, match="pass text_tokens"):
        dec(vis, keep, masked)


# ---------------------------------------------------------------- PTA head


@torch.no_grad()
def test_pta_layer_norms_patches_and_has_the_documented_mlp(one_thread):
    torch.manual_seed(0)
    head = PTAHead(vision_width=4, text_width=3, width=8).eval()
    patches, text = torch.randn(2, 5, 4), torch.randn(2, 3)
    scale = torch.tensor([3.0, 0.5])[:, None, None]
    assert torch.allclose(head(patches * scale + 2.0, text), head(patches, text), atol=1e-4)  # per-patch LN
    kinds = [type(m) for m in head.mlp]
    assert kinds == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert [(m.in_features, m.out_features) for m in head.mlp if isinstance(m, nn.Linear)] == [(16, 4), (4, 2), (2, 2)]
    PTAHead(4, 3, 4)
    with pytest.raises(ValueError, match="PTA width must be >= 4"):
        PTAHead(4, 3, 3)


# ---------------------------------------------------------------- prototype head


@torch.no_grad()
def test_prototype_rows_are_normalised_and_layout_defaults(one_thread):
    torch.manual_seed(0)
    head = PrototypeHead(in_dim=5, num_prototypes=3, bottleneck=2)
    assert head.mlp[0].out_features == 20                               # hidden = 4 * in_dim
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    head.prototypes.weight.copy_(torch.tensor([[3.0, 4.0], [2.0, 0.0], [0.0, 0.5]]))
    x = torch.randn(4, 5)
    unit_rows = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(head(x), F.normalize(head.mlp(x), dim=-1) @ unit_rows.t(), atol=1e-6)
    PrototypeHead(4, 2)
    with pytest.raises(ValueError, match="at least 2 prototypes"):
        PrototypeHead(4, 1)


# ---------------------------------------------------------------- factory


@pytest.mark.parametrize("over, vocab, match", [
    (dict(vision_heads=0), 10, r"model\.vision_width \(128\) must be divisible by model\.vision_heads \(0\)"),
    (dict(image_size=30), 10, r"model\.image_size \(30\) must be a multiple of model\.patch_size \(4\)"),
    (dict(image_pool="mean"), 10, "model.image_pool must be 'attn' or 'cls'"),
    (dict(caption_queries=0), 10, "caption_queries must be > 0"),
    (dict(), 0, r"vocabulary size must be > 0"),
])
def test_validate_model_config_rules(over, vocab, match):
    with pytest.raises(ConfigError, match=match):
        validate_model_config(dataclasses.replace(ModelConfig(), **over), vocab)


def test_factory_dispatch_errors_and_trainable_count():
    validate_model_config(dataclasses.replace(ModelConfig(), caption_queries=0, decoder_layers=0), 10)   # fine
    with pytest.raises(ValueError, match="built from the whole config and the tokenizer"):
        build_model(dataclasses.replace(ModelConfig(), arch="maccap"), 10)
    m = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    m[0].requires_grad_(False)
    assert (count_parameters(m), count_parameters(m, trainable_only=True)) == (13, 4)


# ---------------------------------------------------------------- decoding to RGB


def test_float_and_16_bit_images_scale_to_8_bit():
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), mode="F")          # max 1.0 -> * 255
    assert np.asarray(to_rgb(f))[0, :, 0].tolist() == [0, 128, 255]
    f = Image.fromarray(np.array([[2.0, np.inf, np.nan, -np.inf, 300.0]], np.float32), mode="F")
    assert np.asarray(to_rgb(f))[0, :, 0].tolist() == [2, 255, 0, 0, 255]            # clipped, inf -> 255
    i16 = Image.fromarray(np.array([[60000, 65535, 0]], np.uint16))                  # 60000 / 257 = 233.46
    assert np.asarray(to_rgb(i16))[0, :, 0].tolist() == [233, 255, 0]


def test_exif_mirror_orientation_is_applied():
    a = np.zeros((1, 2, 3), np.uint8)
    a[0, 0], a[0, 1] = (255, 0, 0), (0, 0, 255)
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 2                                                    # mirrored left-right
    buf = io.BytesIO()
    img.save(buf, "PNG", exif=exif.tobytes())
    out = np.asarray(to_rgb(Image.open(io.BytesIO(buf.getvalue()))))
    assert out[0, 0].tolist() == [0, 0, 255] and out[0, 1].tolist() == [255, 0, 0]


def test_empty_image_is_refused():
    with pytest.raises(ValueError, match="empty image of size 0x4"):
        ImageTransform(4, train=False)(Image.new("RGB", (0, 4)))


# ---------------------------------------------------------------- crop geometry


def test_centre_crop_of_an_odd_margin_is_fractional():
    assert center_crop_box(7, 4) == (1.5, 0.0, 5.5, 4.0)
    assert center_crop_box(3, 6) == (0.0, 1.5, 3.0, 4.5)


def test_random_crop_offsets_cover_both_ends_inclusive():
    """A 4 x 4 crop (scale 1/2, ratio 1) of a 4 x 8 image fits at once: y0 uniform on 0..4, x0 = 0."""
    ys = {random_resized_crop_box(4, 8, random.Random(s), (0.5, 0.5), (1.0, 1.0)) for s in range(60)}
    assert ys == {(0, y, 4, y + 4) for y in range(5)}
    xs = {random_resized_crop_box(8, 4, random.Random(s), (0.5, 0.5), (1.0, 1.0))[0] for s in range(60)}
    assert xs == set(range(5))


def test_random_crop_area_and_ratio_ranges():
    rnd = random.Random(0)
    boxes = [random_resized_crop_box(1000, 1000, rnd, (0.25, 0.3), (1.5, 2.0)) for _ in range(200)]
    areas = [(x1 - x0) * (y1 - y0) / 1e6 for x0, y0, x1, y1 in boxes]
    ratios = [(x1 - x0) / (y1 - y0) for x0, y0, x1, y1 in boxes]
    assert 0.249 < min(areas) < 0.26 and 0.29 < max(areas) < 0.301
    assert 1.49 < min(ratios) < 1.55 and 1.95 < max(ratios) < 2.01
    # ratio drawn log-uniformly in [1/4, 4]: as many wide as tall crops (uniform would give ~80 % wide)
    boxes = [random_resized_crop_box(1000, 1000, rnd, (0.01, 0.01), (0.25, 4.0)) for _ in range(400)]
    wide = sum((x1 - x0) > (y1 - y0) for x0, y0, x1, y1 in boxes) / 400
    assert 0.42 < wide < 0.58


# ---------------------------------------------------------------- transform randomness


def _pattern(w=8, h=8, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_eval_resample_is_one_bicubic_resize_of_the_centre_crop():
    img = _pattern(10, 8)
    want = normalize(pil_to_tensor(img.resize((4, 4), Image.Resampling.BICUBIC, box=(1.0, 0.0, 9.0, 8.0))))
    assert torch.allclose(ImageTransform(4, train=False)(img), want, atol=1e-6)


def test_int_seed_is_a_random_seed_and_generators_differ_by_seed():
    t, img = ImageTransform(6, train=True), _pattern(12, 10)
    assert torch.equal(t(img, 5), t(img, random.Random(5)))
    outs = [t(img, torch.Generator().manual_seed(s)) for s in range(4)]
    assert not all(torch.equal(outs[0], o) for o in outs[1:])


def test_jitter_replays_crop_then_b_then_c_then_order(one_thread):
    """Square image, scale = ratio = 1: the crop draws (area, log-ratio, x0, y0) are fixed and hflip = 0 draws
    nothing; then b, c ~ U[0.8, 1.2] and the order (brightness first when random() < 0.5). Values 0.2 / 0.9
    clamp at b > 1.11, so the two orders give different images."""
    a = np.full((4, 4, 3), 51, np.uint8)
    a[:, 2:] = 230
    img = Image.fromarray(a)
    t = ImageTransform(4, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter=0.2)
    x = pil_to_tensor(img)
    orders, bs = set(), []
    for seed in range(16):
        r = random.Random(seed)
        r.uniform(1.0, 1.0), r.uniform(0.0, 0.0), r.randint(0, 0), r.randint(0, 0)
        b, c = r.uniform(0.8, 1.2), r.uniform(0.8, 1.2)
        first = r.random() < 0.5
        y = _contrast(_brightness(x.clone(), b), c) if first else _brightness(_contrast(x.clone(), c), b)
        assert torch.allclose(t(img, seed), normalize(y), atol=1e-6)
        orders.add(first)
        bs.append(b)
    assert orders == {True, False} and min(bs) < 0.9 and max(bs) > 1.1


def test_denormalize_clamps_and_accepts_boxes_flag_wins():
    assert torch.equal(denormalize(torch.full((3, 1, 1), 100.0)), torch.ones(3, 1, 1))
    assert torch.equal(denormalize(torch.full((3, 1, 1), -100.0)), torch.zeros(3, 1, 1))

    class NoBoxes:
        accepts_boxes = False

        def __call__(self, img, rng=None, boxes=None):
            return img

    assert not accepts_boxes(NoBoxes())


def test_premultiplied_la_composites_like_its_la_source():
    """"La" (premultiplied luminance + alpha) is listed as handled but PIL has no La -> RGBA conversion: it
    raised. It must give the LA image's composite on white: grey 100 opaque stays 100, grey 100 at alpha
    128 becomes 100·128/255 + 255·127/255 ≈ 177, fully transparent becomes white."""
    la = Image.new("LA", (3, 1))
    for x, px in enumerate([(100, 255), (100, 128), (100, 0)]):
        la.putpixel((x, 0), px)
    got = np.asarray(to_rgb(la.convert("La"))).astype(int)
    assert np.abs(got - np.asarray(to_rgb(la)).astype(int)).max() <= 1
    assert np.abs(got[0, :, 0] - [100, 177, 255]).max() <= 1 and (got == got[..., :1]).all()
