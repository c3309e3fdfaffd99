"""Flow-map students: the average velocity u(z, s, t) learnt from a frozen flow teacher, and its sampler.

On fewstep's straight path (t = 0 noise, t = 1 data, models/conventions.py) a flow map jumps from
time s to a later time t (s <= t) along the teacher's ODE dz/dt = v(z, t):

    x_t = x_s + (t - s) u(x_s, s, t),     u(z, s, s) = v(z, s).

The MeanFlow identity in this convention. Fix the end t and move the start s along a trajectory
z_s (dz_s/ds = v(z_s, s)); the end point x_t does not depend on s, so

    0 = d/ds [z_s + (t - s) u(z_s, s, t)] = v(z_s, s) - u(z_s, s, t) + (t - s) d/ds u(z_s, s, t)
    =>  u(z_s, s, t) = v(z_s, s) + (t - s) d/ds u(z_s, s, t),
        d/ds u(z_s, s, t) = v . grad_z u + du/ds          (the total derivative along the path),

i.e. the directional derivative of (z, s, t) -> u along the tangent (v, 1, 0): one
``torch.func.jvp``. Two objectives train a flow-map network (``net(z, s, y, t_end)``, e.g.
models/flowmap_dit.py) towards it, both distilling a frozen velocity teacher (base or reflow):

- :class:`MeanFlow` (Geng et al. 2025): u_tgt = v + (t - s) stopgrad(JVP of u along (v, 1, 0)).
- :class:`Shortcut` (Frans et al. 2024), no JVP: two half steps of the student make the target
  of one full step, u_tgt = stopgrad((u(z, s, s + h) + u(x', s + h, t)) / 2), h = (t - s) / 2.

In both, a fraction ``equal_fraction`` of each batch has s = t, where the target is the teacher's
(guided) velocity: flow-matching distillation, which pins u(z, s, s) = v(z, s). MeanFlow found
about 75% best. v is the teacher's classifier-free-guided velocity at the distillation's scale, so
the student learns the guided flow and is sampled without guidance (:func:`flowmap_sample` can
still apply CFG to u, for a student distilled at guidance 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from models.conventions import expand_t, full_t, interpolate, null_like
from models.objectives import Batch, LossOutput, Objective, drop_conditions, require, unwrap
from models.paths import TimeSampler, UniformTime
from models.samplers import SampleResult, check_steps, guided_velocity

AverageVelocity = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # u(x, s, t, y)


def adaptive_mse(err: Tensor, p: float, c: float) -> tuple[Tensor, Tensor]:
    """MeanFlow's adaptive loss weighting: (loss, plain mse) with, per sample,

    mse = mean over elements of err^2,   loss = mean_batch stopgrad(w) mse,   w = 1 / (mse + c)^p.

    p = 0 is the plain MSE; p = 1 (MeanFlow's best, from scratch) weighs each sample by about
    1 / its own error, so a few large-error samples do not dominate the gradient. Distilling a
    teacher, the targets are deterministic and the large-error rows are the large gaps the
    one-step map needs: on the 2-D toy p = 1 leaves 1-step samples 7x worse (MeanFlow) or diverges
    (Shortcut, whose targets are its own), hence the default p = 0 (BENCHMARKS.md, "Flow-map student").
    """
    mse = err.pow(2).flatten(1).mean(1)  # (N,)
    if p == 0:
        return mse.mean(), mse.mean()
    w = (mse.detach() + c).pow(-p)  # (N,)
    return (w * mse).mean(), mse.mean()


class FlowMapDistillation(Objective):
    """Distil a frozen velocity teacher into a flow map; a subclass gives the target at s < t.

    Args:
        teacher: frozen velocity network ``teacher(x, t, y)`` (the base or a reflow model).
        guidance: the teacher's classifier-free guidance scale (folded into the targets).
        equal_fraction: the share of each batch with s = t (flow-matching distillation).
        time_sampler: draws the times (models.paths); uniform by default.
        adaptive_p, adaptive_c: the loss weighting of :func:`adaptive_mse` (p = 0: plain MSE).
        label_dropout: chance a label becomes the null id, for teacher and student alike, so the
            student also learns the unconditional flow that label-free requests sample.

    Batch: ``"x_1"`` data, ``"y"`` labels, optional ``"x_0"`` (stored reflow pairs; otherwise
    x_0 ~ N(0, I)); z_s = (1 - s) x_0 + s x_1. The first ``round(n * equal_fraction)`` rows of
    a batch get s = t, the rest s < t, so no work is spent on gap targets of rows that have none.
    """

    name = "FlowMapDistillation"

    def __init__(
        self,
        teacher: nn.Module,
        guidance: float = 1.0,
        equal_fraction: float = 0.75,
        time_sampler: TimeSampler | None = None,
        adaptive_p: float = 0.0,
        adaptive_c: float = 1e-3,
        label_dropout: float = 0.0,
    ):
        if not 0.0 <= equal_fraction <= 1.0:
            raise ValueError(f"equal_fraction must be in [0, 1], got {equal_fraction}")
        if adaptive_p < 0 or adaptive_c <= 0:
            raise ValueError(f"need adaptive_p >= 0 and adaptive_c > 0, got p={adaptive_p}, c={adaptive_c}")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_v = guided_velocity(self.teacher, guidance)
        self.equal_fraction = equal_fraction
        self.time_sampler = time_sampler if time_sampler is not None else UniformTime()
        self.adaptive_p, self.adaptive_c = adaptive_p, adaptive_c
        self.label_dropout = label_dropout

    # -- times -------------------------------------------------------------------------

    def gap_times(self, n: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """(s, t), each (n,), with s < t: where the subclass's target is trained."""
        raise NotImplementedError

    def times(self, n: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """(s, t) for a batch of n: the first round(n * equal_fraction) with s = t, then s < t."""
        n_equal = round(n * self.equal_fraction)
        s_eq = self.time_sampler(n_equal, like.device, like.dtype)  # (n_eq,)
        s_gap, t_gap = self.gap_times(n - n_equal, like)  # (n - n_eq,) each
        return torch.cat([s_eq, s_gap]), torch.cat([s_eq, t_gap])

    # -- targets -----------------------------------------------------------------------

    def gap_target(self, net: nn.Module, z: Tensor, s: Tensor, t: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """u_tgt at rows with s < t, given the teacher's velocity v(z, s) there."""
        raise NotImplementedError

    def _follow_device(self, x: Tensor) -> None:
        p = next(self.teacher.parameters(), None)
        if p is not None and p.device != x.device:
            self.teacher.to(x.device)

    @torch.no_grad()
    def target_of(self, net: nn.Module, z: Tensor, s: Tensor, t: Tensor, y: Tensor, n_equal: int) -> Tensor:
        """stopgrad u_tgt: the teacher's v on the first ``n_equal`` rows (s = t), :meth:`gap_target` on the rest.

        In at least float32 with autocast off, as the consistency target (models/consistency.py)."""
        dtype = torch.promote_types(z.dtype, torch.float32)
        z, s, t = z.to(dtype), s.to(dtype), t.to(dtype)
        with torch.autocast(z.device.type, enabled=False):
            v = self.teacher_v(z, s, y)
            if n_equal == z.shape[0]:
                return v
            g = slice(n_equal, None)
            return torch.cat([v[:n_equal], self.gap_target(net, z[g], s[g], t[g], y[g], v[g])])

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        x_1 = require(batch, "x_1", self.name)
        y = require(batch, "y", self.name)
        x_0 = batch["x_0"] if "x_0" in batch else torch.randn_like(x_1)
        self._follow_device(x_1)
        net = unwrap(model)
        n = x_1.shape[0]
        y = drop_conditions(net, y, self.label_dropout)
        s, t = self.times(n, x_1)  # (N,) each
        z = interpolate(x_0, x_1, s)  # z_s

        # The target from the bare network (no DDP hooks, no graph); the prediction through
        # ``model`` itself, so DDP still synchronises its gradients.
        u_tgt = self.target_of(net, z, s, t, y, round(n * self.equal_fraction))
        u = model(z, s, y, t)
        loss, mse = adaptive_mse(u.to(u_tgt.dtype) - u_tgt, self.adaptive_p, self.adaptive_c)
        return LossOutput(loss=loss, logs={"loss": loss.detach(), "mse": mse.detach()})


class MeanFlow(FlowMapDistillation):
    """MeanFlow distillation (Geng et al. 2025) from a frozen velocity teacher.

    u_tgt(z_s, s, t) = v(z_s, s) + (t - s) stopgrad[ v . grad_z u + du/ds ],

    the bracket the JVP of (z, s, t) -> u_theta(z, s, t) along the tangent (v, 1, 0). Its (s, t)
    at s < t are two draws of the time sampler, sorted.
    """

    name = "MeanFlow"

    def gap_times(self, n: int, like: Tensor) -> tuple[Tensor, Tensor]:
        a = self.time_sampler(n, like.device, like.dtype)
        b = self.time_sampler(n, like.device, like.dtype)
        return torch.minimum(a, b), torch.maximum(a, b)

    def gap_target(self, net: nn.Module, z: Tensor, s: Tensor, t: Tensor, y: Tensor, v: Tensor) -> Tensor:
        du_ds = total_derivative(net, z, s, t, y, v)
        # u_tgt = v + (t - s) d/ds u
        return v + expand_t(t - s, z) * du_ds


def total_derivative(net: nn.Module, z: Tensor, s: Tensor, t: Tensor, y: Tensor, v: Tensor) -> Tensor:
    """d/ds u(z_s, s, t) = v . grad_z u + du/ds: the JVP of (z, s, t) -> u along (v, 1, 0).

    Forward-mode AD through the whole network (one pass carrying a tangent, about the cost of two
    forwards): every op must have a forward derivative, hence the flow-map DiT's explicit attention.
    """

    def u(z_: Tensor, s_: Tensor, t_: Tensor) -> Tensor:
        return net(z_, s_, y, t_)

    _, du_ds = torch.func.jvp(u, (z, s, t), (v, torch.ones_like(s), torch.zeros_like(t)))
    return du_ds


class Shortcut(FlowMapDistillation):
    """Shortcut-model distillation (Frans et al. 2024): self-consistency of step sizes, no JVP.

    For a gap 2h = t - s:  x' = z_s + h u(z_s, s, s + h),
                           u_tgt = stopgrad( (u(z_s, s, s + h) + u(x', s + h, t)) / 2 ),

    the student's own weights giving the half steps. Gaps are powers of two, 2h = 2^-j for
    j = 0 .. log2(1 / min_gap) with equal chance, and s on the grid of multiples of the gap, as
    in the paper: k-step sampling on times i / k (k a power of two <= 1 / min_gap) then asks only
    for pairs it was trained on. At the finest gap the half steps are the instantaneous velocity
    u(., ., gap 0) (trained by the s = t rows), the recursion's base case.
    """

    name = "Shortcut"

    def __init__(self, teacher: nn.Module, min_gap: float = 1 / 128, **kwargs):
        levels = math.log2(1 / min_gap) if 0 < min_gap <= 1 else -1.0
        if levels < 0 or levels != int(levels):
            raise ValueError(f"min_gap must be 2^-j for an integer j >= 0 (e.g. 1/128), got {min_gap}")
        super().__init__(teacher, **kwargs)
        self.min_gap = min_gap
        self.levels = int(levels) + 1  # gaps 1, 1/2, ..., min_gap

    def gap_times(self, n: int, like: Tensor) -> tuple[Tensor, Tensor]:
        j = torch.randint(0, self.levels, (n,), device=like.device)
        gap = torch.pow(2.0, -j.to(like.dtype))  # (n,)
        s = torch.floor(torch.rand(n, device=like.device, dtype=like.dtype) / gap) * gap  # a multiple of gap, < 1
        return s, s + gap

    def gap_target(self, net: nn.Module, z: Tensor, s: Tensor, t: Tensor, y: Tensor, v: Tensor) -> Tensor:
        h = (t - s) / 2
        s_mid = s + h
        finest = (t - s) <= self.min_gap * (1 + 1e-6)  # base case: half steps at gap 0
        u_1 = net(z, s, y, torch.where(finest, s, s_mid))
        x_mid = z + expand_t(h, z) * u_1  # x'
        u_2 = net(x_mid, s_mid, y, torch.where(finest, s_mid, t))
        return (u_1 + u_2) / 2


# ------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------


def guided_average_velocity(net: nn.Module, guidance: float) -> AverageVelocity:
    """CFG on the average velocity: u = u(x, s, t, null) + w (u(x, s, t, y) - u(x, s, t, null)).

    One forward over a doubled batch; ``w == 1`` is the conditional output alone, ``w == 0`` the
    unconditional. For a student distilled at guidance 1 (a guided student takes w = 1)."""
    w = float(guidance)
    if not math.isfinite(w):
        raise ValueError(f"guidance must be a finite number, got {guidance!r}")
    if w == 1.0:
        return lambda x, s, t, y: net(x, s, y, t)
    if w == 0.0:
        return lambda x, s, t, y: net(x, s, null_like(net, y), t)

    def u(x: Tensor, s: Tensor, t: Tensor, y: Tensor) -> Tensor:
        n = x.shape[0]
        y_null = null_like(net, y)
        both = net(torch.cat([x, x]), torch.cat([s, s]), torch.cat([y, y_null]), torch.cat([t, t]))  # (2N, ...)
        u_cond, u_uncond = both[:n], both[n:]
        return u_uncond + w * (u_cond - u_uncond)

    return u


def flowmap_step(u: AverageVelocity, x: Tensor, s: Tensor, t: Tensor, y: Tensor) -> Tensor:
    """x_t = x_s + (t - s) u(x_s, s, t)."""
    return x + expand_t(t - s, x) * u(x, s, t, y)


@torch.no_grad()
def flowmap_sample(net: nn.Module, x_0: Tensor, y: Tensor, steps: int, guidance: float = 1.0) -> SampleResult:
    """k flow-map jumps on the times 0, 1/k, ..., 1: x <- x + (t_{i+1} - t_i) u(x, t_i, t_{i+1}, y).

    One network evaluation per step (two passes in one doubled batch when ``guidance`` is not 0 or 1)."""
    check_steps(steps)
    u = guided_average_velocity(net, guidance)
    x = x_0
    for i in range(steps):
        x = flowmap_step(u, x, full_t(i / steps, x), full_t((i + 1) / steps, x), y)
    return SampleResult(x_1=x, nfe=steps)
