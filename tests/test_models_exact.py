"""Exact behaviour of the transformer building blocks and the two towers, against hand-written references.

Pins: multi-head attention written out per head (scale 1/sqrt(Dh), head split, masks, the explicit-weights
path, cross-attention projections, grouped memory with a mask), the causal mask of ``step_mask`` and the
top-left causal mask of the half-precision kernels, the KV cache's bookkeeping (``set`` vs ``append``,
capacity doubling, nested reorder), activations / MLP width, the pre-LN block wiring (incl. the cross gate
and the returned weights), ``pool_tokens``, checkpointed blocks, ``init_weights``; the ViT's patchify order,
positional embeddings, cls, ``keep``, ``ln_pre``, attention maps and ``hidden_at``; the text tower's cls /
eos / mean pooling and bidirectional mode against unpadded references. Tiny float64 modules, one thread.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from finealign.config_schema import ModelConfig
from finealign.models.half_attention import attention_weights, fp32_softmax_attention, half_attention
from finealign.models.layers import (ACTIVATIONS, MLP, Attention, Block, KVCache, init_weights, pool_tokens,
                                     quick_gelu, reorder_caches, run_block, set_low_precision_attention,
                                     step_mask)
from finealign.models.text import TextEncoder
from finealign.models.vision import VisionTransformer

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = ModelConfig(image_size=8, patch_size=2, vision_width=8, vision_layers=2, vision_heads=2, text_width=8,
                  text_layers=2, text_heads=2, context_length=8)


def _randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter (LayerNorms and biases included) random, float64, eval."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module.double().eval()


def ref_attention(att: Attention, x, context=None, allowed=None):
    """Per-head softmax(q k^T / sqrt(Dh)) v, then the output projection; allowed (B, L, S) bool."""
    B, L, D = x.shape
    H, Dh = att.heads, D // att.heads
    if att.cross:
        q = F.linear(x, att.q.weight, att.q.bias)
        kv = F.linear(context, att.kv.weight, att.kv.bias)
        k, v = kv[..., :D], kv[..., D:]
    else:
        qkv = F.linear(x, att.qkv.weight, att.qkv.bias)
        q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
    out, weights = torch.zeros_like(q), torch.zeros(B, H, L, k.shape[1], dtype=x.dtype)
    for h in range(H):
        sl = slice(h * Dh, (h + 1) * Dh)
        s = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(Dh)
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        weights[:, h] = s.softmax(-1)
        out[..., sl] = weights[:, h] @ v[..., sl]
    return F.linear(out, att.proj.weight, att.proj.bias), weights


def _close(a, b, tol=1e-9):
    return torch.allclose(a, b, atol=tol, rtol=0)


# ---------------------------------------------------------------- attention


def test_self_attention_equals_per_head_reference_with_masks_causal_and_weights():
    att = _randomise(Attention(8, 2))
    x = torch.randn(2, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert _close(att(x), ref_attention(att, x)[0])
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    assert _close(att(x, is_causal=True), ref_attention(att, x, allowed=causal.expand(2, 4, 4))[0])
    pad = torch.tensor([[True, True, False, True], [True, False, False, False]])[:, None, :].expand(2, 4, 4)
    want, w = ref_attention(att, x, allowed=pad)
    assert _close(att(x, mask=pad[:, None]), want)
    y, got_w = att(x, mask=pad[:, None], need_weights=True)
    assert _close(y, want) and _close(got_w, w) and got_w.shape == (2, 2, 4, 4)
    # an explicit mask wins over is_causal (fp32 SDPA and the CPU half-precision kernels alike)
    assert _close(att(x, mask=pad[:, None], is_causal=True), want)
    att16 = Attention(8, 2)
    att16.load_state_dict(att.state_dict())
    att16 = att16.bfloat16()
    got16 = att16(x.bfloat16(), mask=pad[:, None], is_causal=True).double()
    assert torch.allclose(got16, want, atol=0.15)
    assert not torch.allclose(got16, ref_attention(att, x, allowed=causal.expand(2, 4, 4))[0], atol=0.15)


def test_cross_attention_projections_weights_memory_index_and_errors():
    att = _randomise(Attention(8, 2, kv_dim=6, cross=True), seed=2)
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 3, 8, dtype=torch.float64, generator=g), torch.randn(2, 5, 6, dtype=torch.float64, generator=g)
    allowed = torch.rand(2, 3, 5, generator=g) < 0.6
    allowed[..., 0] = True
    want, w = ref_attention(att, x, ctx, allowed)
    y, got_w = att(x, context=ctx, mask=allowed[:, None], need_weights=True)
    assert _close(att(x, context=ctx, mask=allowed[:, None]), want) and _close(y, want) and _close(got_w, w)
    idx = torch.tensor([1, 0, 1])
    assert _close(att.project_memory(ctx, idx), att.project_memory(ctx[idx]))
    kv = att.project_memory(ctx)
    assert kv.shape == (2, 2, 2, 5, 4)                                  # (2, Bm, H, S, Dh)
    assert _close(kv[1, :, 1, 0], F.linear(ctx, att.kv.weight, att.kv.bias)[:, 0, 12:16])   # v, head 1, pos 0
    # grouped memory (3 query rows per memory row) with a mask: same as the repeated memory
    xg = torch.randn(6, 3, 8, dtype=torch.float64, generator=g)
    m = torch.rand(6, 1, 3, 5, generator=g) < 0.7
    m[..., 0] = True
    assert _close(att(xg, context=ctx, mask=m), att(xg, context=ctx.repeat_interleave(3, 0), mask=m))
    with pytest.raises(ValueError):
        att(torch.randn(5, 3, 8, dtype=torch.float64), context=ctx)     # 5 rows do not split over 2
    with pytest.raises(ValueError):
        Attention(6, 4)
    sa = _randomise(Attention(8, 2))
    cache = KVCache()
    sa(x, cache=cache)
    with pytest.raises(ValueError):                                     # self-attention never groups: the cache
        sa(torch.randn(4, 1, 8, dtype=torch.float64), cache=cache)     # refuses rows of another batch


def test_causal_masks_are_top_left_and_step_mask_offsets_queries():
    assert step_mask(1, 5, torch.device("cpu")) is None
    assert torch.equal(step_mask(2, 3, torch.device("cpu")).int(),
                       torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]))
    assert torch.equal(step_mask(3, 0, torch.device("cpu")).int(), torch.ones(3, 3, dtype=torch.int).tril())
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 1, n, 4, generator=g) for n in (2, 3, 3))
    w = attention_weights(q, k, None, True)[0, 0]
    assert torch.equal(w[0, 1:], torch.zeros(2)) and w[1, 2] == 0 and w[1, 1] > 0     # top-left, not bottom-right
    s = (q @ k.transpose(-2, -1))[0, 0] / 2.0                                          # 1/sqrt(4)
    assert torch.allclose(attention_weights(q, k, None, False)[0, 0], s.softmax(-1), atol=1e-6)
    want = torch.stack([v[0, 0, 0], (s[1, :2].softmax(-1)[:, None] * v[0, 0, :2]).sum(0)])
    for attend in (half_attention, fp32_softmax_attention):
        out = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, True)[0, 0].float()
        assert torch.allclose(out, want, atol=0.05), attend


def test_set_low_precision_attention_reaches_every_attention_and_back():
    blk = Block(8, 2, cross_dim=4)
    set_low_precision_attention(nn.Sequential(blk), True)
    assert blk.attn.low_precision and blk.cross_attn.low_precision and not Attention.low_precision
    set_low_precision_attention(blk, False)
    assert not blk.attn.low_precision and not blk.cross_attn.low_precision


# ---------------------------------------------------------------- KV cache


def test_kv_cache_set_append_capacity_and_nested_reorder():
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(3, 2, 4, 2, generator=g), torch.randn(3, 2, 4, 2, generator=g)
    fixed = KVCache()
    assert len(fixed) == 0 and not fixed.filled
    fixed.set(k, v)
    assert len(fixed) == 4 and fixed.filled
    with pytest.raises(ValueError):
        fixed.append(k, v)
    grown = KVCache(capacity=3)
    grown.append(k[:, :, :2], v[:, :, :2])
    assert grown._buf.shape[0] == 3                                     # the requested capacity
    grown.append(k[:, :, 2:3], v[:, :, 2:3])
    grown.append(k[:, :, 3:], v[:, :, 3:])
    assert grown._buf.shape[0] == 6 and len(grown) == 4                 # doubled when exceeded
    assert torch.equal(grown.k, k) and torch.equal(grown.v, v)
    with pytest.raises(ValueError):
        grown.append(torch.randn(2, 2, 1, 2), torch.randn(2, 2, 1, 2))  # other batch size
    big = KVCache(capacity=2)
    big.append(k, v)
    assert big._buf.shape[0] == 4
    rows = torch.tensor([2, 0, 0])
    reorder_caches({"a": [fixed], "b": (grown, {"c": big})}, rows)
    for c in (fixed, grown, big):
        assert torch.equal(c.k, k[rows]) and torch.equal(c.v, v[rows])
    want, want_v = k[rows], v[rows]
    for rows2 in ([1, 2, 0], [2, 2, 1], [0, 2, 1], [1, 1, 0, 2]):     # double buffering, then a batch of 4
        grown.reorder(torch.tensor(rows2))
        want, want_v = want[rows2], want_v[rows2]
        assert torch.equal(grown.k, want) and torch.equal(grown.v, want_v)


# ---------------------------------------------------------------- MLP, block, pooling, init


def test_activations_and_mlp_width():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    assert torch.allclose(quick_gelu(x), x / (1 + torch.exp(-1.702 * x)))
    tanh = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    assert torch.allclose(ACTIVATIONS["gelu_tanh"](x), tanh)
    assert torch.allclose(ACTIVATIONS["gelu"](x), 0.5 * x * (1 + torch.erf(x / math.sqrt(2))))
    mlp = _randomise(MLP(6, 2.5, act="quick_gelu"))
    assert mlp.fc.out_features == 15 and mlp.proj.in_features == 15
    xx = torch.randn(2, 6, dtype=torch.float64)
    assert _close(mlp(xx), mlp.proj(quick_gelu(mlp.fc(xx))))
    with pytest.raises(ValueError):
        MLP(4, act="relu")


def test_block_wiring_gate_and_returned_weights():
    blk = _randomise(Block(8, 2, mlp_ratio=2.0, cross_dim=6, self_mlp=True), seed=6)
    g = torch.Generator().manual_seed(7)
    x, ctx = torch.randn(2, 3, 8, dtype=torch.float64, generator=g), torch.randn(2, 4, 6, dtype=torch.float64, generator=g)
    gate = torch.tensor([0.0, 0.5], dtype=torch.float64)[:, None, None]
    causal = torch.ones(3, 3, dtype=torch.bool).tril()
    a, w_self = ref_attention(blk.attn, blk.ln_1(x), allowed=causal.expand(2, 3, 3))
    h = x + a
    h = h + blk.mlp_s(blk.ln_s(h))
    c, w_cross = ref_attention(blk.cross_attn, blk.ln_x(h), blk.ln_kv(ctx))
    h = h + c * gate
    want = h + blk.mlp(blk.ln_2(h))
    assert _close(blk(x, context=ctx, is_causal=True, cross_gate=gate), want)
    y, w = blk(x, context=ctx, mask=causal, need_weights=True, cross_gate=gate)
    assert _close(y, want) and _close(w, w_self)
    y, w = blk(x, context=ctx, is_causal=True, need_cross_weights=True, cross_gate=gate)
    assert _close(y, want) and _close(w, w_cross)
    cache = KVCache()
    blk(x, context=ctx, is_causal=True, cross_cache=cache)
    assert _close(blk(x, is_causal=True, cross_cache=cache, cross_gate=gate), want)   # memory from the cache
    plain = _randomise(Block(8, 2, mlp_ratio=1.0), seed=8)
    h = x + ref_attention(plain.attn, plain.ln_1(x))[0]
    assert _close(plain(x), h + plain.mlp(plain.ln_2(h)))
    # checkpointed: same output and gradients, keyword arguments passed through
    xr = x.clone().requires_grad_()
    run_block(plain, xr, True, mask=causal).sum().backward()
    g_ck = xr.grad.clone()
    xr.grad = None
    out = run_block(plain, xr, False, mask=causal)
    out.sum().backward()
    assert _close(run_block(plain, x, True, mask=causal), out.detach()) and _close(g_ck, xr.grad)


def test_pool_tokens_by_hand():
    x = torch.arange(24, dtype=torch.float64).view(2, 4, 3)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    assert torch.equal(pool_tokens(x, mask, "cls"), x[:, 0])
    assert torch.equal(pool_tokens(x, mask, "eos"), torch.stack([x[0, 2], x[1, 0]]))
    assert torch.equal(pool_tokens(x, None, "eos"), x[:, 3])
    assert torch.equal(pool_tokens(x, torch.zeros(2, 4, dtype=torch.bool), "eos"), x[:, 0])   # clamped at 0
    assert torch.allclose(pool_tokens(x, mask, "mean"), torch.stack([x[0, :3].mean(0), x[1, 0]]))
    assert torch.allclose(pool_tokens(x, None, "mean"), x.mean(1))
    assert torch.equal(pool_tokens(x, torch.zeros(2, 4, dtype=torch.bool), "mean"), torch.zeros(2, 3, dtype=x.dtype))
    with pytest.raises(ValueError):
        pool_tokens(x, mask, "max")


def test_init_weights():
    torch.manual_seed(0)
    lin, emb, ln = nn.Linear(200, 300), nn.Embedding(300, 200), nn.LayerNorm(5)
    with torch.no_grad():
        ln.weight.fill_(3.0)
        ln.bias.fill_(2.0)
    for m in (lin, emb, ln):
        init_weights(m)
    assert lin.weight.abs().max() <= 0.04 and 0.015 < lin.weight.std() < 0.02 and torch.all(lin.bias == 0)
    assert 0.019 < emb.weight.std() < 0.021 and emb.weight.abs().max() > 0.05     # plain normal, not truncated
    assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)


# ---------------------------------------------------------------- vision tower


def _vit(**over):
    return _randomise(VisionTransformer(dataclasses.replace(CFG, **over)), seed=9)


def _vit_reference(vit, images, keep=None):
    """Tokens by hand, then the blocks; returns (tokens before ln_post, per-block outputs)."""
    B, p, G = images.shape[0], vit.patch_size, vit.grid
    patches = torch.stack([images[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p].reshape(B, -1)
                           for r in range(G) for c in range(G)], 1)           # raster order, (C, p, p)
    x = vit.patch_embed(patches) + vit.pos_embed[:, 1:]
    if keep is not None:
        x = torch.stack([x[b, keep[b]] for b in range(B)])
    x = torch.cat([(vit.cls_token + vit.pos_embed[:, :1]).expand(B, -1, -1), x], 1)
    if vit.ln_pre is not None:
        x = vit.ln_pre(x)
    outs = []
    for blk in vit.blocks:
        x = blk(x)
        outs.append(x)
    return x, outs


def test_vit_patchify_tokens_keep_ln_pre_and_hidden_at():
    with pytest.raises(ValueError):
        VisionTransformer(dataclasses.replace(CFG, image_size=9))
    g = torch.Generator().manual_seed(10)
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=g)
    for ln_pre in (False, True):
        vit = _vit(vision_ln_pre=ln_pre)
        assert (vit.ln_pre is not None) == ln_pre
        x, outs = _vit_reference(vit, images)
        y = vit.ln_post(x)
        cls, patches = vit(images)
        assert _close(cls, y[:, 0]) and _close(patches, y[:, 1:])
        c2, p2, hidden = vit(images, hidden_at=0)
        assert _close(c2, y[:, 0]) and _close(p2, y[:, 1:]) and _close(hidden, outs[0][:, 1:])
    assert torch.equal(vit.patchify(images)[:, 5], images[:, :, 2:4, 2:4].reshape(2, 12))   # row 1, col 1
    keep = torch.tensor([[5, 0, 15], [3, 12, 1]])
    x, _ = _vit_reference(vit, images, keep)
    cls, patches = vit(images, keep=keep)
    assert patches.shape == (2, 3, 8) and _close(patches, vit.ln_post(x)[:, 1:]) and _close(cls, vit.ln_post(x)[:, 0])
    with pytest.raises(ValueError):
        vit(torch.randn(1, 3, 8, 6, dtype=torch.float64))
    with pytest.raises(ValueError):
        vit(images, return_attn=True, hidden_at=0)


def test_vit_attention_maps_from_the_last_block():
    vit = _vit()
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    _, outs = _vit_reference(vit, images)
    last = vit.blocks[-1]
    _, w = ref_attention(last.attn, last.ln_1(outs[-2]))                   # (B, H, 17, 17)
    cls_w = w[:, :, 0, 1:]
    want = (cls_w / cls_w.sum(-1, keepdim=True)).mean(1)
    cls, patches, attn = vit(images, return_attn=True)
    assert _close(attn, want) and _close(patches, vit.ln_post(outs[-1])[:, 1:])
    assert _close(vit(images, return_attn="full")[2], w.mean(1))
    assert _close(vit.cls_attention(images), want)


# ---------------------------------------------------------------- text tower


def _text(**over):
    return _randomise(TextEncoder(dataclasses.replace(CFG, **over), vocab_size=20), seed=12)


TEXT = torch.tensor([[1, 5, 6, 7, 2, 0], [1, 8, 2, 0, 0, 0]])
LENS = [5, 3]


def test_text_cls_pool_sees_exactly_the_real_tokens_and_tokens_are_causal():
    enc = _text()
    assert enc.cls_emb is not None
    pooled, tokens = enc(TEXT, TEXT != 0)
    assert tokens.shape == (2, 6, 8)
    for b, n in enumerate(LENS):
        x = torch.cat([enc._embed(TEXT[b:b + 1, :n]), enc.cls_emb], 1)     # cls after the real tokens, no pos
        for blk in enc.blocks:
            x = blk(x, is_causal=True)
        x = enc.ln_final(x)
        assert _close(pooled[b], x[0, -1]) and _close(tokens[b, :n], x[0, :n])
        assert _close(tokens[b, :n], enc.encode_tokens(TEXT[b:b + 1, :n])[0])
    p_all, t_all = enc(TEXT)                                                 # no mask: every token is real
    x = torch.cat([enc._embed(TEXT), enc.cls_emb.expand(2, -1, -1)], 1)
    for blk in enc.blocks:
        x = blk(x, is_causal=True)
    assert _close(p_all, enc.ln_final(x)[:, -1])
    all_pad = enc(TEXT, torch.zeros(2, 6, dtype=torch.bool))[0]
    assert torch.isfinite(all_pad).all()


@pytest.mark.parametrize("pool", ["eos", "mean"])
def test_text_eos_and_mean_pooling_over_real_tokens(pool):
    enc = _text(text_pool=pool, text_mlp_ratio=2.0)
    assert enc.cls_emb is None and enc.blocks[0].mlp.fc.out_features == 16
    pooled, tokens = enc(TEXT, TEXT != 0)
    for b, n in enumerate(LENS):
        ref = enc.encode_tokens(TEXT[b:b + 1, :n])[0]
        assert _close(tokens[b, :n], ref)
        assert _close(pooled[b], ref[-1] if pool == "eos" else ref.mean(0))
    assert _close(enc(TEXT)[1], enc.encode_tokens(TEXT))
    with pytest.raises(ValueError):
        _text(text_pool="max")


def test_bidirectional_text_sees_every_real_token_and_pools_bos():
    enc = _text(arch="fusion", text_pool="eos")
    assert enc.pool == "cls" and not enc.causal
    pooled, tokens = enc(TEXT, TEXT != 0)
    for b, n in enumerate(LENS):
        x = enc._embed(TEXT[b:b + 1, :n])
        for blk in enc.blocks:
            x = blk(x)
        x = enc.ln_final(x)[0]
        assert _close(tokens[b, :n], x) and _close(pooled[b], x[0])


def test_text_positions_offset_and_context_length():
    enc = _text()
    x = enc._embed(TEXT[:, :2], start_pos=3)
    assert _close(x, enc.tok_embed(TEXT[:, :2]) + enc.pos_embed[:, 3:5])
    with pytest.raises(ValueError):
        enc._embed(TEXT, start_pos=3)                                        # 9 > context_length 8
    full = enc.encode_tokens(TEXT)
    cache = enc.new_cache()
    parts = [enc.forward_step(TEXT[:, :3], cache, 0), enc.forward_step(TEXT[:, 3:4], cache, 3),
             enc.forward_step(TEXT[:, 4:], cache, 4)]
    assert _close(torch.cat(parts, 1), full)
