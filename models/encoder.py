"""A small self-supervised image encoder: the FID feature space of unlabeled data.

fewstep's default feature space is a classifier trained on the labels (models/classifier.py).
A folder without labels has none, and Inception weights cannot be fetched offline, so the
evaluation trains this encoder on the train split instead, with SimCLR's contrastive
objective (Chen et al. 2020): two random augmentations of each image must map to nearby
points, and away from the other images of the batch. Its ``features`` are the feature space.

Input images are (N, C, H, W) in [-1, 1] (pixel space)::

    x (N, C, S, S)
    conv-conv-pool  -> (N, w, S/2, S/2)        three of the classifier's stages (conv_stage)
    conv-conv-pool  -> (N, 2w, S/4, S/4)
    conv-conv-pool  -> (N, 4w, S/8, S/8)
    mean over space -> (N, 4w)
    linear          -> (N, feature_dim)        = features(x), the FID feature space
    MLP             -> (N, projection_dim)     = forward(x), what the contrastive loss sees

Choices, and why:

- GroupNorm, as the classifier, so features do not depend on the batch; global average
  pooling, as SimCLR's ResNets, so the crops' shifts need not be learned away. On the shapes
  benchmark (1000 steps, width 16) pooling gave FIDs 7-22x the real-vs-real floor for blur,
  noise and half the classes dropped, where flattening the last map (the classifier's
  layout) gave 3-9x: the pooled space tells corrupted from real data more clearly.
- ``feature_dim = 64`` as the classifier's: FID's small-sample bias grows with D, and 64
  keeps the 2080 covariance entries well estimated from ~1k images.
- Features are read before the projection head, as SimCLR found them better; the head's
  output is L2-normalised inside the loss only.
- Temperature 0.2 rather than SimCLR's CIFAR-10 setting of 0.5 (their appendix B.9): on
  the shapes benchmark (width 8, batch 64, 300 steps, 3 seeds) the FID of half the classes
  was 1.8-7.0x the real-vs-real floor at 0.2 and 0.9-2.5x at 0.5, i.e. the sharper
  temperature learns what tells images apart sooner.
- The augmentations decide what the metric cannot see: every invariance the encoder learns
  is a difference between images FID will not measure. Crops, flips and colour jitter make
  the features lean less on position and tint (only partly: instance discrimination still
  favours colour and texture, and after 1000 steps a nearest-class-mean probe on shapes reads
  only 20% of the class, though dropping half the classes moves FID 10x the floor);
  Gaussian blur is off by default (``blur=0``) because
  blur-invariant features would hide the blurriness of few-step samples, the failure the
  evaluation exists to catch. tests/models/test_metric_sanity.py checks that FID and KID in
  this space still rise with blur, noise and dropped classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.classifier import check_images, conv_stage, require_positive
from models.objectives import Batch, LossOutput, Objective, require
from models.registry import register_kind


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """Shape of the encoder (any ``image_size`` >= 8: three 2x poolings, then a global mean)."""

    in_channels: int = 3
    image_size: int = 32  # height == width
    width: int = 32  # channels of the first stage; then 2 * width and 4 * width
    feature_dim: int = 64  # the feature space
    projection_dim: int = 64  # the contrastive head's output

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(
                f"image_size={self.image_size} must be at least 8 (the encoder pools three "
                "times by 2); resize the images or pick another size"
            )
        require_positive(self, ("in_channels", "width", "feature_dim", "projection_dim"))


class Encoder(nn.Module):
    """CNN encoder whose ``features`` are the feature space for unlabeled data."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.feature_dim = config.feature_dim
        w = config.width
        self.body = nn.Sequential(conv_stage(config.in_channels, w), conv_stage(w, 2 * w), conv_stage(2 * w, 4 * w))
        self.embed = nn.Linear(4 * w, config.feature_dim)
        self.head = nn.Sequential(
            nn.SiLU(),
            nn.Linear(config.feature_dim, config.feature_dim),
            nn.SiLU(),
            nn.Linear(config.feature_dim, config.projection_dim),
        )

    def features(self, x: Tensor) -> Tensor:
        """Images (N, C, S, S) in [-1, 1] -> features (N, feature_dim)."""
        check_images(x, self.config.in_channels, self.config.image_size, "encoder")
        h = self.body(x)  # (N, 4w, S/8, S/8)
        return self.embed(h.mean(dim=(2, 3)))  # (N, 4w) -> (N, feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Projections (N, projection_dim), unnormalised: the input of the contrastive loss."""
        return self.head(self.features(x))


