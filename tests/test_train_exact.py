"""Exact values of training internals: weight-decay groups, LR schedule, non-finite guard, StepGather layout,
RNG capture / restore, EMA teacher and feature queue (hand-computed expectations)."""
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import finealign.distributed as D
from finealign.models.momentum import FeatureQueue, MomentumTeacher
from finealign.train.faults import NonFiniteGuard, NonFiniteLossError, nonfinite_params
from finealign.train.gather import StepGather, micro_bounds
from finealign.train.optim import build_optimizer, build_scheduler, lr_lambda, param_groups, scale_lr
from finealign.train.rng import get_rng_state, set_rng_state


# ---------------------------------------------------------------- weight-decay groups

class Clipish(nn.Module):
    """2-D parameters named like CLIP / HF learned tokens, positions and temperatures."""

    def __init__(self, d=4):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(1, d))          # CLIP's class token: no decay
        self.temperature = nn.Parameter(torch.ones(1, 1))               # 2-D temperature: no decay
        self.position_embedding = nn.Embedding(3, d)                    # HF: .position_embedding.weight
        self.positional_embedding = nn.Parameter(torch.zeros(3, d))     # CLIP text positions: no decay
        self.proj = nn.Linear(d, d, bias=False)                         # decays


def test_every_no_decay_keyword_is_honoured():
    groups = {g["group"]: g for g in param_groups(Clipish(), 0.05)}
    assert groups["decay"]["names"] == ["proj.weight"]
    assert groups["decay"]["weight_decay"] == 0.05
    assert sorted(groups["no_decay"]["names"]) == ["class_embedding", "position_embedding.weight",
                                                   "positional_embedding", "temperature"]
    assert groups["no_decay"]["weight_decay"] == 0.0


# ---------------------------------------------------------------- LR schedule

def _cos(step, warmup, steps, r):
    return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))


def test_lr_lambda_exact_values():
    # warmup 4, steps 12, floor 0.25: cosine over 8 steps
    assert [lr_lambda(s, 4, 12, 0.25) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for s in range(4, 13):
        assert lr_lambda(s, 4, 12, 0.25) == pytest.approx(_cos(s, 4, 12, 0.25), abs=1e-12)
    assert lr_lambda(8, 4, 12, 0.25) == pytest.approx(0.625, abs=1e-12)         # half-way: (1 + r) / 2
    assert lr_lambda(11, 4, 12, 0.25) == pytest.approx(0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi * 7 / 8)),
                                                        abs=1e-12)
    assert lr_lambda(12, 4, 12, 0.25) == pytest.approx(0.25, abs=1e-12)         # floor reached at `steps`
    assert lr_lambda(13, 4, 12, 0.25) == pytest.approx(0.25, abs=1e-12)         # and held
    assert lr_lambda(40, 4, 12, 0.25) == pytest.approx(0.25, abs=1e-12)
    # min_lr_ratio = 1: constant after warm-up; = 0: decays to exactly 0
    assert all(lr_lambda(s, 2, 10, 1.0) == pytest.approx(1.0) for s in range(2, 20))
    assert lr_lambda(10, 2, 10, 0.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_lambda(6, 2, 10, 0.0) == pytest.approx(0.5, abs=1e-12)


def test_scheduler_follows_lr_lambda_per_optimizer_step():
    cfg = SimpleNamespace(lr=2.0, weight_decay=0.0, beta1=0.9, beta2=0.98, eps=1e-6, optimizer="auto",
                          warmup=3, steps=7, min_lr_ratio=0.5)
    opt = build_optimizer(nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg)
    got = []
    for _ in range(9):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [0.0, 2 / 3, 4 / 3, 2.0] + [2.0 * _cos(s, 3, 7, 0.5) for s in range(4, 8)] + [1.0]
    assert got == pytest.approx(want, abs=1e-12)
    assert got[5] == pytest.approx(1.5, abs=1e-12)                               # step 5 = mid-cosine


@pytest.mark.parametrize("warmup,steps,ratio", [(0, 10, 1.5), (0, 10, -0.1), (-1, 10, 0.1), (0, -1, 0.1)])
def test_bad_schedules_are_refused(warmup, steps, ratio):
    cfg = SimpleNamespace(warmup=warmup, steps=steps, min_lr_ratio=ratio)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="bad schedule"):
        build_scheduler(opt, cfg)


