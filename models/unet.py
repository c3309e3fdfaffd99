"""A small class-conditional U-Net with adaptive GroupNorm (Dhariwal & Nichol, 2021).

A convolutional contender to measure beside the DiT (models/dit.py) on small latents: the same
interface ``v = model(x, t, y)``, ``x`` (N, C, H, W), ``t`` (N,) in [0, 1], ``y`` (N,) class ids
where ``y == num_classes`` is the null label (classifier-free guidance). Label dropout is the
objective's job (models/objectives.py), as for the DiT.

Data flow (channel_mults (1, 2), blocks_per_level 2, an 8x8 latent)::

    c = t_embed(t) + y_embed(y)                                         (N, E), E = 4 * base
    x --conv3x3--> 8x8 x base --[Res, Res]--> down --> 4x4 --[Res+Attn, Res+Attn]--   encoder
                                                                       [Res, Attn, Res]  middle
    8x8 x base <--[Res x3]-- up <--[Res+Attn x3]-- 4x4 <---------------------------   decoder
    --GN, SiLU, conv3x3--> v (N, C, H, W)                 (each decoder Res eats one encoder skip)

Every ResBlock injects c by AdaGN: h = GroupNorm(h) * (1 + scale(c)) + shift(c). The last conv of
each residual branch, the attention output and the output conv start at zero, so a fresh U-Net
is the zero velocity field and every block starts as the identity (as AdaLN-Zero in the DiT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.conventions import VelocityNet
from models.dit import TimestepEmbedder
from models.registry import register_kind


@dataclass(frozen=True, kw_only=True)
class UNetConfig:
    """Shape of a U-Net. Output channels equal input channels."""

    in_channels: int = 4
    input_size: int = 8  # latent height == width
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2)  # one level per entry; each level after the first halves H, W
    blocks_per_level: int = 2
    num_classes: int = 10  # the id num_classes is the null ("no class") label
    attention: bool = True  # self-attention at the lowest resolution
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if min(self.in_channels, self.input_size, self.base_channels, self.blocks_per_level) < 1:
            raise ValueError(f"need positive in_channels, input_size, base_channels, blocks_per_level; got {self}")
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise ValueError(f"channel_mults={self.channel_mults} must be a non-empty tuple of positive ints")
        factor = 2 ** (len(self.channel_mults) - 1)
        if self.input_size % factor:
            raise ValueError(
                f"input_size={self.input_size} is not divisible by {factor} (one halving per level after the "
                f"first of channel_mults={self.channel_mults}); use fewer levels"
            )
        if self.num_classes < 0:
            raise ValueError(f"num_classes={self.num_classes} must be >= 0 (0 = unconditional)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")


def group_norm(channels: int, affine: bool = True) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups (the largest divisor of ``channels`` that divides 32)."""
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6, affine=affine)


class ResBlock(nn.Module):
    """x + conv(drop(SiLU(AdaGN(conv(SiLU(GN(x))), c)))), with a 1x1 skip when the width changes.

    AdaGN(h, c) = GN(h) * (1 + scale) + shift,   (shift, scale) = Linear(SiLU(c))
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch))
        self.norm2 = group_norm(out_ch, affine=False)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)  # zero-initialised by UNet
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (N, out, H, W)
        shift, scale = self.emb(c)[:, :, None, None].chunk(2, dim=1)  # 2 x (N, out, 1, 1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """x + proj(softmax(q k^T / sqrt(d)) v) over the H*W positions; heads of 64 channels (at least 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.num_heads = max(1, channels // 64)
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)  # zero-initialised by UNet

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        n, ch, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.num_heads, ch // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # 3 x (N, heads, HW, ch/heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, HW, ch/heads)
        out = out.transpose(-1, -2).reshape(n, ch, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        return self.conv(x)  # (N, ch, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (N, ch, 2H, 2W)


class Stage(nn.Sequential):
    """Blocks applied in order, each given the conditioning c."""

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        for block in self:
            x = block(x, c)
        return x


class UNet(VelocityNet):
    """Velocity network ``v = model(x, t, y)`` for latents of shape (N, C, H, W)."""

    def __init__(self, config: UNetConfig):
        super().__init__(config)
        base, mults, drop = config.base_channels, config.channel_mults, config.dropout
        emb = 4 * base
        last = len(mults) - 1

        self.t_embedder = TimestepEmbedder(emb)
        self.y_embedder = nn.Embedding(config.num_classes + 1, emb)
        self.input_conv = nn.Conv2d(config.in_channels, base, 3, padding=1)

        # Encoder: one stage per block; the widths of their outputs are the decoder's skips.
        self.down = nn.ModuleList()
        skips, ch = [base], base
        for level, mult in enumerate(mults):
            for _ in range(config.blocks_per_level):
                blocks = [ResBlock(ch, base * mult, emb, drop)]
                ch = base * mult
                if config.attention and level == last:
                    blocks.append(AttentionBlock(ch))
                self.down.append(Stage(*blocks))
                skips.append(ch)
            if level != last:
                self.down.append(Stage(Downsample(ch)))
                skips.append(ch)

        middle = [ResBlock(ch, ch, emb, drop)] + ([AttentionBlock(ch)] if config.attention else [])
        self.middle = Stage(*middle, ResBlock(ch, ch, emb, drop))

        # Decoder: blocks_per_level + 1 stages a level, each eating one skip (concatenated).
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for i in range(config.blocks_per_level + 1):
                blocks = [ResBlock(ch + skips.pop(), base * mult, emb, drop)]
                ch = base * mult
                if config.attention and level == last:
                    blocks.append(AttentionBlock(ch))
                if level != 0 and i == config.blocks_per_level:
                    blocks.append(Upsample(ch))
                self.up.append(Stage(*blocks))

        self.output = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, config.in_channels, 3, padding=1))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        # Zero the last layer of every residual branch and the output: a fresh net is v = 0.
        for module in self.modules():
            if isinstance(module, ResBlock):
                nn.init.zeros_(module.conv2.weight)
                nn.init.zeros_(module.conv2.bias)
            elif isinstance(module, AttentionBlock):
                nn.init.zeros_(module.proj.weight)
                nn.init.zeros_(module.proj.bias)
        nn.init.zeros_(self.output[-1].weight)
        nn.init.zeros_(self.output[-1].bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """v(x, t, y): x (N, C, H, W), t (N,) in [0, 1], y (N,) long -> (N, C, H, W)."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        self.check_inputs(x, t, y)
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, E)
        h = self.input_conv(x)  # (N, base, H, W)
        skips = [h]
        for stage in self.down:
            h = stage(h, c)
            skips.append(h)
        h = self.middle(h, c)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), c)
        return self.output(h)  # (N, C, H, W)


register_kind("unet", UNetConfig, UNet)
