"""A flow-map DiT: the DiT of models/dit.py with a second time input, ``u = net(x, s, y, t_end)``.

A flow map jumps from time s to a later time t (s <= t) on fewstep's straight path (t = 0 noise,
t = 1 data, models/conventions.py):

    x_t = x_s + (t - s) u(x_s, s, t),     u = the average velocity over [s, t].

The network is the DiT with one more conditioning term, an embedding of the gap d = t - s:

    c = t_embed(s) + y_embed(y) + [gap_embed(d) - gap_embed(0)]

The bracket is exactly 0 at d = 0, so u(x, s, s) is a plain velocity network v(x, s, y), the DiT
it was built from, whatever the gap embedder learns; and the gap embedder's last layer starts at
zero, so a flow map built from a teacher DiT's weights (:func:`flowmap_from_velocity`) is that
teacher for every (s, t) at initialisation. Called as a velocity network, ``net(x, t, y)``, it
is u(x, t, t) = v(x, t): samplers and guidance helpers written for velocity networks take it.

Why the gap d and not the end time t: the part the flow map must learn beyond the teacher grows
with d (it is exactly the teacher at d = 0), Shortcut models condition on d (Frans et al. 2024),
and MeanFlow's ablation found (t, t - r) at least as good as (t, r) (Geng et al. 2025, Table 1c).

Attention: ``F.scaled_dot_product_attention`` has no forward-mode derivative on CPU (torch 2.x),
which the MeanFlow objective's ``torch.func.jvp`` needs, so the flow map's blocks use the
explicit softmax(Q K^T / sqrt(d_h)) V by default (``explicit_attention``); same parameters, same
state dict, the same outputs to float rounding (tests pin it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.dit import Attention as FusedAttention
from models.dit import DiT, DiTConfig, TimestepEmbedder, dit_shape, with_teacher_weights
from models.registry import register_kind


@dataclass(frozen=True, kw_only=True)
class FlowMapDiTConfig(DiTConfig):
    """A DiT's shape, and which attention kernel its blocks run."""

    explicit_attention: bool = True  # False: the fused kernel (faster; no forward-mode AD on CPU)


class ExplicitAttention(FusedAttention):
    """The same multi-head self-attention written out, so forward-mode AD (``torch.func.jvp``) runs:

    out = softmax(Q K^T / sqrt(d_h)) V  per head.
    """

    def forward(self, x: Tensor) -> Tensor:
        n, T, d = x.shape
        qkv = self.qkv(x).reshape(n, T, 3, self.num_heads, d // self.num_heads)  # (N, T, 3, H, d/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, H, T, d/H)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (N, H, T, T)
        out = scores.softmax(dim=-1) @ v  # (N, H, T, d/H)
        out = out.transpose(1, 2).reshape(n, T, d)  # (N, T, D)
        return self.proj(out)


class FlowMapDiT(DiT):
    """Average-velocity network ``u = net(x, s, y, t_end)`` for latents (N, C, H, W); ``t_end`` None is s."""

    def __init__(self, config: FlowMapDiTConfig):
        super().__init__(config)
        d = config.hidden_size
        if config.explicit_attention:
            for block in self.blocks:
                block.attn = ExplicitAttention(d, config.num_heads)
        self.gap_embedder = TimestepEmbedder(d)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The DiT's initialisation; the gap embedder's output layer at zero (the teacher at init)."""
        super().initialize_weights()
        gap = getattr(self, "gap_embedder", None)  # DiT.__init__ calls this before the embedder exists
        if gap is not None:
            nn.init.normal_(gap.mlp[0].weight, std=0.02)
            nn.init.zeros_(gap.mlp[2].weight)
            nn.init.zeros_(gap.mlp[2].bias)

    def gap_embedding(self, d: Tensor) -> Tensor:
        """gap_embed(d) - gap_embed(0), (N, D): exactly zero where d = 0."""
        both = self.gap_embedder(torch.cat([d, torch.zeros_like(d)]))  # (2N, D)
        return both[: d.shape[0]] - both[d.shape[0] :]

    def forward(self, x: Tensor, s: Tensor, y: Tensor, t_end: Tensor | None = None) -> Tensor:
        """u(x, s, t_end, y): x (N, C, H, W), s and t_end (N,) with s <= t_end, y (N,) -> (N, C, H, W)."""
        if s.ndim == 0:
            s = s.expand(x.shape[0])
        t_end = s if t_end is None else (t_end.expand(x.shape[0]) if t_end.ndim == 0 else t_end)
        self.check_inputs(x, s, y)
        if t_end.shape != s.shape:
            raise ValueError(f"t_end must have shape {tuple(s.shape)}, got {tuple(t_end.shape)}")
        return self.conditioned(x, self.t_embedder(s) + self.y_embedder(y) + self.gap_embedding(t_end - s))


def flowmap_from_velocity(teacher: DiT, explicit_attention: bool = True) -> FlowMapDiT:
    """A flow-map DiT carrying ``teacher``'s weights: u(x, s, t) = teacher v(x, s) for every t at init."""
    if type(teacher) is not DiT and not getattr(teacher, "embeds_guidance", False):
        raise ValueError(f"a flow map is built from a DiT velocity network, got {type(teacher).__name__}")
    net = FlowMapDiT(FlowMapDiTConfig(**dit_shape(teacher.config), explicit_attention=explicit_attention))
    if getattr(teacher, "embeds_guidance", False):  # a guidance-distilled teacher gives its weights at w = 1
        teacher = with_teacher_weights(DiT(DiTConfig(**dit_shape(teacher.config))), teacher, "guidance_embedder.")
    return with_teacher_weights(net, teacher, "gap_embedder.")


register_kind("flowmap_dit", FlowMapDiTConfig, FlowMapDiT)
