"""Flow maps against closed forms: the MeanFlow identity, the Shortcut target, the JVP, the
flow-map DiT's initialisation and attention, k-step sampling, and a short training on a toy.

The closed form: x_0 ~ N(0, I) and x_1 ~ N(mu, diag(sigma^2)) coupled independently. The marginal
velocity and the flow map of the straight path are exact (toy.GaussianVelocity, toy.GaussianFlowMap),
and the map from s to t is linear in x.
"""

import os
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(__file__))
from toy import MU, SIGMA, GaussianFlowMap, GaussianVelocity, ToyFlowMapMLP, fit, random_dit  # noqa: E402

from models.dit import dit_config  # noqa: E402
from models.flowmap import (  # noqa: E402
    MeanFlow,
    Shortcut,
    adaptive_mse,
    flowmap_sample,
    guided_average_velocity,
    total_derivative,
)
from models.flowmap_dit import FlowMapDiT, FlowMapDiTConfig, flowmap_from_velocity  # noqa: E402
from models.registry import build_model, model_spec  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def gaussian_batch(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_0 = torch.randn(n, 3, generator=g, dtype=F64)
    x_1 = MU + SIGMA * torch.randn(n, 3, generator=g, dtype=F64)
    return {"x_0": x_0, "x_1": x_1, "y": torch.zeros(n, dtype=torch.long)}


class Perturbed(torch.nn.Module):
    """The exact flow map plus ``scale * (t - s) * x`` (zero at s = t) plus ``offset`` (everywhere)."""

    def __init__(self, exact, scale=0.0, offset=0.0):
        super().__init__()
        self.exact, self.scale, self.offset = exact, scale, offset
        self.num_classes = exact.num_classes

    def forward(self, x, s, y, t_end=None):
        t_end = s if t_end is None else t_end
        return self.exact(x, s, y, t_end) + self.scale * (t_end - s)[:, None] * x + self.offset


class EulerFlowMap(torch.nn.Module):
    """u(x, s, t) = v(x, s) for every t: a flow map whose boundary u(x, s, s) = v is right, and nothing else."""

    def __init__(self, velocity):
        super().__init__()
        self.velocity, self.num_classes = velocity, velocity.num_classes

    def forward(self, x, s, y, t_end=None):
        return self.velocity(x, s, y)


@pytest.fixture
def exact():
    return GaussianFlowMap(MU, SIGMA)


# --------------------------------------------------------------------------- the MeanFlow identity


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_meanflow_loss_is_zero_at_the_exact_average_velocity_and_not_off_it(exact, p):
    teacher = GaussianVelocity(MU, SIGMA)
    objective = MeanFlow(teacher, equal_fraction=0.25, adaptive_p=p)
    torch.manual_seed(0)
    at_exact = objective.loss(exact, gaussian_batch())
    torch.manual_seed(0)
    off_gap = objective.loss(Perturbed(exact, scale=0.1), gaussian_batch())  # wrong only where s < t
    torch.manual_seed(0)
    off_everywhere = objective.loss(Perturbed(exact, offset=0.05), gaussian_batch())
    print(
        f"\np={p}: mse at exact {float(at_exact.logs['mse']):.2e}, off the gap "
        f"{float(off_gap.logs['mse']):.2e}, offset {float(off_everywhere.logs['mse']):.2e}"
    )
    assert float(at_exact.logs["mse"]) < 1e-18
    assert float(off_gap.logs["mse"]) > 1e-4
    assert float(off_everywhere.logs["mse"]) > 1e-4
    assert float(at_exact.loss) < 1e-12 and float(off_gap.loss) > 1e3 * float(at_exact.loss) + 1e-6


def test_meanflow_targets_the_teacher_velocity_where_s_equals_t(exact):
    teacher = GaussianVelocity(MU, SIGMA)
    objective = MeanFlow(teacher, equal_fraction=1.0)
    s, t = objective.times(64, torch.zeros(1, dtype=F64))
    assert torch.equal(s, t)
    b = gaussian_batch(64)
    z = b["x_0"] * (1 - s[:, None]) + b["x_1"] * s[:, None]
    target = objective.target_of(exact, z, s, t, b["y"], n_equal=64)
    assert torch.allclose(target, teacher(z, s, b["y"]), atol=0, rtol=0)


def test_adaptive_weighting_is_one_over_the_error():
    err = torch.tensor([[1.0, 1.0], [0.1, 0.1]], dtype=F64)  # per-sample mse 1 and 0.01
    plain, _ = adaptive_mse(err, p=0.0, c=1e-3)
    weighted, mse = adaptive_mse(err, p=1.0, c=1e-3)
    assert plain == pytest.approx((1.0 + 0.01) / 2)
    assert mse == pytest.approx(plain)
    assert weighted == pytest.approx((1.0 / 1.001 + 0.01 / 0.011) / 2)


# --------------------------------------------------------------------------- Shortcut


def test_shortcut_target_of_the_exact_map_is_the_exact_map(exact):
    objective = Shortcut(GaussianVelocity(MU, SIGMA))
    torch.manual_seed(0)
    s, t = objective.gap_times(256, torch.zeros(1, dtype=F64))
    assert bool((t > s).all()) and bool((t <= 1).all())
    gaps = (t - s).unique()
    assert set(gaps.tolist()) <= {2.0**-j for j in range(8)} and len(gaps) > 4
    assert torch.equal(torch.remainder(s, t - s), torch.zeros_like(s))  # s on the grid of its gap
    z = torch.randn(256, 3, dtype=F64)
    y = torch.zeros(256, dtype=torch.long)
    away = ~((t - s) <= objective.min_gap)  # the finest gap's half steps are velocities, not the map
    target = objective.gap_target(exact, z, s, t, y, v=None)
    assert torch.allclose(target[away], exact(z, s, y, t)[away], atol=1e-12)
    wrong = objective.gap_target(Perturbed(exact, scale=0.3), z, s, t, y, v=None)
    assert not torch.allclose(wrong[away], exact(z, s, y, t)[away], atol=1e-3)


@pytest.mark.parametrize("student", ["exact", "euler"])
def test_shortcut_target_tends_to_the_instantaneous_velocity_as_the_gap_shrinks(exact, student):
    velocity = GaussianVelocity(MU, SIGMA)
    net = exact if student == "exact" else EulerFlowMap(velocity)
    objective = Shortcut(velocity, min_gap=2.0**-40)  # no base case in the range tested
    z = torch.randn(128, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    s = torch.rand(128, dtype=F64, generator=torch.Generator().manual_seed(4)) * 0.9
    y = torch.zeros(128, dtype=torch.long)
    v = velocity(z, s, y)
    errors = []
    for j in (2, 6, 10, 14, 18):
        d = torch.full_like(s, 2.0**-j)
        errors.append(float((objective.gap_target(net, z, s, s + d, y, v) - v).abs().max()))
    print(f"\n{student}: max |target - v| by gap 2^-(2, 6, 10, 14, 18): {errors}")
    assert errors[-1] < 1e-4
    assert all(b < a / 8 for a, b in zip(errors, errors[1:]))  # first order: 16x smaller gap, ~16x smaller


# --------------------------------------------------------------------------- the JVP


def finite_difference(net, z, s, t, y, v, eps):
    """(u(z + eps v, s + eps, t) - u(z - eps v, s - eps, t)) / (2 eps)."""
    return (net(z + eps * v, s + eps, y, t) - net(z - eps * v, s - eps, y, t)) / (2 * eps)


def test_jvp_equals_finite_differences_on_the_gaussian_map(exact):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 3, dtype=F64, generator=g)
    s = 0.05 + 0.4 * torch.rand(64, dtype=F64, generator=g)
    t = s + 0.05 + 0.4 * torch.rand(64, dtype=F64, generator=g)
    y = torch.zeros(64, dtype=torch.long)
    v = torch.randn(64, 3, dtype=F64, generator=g)  # any tangent
    jvp = total_derivative(exact, z, s, t, y, v)
    fd = finite_difference(exact, z, s, t, y, v, 1e-5)
    assert torch.allclose(jvp, fd, atol=1e-7, rtol=1e-6)
    assert jvp.abs().max() > 0.1  # not trivially zero


def dit_inputs(n=4, seed=1, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 8, 8, generator=g, dtype=dtype)
    s = 0.1 + 0.3 * torch.rand(n, generator=g, dtype=dtype)
    t = s + 0.1 + 0.4 * torch.rand(n, generator=g, dtype=dtype)
    y = torch.tensor([0, 1, 2, 3])[:n]
    return x, s, t, y


def trained_like_flowmap(seed=0):
    """A flow-map DiT from a random teacher, its gap embedder moved off zero (so t matters)."""
    net = flowmap_from_velocity(random_dit(seed))
    with torch.no_grad():
        for p in net.gap_embedder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def test_jvp_through_the_flowmap_dit_equals_finite_differences_and_reverse_mode():
    net = trained_like_flowmap()
    x, s, t, y = dit_inputs()
    v = torch.randn_like(x)
    jvp = total_derivative(net, x, s, t, y, v)
    # The time features are computed in float32 (models.dit.timestep_features): finite differences
    # in s carry that rounding, hence the loose tolerance.
    fd = finite_difference(net, x, s, t, y, v, 1e-4)
    rel = float((jvp - fd).detach().norm() / fd.norm())
    # Reverse mode (the double-vjp trick) through the fused-attention module, on torch's composite
    # math kernel (the CPU flash kernel has no double backward either).
    fused = build_model({"kind": "flowmap_dit", "config": {**model_spec(net)["config"], "explicit_attention": False}})
    fused.double().load_state_dict(net.state_dict())
    with sdpa_kernel([SDPBackend.MATH]):
        _, reverse = torch.autograd.functional.jvp(lambda a, b: fused(a, b, y, t), (x, s), (v, torch.ones_like(s)))
    print(f"\nflow-map DiT: |jvp - fd| / |fd| = {rel:.2e}, |jvp - reverse| = {float((jvp - reverse).abs().max()):.2e}")
    assert rel < 1e-2
    assert torch.allclose(jvp, reverse, atol=1e-8, rtol=1e-6)


def test_the_fused_attention_kernel_has_no_forward_mode_on_cpu_so_explicit_is_needed():
    """Pins why explicit attention exists; if torch adds the derivative, this says the flag may go."""
    fused = FlowMapDiT(
        FlowMapDiTConfig(**dit_config("DiT-T/2", input_size=8, in_channels=2).__dict__, explicit_attention=False)
    ).double()
    x, s, t, y = dit_inputs()
    with pytest.raises((NotImplementedError, RuntimeError)):
        total_derivative(fused, x, s, t, torch.zeros_like(y), torch.randn_like(x))


# --------------------------------------------------------------------------- the flow-map DiT


def test_flowmap_dit_built_from_a_dit_is_the_dit_for_every_end_time():
    teacher = random_dit()
    net = flowmap_from_velocity(teacher)
    x, s, t, y = dit_inputs()
    v = teacher(x, s, y)
    assert torch.allclose(net(x, s, y, t), v, atol=1e-12)
    assert torch.allclose(net(x, s, y, torch.ones_like(s)), v, atol=1e-12)
    assert torch.allclose(net(x, s, y), v, atol=1e-12)  # called as a velocity network


def test_flowmap_dit_at_zero_gap_is_the_velocity_network_whatever_the_gap_embedder_learns():
    teacher = random_dit()
    net = trained_like_flowmap()
    x, s, t, y = dit_inputs()
    assert torch.allclose(net(x, s, y, s), teacher(x, s, y), atol=1e-12)  # d = 0: exactly v
    assert not torch.allclose(net(x, s, y, t), teacher(x, s, y), atol=1e-4)  # d > 0: the second time is used


def test_explicit_attention_equals_the_fused_kernel():
    net = trained_like_flowmap().float()
    fused = build_model({"kind": "flowmap_dit", "config": {**model_spec(net)["config"], "explicit_attention": False}})
    fused.load_state_dict(net.state_dict())
    assert type(fused.blocks[0].attn) is not type(net.blocks[0].attn)
    x, s, t, y = dit_inputs(dtype=torch.float32)
    assert torch.allclose(net(x, s, y, t), fused(x, s, y, t), atol=1e-5, rtol=1e-5)


def test_flowmap_dit_spec_round_trips_and_the_dit_keeps_its_kind():
    net = trained_like_flowmap()
    spec = model_spec(net)
    assert spec["kind"] == "flowmap_dit" and spec["config"]["explicit_attention"] is True
    rebuilt = build_model(spec).double()
    rebuilt.load_state_dict(net.state_dict())
    x, s, t, y = dit_inputs()
    assert torch.equal(rebuilt(x, s, y, t), net(x, s, y, t))
    assert model_spec(random_dit())["kind"] == "dit"
    assert set(net.state_dict()) - set(random_dit().state_dict()) == {
        k for k in net.state_dict() if k.startswith("gap_embedder.")
    }


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 3])
def test_k_step_sampling_of_the_exact_map_reproduces_the_exact_endpoint(exact, steps):
    x_0 = torch.randn(256, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(256, dtype=torch.long)
    out = flowmap_sample(exact, x_0, y, steps)
    assert out.nfe == steps
    assert torch.allclose(out.x_1, exact.exact_map(x_0), atol=1e-12)
    euler = flowmap_sample(EulerFlowMap(exact), x_0, y, steps)  # the velocity alone is not exact
    assert not torch.allclose(euler.x_1, exact.exact_map(x_0), atol=1e-2)


def test_guidance_on_the_average_velocity():
    class ByLabel(torch.nn.Module):
        num_classes = 2

        def forward(self, x, s, y, t_end=None):
            return x * 0 + y[:, None].to(x.dtype) + 10 * (t_end - s)[:, None]

    net, x = ByLabel(), torch.zeros(3, 2, dtype=F64)
    s, t, y = torch.zeros(3, dtype=F64), torch.full((3,), 0.5, dtype=F64), torch.tensor([0, 1, 1])
    # u = u_null + w (u_y - u_null), u_null = 2 + 5, u_y = y + 5
    for w in (0.0, 1.0, 3.0):
        u = guided_average_velocity(net, w)(x, s, t, y)
        assert torch.allclose(u, (7 + w * (y - 2)).to(F64)[:, None].expand(3, 2))


# --------------------------------------------------------------------------- training on the toy


@pytest.mark.parametrize("objective_cls", [MeanFlow, Shortcut])
def test_a_short_training_makes_the_one_step_map_closer_to_the_exact_one(objective_cls):
    teacher = GaussianVelocity(MU.float(), SIGMA.float())
    torch.manual_seed(0)
    student = ToyFlowMapMLP(dim=3, num_classes=1, hidden=64)
    x_0 = torch.randn(2000, 3, generator=torch.Generator().manual_seed(9))
    y = torch.zeros(2000, dtype=torch.long)

    def one_step_error(net):
        return float((flowmap_sample(net, x_0, y, 1).x_1 - teacher.exact_map(x_0)).pow(2).sum(1).mean().sqrt())

    def batch():
        return {"x_1": MU.float() + SIGMA.float() * torch.randn(256, 3), "y": torch.zeros(256, dtype=torch.long)}

    before = one_step_error(student)
    euler = float(
        (flowmap_sample(EulerFlowMap(teacher), x_0, y, 1).x_1 - teacher.exact_map(x_0)).pow(2).sum(1).mean().sqrt()
    )
    # Plain MSE (adaptive_p = 0): on this toy the p = 1 weighting (1 / each row's error) leaves the
    # large gaps, the rows with the largest errors, under-trained (1-step error ~1.5 after 1000 steps).
    fit(objective_cls(teacher, equal_fraction=0.5, adaptive_p=0.0), student, batch, steps=600, lr=2e-3)
    after = one_step_error(student)
    print(
        f"\n{objective_cls.__name__}: 1-step RMS error {before:.3f} -> {after:.3f} (teacher Euler 1 step: {euler:.3f})"
    )
    assert after < 0.5 * before
    assert after < 0.5 * euler  # better than one step of the teacher: the map was learnt, not the velocity
