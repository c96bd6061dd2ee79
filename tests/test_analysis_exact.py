"""Exact values of the analysis helpers and of the tokenizer's less-travelled paths.

Pins, with numbers worked out by hand: the gap statistics on non-unit and constant-difference
embeddings (cosines are of normalised vectors, the zero-variance branch), the subregion summary's
eps-margin fractions and the cosines of ``subregion_similarities`` (max over subregions, text
normalised), the QQ plot's normal quantiles; ``viz``'s unpatchify / reconstruction (norm_pix
inverse with its eps) / shading / norm_pix default and which patches ``mask_panels`` keeps and
masks; ``viz_sync.prototype_overlay`` colours; ``prototype_counts`` length and batched
``prototype_logits``; ``study_series`` grouping of dashed recipe names and rows without the metric;
the tokenizer's NFKC / whitespace normaliser, out-of-range ids in decode, the mask-id fallback and
added special tokens of a foreign tokenizer.json.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers
from torch import nn

from finealign.analysis.gap import (_normal_quantiles, gap_statistics, subregion_similarities,
                                    summarise_subregions)
from finealign.analysis.plot_study import study_series
from finealign.analysis.viz import _norm_pix, _shade, reconstruction, unpatchify
from finealign.analysis.viz_prototypes import patch_crop, prototype_counts, prototype_logits
from finealign.analysis.viz_sync import prototype_overlay
from finealign.config_schema import Config
from finealign.data.tokenizer import Tokenizer
from finealign.objectives.tg_mim import normalize_patches, patchify

TINY = ["model.vision_layers=1", "model.text_layers=1", "model.vision_width=32", "model.text_width=32",
        "model.vision_heads=2", "model.text_heads=2", "model.embed_dim=16", "model.caption_queries=4",
        "model.decoder_layers=0"]


# ---------------------------------------------------------------- gap statistics

def test_gap_cosines_normalise_but_differences_do_not():
    """d = (2, -5), (0, 2): μ = (1, -1.5), mean d² = 33/4, mean μ² = 13/8; cosines of the normalised
    vectors: pairs 0 and 1, non-pairs (2,0)·(0,1) = 0 and (0,3)·(0,5) = 1."""
    image = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    text = torch.tensor([[0.0, 5.0], [0.0, 1.0]])
    st = gap_statistics(image, text)
    assert st["pair_cos_mean"] == pytest.approx(0.5)
    assert st["nonpair_cos_mean"] == pytest.approx(0.5)
    assert st["uncentred_var"] == pytest.approx(33 / 4)
    assert st["mean_shift_sq"] == pytest.approx(13 / 8)
    assert st["centred_var"] == pytest.approx(33 / 4 - 13 / 8)
    assert st["gap_norm"] == pytest.approx(math.sqrt(1 + 2.25))


def test_gap_constant_difference_has_zero_spread_and_zero_moments():
    text = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 3.0]])
    image = text + torch.tensor([1.0, -2.0])
    st = gap_statistics(image, text)
    assert st["centred_var"] == 0.0 and st["skewness"] == 0.0 and st["excess_kurtosis"] == 0.0
    assert st["per_dim_mean"] == pytest.approx([1.0, -2.0]) and st["per_dim_std"] == [0.0, 0.0]
    assert st["suggested_noise_var"] == pytest.approx(2.5)


def test_summarise_subregions_counts_only_wins_beyond_eps():
    glob = torch.tensor([0.5, 0.5, 0.5, 0.2], dtype=torch.float64)
    sub = torch.tensor([0.5, 0.5 + 5e-7, 0.7, 0.1], dtype=torch.float64)    # a tie, a rounding win, a win
    agg = torch.tensor([0.6, 0.5, 0.5, 0.3], dtype=torch.float64)
    s = summarise_subregions(glob, sub, agg, k=3, w=0.5)
    assert s["subregion_beats_global"] == 0.25 and s["aggregate_beats_global"] == 0.5
    assert s["global_cos_mean"] == pytest.approx(0.425)
    assert s["best_subregion_cos_mean"] == pytest.approx((1.8 + 5e-7) / 4)
    assert s["best_aggregate_cos_mean"] == pytest.approx(0.475)
    assert (s["k"], s["w"]) == (3, 0.5)


def test_subregion_similarities_are_cosines_and_best_is_the_max(one_thread):
    from finealign.config import load_config
    from finealign.models.factory import build_model
    from finealign.zeroshot.features import aggregate, subregion_features
    torch.manual_seed(0)
    cfg = load_config("clip", TINY + ["model.image_pool=attn"])
    model = build_model(cfg.model, 64).eval()
    images = torch.randn(3, 3, cfg.model.image_size, cfg.model.image_size)
    text = torch.randn(3, cfg.model.embed_dim) * 3.0                       # not unit norm
    s = subregion_similarities(model, images, text, k=4, w=0.7)
    t = F.normalize(text, dim=-1)
    with torch.no_grad():
        g = model.encode_image(images, memory=False)["embed"]
        _, patches, attn = model.visual(images, return_attn="full")
        sub, _ = subregion_features(model.dense_image_embed(patches), attn, 4,
                                    model.global_attention(patches, attn))
    cos_sub = torch.einsum("bke,be->bk", sub.float(), t)
    cos_agg = torch.einsum("bke,be->bk", aggregate(g, sub.float(), 0.7), t)
    assert torch.allclose(s["global"], (g * t).sum(-1), atol=1e-5)
    assert torch.allclose(s["best_subregion"], cos_sub.max(1).values, atol=1e-5)
    assert torch.allclose(s["best_aggregate"], cos_agg.max(1).values, atol=1e-5)
    assert not torch.allclose(cos_sub.min(1).values, cos_sub.max(1).values)


def test_normal_quantiles_at_midpoints():
    assert _normal_quantiles(2) == pytest.approx([-0.6744898, 0.6744898], abs=1e-6)
    assert _normal_quantiles(4) == pytest.approx([-1.1503494, -0.3186394, 0.3186394, 1.1503494], abs=1e-6)


# ---------------------------------------------------------------- viz

def test_unpatchify_inverts_patchify():
    x = torch.arange(3 * 6 * 6, dtype=torch.float).reshape(3, 6, 6)
    assert torch.equal(unpatchify(patchify(x[None], 2)[0], 2, 3), x)


def test_reconstruction_replaces_only_masked_patches():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 4, 4, generator=g)
    masked = torch.tensor([1, 2])
    pred = torch.rand(2, 12, generator=g)
    out = reconstruction(image, pred, masked, 2, 2, norm_pix=False)
    patches = patchify(out[None], 2)[0]
    orig = patchify(image[None], 2)[0]
    assert torch.equal(patches[masked], pred)
    assert torch.equal(patches[[0, 3]], orig[[0, 3]])
    # norm_pix: a prediction of the normalised target maps back to the target itself
    back = reconstruction(image, normalize_patches(orig[masked]), masked, 2, 2, norm_pix=True)
    assert torch.allclose(back, image, atol=1e-5)


def test_reconstruction_norm_pix_uses_the_patch_scale_with_eps():
    image = torch.full((3, 4, 4), 0.3)                                     # every patch constant: var 0
    out = reconstruction(image, torch.ones(1, 12), torch.tensor([3]), 2, 2, norm_pix=True)
    assert torch.allclose(out[:, 2:, 2:], torch.full((3, 2, 2), 0.3 + 1e-3), atol=1e-6)  # 1·√1e-6 + mean
    assert torch.equal(out[:, :2, :], image[:, :2, :])


def test_shade_greys_the_masked_patch_in_raster_order():
    img = torch.full((3, 4, 4), 0.2)
    out = _shade(img, torch.tensor([1]), 2, 2)                             # patch 1: row 0, col 1
    assert torch.allclose(out[:, :2, 2:], torch.full((3, 2, 2), 0.45))
    assert torch.equal(out[:, :2, :2], img[:, :2, :2]) and torch.equal(out[:, 2:], img[:, 2:])
    assert torch.equal(img, torch.full((3, 4, 4), 0.2))                    # input untouched


def test_norm_pix_defaults_to_true():
    assert _norm_pix(Config(objectives={})) is True
    assert _norm_pix(Config(objectives={"tg_mim": {}})) is True


@pytest.mark.parametrize("recipe, key", [("mim", "mim"), ("sycoca", "tg_mim"), ("syncmask", "mim")])
def test_norm_pix_follows_whichever_pixel_mim_objective_the_recipe_trains(recipe, key):
    """The plain ``mim`` objective (clip- and fusion-based recipes) is the same loss as ``tg_mim``: a model
    trained on raw pixels must not have its reconstruction de-normalised (it used to read tg_mim only)."""
    from finealign.config import load_config
    assert _norm_pix(load_config(recipe)) is True
    assert _norm_pix(load_config(recipe, [f"objectives.{key}.norm_pix=false"])) is False
    assert _norm_pix(Config(objectives={"tg_mim": {"norm_pix": False}})) is False


def test_mask_panels_ic_keeps_most_relevant_and_mim_masks_most_relevant(one_thread):
    from finealign.analysis.viz import mask_panels
    from finealign.config import load_config
    from finealign.models.factory import build_model
    torch.manual_seed(0)
    tok = Tokenizer.train(["a red circle", "a blue square"], 300)
    cfg = load_config("sycoca", TINY[:-1] + ["model.decoder_layers=1"])
    cfg.masking.ic, cfg.masking.mim = {}, {}                              # unset: the built-in defaults
    model = build_model(cfg.model, tok.vocab_size)
    image = torch.randn(3, cfg.model.image_size, cfg.model.image_size)
    out = mask_panels(model, tok, cfg, image, "a red circle")
    g, N = out["grid"], out["grid"] ** 2
    rel = out["relevance"].flatten()
    order = rel.argsort()
    assert out["relevance"].shape == (g, g)
    assert sorted(out["ic"].masked[0].tolist()) == sorted(order[: N // 2].tolist())    # IC hides the least
    assert sorted(out["mim"].masked[0].tolist()) == sorted(order[N // 2:].tolist())    # MIM hides the most
    assert out["reconstruction"].shape == image.shape
    kept = patchify(out["reconstruction"][None], out["patch"])[0][out["mim"].keep[0]]
    assert torch.equal(kept, patchify(image[None], out["patch"])[0][out["mim"].keep[0]])


def test_prototype_overlay_colour_is_fixed_by_id():
    shown = torch.full((3, 4, 4), 0.5)
    out = prototype_overlay(shown, torch.tensor([0, 3]), torch.tensor([7, 7]), 2, 2)
    colour = 0.2 + 0.8 * torch.rand(3, generator=torch.Generator().manual_seed(7))
    for r, c in [(0, 0), (2, 2)]:
        assert torch.allclose(out[:, r:r + 2, c:c + 2], colour[:, None, None].expand(3, 2, 2))
    assert torch.allclose(out[:, :2, 2:], torch.full((3, 2, 2), 0.875))    # visible: 0.15 x + 0.8
    assert torch.equal(shown, torch.full((3, 4, 4), 0.5))


# ---------------------------------------------------------------- prototypes

def test_prototype_counts_has_one_entry_per_prototype_even_unused():
    x = torch.zeros(1, 2, 3)
    x[0, :, 0] = 1.0
    assert prototype_counts(x).tolist() == [2, 0, 0]


def test_patch_crop_context_two_and_zero():
    img = torch.arange(16, dtype=torch.float).reshape(4, 4).repeat_interleave(2, 0).repeat_interleave(2, 1)
    img = img[None].repeat(3, 1, 1)                                        # 4 x 4 grid of 2-pixel patches
    crop = patch_crop(img, 5, 4, 2, context=2, fill=-1.0)                  # row 1, col 1
    assert crop.shape == (3, 10, 10)
    assert torch.all(crop[:, 4:6, 4:6] == 5) and torch.all(crop[:, 2:4, 2:4] == 0)
    assert torch.all(crop[:, :2, :] == -1) and torch.all(crop[:, :, :2] == -1) and crop[0, -1, -1] == 15
    assert torch.equal(patch_crop(img, 6, 4, 2, context=0), torch.full((3, 2, 2), 6.0))


class _Proto(nn.Module):
    def __init__(self):
        super().__init__()
        self.proto_head = nn.Linear(3, 4)

    def patch_prototypes(self, images):                                    # (B, 4 patches, 4)
        return self.proto_head(images.reshape(images.shape[0], 3, 4, -1).mean(-1).transpose(1, 2))


def test_prototype_logits_batches_and_sets_eval(one_thread):
    torch.manual_seed(0)
    model = _Proto().train()
    images = torch.randn(5, 3, 4, 4)
    out = prototype_logits(model, images, batch_size=2)
    assert not model.training
    with torch.no_grad():
        assert torch.allclose(out, model.patch_prototypes(images), atol=1e-6)
    assert out.shape == (5, 4, 4) and not out.requires_grad


# ---------------------------------------------------------------- study

def test_study_series_strips_only_the_last_suffix_and_skips_rows_without_metric():
    stat = {"mean": 2.0, "std": 0.5}
    rows = [{"recipe": "semi-hard-25", "varied": {"f": 0.25}, "metrics": {"r1": stat}},
            {"recipe": "semi-hard-50", "varied": {"f": "0.5"}, "metrics": {"r1": {"mean": 3.0, "std": 0.1}}},
            {"recipe": "clip-25", "varied": {"f": 0.25}, "metrics": {"other": stat}},
            {"recipe": "clip-50", "varied": {"f": 0.5}, "metrics": None},
            {"recipe": "clip-75", "varied": {"f": 0.75}, "metrics": {"r1": {}}}]              # empty: no value
    assert study_series({"rows": rows}, "f", "r1") == {"semi-hard": [(0.25, 2.0, 0.5), (0.5, 3.0, 0.1)]}


# ---------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(["a red circle", "fish and a blue square", "two green stars"] * 2, 300)


def test_normaliser_nfkc_whitespace_and_strip(tok):
    assert tok.tokenize(["\ufb01sh"]) == tok.tokenize(["fish"])             # the fi ligature
    assert tok.tokenize(["  a\tred\n\ncircle  "]) == tok.tokenize(["a red circle"])


def test_decode_drops_out_of_range_ids(tok):
    ids = tok.encode_batch(["a red circle"], 10)[0][0].tolist()
    assert tok.decode(ids[:2] + [tok.vocab_size, -1, 10 ** 6] + ids[2:]) == "a red circle"
    assert tok.decode_batch(torch.tensor([ids])) == ["a red circle"]


def _wordlevel(vocab):
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]" if "[UNK]" in vocab else None))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    return hf


def test_mask_id_falls_back_to_unk_and_errors_without_either():
    base = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "red": 3}
    assert Tokenizer(_wordlevel({**base, "[UNK]": 4})).mask_id == 4
    with pytest.raises(ValueError, match="no mask or unknown token"):
        Tokenizer(_wordlevel(base)).mask_id


def test_added_special_tokens_count_in_vocab_and_are_skipped():
    hf = _wordlevel({"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[UNK]": 3, "red": 4, "circle": 5})
    hf.add_special_tokens(["[MASK]"])
    hf.add_tokens(["blue"])                                                # added, but a plain word
    t = Tokenizer(hf)
    assert t.vocab_size == 8 and t.mask_id == 6 and t.special_ids == [0, 1, 2, 6]
    assert t.decode([1, 4, 6, 5, 2]) == "red circle" and t.decode([1, 7, 5, 2]) == "blue circle"
    ids, mask = t.encode("red circle", 5)
    assert ids.tolist() == [1, 4, 5, 2, 0] and mask.tolist() == [True] * 4 + [False]


# ---------------------------------------------------------------- viz mix

def test_mix_panels_distinct_images_seeded_mix_and_mixer_override(tmp_path, monkeypatch, one_thread):
    """Each image once even when the source lists it twice (one sample per caption), the run's mixer with
    the given seed, and ``mixer=`` overriding it."""
    import random

    from finealign.data import loader

    from finealign.analysis.viz_mix import mix_panels
    from finealign.api import Loaded
    from finealign.config import MixerConfig, load_config
    from finealign.mixing import build_mixer
    from finealign.models.factory import build_model
    torch.manual_seed(0)
    cfg = load_config("timix", TINY + ["data.num_samples=24"])
    tok = Tokenizer.train(["a red circle", "a blue square left of a green star"], 300)
    loaded = Loaded(build_model(cfg.model, tok.vocab_size), tok, cfg, tmp_path)
    real = loader.build_source
    monkeypatch.setattr(loader, "build_source", lambda c, split, skips: [
        s for s in list(real(c, split, skips))[:4] for _ in range(2)])                # 0 0 1 1 2 2 3 3
    pan = mix_panels(loaded, split="val", num=3, seed=5)
    batch, g = pan["batch"], pan["grid"]
    assert batch.image_ids.tolist() == [0, 1, 2]
    assert pan["mixer"] == "timix" and pan["scores"].shape == (3, g * g)
    again = build_mixer(MixerConfig(**cfg.mixer.__dict__), cfg.model.patch_size)(
        batch.images, pan["scores"], random.Random(5))
    assert torch.equal(pan["mix"].images, again.images) and torch.equal(pan["mix"].lam, again.lam)
    other = mix_panels(loaded, split="val", num=3, mixer="mixup", seed=5)
    assert other["mixer"] == "mixup" and other["mix"].target_window is None


# ---------------------------------------------------------------- viz sync

def test_sync_panels_heat_is_the_masked_words_attention_and_masks_its_top_patches(one_thread):
    from finealign.analysis.viz_sync import sync_panels
    from finealign.config import load_config
    from finealign.models.factory import build_model
    from finealign.types import Batch
    torch.manual_seed(0)
    tok = Tokenizer.train(["a large red circle on the left", "a blue square"], 300)
    cfg = load_config("syncmask", TINY + ["model.mim_decoder_layers=1"])
    model = build_model(cfg.model, tok.vocab_size).eval()
    image = torch.randn(3, cfg.model.image_size, cfg.model.image_size)
    text = "a large red circle on the left"
    out = sync_panels(model, tok, cfg, image, text)
    ids, tmask = tok.encode_batch([text], cfg.model.context_length)
    real = [i for i in range(1, int(tmask.sum()) - 1)]                               # between BOS and EOS
    assert [w for w, _ in out["tokens"]] == [tok.decode([int(ids[0, i])]) for i in real]
    chosen = [i for i, (_, m) in zip(real, out["tokens"]) if m]
    assert len(chosen) == 1                                                           # 15% of 7 words
    batch = Batch(images=image[None], text=ids, text_mask=tmask, image_ids=torch.zeros(1, dtype=torch.long),
                  item_ids=torch.zeros(1, dtype=torch.long), captions=[text], keys=["viz"])
    with torch.no_grad():
        attn = model.cross_attention(model.encode(batch), batch, -1)                  # (1, T, N)
    heat = out["attention"].flatten()
    assert torch.allclose(heat, attn[0, chosen].sum(0), atol=1e-6)
    assert not torch.allclose(heat, attn[0].sum(0), atol=1e-3)
    M = out["mim"].masked.shape[1]
    assert sorted(out["mim"].masked[0].tolist()) == sorted(heat.topk(M).indices.tolist())


def test_one_endoftext_token_as_pad_bos_and_eos_still_decodes():
    """GPT-2 / CLIP style: <|endoftext|> is pad, bos and eos; the leading one must not end the text."""
    t = Tokenizer(_wordlevel({"<|endoftext|>": 0, "red": 1, "circle": 2}))
    assert (t.pad_id, t.bos_id, t.eos_id) == (0, 0, 0)
    ids, mask = t.encode("red circle", 6)
    assert ids.tolist() == [0, 1, 2, 0, 0, 0] and mask.tolist() == [True] * 4 + [False] * 2
    assert t.decode(ids) == "red circle"


def test_sync_panels_show_the_teachers_prototypes_beside_the_students():
    """SemMIM's panel colours each masked patch by the teacher's prototype (the target) and by the student's
    prediction. Moving only the teacher's prototype head leaves the masked patches (relevance reads the
    teacher's fusion layers) and the student's ids unchanged and must change the teacher's ids."""
    from finealign.analysis.viz_sync import sync_panels
    from finealign.config import load_config
    from finealign.models.factory import build_model
    torch.manual_seed(0)
    cfg = load_config("semmim", ["model.preset=tiny"])
    tok = Tokenizer.train(["a red heart", "two blue squares"], 300)
    model = build_model(cfg.model, tok.vocab_size)
    image = torch.randn(3, cfg.model.image_size, cfg.model.image_size, generator=torch.Generator().manual_seed(1))
    panels = []
    for seed in (2, 3):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.teacher.module.proto_head.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        panels.append(sync_panels(model, tok, cfg, image, "a red heart"))
    a, b = panels
    assert torch.equal(a["mim"].masked, b["mim"].masked) and a["mim"].masked.numel() > 0
    assert torch.equal(a["prototypes"]["student"], b["prototypes"]["student"])
    assert not torch.equal(a["prototypes"]["teacher"], b["prototypes"]["teacher"])
