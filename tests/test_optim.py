"""Parameter groups and LR schedule of finealign.train.optim."""
import math

import pytest
import torch
from torch import nn

from finealign.config import TrainConfig
from finealign.train.optim import build_optimizer, build_scheduler, lr_lambda, no_decay_by_name, scale_lr


class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.query = nn.Linear(d, d)          # a q-projection called "query": its weight DOES decay
        self.out = nn.Linear(d, d)


class Toy(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.tok = nn.Embedding(20, d)                        # token table: decays
        self.pos_embed = nn.Embedding(6, d)                   # positional table: no decay
        self.visual_pos_embed = nn.Parameter(torch.zeros(1, 5, d))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.queries = nn.Parameter(torch.zeros(4, d))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.attn = Attn(d)
        self.norm = nn.LayerNorm(d)
        self.frozen = nn.Linear(d, d)
        self.frozen.requires_grad_(False)


def _names(opt, group):
    (g,) = [g for g in opt.param_groups if g["group"] == group]
    return set(g["names"]), g


def test_param_groups():
    model = Toy()
    extra_scale = nn.Parameter(torch.tensor(1.0))
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1), extra_params=[("loss.logit_scale", extra_scale),
                                                                             model.cls_token])
    decay, gd = _names(opt, "decay")
    no_decay, gn = _names(opt, "no_decay")
    assert decay == {"tok.weight", "attn.query.weight", "attn.out.weight"}
    assert no_decay == {"pos_embed.weight", "visual_pos_embed", "cls_token", "queries", "logit_scale",
                        "attn.query.bias", "attn.out.bias", "norm.weight", "norm.bias", "loss.logit_scale"}
    assert gd["weight_decay"] == 0.1 and gn["weight_decay"] == 0.0
    # every 1-D / scalar parameter is in no_decay; frozen ones nowhere; no duplicates
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == 13
    for name, p in model.named_parameters():
        if p.ndim < 2 and p.requires_grad:
            assert name in no_decay
    assert all(p is not model.frozen.weight and p is not model.frozen.bias for p in params)
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6


def test_named_pairs_like_the_training_loop():
    """The loop passes model + objective parameters as (name, param) pairs: same grouping."""
    model = Toy()
    scale = nn.Parameter(torch.tensor(1.0))
    pairs = list(model.named_parameters()) + [("objectives.itc.logit_scale", scale)]
    opt = build_optimizer(pairs, TrainConfig())
    ref = build_optimizer(model, TrainConfig(), extra_params=[("objectives.itc.logit_scale", scale)])
    assert [g["names"] for g in opt.param_groups] == [g["names"] for g in ref.param_groups]
    with pytest.raises(TypeError, match="Parameter"):
        build_optimizer([("x", 3.0)], TrainConfig())


def test_no_trainable_params():
    m = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(m, TrainConfig())


def test_no_decay_names():
    assert no_decay_by_name("visual.pos_embed") and no_decay_by_name("text.cls_emb")
    assert no_decay_by_name("pooler.query") and no_decay_by_name("text.pos_embed.weight")
    assert not no_decay_by_name("blocks.0.attn.query.weight") and not no_decay_by_name("tok_embed.weight")


def test_schedule_values():
    cfg = TrainConfig(steps=110, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    model = nn.Linear(3, 3)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(131):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for group_lrs in lrs:                                    # all groups follow the same schedule
        assert len(set(group_lrs)) == 1
    lr = [x[0] for x in lrs]
    assert lr[0] == 0.0                                      # warm-up starts at 0
    assert lr[5] == pytest.approx(0.5e-3)                    # linear
    assert lr[10] == pytest.approx(1e-3)                     # peak at the end of warm-up
    assert lr[60] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half-way through the cosine
    assert lr[35] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25))))
    assert lr[110] == pytest.approx(1e-4)                    # floor = min_lr_ratio * lr
    assert lr[130] == pytest.approx(1e-4)                    # held afterwards
    assert all(a >= b - 1e-15 for a, b in zip(lr[10:], lr[11:]))  # monotone decay after warm-up


def test_schedule_edge_cases():
    assert lr_lambda(0, 0, 100, 0.0) == 1.0                  # no warm-up
    assert lr_lambda(100, 0, 100, 0.0) == pytest.approx(0.0)
    assert lr_lambda(5, 10, 5, 0.2) == 0.5                   # warm-up longer than the run


def test_scheduler_state_is_plain():
    cfg = TrainConfig(steps=10, warmup=2)
    sched = build_scheduler(build_optimizer(nn.Linear(2, 2), cfg), cfg)
    assert all(x is None for x in sched.state_dict()["lr_lambdas"])  # closure -> nothing pickled


def test_scale_lr():
    assert scale_lr(1e-3, 512) == pytest.approx(2e-3)
    assert scale_lr(1e-3, 64, base_batch=128) == pytest.approx(5e-4)
    with pytest.raises(ValueError):
        scale_lr(1e-3, 0)


def test_optimizer_kernels_agree_and_are_selected():
    """train.optimizer picks AdamW's kernels; auto / foreach / fused give the same steps up to float rounding."""
    results = {}
    for impl in ("auto", "foreach", "fused"):
        torch.manual_seed(0)
        model = Toy()
        opt = build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1, optimizer=impl))
        assert opt.defaults["fused"] is (True if impl == "fused" else None)
        assert opt.defaults["foreach"] is (True if impl == "foreach" else None)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in model.parameters():
                if p.requires_grad:
                    p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        results[impl] = [p.detach().clone() for p in model.parameters()]
    for impl in ("foreach", "fused"):
        for a, b in zip(results["auto"], results[impl]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.manual_seed(0)
    init = [p.detach() for p in Toy().parameters()]
    assert all(not torch.equal(a, b) for a, b, p in zip(results["auto"], init, Toy().parameters()) if p.requires_grad)
    with pytest.raises(ValueError, match="train.optimizer must be auto, foreach or fused"):
        build_optimizer(Toy(), TrainConfig(optimizer="adam8bit"))
