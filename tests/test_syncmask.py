"""SyncMask on the fusion model: the synchronized masker against its definition, the MLM/MIM pass that
hides masked words and patches together, ITC with feature queues and the alpha ramp."""
import math

import pytest
import torch
import torch.nn.functional as F

from finealign.config import ConfigError, load_config
from finealign.masking.sync import SynchronizedMasker
from finealign.models.factory import build_model
from finealign.objectives.base import StepContext
from finealign.objectives.itc import ITC, distilled_contrastive_loss, queued_contrastive_loss
from finealign.pipeline import Pipeline
from finealign.train.loop import Trainer
from finealign.types import Batch, Features


class _Tok:
    pad_id, bos_id, eos_id = 0, 1, 2
    mask_id, vocab_size, special_ids = 4, 64, [0, 1, 2, 3, 4]


def _attention():
    """1 sample, T = 6 tokens [bos, w1, w2, w3, w4, eos], N = 8 patches. Row sums = 1."""
    a = torch.full((1, 6, 8), 1 / 8)
    a[0, 1] = torch.tensor([.30, .30, .05, .05, .05, .05, .10, .10])   # w1: top-2 mass .60
    a[0, 2] = torch.tensor([.02, .02, .02, .45, .02, .40, .05, .02])   # w2: top-2 mass .85 (patches 3, 5)
    a[0, 3] = torch.tensor([.125] * 8)                                 # w3: flat, .25
    a[0, 4] = torch.tensor([.05, .05, .05, .05, .50, .10, .10, .10])   # w4: .60
    a[0, 0] = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1.0])                 # bos: 1.0 but special
    return a


def test_sync_masker_picks_the_most_grounded_word_and_its_patches():
    attn, mask = _attention(), torch.ones(1, 6, dtype=torch.bool)
    special = torch.tensor([[True, False, False, False, False, True]])
    # 4 maskable words * 0.25 = 1 word; 8 patches * 0.25 = 2 patches
    pos, idx = SynchronizedMasker(words=0.25, patches=0.25)(attn, mask, special)
    assert pos.tolist() == [[0, 2]]                                     # w2, not the special bos
    assert idx.masked.tolist() == [[3, 5]]                              # where w2 looks
    assert idx.keep.tolist() == [[0, 1, 2, 4, 6, 7]]
    # two words (w2, then w1/w4 tie at .60 -> lower column w1); patches by their summed attention:
    # p0=.32, p1=.32, p3=.50, p5=.45 -> 3 and 5
    pos, idx = SynchronizedMasker(words=0.5, patches=0.25)(attn, mask, special)
    assert pos.tolist() == [[0, 1], [0, 2]]
    assert idx.masked.tolist() == [[3, 5]]
    # 4 patches: .50 (3), .45 (5), then p0 = p1 = .32 -> 0 and 1
    _, idx = SynchronizedMasker(words=0.5, patches=0.5)(attn, mask, special)
    assert idx.masked.tolist() == [[0, 1, 3, 5]]


def test_sync_masker_ignores_pads_and_handles_rows_without_words():
    attn = _attention().repeat(2, 1, 1)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 2] = False                                                  # w2 is padding in row 0
    special = torch.zeros(2, 6, dtype=torch.bool)
    special[:, 0] = special[:, 5] = True
    special[1, 1:5] = True                                              # row 1: nothing maskable
    pos, idx = SynchronizedMasker(words=0.25, patches=0.25)(attn, mask, special)
    assert 2 not in pos[pos[:, 0] == 0, 1].tolist() and (pos[:, 0] == 1).sum() == 0
    assert pos[pos[:, 0] == 0, 1].tolist() == [1]                       # w1 (tie with w4, lower column)
    assert idx.masked.shape == (2, 2)                                   # row 1 still masks 2 patches
    # row 1 falls back to the attention of all real tokens: p7 (bos 1.0 + ...) is the largest
    assert 7 in idx.masked[1].tolist()


