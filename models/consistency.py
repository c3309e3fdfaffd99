"""Consistency distillation on the straight path (Song et al. 2023, "Consistency Models").

A consistency function maps any point of an ODE trajectory to its end at t = 1 (data).
fewstep builds the boundary condition f(x, 1) = x into the parameterisation, so the
student is a plain velocity network (a DiT) and its weights load anywhere a DiT does:

    f_theta(x_t, t, y) = x_t + (1 - t) v_theta(x_t, t, y).

Distillation pulls f_theta at x_{t_n} towards an EMA target f_theta^- at the teacher's
one-step ODE estimate of the same trajectory at t_{n+1}:

    L = E_n d( f_theta(x_{t_n}, t_n), stopgrad f_theta^-(x_hat_{t_{n+1}}, t_{n+1}) ),
    x_hat_{t_{n+1}} = solver step of the (guided) teacher from (x_{t_n}, t_n) to t_{n+1},

with d the pseudo-Huber distance of Song & Dhariwal 2023 ("iCT"). The teacher step and the
target run in full precision whatever autocast the loop wraps around the loss: bf16 carries
~0.4% relative error, more than the pseudo-Huber c of a small latent, so a bf16 target would
ask the student to fit rounding noise.

Multistep sampling (:func:`consistency_sample`) re-noises the estimate x_hat back to a time
t_i and applies f again. That is exact only if the re-noised point has the distribution the
teacher's ODE has at t_i. For the base flow (independent noise and data) that marginal is
(1 - t) z + t x_1 with fresh z; for a reflow teacher (a coupling x_1 = T(x_0)) it is
(1 - t) x_0 + t x_1 with the x_0 that maps to x_1, so re-noising must reuse the sample's own
x_0 (``coupling = 1``). See ``benchmarks/consistency_toy.py`` for the measured comparison.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from models.conventions import expand_t, full_t, interpolate
from models.ema import ema_copy, ema_update
from models.objectives import Batch, LossOutput, Objective, drop_conditions, require, unwrap
from models.samplers import SampleResult, Solver, check_steps, get_solver, guided_velocity


def consistency_fn(net: nn.Module, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
    """f(x_t, t, y) = x_t + (1 - t) v_net(x_t, t, y); exactly x_t at t = 1."""
    return x_t + expand_t(1 - t, x_t) * net(x_t, t, y)


def huber_c(dim: int) -> float:
    """The pseudo-Huber constant of iCT: c = 0.00054 sqrt(dim), dim = elements per sample."""
    return 0.00054 * math.sqrt(dim)


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """d(a, b) = sqrt(||a - b||^2 + c^2) - c per sample, shape (N,).

    Near 0 it is ||a - b||^2 / (2c) (smooth); far away it is ||a - b|| (robust).
    """
    sq = (a - b).pow(2).flatten(1).sum(-1)  # (N,)
    return torch.sqrt(sq + c * c) - c


def uniform_schedule(num_intervals: int, like: Tensor) -> Tensor:
    """t_n = n / N for n = 0..N, so t_0 = 0 (noise) < ... < t_N = 1 (data); shape (N + 1,)."""
    return torch.linspace(0, 1, num_intervals + 1, device=like.device, dtype=like.dtype)


class ConsistencyDistillation(Objective):
    """Consistency distillation from a frozen velocity teacher, one schedule interval a step.

    Args:
        teacher: frozen velocity network ``teacher(x, t, y)`` (the base or reflow model).
        student: the network being trained, used here only to initialise the EMA
            target f_theta^- (start it from the teacher's weights, as Song et al. do).
        num_intervals: N, intervals of the uniform schedule t_n = n / N on [0, 1]. Uniform
            steps fit the straight path: x_t moves at constant speed |x_1 - x_0|, so equal
            t-steps are equal distances. No curriculum: N is fixed for the whole run.
        solver: teacher ODE step between adjacent times (``"heun"`` as in Song et al.).
        guidance: classifier-free guidance scale of the teacher; the student learns the
            guided trajectories, so it is sampled without guidance.
        ema_decay: mu of the target update in :meth:`after_step`.
        c: pseudo-Huber constant; ``None`` picks 0.00054 sqrt(dim) from the first batch.
        label_dropout: probability of replacing a label by the null id ``num_classes`` (for
            teacher, target and student alike), so the student also learns the unconditional
            trajectories that label-free requests sample. Use the rate the teacher was
            trained with.

    Batch: ``"x_1"`` data, ``"y"`` labels, optional ``"x_0"`` (distil on stored reflow
    pairs; otherwise x_0 ~ N(0, I)).
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        num_intervals: int = 18,
        solver: str | Solver = "heun",
        guidance: float = 1.0,
        ema_decay: float = 0.95,
        c: float | None = None,
        label_dropout: float = 0.0,
    ):
        if num_intervals < 1:
            raise ValueError(f"num_intervals must be >= 1, got {num_intervals}")
        if student is teacher:
            raise ValueError("student and teacher are the same module; pass copy.deepcopy(teacher) as student")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.target = ema_copy(unwrap(student))
        self.num_intervals = num_intervals
        self.solver = get_solver(solver)
        self.teacher_v = guided_velocity(self.teacher, guidance)
        self.ema_decay = ema_decay
        self.c = c
        self.label_dropout = label_dropout

    def _follow_device(self, x: Tensor) -> None:
        """Keep the teacher and target where the batch is (the loop may move the student)."""
        for net in (self.teacher, self.target):
            p = next(net.parameters(), None)
            if p is not None and (p.device != x.device):
                net.to(x.device)

    @torch.no_grad()
    def target_of(self, x_t: Tensor, t_n: Tensor, t_next: Tensor, y: Tensor) -> Tensor:
        """f_theta^-(x_hat_{t_{n+1}}, t_{n+1}), x_hat = teacher solver step from (x_t, t_n).

        Computed in at least float32 with autocast off, whatever the caller wraps around it;
        the result has that dtype (float64 inputs stay float64).
        """
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        x_t, t_n, t_next = x_t.to(dtype), t_n.to(dtype), t_next.to(dtype)
        with torch.autocast(x_t.device.type, enabled=False):
            x_hat = self.solver.step(self.teacher_v, x_t, t_n, t_next, y)
            return consistency_fn(self.target, x_hat, t_next, y).to(dtype)

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        x_1 = require(batch, "x_1", "ConsistencyDistillation")
        y = require(batch, "y", "ConsistencyDistillation")
        x_0 = batch["x_0"] if "x_0" in batch else torch.randn_like(x_1)
        self._follow_device(x_1)
        n_batch = x_1.shape[0]
        y = drop_conditions(model, y, self.label_dropout)

        times = uniform_schedule(self.num_intervals, x_1)  # (N + 1,)
        n = torch.randint(0, self.num_intervals, (n_batch,), device=x_1.device)  # (B,)
        t_n, t_next = times[n], times[n + 1]  # (B,) each
        x_t = interpolate(x_0, x_1, t_n)

        f_target = self.target_of(x_t, t_n, t_next, y)
        f_student = consistency_fn(model, x_t, t_n, y)

        c = self.c if self.c is not None else huber_c(x_1[0].numel())
        # The distance in the target's (full) precision: a bf16 difference would round away
        # everything below ~0.4% of |f|.
        d = pseudo_huber(f_student.to(f_target.dtype), f_target, c)  # (B,)
        loss = d.mean()
        return LossOutput(loss=loss, logs={"loss": loss.detach()})

    def after_step(self, model: nn.Module) -> None:
        """theta^- <- mu theta^- + (1 - mu) theta after every optimizer step."""
        ema_update(self.target, unwrap(model), self.ema_decay)

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"consistency_target": self.target}


