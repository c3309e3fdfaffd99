"""VP diffusion (eps-prediction): schedules, time map, forward marginal, DDPM/DDIM against closed forms.

The closed forms use Gaussian data x_1 ~ N(mu, diag(s^2)). With x_k = a x_1 + b eps
(a = sqrt(abar_k), b = sqrt(1 - abar_k)) the pair (eps, x_k) is jointly Gaussian, so the
perfect eps-predictor is

    eps*(x_k, k) = E[eps | x_k] = b / (a^2 s^2 + b^2) (x_k - a mu),

and the probability-flow ODE moves x_k's Gaussian marginal N(a mu, a^2 s^2 + b^2) onto the
data's by the monotone affine map (each dimension separately), so from step k:

    x_1 = mu + s (x_k - a mu) / sqrt(a^2 s^2 + b^2).
"""

import math
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from toy import (  # noqa: E402
    F64,
    MU,
    NUM_CLASSES,
    SIGMA,
    Recorder,
    ToyVelocityMLP,
    fit,
    sample_mixture,
    sample_mixture_given,
    sliced_wasserstein,
)

from models.diffusion import (  # noqa: E402
    DDIMUpdate,
    DDPMObjective,
    DDPMUpdate,
    VPSchedule,
    cosine_betas,
    ddim_sample,
    ddpm_sample,
    diffuse,
    diffusion_step,
    get_update,
    network_time,
    predict_x_1,
    sampling_steps,
    vp_schedule,
)
from models.samplers import SampleResult  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

T = 1000


@pytest.fixture(scope="module", params=["linear", "cosine"])
def schedule(request):
    return vp_schedule(request.param, T)


class GaussianEps(nn.Module):
    """The exact E[eps | x_k] for x_1 ~ N(mu, diag(s^2)); reads k back from the network time."""

    def __init__(self, schedule: VPSchedule, mu=MU, sigma=SIGMA, num_classes: int = 1):
        super().__init__()
        self.schedule, self.mu, self.sigma, self.num_classes = schedule, mu, sigma, num_classes

    def coefficients(self, k):
        abar = self.schedule.alphas_cumprod[k].to(self.mu.dtype)[:, None]  # (N, 1)
        return abar.sqrt(), (1 - abar).sqrt()

    def forward(self, x, t, y):
        a, b = self.coefficients(diffusion_step(t, self.schedule.num_steps))
        return b / (a**2 * self.sigma**2 + b**2) * (x - a * self.mu)

    def ode_map(self, x, k: int):
        """The PF-ODE solution at the data from x at step k (the affine map of the docstring)."""
        a, b = self.coefficients(torch.full((x.shape[0],), k))
        return self.mu + self.sigma * (x - a * self.mu) / (a**2 * self.sigma**2 + b**2).sqrt()


def noise(n, seed=0, dim=3):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def no_labels(n):
    return torch.zeros(n, dtype=torch.long)


# --- schedules ----------------------------------------------------------------------------


def test_schedules_decrease_and_stay_in_range(schedule):
    abar = schedule.alphas_cumprod
    assert schedule.num_steps == T and abar.dtype == F64 and abar.shape == (T,)
    assert (abar[1:] < abar[:-1]).all() and (abar > 0).all() and abar[0] < 1
    assert torch.allclose(abar, torch.cumprod(1 - schedule.betas, 0), rtol=0, atol=0)
    assert (schedule.snr[1:] < schedule.snr[:-1]).all()
    assert torch.allclose(
        schedule.sqrt_alphas_cumprod**2 + schedule.sqrt_one_minus_alphas_cumprod**2,
        torch.ones(T, dtype=F64),
        atol=1e-15,
    )
    assert abar[-1] < 1e-4  # the last step is (almost) pure noise: N(0, I) stands for it


