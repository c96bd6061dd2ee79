"""finealign analyze gap: the gap statistics on synthetic embeddings with a known answer, a hand-made
2-D example, subregions vs global on a tiny random model, and the CLI end to end on a 2-step CLIP."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from finealign.analysis.gap import (gap_json_path, gap_statistics, run_dir_of,
                                    subregion_similarities, subregion_vs_global)
from finealign.config import load_config
from finealign.models.factory import build_model


def _expected_cos(s: float, E: int, n: int = 400_000) -> float:
    """E[cos(i, normalise(i + ε))], ε ~ N(0, s² I_E), by Monte Carlo of the exact scalar form: with
    a = i·ε ~ N(0, s²) and the orthogonal part's squared norm s² χ²_{E-1},
    cos = (1 + a) / sqrt((1 + a)² + s² χ²_{E-1})."""
    g = torch.Generator().manual_seed(123)
    a = torch.randn(n, generator=g, dtype=torch.float64) * s
    chi2 = torch.randn(n, E - 1, generator=g, dtype=torch.float64).pow(2).sum(1)
    return float(((1 + a) / ((1 + a) ** 2 + s * s * chi2).sqrt()).mean())


def test_gap_statistics_known_noise():
    M, E, s = 4000, 32, 0.08
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(M, E, generator=g), dim=-1)
    text = F.normalize(image + s * torch.randn(M, E, generator=g), dim=-1)
    st = gap_statistics(image, text)
    expected = (2 - 2 * _expected_cos(s, E)) / E          # E||i - t||² / E, per dimension
    assert st["suggested_noise_var"] == pytest.approx(expected, rel=0.05)
    # isotropic images: the mean shift is ~0, so the centred fit matches too
    assert st["centred_var"] == pytest.approx(expected, rel=0.05)
    assert st["uncentred_var"] == pytest.approx(st["centred_var"] + st["mean_shift_sq"], rel=1e-9)
    assert st["uncentred_var"] == pytest.approx((2 - 2 * st["pair_cos_mean"]) / E, rel=1e-5)
    assert st["pair_cos_mean"] > st["nonpair_cos_mean"] + 0.5
    assert abs(st["nonpair_cos_mean"]) < 0.05
    assert len(st["per_dim_mean"]) == len(st["per_dim_std"]) == E
    assert st["n_pairs"] == M and st["embed_dim"] == E
    assert abs(st["skewness"]) < 0.2 and abs(st["excess_kurtosis"]) < 0.5     # near-Gaussian


def test_gap_statistics_mean_shift_counts_in_suggestion():
    M, E = 2000, 16
    g = torch.Generator().manual_seed(1)
    image = F.normalize(torch.randn(M, E, generator=g), dim=-1)
    shift = torch.zeros(E)
    shift[0] = 0.5
    text = F.normalize(image + shift + 0.05 * torch.randn(M, E, generator=g), dim=-1)
    st = gap_statistics(image, text)
    assert st["gap_norm"] > 0.2
    assert st["suggested_noise_var"] > st["centred_var"] + 0.5 * st["gap_norm"] ** 2 / E


def test_gap_statistics_hand_made_2d():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    st = gap_statistics(image, text)                      # d = (1, -1), (0, 0); μ = (0.5, -0.5)
    assert st["gap_norm"] == pytest.approx(math.sqrt(0.5))
    assert st["per_dim_mean"] == pytest.approx([0.5, -0.5])
    assert st["per_dim_std"] == pytest.approx([0.5, 0.5])
    assert st["centred_var"] == pytest.approx(0.25)
    assert st["mean_shift_sq"] == pytest.approx(0.25)
    assert st["suggested_noise_var"] == pytest.approx(0.5)
    assert st["pair_cos_mean"] == pytest.approx(0.5)      # cos 0 and 1
    assert st["nonpair_cos_mean"] == pytest.approx(0.5)   # (i1, t2) = 0, (i2, t1) = 1
    with pytest.raises(ValueError):
        gap_statistics(image[:1], text[:1])
    with pytest.raises(ValueError):
        gap_statistics(image, text[:, :1])


TINY = ["model.vision_layers=1", "model.text_layers=1", "model.vision_width=32", "model.text_width=32",
        "model.vision_heads=2", "model.text_heads=2", "model.embed_dim=16", "model.caption_queries=4",
        "model.decoder_layers=0"]


@pytest.mark.parametrize("pool", ["cls", "attn"])
def test_subregion_vs_global_tiny_model(pool):
    torch.manual_seed(0)
    cfg = load_config("clip", TINY + [f"model.image_pool={pool}"])
    model = build_model(cfg.model, 64).eval()
    B = 5
    images = torch.randn(B, 3, cfg.model.image_size, cfg.model.image_size)
    text = F.normalize(torch.randn(B, cfg.model.embed_dim), dim=-1)
    s = subregion_similarities(model, images, text, k=4, w=0.5)
    assert s["global_embed"].shape == (B, cfg.model.embed_dim)
    for key in ("global", "best_subregion", "best_aggregate"):
        assert s[key].shape == (B,) and bool((s[key].abs() <= 1 + 1e-5).all())
    with torch.no_grad():
        ref = model.encode_image(images, memory=False)["embed"]
    assert torch.allclose(s["global"], (ref * text).sum(-1), atol=1e-5)
    res = subregion_vs_global(model, images, text, k=4, w=0.5)
    assert res["k"] == 4 and res["w"] == 0.5
    for key in ("subregion_beats_global", "aggregate_beats_global"):
        assert 0.0 <= res[key] <= 1.0
    # w = 0: each aggregate is the global itself, so it never beats it
    assert subregion_vs_global(model, images, text, k=4, w=0.0)["aggregate_beats_global"] == 0.0


def test_run_dir_of(tmp_path):
    ck = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert run_dir_of(ck) == tmp_path / "run"
    assert run_dir_of(tmp_path / "run") == tmp_path / "run"
    assert gap_json_path(ck) == tmp_path / "run" / "gap" / "gap.json"


def test_cli_analyze_gap_end_to_end(tmp_path, capsys):
    from finealign.cli import main
    from finealign.train.loop import Trainer
    run = tmp_path / "run"
    cfg = load_config("clip", ["data.source=shapes", "data.num_samples=64", "data.batch_size=16",
                               "train.steps=2", "train.ckpt_every=0", "tokenizer.vocab_size=300",
                               "train.threads=1", f"train.run_dir={run}"])
    run = Trainer(cfg, progress=False).train()
    assert main(["analyze", "gap", str(run), "--max-images", "32", "--no-progress", "-k", "4"]) == 0
    out = capsys.readouterr().out
    assert "suggested_noise_var" in out and "subregion beats global" in out
    res = json.loads((run / "gap" / "gap.json").read_text())
    assert isinstance(res["suggested_noise_var"], float) and res["suggested_noise_var"] > 0
    assert 2 <= res["n_pairs"] <= 32 and res["split"] == cfg.data.test
    assert 0.0 <= res["subregions"]["subregion_beats_global"] <= 1.0
    for name in ("gap_hist.png", "gap_qq.png", "gap_subregions.png"):
        assert (run / "gap" / name).stat().st_size > 0
    # a data override and an explicit --out; a model override is refused
    other = tmp_path / "other"
    assert main(["analyze", "gap", str(run), "--out", str(other), "--no-progress", "data.num_samples=8"]) == 0
    assert json.loads((other / "gap.json").read_text())["n_pairs"] <= 8
    assert main(["analyze", "gap", str(run), "--no-progress", "model.embed_dim=8"]) == 2


def test_gap_statistics_skewness_kurtosis_hand_made():
    """E = 1, d = i - t = (0, 0, 3): μ = 1, c = (-1, -1, 2), m2 = 2, m3 = 2, m4 = 6, so
    skewness = m3 / m2^1.5 = 1/√2 and excess kurtosis = m4 / m2² - 3 = -1.5."""
    image = torch.tensor([[1.0], [2.0], [5.0]])
    text = torch.tensor([[1.0], [2.0], [2.0]])
    st = gap_statistics(image, text)
    assert st["per_dim_mean"] == pytest.approx([1.0])
    assert st["centred_var"] == pytest.approx(2.0)
    assert st["skewness"] == pytest.approx(1 / math.sqrt(2))
    assert st["excess_kurtosis"] == pytest.approx(-1.5)


def test_gap_statistics_skewness_of_scaled_exponential():
    """Differences 3 · Exp(1) (variance 9): skewness 2 and excess kurtosis 6 whatever the scale."""
    M, E = 20000, 4
    g = torch.Generator().manual_seed(2)
    text = torch.randn(M, E, generator=g, dtype=torch.float64)
    d = 3.0 * torch.empty(M, E, dtype=torch.float64).exponential_(1.0, generator=g)
    st = gap_statistics(text + d, text)
    assert st["centred_var"] == pytest.approx(9.0, rel=0.05)
    assert st["skewness"] == pytest.approx(2.0, abs=0.15)
    assert st["excess_kurtosis"] == pytest.approx(6.0, abs=1.5)


def test_run_gap_analysis_pairs_first_caption_and_restores_train_mode(tmp_path, monkeypatch):
    """Each image is paired with its first non-empty caption (images with none are left out), and a model
    given in train mode is back in train mode afterwards (the analysis itself runs in eval mode)."""
    from PIL import Image

    from finealign.analysis.gap import run_gap_analysis
    from finealign.api import Loaded
    from finealign.data import loader
    from finealign.data.tokenizer import Tokenizer
    from finealign.data.transforms import ImageTransform
    from finealign.types import Sample

    colours = [(220, 40, 40), (40, 170, 60), (40, 90, 235), (245, 215, 30), (150, 60, 200)]
    captions = [["a red circle", "a big blue star at the bottom"],
                ["   ", "a green square", "a yellow cross on the left"],     # first non-empty: the 2nd
                ["a blue star", "two purple triangles"],
                ["  ", ""],                                                  # no caption: left out
                ["a purple cross", "an orange circle in the top right"]]
    pil = [Image.new("RGB", (40, 40), c) for c in colours]
    samples = [Sample(key=f"img{i}", load_image=(lambda im=im: im), captions=caps, image_id=i)
               for i, (im, caps) in enumerate(zip(pil, captions))]
    monkeypatch.setattr(loader, "build_source", lambda cfg, split, skips: list(samples))

    torch.manual_seed(0)
    cfg = load_config("clip", TINY + ["data.source=shapes", "data.eval_batch_size=2", "data.workers=0"])
    tok = Tokenizer.train([c for caps in captions for c in caps if c.strip()], 300)
    model = build_model(cfg.model, tok.vocab_size).train()
    seen_modes = []
    orig_encode_text = model.encode_text

    def encode_text(*a, **k):
        seen_modes.append(model.training)
        return orig_encode_text(*a, **k)

    monkeypatch.setattr(model, "encode_text", encode_text)
    loaded = Loaded(model, tok, cfg, tmp_path / "run" / "checkpoints" / "step_00000001")
    res = run_gap_analysis(loaded, out_dir=tmp_path / "gap", progress=False, k=2)
    assert seen_modes and not any(seen_modes)                # embedded in eval mode
    assert model.training and all(m.training for m in model.modules())    # train mode restored
    assert res["n_pairs"] == 4

    # the same statistic recomputed by hand from the first non-empty captions (eval mode)
    kept = [0, 1, 2, 4]
    model.eval()
    tf = ImageTransform(cfg.model.image_size, train=False)
    images = torch.stack([tf(pil[i]) for i in kept])

    def pair_cos(caps):
        ids, mask = tok.encode_batch(caps, cfg.model.context_length)
        with torch.no_grad():
            i = F.normalize(model.encode_image(images, memory=False)["embed"].double(), dim=-1)
            t = F.normalize(orig_encode_text(ids, mask)["embed"].double(), dim=-1)
        return float((i * t).sum(-1).mean())

    first = pair_cos(["a red circle", "a green square", "a blue star", "a purple cross"])
    last = pair_cos([captions[i][-1] for i in kept])
    assert abs(first - last) > 1e-3                          # the choice of caption is visible here
    assert res["pair_cos_mean"] == pytest.approx(first, abs=1e-5)
