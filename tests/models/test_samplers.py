"""ODE samplers and classifier-free guidance, against the Gaussian closed form."""

import math
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from toy import F64, MU, SIGMA, GaussianVelocity  # noqa: E402

from models.samplers import (  # noqa: E402
    SOLVERS,
    Euler,
    Heun,
    SampleResult,
    get_solver,
    guided_velocity,
    sample_ode,
    sample_reference,
    straightness,
)


@pytest.fixture(scope="module")
def gaussian():
    return GaussianVelocity(MU, SIGMA)


def noise(n, seed=0):
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)


def map_error(model, solver, steps, x_0):
    """max |x_hat_1 - (mu + sigma x_0)| over the batch: the global error of the solver."""
    y = torch.zeros(x_0.shape[0], dtype=torch.long)
    x_1 = sample_ode(model, x_0, y, steps, solver=solver).x_1
    return (x_1 - model.exact_map(x_0)).abs().max().item()


# --- solvers against the closed form ----------------------------------------------------


@pytest.mark.parametrize("solver,steps", [("euler", 400), ("heun", 40), ("rk4", 10)])
def test_solvers_reproduce_the_target_mean_and_variance(gaussian, solver, steps):
    n = 20_000
    x_0 = noise(n)
    x_1 = sample_ode(gaussian, x_0, torch.zeros(n, dtype=torch.long), steps, solver=solver).x_1
    se = SIGMA / math.sqrt(n)
    assert ((x_1.mean(0) - MU).abs() < 4 * se).all(), x_1.mean(0)
    assert torch.allclose(x_1.var(0), SIGMA**2, rtol=0.05), x_1.var(0)  # se of var: 1%


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2), ("rk4", 4)])
def test_solver_convergence_order(gaussian, solver, order):
    """Doubling the steps divides the error by ~2^order (Euler 2x, Heun 4x, RK4 16x)."""
    x_0 = noise(256)
    steps = [16, 32, 64]
    errors = [map_error(gaussian, solver, s, x_0) for s in steps]
    measured = [math.log2(errors[i] / errors[i + 1]) for i in range(len(steps) - 1)]
    print(f"{solver}: errors {errors}, measured orders {measured}")
    for p in measured:
        assert abs(p - order) < 0.35, (solver, errors, measured)


def test_reference_dopri5_matches_the_exact_map(gaussian):
    x_0 = noise(512)
    res = sample_reference(gaussian, x_0, torch.zeros(512, dtype=torch.long), rtol=1e-7, atol=1e-7)
    assert (res.x_1 - gaussian.exact_map(x_0)).abs().max().item() < 1e-5
    assert res.nfe > 7 and res.path is None
    loose = sample_reference(gaussian, x_0, torch.zeros(512, dtype=torch.long), rtol=1e-3, atol=1e-3)
    assert loose.nfe < res.nfe


def test_sample_result_counts_and_path(gaussian):
    x_0, y = noise(5), torch.zeros(5, dtype=torch.long)
    e = sample_ode(gaussian, x_0, y, steps=4, solver="euler", return_path=True)
    h = sample_ode(gaussian, x_0, y, steps=4, solver=Heun())
    assert isinstance(e, SampleResult) and e.nfe == 4 and h.nfe == 8
    assert e.path.shape == (5, 5, 3) and torch.equal(e.path[0], x_0) and torch.equal(e.path[-1], e.x_1)
    assert torch.allclose(e.times, torch.tensor([0, 0.25, 0.5, 0.75, 1.0], dtype=F64))
    assert h.path is None and h.times is None


def test_one_euler_step_is_x0_plus_v(gaussian):
    x_0, y = noise(5), torch.zeros(5, dtype=torch.long)
    x_1 = sample_ode(gaussian, x_0, y, steps=1).x_1
    assert torch.allclose(x_1, x_0 + gaussian(x_0, torch.zeros(5, dtype=F64), y))


