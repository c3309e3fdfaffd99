"""A guidance-distilled DiT: the DiT of models/dit.py with the guidance scale as an input, ``v = net(x, t, y, w)``.

Classifier-free guidance costs two network passes a step, the conditional and the null label:

    v_w(x, t, y) = v(x, t, null) + w (v(x, t, y) - v(x, t, null)).

Guidance distillation (Meng et al. 2023; FLUX.1 [dev]) trains one network to output v_w for a
range of w in a single pass. The scale is embedded like the time and added to the AdaLN
conditioning:

    c = t_embed(t) + y_embed(y) + [w_embed(w) - w_embed(1)]

The bracket is exactly 0 at w = 1, where the target is the conditional velocity, and the guidance
embedder's last layer starts at zero, so a guided DiT built from a teacher's weights
(:func:`guided_from_velocity`) is the teacher's conditional velocity for every w at
initialisation. Called as a velocity network, ``net(x, t, y)``, it is v_1: samplers and helpers
written for velocity networks take it, and :func:`models.samplers.guided_velocity` hands it the
scale instead of doubling the batch (``embeds_guidance``).

w is embedded by the time's sinusoids (``TIME_SCALE * w``, as FLUX embeds its guidance), which
resolve scales far finer than the 0.1 a user would set.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from models.dit import DiT, DiTConfig, TimestepEmbedder, dit_shape, with_teacher_weights
from models.registry import register_kind


@dataclasses.dataclass(frozen=True, kw_only=True)
class GuidedDiTConfig(DiTConfig):
    """A DiT's shape; the guidance input adds one embedder and no field."""


class GuidedDiT(DiT):
    """Guided velocity network ``v_w = net(x, t, y, guidance)``; ``guidance`` None is w = 1 (conditional)."""

    embeds_guidance = True  # models.samplers.guided_velocity: one pass with w, not a doubled batch

    def __init__(self, config: GuidedDiTConfig):
        super().__init__(config)
        self.guidance_embedder = TimestepEmbedder(config.hidden_size)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The DiT's initialisation; the guidance embedder's output layer at zero (the teacher at init)."""
        super().initialize_weights()
        embedder = getattr(self, "guidance_embedder", None)  # DiT.__init__ calls this before it exists
        if embedder is not None:
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.zeros_(embedder.mlp[2].weight)
            nn.init.zeros_(embedder.mlp[2].bias)

    def guidance_embedding(self, w: Tensor) -> Tensor:
        """w_embed(w) - w_embed(1), (N, D): exactly zero where w = 1."""
        both = self.guidance_embedder(torch.cat([w, torch.ones_like(w)]))  # (2N, D)
        return both[: w.shape[0]] - both[w.shape[0] :]

    def forward(self, x: Tensor, t: Tensor, y: Tensor, guidance: Tensor | float | None = None) -> Tensor:
        """v_w(x, t, y): x (N, C, H, W), t (N,), y (N,), guidance a number or (N,) -> (N, C, H, W)."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        self.check_inputs(x, t, y)
        w = torch.as_tensor(1.0 if guidance is None else guidance, dtype=t.dtype, device=t.device)
        w = w.expand(x.shape[0]) if w.ndim == 0 else w
        if w.shape != t.shape:
            raise ValueError(f"guidance must be a number or have shape {tuple(t.shape)}, got {tuple(w.shape)}")
        return self.conditioned(x, self.t_embedder(t) + self.y_embedder(y) + self.guidance_embedding(w))


def guided_from_velocity(teacher: DiT) -> GuidedDiT:
    """A guided DiT carrying ``teacher``'s weights: v_w = the teacher's conditional v for every w at init."""
    if type(teacher) is not DiT:
        raise ValueError(f"guidance is distilled from a DiT velocity network, got {type(teacher).__name__}")
    return with_teacher_weights(GuidedDiT(GuidedDiTConfig(**dit_shape(teacher.config))), teacher, "guidance_embedder.")


register_kind("guided_dit", GuidedDiTConfig, GuidedDiT)
