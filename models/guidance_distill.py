"""Guidance distillation: one network pass that does what classifier-free guidance does in two.

A frozen flow teacher trained with label dropout gives, at a point x_t of the straight path,

    v_c = v(x_t, t, y),  v_u = v(x_t, t, null),  v_w = v_u + w (v_c - v_u)    (CFG at scale w).

The student ``net(x, t, y, guidance=w)`` (models/guided_dit.py) regresses v_w for w drawn from a
range, on the points x_t = (1 - t) x_0 + t x_1 of the data's straight paths (Meng et al. 2023,
"On distillation of guided diffusion models", stage one; FLUX.1 [dev]):

    L = E_{x_0, x_1, t, w} || net(x_t, t, y, w) - v_w(x_t, t, y) ||^2

At w = 1 the target is the conditional velocity v_c; for a row whose label is the null id, v_c
and v_u are one and the same, so the target is v_u whatever w is, and the student keeps the
unconditional flow that label-free requests sample. The teacher's two passes run as one doubled
batch under ``torch.no_grad()``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.conventions import expand_t, interpolate, null_like
from models.objectives import Batch, LossOutput, Objective, draw_path, drop_conditions, require
from models.paths import TimeSampler, UniformTime


class GuidanceDistillation(Objective):
    """Distil ``teacher``'s classifier-free-guided velocity, at scales in ``scales`` = (low, high), into
    a network that takes the scale as an input.

    Args:
        teacher: frozen velocity network ``teacher(x, t, y)`` trained with label dropout.
        scales: the range w is drawn from, uniformly, per row.
        conditional_fraction: the share of rows at w = 1 exactly, where the target is the conditional
            velocity. The scale's embedding is zero there (models/guided_dit.py), but a range's end is
            never drawn: trained on U(1, 4) alone, the shapes DiT's w = 1 drew like the base at w = 2.
        time_sampler: draws t (models.paths); uniform by default.
        label_dropout: chance a label becomes the null id, so the student keeps the unconditional flow.

    Batch: ``"x_1"`` data, ``"y"`` labels, optional ``"x_0"`` (stored pairs; otherwise N(0, I)).
    """

    def __init__(
        self,
        teacher: nn.Module,
        scales: tuple[float, float] = (1.0, 4.0),
        time_sampler: TimeSampler | None = None,
        label_dropout: float = 0.1,
        conditional_fraction: float = 0.1,
    ):
        low, high = (float(s) for s in scales)
        if not 0.0 <= low <= high:
            raise ValueError(f"scales must be (low, high) with 0 <= low <= high, got {scales}")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
        self.teacher = teacher.eval().requires_grad_(False)
        if not 0.0 <= conditional_fraction <= 1.0:
            raise ValueError(f"conditional_fraction must be in [0, 1], got {conditional_fraction}")
        self.scales = (low, high)
        self.conditional_fraction = conditional_fraction
        self.time_sampler = time_sampler if time_sampler is not None else UniformTime()
        self.label_dropout = label_dropout

    @torch.no_grad()
    def target(self, x_t: Tensor, t: Tensor, y: Tensor, w: Tensor) -> Tensor:
        """v_w = v_u + w (v_c - v_u) of the teacher, w (N,) per row: one pass over a doubled batch."""
        n = x_t.shape[0]
        y_null = null_like(self.teacher, y)
        v_both = self.teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, y_null]))  # (2N, ...)
        v_c, v_u = v_both[:n], v_both[n:]
        return v_u + expand_t(w, v_u) * (v_c - v_u)

    def draw_scales(self, n: int, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """w ~ U(low, high), (n,); the first round(n * conditional_fraction) rows at w = 1."""
        low, high = self.scales
        u = torch.rand(n, generator=generator, dtype=like.dtype)
        w = low + (high - low) * u
        w[: round(n * self.conditional_fraction)] = 1.0
        return w.to(like.device)

    def regression(self, model: nn.Module, x_0: Tensor, x_1: Tensor, t: Tensor, y: Tensor, w: Tensor) -> Tensor:
        x_t = interpolate(x_0, x_1, t)
        v = model(x_t, t, y, guidance=w)
        return (v - self.target(x_t, t, y, w)).pow(2).mean()

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        y = drop_conditions(model, require(batch, "y", "GuidanceDistillation"), self.label_dropout)
        x_0, x_1, t = draw_path(batch, "GuidanceDistillation", self.time_sampler)  # t (N,)
        loss = self.regression(model, x_0, x_1, t, y, self.draw_scales(x_1.shape[0], x_1))
        return LossOutput(loss=loss, logs={"loss": loss.detach()})

    def heldout_loss(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> Tensor:
        """The same regression with every label as given; x_0 (unless stored), t and w from ``generator``."""
        x_0, x_1, t = draw_path(batch, "GuidanceDistillation", self.time_sampler, generator)
        y = require(batch, "y", "GuidanceDistillation")
        return self.regression(model, x_0, x_1, t, y, self.draw_scales(x_1.shape[0], x_1, generator))
