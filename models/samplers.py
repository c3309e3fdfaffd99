"""ODE samplers: integrate dx/dt = v(x, t, y) from noise (t = 0) to data (t = 1).

One sampler family serves every velocity model (base, reflow). Pieces:

- :func:`guided_velocity` turns ``model`` and a guidance scale ``w`` into ``v(x, t, y)``
  (classifier-free guidance, Ho & Salimans 2022).
- A solver is a small object with ``step(v, x, t, t_next, y) -> x_next``; ``t`` and
  ``t_next`` are (N,) tensors, so one step may move each sample between its own times
  (consistency distillation relies on that). :data:`SOLVERS` names them.
- :func:`sample_ode` runs a solver over a uniform grid; :func:`sample_reference` is an
  adaptive Dormand-Prince (dopri5) integrator for reference solutions in evaluation.

``sample_ode`` and ``sample_reference`` run under ``torch.no_grad()``; to differentiate
through a sampler, call the solvers' ``step`` yourself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from models.conventions import expand_t, full_t, null_like

Velocity = Callable[[Tensor, Tensor, Tensor], Tensor]


def guided_velocity(model: nn.Module, guidance: float) -> Velocity:
    """Classifier-free guidance: v = v(x, t, null) + w (v(x, t, y) - v(x, t, null)).

    Conditional and unconditional outputs come from one forward pass over a doubled
    batch. ``w == 1`` returns the conditional output exactly (no null pass); ``w == 0``
    returns the unconditional one. The null condition is the network's (:func:`null_like`: the id
    ``model.num_classes``, or a text model's empty prompt).

    A guidance-distilled network (``model.embeds_guidance``, models/guided_dit.py) learnt v_w
    itself: it is handed w and runs one pass over the batch as it is.
    """
    w = float(guidance)
    if not math.isfinite(w):
        raise ValueError(f"guidance must be a finite number, got {guidance!r}")
    if w == 1.0:
        return lambda x, t, y: model(x, t, y)
    if w == 0.0:
        return lambda x, t, y: model(x, t, null_like(model, y))
    if getattr(model, "embeds_guidance", False):
        return lambda x, t, y: model(x, t, y, guidance=w)

    def v(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        n = x.shape[0]
        y_null = null_like(model, y)
        v_both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]))  # (2N, ...)
        v_cond, v_uncond = v_both[:n], v_both[n:]  # (N, ...) each
        # v = v_uncond + w (v_cond - v_uncond)
        return v_uncond + w * (v_cond - v_uncond)

    return v


class Solver(Protocol):
    """One step of an explicit ODE solver from ``t`` to ``t_next`` (both (N,))."""

    def step(self, v: Velocity, x: Tensor, t: Tensor, t_next: Tensor, y: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class Euler:
    """x_{n+1} = x_n + h v(x_n, t_n). First order: error O(h)."""

    def step(self, v: Velocity, x: Tensor, t: Tensor, t_next: Tensor, y: Tensor) -> Tensor:
        h = expand_t(t_next - t, x)
        return x + h * v(x, t, y)


@dataclass(frozen=True)
class Heun:
    """Heun's method (explicit trapezoid). Second order: error O(h^2), 2 evaluations a step.

    k_1 = v(x_n, t_n),  k_2 = v(x_n + h k_1, t_{n+1}),  x_{n+1} = x_n + h/2 (k_1 + k_2).
    The last step (t_{n+1} = 1) uses the same formula: v is finite there.
    """

    def step(self, v: Velocity, x: Tensor, t: Tensor, t_next: Tensor, y: Tensor) -> Tensor:
        h = expand_t(t_next - t, x)
        k_1 = v(x, t, y)
        k_2 = v(x + h * k_1, t_next, y)
        return x + 0.5 * h * (k_1 + k_2)


@dataclass(frozen=True)
class RK4:
    """Classical fourth-order Runge-Kutta, 4 evaluations a step."""

    def step(self, v: Velocity, x: Tensor, t: Tensor, t_next: Tensor, y: Tensor) -> Tensor:
        dt = t_next - t
        h = expand_t(dt, x)
        t_mid = t + 0.5 * dt
        k_1 = v(x, t, y)
        k_2 = v(x + 0.5 * h * k_1, t_mid, y)
        k_3 = v(x + 0.5 * h * k_2, t_mid, y)
        k_4 = v(x + h * k_3, t_next, y)
        return x + h / 6 * (k_1 + 2 * k_2 + 2 * k_3 + k_4)


SOLVERS: dict[str, Solver] = {"euler": Euler(), "heun": Heun(), "rk4": RK4()}


def get_solver(solver: str | Solver) -> Solver:
    """Resolve a solver name (``"euler"``, ``"heun"``, ``"rk4"``); solver objects pass through."""
    if not isinstance(solver, str):
        return solver
    try:
        return SOLVERS[solver]
    except KeyError:
        valid = ", ".join(sorted(SOLVERS))
        raise ValueError(f"unknown ODE solver {solver!r}; choose one of: {valid}") from None


@dataclass(frozen=True)
class SampleResult:
    """Samples at t = 1 and what they cost.

    ``nfe`` counts velocity evaluations; with guidance != 1 each is one network forward
    over a doubled batch. ``path`` (steps + 1, N, ...) holds x at the grid ``times``
    (steps + 1,) when asked for.
    """

    x_1: Tensor
    nfe: int
    path: Tensor | None = None
    times: Tensor | None = None


class _Counted:
    """Wraps a velocity and counts its calls (a Python int: no host sync)."""

    def __init__(self, v: Velocity):
        self.v = v
        self.calls = 0

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        self.calls += 1
        return self.v(x, t, y)


def check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")


@torch.no_grad()
def sample_ode(
    model: nn.Module,
    x_0: Tensor,
    y: Tensor,
    steps: int,
    solver: str | Solver = "euler",
    guidance: float = 1.0,
    return_path: bool = False,
) -> SampleResult:
    """Integrate dx/dt = v(x, t, y) from x(0) = x_0 to t = 1 on the grid t_i = i / steps."""
    check_steps(steps)
    step = get_solver(solver).step
    v = _Counted(guided_velocity(model, guidance))
    x = x_0
    path = [x_0]
    for i in range(steps):
        t, t_next = full_t(i / steps, x), full_t((i + 1) / steps, x)
        x = step(v, x, t, t_next, y)
        if return_path:
            path.append(x)
    if not return_path:
        return SampleResult(x_1=x, nfe=v.calls)
    times = torch.linspace(0, 1, steps + 1, device=x_0.device, dtype=x_0.dtype)
    return SampleResult(x_1=x, nfe=v.calls, path=torch.stack(path), times=times)


# Dormand & Prince (1980) RK5(4)7FM tableau: nodes c, stages a, 5th-order weights b
# (which are also the last stage row: first same as last), 4th-order weights b_star.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B = _DP_A[6] + (0.0,)
_DP_B_STAR = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


@torch.no_grad()
def sample_reference(
    model: nn.Module,
    x_0: Tensor,
    y: Tensor,
    guidance: float = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    first_step: float = 0.05,
    max_steps: int = 10_000,
) -> SampleResult:
    """Adaptive dopri5 solution of dx/dt = v(x, t, y) on [0, 1], for reference samples.

    One step size for the whole batch, accepted when the RMS of
    err / (atol + rtol max(|x_n|, |x_{n+1}|)) is at most 1. Each step decision reads the
    error back to the host: meant for evaluation, not for the serving path.
    """
    v = _Counted(guided_velocity(model, guidance))
    x, t, h = x_0, 0.0, float(first_step)
    k_1 = v(x, full_t(t, x), y)
    for _ in range(max_steps):
        if t >= 1.0:
            return SampleResult(x_1=x, nfe=v.calls)
        h = min(h, 1.0 - t)
        k = [k_1]
        for c, a in zip(_DP_C[1:], _DP_A[1:]):
            x_stage = x + h * sum(a_j * k_j for a_j, k_j in zip(a, k) if a_j != 0.0)
            k.append(v(x_stage, full_t(t + c * h, x), y))
        x_new = x + h * sum(b * k_j for b, k_j in zip(_DP_B, k) if b != 0.0)
        err = h * sum((b - bs) * k_j for b, bs, k_j in zip(_DP_B, _DP_B_STAR, k))
        scale = atol + rtol * torch.maximum(x.abs(), x_new.abs())
        err_norm = float((err / scale).pow(2).mean().sqrt())  # host sync, once a step
        if err_norm <= 1.0:
            x, t, k_1 = x_new, t + h, k[-1]  # first same as last: k_7 = v(x_new, t + h)
        # h_new = h * clip(0.9 err^(-1/5), 0.2, 10)
        factor = 10.0 if err_norm == 0.0 else 0.9 * err_norm**-0.2
        h = h * min(10.0, max(0.2, factor))
    raise RuntimeError(
        f"dopri5 did not reach t = 1 in {max_steps} steps (t = {t:.4g}, h = {h:.3g}); "
        f"loosen rtol={rtol}/atol={atol} or raise max_steps"
    )


def straightness(path: Tensor, times: Tensor) -> Tensor:
    """S = integral_0^1 E ||(x_1 - x_0) - v_t||^2 dt on a sampled path (Liu et al. 2023).

    ``path`` (K + 1, N, ...) and ``times`` (K + 1,) as in :class:`SampleResult`; v_t is the
    finite-difference velocity between grid points, so S = 0 exactly for straight paths.
    """
    dt = times[1:] - times[:-1]  # (K,)
    v = (path[1:] - path[:-1]) / dt.reshape(-1, *([1] * (path.ndim - 1)))  # (K, N, ...)
    chord = path[-1] - path[0]  # (N, ...)
    per_step = (v - chord).pow(2).flatten(2).sum(-1).mean(-1)  # (K,)
    return (per_step * dt).sum() / dt.sum()
