"""Variance-preserving diffusion with eps-prediction: the DDPM baseline beside flow matching.

The schedule, the objective and both samplers share one notation, so they live together.

Forward process over discrete steps k = 0 .. T-1 (Ho et al. 2020), from data x_1:

    q(x_k | x_{k-1}) = N(sqrt(1 - beta_k) x_{k-1}, beta_k I),
    q(x_k | x_1)     = N(sqrt(abar_k) x_1, (1 - abar_k) I),   abar_k = prod_{j <= k} (1 - beta_j),

so x_k = sqrt(abar_k) x_1 + sqrt(1 - abar_k) eps and k = T-1 is the noisiest step. The network
predicts eps; it is trained on L = E || eps - eps_theta(x_k, t(k), y) ||^2.

Naming keeps fewstep's conventions: x_1 is data, x_0 ~ N(0, I) is noise (the sampler's
start, which stands for x_{T-1}), and every network is called model(x, t, y) with t in
[0, 1], t = 0 noise and t = 1 data. Diffusion steps are always written k. The ONE map from a
step onto the network's time is :func:`network_time`:

    t(k) = 1 - (k + 1) / T,   k in {0, ..., T-1}  ->  t in {0, 1/T, ..., 1 - 1/T}.

It runs the same way as fewstep's time (the noisiest step sits at t = 0, the cleanest at
t = 1 - 1/T; t = 1 is the data itself, which is no diffusion step), it is affine, so equal
steps are equal t-spacings, and with the DiT's time scale of 1000 a T = 1000 model sees the
integer timesteps 999 - k its sinusoidal embedding was designed for. :func:`diffusion_step`
inverts it.

Samplers (:func:`ddpm_sample`, :func:`ddim_sample`) run any number of network evaluations
S <= T over the "trailing" sub-sequence of the training steps (:func:`sampling_steps`), with
classifier-free guidance on eps. No clipping of the predicted x_1: fewstep samples latents,
which have no [-1, 1] range.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from models.conventions import expand_t, full_t
from models.objectives import Batch, LossOutput, Objective, drop_conditions, require
from models.samplers import SampleResult, check_steps, guided_velocity

SCHEDULES = ("linear", "cosine")
COSINE_OFFSET = 0.008  # s of Nichol & Dhariwal 2021: keeps beta_0 from being vanishingly small
MAX_BETA = 0.999  # their clip: without it the cosine schedule's last beta is 1 (abar = 0)


# ---------------------------------------------------------------------------------------
# The schedule


@dataclass(frozen=True, eq=False)
class VPSchedule:
    """A variance-preserving noise schedule over T discrete steps, in float64 on the CPU.

    ``betas`` (T,) in (0, 1) is the schedule; ``alphas_cumprod`` (T,) is derived from it.
    Samplers read coefficients from here as Python floats (no device traffic); the training
    objective copies the two tensors it needs to the batch's device once.
    """

    name: str
    betas: Tensor  # (T,) float64
    alphas_cumprod: Tensor = field(init=False)  # (T,) float64

    def __post_init__(self) -> None:
        betas = self.betas.detach().to(device="cpu", dtype=torch.float64)
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be a 1-D tensor of at least 2 steps, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(
                f"betas must lie in (0, 1); got min {betas.min().item():.3g}, max {betas.max().item():.3g}"
            )
        object.__setattr__(self, "betas", betas)
        # abar_k = prod_{j <= k} (1 - beta_j)
        object.__setattr__(self, "alphas_cumprod", torch.cumprod(1 - betas, dim=0))

    @property
    def num_steps(self) -> int:
        """T, the number of discrete training steps."""
        return self.betas.numel()

    @property
    def alphas(self) -> Tensor:
        """alpha_k = 1 - beta_k, shape (T,)."""
        return 1 - self.betas

    @property
    def sqrt_alphas_cumprod(self) -> Tensor:
        """sqrt(abar_k), the data coefficient of x_k, shape (T,)."""
        return self.alphas_cumprod.sqrt()

    @property
    def sqrt_one_minus_alphas_cumprod(self) -> Tensor:
        """sqrt(1 - abar_k), the noise coefficient of x_k, shape (T,)."""
        return (1 - self.alphas_cumprod).sqrt()

    @property
    def snr(self) -> Tensor:
        """Signal-to-noise ratio abar_k / (1 - abar_k), shape (T,); decreasing in k."""
        return self.alphas_cumprod / (1 - self.alphas_cumprod)


def linear_betas(num_steps: int) -> Tensor:
    """Ho et al. 2020: beta linear from 1e-4 to 0.02 over T = 1000 steps.

    For other T both ends scale by 1000 / T (as Nichol & Dhariwal's code does), so the
    process still ends near pure noise; T = 1000 gives exactly 1e-4 .. 0.02.
    """
    scale = 1000 / num_steps
    if 0.02 * scale >= 1:
        raise ValueError(f"the linear schedule needs T > 20 steps (its last beta is 20 / T), got T = {num_steps}")
    return torch.linspace(1e-4 * scale, 0.02 * scale, num_steps, dtype=torch.float64)


def cosine_betas(num_steps: int) -> Tensor:
    """Nichol & Dhariwal 2021: abar(u) = f(u) / f(0), f(u) = cos((u + s) / (1 + s) pi/2)^2.

    beta_k = min(1 - abar((k + 1) / T) / abar(k / T), 0.999): the clip keeps the last steps
    (where abar -> 0) from being singular.

    Caveat: the clip leaves abar_{T-1} = 0.001 abar_{T-2} (2.4e-9 at T = 1000), and an
    eps-predictor's error there reaches x_1_hat multiplied by sqrt((1 - abar) / abar) ~ 2e4,
    and the first sampling step multiplied by sqrt(abar_prev / abar) (630 for DDIM at 50 steps).
    Nichol & Dhariwal clip x_1_hat to the pixel range [-1, 1]; latents have no such range.
    On the toy mixture a small net trained on it diverges under DDIM at <= 250 steps and DDPM
    at <= 50, where the same net on the linear schedule samples well at 10: prefer "linear"
    (Ho et al.'s, abar_{T-1} = 4e-5) for eps-prediction on latents.
    """
    u = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps  # (T + 1,)
    f = torch.cos((u + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
    betas = 1 - f[1:] / f[:-1]  # (T,)
    return betas.clamp(max=MAX_BETA)


_BETAS: dict[str, Callable[[int], Tensor]] = {"linear": linear_betas, "cosine": cosine_betas}


def vp_schedule(name: str, num_steps: int = 1000) -> VPSchedule:
    """Resolve a schedule name (``"linear"`` or ``"cosine"``) into a :class:`VPSchedule`."""
    if name not in _BETAS:
        raise ValueError(f"unknown beta schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"a diffusion schedule needs an int number of steps T >= 2, got {num_steps!r}")
    return VPSchedule(name=name, betas=_BETAS[name](num_steps))


# ---------------------------------------------------------------------------------------
# Steps and the network's time


def network_time(k: Tensor | int, num_steps: int) -> Tensor | float:
    """The network's time of diffusion step k: t = 1 - (k + 1) / T, in [0, 1 - 1/T].

    The only place a step becomes a time: k = T-1 (noisiest) -> t = 0, like fewstep's noise;
    k = 0 (cleanest) -> t = 1 - 1/T. Integer k is checked; a tensor k is not (no host sync).
    """
    if isinstance(k, int) and not 0 <= k < num_steps:
        raise ValueError(f"diffusion step k must be in 0..{num_steps - 1}, got {k}")
    return 1 - (k + 1) / num_steps


def diffusion_step(t: Tensor | float, num_steps: int) -> Tensor | int:
    """The inverse of :func:`network_time`: k = round(T (1 - t) - 1), clamped to 0..T-1."""
    k = num_steps * (1 - t) - 1
    if isinstance(k, Tensor):
        return k.round().long().clamp(0, num_steps - 1)
    return min(max(round(k), 0), num_steps - 1)


def diffuse(x_1: Tensor, eps: Tensor, k: Tensor, schedule: VPSchedule) -> Tensor:
    """A draw from q(x_k | x_1): x_k = sqrt(abar_k) x_1 + sqrt(1 - abar_k) eps, per-sample k (N,)."""
    abar = schedule.alphas_cumprod.to(device=x_1.device)[k]  # (N,)
    return expand_t(abar.sqrt(), x_1) * x_1 + expand_t((1 - abar).sqrt(), x_1) * eps


def sampling_steps(steps: int, num_steps: int) -> list[int]:
    """The S training steps a sampler visits: k_i = floor((i + 1) T / S) - 1, i = 0..S-1.

    Evenly spaced and "trailing" (Lin et al. 2024, "Common diffusion noise schedules and
    sample steps are flawed"): every sub-sequence starts at the noisiest step T-1, where
    x_0 ~ N(0, I) is what the forward process delivers; S = T visits every step. Increasing.
    """
    check_steps(steps)
    if steps > num_steps:
        raise ValueError(f"steps must be at most the schedule's T = {num_steps}, got {steps}")
    return [(i + 1) * num_steps // steps - 1 for i in range(steps)]


# ---------------------------------------------------------------------------------------
# Training


class DDPMObjective(Objective):
    """eps-prediction on the VP path (Ho et al. 2020, "simple" loss).

    k ~ U{0..T-1}, eps ~ N(0, I), x_k = sqrt(abar_k) x_1 + sqrt(1 - abar_k) eps,
    L = E || eps - eps_theta(x_k, t(k), y) ||^2, averaged over elements (as FlowMatching).

    Batch keys: ``"x_1"`` data, ``"y"`` labels. ``label_dropout`` replaces labels by the null
    id ``model.num_classes`` with that probability (classifier-free guidance), as in
    :class:`~models.objectives.FlowMatching`.
    """

    def __init__(self, schedule: VPSchedule, label_dropout: float = 0.0):
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
        self.schedule = schedule
        self.label_dropout = label_dropout
        self._abar: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def _alphas_cumprod(self, like: Tensor) -> Tensor:
        """abar (T,) on ``like``'s device and dtype, copied there once (a copy is a host sync)."""
        key = (like.device, like.dtype)
        if key not in self._abar:
            self._abar[key] = self.schedule.alphas_cumprod.to(device=like.device, dtype=like.dtype)
        return self._abar[key]

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        x_1 = require(batch, "x_1", "DDPMObjective")
        y = require(batch, "y", "DDPMObjective")
        if "x_0" in batch:
            raise ValueError(
                "DDPMObjective draws its own noise, but the batch carries 'x_0' (reflow pairs?); "
                "train the diffusion baseline on latents ({'x_1', 'y'})"
            )
        y = drop_conditions(model, y, self.label_dropout)
        k = torch.randint(0, self.schedule.num_steps, (x_1.shape[0],), device=x_1.device)  # (N,)
        eps = torch.randn_like(x_1)
        loss = self.regression(model, x_1, k, eps, y)
        return LossOutput(loss=loss, logs={"loss": loss.detach()})

    def heldout_loss(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> Tensor:
        """The same loss with every label as given, k and eps drawn from ``generator`` (a CPU one)."""
        x_1 = require(batch, "x_1", "DDPMObjective")
        y = require(batch, "y", "DDPMObjective")
        k = torch.randint(0, self.schedule.num_steps, (x_1.shape[0],), generator=generator).to(x_1.device)
        eps = torch.randn(x_1.shape, generator=generator, dtype=x_1.dtype).to(x_1.device)
        return self.regression(model, x_1, k, eps, y)

    def regression(self, model: nn.Module, x_1: Tensor, k: Tensor, eps: Tensor, y: Tensor) -> Tensor:
        """L = E || eps - eps_theta(x_k, t(k), y) ||^2 at chain steps ``k`` (N,) with noise ``eps``."""
        abar = expand_t(self._alphas_cumprod(x_1)[k], x_1)  # (N, 1, ...)
        # x_k = sqrt(abar_k) x_1 + sqrt(1 - abar_k) eps
        x_k = abar.sqrt() * x_1 + (1 - abar).sqrt() * eps
        t = network_time(k.to(x_1.dtype), self.schedule.num_steps)  # (N,)
        eps_hat = model(x_k, t, y)
        return (eps_hat - eps).pow(2).mean()


# ---------------------------------------------------------------------------------------
# Sampling


def predict_x_1(x_k: Tensor, eps_hat: Tensor, abar: float) -> Tensor:
    """The data estimate from an eps estimate: x_1_hat = (x_k - sqrt(1 - abar) eps_hat) / sqrt(abar)."""
    return (x_k - math.sqrt(1 - abar) * eps_hat) / math.sqrt(abar)


class DiffusionUpdate(Protocol):
    """One reverse step from step k (abar) to the previous visited step (abar_prev; 1 = data)."""

    stochastic: bool  # whether the step takes a fresh N(0, I) draw z

    def __call__(self, x: Tensor, eps_hat: Tensor, abar: float, abar_prev: float, z: Tensor | None) -> Tensor: ...


@dataclass(frozen=True)
class DDIMUpdate:
    """DDIM with eta = 0 (Song et al. 2021): deterministic, a first-order step of the PF ODE.

    x_prev = sqrt(abar_prev) x_1_hat + sqrt(1 - abar_prev) eps_hat.
    """

    stochastic: bool = False

    def __call__(self, x: Tensor, eps_hat: Tensor, abar: float, abar_prev: float, z: Tensor | None) -> Tensor:
        x_1_hat = predict_x_1(x, eps_hat, abar)
        return math.sqrt(abar_prev) * x_1_hat + math.sqrt(1 - abar_prev) * eps_hat


@dataclass(frozen=True)
class DDPMUpdate:
    """Ancestral step: the Gaussian posterior q(x_prev | x_k, x_1 = x_1_hat) (Ho et al. Eq. 7).

    On a sub-sequence the step's own beta is beta' = 1 - abar / abar_prev (Nichol & Dhariwal
    2021, respacing); on the full sequence it is beta_k. Mean and the variance beta_tilde
    ("fixed small", the posterior's own variance, not beta):

        mu = sqrt(abar_prev) beta' / (1 - abar) x_1_hat + sqrt(1 - beta') (1 - abar_prev) / (1 - abar) x_k,
        beta_tilde = (1 - abar_prev) / (1 - abar) beta',
        x_prev = mu + sqrt(beta_tilde) z.

    beta_tilde is 0 on the last step (abar_prev = 1), so the sample ends on x_1_hat with no
    noise added; S steps take S - 1 draws. It equals DDIM with eta = 1.
    """

    stochastic: bool = True

    def __call__(self, x: Tensor, eps_hat: Tensor, abar: float, abar_prev: float, z: Tensor | None) -> Tensor:
        x_1_hat = predict_x_1(x, eps_hat, abar)
        beta = 1 - abar / abar_prev
        mean = (math.sqrt(abar_prev) * beta / (1 - abar)) * x_1_hat + (
            math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar)
        ) * x
        beta_tilde = (1 - abar_prev) / (1 - abar) * beta
        if beta_tilde == 0.0:
            return mean
        return mean + math.sqrt(beta_tilde) * z


@torch.no_grad()
def diffusion_sample(
    model: nn.Module,
    x_0: Tensor,
    y: Tensor,
    steps: int,
    schedule: VPSchedule,
    update: DiffusionUpdate,
    guidance: float = 1.0,
    generator: torch.Generator | None = None,
    noise: Sequence[Tensor] | None = None,
) -> SampleResult:
    """Run ``update`` from x_0 ~ N(0, I) (standing for x_{T-1}) down the visited steps to data.

    The network output is eps_hat, guided as eps = eps(x, t, null) + w (eps(x, t, y) -
    eps(x, t, null)) (classifier-free guidance is linear in the output, so the velocity
    helper serves eps unchanged). One network evaluation per step: nfe = steps.

    ``noise`` (steps - 1 tensors shaped like x_0, used in order from the noisiest step) gives a
    stochastic update its draws instead of ``generator``, so a caller batching several
    requests keeps each one's draws its own. A deterministic update ignores both.
    """
    num_steps = schedule.num_steps
    ks = sampling_steps(steps, num_steps)  # increasing, ks[-1] = T - 1
    if update.stochastic and noise is not None and len(noise) != steps - 1:
        raise ValueError(f"{steps}-step ancestral sampling needs {steps - 1} noise tensors, got {len(noise)}")
    abar = schedule.alphas_cumprod.tolist()  # float64 Python floats: no device traffic
    eps_theta = guided_velocity(model, guidance)
    x = x_0
    for n, i in enumerate(reversed(range(steps))):
        k = ks[i]
        abar_prev = abar[ks[i - 1]] if i > 0 else 1.0  # the last step lands on the data
        eps_hat = eps_theta(x, full_t(network_time(k, num_steps), x), y)
        z = None
        if update.stochastic and i > 0:
            if noise is not None:
                z = noise[n]
            else:
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = update(x, eps_hat, abar[k], abar_prev, z)
    return SampleResult(x_1=x, nfe=steps)


def ddim_sample(
    model: nn.Module, x_0: Tensor, y: Tensor, steps: int, schedule: VPSchedule, guidance: float = 1.0
) -> SampleResult:
    """Deterministic DDIM (eta = 0) in ``steps`` network evaluations, 1 <= steps <= T."""
    return diffusion_sample(model, x_0, y, steps, schedule, DDIMUpdate(), guidance)


def ddpm_sample(
    model: nn.Module,
    x_0: Tensor,
    y: Tensor,
    steps: int,
    schedule: VPSchedule,
    guidance: float = 1.0,
    generator: torch.Generator | None = None,
    noise: Sequence[Tensor] | None = None,
) -> SampleResult:
    """DDPM ancestral sampling with variance beta_tilde in ``steps`` evaluations (steps - 1 draws)."""
    return diffusion_sample(model, x_0, y, steps, schedule, DDPMUpdate(), guidance, generator, noise)


UPDATES: dict[str, DiffusionUpdate] = {"ddpm": DDPMUpdate(), "ddim": DDIMUpdate()}


def get_update(name: str) -> DiffusionUpdate:
    """Resolve a diffusion sampler name (``"ddpm"``, ``"ddim"``) once, at the edge."""
    try:
        return UPDATES[name]
    except KeyError:
        raise ValueError(f"unknown diffusion sampler {name!r}; choose one of: {', '.join(sorted(UPDATES))}") from None
