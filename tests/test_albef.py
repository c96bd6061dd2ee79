"""The ALBEF-style fusion family (model.arch=fusion): bidirectional text encoder, fusion heads gated by
the active objectives, ITM with hard negatives, MLM on masked words; trains and evaluates by config."""
import torch

from finealign.config import load_config
from finealign.eval.runner import evaluate
from finealign.models.factory import build_model
from finealign.pipeline import Pipeline
from finealign.train.logging import read_metrics
from finealign.train.loop import Trainer
from finealign.types import Batch


class _Tok:
    mask_id, vocab_size, special_ids = 4, 64, [0, 1, 2, 3, 4]


def _batch(cfg, B=4, T=8):
    g = torch.Generator().manual_seed(0)
    text = torch.randint(5, 64, (B, T), generator=g)
    text[:, 0], text[:, -1] = 1, 2
    mask = torch.ones(B, T, dtype=torch.bool)
    S = cfg.model.image_size
    return Batch(images=torch.randn(B, 3, S, S, generator=g), text=text, text_mask=mask,
                 image_ids=torch.arange(B), item_ids=torch.tensor([0, 0, 1, 2]), captions=[""] * B, keys=[""] * B)


def test_fusion_heads_follow_the_active_objectives():
    cfg = load_config("albef")
    torch.manual_seed(0)
    model = build_model(cfg.model, 64)
    b = _batch(cfg)
    full = Pipeline(model, cfg.masking, _Tok(), needs={"itm_logits", "mlm_logits", "image_embed"})(b)
    assert full.extras["itm_logits"].shape == (12, 2) and full.extras["itm_num_pos"] == 4
    M = full.extras["mlm_positions"].shape[0]
    assert M >= 4 and full.extras["mlm_logits"].shape == (M, 64)
    itc_only = Pipeline(model, cfg.masking, _Tok(), needs={"image_embed", "text_embed"})(b)
    assert "itm_logits" not in itc_only.extras and "mlm_logits" not in itc_only.extras


def test_bidirectional_text_encoder_pools_bos_and_ignores_pads():
    cfg = load_config("albef")
    torch.manual_seed(0)
    model = build_model(cfg.model, 64).eval()
    b = _batch(cfg)
    with torch.no_grad():
        pooled, _ = model.text(b.text, b.text_mask)
        later = b.text.clone()
        later[:, 5] = 7                                          # a later word changes the BOS output
        assert not torch.allclose(model.text(later, b.text_mask)[0], pooled)
        padded = torch.cat([b.text, torch.zeros(4, 3, dtype=torch.long)], 1)
        pmask = torch.cat([b.text_mask, torch.zeros(4, 3, dtype=torch.bool)], 1)
        assert torch.allclose(model.text(padded, pmask)[0], pooled, atol=1e-5)


def test_albef_trains_on_shapes_and_retrieves(tmp_path):
    cfg = load_config("albef", ["data.source=shapes", "data.num_samples=512", "data.batch_size=32",
                                "train.steps=120", "train.lr=1e-3", "train.warmup=10", "train.log_every=1",
                                "train.ckpt_every=0", f"train.run_dir={tmp_path}", "eval.max_images=64"])
    t = Trainer(cfg, progress=False)
    t.train()
    rows = read_metrics(tmp_path)

    def start_end(key):
        v = [r[f"train/{key}"] for r in rows]
        return sum(v[:10]) / 10, sum(v[-10:]) / 10
    mlm0, mlm1 = start_end("mlm/loss")
    assert mlm1 < 0.6 * mlm0 and start_end("mlm/acc")[1] > 0.3      # masked words are being predicted
    itc0, itc1 = start_end("itc/loss")
    assert itc1 < itc0 - 0.3                                           # contrastive alignment is learning
    assert start_end("itm/acc")[1] >= 0.6                              # ITM runs on 1 pos + 2 hard negs per pair
    # the fusion model plugs into the standard evaluation (dual-encoder retrieval)
    res = evaluate(t.model, t.tokenizer, cfg, split="test", tasks=["retrieval", "caption"], progress=False)
    assert "caption" not in res and res["num_images"] == 64 and res["retrieval"]["num_texts"] == 64


def test_momentum_teacher_follows_by_ema_and_survives_checkpoints(tmp_path):
    import finealign
    cfg = load_config("albef", ["data.source=shapes", "data.num_samples=64", "data.batch_size=16",
                                "train.steps=2", "train.lr=1e-2", "train.warmup=0", "train.ckpt_every=0",
                                f"train.run_dir={tmp_path}", "model.momentum=0.5"])
    t = Trainer(cfg, progress=False)
    teacher = t.model.teacher
    assert all(not p.requires_grad for p in teacher.parameters())
    opt_params = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in opt_params for p in teacher.parameters())
    before_t = teacher.module.image_proj.weight.clone()
    t.train()
    # two EMA steps with m = 0.5 after each optimizer step: the teacher moved, but not onto the student
    after_t, student = teacher.module.image_proj.weight, t.model.image_proj.weight
    assert not torch.equal(after_t, before_t) and not torch.allclose(after_t, student)
    loaded = finealign.load(tmp_path)
    assert torch.equal(loaded.model.teacher.module.image_proj.weight, after_t)
    assert loaded.model.teacher.momentum == 0.5
