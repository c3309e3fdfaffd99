"""Consistency function, pseudo-Huber distance, distillation loss and EMA target, sampling.

The multistep sampler is checked against closed forms on 1-D Gaussian data N(mu, sigma^2),
where the exact consistency functions of both teachers are known (see :class:`GaussianConsistency`).
"""

import copy
import math
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from toy import (
    GaussianVelocity,  # noqa: E402
    ToyVelocityMLP,  # noqa: E402
)

from models.consistency import (  # noqa: E402
    ConsistencyDistillation,
    consistency_fn,
    consistency_sample,
    consistency_times,
    huber_c,
    pseudo_huber,
    uniform_schedule,
)
from models.samplers import guided_velocity  # noqa: E402

F64 = torch.float64


def mlp(seed=0, num_classes=3):
    torch.manual_seed(seed)
    return ToyVelocityMLP(dim=2, num_classes=num_classes, hidden=32).double()


def mlp32(seed=0, num_classes=3):
    torch.manual_seed(seed)
    return ToyVelocityMLP(dim=2, num_classes=num_classes, hidden=32)


class Recorder(nn.Module):
    """Passes calls through to ``net`` and records the (t, y) of each call."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.num_classes = net.num_classes
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((t.clone(), y.clone()))
        return self.net(x, t, y)


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


def test_consistency_fn_boundary_stays_exact_under_bf16_autocast():
    net = mlp32()
    x = torch.randn(16, 2)
    y = torch.randint(0, 3, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(x, torch.ones(16), y).dtype == torch.bfloat16  # autocast is really on
        f = consistency_fn(net, x, torch.ones(16), y)
    assert f.dtype == torch.float32 and torch.equal(f, x)


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


def test_constructor_rejects_a_label_dropout_outside_0_1():
    with pytest.raises(ValueError, match="label_dropout"):
        ConsistencyDistillation(mlp(0), mlp(1), label_dropout=1.0)
    with pytest.raises(ValueError, match="label_dropout"):
        ConsistencyDistillation(mlp(0), mlp(1), label_dropout=-0.1)


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_label_dropout_gives_teacher_target_and_student_the_same_null_labels(p):
    teacher, student = Recorder(mlp(0)), Recorder(mlp(1))
    cd = ConsistencyDistillation(teacher, student, num_intervals=4, solver="heun", label_dropout=p)
    b = batch(n=4000, seed=1)
    torch.manual_seed(0)
    cd.loss(student, b)

    seen = [y for _, y in teacher.calls + cd.target.calls + student.calls]
    assert len(seen) == 4  # Heun: two teacher calls; one target call; one student call
    assert all(torch.equal(y, seen[0]) for y in seen)
    null = seen[0] == 3  # num_classes = 3 is the null id
    assert torch.equal(seen[0][~null], b["y"][~null])  # the rest keep their labels
    assert null.float().mean().item() == pytest.approx(p, abs=0.03)


def test_teacher_step_and_target_run_in_full_precision_under_autocast():
    """On GPU the loop wraps the loss in bf16 autocast; the target must not see it."""
    teacher, student = mlp32(0), mlp32(1)
    cd = ConsistencyDistillation(teacher, student, num_intervals=4, solver="heun", c=0.01)
    with torch.no_grad():  # make the target differ from the student
        for p in cd.target.parameters():
            p.add_(0.05)
    b = {k: (v.float() if v.is_floating_point() else v) for k, v in batch(n=256, seed=2).items()}

    torch.manual_seed(3)
    n = torch.randint(0, 4, (256,))
    t_n, t_next = n.float() / 4, (n + 1).float() / 4
    x_t = (1 - t_n[:, None]) * b["x_0"] + t_n[:, None] * b["x_1"]
    exact = cd.target_of(x_t, t_n, t_next, b["y"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert teacher(x_t, t_n, b["y"]).dtype == torch.bfloat16  # autocast is really on
        under = cd.target_of(x_t, t_n, t_next, b["y"])
        with torch.no_grad():  # what a target left under autocast would be
            x_hat = cd.solver.step(cd.teacher_v, x_t, t_n, t_next, b["y"])
            rounded = consistency_fn(cd.target, x_hat, t_next, b["y"])
        f_student = consistency_fn(student, x_t, t_n, b["y"])
        torch.manual_seed(3)
        out = cd.loss(student, b)
    assert under.dtype == torch.float32 and torch.equal(under, exact)
    assert not torch.allclose(rounded.float(), exact, rtol=0, atol=1e-4)  # bf16 would have mattered

    expected = pseudo_huber(f_student.float(), exact, 0.01).mean()
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    out.loss.backward()
    assert all(p.grad is not None for p in student.parameters())


def test_target_keeps_float64_inputs_in_float64():
    cd = ConsistencyDistillation(mlp(0), mlp(1), num_intervals=4)
    x = torch.randn(8, 2, dtype=F64)
    t = torch.full((8,), 0.25, dtype=F64)
    assert cd.target_of(x, t, t + 0.25, torch.zeros(8, dtype=torch.long)).dtype == F64


# -- sampling times on the training grid ------------------------------------------------------


def test_consistency_times_default_and_on_the_training_grid():
    assert consistency_times(4) == [0.0, 0.25, 0.5, 0.75]
    assert consistency_times(4, 18) == [0.0, 5 / 18, 9 / 18, 14 / 18]  # 4.5 and 13.5 round up
    assert consistency_times(2, 18) == [0.0, 9 / 18]
    assert consistency_times(3, 18) == [0.0, 6 / 18, 12 / 18]
    assert consistency_times(1, 18) == [0.0]
    assert consistency_times(18, 18) == [n / 18 for n in range(18)]
    for k in range(1, 19):
        times = consistency_times(k, 18)
        assert all(float(t * 18).is_integer() for t in times)
        assert all(a < b for a, b in zip(times, times[1:])) and times[-1] < 1
    with pytest.raises(ValueError, match="at most 18 steps"):
        consistency_times(19, 18)
    with pytest.raises(ValueError, match="num_intervals"):
        consistency_times(2, 0)


def test_consistency_sample_asks_the_net_only_at_grid_times():
    net = Recorder(mlp(2))
    x_0 = torch.randn(8, 2, dtype=F64)
    consistency_sample(
        net,
        x_0,
        torch.zeros(8, dtype=torch.long),
        steps=4,
        num_intervals=18,
        generator=torch.Generator().manual_seed(0),
    )
    asked = [t.unique().tolist() for t, _ in net.calls]
    assert asked == [[0.0], [5 / 18], [9 / 18], [14 / 18]]


# -- re-noising ------------------------------------------------------------------------------


def test_coupled_re_noising_reuses_x_0_and_draws_nothing():
    net = mlp(2)
    x_0 = torch.randn(8, 2, dtype=F64)
    y = torch.randint(0, 3, (8,))
    x_hat = consistency_fn(net, x_0, torch.zeros(8, dtype=F64), y)
    half = torch.full((8,), 0.5, dtype=F64)
    expected = consistency_fn(net, 0.5 * x_0 + 0.5 * x_hat, half, y)
    a = consistency_sample(net, x_0, y, 2, generator=torch.Generator().manual_seed(1), coupling=1.0)
    b = consistency_sample(net, x_0, y, 2, noise=[torch.randn(8, 2, dtype=F64)], coupling=1.0)
    assert torch.allclose(a.x_1, expected, rtol=0, atol=1e-14) and torch.equal(a.x_1, b.x_1)


def test_partly_coupled_re_noising_mixes_x_0_and_fresh_noise():
    net = mlp(2)
    x_0, eps = torch.randn(8, 2, dtype=F64), torch.randn(8, 2, dtype=F64)
    y = torch.randint(0, 3, (8,))
    x_hat = consistency_fn(net, x_0, torch.zeros(8, dtype=F64), y)
    z = 0.6 * x_0 + 0.8 * eps  # rho = 0.6, sqrt(1 - rho^2) = 0.8: still N(0, I)
    expected = consistency_fn(net, 0.5 * z + 0.5 * x_hat, torch.full((8,), 0.5, dtype=F64), y)
    out = consistency_sample(net, x_0, y, 2, noise=[eps], coupling=0.6)
    assert torch.allclose(out.x_1, expected, rtol=0, atol=1e-14)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="coupling"):
            consistency_sample(net, x_0, y, 2, coupling=bad)


class GaussianConsistency(nn.Module):
    """The exact consistency function for data N(mu, sigma^2), as a velocity network.

    Base teacher (independent noise and data): the flow is x_t = t mu + s_t x_0 with
    s_t = sqrt((1 - t)^2 + t^2 sigma^2) (``GaussianVelocity``), so

        f(x, t) = mu + sigma (x - t mu) / s_t.

    Reflow teacher, trained on the base's coupling x_1 = mu + sigma x_0: its paths are the
    straight lines x_t = t mu + a_t x_0 with a_t = (1 - t) + t sigma, so

        f(x, t) = mu + sigma (x - t mu) / a_t.

    Returned as v = (f - x) / (1 - t), so that consistency_fn(self, x, t) = f(x, t).
    """

    def __init__(self, mu, sigma, coupled):
        super().__init__()
        self.num_classes = 1
        self.mu, self.sigma, self.coupled = mu, sigma, coupled

    def spread(self, t):
        if self.coupled:
            return (1 - t) + t * self.sigma  # a_t
        return torch.sqrt((1 - t) ** 2 + t**2 * self.sigma**2)  # s_t

    def forward(self, x, t, y):
        t = t[:, None]  # (N, 1)
        f = self.mu + self.sigma * (x - t * self.mu) / self.spread(t)
        return (f - x) / torch.where(t < 1, 1 - t, torch.ones_like(t))


MU, SIGMA, N_GAUSS = 0.7, 2.0, 200_000


def gaussian_noise(seed=0):
    return torch.randn(N_GAUSS, 1, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_the_gaussian_consistency_functions_are_exact():
    """f maps x_t on each teacher's trajectory to its end: the base ODE (dopri5) and the line."""
    from models.samplers import sample_ode

    mu, sigma = torch.tensor([MU], dtype=F64), torch.tensor([SIGMA], dtype=F64)
    x_0 = gaussian_noise()[:64]
    y = torch.zeros(64, dtype=torch.long)
    half = torch.full((64,), 0.5, dtype=F64)
    velocity = GaussianVelocity(mu, sigma)
    x_half = sample_ode(velocity, x_0, y, steps=64, solver="rk4").x_1  # only to check the map below
    assert torch.allclose(x_half, velocity.exact_map(x_0), atol=1e-9)
    on_base_path = 0.5 * MU + math.sqrt(0.25 + 0.25 * SIGMA**2) * x_0
    on_line = 0.5 * x_0 + 0.5 * (MU + SIGMA * x_0)
    for net, x_t in (
        (GaussianConsistency(MU, SIGMA, False), on_base_path),
        (GaussianConsistency(MU, SIGMA, True), on_line),
    ):
        assert torch.allclose(consistency_fn(net, x_t, half, y), MU + SIGMA * x_0, atol=1e-12)
        assert torch.equal(consistency_fn(net, x_t, torch.ones(64, dtype=F64), y), x_t)


