"""Test helpers: a small velocity MLP, 2-D Gaussian-mixture data, sliced Wasserstein, the exact
velocity of a Gaussian (and the Gaussian the closed-form tests use), a network that records its calls.

Imported by the tests in this folder after ``sys.path.insert(0, <this folder>)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class ToyVelocityMLP(nn.Module):
    """v(x, t, y) for (N, D) points: an MLP on [x, sin/cos features of t] plus a label embedding.

    Label id ``num_classes`` is the null ("no class") label, as for every fewstep network.
    """

    def __init__(self, dim: int = 2, num_classes: int = 2, hidden: int = 128, t_freqs: int = 8):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(t_freqs), persistent=False)
        self.inp = nn.Linear(dim + 2 * t_freqs, hidden)
        self.label = nn.Embedding(num_classes + 1, hidden)
        self.body = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        angles = t.to(x.dtype)[:, None] * self.freqs.to(x.dtype)  # (N, F)
        t_feat = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (N, 2F)
        h = self.inp(torch.cat([x, t_feat], dim=-1)) + self.label(y)  # (N, H)
        return self.out(self.body(h))


# Eight Gaussian modes on a circle; a mode's class is its index mod 2, so every class
# is itself a four-mode mixture (a transport map with real curvature).
NUM_MODES = 8
NUM_CLASSES = 2
RADIUS = 2.0
MODE_STD = 0.15


def mode_centres(dtype: torch.dtype = torch.float32) -> Tensor:
    angle = 2 * math.pi * torch.arange(NUM_MODES, dtype=dtype) / NUM_MODES
    return RADIUS * torch.stack([angle.cos(), angle.sin()], dim=-1)  # (K, 2)


def sample_mixture_given(y: Tensor, generator: torch.Generator | None = None, stratified: bool = False) -> Tensor:
    """Points from the class-``y`` mixtures: a mode of that parity, plus N(0, std^2).

    ``stratified`` cycles through the modes instead of drawing them, so a reference set
    has exactly balanced modes (W_2 is sensitive to mode-weight noise).
    """
    n = y.shape[0]
    if stratified:
        k = 2 * (torch.arange(n) % (NUM_MODES // 2)) + y
    else:
        k = 2 * torch.randint(0, NUM_MODES // 2, (n,), generator=generator) + y
    eps = torch.randn(n, 2, generator=generator)
    return mode_centres()[k] + MODE_STD * eps


def sample_mixture(n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(x_1, y): ``n`` labelled points from the mixture, classes balanced in expectation."""
    y = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    return sample_mixture_given(y, generator), y


def sliced_wasserstein(a: Tensor, b: Tensor, n_proj: int = 512, seed: int = 0) -> float:
    """SW_2(a, b): sqrt of the mean over random directions of W_2^2 of the 1-D projections.

    Equal sample sizes, so 1-D W_2 is the distance between sorted projections.
    """
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs equal shapes, got {a.shape} and {b.shape}")
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(a.shape[1], n_proj, generator=g, dtype=a.dtype)
    theta = theta / theta.norm(dim=0, keepdim=True)  # (D, P) unit directions
    pa = (a @ theta).sort(dim=0).values  # (N, P)
    pb = (b @ theta).sort(dim=0).values
    return float((pa - pb).pow(2).mean().sqrt())


