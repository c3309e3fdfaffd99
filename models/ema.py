"""Exponential moving average of a model's weights.

The training loop keeps a second copy of the network (``ema_copy``) and after each
optimizer step calls ``ema_update(ema_model, model, ema_decay(step, decay, warmup))``.
Pass the bare module: under DDP that is ``ddp_model.module`` (the caller unwraps), so the
EMA's state dict has no ``module.`` prefix.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_copy(model: nn.Module) -> nn.Module:
    """A frozen, eval-mode deep copy of ``model`` to hold the average."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


def ema_decay(step: int, decay: float, warmup_steps: int = 0) -> float:
    """The decay to use at optimizer step ``step`` (0-based).

    d_step = min(decay, (1 + step) / (warmup_steps + step))   if warmup_steps > 0, else decay

    Early on the average then weighs recent weights more (at step 0 it keeps 1/warmup of the
    old, random-init copy), so a 0.9999 EMA is not stuck near its initial weights for
    thousands of steps. (TensorFlow's ExponentialMovingAverage uses warmup_steps = 10.)
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay={decay} must be in [0, 1]")
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if warmup_steps <= 0:
        return decay
    return min(decay, (1 + step) / (warmup_steps + step))


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """In place, for every parameter: theta_ema <- decay * theta_ema + (1 - decay) * theta.

    Buffers (e.g. norm statistics) are copied as they are, not averaged. decay = 0 copies
    ``source``; decay = 1 leaves ``target`` unchanged.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay={decay} must be in [0, 1]")
    target_params = dict(target.named_parameters())
    source_params = dict(source.named_parameters())
    if target_params.keys() != source_params.keys():
        missing = sorted(source_params.keys() - target_params.keys())[:5]
        extra = sorted(target_params.keys() - source_params.keys())[:5]
        raise ValueError(
            "EMA target and source have different parameters "
            f"(only in source: {missing}, only in target: {extra}); "
            "pass the unwrapped module (ddp_model.module), not the DDP wrapper"
        )
    for name, p_ema in target_params.items():
        p = source_params[name].detach().to(p_ema.dtype)
        # lerp(a, b, w) = a + w (b - a) = decay * a + (1 - decay) * b, exact at w = 0 and w = 1.
        p_ema.lerp_(p, 1.0 - decay)

    source_buffers = dict(source.named_buffers())
    for name, b_ema in target.named_buffers():
        if name not in source_buffers:
            raise ValueError(f"EMA target buffer {name!r} has no counterpart in source")
        b_ema.copy_(source_buffers[name])