# ---- augmentations ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Augmentations:
    """SimCLR's augmentations, batched and in pure torch; probabilities are per image.

    Defaults follow SimCLR's CIFAR-10 recipe (crop, flip, colour jitter of strength 0.5 with
    p = 0.8, grayscale with p = 0.2, no blur) with a milder crop (half the area at least),
    since a 32x32 image cut to 8% of its area has no shape left.
    """

    crop_scale: tuple[float, float] = (0.5, 1.0)  # share of the area a crop keeps
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # its width / height
    flip: float = 0.5
    jitter: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1  # in turns: the hue rotates by up to +-0.1 of a full circle
    grayscale: float = 0.2
    blur: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 1.5)  # pixels

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale={self.crop_scale} must satisfy 0 < low <= high <= 1")
        for name in ("flip", "jitter", "grayscale", "blur"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} is a probability and must be in [0, 1]")


def _uniform(n: int, bounds: tuple[float, float], like: Tensor) -> Tensor:
    lo, hi = bounds
    return lo + (hi - lo) * torch.rand(n, device=like.device, dtype=like.dtype)


def _chosen(p: float, like: Tensor) -> Tensor:
    """(N, 1, 1, 1) boolean: which images an augmentation of probability p applies to."""
    return (torch.rand(like.shape[0], device=like.device) < p)[:, None, None, None]


def random_resized_crop(x: Tensor, scale: tuple[float, float], ratio: tuple[float, float], flip: float) -> Tensor:
    """Crop a random box of area share in ``scale`` and aspect ratio in ``ratio``, mirror it with
    probability ``flip``, and resize it back to (H, W) bilinearly, all in one resampling.

    In normalised coordinates the output pixel p samples the input at A p + c, with
    A = diag(+-w, h), (w, h) = (sqrt(a r), sqrt(a / r)) clipped to 1, c uniform in the box
    that keeps the crop inside the image.
    """
    n = x.shape[0]
    area = _uniform(n, scale, x)
    log_ratio = _uniform(n, (math.log(ratio[0]), math.log(ratio[1])), x)
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx = (2 * torch.rand(n, device=x.device, dtype=x.dtype) - 1) * (1 - w)
    cy = (2 * torch.rand(n, device=x.device, dtype=x.dtype) - 1) * (1 - h)
    sign = torch.where(torch.rand(n, device=x.device) < flip, -1.0, 1.0).to(x.dtype)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = sign * w, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (N, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x01: Tensor) -> Tensor:
    """Luma (N, 1, H, W) of RGB images in [0, 1]: 0.299 R + 0.587 G + 0.114 B (ITU-R 601)."""
    weights = torch.tensor([0.299, 0.587, 0.114], device=x01.device, dtype=x01.dtype)
    return (x01 * weights[:, None, None]).sum(dim=1, keepdim=True)


_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def _rotate_hue(x01: Tensor, turns: Tensor) -> Tensor:
    """Rotate the chroma of RGB images (N, 3, H, W) by ``turns`` (N,) of a circle in YIQ space.

    [Y, I', Q'] = [Y, I cos a - Q sin a, I sin a + Q cos a],  a = 2 pi turns
    """
    to_yiq = torch.tensor(_RGB_TO_YIQ, device=x01.device, dtype=x01.dtype)  # (3, 3)
    yiq = torch.einsum("ij,njhw->nihw", to_yiq, x01)
    a = (2 * math.pi * turns)[:, None, None]
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], i * a.cos() - q * a.sin(), i * a.sin() + q * a.cos()], dim=1)
    return torch.einsum("ij,njhw->nihw", torch.linalg.inv(to_yiq), yiq)


def colour_jitter(x01: Tensor, augment: Augmentations) -> Tensor:
    """Random brightness, contrast, saturation and hue, on images in [0, 1] (RGB or grey).

    brightness: x b;  contrast: (x - mean gray) c + mean gray;  saturation: (x - gray) s + gray;
    with b, c, s uniform in [1 - strength, 1 + strength]; then the hue rotation (RGB only).
    """
    n = x01.shape[0]
    x01 = x01 * _uniform(n, (1 - augment.brightness, 1 + augment.brightness), x01)[:, None, None, None]
    rgb = x01.shape[1] == 3
    gray = _gray(x01) if rgb else x01
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    x01 = (x01 - mean) * _uniform(n, (1 - augment.contrast, 1 + augment.contrast), x01)[:, None, None, None] + mean
    if rgb:
        gray = _gray(x01)
        s = _uniform(n, (1 - augment.saturation, 1 + augment.saturation), x01)
        x01 = (x01 - gray) * s[:, None, None, None] + gray
        x01 = _rotate_hue(x01, _uniform(n, (-augment.hue, augment.hue), x01))
    return x01.clamp(0, 1)