def test_scale_lr_refuses_non_positive_base_batch():
    assert scale_lr(0.5, 128, base_batch=64) == 1.0
    with pytest.raises(ValueError):
        scale_lr(1e-3, 256, base_batch=0)
    with pytest.raises(ValueError):
        scale_lr(1e-3, -4)


# ---------------------------------------------------------------- non-finite guard

def test_guard_skips_exactly_limit_batches_then_raises():
    g = NonFiniteGuard(2)
    g.handle(3, "a", None)
    assert (g.skipped, g.last) == (1, "step 3: a")
    g.handle(3, "b", None)
    assert (g.skipped, g.last) == (2, "step 3: b")
    with pytest.raises(NonFiniteLossError, match=r"^step 3: c; run stopped after skipping 2 batch\(es\) "
                                                 r"\(train.skip_nonfinite=2\); last good checkpoint: ck/step_3$"):
        g.handle(3, "c", "ck/step_3")
    assert g.skipped == 2
    # a resumed run continues its count: one left of two
    r = NonFiniteGuard(2, skipped=1)
    r.handle(9, "x", None)
    with pytest.raises(NonFiniteLossError, match="none yet"):
        r.handle(9, "y", None)
    with pytest.raises(NonFiniteLossError, match=r"^step 0: z; run stopped \(train.skip_nonfinite=N"):
        NonFiniteGuard(0).handle(0, "z", None)


def test_nonfinite_params_finds_partial_nan_and_inf_up_to_limit():
    ps = []
    for i in range(5):
        p = nn.Parameter(torch.zeros(3))
        p.grad = torch.tensor([1.0, 2.0, 3.0])
        ps.append((f"p{i}", p))
    ps[0][1].grad[1] = float("nan")                     # one bad element in an otherwise finite gradient
    ps[2][1].grad[0] = float("inf")
    ps[3][1].grad[2] = -float("inf")
    ps[4][1].grad[:] = float("nan")
    none = nn.Parameter(torch.zeros(2))                 # no gradient: never named
    assert nonfinite_params([("none", none)] + ps) == ["p0", "p2", "p3"]          # default limit 3
    assert nonfinite_params(ps, limit=2) == ["p0", "p2"]
    assert nonfinite_params(ps, limit=10) == ["p0", "p2", "p3", "p4"]
    assert nonfinite_params(ps[1:2]) == []


# ---------------------------------------------------------------- StepGather layout (two fake ranks)

def test_micro_bounds_floor_split():
    assert micro_bounds(5, 2) == [0, 2, 5]
    assert micro_bounds(7, 2) == [0, 3, 7]
    assert micro_bounds(10, 3) == [0, 3, 6, 10]
    assert micro_bounds(4, 1) == [0, 4]


def _fake_two_ranks(monkeypatch, other):
    """all_gather on rank 1 of 2: rank 0 contributes ``other(x)``."""
    monkeypatch.setattr(D, "all_gather", lambda x: [other(x), x.detach()])


def test_step_gather_rank_major_layout_with_unequal_ranks(monkeypatch):
    # rank 0 has 4 rows (micro 2 + 2), rank 1 (this one) has 6 rows (micro 3 + 3)
    rank0 = torch.arange(4.0).view(4, 1)
    _fake_two_ranks(monkeypatch, lambda x: rank0)
    g = StepGather(rank=1, world_size=2)
    mine = [torch.full((3, 1), 10.0), torch.full((3, 1), 11.0)]
    g.start([4, 6], 2, {"f": mine})
    assert g.sizes == [[2, 2], [3, 3]]
    assert g.rows() == (4, 6)
    assert g.offset(0) == 4 and g.offset(1) == 7
    assert g.loss_scale == 2.0 and not g.owns_shared
    local = torch.full((3, 1), 99.0, requires_grad=True)
    out, off = g("f", local, 1)
    assert off == 7
    assert out.view(-1).tolist() == [0.0, 1.0, 2.0, 3.0, 10.0, 10.0, 10.0, 99.0, 99.0, 99.0]
    out.sum().backward()
    assert local.grad.eq(1).all()


def test_step_gather_rank0_of_two_without_cache(monkeypatch):
    # one micro-batch, no pre-pass: the current features of both ranks are gathered in pass 0
    monkeypatch.setattr(D, "all_gather", lambda x: [x.detach(), torch.full((2, 1), 5.0)])
    g = StepGather(rank=0, world_size=2)
    g.start([3, 2], 1)
    assert g.rows() == (0, 3) and g.offset(0) == 0 and g.owns_shared
    local = torch.full((3, 1), 1.0, requires_grad=True)
    out, off = g("z", local, 0)
    assert off == 0 and out.view(-1).tolist() == [1.0, 1.0, 1.0, 5.0, 5.0]
    assert out.requires_grad                              # own rows keep their gradient