def _batch(cfg, B=4, T=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(5, 64, (B, T), generator=g)
    text[:, 0], text[:, -1] = 1, 2
    S = cfg.model.image_size
    return Batch(images=torch.randn(B, 3, S, S, generator=g), text=text, text_mask=torch.ones(B, T, dtype=torch.bool),
                 image_ids=torch.arange(B), item_ids=torch.arange(B), captions=[""] * B, keys=[""] * B)


def test_pipeline_masks_words_and_patches_from_the_teachers_attention():
    cfg = load_config("syncmask")
    torch.manual_seed(0)
    model = build_model(cfg.model, 64)
    b = _batch(cfg)
    pipe = Pipeline(model, cfg.masking, _Tok(), needs={"mlm_logits", "mim_pred"})
    feats = model.encode(b)
    masks = pipe._sync_masks(feats, b)
    # recompute from the teacher's fusion by hand: same words, same patches
    t = model.teacher.module
    with torch.no_grad():
        cls, patches = t.visual(b.images)
        _, tokens = t.text(b.text, b.text_mask)
        attn = t.fusion(tokens, b.text_mask, torch.cat([cls[:, None], patches], 1), attn_layers=[-1])["attn"][0]
    special = torch.zeros_like(b.text_mask)
    special[:, 0] = special[:, -1] = True
    pos, idx = SynchronizedMasker(0.15, 0.25)(attn[..., 1:], b.text_mask, special)
    assert torch.equal(masks["mlm"][1], pos) and torch.equal(masks["mim"].masked, idx.masked)
    N = model.visual.num_patches
    assert masks["mim"].masked.shape == (4, round(0.25 * N))
    out = model.heads(feats, b, masks, needs={"mlm_logits", "mim_pred"})
    assert out.extras["mlm_logits"].shape == (pos.shape[0], 64)
    assert out.extras["mim_pred"].shape == (4, idx.masked.shape[1], 3 * cfg.model.patch_size ** 2)


def test_masked_patches_are_hidden_from_mlm_and_mim():
    """Changing the pixels of masked patches changes neither the MLM logits nor the MIM predictions:
    the words are predicted from the visible image only (what makes the masks synchronized)."""
    cfg = load_config("syncmask")
    torch.manual_seed(0)
    model = build_model(cfg.model, 64).eval()
    b = _batch(cfg)
    pipe = Pipeline(model, cfg.masking, _Tok(), needs={"mlm_logits", "mim_pred"})
    with torch.no_grad():
        feats = model.encode(b)
        masks = pipe._sync_masks(feats, b)
        out1 = model.heads(feats, b, masks, needs={"mlm_logits", "mim_pred"})
        p = cfg.model.patch_size
        g = cfg.model.image_size // p
        images = b.images.clone()
        for r in range(4):
            for i in masks["mim"].masked[r].tolist():
                images[r, :, (i // g) * p:(i // g + 1) * p, (i % g) * p:(i % g + 1) * p] = 5.0
        b2 = Batch(images=images, text=b.text, text_mask=b.text_mask, image_ids=b.image_ids,
                   item_ids=b.item_ids, captions=b.captions, keys=b.keys)
        out2 = model.heads(model.encode(b2), b2, masks, needs={"mlm_logits", "mim_pred"})
        assert torch.allclose(out1.extras["mlm_logits"], out2.extras["mlm_logits"], atol=1e-5)
        assert torch.allclose(out1.extras["mim_pred"], out2.extras["mim_pred"], atol=1e-5)
        # ... while a visible patch does change them
        keep = masks["mim"].keep[0, 0].item()
        images[0, :, (keep // g) * p:(keep // g + 1) * p, (keep % g) * p:(keep % g + 1) * p] = 5.0
        out3 = model.heads(model.encode(b2), b2, masks, needs={"mlm_logits", "mim_pred"})
        assert not torch.allclose(out1.extras["mim_pred"][0], out3.extras["mim_pred"][0], atol=1e-5)


def test_queued_itc_matches_hand_computation():
    g = torch.Generator().manual_seed(1)
    img, txt, ti, tt = (F.normalize(torch.randn(3, 4, generator=g), dim=-1) for _ in range(4))
    qi, qt = (F.normalize(torch.randn(2, 4, generator=g), dim=-1) for _ in range(2))
    s, a = torch.tensor(5.0), 0.4
    loss, _ = queued_contrastive_loss(img, txt, s, ti, tt, qi, qt, a)
    kt, ki = torch.cat([tt, qt]), torch.cat([ti, qi])
    total = 0.0
    for anchor, t_anchor, keys in ((img, ti, kt), (txt, tt, ki)):
        for r in range(3):
            p_t = torch.softmax(s * t_anchor[r] @ keys.t(), 0)
            y = a * p_t + (1 - a) * F.one_hot(torch.tensor(r), 5).float()
            logp = torch.log_softmax(s * anchor[r] @ keys.t(), 0)
            total += -(y * logp).sum().item() / 3
    assert math.isclose(loss.item(), total / 2, rel_tol=1e-5)
    # an empty queue with the teacher equal to the student is plain distillation
    e = torch.zeros(0, 4)
    assert torch.allclose(queued_contrastive_loss(img, txt, s, img, txt, e, e, a)[0],
                          distilled_contrastive_loss(img, txt, s, img, txt, a)[0])


def test_distillation_alpha_ramps_linearly():
    obj = ITC(distill_alpha=0.4, distill_warmup=100)
    g = torch.Generator().manual_seed(0)
    e = [F.normalize(torch.randn(3, 4, generator=g), dim=-1) for _ in range(2)]
    feats = Features(image_embed=e[0], text_embed=e[1], logit_scale=torch.tensor(10.0),
                     extras={"teacher_image_embed": e[0], "teacher_text_embed": e[1]})
    got = [obj(feats, None, StepContext(step=s))["alpha"].item() for s in (0, 50, 100, 400)]
    assert got == pytest.approx([0.0, 0.2, 0.4, 0.4])


def test_distillation_warmup_of_one_epoch_and_its_fallback(caplog):
    obj = ITC(distill_alpha=0.4, distill_warmup="epoch")
    g = torch.Generator().manual_seed(0)
    e = [F.normalize(torch.randn(3, 4, generator=g), dim=-1) for _ in range(2)]
    feats = Features(image_embed=e[0], text_embed=e[1], logit_scale=torch.tensor(10.0),
                     extras={"teacher_image_embed": e[0], "teacher_text_embed": e[1]})
    got = [obj(feats, None, StepContext(step=s, steps_per_epoch=20))["alpha"].item() for s in (0, 5, 20, 50)]
    assert got == pytest.approx([0.0, 0.1, 0.4, 0.4])
    with caplog.at_level("WARNING"):                    # a stream of unknown length: no ramp, said once
        got = [obj(feats, None, StepContext(step=s))["alpha"].item() for s in (0, 1)]
    assert got == pytest.approx([0.4, 0.4])
    assert [r.getMessage() for r in caplog.records].count(
        "objectives.itc.distill_warmup: a ramp over one epoch, but this run's epoch length is unknown (a stream "
        "without data.resample): no ramp; set objectives.itc.distill_warmup to a number of steps") == 1
    for bad in (-1, "epochs", 1.5, True):
        with pytest.raises(ValueError, match="distill_warmup must be a number of steps >= 0 or 'epoch'"):
            ITC(distill_alpha=0.4, distill_warmup=bad)
    assert load_config("albef").objectives["itc"]["distill_warmup"] == "epoch"


def test_a_teacher_nothing_reads_is_warned_about(tmp_path, caplog):
    from finealign.config_checks import teacher_readers
    base = ["data.source=shapes-items", "data.num_samples=64", "data.batch_size=16", "data.sampler=random",
            "train.steps=1", "train.ckpt_every=0"]
    warning = "builds an EMA teacher that nothing in this config reads"
    with caplog.at_level("WARNING"):
        Trainer(load_config("albef", [*base, "objectives.itc.distill_alpha=0", f"train.run_dir={tmp_path / 'a'}"]),
                progress=False)
    assert sum(warning in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level("WARNING"):
        Trainer(load_config("albef", [*base, f"train.run_dir={tmp_path / 'b'}"]), progress=False)   # distillation
        Trainer(load_config("syncmask", [*base, "objectives.itc.distill_alpha=0", f"train.run_dir={tmp_path / 'c'}"]),
                progress=False)                                                                     # sync masks
    assert not any(warning in r.getMessage() for r in caplog.records)
    assert teacher_readers(load_config("semmim")) == [
        "objectives.itc.distill_alpha > 0", "masking.relevance=attention", "objectives.agreement",
        "model.mim_target=semantic"]
    for row, reads in (("1-albef", False), ("2-sync", True), ("3-semihard", False), ("4-syncmask", True)):
        cfg = load_config(f"configs/ablations/syncmask/{row}.yaml")
        assert bool(teacher_readers(cfg)) == reads == (cfg.model.momentum > 0), row


def test_queue_fills_with_teacher_embeddings_and_survives_checkpoints(tmp_path):
    cfg = load_config("syncmask", ["model.queue_size=40", "data.source=shapes-items", "data.num_samples=192",
                                   "data.batch_size=16", "data.sampler=random", "train.steps=3", "train.ckpt_every=0",
                                   "train.log_every=1", f"train.run_dir={tmp_path}"])
    t = Trainer(cfg, progress=False)
    t.train()
    q = t.model.queues["text"]
    assert len(q) == 40 and q._count == 48                              # 3 steps x 16, wrapped around
    from finealign.api import load
    loaded = load(str(tmp_path))
    assert torch.equal(loaded.model.queues["text"].get(), q.get())
    with pytest.raises(ConfigError, match="queue_size"):
        load_config("clip", ["model.queue_size=8"])


def test_viz_masks_shows_synchronized_words_and_patches(tmp_path):
    from PIL import Image

    from finealign.analysis.viz_sync import sync_panels
    from finealign.api import load
    from finealign.cli import main
    run = tmp_path / "run"
    assert main(["train", "syncmask", "data.source=shapes-items", "data.num_samples=96", "data.batch_size=16",
                 "data.sampler=random", "train.steps=2", f"train.run_dir={run}", "--no-progress"]) == 0
    loaded = load(str(run))
    img = tmp_path / "x.png"
    Image.new("RGB", (64, 64), "red").save(img)
    from finealign.data.transforms import ImageTransform
    image = ImageTransform(loaded.config.model.image_size, train=False)(Image.open(img).convert("RGB"))
    panels = sync_panels(loaded.model, loaded.tokenizer, loaded.config, image, "a large red circle on the left")
    words = [w for w, _ in panels["tokens"]]
    assert "".join(words).replace(" ", "") == "alargeredcircleontheleft"
    assert sum(m for _, m in panels["tokens"]) == 1                     # 15% of 7 words -> 1
    N = loaded.model.visual.num_patches
    assert panels["mim"].masked.shape == (1, round(0.25 * N)) and panels["reconstruction"].shape == image.shape
    out = tmp_path / "m.png"
    assert main(["viz", "masks", str(run), "--image", str(img), "--text", "a red circle", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size[0] > 3 * im.size[1]                              # four panels side by side
