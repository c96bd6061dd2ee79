"""SyCoCa wired end to end: attentive masks from the model's own relevance, IC on kept patches,
MIM encoder sees only visible patches, TG-MIM loss falls while training."""
import pytest
import torch

from finealign.config import ConfigError, load_config
from finealign.masking import MaskIndices
from finealign.models.factory import build_model
from finealign.pipeline import Pipeline
from finealign.train.logging import read_metrics
from finealign.train.loop import Trainer
from finealign.types import Batch


def _batch(cfg, B=3, T=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(4, 50, (B, T), generator=g)
    text[:, 0] = 1
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 5:] = False
    text[0, 5:] = 0
    S = cfg.model.image_size
    return Batch(images=torch.randn(B, 3, S, S, generator=g), text=text, text_mask=mask,
                 image_ids=torch.arange(B), item_ids=torch.arange(B), captions=[""] * B, keys=[""] * B)


@pytest.fixture(scope="module")
def sycoca():
    cfg = load_config("sycoca")
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, 64).eval()


def test_attentive_masks_are_complementary_and_follow_relevance(sycoca):
    cfg, model = sycoca
    pipe = Pipeline(model, cfg.masking)
    b = _batch(cfg)
    feats = pipe(b)
    rel = feats.extras["relevance"]                                    # (B, N)
    N = model.visual.num_patches
    assert rel.shape == (3, N) and not rel.requires_grad
    masked = feats.extras["mim_masked"]                                # TG-MIM hides the most relevant half
    assert masked.shape == (3, N // 2)
    for r, m in zip(rel, masked):
        top = set(r.argsort(descending=True)[: N // 2].tolist())
        assert set(m.tolist()) == top
    # IC keeps exactly what TG-MIM hides
    ic = pipe.maskers["ic"](rel)
    assert torch.equal(ic.keep, masked)
    assert feats.extras["mim_pred"].shape == (3, N // 2, 3 * cfg.model.patch_size ** 2)


def test_caption_uses_only_kept_patches(sycoca):
    cfg, model = sycoca
    b = _batch(cfg)
    N = model.visual.num_patches
    keep = torch.arange(0, N, 2).expand(3, -1)
    ic = MaskIndices(keep=keep, masked=torch.arange(1, N, 2).expand(3, -1))
    with torch.no_grad():
        feats = model.encode(b)
        base = model.heads(feats, b, {"ic": ic, "mim": ic}).caption_logits.clone()
        tokens = feats.image_tokens.clone()
        tokens[:, 1::2] += 5.0                                          # change only dropped patches
        again = model.heads(feats.replace(image_tokens=tokens), b, {"ic": ic, "mim": ic}).caption_logits
        assert torch.equal(base, again)
        tokens[:, 0] += 5.0                                             # change a kept patch
        changed = model.heads(feats.replace(image_tokens=tokens), b, {"ic": ic, "mim": ic}).caption_logits
        assert not torch.allclose(base, changed)


def test_mim_encoder_never_sees_masked_pixels():
    cfg = load_config("sycoca")                  # the recipe's MAE-style second pass over the visible patches
    assert cfg.model.mim_visible == "reencode"
    torch.manual_seed(0)
    model = build_model(cfg.model, 64).eval()
    b = _batch(cfg)
    N, p = model.visual.num_patches, cfg.model.patch_size
    mim = MaskIndices(keep=torch.arange(N // 2).expand(3, -1), masked=torch.arange(N // 2, N).expand(3, -1))
    with torch.no_grad():
        feats = model.encode(b)
        pred = model.heads(feats, b, {"mim": mim}).extras["mim_pred"].clone()
        img = b.images.clone()
        img[:, :, -p:, :] += 3.0                                        # last patch row: all masked
        b2 = Batch(**{**b.__dict__, "images": img})
        pred2 = model.heads(feats, b2, {"mim": mim}).extras["mim_pred"]
    assert torch.equal(pred, pred2)


def _first_half_visible_and_vit_calls(model, B=3):
    """MIM masks keeping the first half of the patches, and a hook counting ViT calls: (masks, calls, hook)."""
    N = model.visual.num_patches
    mim = MaskIndices(keep=torch.arange(N // 2).expand(B, -1), masked=torch.arange(N // 2, N).expand(B, -1))
    calls = []
    return mim, calls, model.visual.register_forward_hook(lambda *a: calls.append(1))


def test_shared_visible_tokens_skip_the_second_pass_and_read_the_first():
    cfg = load_config("sycoca", ["model.mim_visible=shared"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 64).eval()
    b = _batch(cfg)
    N = model.visual.num_patches
    mim, calls, hook = _first_half_visible_and_vit_calls(model)
    with torch.no_grad():
        feats = model.encode(b)
        pred = model.heads(feats, b, {"mim": mim}).extras["mim_pred"]
        want = model.image_decoder(feats.image_tokens[:, : N // 2], mim.keep, mim.masked, feats.text_tokens,
                                   b.text_mask)
    hook.remove()
    assert len(calls) == 1                                              # one ViT pass for the whole step
    assert torch.equal(pred, want)                                      # the decoder reads the first pass
    with pytest.raises(ConfigError, match="mim_visible must be reencode or shared"):
        load_config("sycoca", ["model.mim_visible=twice"])


def test_heads_no_objective_reads_are_skipped(sycoca):
    """``needs`` from the active objectives: with tg_mim off the second ViT pass and the image decoder do not
    run, with ic off no caption logits are computed; None computes every head."""
    cfg, model = sycoca
    b = _batch(cfg)
    mim, calls, hook = _first_half_visible_and_vit_calls(model)
    with torch.no_grad():
        feats = model.encode(b)
        out = model.heads(feats, b, {"mim": mim}, needs={"caption_logits"})
        assert out.caption_logits is not None and "mim_pred" not in out.extras and len(calls) == 1
        out = model.heads(model.encode(b), b, {"mim": mim}, needs={"mim_pred", "mim_masked"})
        assert out.caption_logits is None and "mim_pred" in out.extras and len(calls) == 3
        out = model.heads(model.encode(b), b, {"mim": mim})
        assert out.caption_logits is not None and "mim_pred" in out.extras
    hook.remove()


def test_narrow_decoder_width_follows_the_scale_and_must_split_into_heads():
    from finealign.config import ConfigError
    cfg = load_config("sycoca", ["model.mim_decoder_scale=0.5"])      # tiny: ViT 128 wide, 4 heads
    assert build_model(cfg.model, 64).image_decoder.width == 64
    cfg = load_config("sycoca", ["model.mim_decoder_scale=0.3"])      # 38.4 -> the nearest multiple of 4
    assert build_model(cfg.model, 64).image_decoder.width == 40
    cfg = load_config("sycoca", ["model.mim_decoder_scale=0.5", "model.mim_decoder_width=96"])
    assert build_model(cfg.model, 64).image_decoder.width == 96         # an explicit width wins
    with pytest.raises(ConfigError, match="mim_decoder_scale must be in"):
        load_config("sycoca", ["model.mim_decoder_scale=0"])
    with pytest.raises(ConfigError, match=r"mim_decoder_width=90 must be a multiple of the image decoder's heads \(4\)"):
        load_config("sycoca", ["model.mim_decoder_width=90"])


def test_pooler_query_subsets_equal_full_pooling(sycoca):
    _, model = sycoca
    x = torch.randn(2, model.visual.num_patches, model.cfg.vision_width)
    full = model.pooler(x)
    assert torch.allclose(torch.cat([model.pooler(x, queries=slice(0, 1)), model.caption_memory(x)], 1), full,
                          atol=1e-6)


def test_config_guards():
    from finealign.config import ConfigError
    with pytest.raises(ConfigError, match="needs a masker"):
        load_config("coca", ["model.mim_decoder_layers=1"])
    with pytest.raises(ConfigError, match="no image decoder"):
        load_config("coca", ["masking.mim={type: random, mask_ratio: 0.5}"])
    with pytest.raises(ConfigError, match="masking.ic.*did you mean 'attentive'"):
        load_config("coca", ["masking.ic={type: attentiv}"])


def test_sycoca_trains_on_shapes_and_tg_mim_loss_falls(tmp_path):
    cfg = load_config("sycoca", ["data.source=shapes", "data.num_samples=512", "data.batch_size=32",
                                 "train.steps=60", "train.lr=1e-3", "train.warmup=5", "train.log_every=1",
                                 "train.ckpt_every=0", "train.threads=2", f"train.run_dir={tmp_path}"])
    Trainer(cfg, progress=False).train()
    mim = [r["train/tg_mim/loss"] for r in read_metrics(tmp_path)]
    first, last = sum(mim[:10]) / 10, sum(mim[-10:]) / 10
    assert last < 0.8 * first, (first, last)