def test_linear_schedule_is_ho_et_al():
    s = vp_schedule("linear", 1000)
    assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert s.betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert torch.allclose(s.betas[1:] - s.betas[:-1], torch.full((999,), (0.02 - 1e-4) / 999, dtype=F64))
    # abar_T = prod (1 - beta) ~ exp(-sum beta - ...) = 4.04e-5, the value quoted for Ho et al.'s schedule
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.036e-5, rel=1e-3)
    # other T scale both ends by 1000 / T so the process still ends in noise
    s_100 = vp_schedule("linear", 100)
    assert s_100.betas[0].item() == pytest.approx(1e-3) and s_100.betas[-1].item() == pytest.approx(0.2)
    assert s_100.alphas_cumprod[-1] < 1e-4


def test_cosine_schedule_follows_the_formula_and_is_clipped():
    s = vp_schedule("cosine", T)

    def f(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    expected = torch.tensor([f((k + 1) / T) / f(0) for k in range(T)], dtype=F64)
    # every step but the last follows abar(u) = f(u) / f(0) ...
    assert torch.allclose(s.alphas_cumprod[:-1], expected[:-1], rtol=1e-9, atol=1e-15)
    # ... whose last beta would be 1 (f(1) = cos(pi/2)^2 = 0): it is clipped to 0.999
    assert (s.betas[:-1] < 0.999).all() and s.betas[-1].item() == 0.999
    assert s.alphas_cumprod[-1].item() == pytest.approx(expected[-2].item() * 0.001, rel=1e-9)
    # the unclipped formula on a short schedule clips several of the last steps
    assert (cosine_betas(10) <= 0.999).all()


def test_schedule_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown beta schedule 'quadratic'.*linear, cosine"):
        vp_schedule("quadratic")
    with pytest.raises(ValueError, match="T > 20"):
        vp_schedule("linear", 10)
    with pytest.raises(ValueError, match="T >= 2"):
        vp_schedule("cosine", 1)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        VPSchedule("bad", torch.tensor([0.1, 1.0]))


# --- the time map ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [1000, 37])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_network_time_round_trips_and_stays_in_the_unit_interval(num_steps, dtype):
    k = torch.arange(num_steps)
    t = network_time(k.to(dtype), num_steps)
    assert t.dtype == dtype and (t >= 0).all() and (t <= 1).all()
    assert (t[1:] < t[:-1]).all()  # more noise, earlier in fewstep's time
    assert t[-1].item() == 0.0 and t[0].item() == pytest.approx(1 - 1 / num_steps)
    assert torch.equal(diffusion_step(t, num_steps), k)
    for k_int in (0, 1, num_steps // 2, num_steps - 1):
        t_int = network_time(k_int, num_steps)
        assert 0 <= t_int <= 1 and diffusion_step(t_int, num_steps) == k_int
    # the DiT scales t by 1000: a T = 1000 model sees the integer timesteps 999 - k
    if num_steps == 1000:
        assert torch.allclose(1000 * network_time(k.to(F64), 1000), (999 - k).to(F64))
    with pytest.raises(ValueError, match=f"0..{num_steps - 1}, got {num_steps}"):
        network_time(num_steps, num_steps)


def test_sampling_steps_are_trailing_and_even():
    assert sampling_steps(T, T) == list(range(T))
    assert sampling_steps(1, T) == [T - 1]
    assert sampling_steps(10, T) == [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    for s in (3, 7, 50, 250, 999):
        ks = sampling_steps(s, T)
        assert len(ks) == s and ks[-1] == T - 1 and ks[0] >= 0
        assert all(b > a for a, b in zip(ks, ks[1:]))
        gaps = [b - a for a, b in zip([-1] + ks, ks)]
        assert max(gaps) - min(gaps) <= 1  # evenly spaced up to rounding
    with pytest.raises(ValueError, match="at most the schedule's T = 1000, got 1001"):
        sampling_steps(1001, T)
    with pytest.raises(ValueError, match="positive int"):
        sampling_steps(0, T)


# --- the forward process --------------------------------------------------------------------


def test_forward_marginal_matches_the_markov_chain(schedule):
    """Run q(x_k | x_{k-1}) = N(sqrt(1 - beta_k) x_{k-1}, beta_k) from a fixed point: the empirical
    mean and variance at every step match sqrt(abar_k) x_1 and 1 - abar_k, and ``diffuse`` agrees."""
    n = 20_000
    x_1 = torch.tensor([2.0, -1.0, 0.5], dtype=F64)
    g = torch.Generator().manual_seed(0)
    x = x_1.expand(n, 3).clone()
    abar = schedule.alphas_cumprod
    for k in range(T):
        beta = schedule.betas[k].item()
        x = math.sqrt(1 - beta) * x + math.sqrt(beta) * torch.randn(n, 3, generator=g, dtype=F64)
        if k in (0, 10, 250, 500, 900, T - 1):
            var = 1 - abar[k].item()
            se_mean = math.sqrt(var / n)
            assert ((x.mean(0) - abar[k].sqrt() * x_1).abs() < 4 * se_mean).all(), (k, x.mean(0))
            # se of a variance estimate: var sqrt(2 / n) ~ 1 % of var
            assert torch.allclose(x.var(0), torch.full((3,), var, dtype=F64), rtol=0.05), (k, x.var(0))

    k = torch.tensor([0, 500, T - 1])
    eps = torch.randn(3, 3, dtype=F64)
    x_k = diffuse(x_1.expand(3, 3), eps, k, schedule)
    assert torch.allclose(x_k, abar[k, None].sqrt() * x_1 + (1 - abar[k, None]).sqrt() * eps, rtol=0, atol=1e-15)


# --- the objective ----------------------------------------------------------------------------


def test_objective_noises_at_the_mapped_time_and_regresses_eps():
    s = vp_schedule("cosine", T)
    x_1 = torch.randn(64, 2, 4, dtype=F64)
    y = torch.randint(0, 3, (64,))
    model = Recorder()
    torch.manual_seed(5)
    out = DDPMObjective(s).loss(model, {"x_1": x_1, "y": y})

    torch.manual_seed(5)  # replay the objective's draws: k, then eps
    k = torch.randint(0, T, (64,))
    eps = torch.randn_like(x_1)
    x_k, t, y_seen = model.calls[0]
    abar = s.alphas_cumprod[k][:, None, None]
    assert torch.allclose(x_k, abar.sqrt() * x_1 + (1 - abar).sqrt() * eps, atol=1e-14)
    assert torch.equal(t, 1 - (k.to(F64) + 1) / T) and t.dtype == F64
    assert torch.equal(y_seen, y)
    # a zero predictor's loss is E eps^2
    assert out.loss.item() == pytest.approx(eps.pow(2).mean().item(), rel=1e-12)
    assert out.loss.requires_grad and not out.logs["loss"].requires_grad


def test_objective_loss_of_the_perfect_predictor_is_the_conditional_variance(schedule):
    """E || eps - E[eps | x_k] ||^2 = E_k mean_d a^2 s^2 / (a^2 s^2 + b^2): a closed form."""
    n = 200_000
    torch.manual_seed(0)
    x_1 = MU + SIGMA * torch.randn(n, 3, dtype=F64)
    loss = DDPMObjective(schedule).loss(GaussianEps(schedule), {"x_1": x_1, "y": no_labels(n)}).loss.item()
    abar = schedule.alphas_cumprod[:, None]  # (T, 1)
    floor = (abar * SIGMA**2 / (abar * SIGMA**2 + 1 - abar)).mean().item()
    assert loss == pytest.approx(floor, rel=0.02)
    # a predictor at the wrong time is worse: read k 100 steps off
    shifted = GaussianEps(schedule)
    shifted.forward = lambda x, t, y: GaussianEps.forward(shifted, x, t + 100 / T, y)
    torch.manual_seed(0)
    worse = DDPMObjective(schedule).loss(shifted, {"x_1": x_1, "y": no_labels(n)}).loss.item()
    assert worse > loss * 1.03  # same draws (seed 0): the gap is the predictor's, not noise


def test_objective_label_dropout_and_errors():
    s = vp_schedule("linear", T)
    model = Recorder()
    torch.manual_seed(0)
    DDPMObjective(s, label_dropout=0.5).loss(
        model, {"x_1": torch.randn(4000, 2), "y": torch.zeros(4000, dtype=torch.long)}
    )
    dropped = (model.calls[0][2] == Recorder.num_classes).double().mean().item()
    assert dropped == pytest.approx(0.5, abs=0.04)
    with pytest.raises(ValueError, match="label_dropout"):
        DDPMObjective(s, label_dropout=1.0)
    with pytest.raises(KeyError, match="needs batch\\['y'\\]"):
        DDPMObjective(s).loss(model, {"x_1": torch.randn(2, 2)})
    with pytest.raises(ValueError, match="'x_0'"):
        DDPMObjective(s).loss(
            model, {"x_1": torch.randn(2, 2), "x_0": torch.randn(2, 2), "y": torch.zeros(2, dtype=torch.long)}
        )


def test_training_smoke_loss_decreases():
    """A small MLP learns eps on the 2-D mixture (linear schedule, the stage's): the loss halves,
    and DDIM with the learnt eps lands much nearer the mixture than noise does."""
    torch.manual_seed(0)
    net = ToyVelocityMLP(dim=2, num_classes=NUM_CLASSES, hidden=128)
    obj = DDPMObjective(vp_schedule("linear", T), label_dropout=0.1)

    def batches():
        x_1, y = sample_mixture(256)
        return {"x_1": x_1, "y": y}

    losses = fit(obj, net, batches, steps=800, lr=3e-3)
    first, last = sum(losses[:25]) / 25, sum(losses[-50:]) / 50
    assert last < 0.5 * first, (first, last)  # measured: 0.61 -> 0.24
    y = torch.tensor([0, 1] * 256)
    torch.manual_seed(1)
    x = ddim_sample(net, torch.randn(512, 2), y, 50, obj.schedule).x_1
    ref = sample_mixture_given(y, torch.Generator().manual_seed(1))
    # measured: 0.19 against 0.55 for N(0, I)
    assert sliced_wasserstein(x, ref) < 0.5 * sliced_wasserstein(torch.randn(512, 2), ref)


# --- samplers against the closed forms -----------------------------------------------------


def test_ddim_recovers_the_data_distribution(schedule):
    n = 20_000
    out = ddim_sample(GaussianEps(schedule), noise(n), no_labels(n), 1000, schedule)
    assert isinstance(out, SampleResult) and out.nfe == 1000 and out.x_1.dtype == F64
    se = SIGMA / math.sqrt(n)
    assert ((out.x_1.mean(0) - MU).abs() < 4 * se).all(), out.x_1.mean(0)
    assert torch.allclose(out.x_1.var(0), SIGMA**2, rtol=0.05), out.x_1.var(0)


def test_ddpm_ancestral_recovers_the_data_distribution(schedule):
    n = 20_000
    out = ddpm_sample(
        GaussianEps(schedule), noise(n), no_labels(n), 1000, schedule, generator=torch.Generator().manual_seed(1)
    )
    assert out.nfe == 1000
    se = SIGMA / math.sqrt(n)
    assert ((out.x_1.mean(0) - MU).abs() < 4 * se).all(), out.x_1.mean(0)
    assert torch.allclose(out.x_1.var(0), SIGMA**2, rtol=0.05), out.x_1.var(0)


def exact_chain(schedule, steps, eta):
    """Mean and variance (D,) of the sampler's output from x_0 ~ N(0, I) with the perfect predictor.

    Each step is then affine in x plus Gaussian noise, so mean and variance follow a scalar
    recursion per dimension. Written in Song et al.'s generalised form (eta = 1: DDPM with
    beta_tilde; eta = 0: DDIM), on the trailing sub-sequence k_i = (i + 1) T / S - 1.
    """
    num_steps = schedule.num_steps
    ks = [(i + 1) * num_steps // steps - 1 for i in range(steps)]
    m, v = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    for i in reversed(range(steps)):
        abar = schedule.alphas_cumprod[ks[i]].item()
        abar_prev = schedule.alphas_cumprod[ks[i - 1]].item() if i > 0 else 1.0
        a, b = math.sqrt(abar), math.sqrt(1 - abar)
        c = b / (abar * SIGMA**2 + b**2)  # eps* = c (x - a mu)
        sigma2 = eta**2 * (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
        # x_1_hat = (x - b eps*) / a = p x + q
        p, q = (1 - b * c) / a, b * c * MU
        # x_prev = sqrt(abar_prev) x_1_hat + sqrt(1 - abar_prev - sigma^2) eps* + sigma z = A x + B + sigma z
        e = math.sqrt(1 - abar_prev - sigma2)
        A = math.sqrt(abar_prev) * p + e * c
        B = math.sqrt(abar_prev) * q - e * c * a * MU
        m, v = A * m + B, A**2 * v + sigma2
    return m, v


@pytest.mark.parametrize("steps", [250, 50, 10])
def test_few_step_samplers_follow_the_exact_gaussian_chain(schedule, steps):
    """At few steps neither sampler recovers the data exactly; with the perfect predictor both must
    match the closed-form chain. (DDPM's variance shrinks: beta_tilde is the posterior variance
    of a point mass, smaller than the true reverse variance when a step is large.)"""
    n = 20_000
    model, x_0 = GaussianEps(schedule), noise(n)
    m, v = exact_chain(schedule, steps, eta=1.0)
    x = ddpm_sample(model, x_0, no_labels(n), steps, schedule, generator=torch.Generator().manual_seed(2)).x_1
    assert ((x.mean(0) - m).abs() < 4 * (v / n).sqrt()).all(), (x.mean(0), m)
    assert torch.allclose(x.var(0), v, rtol=0.05), (x.var(0), v)
    # DDIM is deterministic and, here, affine: its output IS the chain's map of x_0
    m, v = exact_chain(schedule, steps, eta=0.0)
    x = ddim_sample(model, x_0, no_labels(n), steps, schedule).x_1
    assert torch.allclose(x, m + v.sqrt() * x_0, rtol=1e-9, atol=1e-9)


def test_ddim_converges_to_the_probability_flow_ode(schedule):
    """DDIM is a first-order solver of the PF ODE: its map from x_{T-1} to the data approaches the
    ODE's affine map, the error falling about in proportion to the step size."""
    model = GaussianEps(schedule)
    x_0 = noise(512)
    exact = model.ode_map(x_0, T - 1)
    err = {
        s: (ddim_sample(model, x_0, no_labels(512), s, schedule).x_1 - exact).abs().max().item()
        for s in (50, 250, 1000)
    }
    # measured: 0.0094 (linear), 0.0095 (cosine) at 1000 steps, on outputs up to |x| ~ 6.6
    assert err[1000] < 0.015, err
    # first order: 5x (4x) the steps, about 5x (4x) smaller error
    assert 4 < err[50] / err[250] < 6 and 3 < err[250] / err[1000] < 5, err


def test_one_ddim_step_is_the_x_1_prediction(schedule):
    model, x_0 = GaussianEps(schedule), noise(8)
    abar = schedule.alphas_cumprod[-1].item()
    eps = model(x_0, torch.zeros(8, dtype=F64), no_labels(8))
    expected = (x_0 - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    assert torch.allclose(ddim_sample(model, x_0, no_labels(8), 1, schedule).x_1, expected, rtol=1e-12)
    assert torch.allclose(predict_x_1(x_0, eps, abar), expected, rtol=1e-12)


@pytest.mark.parametrize("abar,abar_prev", [(0.3, 0.5), (1e-4, 0.02), (0.9, 0.95), (0.2, 1.0)])
def test_ddpm_update_is_ddim_with_eta_one(abar, abar_prev):
    """Song et al. 2021, Eq. 12 with sigma^2 = (1 - abar_prev) / (1 - abar) (1 - abar / abar_prev)."""
    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(6, 3, generator=g, dtype=F64) for _ in range(3))
    sigma2 = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
    x_1_hat = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    expected = math.sqrt(abar_prev) * x_1_hat + math.sqrt(1 - abar_prev - sigma2) * eps + math.sqrt(sigma2) * z
    assert torch.allclose(DDPMUpdate()(x, eps, abar, abar_prev, z), expected, rtol=1e-10, atol=1e-12)
    # eta = 0 drops the noise term
    no_noise = math.sqrt(abar_prev) * x_1_hat + math.sqrt(1 - abar_prev) * eps
    assert torch.allclose(DDIMUpdate()(x, eps, abar, abar_prev, None), no_noise, rtol=1e-12)


# --- guidance, noise and batching ------------------------------------------------------------


def labelled_mlp(seed=0):
    torch.manual_seed(seed)
    return ToyVelocityMLP(dim=2, num_classes=3, hidden=32).double()


def test_guidance_combines_eps():
    net, s = labelled_mlp(), vp_schedule("cosine", T)
    w = 2.5

    class Guided(nn.Module):
        num_classes = 3

        def forward(self, x, t, y):
            e_c, e_u = net(x, t, y), net(x, t, torch.full_like(y, 3))
            return e_u + w * (e_c - e_u)

    x_0, y = noise(16, dim=2), torch.randint(0, 3, (16,))
    for sample in (ddim_sample, ddpm_sample):
        kwargs = {} if sample is ddim_sample else {"generator": None}
        torch.manual_seed(3)
        a = sample(net, x_0, y, 20, s, guidance=w, **kwargs).x_1
        torch.manual_seed(3)
        b = sample(Guided(), x_0, y, 20, s, guidance=1.0, **kwargs).x_1
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_ddpm_noise_keeps_each_requests_draws_its_own():
    """Two requests sampled together give what each gives alone, and explicit draws are used."""
    net, s, steps = labelled_mlp(), vp_schedule("linear", T), 8
    requests = []
    for seed, n in ((0, 3), (1, 5)):
        g = torch.Generator().manual_seed(seed)
        x_0 = torch.randn(n, 2, generator=g, dtype=F64)
        draws = [torch.randn(n, 2, generator=g, dtype=F64) for _ in range(steps - 1)]
        requests.append((x_0, torch.randint(0, 3, (n,), generator=g), draws))
    alone = [ddpm_sample(net, x_0, y, steps, s, guidance=2.0, noise=draws).x_1 for x_0, y, draws in requests]
    together = ddpm_sample(
        net,
        torch.cat([r[0] for r in requests]),
        torch.cat([r[1] for r in requests]),
        steps,
        s,
        guidance=2.0,
        noise=[torch.cat([r[2][i] for r in requests]) for i in range(steps - 1)],
    ).x_1
    assert torch.allclose(together, torch.cat(alone), rtol=1e-10, atol=1e-12)

    # the generator path draws the same tensors in the same order as an explicit list
    x_0, y = requests[0][0], requests[0][1]
    g = torch.Generator().manual_seed(7)
    from_generator = ddpm_sample(net, x_0, y, steps, s, generator=g).x_1
    g = torch.Generator().manual_seed(7)
    draws = [torch.randn(x_0.shape, generator=g, dtype=F64) for _ in range(steps - 1)]
    assert torch.equal(ddpm_sample(net, x_0, y, steps, s, noise=draws).x_1, from_generator)
    # the draws matter (ancestral sampling is stochastic), DDIM takes none
    assert not torch.allclose(ddpm_sample(net, x_0, y, steps, s, noise=[-z for z in draws]).x_1, from_generator)
    assert torch.equal(ddim_sample(net, x_0, y, steps, s).x_1, ddim_sample(net, x_0, y, steps, s).x_1)

    with pytest.raises(ValueError, match="8-step ancestral sampling needs 7 noise tensors, got 2"):
        ddpm_sample(net, x_0, y, steps, s, noise=draws[:2])
    # one step takes no draws
    assert ddpm_sample(net, x_0, y, 1, s, noise=[]).nfe == 1


def test_get_update_resolves_names():
    assert isinstance(get_update("ddpm"), DDPMUpdate) and isinstance(get_update("ddim"), DDIMUpdate)
    with pytest.raises(ValueError, match="unknown diffusion sampler 'euler'; choose one of: ddim, ddpm"):
        get_update("euler")