@pytest.mark.parametrize("num_intervals", [None, 18])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_fresh_noise_with_the_exact_base_consistency_fn_keeps_the_data_distribution(steps, num_intervals):
    """Independent coupling: (1 - t) z + t x_hat is the base marginal, so every k gives N(mu, sigma^2)."""
    net = GaussianConsistency(MU, SIGMA, coupled=False)
    x = consistency_sample(
        net,
        gaussian_noise(),
        torch.zeros(N_GAUSS, dtype=torch.long),
        steps,
        generator=torch.Generator().manual_seed(steps),
        num_intervals=num_intervals,
    ).x_1
    se = SIGMA / math.sqrt(N_GAUSS)
    assert x.mean().item() == pytest.approx(MU, abs=5 * se)
    assert x.std().item() == pytest.approx(SIGMA, abs=5 * se)


@pytest.mark.parametrize("num_intervals", [None, 18])
@pytest.mark.parametrize("steps", [2, 4, 8])
def test_coupled_noise_with_the_exact_reflow_consistency_fn_gives_the_one_step_samples(steps, num_intervals):
    """Coupled teacher: re-noising along x_0 lands on the sample's own line, so f returns the same point."""
    net = GaussianConsistency(MU, SIGMA, coupled=True)
    x_0, y = gaussian_noise(), torch.zeros(N_GAUSS, dtype=torch.long)
    one = consistency_sample(net, x_0, y, 1).x_1
    many = consistency_sample(net, x_0, y, steps, coupling=1.0, num_intervals=num_intervals).x_1
    assert torch.allclose(one, MU + SIGMA * x_0, atol=1e-12)
    assert torch.allclose(many, one, rtol=0, atol=1e-12)