def fit(objective, model: nn.Module, batches, steps: int, lr: float = 2e-3) -> list[float]:
    """The loop the real trainer runs, minus Ray: loss, backward, step, after_step.

    ``batches()`` returns a fresh batch dict. Returns the loss every step.
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.05)
    losses = []
    model.train()
    for _ in range(steps):
        out = objective.loss(model, batches())
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
        objective.after_step(model)
        losses.append(float(out.logs["loss"]))
    model.eval()
    return losses


# The diagonal Gaussian x_1 ~ N(MU, diag(SIGMA^2)) of the closed-form tests, in float64.
F64 = torch.float64
MU = torch.tensor([1.5, -0.5, 0.0], dtype=F64)
SIGMA = torch.tensor([0.5, 2.0, 1.0], dtype=F64)


class GaussianVelocity(nn.Module):
    """The exact marginal velocity of the straight path when x_1 ~ N(mu, diag(sigma^2)).

    x_t = (1 - t) x_0 + t x_1 is Gaussian, mean t mu, variance s_t^2 = (1 - t)^2 + t^2 sigma^2,
    and Cov(x_1 - x_0, x_t) = t sigma^2 - (1 - t). Conditioning the jointly Gaussian pair:

        v(x, t) = E[x_1 - x_0 | x_t = x] = mu + (t sigma^2 - (1 - t)) / s_t^2 (x - t mu).

    Its flow is x_t = t mu + s_t x_0 (d/dt of that is v), so the exact ODE map from noise
    to data is x_1 = mu + sigma x_0. Labels are ignored.
    """

    def __init__(self, mu: Tensor, sigma: Tensor, num_classes: int = 1):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("mu", mu)
        self.register_buffer("sigma", sigma)

    def variance(self, t: Tensor) -> Tensor:
        """s_t^2 = (1 - t)^2 + t^2 sigma^2, shape (N, D) for t of shape (N, 1)."""
        return (1 - t) ** 2 + t**2 * self.sigma**2

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        t = t.to(x.dtype)[:, None]  # (N, 1)
        slope = (t * self.sigma**2 - (1 - t)) / self.variance(t)  # (N, D)
        return self.mu + slope * (x - t * self.mu)

    def exact_map(self, x_0: Tensor) -> Tensor:
        """The ODE's solution at t = 1 from x_0 at t = 0: x_1 = mu + sigma x_0."""
        return self.mu + self.sigma * x_0

    def conditional_variance(self, t: float) -> Tensor:
        """Var(x_1 - x_0 | x_t) per dimension: the FM loss floor at time t, shape (D,).

        Var(u) - Cov(u, x_t)^2 / Var(x_t) with Var(u) = sigma^2 + 1.
        """
        cov = t * self.sigma**2 - (1 - t)
        return self.sigma**2 + 1 - cov**2 / ((1 - t) ** 2 + t**2 * self.sigma**2)


class Recorder(nn.Module):
    """Returns zeros and remembers what it was called with."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.calls = []
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y):
        self.calls.append((x.detach().clone(), t.detach().clone(), y.clone()))
        return torch.zeros_like(x) + 0 * self.w


class GaussianFlowMap(GaussianVelocity):
    """The exact flow map of :class:`GaussianVelocity`'s flow, as an average velocity u(x, s, t).

    The flow is x_t = t mu + s_t x_0 (s_t = sqrt((1 - t)^2 + t^2 sigma^2)), so from x at time s:

        x_t = t mu + (s_t / s_s) (x - s mu),     u(x, s, t) = (x_t - x) / (t - s),

    linear in x; at t = s it is the velocity v(x, s). Called as ``net(x, s, y, t_end)``.
    """

    def std(self, t: Tensor) -> Tensor:
        return self.variance(t).sqrt()

    def forward(self, x: Tensor, s: Tensor, y: Tensor, t_end: Tensor | None = None) -> Tensor:
        v = super().forward(x, s, y)
        if t_end is None:
            return v
        s_, t_ = s.to(x.dtype)[:, None], t_end.to(x.dtype)[:, None]  # (N, 1)
        x_t = t_ * self.mu + self.std(t_) / self.std(s_) * (x - s_ * self.mu)
        gap = t_ - s_
        u = (x_t - x) / torch.where(gap > 0, gap, torch.ones_like(gap))
        return torch.where(gap > 0, u, v)


class ToyFlowMapMLP(nn.Module):
    """u(x, s, y, t_end) for (N, D) points: an MLP on [x, sin/cos features of s and of t - s] plus a label."""

    def __init__(self, dim: int = 2, num_classes: int = 2, hidden: int = 128, t_freqs: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(t_freqs), persistent=False)
        self.inp = nn.Linear(dim + 4 * t_freqs, hidden)
        self.label = nn.Embedding(num_classes + 1, hidden)
        self.body = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.out = nn.Linear(hidden, dim)

    def features(self, t: Tensor, like: Tensor) -> Tensor:
        angles = t.to(like.dtype)[:, None] * self.freqs.to(like.dtype)  # (N, F)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (N, 2F)

    def forward(self, x: Tensor, s: Tensor, y: Tensor, t_end: Tensor | None = None) -> Tensor:
        gap = torch.zeros_like(s) if t_end is None else t_end - s
        h = self.inp(torch.cat([x, self.features(s, x), self.features(gap, x)], dim=-1)) + self.label(y)  # (N, H)
        return self.out(self.body(h))


def random_dit(seed: int = 0, dtype: torch.dtype = F64, **shape) -> nn.Module:
    """A small DiT (8x8x2 latents, 3 classes) with every weight moved off AdaLN-Zero's zeros, so every layer matters."""
    from models.dit import DiT, dit_config

    torch.manual_seed(seed)
    net = DiT(dit_config("DiT-T/2", input_size=8, in_channels=2, num_classes=3, depth=2, **shape)).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net
