"""MomentumTeacher (EMA copy) and FeatureQueue."""
import pytest
import torch
import torch.nn as nn

from finealign.models.momentum import FeatureQueue, MomentumTeacher
from finealign.train.optim import param_groups


class Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8)                       # running stats: buffers
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.norm(self.enc(x)))


def perturb(m: nn.Module, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g))
        m.norm.running_mean.add_(1.0)
        m.norm.num_batches_tracked.add_(7)


def params(m: nn.Module):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def test_teacher_gets_no_gradient_and_no_optimizer_slot():
    torch.manual_seed(0)
    s = Student()
    t = MomentumTeacher(s)
    assert [p for p in t.parameters() if p.requires_grad] == []
    x = torch.randn(5, 4, requires_grad=True)
    y = t(x)
    assert not y.requires_grad
    (s(x).sum() + y.sum()).backward()
    assert all(p.grad is None for p in t.parameters())
    assert all(p.grad is not None for p in s.parameters())

    class Model(nn.Module):                                 # teacher held as a submodule of the model
        def __init__(self):
            super().__init__()
            self.student = Student()
            self.teacher = MomentumTeacher(self.student)

    names = [n for g in param_groups(Model(), 0.02) for n in g["names"]]
    assert names and not any(n.startswith("teacher.") for n in names)


def test_update_is_ema_and_copies_buffers():
    torch.manual_seed(0)
    s = Student()
    t = MomentumTeacher(s, momentum=0.9)
    before = params(t.module)
    perturb(s)
    t.update()
    for n, p in t.module.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[n] + 0.1 * dict(s.named_parameters())[n].detach())
    for (n, b), (_, sb) in zip(t.module.named_buffers(), s.named_buffers()):
        assert torch.equal(b, sb), n


def test_momentum_one_freezes_and_zero_copies():
    torch.manual_seed(0)
    s = Student()
    t = MomentumTeacher(s, momentum=1.0)
    before = params(t.module)
    perturb(s)
    t.update()
    assert all(torch.equal(p, before[n]) for n, p in t.module.named_parameters())
    t.set_momentum(0.0)
    t.update()
    assert all(torch.equal(p, sp) for p, sp in zip(t.module.parameters(), s.parameters()))
    with pytest.raises(ValueError):
        t.set_momentum(1.5)


def test_selected_submodules_and_run():
    torch.manual_seed(0)
    s = Student()
    t = MomentumTeacher({"enc": s.enc, "head": s.head}, momentum=0.5)
    assert set(dict(t.named_children())) == {"module"} and set(dict(t.module.named_children())) == {"enc", "head"}
    x = torch.randn(2, 4)
    torch.testing.assert_close(t.run("enc", x), s.enc(x).detach())
    before = params(t.module)
    perturb(s)
    t.update()
    torch.testing.assert_close(t.module.enc.weight, 0.5 * before["enc.weight"] + 0.5 * s.enc.weight.detach())
    torch.testing.assert_close(t.module.head.bias, 0.5 * before["head.bias"] + 0.5 * s.head.bias.detach())
    assert not t.run("enc.forward", x).requires_grad


def test_state_dict_round_trip_resumes_exactly():
    torch.manual_seed(0)
    s = Student()
    a = MomentumTeacher(s, momentum=0.9)
    perturb(s, 1)
    a.update()
    a.set_momentum(0.97)
    sd = a.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())        # safetensors-compatible
    b = MomentumTeacher(Student(), momentum=0.5)
    b.load_state_dict(sd)
    object.__setattr__(b, "_student", s)
    assert b.momentum == 0.97
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    perturb(s, 2)
    a.update()
    b.update()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert [p for p in b.parameters() if p.requires_grad] == []

    class Model(nn.Module):                                 # momentum also restored through a parent
        def __init__(self, m):
            super().__init__()
            self.teacher = MomentumTeacher(Student(), momentum=m)

    m2 = Model(0.1)
    m2.load_state_dict(Model(0.99).state_dict())
    assert m2.teacher.momentum == 0.99


def test_queue_wrap_around_order():
    q = FeatureQueue(dim=2, size=5)
    rows = torch.arange(24, dtype=torch.float32).view(12, 2)            # row i = [2i, 2i+1]
    assert q.get().shape == (0, 2)
    q.enqueue(rows[:3])
    torch.testing.assert_close(q.get(), rows[:3])
    q.enqueue(rows[3:6])                                                 # wraps: 6 written, 5 kept
    torch.testing.assert_close(q.get(), rows[1:6])
    assert len(q) == 5 and int(q.ptr) == 1
    q.enqueue(rows[6:12])                                                # batch larger than the queue
    torch.testing.assert_close(q.get(), rows[7:12])
    assert int(q.ptr) == (12 % 5)

    r = FeatureQueue(dim=2, size=5)
    r.load_state_dict(q.state_dict())
    r.enqueue(rows[:2])
    q.enqueue(rows[:2])
    torch.testing.assert_close(r.get(), q.get())
    torch.testing.assert_close(q.get(), torch.cat([rows[9:12], rows[:2]]))


def test_queue_get_is_a_copy():
    q = FeatureQueue(dim=3, size=4)
    q.enqueue(torch.randn(4, 3))
    x = torch.randn(2, 3, requires_grad=True)
    loss = (x @ q.get().T).sum()
    q.enqueue(torch.randn(2, 3))                                         # in place after use: graph intact
    loss.backward()
    assert x.grad is not None
    ids = FeatureQueue(dim=1, size=3, dtype=torch.long)
    ids.enqueue(torch.tensor([[4], [5]]))
    assert ids.get().dtype == torch.long and ids.get().view(-1).tolist() == [4, 5]
    with pytest.raises(ValueError):
        q.enqueue(torch.randn(2, 4))
