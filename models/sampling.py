"""Sampler objects: how a generator's network turns noise into latents, chosen once per model.

Every generator belongs to a family (its stage card says which), and each family offers
its samplers, named as the evaluation table names them:

    flow          euler, heun     integrate dx/dt = v(x, t, y) from t = 0 to 1   (models.samplers)
    consistency   consistency     x_hat = f(x_t, t), re-noised between steps      (models.consistency)
    flowmap       flowmap         x_t = x_s + (t - s) u(x_s, s, t) on i / k        (models.flowmap)
    diffusion     ddim, ddpm      eps-prediction down the VP chain's steps        (models.diffusion)

Evaluation, serving and promotion resolve a name to an object here, once, at their edge;
nothing else branches on a family or a sampler name. A sampler says how many standard
normal draws of the latent's shape one image needs (``noise_draws``), so callers can seed
every image on its own and batch requests freely.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor, nn

from models.consistency import consistency_sample
from models.diffusion import DiffusionUpdate, VPSchedule, diffusion_sample, get_update, vp_schedule
from models.flowmap import flowmap_sample
from models.samplers import SampleResult, sample_ode


class Sampler(Protocol):
    name: str  # the evaluation table's ``sampler`` column
    guided: bool  # takes a classifier-free guidance scale
    has_path: bool  # integrates an ODE whose path (and straightness) can be recorded
    max_steps: int | None  # the most steps it can take (None: any)

    def noise_draws(self, steps: int) -> int:
        """Standard normal draws of the latent's shape that one image needs at ``steps``."""
        ...

    def sample(self, net: nn.Module, noise: Sequence[Tensor], y: Tensor, steps: int, guidance: float) -> SampleResult:
        """Latents from ``noise`` (``noise_draws(steps)`` tensors (N, C, H, W)) and labels ``y`` (N,)."""
        ...


@dataclass(frozen=True)
class OdeSampler:
    """A flow model integrated from x_0 = noise[0] with an ODE solver (``euler`` or ``heun``)."""

    name: str
    guided: bool = True
    has_path: bool = True
    max_steps: int | None = None

    def noise_draws(self, steps: int) -> int:
        return 1

    def sample(
        self, net: nn.Module, noise: Sequence[Tensor], y: Tensor, steps: int, guidance: float, return_path: bool = False
    ) -> SampleResult:
        return sample_ode(net, noise[0], y, steps, self.name, guidance, return_path=return_path)


@dataclass(frozen=True)
class ConsistencySampler:
    """Multistep consistency sampling from x_0 = noise[0], re-noised between steps.

    ``coupling`` rho re-noises along the sample's own x_0 (z = rho x_0 + sqrt(1 - rho^2) eps):
    1 for a student of a coupled (reflow) teacher, 0 (fresh draws) for one of the base teacher;
    ``num_intervals`` puts the step times on the distillation grid n / N (then at most N steps).
    A distilled student learned its teacher's guided trajectories, so it takes no guidance.
    """

    coupling: float = 0.0
    num_intervals: int | None = None
    name: str = "consistency"
    guided: bool = False
    has_path: bool = False

    @property
    def max_steps(self) -> int | None:
        return self.num_intervals

    def noise_draws(self, steps: int) -> int:
        return 1 if self.coupling == 1.0 else steps  # x_0, and one eps per re-noising unless fully coupled

    def sample(self, net: nn.Module, noise: Sequence[Tensor], y: Tensor, steps: int, guidance: float) -> SampleResult:
        eps = list(noise[1:]) if self.coupling != 1.0 else None
        return consistency_sample(
            net, noise[0], y, steps, noise=eps, num_intervals=self.num_intervals, coupling=self.coupling
        )


@dataclass(frozen=True)
class FlowMapSampler:
    """A flow-map student's k jumps on the times 0, 1/k, ..., 1 from x_0 = noise[0], one evaluation each.

    ``guided``: the student was distilled at guidance 1 and takes classifier-free guidance on its
    average velocity when sampled; otherwise (the default) the guidance is in its targets.
    """

    guided: bool = False
    name: str = "flowmap"
    has_path: bool = False
    max_steps: int | None = None

    def noise_draws(self, steps: int) -> int:
        return 1

    def sample(self, net: nn.Module, noise: Sequence[Tensor], y: Tensor, steps: int, guidance: float) -> SampleResult:
        return flowmap_sample(net, noise[0], y, steps, guidance if self.guided else 1.0)


