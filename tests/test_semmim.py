"""SemMIM: centring / sharpening math, the shared prototype head, semantic targets (masked patches only,
text-fused or not), text-guided masks from the teacher's attention, a short run that does not collapse."""
import math

import pytest
import torch

from finealign.config import ConfigError, load_config
from finealign.models.factory import build_model
from finealign.objectives.agreement import Agreement, soft_cross_entropy, teacher_targets, usage_entropy
from finealign.objectives.base import StepContext
from finealign.objectives.semantic_mim import SemanticMIM
from finealign.pipeline import Pipeline
from finealign.train.logging import read_metrics
from finealign.train.loop import Trainer
from finealign.types import Batch, Features

SEMMIM = "configs/ablations/semmim/5-semmim.yaml"


class _Tok:
    mask_id, vocab_size, special_ids = 4, 64, [0, 1, 2, 3, 4]


def _cfg(*extra):
    return load_config(SEMMIM, ["model.prototypes=32", "model.proto_dim=16", *extra])


def _batch(cfg, B=4, T=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(5, 64, (B, T), generator=g)
    text[:, 0], text[:, -1] = 1, 2
    S = cfg.model.image_size
    return Batch(images=torch.randn(B, 3, S, S, generator=g), text=text, text_mask=torch.ones(B, T, dtype=torch.bool),
                 image_ids=torch.arange(B), item_ids=torch.arange(B), captions=[""] * B, keys=[""] * B,
                 images2=torch.randn(B, 3, S, S, generator=g))


def test_centring_sharpening_and_cross_entropy_by_hand():
    t = torch.tensor([[1.0, 2.0, 0.0]])
    c = torch.tensor([0.5, 0.5, -0.5])
    p = teacher_targets(t, c, 0.5)                          # softmax([1, 3, 1])
    e = [math.exp(1), math.exp(3), math.exp(1)]
    assert torch.allclose(p, torch.tensor([[x / sum(e) for x in e]]), atol=1e-6)
    s = torch.tensor([[0.2, -0.1, 0.0]])
    logq = [v - math.log(sum(math.exp(u) for u in (2.0, -1.0, 0.0))) for v in (2.0, -1.0, 0.0)]  # s / 0.1
    want = -sum(pi * lq for pi, lq in zip(p[0].tolist(), logq))
    assert math.isclose(soft_cross_entropy(p, s, 0.1).item(), want, rel_tol=1e-5)
    assert math.isclose(usage_entropy(torch.full((5, 4), 0.25)).item(), math.log(4), rel_tol=1e-6)
    assert usage_entropy(torch.tensor([[1.0, 0.0], [1.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)


def test_agreement_crosses_views_updates_centre_and_warms_temperature():
    obj = Agreement(student_temp=0.1, teacher_temp=0.04, teacher_temp_final=0.07, teacher_temp_warmup=10,
                    center_momentum=0.9)
    assert [obj.teacher_temp(s) for s in (0, 5, 10, 50)] == pytest.approx([0.04, 0.055, 0.07, 0.07])
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    out = obj(Features(extras={"agree_student": s, "agree_teacher": t}), None, StepContext(step=5))
    p = teacher_targets(t, torch.zeros(5), 0.055)
    want = (soft_cross_entropy(p[0], s[1], 0.1).mean() + soft_cross_entropy(p[1], s[0], 0.1).mean()) / 2
    assert torch.allclose(out["loss"], want)
    assert torch.allclose(obj.center, 0.1 * t.reshape(-1, 5).mean(0))      # 0.9 * 0 + 0.1 * mean
    obj(Features(extras={"agree_student": s, "agree_teacher": t}), None, StepContext(step=5))
    assert torch.allclose(obj.center, 0.19 * t.reshape(-1, 5).mean(0))


def test_semantic_mim_loss_by_hand_with_its_temperatures_and_centre():
    """Per masked patch: CE(softmax((t - c) / τ_t), softmax(s / τ_s)), averaged over patches; the centre
    then moves to m·c + (1 - m)·mean(t) and is subtracted at the next call."""
    obj = SemanticMIM(student_temp=0.2, teacher_temp=0.05, teacher_temp_final=0.05, center_momentum=0.8)
    s = torch.tensor([[[0.3, -0.2, 0.1], [0.0, 0.4, -0.3]]])          # (B 1, M 2, K 3)
    t = torch.tensor([[[0.10, 0.00, 0.05], [-0.02, 0.06, 0.01]]])

    def softmax(xs):
        e = [math.exp(x - max(xs)) for x in xs]
        return [x / sum(e) for x in e]

    def want(center):
        total = 0.0
        for sp, tp in zip(s[0].tolist(), t[0].tolist()):
            p = softmax([(x - c) / 0.05 for x, c in zip(tp, center)])
            q = softmax([x / 0.2 for x in sp])
            total -= sum(pi * math.log(qi) for pi, qi in zip(p, q))
        return total / 2

    feats = Features(extras={"mim_pred": s, "mim_teacher_logits": t})
    assert obj(feats, None, StepContext())["loss"].item() == pytest.approx(want([0.0] * 3), rel=1e-5)
    center = [0.2 * m for m in t[0].mean(0).tolist()]                   # 0.8 · 0 + 0.2 · mean
    assert obj.center.tolist() == pytest.approx(center, abs=1e-7)
    assert obj(feats, None, StepContext())["loss"].item() == pytest.approx(want(center), rel=1e-5)


def test_semantic_targets_are_the_teachers_masked_patches_and_teacher_gets_no_gradient():
    cfg = _cfg("model.text_fused_targets=false")
    torch.manual_seed(0)
    model = build_model(cfg.model, 64)
    b = _batch(cfg)
    pipe = Pipeline(model, cfg.masking, _Tok(), needs={"mim_pred", "mim_teacher_logits", "agree_student"})
    feats = pipe(b)
    masked = feats.extras["mim_masked"]                                    # (B, M)
    N, M = model.visual.num_patches, masked.shape[1]
    assert M == round(0.4 * N) and feats.extras["mim_pred"].shape == (4, M, 32)
    t = model.teacher.module
    with torch.no_grad():
        tp = t.visual(b.images)[1]
        want = t.proto_head(torch.gather(tp, 1, masked[..., None].expand(-1, -1, tp.shape[-1])))
    assert torch.allclose(feats.extras["mim_teacher_logits"], want, atol=1e-5)
    # the teacher's tokens at visible patches never reach the targets (nor, so, the loss)
    vis = torch.ones(4, N, dtype=torch.bool).scatter(1, masked, False)            # (B, N) True = visible
    cls, tp_all = feats.extras["teacher_image"]
    noisy = torch.where(vis[..., None], tp_all + 10 * torch.randn_like(tp_all), tp_all)
    f2 = Features(extras={**feats.extras, "teacher_image": (cls, noisy)})
    assert torch.allclose(model._semantic_targets(f2, b, masked), want, atol=1e-5)
    objs = [SemanticMIM(), Agreement()]
    loss = sum(o(feats, b, StepContext())["loss"] for o in objs)
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.proto_head.prototypes.weight.grad is not None and model.visual.cls_token.grad is not None


def test_text_guided_masks_follow_the_teachers_attention():
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model, 64)
    b = _batch(cfg)
    feats = model.encode(b)
    with torch.no_grad():
        rel = model.cross_attention(feats, b).sum(1)                       # (B, N)
    pipe = Pipeline(model, cfg.masking, _Tok(), needs={"mim_pred", "mim_teacher_logits"})
    out = pipe(b)
    M = out.extras["mim_masked"].shape[1]
    want = rel.topk(M, dim=1).indices.sort(1).values
    assert torch.equal(out.extras["mim_masked"], want)


def test_text_fused_targets_depend_on_the_text_unless_fusion_is_identity():
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model, 64).eval()
    b1, b2 = _batch(cfg), _batch(cfg)
    b2.text = b2.text.flip(0)                                              # other captions, same images
    masked = torch.arange(0, model.visual.num_patches, 3)[None].expand(4, -1)

    def targets(b):
        return model._semantic_targets(model.encode(b), b, masked)

    assert not torch.allclose(targets(b1), targets(b2), atol=1e-4)
    for blk in model.teacher.module.image_decoder.blocks:                  # cross-attention adds nothing
        torch.nn.init.zeros_(blk.cross_attn.out.weight) if hasattr(blk.cross_attn, "out") else None
        for name, p in blk.cross_attn.named_parameters():
            if name.startswith(("out", "proj")):
                torch.nn.init.zeros_(p)
    assert torch.allclose(targets(b1), targets(b2), atol=1e-6)


def test_masked_pass_separate_keeps_mlm_off_the_mim_mask_and_mim_off_the_mlm_draw():
    """separate (the semmim recipe): MLM reads the whole image and the MIM decoder the clean caption; joint
    (SyncMask's shared pass): both read the masked image and the masked text."""
    from finealign.masking.base import MaskIndices
    results = {}
    for mode in ("separate", "joint"):
        cfg = _cfg(f"model.masked_pass={mode}")
        torch.manual_seed(0)
        model = build_model(cfg.model, 64).eval()
        b = _batch(cfg)
        N = model.visual.num_patches
        mims = [MaskIndices(keep=torch.arange(k, N, 2)[None].expand(4, -1),
                            masked=torch.arange(1 - k, N, 2)[None].expand(4, -1)) for k in (0, 1)]
        positions = torch.tensor([[0, 3], [1, 3], [2, 5], [3, 5]])
        mlms = []
        for word in (4, 9):                                 # two corruptions of the same positions
            text = b.text.clone()
            text[positions[:, 0], positions[:, 1]] = word
            mlms.append((text, positions))
        out = {}
        with torch.no_grad():
            feats = model.encode(b)
            for i, mim in enumerate(mims):
                for j, mlm in enumerate(mlms):
                    f = model.heads(feats, b, {"mim": mim, "mlm": mlm}, needs={"mlm_logits", "mim_pred"})
                    out[i, j] = f.extras["mlm_logits"], f.extras["mim_pred"]
            whole = model.mlm_head(model.fuse(model.text(mlms[0][0], b.text_mask.bool())[1], b.text_mask.bool(),
                                              feats.extras["image_cls"], feats.image_tokens)["tokens"][
                                                  positions[:, 0], positions[:, 1]])
        results[mode] = out, whole
    out, whole = results["separate"]
    assert torch.allclose(out[0, 0][0], whole, atol=1e-5)              # MLM over the whole image
    assert torch.allclose(out[0, 0][0], out[1, 0][0], atol=1e-6)       # ... whatever the MIM mask
    assert torch.allclose(out[0, 0][1], out[0, 1][1], atol=1e-6)       # MIM ignores the MLM draw
    out, whole = results["joint"]
    assert not torch.allclose(out[0, 0][0], out[1, 0][0], atol=1e-4)   # MLM sees the masked image
    assert not torch.allclose(out[0, 0][1], out[0, 1][1], atol=1e-4)   # MIM reads the masked text
    assert not torch.allclose(out[0, 0][0], whole, atol=1e-4)
    with pytest.raises(ConfigError, match="masked_pass=separate is the fusion arch"):
        load_config("coca", ["model.masked_pass=separate"])
    with pytest.raises(ConfigError, match="joint or separate"):
        load_config("albef", ["model.masked_pass=both"])
    assert load_config("semmim").model.masked_pass == "separate"
    assert load_config("syncmask").model.masked_pass == "joint"


def test_config_guards():
    with pytest.raises(ConfigError, match="semantic"):
        load_config("albef", ["model.mim_target=semantic", "model.mim_decoder_layers=1",
                              "masking.mim={type: random, mask_ratio: 0.4}"])
    with pytest.raises(ConfigError, match="semantic_mim"):
        load_config(SEMMIM, ["objectives.mim.weight=1"])


def test_short_run_learns_without_collapse_and_resumes_centres(tmp_path):
    over = ["model.prototypes=64", "model.proto_dim=32", "data.num_samples=256", "data.batch_size=16",
            "train.steps=24", "train.log_every=1", "train.ckpt_every=12", f"train.run_dir={tmp_path}",
            "objectives.agreement.teacher_temp_warmup=10", "objectives.semantic_mim.teacher_temp_warmup=10",
            "model.momentum=0.99"]
    t = Trainer(load_config(SEMMIM, over), progress=False)
    t.train()
    rows = read_metrics(tmp_path)
    # usage entropy of the batch-mean teacher distribution: 0 = one prototype for everything (collapse),
    # log 16 = 2.77 = every sample of a batch of 16 on its own prototype
    for name, floor in (("agreement", 0.5), ("semantic_mim", 1.0)):
        ent = [r[f"train/{name}/usage_entropy"] for r in rows]
        assert min(ent[-5:]) > floor, (name, ent)
    sem = [r["train/semantic_mim/loss"] for r in rows]
    assert sum(sem[-4:]) / 4 < sum(sem[:4]) / 4             # the student moves toward its targets
    centre = t.objectives["semantic_mim"].center.clone()
    assert centre.shape == (64,) and centre.abs().sum() > 0
    r = Trainer(load_config(SEMMIM, over), resume=str(tmp_path / "checkpoints" / "step_00000024"), progress=False)
    assert torch.equal(r.objectives["semantic_mim"].center, centre)
    assert torch.equal(r.objectives["agreement"].center, t.objectives["agreement"].center)


def test_viz_prototypes_on_a_trained_model(tmp_path):
    from PIL import Image

    from finealign.cli import main
    run = tmp_path / "run"
    assert main(["train", SEMMIM, "model.prototypes=32", "model.proto_dim=16", "data.num_samples=64",
                 "data.batch_size=16", "train.steps=2", f"train.run_dir={run}", "--no-progress"]) == 0
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, c in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (64, 64), c).save(imgs / f"{i}.png")
    out = tmp_path / "p.png"
    assert main(["viz", "prototypes", str(run), "--images", str(imgs), "--out", str(out), "--num", "3"]) == 0
    assert out.exists() and out.stat().st_size > 1000
    # viz masks: the text-guided masked patches with the teacher's prototype beside the student's prediction
    from finealign.analysis.viz_sync import sync_panels
    from finealign.api import load
    from finealign.data.transforms import ImageTransform
    loaded = load(str(run))
    image = ImageTransform(loaded.config.model.image_size, train=False)(Image.open(imgs / "0.png").convert("RGB"))
    panels = sync_panels(loaded.model, loaded.tokenizer, loaded.config, image, "a large red circle")
    N, M = loaded.model.visual.num_patches, panels["mim"].masked.shape[1]
    assert M == round(0.4 * N) and "reconstruction" not in panels               # masking.mim: 40% most attended
    assert not any(m for _, m in panels["tokens"])                              # SemMIM masks no words
    proto = panels["prototypes"]
    assert proto["student"].shape == proto["teacher"].shape == (M,)
    assert int(proto["teacher"].max()) < 32 and int(proto["student"].min()) >= 0
    masks = tmp_path / "m.png"
    assert main(["viz", "masks", str(run), "--image", str(imgs / "0.png"), "--text", "a red circle",
                 "--out", str(masks)]) == 0
    with Image.open(masks) as im:
        assert im.size[0] == 5 * 300                                             # five 3-inch panels at 100 dpi