@pytest.mark.parametrize("coupled_teacher, coupling", [(False, 0.0), (True, 1.0), (True, 0.0), (False, 1.0)])
def test_each_re_noising_is_exact_only_for_its_own_coupling(coupled_teacher, coupling):
    """Two steps (t_1 = 1/2) with exact consistency functions: the sample std in closed form.

    x_hat = mu + sigma x_0; the re-noised point is x = t mu + (t sigma x_0 + (1 - t) z), and
    f divides its spread by the teacher's (s_t or a_t), so the output std is

        sigma * spread(re-noised) / spread(teacher),
        spread(re-noised) = s_t (fresh z) or a_t (z = x_0).

    Matching pairs give sigma; a coupled teacher re-noised with fresh noise gives
    sigma s_t / a_t < sigma: the samples collapse towards the mean (precision up, recall
    down), the failure seen on digits; the base teacher re-noised along x_0 inflates instead.
    """
    t = 0.5
    s_t, a_t = math.sqrt((1 - t) ** 2 + t**2 * SIGMA**2), (1 - t) + t * SIGMA
    renoised = a_t if coupling == 1.0 else s_t
    teacher = a_t if coupled_teacher else s_t
    expected_std = SIGMA * renoised / teacher

    net = GaussianConsistency(MU, SIGMA, coupled=coupled_teacher)
    x = consistency_sample(
        net,
        gaussian_noise(),
        torch.zeros(N_GAUSS, dtype=torch.long),
        2,
        generator=torch.Generator().manual_seed(9),
        coupling=coupling,
    ).x_1
    se = SIGMA / math.sqrt(N_GAUSS)
    assert x.mean().item() == pytest.approx(MU, abs=5 * se)
    assert x.std().item() == pytest.approx(expected_std, abs=5 * se)
    if coupled_teacher != (coupling == 1.0):
        assert abs(expected_std - SIGMA) > 50 * se  # the mismatch is far outside the noise


