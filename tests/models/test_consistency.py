"""Consistency function, pseudo-Huber distance, distillation loss and EMA target, sampling."""

import copy
import math
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from toy import ToyVelocityMLP  # noqa: E402

from models.consistency import (  # noqa: E402
    ConsistencyDistillation,
    consistency_fn,
    consistency_sample,
    huber_c,
    pseudo_huber,
    uniform_schedule,
)
from models.samplers import guided_velocity  # noqa: E402

F64 = torch.float64


def mlp(seed=0, num_classes=3):
    torch.manual_seed(seed)
    return ToyVelocityMLP(dim=2, num_classes=num_classes, hidden=32).double()


def batch(n=32, seed=0, with_x_0=True):
    g = torch.Generator().manual_seed(seed)
    b = {"x_1": torch.randn(n, 2, generator=g, dtype=F64), "y": torch.randint(0, 3, (n,), generator=g)}
    if with_x_0:
        b["x_0"] = torch.randn(n, 2, generator=g, dtype=F64)
    return b


def test_consistency_fn_meets_the_boundary_exactly():
    net = mlp()
    x = torch.randn(16, 2, dtype=F64)
    y = torch.randint(0, 3, (16,))
    assert torch.equal(consistency_fn(net, x, torch.ones(16, dtype=F64), y), x)
    t = torch.full((16,), 0.25, dtype=F64)
    assert torch.allclose(consistency_fn(net, x, t, y), x + 0.75 * net(x, t, y))


def test_pseudo_huber_closed_form():
    a = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=F64)
    b = torch.zeros(2, 2, dtype=F64)
    c = 0.5
    d = pseudo_huber(a, b, c)
    assert d.shape == (2,)
    assert d[0].item() == pytest.approx(math.sqrt(25 + 0.25) - 0.5, rel=1e-14)
    assert d[1].item() == 0.0
    # near zero it is ||a - b||^2 / (2c); far away it is ||a - b||
    small = torch.tensor([[1e-4, 0.0]], dtype=F64)
    assert pseudo_huber(small, torch.zeros_like(small), c).item() == pytest.approx(1e-8 / (2 * c), rel=1e-6)
    far = torch.tensor([[1e6, 0.0]], dtype=F64)
    assert pseudo_huber(far, torch.zeros_like(far), c).item() == pytest.approx(1e6 - c, rel=1e-9)
    assert huber_c(3 * 32 * 32) == pytest.approx(0.00054 * math.sqrt(3072))


def test_uniform_schedule():
    t = uniform_schedule(4, torch.zeros(1, dtype=F64))
    assert torch.equal(t, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=F64))


@pytest.mark.parametrize("w", [1.0, 2.0])
def test_one_interval_loss_is_the_distance_to_the_teachers_euler_step(w):
    """N = 1: t_0 = 0, t_1 = 1, so the target is the teacher's step itself (f(x, 1) = x)."""
    teacher, student = mlp(0), mlp(1)
    cd = ConsistencyDistillation(teacher, student, num_intervals=1, solver="euler", guidance=w, c=0.1)
    b = batch()
    out = cd.loss(student, b)

    t_0 = torch.zeros(32, dtype=F64)
    x_hat = b["x_0"] + guided_velocity(teacher, w)(b["x_0"], t_0, b["y"])
    f_student = b["x_0"] + student(b["x_0"], t_0, b["y"])
    expected = (torch.sqrt((f_student - x_hat).pow(2).sum(-1) + 0.01) - 0.1).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert not out.logs["loss"].requires_grad

    out.loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in cd.target.parameters())


def test_student_equal_to_the_teacher_has_zero_loss_at_one_interval():
    teacher = mlp(0)
    cd = ConsistencyDistillation(teacher, copy.deepcopy(teacher), num_intervals=1, solver="euler")
    student = copy.deepcopy(teacher)
    assert cd.loss(student, batch()).loss.item() == pytest.approx(0.0, abs=1e-12)


