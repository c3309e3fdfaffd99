"""Time samplers and the flow-matching objective, against closed forms."""

import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from toy import F64, GaussianVelocity, Recorder, ToyVelocityMLP  # noqa: E402

from models.objectives import FlowMatching, LossOutput, Objective  # noqa: E402
from models.paths import LogitNormalTime, UniformTime, sample_path, time_sampler  # noqa: E402


class FixedTime:
    """A time sampler that always returns ``value``: makes the FM loss a closed form."""

    def __init__(self, value: float):
        self.value = value

    def __call__(self, n, device, dtype, generator=None):
        return torch.full((n,), self.value, device=device, dtype=dtype)


# --- time samplers -------------------------------------------------------------------


@pytest.mark.parametrize("sampler", [UniformTime(), LogitNormalTime(), LogitNormalTime(0.5, 2.0)])
def test_time_samplers_shape_range_and_reproducibility(sampler):
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    t1 = sampler(1000, None, F64, generator=g1)
    t2 = sampler(1000, None, F64, generator=g2)
    assert t1.shape == (1000,) and t1.dtype == F64
    assert torch.equal(t1, t2)
    assert (t1 >= 0).all() and (t1 <= 1).all()


def test_logit_normal_median_and_uniform_mean():
    g = torch.Generator().manual_seed(0)
    # the median of sigmoid(m + s n) is sigmoid(m)
    t = LogitNormalTime(mean=1.0, std=0.5)(200_000, None, F64, generator=g)
    assert t.median().item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), abs=5e-3)
    u = UniformTime()(200_000, None, F64, generator=g)
    assert u.mean().item() == pytest.approx(0.5, abs=5e-3)


def test_time_sampler_resolves_names_and_rejects_unknown():
    assert isinstance(time_sampler("uniform"), UniformTime)
    assert time_sampler("logit_normal", mean=-0.5, std=2.0) == LogitNormalTime(-0.5, 2.0)
    with pytest.raises(ValueError, match="logit_normal.*uniform"):
        time_sampler("cosine")
    with pytest.raises(ValueError, match="bad arguments"):
        time_sampler("uniform", mean=1.0)
    with pytest.raises(ValueError, match="std"):
        LogitNormalTime(std=0.0)


def test_sample_path_follows_the_conventions():
    x_0, x_1 = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=F64)
    p = sample_path(x_0, x_1, t)
    assert torch.allclose(p.x_t, (1 - t[:, None]) * x_0 + t[:, None] * x_1)
    assert torch.equal(p.x_t[0], x_0[0]) and torch.equal(p.x_t[-1], x_1[-1])
    assert torch.equal(p.u_t, x_1 - x_0)


# --- flow matching ---------------------------------------------------------------------


def test_objective_base_defaults():
    obj = Objective()
    assert obj.extra_modules() == {}
    assert obj.after_step(nn.Linear(1, 1)) is None
    with pytest.raises(NotImplementedError):
        obj.loss(nn.Linear(1, 1), {})


def test_fm_loss_on_pairs_is_deterministic_and_uses_the_pairs():
    """Reflow: with stored x_0 the loss draws no noise; zero model => mean (x_1 - x_0)^2."""
    g = torch.Generator().manual_seed(0)
    x_0, x_1 = torch.randn(16, 2, 4, generator=g, dtype=F64), torch.randn(16, 2, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (16,), generator=g)
    model, obj = Recorder(), FlowMatching(FixedTime(0.3), label_dropout=0.0)
    batch = {"x_0": x_0, "x_1": x_1, "y": y}

    torch.manual_seed(1)
    out1 = obj.loss(model, batch)
    torch.manual_seed(2)
    out2 = obj.loss(model, batch)

    assert isinstance(out1, LossOutput)
    assert torch.equal(out1.loss, out2.loss)
    assert out1.loss.item() == pytest.approx((x_1 - x_0).pow(2).mean().item(), rel=1e-12)
    x_t, t, y_seen = model.calls[0]
    assert torch.allclose(x_t, 0.7 * x_0 + 0.3 * x_1)
    assert torch.equal(t, torch.full((16,), 0.3, dtype=F64)) and torch.equal(y_seen, y)
    assert not out1.logs["loss"].requires_grad and out1.loss.requires_grad


def test_fm_loss_draws_noise_without_pairs():
    x_1, y = torch.randn(16, 3), torch.zeros(16, dtype=torch.long)
    obj = FlowMatching(FixedTime(0.5), label_dropout=0.0)
    torch.manual_seed(1)
    a = obj.loss(Recorder(), {"x_1": x_1, "y": y}).loss
    torch.manual_seed(2)
    b = obj.loss(Recorder(), {"x_1": x_1, "y": y}).loss
    torch.manual_seed(1)
    c = obj.loss(Recorder(), {"x_1": x_1, "y": y}).loss
    assert not torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_fm_loss_of_the_exact_field_is_the_conditional_variance(t):
    """For Gaussian data the optimum's loss is E Var(x_1 - x_0 | x_t), a closed form."""
    mu, sigma = torch.tensor([1.5, -0.5], dtype=F64), torch.tensor([0.5, 2.0], dtype=F64)
    oracle = GaussianVelocity(mu, sigma)
    n = 400_000
    torch.manual_seed(0)
    x_1 = mu + sigma * torch.randn(n, 2, dtype=F64)
    batch = {"x_1": x_1, "y": torch.zeros(n, dtype=torch.long)}
    obj = FlowMatching(FixedTime(t), label_dropout=0.0)

    torch.manual_seed(1)
    loss = obj.loss(oracle, batch).loss.item()
    expected = oracle.conditional_variance(t).mean().item()
    assert loss == pytest.approx(expected, rel=1e-2)

    # ...and any other field does worse on the same noise: the oracle is the minimiser.
    torch.manual_seed(1)
    worse = obj.loss(GaussianVelocity(mu + 0.3, sigma * 1.2), batch).loss.item()
    assert worse > loss + 1e-3


def test_label_dropout_uses_the_null_id():
    y = torch.randint(0, 3, (20_000,))
    x_1 = torch.randn(20_000, 2)
    model = Recorder()
    torch.manual_seed(0)
    FlowMatching(label_dropout=0.25).loss(model, {"x_1": x_1, "y": y})
    y_seen = model.calls[0][2]
    dropped = y_seen == model.num_classes
    assert dropped.double().mean().item() == pytest.approx(0.25, abs=0.02)
    assert torch.equal(y_seen[~dropped], y[~dropped])
    with pytest.raises(ValueError, match="label_dropout"):
        FlowMatching(label_dropout=1.0)


def test_fm_loss_errors_name_the_problem():
    obj = FlowMatching()
    with pytest.raises(KeyError, match="x_1"):
        obj.loss(Recorder(), {"y": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(ValueError, match="must match"):
        bad = {"x_1": torch.randn(2, 3), "x_0": torch.randn(2, 4), "y": torch.zeros(2, dtype=torch.long)}
        obj.loss(Recorder(), bad)


def test_fm_gradients_reach_the_model():
    model = ToyVelocityMLP(dim=2, num_classes=2, hidden=16)
    out = FlowMatching().loss(model, {"x_1": torch.randn(8, 2), "y": torch.randint(0, 2, (8,))})
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