@pytest.mark.parametrize("coupled", [False, True])
def test_the_exact_consistency_fn_is_a_fixed_point_of_distillation(coupled):
    """Teacher = exact velocity, student = target = exact f: only the solver's error is left."""
    mu, sigma = torch.tensor([MU], dtype=F64), torch.tensor([SIGMA], dtype=F64)
    if coupled:  # the reflow teacher's velocity on its straight lines: mu + (sigma - 1) x_0

        class LineVelocity(nn.Module):
            num_classes = 1

            def forward(self, x, t, y):
                a_t = (1 - t[:, None]) + t[:, None] * SIGMA
                return MU + (SIGMA - 1) * (x - t[:, None] * MU) / a_t

        teacher = LineVelocity()
    else:
        teacher = GaussianVelocity(mu, sigma)
    exact = GaussianConsistency(MU, SIGMA, coupled)
    cd = ConsistencyDistillation(teacher, exact, num_intervals=18, solver="rk4", c=1e-3, label_dropout=0.5)
    x_0 = gaussian_noise(1)[:4096]
    b = {"x_1": MU + SIGMA * x_0, "x_0": x_0, "y": torch.zeros(4096, dtype=torch.long)}
    assert cd.loss(exact, b).loss.item() < 1e-8
    wrong = GaussianConsistency(MU, 1.1 * SIGMA, coupled)  # a slightly wrong spread
    assert cd.loss(wrong, b).loss.item() > 1e-3