def test_loss_uses_the_target_at_the_next_time():
    """N intervals: the loss equals d(f_theta(x_{t_n}, t_n), f_target(teacher step, t_{n+1}))."""
    teacher, student = mlp(0), mlp(1)
    cd = ConsistencyDistillation(teacher, student, num_intervals=4, solver="heun", c=0.05)
    with torch.no_grad():  # make the target differ from the student
        for p in cd.target.parameters():
            p.add_(0.1)
    b = batch(seed=3)
    torch.manual_seed(7)
    out = cd.loss(student, b)

    torch.manual_seed(7)
    n = torch.randint(0, 4, (32,))
    t_n, t_next = n.double() / 4, (n + 1).double() / 4
    x_t = (1 - t_n[:, None]) * b["x_0"] + t_n[:, None] * b["x_1"]
    h = (t_next - t_n)[:, None]
    k_1 = teacher(x_t, t_n, b["y"])
    x_hat = x_t + h / 2 * (k_1 + teacher(x_t + h * k_1, t_next, b["y"]))
    f_tgt = x_hat + (1 - t_next)[:, None] * cd.target(x_hat, t_next, b["y"])
    f_st = x_t + (1 - t_n)[:, None] * student(x_t, t_n, b["y"])
    expected = (torch.sqrt((f_st - f_tgt).pow(2).sum(-1) + 0.05**2) - 0.05).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_loss_draws_noise_without_pairs_and_picks_c_from_the_dimension():
    teacher, student = mlp(0), mlp(1)
    cd = ConsistencyDistillation(teacher, student, num_intervals=3)
    b = batch(with_x_0=False)
    torch.manual_seed(0)
    a = cd.loss(student, b).loss
    torch.manual_seed(1)
    c = cd.loss(student, b).loss
    assert torch.isfinite(a) and not torch.equal(a, c)


def test_target_ema_update_in_after_step():
    teacher, student = mlp(0), mlp(1)
    cd = ConsistencyDistillation(teacher, student, ema_decay=0.9)
    assert cd.extra_modules() == {"consistency_target": cd.target}
    before = [p.clone() for p in cd.target.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(before, student.parameters()))  # starts at student
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    cd.after_step(student)
    for p_tgt, p_old, p in zip(cd.target.parameters(), before, student.parameters()):
        assert torch.allclose(p_tgt, 0.9 * p_old + 0.1 * p)
    assert all(not p.requires_grad for p in cd.target.parameters())
    assert all(p.requires_grad for p in student.parameters())

    class Wrapped(nn.Module):  # DDP-style: after_step unwraps .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    cd.after_step(Wrapped(student))
    assert torch.allclose(next(cd.target.parameters()), 0.81 * before[0] + 0.19 * next(student.parameters()))


def test_constructor_errors():
    teacher = mlp(0)
    with pytest.raises(ValueError, match="same module"):
        ConsistencyDistillation(teacher, teacher)
    with pytest.raises(ValueError, match="num_intervals"):
        ConsistencyDistillation(teacher, mlp(1), num_intervals=0)
    with pytest.raises(ValueError, match="ema_decay"):
        ConsistencyDistillation(teacher, mlp(1), ema_decay=1.0)


def test_consistency_sample_one_and_multi_step():
    net = mlp(2)
    x_0 = torch.randn(8, 2, dtype=F64)
    y = torch.randint(0, 3, (8,))
    one = consistency_sample(net, x_0, y, steps=1)
    assert one.nfe == 1 and not one.x_1.requires_grad
    assert torch.allclose(one.x_1, consistency_fn(net, x_0, torch.zeros(8, dtype=F64), y))

    two = consistency_sample(net, x_0, y, steps=2, generator=torch.Generator().manual_seed(5))
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    x_half = 0.5 * z + 0.5 * one.x_1
    expected = consistency_fn(net, x_half, torch.full((8,), 0.5, dtype=F64), y)
    assert two.nfe == 2 and torch.allclose(two.x_1, expected.detach())
    with pytest.raises(ValueError, match="steps"):
        consistency_sample(net, x_0, y, steps=0)
