"""A small convolutional KL-VAE: images in [-1, 1] <-> latents f times smaller per side.

Encoder: conv_in, one residual block + stride-2 conv per halving, a middle residual block,
then a conv to 2 * latent_channels maps (mean, logvar). The decoder mirrors it with
nearest-neighbour upsampling. The decoder's last layer is a plain convolution (no tanh):
outputs are unbounded and only approximately in [-1, 1]; whoever turns them into pixels
clamps. A tanh saturates and slows learning of the extremes, which digits are full of.

Latents fed to the DiT are ``latent_scale * z`` with the scale measured on the data by
:func:`measure_latent_scale` (DESIGN §2); nothing here hard-codes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.objectives import Batch, LossOutput, Objective, require
from models.registry import register_kind

# log-variance is clamped to this range before exp, so a wild encoder cannot overflow.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclass(frozen=True, kw_only=True)
class VAEConfig:
    in_channels: int = 1  # 1 for grayscale, 3 for RGB
    latent_channels: int = 4
    base_channels: int = 32  # channels at full resolution; doubled at each halving, up to 4x
    downsample: int = 4  # spatial factor f: latents are (H/f, W/f); 4 or 8
    beta: float = 1e-4  # KL weight in vae_loss (see its docstring for units)

    def __post_init__(self) -> None:
        if self.downsample not in (4, 8):
            raise ValueError(f"downsample={self.downsample} is not supported; use 4 or 8")
        for name in ("in_channels", "latent_channels", "base_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.beta < 0:
            raise ValueError(f"beta={self.beta} must be >= 0")

    @property
    def num_levels(self) -> int:
        """Number of stride-2 halvings, log2(downsample)."""
        return int(math.log2(self.downsample))

    def level_channels(self) -> list[int]:
        """Channels after each level: base * (1, 2, 4, ...) capped at 4x."""
        return [self.base_channels * min(2**i, 4) for i in range(self.num_levels)]


@dataclass(frozen=True)
class DiagonalGaussian:
    """q(z | x) = N(mean, exp(logvar)), each (N, latent_channels, h, w)."""

    mean: Tensor
    logvar: Tensor

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """z = mean + std * eps, eps ~ N(0, I) (reparameterised: gradients reach mean, logvar)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, in nats, summed over latent dims -> (N,).

        KL = 0.5 * sum(mean^2 + sigma^2 - 1 - log sigma^2)
        """
        per_dim = 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)
        return per_dim.flatten(1).sum(dim=1)


@dataclass(frozen=True)
class VAEOutput:
    x_hat: Tensor  # (N, C, H, W) reconstruction from a sampled z
    posterior: DiagonalGaussian


@dataclass(frozen=True)
class VAELoss:
    loss: Tensor  # recon + beta * kl, the scalar to minimise
    recon: Tensor  # mean squared error per pixel and channel, in [-1, 1] data units^2
    kl: Tensor  # KL per sample in nats, summed over latent dims, averaged over the batch


def _group_norm(channels: int) -> nn.GroupNorm:
    # 8 groups where the width allows; gcd keeps any channel count valid.
    return nn.GroupNorm(math.gcd(8, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """out = skip(x) + conv(SiLU(GN(conv(SiLU(GN(x))))))"""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = _group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        ch = config.base_channels
        layers: list[nn.Module] = [nn.Conv2d(config.in_channels, ch, 3, padding=1)]
        for out_ch in config.level_channels():
            layers += [ResBlock(ch, out_ch), nn.Conv2d(out_ch, out_ch, 3, stride=2, padding=1)]
            ch = out_ch
        layers += [ResBlock(ch, ch), _group_norm(ch), nn.SiLU()]
        layers += [nn.Conv2d(ch, 2 * config.latent_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (N, 2 * latent_channels, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        widths = config.level_channels()
        ch = widths[-1]
        layers: list[nn.Module] = [
            nn.Conv2d(config.latent_channels, ch, 3, padding=1),
            ResBlock(ch, ch),
        ]
        for out_ch in reversed(widths):
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(ch, ch, 3, padding=1),
                ResBlock(ch, out_ch),
            ]
            ch = out_ch
        layers += [_group_norm(ch), nn.SiLU(), nn.Conv2d(ch, config.in_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)  # (N, C, H, W)


class VAE(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def _check_images(self, x: Tensor) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"VAE expects images (N, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % cfg.downsample or x.shape[3] % cfg.downsample:
            raise ValueError(
                f"image size {tuple(x.shape[2:])} is not divisible by downsample={cfg.downsample}; "
                "resize or pad the images"
            )

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """x (N, C, H, W) in [-1, 1] -> q(z | x) with mean, logvar (N, latent_channels, H/f, W/f)."""
        self._check_images(x)
        moments = self.encoder(x)  # (N, 2 * latent_channels, H/f, W/f)
        mean, logvar = moments.chunk(2, dim=1)  # 2 x (N, latent_channels, H/f, W/f)
        return DiagonalGaussian(mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))

    def decode(self, z: Tensor) -> Tensor:
        """z (N, latent_channels, h, w) -> x_hat (N, C, h*f, w*f), unclamped, about [-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"VAE.decode expects z (N, {self.config.latent_channels}, h, w), got {tuple(z.shape)}")
        return self.decoder(z)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> VAEOutput:
        """Encode, sample z ~ q(z | x), decode. For a deterministic pass use decode(encode(x).mean)."""
        posterior = self.encode(x)
        return VAEOutput(x_hat=self.decode(posterior.sample(generator)), posterior=posterior)


def vae_loss(vae: VAE, x: Tensor, beta: float | None = None, generator: torch.Generator | None = None) -> VAELoss:
    """The beta-VAE objective on a batch x (N, C, H, W) in [-1, 1].

    recon = mean over N, C, H, W of (x_hat - x)^2
    kl    = mean over N of KL(q(z | x_n) || N(0, I))   (summed over latent dims, nats)
    loss  = recon + beta * kl

    The two terms have different units (per pixel vs per image), so ``beta`` is small
    (default ``vae.config.beta``): the KL only keeps latents near unit scale, it is not an ELBO.
    """
    beta = vae.config.beta if beta is None else beta
    out = vae(x, generator=generator)
    recon = F.mse_loss(out.x_hat, x)
    kl = out.posterior.kl().mean()
    return VAELoss(loss=recon + beta * kl, recon=recon, kl=kl)


def measure_latent_scale(means: Tensor) -> float:
    """The factor that gives latents unit standard deviation, like SD's 0.18215.

    scale = 1 / std(means)   (over every element, population std, computed in float64)
    """
    if means.numel() < 2:
        raise ValueError(f"need at least 2 latent values to measure a scale, got {means.numel()}")
    std = means.detach().to(torch.float64).std(unbiased=False).item()
    if not math.isfinite(std) or std == 0.0:
        raise ValueError(
            f"latent std is {std}; the encoder output is constant or not finite, "
            "so no scale can be measured (is the VAE trained?)"
        )
    return 1.0 / std


class VAEObjective(Objective):
    """The beta-VAE objective of :func:`vae_loss` on ``batch["x_1"]`` (images in [-1, 1]), for the
    training loop. ``beta`` is explicit because the loop hands the loss a DDP wrapper."""

    def __init__(self, beta: float):
        self.beta = beta

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        x_1 = require(batch, "x_1", "VAEObjective")
        out = vae_loss(model, x_1, beta=self.beta)
        return LossOutput(out.loss, {"loss": out.loss.detach(), "recon": out.recon.detach(), "kl": out.kl.detach()})


register_kind("vae", VAEConfig, VAE)
