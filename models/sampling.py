"""Sampler objects: how a generator's network turns noise into latents, chosen once per model.

Every generator belongs to a family (its stage card says which), and each family offers
its samplers, named as the evaluation table names them:

    flow          euler, heun     integrate dx/dt = v(x, t, y) from t = 0 to 1   (models.samplers)
    consistency   consistency     x_hat = f(x_t, t), re-noised between steps      (models.consistency)

Evaluation, serving and promotion resolve a name to an object here, once, at their edge;
nothing else branches on a family or a sampler name. A sampler says how many standard
normal draws of the latent's shape one image needs (``noise_draws``), so callers can seed
every image on its own and batch requests freely.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from torch import Tensor, nn

from models.consistency import consistency_sample
from models.samplers import SampleResult, sample_ode


class Sampler(Protocol):
    name: str  # the evaluation table's ``sampler`` column
    guided: bool  # takes a classifier-free guidance scale
    has_path: bool  # integrates an ODE whose path (and straightness) can be recorded

    def noise_draws(self, steps: int) -> int:
        """Standard normal draws of the latent's shape that one image needs at ``steps``."""
        ...

    def sample(self, net: nn.Module, noise: Sequence[Tensor], y: Tensor, steps: int,
               guidance: float) -> SampleResult:
        """Latents from ``noise`` (``noise_draws(steps)`` tensors (N, C, H, W)) and labels ``y`` (N,)."""
        ...


@dataclass(frozen=True)
class OdeSampler:
    """A flow model integrated from x_0 = noise[0] with an ODE solver (``euler`` or ``heun``)."""

    name: str
    guided: bool = True
    has_path: bool = True

    def noise_draws(self, steps: int) -> int:
        return 1

    def sample(self, net: nn.Module, noise: Sequence[Tensor], y: Tensor, steps: int,
               guidance: float, return_path: bool = False) -> SampleResult:
        return sample_ode(net, noise[0], y, steps, self.name, guidance, return_path=return_path)


@dataclass(frozen=True)
class ConsistencySampler:
    """Multistep consistency sampling: x_0 = noise[0], then one fresh draw per extra step.

    A distilled student learned its teacher's guided trajectories, so it takes no guidance.
    """

    name: str = "consistency"
    guided: bool = False
    has_path: bool = False

    def noise_draws(self, steps: int) -> int:
        return steps

    def sample(self, net: nn.Module, noise: Sequence[Tensor], y: Tensor, steps: int,
               guidance: float) -> SampleResult:
        return consistency_sample(net, noise[0], y, steps, noise=list(noise[1:]))


SAMPLERS: dict[str, Sampler] = {
    "euler": OdeSampler("euler"),
    "heun": OdeSampler("heun"),
    "consistency": ConsistencySampler(),
}

# Each family's samplers; the first is the family's default.
FAMILY_SAMPLERS: dict[str, tuple[str, ...]] = {
    "flow": ("euler", "heun"),
    "consistency": ("consistency",),
}


def get_sampler(name: str) -> Sampler:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None


def family_samplers(family: str) -> tuple[Sampler, ...]:
    try:
        return tuple(SAMPLERS[name] for name in FAMILY_SAMPLERS[family])
    except KeyError:
        raise ValueError(f"unknown generator family {family!r}; expected one of {', '.join(FAMILY_SAMPLERS)}") from None


def preferred_sampler(family: str, preferred: str) -> Sampler:
    """``preferred`` (e.g. the configured ODE solver) where the family offers it, else its default."""
    offered = family_samplers(family)
    return next((s for s in offered if s.name == preferred), offered[0])