def gaussian_blur(x: Tensor, sigma: Tensor, radius: int = 2) -> Tensor:
    """Blur each image (N, C, H, W) with its own Gaussian of std ``sigma`` (N,) pixels.

    k_n(i) = exp(-i^2 / (2 sigma_n^2)) / sum_j exp(-j^2 / (2 sigma_n^2)),  |i| <= radius,
    applied along rows then columns (separable), with reflected borders.
    """
    n, c, h, w = x.shape
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(offsets**2) / (2 * sigma[:, None] ** 2))  # (N, 2r + 1)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (N C, 2r + 1)
    flat = x.reshape(1, n * c, h, w)  # one group per image and channel
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)


def augment_images(x: Tensor, augment: Augmentations) -> Tensor:
    """One random view of each image (N, C, H, W) in [-1, 1], drawn from torch's global RNG."""
    x = random_resized_crop(x, augment.crop_scale, augment.crop_ratio, augment.flip)
    x01 = (x + 1) / 2
    x01 = torch.where(_chosen(augment.jitter, x01), colour_jitter(x01, augment), x01)
    if x01.shape[1] == 3:
        x01 = torch.where(_chosen(augment.grayscale, x01), _gray(x01).expand_as(x01), x01)
    if augment.blur > 0:
        sigma = _uniform(x01.shape[0], augment.blur_sigma, x01)
        x01 = torch.where(_chosen(augment.blur, x01), gaussian_blur(x01, sigma), x01)
    return x01 * 2 - 1


# ---- the contrastive objective --------------------------------------------------------------


def nt_xent(z_a: Tensor, z_b: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """SimCLR's NT-Xent loss for projections of two views z_a, z_b (N, P); (loss, top-1 hit rate).

    With z the 2N L2-normalised projections and s_ij = z_i . z_j / tau:
    L = -1/(2N) sum_i log( exp(s_{i, pair(i)}) / sum_{j != i} exp(s_ij) )
    """
    n = z_a.shape[0]
    z = F.normalize(torch.cat([z_a, z_b]).float(), dim=1)  # (2N, P)
    similarity = z @ z.T / temperature  # (2N, 2N)
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    similarity = similarity.masked_fill(self_mask, float("-inf"))  # j != i
    pair = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)  # (2N,)
    loss = F.cross_entropy(similarity, pair)
    hit_rate = (similarity.argmax(dim=1) == pair).float().mean()
    return loss, hit_rate


class ContrastiveObjective(Objective):
    """SimCLR on batch ``"x_1"`` (images (N, C, H, W) in [-1, 1]; labels are not used).

    Each step draws two augmentations of every image from torch's global RNG (which the
    training loop seeds and checkpoints) and minimises NT-Xent between their projections.
    Logs the loss and the share of views whose most similar other view is their pair.
    """

    def __init__(self, temperature: float = 0.2, augment: Augmentations | None = None):
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be positive (SimCLR uses 0.1-1)")
        self.temperature = temperature
        self.augment = augment if augment is not None else Augmentations()

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        x = require(batch, "x_1", "ContrastiveObjective")
        if x.shape[0] < 2:
            raise ValueError(f"the contrastive loss needs at least 2 images per batch, got {x.shape[0]}")
        with torch.no_grad():  # the augmentations carry no parameters
            views = torch.cat([augment_images(x, self.augment), augment_images(x, self.augment)])  # (2N, C, H, W)
        z = model(views)  # (2N, P)
        loss, hit_rate = nt_xent(z[: x.shape[0]], z[x.shape[0] :], self.temperature)
        return LossOutput(loss=loss, logs={"loss": loss.detach(), "pair_top1": hit_rate.detach()})


# build_model({"kind": "encoder", ...}) rebuilds it once this module is imported.
register_kind("encoder", EncoderConfig, Encoder)
