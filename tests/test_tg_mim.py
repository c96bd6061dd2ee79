import pytest
import torch

import finealign.objectives.tg_mim  # noqa: F401  (registration)
from finealign.config import ModelConfig
from finealign.masking import RandomMasker, gather_tokens
from finealign.models.image_decoder import ImageDecoder
from finealign.models.vision import VisionTransformer
from finealign.objectives import StepContext, build_objectives
from finealign.objectives.tg_mim import MaskedImageModeling, patchify
from finealign.types import Batch, Features


def _batch(images):
    B = images.shape[0]
    return Batch(images=images, text=torch.zeros(B, 4, dtype=torch.long), text_mask=torch.ones(B, 4, dtype=torch.bool),
                 image_ids=torch.arange(B), item_ids=torch.arange(B), captions=[""] * B, keys=[""] * B)


def _feats(pred, masked):
    return Features(extras={"mim_pred": pred, "mim_masked": masked})


def test_patchify_matches_vit():
    vit = VisionTransformer(ModelConfig(image_size=12, patch_size=4, vision_width=8, vision_layers=0, vision_heads=2))
    images = torch.randn(2, 3, 12, 12)
    assert torch.equal(patchify(images, 4), vit.patchify(images))
    # raster order, (C, p, p) flattening
    x = patchify(images, 4)
    assert torch.equal(x[1, 5], images[1, :, 4:8, 8:12].reshape(-1))   # row 1, column 2 of a 3x3 grid


def _hand_loss(images, pred, masked, p, norm_pix):
    total, count = 0.0, 0
    g = images.shape[-1] // p
    for b in range(images.shape[0]):
        for j, n in enumerate(masked[b].tolist()):
            r, c = divmod(n, g)
            t = images[b, :, r * p:(r + 1) * p, c * p:(c + 1) * p].reshape(-1)
            if norm_pix:
                t = (t - t.mean()) / (t.var(unbiased=True) + 1e-6).sqrt()
            total += ((pred[b, j] - t) ** 2).mean().item()
            count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [False, True])
def test_tg_mim_loss_equals_hand_computation(norm_pix):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 4, 4, generator=g)     # patch 2 -> N = 4, patch_dim 12
    masked = torch.tensor([[1, 2], [0, 3]])
    pred = torch.randn(2, 2, 12, generator=g)
    obj = MaskedImageModeling(norm_pix=norm_pix)     # patch size inferred from patch_dim
    out = obj(_feats(pred, masked), _batch(images), StepContext())
    assert out["loss"].item() == pytest.approx(_hand_loss(images, pred, masked, 2, norm_pix), rel=1e-5)
    # explicit patch size gives the same
    out2 = MaskedImageModeling(norm_pix=norm_pix, patch_size=2)(_feats(pred, masked), _batch(images), StepContext())
    assert out2["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-6)


def test_tg_mim_only_masked_patches_count():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 4, 4, generator=g)
    masked = torch.tensor([[1, 2], [0, 3]])           # row 0 keeps patches 0 and 3 (top-left, bottom-right)
    pred = torch.randn(2, 2, 12, generator=g)
    obj = MaskedImageModeling(norm_pix=True)
    base = obj(_feats(pred, masked), _batch(images), StepContext())["loss"].item()
    # pixels of visible patch 0 (top-left) and 3 (bottom-right) of image 0 do not matter
    img2 = images.clone()
    img2[0, :, :2, :2] += 5.0
    img2[0, :, 2:, 2:] = torch.randn(3, 2, 2)
    assert obj(_feats(pred, masked), _batch(img2), StepContext())["loss"].item() == pytest.approx(base, abs=1e-7)
    # a masked patch's pixels (patch 1 = top-right of image 0) do
    img3 = images.clone()
    img3[0, :, :2, 2:] = torch.randn(3, 2, 2)
    assert obj(_feats(pred, masked), _batch(img3), StepContext())["loss"].item() != pytest.approx(base, abs=1e-4)
    # gradient reaches only the predictions (which exist only at masked patches)
    p = pred.clone().requires_grad_(True)
    obj(_feats(p, masked), _batch(images), StepContext())["loss"].backward()
    assert p.grad is not None and p.grad.abs().sum() > 0