@dataclass(frozen=True)
class DiffusionSampler:
    """A diffusion (eps-prediction) model sampled down its schedule's steps: ``ddpm`` or ``ddim``.

    Built with the schedule the model was trained on (its card's name and T): at most T steps,
    one network evaluation each. ``ddim`` (eta = 0) is deterministic: one draw, x_0 = noise[0].
    ``ddpm`` (ancestral, variance beta_tilde) draws x_0 = noise[0] and one fresh N(0, I) per
    step but the last: ``steps`` draws for ``steps`` steps, so every image keeps its own.
    """

    name: str  # "ddpm" or "ddim" (models.diffusion.UPDATES)
    schedule_name: str = "linear"
    num_steps: int = 1000  # T of the schedule
    guided: bool = True
    has_path: bool = False
    schedule: VPSchedule = field(init=False, repr=False, compare=False)
    update: DiffusionUpdate = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "update", get_update(self.name))
        object.__setattr__(self, "schedule", vp_schedule(self.schedule_name, self.num_steps))

    @property
    def max_steps(self) -> int:
        return self.num_steps

    def noise_draws(self, steps: int) -> int:
        return steps if self.update.stochastic else 1  # x_0, and one z per ancestral step but the last

    def sample(self, net: nn.Module, noise: Sequence[Tensor], y: Tensor, steps: int, guidance: float) -> SampleResult:
        z = list(noise[1:]) if self.update.stochastic else None
        return diffusion_sample(net, noise[0], y, steps, self.schedule, self.update, guidance, noise=z)


SAMPLERS: dict[str, Sampler] = {
    "euler": OdeSampler("euler"),
    "heun": OdeSampler("heun"),
    "consistency": ConsistencySampler(),
    "flowmap": FlowMapSampler(),
    "ddim": DiffusionSampler("ddim"),
    "ddpm": DiffusionSampler("ddpm"),
}


def flow_samplers(**trained: object) -> tuple[Sampler, ...]:
    return SAMPLERS["euler"], SAMPLERS["heun"]


def consistency_samplers(
    coupling: float = 0.0, num_intervals: int | None = None, **trained: object
) -> tuple[Sampler, ...]:
    return (ConsistencySampler(coupling=coupling, num_intervals=num_intervals),)


def flowmap_samplers(guided: bool = False, **trained: object) -> tuple[Sampler, ...]:
    return (FlowMapSampler(guided=guided),)


def diffusion_samplers(
    diffusion_schedule: str = "linear", diffusion_steps: int = 1000, **trained: object
) -> tuple[Sampler, ...]:
    """DDIM first (the default: deterministic, and the better of the two at the few steps a
    service takes), then DDPM; both on the schedule the model was trained on."""
    return (
        DiffusionSampler("ddim", diffusion_schedule, diffusion_steps),
        DiffusionSampler("ddpm", diffusion_schedule, diffusion_steps),
    )


# Each family's samplers, built with what its model was trained for; the first is the default.
FAMILIES: dict[str, Callable[..., tuple[Sampler, ...]]] = {
    "flow": flow_samplers,
    "consistency": consistency_samplers,
    "flowmap": flowmap_samplers,
    "diffusion": diffusion_samplers,
}


def get_sampler(name: str) -> Sampler:
    """A sampler by its table name, with default parameters (for checks and names, not for drawing)."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None


def family_samplers(family: str, **trained: object) -> tuple[Sampler, ...]:
    """The samplers of ``family`` with the parameters its model was trained for (``trained``: e.g.
    a consistency student's re-noising ``coupling`` and time grid ``num_intervals``, a diffusion
    model's ``diffusion_schedule`` and ``diffusion_steps``, whether a flow-map student is ``guided``
    when sampled); without them, the defaults."""
    try:
        build = FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown generator family {family!r}; expected one of {', '.join(FAMILIES)}") from None
    return build(**trained)


def preferred_sampler(family: str, preferred: str) -> Sampler:
    """``preferred`` (e.g. the configured ODE solver) where the family offers it, else its default."""
    offered = family_samplers(family)
    return next((s for s in offered if s.name == preferred), offered[0])


def network_passes(sampler: Sampler, guidance: float, embedded: bool = False) -> int:
    """Network passes per function evaluation: classifier-free guidance (w other than 0 or 1)
    runs the conditional and the null label through one doubled batch, which costs two.

    ``SampleResult.nfe`` counts function evaluations; a cost (the evaluation table's NFE) is
    ``nfe * network_passes(sampler, guidance)``. A sampler that takes no guidance costs one, and
    so does a network that embeds the scale (``embedded``: a guidance-distilled model)."""
    return 2 if sampler.guided and not embedded and float(guidance) not in (0.0, 1.0) else 1
