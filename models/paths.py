"""Training-time samplers and the straight probability path they are drawn on.

The path itself lives in :mod:`models.conventions` (``interpolate``, ``target_velocity``);
this module decides *where on it* a training example sits:

    t ~ p(t),  x_0 ~ N(0, I),  x_t = (1 - t) x_0 + t x_1,  u_t = x_1 - x_0.

A time sampler is any callable ``(n, device, dtype, generator=None) -> t`` with ``t`` of
shape (n,) in [0, 1]. Names are resolved to samplers once, at the edge, by
:func:`time_sampler`; objectives only ever hold the callable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from models.conventions import interpolate, target_velocity


class TimeSampler(Protocol):
    """Draws ``n`` training times in [0, 1]."""

    def __call__(
        self,
        n: int,
        device: torch.device | None,
        dtype: torch.dtype,
        generator: torch.Generator | None = None,
    ) -> Tensor: ...


@dataclass(frozen=True)
class UniformTime:
    """t ~ U[0, 1] (Lipman et al. 2023; Liu et al. 2023)."""

    def __call__(
        self,
        n: int,
        device: torch.device | None,
        dtype: torch.dtype,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        return torch.rand(n, device=device, dtype=dtype, generator=generator)


@dataclass(frozen=True)
class LogitNormalTime:
    """t = sigmoid(m + s * n), n ~ N(0, 1) (Esser et al. 2024, "SD3").

    It puts more training weight on the middle of the path, where the target
    velocity is hardest to predict. ``mean`` shifts the mass towards noise (< 0)
    or data (> 0) in fewstep's time (t = 1 is data).
    """

    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if not self.std > 0:
            raise ValueError(f"LogitNormalTime std must be > 0, got {self.std}")

    def __call__(
        self,
        n: int,
        device: torch.device | None,
        dtype: torch.dtype,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        z = torch.randn(n, device=device, dtype=dtype, generator=generator)
        # t = sigmoid(mean + std * z)
        return torch.sigmoid(self.mean + self.std * z)


TIME_SAMPLERS: dict[str, Callable[..., TimeSampler]] = {
    "uniform": UniformTime,
    "logit_normal": LogitNormalTime,
}


def time_sampler(name: str, **kwargs: float) -> TimeSampler:
    """Resolve a config name (``"uniform"``, ``"logit_normal"``) into a time sampler."""
    try:
        cls = TIME_SAMPLERS[name]
    except KeyError:
        valid = ", ".join(sorted(TIME_SAMPLERS))
        raise ValueError(f"unknown time sampler {name!r}; choose one of: {valid}") from None
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments {kwargs} for time sampler {name!r}: {e}") from None


@dataclass(frozen=True)
class PathSample:
    """One draw from the straight path: the point ``x_t`` and its target ``u_t``."""

    t: Tensor  # (N,)
    x_t: Tensor  # (N, ...)
    u_t: Tensor  # (N, ...)


def sample_path(x_0: Tensor, x_1: Tensor, t: Tensor) -> PathSample:
    """x_t = (1 - t) x_0 + t x_1 and u_t = x_1 - x_0 for the given noise/data/time."""
    return PathSample(t=t, x_t=interpolate(x_0, x_1, t), u_t=target_velocity(x_0, x_1))
