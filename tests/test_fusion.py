"""FusionEncoder (ALBEF multimodal encoder) and the ITM / MLM heads."""
import copy

import pytest
import torch

from finealign.models.fusion import FusionEncoder, ITMHead, MLMHead

B, T, N, D, DV = 3, 6, 7, 32, 24


def make(layers=2, heads=4, **kw):
    torch.manual_seed(0)
    return FusionEncoder(D, layers, heads, DV, mlp_ratio=2.0, **kw)


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(B, T, D, generator=g)
    image = torch.randn(B, N, DV, generator=g)
    text_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    image_mask = torch.ones(B, N, dtype=torch.bool)
    image_mask[1, [0, 3, 4]] = False
    image_mask[2, 1:] = False
    return text, text_mask, image, image_mask


def test_shapes_and_attn_selection():
    enc = make(layers=3).eval()
    text, tm, image, im = inputs()
    out = enc(text, tm, image, im)
    assert out["tokens"].shape == (B, T, D) and out["cls"].shape == (B, D)
    assert torch.equal(out["cls"], out["tokens"][:, 0]) and out["attn"] == []
    full = enc(text, tm, image, im, return_attn=True)
    assert len(full["attn"]) == 3 and all(a.shape == (B, T, N) for a in full["attn"])
    sel = enc(text, tm, image, im, attn_layers=[-1, 0])
    assert len(sel["attn"]) == 2
    torch.testing.assert_close(sel["attn"][0], full["attn"][2])
    torch.testing.assert_close(sel["attn"][1], full["attn"][0])
    with pytest.raises(IndexError):
        enc(text, tm, image, attn_layers=[3])


def test_pads_never_influence_real_tokens():
    enc = make().eval()
    text, tm, image, im = inputs()
    out = enc(text, tm, image, im, return_attn=True)
    text2 = torch.where(tm[..., None], text, torch.randn_like(text) * 10)
    out2 = enc(text2, tm, image, im, return_attn=True)
    torch.testing.assert_close(out["tokens"][tm], out2["tokens"][tm], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["cls"], out2["cls"], rtol=0, atol=1e-5)
    for a, a2 in zip(out["attn"], out2["attn"]):
        torch.testing.assert_close(a, a2, rtol=0, atol=1e-6)


def test_masked_patches_never_influence_outputs():
    enc = make().eval()
    text, tm, image, im = inputs()
    out = enc(text, tm, image, im, return_attn=True)
    image2 = torch.where(im[..., None], image, torch.randn_like(image) * 10)
    out2 = enc(text, tm, image2, im, return_attn=True)
    torch.testing.assert_close(out["tokens"], out2["tokens"], rtol=0, atol=1e-5)
    for a in out["attn"]:
        assert torch.all(a.masked_select(~im[:, None, :]) == 0)


def test_attention_rows_are_distributions_over_visible_patches():
    enc = make().eval()
    text, tm, image, im = inputs()
    for mask in (im, None):
        for a in enc(text, tm, image, mask, return_attn=True)["attn"]:
            sums = a.sum(-1)                                               # (B, T)
            torch.testing.assert_close(sums[tm], torch.ones(int(tm.sum())))
            assert torch.all(sums[~tm] == 0)
            assert torch.all(a >= 0)


def test_explicit_and_sdpa_paths_agree():
    enc = make(layers=3).eval()
    text, tm, image, im = inputs()
    for mask in (im, None):
        fast = enc(text, tm, image, mask)["tokens"]
        slow = enc(text, tm, image, mask, return_attn=True)["tokens"]
        torch.testing.assert_close(fast[tm], slow[tm], rtol=1e-5, atol=1e-5)