def test_tg_mim_build_and_errors():
    obj = build_objectives({"tg_mim": {"weight": 1.0, "norm_pix": False}})["tg_mim"]
    assert obj.scope == "local" and obj.requires == ("mim_pred", "mim_masked") and not obj.norm_pix
    with pytest.raises(ValueError, match="mim_pred"):
        obj(Features(), _batch(torch.zeros(1, 3, 4, 4)), StepContext())
    with pytest.raises(ValueError, match="patch size"):
        obj(_feats(torch.zeros(1, 2, 10), torch.tensor([[0, 1]])), _batch(torch.zeros(1, 3, 4, 4)), StepContext())


def _decoder(text_width=16, **kw):
    torch.manual_seed(0)
    return ImageDecoder(num_patches=9, encoder_width=12, width=16, layers=2, heads=2, patch_dim=3 * 2 * 2,
                        text_width=text_width, **kw)


def _inputs(B=2, N=9, T=5):
    g = torch.Generator().manual_seed(3)
    idx = RandomMasker(0.5)(torch.zeros(B, N), generator=g)
    patches = torch.randn(B, N, 12, generator=g)
    visible = gather_tokens(patches, idx.keep)                    # (B, K, 12)
    text = torch.randn(B, T, 16, generator=g)
    text_mask = torch.tensor([[True] * T, [True, True, True, False, False]])
    return visible, idx, text, text_mask


def test_image_decoder_shapes_and_gradients():
    dec = _decoder()
    visible, idx, text, text_mask = _inputs()
    pred = dec(visible, idx.keep, idx.masked, text, text_mask)
    assert pred.shape == (2, idx.masked.shape[1], 12)
    assert idx.masked.shape[1] == 5                              # round(4.5) = 5
    pred.pow(2).sum().backward()
    for name in ("mask_token", "pos_embed"):
        grad = getattr(dec, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert dec.embed.weight.grad.abs().sum() > 0
    assert dec.blocks[0].cross_attn.kv.weight.grad.abs().sum() > 0


def test_image_decoder_prediction_order_follows_masked():
    dec = _decoder().eval()
    visible, idx, text, text_mask = _inputs()
    pred = dec(visible, idx.keep, idx.masked, text, text_mask)
    perm = idx.masked.flip(1)
    pred_rev = dec(visible, idx.keep, perm, text, text_mask)
    assert torch.allclose(pred_rev, pred.flip(1), atol=1e-6)


def test_image_decoder_uses_text_but_not_pads():
    dec = _decoder().eval()
    visible, idx, text, text_mask = _inputs()
    with torch.no_grad():
        base = dec(visible, idx.keep, idx.masked, text, text_mask)
        other = text.clone()
        other[:, 1] = torch.randn(2, 16)                          # a real token in both rows
        assert not torch.allclose(dec(visible, idx.keep, idx.masked, other, text_mask)[0], base[0], atol=1e-4)
        assert not torch.allclose(dec(visible, idx.keep, idx.masked, other, text_mask)[1], base[1], atol=1e-4)
        padded = text.clone()
        padded[1, 3:] = 10 * torch.randn(2, 16)                   # row 1's pads only
        assert torch.allclose(dec(visible, idx.keep, idx.masked, padded, text_mask), base, atol=1e-6)
        # a row with no real token at all stays finite (its cross-attention is switched off)
        empty = text_mask.clone()
        empty[1] = False
        assert torch.isfinite(dec(visible, idx.keep, idx.masked, text, empty)).all()
        with pytest.raises(ValueError, match="text_tokens"):
            dec(visible, idx.keep, idx.masked)


def test_image_decoder_without_text():
    dec = _decoder(text_width=None)
    visible, idx, text, _ = _inputs()
    pred = dec(visible, idx.keep, idx.masked)
    assert pred.shape == (2, 5, 12) and torch.isfinite(pred).all()
    assert not any("cross" in n for n, _ in dec.named_parameters())
    with pytest.raises(ValueError, match="without text"):
        dec(visible, idx.keep, idx.masked, text)
    with pytest.raises(ValueError, match="partition"):
        dec(visible[:, :-1], idx.keep[:, :-1], idx.masked)


def test_decoder_to_loss_end_to_end():
    """RandomMasker -> ImageDecoder -> tg_mim on 6x6 images with patch 2 (N = 9): finite, backprops."""
    dec = _decoder(grad_checkpointing=True)
    images = torch.randn(2, 3, 6, 6)
    visible, idx, text, text_mask = _inputs()
    pred = dec(visible, idx.keep, idx.masked, text, text_mask)
    loss = MaskedImageModeling()(_feats(pred, idx.masked), _batch(images), StepContext())["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    assert dec.head.weight.grad.abs().sum() > 0
