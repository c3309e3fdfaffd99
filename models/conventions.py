"""The conventions every other module in ``models/`` follows, in one place.

- ``x_0 ~ N(0, I)`` is noise, ``x_1`` is data (a scaled latent), ``t`` in [0, 1].
- Straight path: ``x_t = (1 - t) x_0 + t x_1``, target velocity ``u_t = x_1 - x_0``.
- Sampling integrates ``dx/dt = v(x, t, y)`` from t = 0 (noise) to t = 1 (data).
- Networks are called ``model(x, t, y)`` (:class:`VelocityNet`); ``y`` is the condition: class ids (N,),
  ``y == num_classes`` the null label, or a text model's captions (N, L), the empty prompt its null
  (:func:`null_like` finds a network's null either way).

Some papers (and the course notes that inspired fewstep) run time the other way,
with t = 0 at the data. :func:`from_data_time` is the one conversion between the two.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def expand_t(t: Tensor, x: Tensor) -> Tensor:
    """Broadcast per-sample times ``t`` (N,) to ``x``'s shape (N, ...)."""
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t.reshape(-1, *([1] * (x.ndim - 1))).to(dtype=x.dtype)


def full_t(value: float, x: Tensor) -> Tensor:
    """A (N,) tensor of one time value, on ``x``'s device and dtype."""
    return torch.full((x.shape[0],), float(value), device=x.device, dtype=x.dtype)


def from_data_time(s: Tensor | float) -> Tensor | float:
    """Convert a time where 0 is data and 1 is noise into fewstep's time (0 noise, 1 data)."""
    return 1 - s


def null_labels(num_classes: int, n: int, device: torch.device | None = None) -> Tensor:
    """``n`` copies of the "no class" label, the id ``num_classes``."""
    return torch.full((n,), num_classes, dtype=torch.long, device=device)


def null_like(model: nn.Module, y: Tensor) -> Tensor:
    """The "no condition" of ``model`` for every row of ``y``, in ``y``'s shape: the network's own
    (``model.null_like``: a text model's empty prompt), else the null label id ``model.num_classes``."""
    net = getattr(model, "module", model)  # the bare network under a DDP-style wrapper
    own = getattr(net, "null_like", None)
    return own(y) if own is not None else torch.full_like(y, net.num_classes)


def interpolate(x_0: Tensor, x_1: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x_0 + t x_1 on the straight path."""
    t = expand_t(t, x_1)
    return (1 - t) * x_0 + t * x_1


def target_velocity(x_0: Tensor, x_1: Tensor) -> Tensor:
    """u_t = x_1 - x_0, the straight path's velocity (independent of t)."""
    return x_1 - x_0


class VelocityNet(nn.Module):
    """Base of the velocity networks ``v = model(x, t, y)`` (DiT, UNet) on latents (N, C, S, S).

    Its config names ``num_classes`` (the null label's id), ``in_channels`` and ``input_size`` (S).
    """

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        self.in_channels = config.in_channels

    def check_inputs(self, x: Tensor, t: Tensor, y: Tensor) -> None:
        """Raise ValueError unless x is (N, C, S, S) as configured and t, y are (N,)."""
        cfg = self.config
        expected = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"{type(self).__name__} expects x of shape (N, {', '.join(map(str, expected))}), got "
                f"{tuple(x.shape)}; build the model with matching input_size / in_channels"
            )
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