def test_returned_weights_are_the_ones_used():
    """One layer, one head: rebuild the output by hand from the returned cross-attention map."""
    enc = make(layers=1, heads=1).eval()
    text, tm, image, im = inputs()
    out = enc(text, tm, image, im, attn_layers=[0])
    a = out["attn"][0]                                                     # (B, T, N)
    blk = enc.blocks[0]
    with torch.no_grad():
        x = text + blk.attn(blk.ln_1(text), mask=tm[:, None, None, :])
        v = blk.cross_attn.kv(blk.ln_kv(image))[..., D:]                   # (B, N, D) value half
        x = x + blk.cross_attn.proj(a @ v)
        x = enc.ln_final(x + blk.mlp(blk.ln_2(x)))
    torch.testing.assert_close(out["tokens"][tm], x[tm], rtol=1e-5, atol=1e-5)


def test_degenerate_rows_are_finite():
    enc = make().eval()
    text, tm, image, im = inputs()
    tm = tm.clone()
    tm[2] = False                                                          # no real text token
    im = im.clone()
    im[1] = False                                                          # no visible patch
    out = enc(text, tm, image, im, return_attn=True)
    assert torch.isfinite(out["tokens"]).all()
    assert all(torch.isfinite(a).all() and torch.all(a[1] == 0) and torch.all(a[2] == 0) for a in out["attn"])


def test_grad_checkpointing_same_grads():
    enc = make().train()
    enc_ck = copy.deepcopy(enc)
    enc_ck.grad_checkpointing = True
    text, tm, image, im = inputs()
    grads = []
    for m in (enc, enc_ck):
        t = text.clone().requires_grad_(True)
        i = image.clone().requires_grad_(True)
        out = m(t, tm, i, im, attn_layers=[1])
        loss = out["tokens"].square().mean() + (out["attn"][0] * torch.arange(N)).sum()
        loss.backward()
        grads.append([t.grad, i.grad] + [p.grad for p in m.parameters()])
    for g, g_ck in zip(*grads):
        torch.testing.assert_close(g, g_ck, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_image_index_equals_the_gathered_images(ckpt, masked):
    """Row b attending to image image_index[b] (keys/values projected once per image, then gathered) gives
    the outputs, attention maps and gradients of passing image_tokens[image_index]: ITM's 3B rows over B
    images, with a repeated, a shared and an unused image."""
    enc = make(grad_checkpointing=ckpt).train()
    text, tm, image, im = inputs()
    rows = torch.tensor([0, 1, 2, 0, 2])                  # text rows
    index = torch.tensor([0, 0, 2, 1, 0])                 # image of each row (image 2 of 3 used once)
    t, m = text[rows], tm[rows]
    results = []
    for use_index in (False, True):
        i = image.clone().requires_grad_(True)
        enc.zero_grad()
        if use_index:
            out = enc(t, m, i, im if masked else None, attn_layers=[0, -1], image_index=index)
        else:
            out = enc(t, m, i[index], im[index] if masked else None, attn_layers=[0, -1])
        loss = out["tokens"].square().mean() + sum((a * torch.arange(N)).sum() for a in out["attn"])
        loss.backward()
        results.append([out["tokens"], *out["attn"], i.grad] + [p.grad.clone() for p in enc.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"image_index must be \(5,\)"):
        enc(t, m, image, image_index=index[:3])


def test_image_index_under_bf16_autocast_matches_the_gathered_images():
    enc = make().eval()
    text, tm, image, _ = inputs()
    index = torch.tensor([2, 0, 0])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = enc(text, tm, image, image_index=index)["tokens"].float()
        b = enc(text, tm, image[index])["tokens"].float()
    torch.testing.assert_close(a, b, rtol=0, atol=0.02)

def test_heads():
    itm, mlm = ITMHead(D), MLMHead(D, 50)
    cls, tokens = torch.randn(B, D), torch.randn(B, T, D)
    assert itm(cls).shape == (B, 2)
    assert mlm(tokens).shape == (B, T, 50)
    assert mlm(tokens[torch.ones(B, T, dtype=torch.bool)]).shape == (B * T, 50)
    emb = torch.nn.Embedding(50, D)
    mlm.tie_to(emb)
    assert mlm.decoder.weight is emb.weight
    with pytest.raises(ValueError):
        MLMHead(D, 51).tie_to(emb)