# ---------------------------------------------------------------- RNG state

def test_numpy_state_fields_and_cached_gaussian_round_trip():
    np.random.seed(11)
    np.random.rand(5)
    np.random.randn()                                     # leaves one cached gaussian (has_gauss = 1)
    ref = np.random.get_state()
    state = get_rng_state()
    s = state["numpy"]
    assert s["kind"] == "MT19937" and s["pos"] == ref[2] and s["has_gauss"] == ref[3] == 1
    assert s["cached_gaussian"] == ref[4] and np.array_equal(s["keys"].numpy(), ref[1].astype(np.int64))
    random.seed(3)
    torch.manual_seed(3)
    state = get_rng_state()
    first = (np.random.randn(3), np.random.rand(2), random.random(), torch.rand(2))
    np.random.seed(0)
    random.seed(0)
    torch.manual_seed(0)
    set_rng_state(state)
    again = (np.random.randn(3), np.random.rand(2), random.random(), torch.rand(2))
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2] == again[2] and torch.equal(first[3], again[3])


def test_set_rng_state_leaves_missing_entries_alone():
    np.random.seed(1)
    partial = {"numpy": get_rng_state()["numpy"]}
    random.seed(2)
    expected_py = random.random()
    random.seed(2)
    set_rng_state(partial)
    assert random.random() == expected_py


# ---------------------------------------------------------------- EMA teacher and queue

def test_ema_exact_numbers_and_foreign_dtype_student():
    s = nn.Linear(1, 1)
    with torch.no_grad():
        s.weight.fill_(2.0)
        s.bias.fill_(-1.0)
    t = MomentumTeacher(s, momentum=0.75)
    with torch.no_grad():
        s.weight.fill_(6.0)
        s.bias.fill_(3.0)
    t.update()
    assert t.module.weight.item() == 3.0 and t.module.bias.item() == 0.0     # 0.75*2 + 0.25*6, 0.75*-1 + 0.25*3
    t.update()
    assert t.module.weight.item() == 3.75 and t.module.bias.item() == 0.75
    other = nn.Linear(1, 1).double()                                         # a float64 student, same names
    with torch.no_grad():
        other.weight.fill_(7.75)
        other.bias.fill_(4.75)
    t.set_momentum(0.5)
    t.update(other)
    assert t.module.weight.dtype == torch.float32
    assert t.module.weight.item() == 5.75 and t.module.bias.item() == 2.75
    assert s.weight.item() == 6.0                                            # student untouched


def test_integer_parameters_are_copied_not_averaged():
    class WithInt(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(1, 1)
            self.ids = nn.Parameter(torch.tensor([1, 2]), requires_grad=False)

    s = WithInt()
    t = MomentumTeacher(s, momentum=0.9)
    with torch.no_grad():
        s.ids.copy_(torch.tensor([7, 9]))
    t.update()
    assert t.module.ids.tolist() == [7, 9]


def test_momentum_below_zero_is_refused():
    t = MomentumTeacher(nn.Linear(1, 1))
    with pytest.raises(ValueError):
        t.set_momentum(-0.01)
    t.set_momentum(0.0)
    assert t.momentum == 0.0 and float(t.ema_momentum) == 0.0


def test_queue_count_is_entries_ever_written():
    q = FeatureQueue(dim=1, size=3)
    rows = torch.arange(10.0).view(10, 1)
    q.enqueue(rows[:5])                                   # larger than the queue: keeps rows 2, 3, 4
    assert int(q.count) == 5 and len(q) == 3 and int(q.ptr) == 2
    assert q.get().view(-1).tolist() == [2.0, 3.0, 4.0]
    assert q.queue.view(-1).tolist() == [3.0, 4.0, 2.0]   # slot 2 first, then wrapped to 0, 1
    q.enqueue(rows[5:7])                                  # wraps: slots 2, 0
    assert int(q.count) == 7 and int(q.ptr) == 1
    assert q.get().view(-1).tolist() == [4.0, 5.0, 6.0]
    assert q.queue.view(-1).tolist() == [6.0, 4.0, 5.0]