def test_solvers_take_per_sample_times(gaussian):
    """One step may move each sample between its own times (consistency distillation)."""
    x, y = noise(2), torch.zeros(2, dtype=torch.long)
    t, t_next = torch.tensor([0.0, 0.5], dtype=F64), torch.tensor([0.25, 1.0], dtype=F64)
    both = Euler().step(gaussian, x, t, t_next, y)
    for i in range(2):
        one = Euler().step(gaussian, x[i : i + 1], t[i : i + 1], t_next[i : i + 1], y[:1])
        assert torch.allclose(both[i], one[0])


def test_get_solver_resolves_names():
    assert get_solver("heun") is SOLVERS["heun"]
    solver = Euler()
    assert get_solver(solver) is solver
    with pytest.raises(ValueError, match="euler, heun, rk4"):
        get_solver("dpm")
    with pytest.raises(ValueError, match="steps"):
        sample_ode(GaussianVelocity(MU, SIGMA), noise(2), torch.zeros(2, dtype=torch.long), 0)


class OfX(nn.Module):
    """v(x, t, y) = fn(x): wraps a function or module of x alone."""

    num_classes = 1

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, t, y):
        return self.fn(x)


def test_samplers_do_not_build_graphs():
    model = OfX(nn.Linear(3, 3).double())
    x_1 = sample_ode(model, noise(4), torch.zeros(4, dtype=torch.long), 3, solver="heun").x_1
    assert not x_1.requires_grad


# --- straightness -------------------------------------------------------------------


def test_straightness_is_zero_for_straight_paths_and_positive_otherwise(gaussian):
    x_0, y = noise(64), torch.zeros(64, dtype=torch.long)
    r = sample_ode(OfX(lambda x: torch.ones_like(x)), x_0, y, 8, return_path=True)
    assert straightness(r.path, r.times).item() == pytest.approx(0.0, abs=1e-20)
    r = sample_ode(gaussian, x_0, y, 64, solver="heun", return_path=True)
    assert straightness(r.path, r.times).item() > 0.05


# --- classifier-free guidance --------------------------------------------------------------


class TwoHeaded(nn.Module):
    """v(x, t, y) = a_y * x + b_y * t: conditional and null outputs differ; counts calls."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.num_classes = num_classes
        g = torch.Generator().manual_seed(0)
        self.a = nn.Parameter(torch.randn(num_classes + 1, generator=g, dtype=F64))
        self.b = nn.Parameter(torch.randn(num_classes + 1, generator=g, dtype=F64))
        self.batch_sizes = []

    def forward(self, x, t, y):
        self.batch_sizes.append(x.shape[0])
        return self.a[y][:, None] * x + self.b[y][:, None] * t[:, None]


def test_guidance_one_is_the_conditional_output_exactly():
    model = TwoHeaded()
    x, t, y = noise(6), torch.rand(6, dtype=F64), torch.tensor([0, 1, 2, 0, 1, 2])
    out = guided_velocity(model, 1.0)(x, t, y)
    assert torch.equal(out, model(x, t, y))
    assert model.batch_sizes == [6, 6]  # no null pass


@pytest.mark.parametrize("w", [0.0, 2.5, -0.5])
def test_guidance_matches_the_formula(w):
    model = TwoHeaded()
    x, t, y = noise(6), torch.rand(6, dtype=F64), torch.tensor([0, 1, 2, 0, 1, 2])
    out = guided_velocity(model, w)(x, t, y)
    v_cond = model(x, t, y)
    v_uncond = model(x, t, torch.full_like(y, model.num_classes))
    assert torch.allclose(out, v_uncond + w * (v_cond - v_uncond))
    assert not torch.allclose(v_cond, v_uncond)
    if w != 0.0:
        assert model.batch_sizes[0] == 12  # one batched forward for both


def test_guidance_rejects_nan_and_sampling_counts_batched_evaluations():
    with pytest.raises(ValueError, match="guidance"):
        guided_velocity(TwoHeaded(), float("nan"))
    model = TwoHeaded()
    r = sample_ode(model, noise(4), torch.tensor([0, 1, 2, 0]), steps=3, solver="heun", guidance=3.0)
    assert r.nfe == 6 and model.batch_sizes == [8] * 6