def consistency_times(steps: int, num_intervals: int | None = None) -> list[float]:
    """Start times of multistep consistency sampling: 0, 1/k, ..., (k - 1)/k.

    With ``num_intervals`` N (the distillation grid t_n = n / N), each time is snapped to the
    nearest grid point, t_i = floor(i N / k + 1/2) / N, so the student is only asked at times
    it was trained at (for N = 18, k = 4: 0, 5/18, 9/18, 14/18 instead of 0.25 and 0.75).
    """
    check_steps(steps)
    if num_intervals is None:
        return [i / steps for i in range(steps)]
    if isinstance(num_intervals, bool) or not isinstance(num_intervals, int) or num_intervals < 1:
        raise ValueError(f"num_intervals must be a positive int, got {num_intervals!r}")
    if steps > num_intervals:
        raise ValueError(
            f"{steps} consistency steps need {steps} distinct times on the training grid n/{num_intervals}; "
            f"use at most {num_intervals} steps, or num_intervals=None for off-grid times i/{steps}"
        )
    return [math.floor(i * num_intervals / steps + 0.5) / num_intervals for i in range(steps)]


@torch.no_grad()
def consistency_sample(
    net: nn.Module,
    x_0: Tensor,
    y: Tensor,
    steps: int,
    generator: torch.Generator | None = None,
    noise: Sequence[Tensor] | None = None,
    num_intervals: int | None = None,
    coupling: float = 0.0,
) -> SampleResult:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1) on the straight path.

    x_hat = f(x_0, 0); then for the start times t_i of :func:`consistency_times`, i = 1..k-1:

        z_i = rho x_0 + sqrt(1 - rho^2) eps_i,   eps_i ~ N(0, I) fresh,  rho = ``coupling``
        x_{t_i} = (1 - t_i) z_i + t_i x_hat,     x_hat = f(x_{t_i}, t_i).

    z_i is N(0, I) for every rho. ``coupling = 0`` is Song et al.'s fresh noise, exact for a
    student distilled from an independent-coupling (base) teacher; ``coupling = 1`` re-noises
    along the sample's own x_0, exact for a coupled (reflow) teacher, whose marginal at t is
    that of (1 - t) x_0 + t T(x_0). One network evaluation per step; ``steps = 1`` is the
    one-step generator. ``num_intervals`` snaps the times to the distillation grid n / N.

    ``noise`` (k - 1 tensors shaped like x_0) supplies the eps draws instead of ``generator``,
    so a caller that batches several requests can keep each one's draws its own. With
    ``coupling = 1`` no draws are used (and ``noise``, if given, is ignored).
    """
    check_steps(steps)
    if not 0.0 <= coupling <= 1.0:
        raise ValueError(f"coupling must be in [0, 1] (0: fresh noise, 1: the sample's own x_0), got {coupling}")
    times = consistency_times(steps, num_intervals)
    if noise is not None and len(noise) != steps - 1:
        raise ValueError(f"{steps}-step consistency sampling needs {steps - 1} noise tensors, got {len(noise)}")
    fresh = math.sqrt(1.0 - coupling * coupling)
    x_hat = consistency_fn(net, x_0, full_t(times[0], x_0), y)
    for i, t_i in enumerate(times[1:]):
        if fresh == 0.0:
            z = x_0
        else:
            eps = (
                noise[i]
                if noise is not None
                else torch.randn(x_0.shape, generator=generator, device=x_0.device, dtype=x_0.dtype)
            )
            z = x_0 * coupling + eps * fresh if coupling else eps
        t = full_t(t_i, x_0)
        x_hat = consistency_fn(net, interpolate(z, x_hat, t), t, y)
    return SampleResult(x_1=x_hat, nfe=steps)
