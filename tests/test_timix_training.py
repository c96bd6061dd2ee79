"""TiMix end to end: composes with clip / coca / sycoca / albef by config alone, falls back to the
relevance score without region data (and says so), mixes identically in the gradient-accumulation
pre-pass, and the PTA head learns where the described objects are."""
from __future__ import annotations

import logging

import pytest
import torch

from finealign.config import load_config
from finealign.data.loader import Collator, PairDataset, build_source
from finealign.data.skips import SkipLog
from finealign.data.transforms import ImageTransform
from finealign.objectives.pta import patch_labels
from finealign.train.logging import read_metrics
from finealign.train.loop import Trainer

SMALL = ["data.source=shapes", "data.num_samples=200", "data.batch_size=16", "train.log_every=1",
         "train.ckpt_every=0", "tokenizer.vocab_size=300", "eval.tasks=[retrieval]"]
TIMIX = ["mixer=timix", "objectives.mixed_itc.weight=1", "objectives.mixed_itc.ramp=1", "model.pta=true",
         "objectives.pta.weight=1"]


@pytest.mark.parametrize("recipe", ["clip", "coca", "sycoca", "albef"])
def test_timix_composes_with_every_family_by_config(recipe, tmp_path):
    cfg = load_config(recipe, SMALL + TIMIX + ["train.steps=3", f"train.run_dir={tmp_path}"])
    Trainer(cfg, progress=False).train()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # step 3 (index 2) is past mixer.stop = 2/3 of 3 steps: no mixing, loss 0
    for r in rows[1:2]:
        assert r["train/mixed_itc/raw"] > 0 and r["train/mixed_itc/by_pta"] == 1.0
        assert r["train/mixed_itc/loss"] == pytest.approx(r["train/mixed_itc/raw"])     # gamma = 1 after 1 step
        assert r["train/pta/with_regions"] == 1.0 and 0 < r["train/pta/loss"] < 5
    assert rows[2]["train/mixed_itc/loss"] == 0.0 and "train/mixed_itc/raw" not in rows[2]
    if recipe in ("coca", "sycoca"):
        assert rows[1]["train/ic/loss"] > 0


def test_without_regions_timix_scores_by_relevance_and_logs_it(tmp_path, caplog):
    cfg = load_config("clip", SMALL + ["mixer=timix", "objectives.mixed_itc.weight=1", "train.steps=2",
                                       f"train.run_dir={tmp_path}"])
    with caplog.at_level(logging.WARNING, logger="finealign"):
        Trainer(cfg, progress=False).train()
    msgs = [r.getMessage() for r in caplog.records if "patch-text relevance" in r.getMessage()]
    assert len(msgs) == 1 and "no PTA head" in msgs[0]          # said once, not every step
    rows = read_metrics(tmp_path)
    assert rows[0]["train/mixed_itc/by_pta"] == 0.0


def test_gradient_accumulation_mixes_the_same_images_in_the_pre_pass(tmp_path):
    cfg = load_config("clip", SMALL + TIMIX + ["train.steps=20", "train.grad_accum=2",
                                                f"train.run_dir={tmp_path}"])
    t = Trainer(cfg, progress=False)
    batch = next(iter(t.loader))
    half = batch.slice(0, 8)
    t.model.eval()
    with torch.no_grad():
        a = t.pipeline.encode(half, step=0, micro=1).extras
        b = t.pipeline.encode(half, step=0, micro=1).extras
        c = t.pipeline.encode(half, step=5, micro=1).extras
    assert torch.equal(a["mixed_image_embed"], b["mixed_image_embed"])
    assert torch.equal(a["mix_offset"], torch.arange(7, -8, -2))          # flipped within the micro-batch
    assert not (torch.equal(a["mixed_image_embed"], c["mixed_image_embed"]) and torch.equal(
        a["mix_lambda"], c["mix_lambda"]))
    m = t.train_step(batch.to(t.device))
    assert m["mixed_itc/raw"] > 0 and torch.isfinite(torch.tensor(m["loss"]))


def test_pta_head_learns_where_the_described_objects_are(tmp_path):
    """After 80 steps on shapes the PTA scores rank patches inside the grounded boxes above the
    others on unseen validation scenes (AUC well above the 0.5 of chance)."""
    cfg = load_config("timix", ["data.num_samples=1000", "data.batch_size=32", "train.steps=80",
                                "train.lr=2e-3", "train.warmup=10", "train.log_every=20", "train.ckpt_every=0",
                                "tokenizer.vocab_size=300", f"train.run_dir={tmp_path}",
                                "objectives.mixed_itc.weight=0", "mixer.type=", "objectives.itc.weight=0.1"])
    torch.manual_seed(0)
    t = Trainer(cfg, progress=False)
    t.train()
    rows = read_metrics(tmp_path)
    assert rows[-1]["train/pta/loss"] < 0.75 * rows[0]["train/pta/loss"]
    val = build_source(cfg.data, "val", SkipLog())
    ds = PairDataset(list(val)[:64], ImageTransform(cfg.model.image_size, train=False), train=False)
    batch = Collator(t.tokenizer, cfg.model.context_length)([ds[i] for i in range(64)])
    t.model.eval()
    with torch.no_grad():
        logp = t.model.encode(batch).extras["pta_logp"][..., 1]                   # (B, N)
    labels, has = patch_labels(batch.extras["regions"], batch.captions, 8, cfg.model.image_size)
    pos, neg = logp[labels == 1], logp[labels == 0]
    auc = (pos[:, None] > neg[None, :]).float().mean().item()
    assert has.all() and auc > 0.8, auc


def test_viz_mix_draws_the_grid(tmp_path):
    from PIL import Image
    from finealign.cli import main
    run = tmp_path / "run"
    cfg = load_config("clip", SMALL + TIMIX + ["train.steps=1", f"train.run_dir={run}"])
    Trainer(cfg, progress=False).train()
    out = tmp_path / "mix.png"
    assert main(["viz", "mix", str(run), "--num", "3", "--out", str(out)]) == 0
    w, h = Image.open(out).size
    assert w > 1000 and h > 600                         # 5 columns x 3 rows
    assert main(["viz", "mix", str(run), "--mixer", "mixup", "--out", str(out)]) == 0


def test_study_plot_groups_rows_into_series(tmp_path):
    import json
    from finealign.analysis.plot_study import study_series
    from finealign.cli import main
    stat = lambda m: {"mean": m, "std": 1.0, "n": 3, "values": [m] * 3}     # noqa: E731
    rows = [{"recipe": f"{name}-{f}", "varied": {"data.fraction": f / 100}, "metrics": {"t2i_r1": stat(v)}}
            for name, f, v in [("nomix", 100, 10.0), ("nomix", 25, 4.0), ("timix", 25, 6.0), ("timix", 100, 11.0)]]
    results = {"rows": rows, "seeds": [0, 1, 2]}
    assert study_series(results, "data.fraction", "t2i_r1") == {
        "nomix": [(0.25, 4.0, 1.0), (1.0, 10.0, 1.0)], "timix": [(0.25, 6.0, 1.0), (1.0, 11.0, 1.0)]}
    with pytest.raises(ValueError, match="no varied key"):
        study_series(results, "train.lr", "t2i_r1")
    with pytest.raises(ValueError, match="'t2i_r1_typo'; the rows report: t2i_r1"):
        study_series(results, "data.fraction", "t2i_r1_typo")
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert main(["viz", "study", str(path), "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 1000
