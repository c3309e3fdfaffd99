"""A small CNN classifier: class accuracy of generated images and the default feature space.

Inception-v3 features are meaningless for 16x16 single-channel digits, so fewstep's default
evaluation trains this classifier on the real training images and uses its penultimate
layer (``features``) for FID and precision/recall, and its logits for class accuracy of
class-conditional samples. Numbers measured with it are comparable only with each other
(same classifier weights), never with published Inception FIDs.

Input images are (N, C, H, W) in [-1, 1] (pixel space, not latents)::

    x (N, C, S, S)
    conv-conv-pool  -> (N, w, S/2, S/2)
    conv-conv-pool  -> (N, 2w, S/4, S/4)
    flatten, linear -> (N, feature_dim)     = features(x)
    linear          -> (N, num_classes)     = forward(x), the logits

Unlike the generators, the classifier is called ``model(x)``: it has no time or label input.
It trains either with :func:`train_classifier` (a self-contained loop) or through fewstep's
one training loop with :class:`ClassifierObjective` (same loss and augmentation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.objectives import Batch, LossOutput, Objective, require
from models.registry import register_kind


@dataclass(frozen=True, kw_only=True)
class ClassifierConfig:
    """Shape of the classifier. ``image_size`` must be divisible by 4 (two 2x poolings)."""

    in_channels: int = 1
    image_size: int = 16  # height == width
    num_classes: int = 10
    width: int = 32  # channels of the first stage; the second stage has 2 * width
    feature_dim: int = 64  # width of the penultimate layer, the feature space

    def __post_init__(self) -> None:
        if self.image_size % 4 or self.image_size < 4:
            raise ValueError(
                f"image_size={self.image_size} must be a positive multiple of 4 "
                "(the classifier pools twice by 2); resize the images or pick another size"
            )
        require_positive(self, ("in_channels", "num_classes", "width", "feature_dim"))


def require_positive(config: object, names: tuple[str, ...]) -> None:
    """Raise ValueError for the first field of ``config`` named in ``names`` that is below 1."""
    for name in names:
        if getattr(config, name) < 1:
            raise ValueError(f"{name}={getattr(config, name)} must be positive")


def check_images(x: Tensor, channels: int, size: int, network: str) -> None:
    """Raise ValueError unless ``x`` is a batch (N, channels, size, size), naming the ``network`` that expects it."""
    if x.ndim != 4 or x.shape[1:] != (channels, size, size):
        raise ValueError(
            f"{network} expects images (N, {channels}, {size}, {size}) in [-1, 1], got shape "
            f"{tuple(x.shape)}; resize the images or build one for this shape"
        )


def conv_stage(in_channels: int, out_channels: int) -> nn.Sequential:
    """conv-GN-SiLU, conv-GN-SiLU, 2x average pool: (N, in, S, S) -> (N, out, S/2, S/2)."""
    # GroupNorm rather than BatchNorm: features do not depend on train/eval mode or batch makeup.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.GroupNorm(8 if out_channels % 8 == 0 else 1, out_channels),
        nn.SiLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.GroupNorm(8 if out_channels % 8 == 0 else 1, out_channels),
        nn.SiLU(),
        nn.AvgPool2d(2),
    )


class Classifier(nn.Module):
    """CNN classifier whose penultimate layer is fewstep's default feature extractor."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        self.feature_dim = config.feature_dim
        w = config.width
        self.body = nn.Sequential(
            conv_stage(config.in_channels, w),
            conv_stage(w, 2 * w),
        )
        flat = 2 * w * (config.image_size // 4) ** 2
        self.embed = nn.Sequential(nn.Linear(flat, config.feature_dim), nn.SiLU())
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations: images (N, C, S, S) in [-1, 1] -> (N, feature_dim)."""
        check_images(x, self.config.in_channels, self.config.image_size, "classifier")
        h = self.body(x)  # (N, 2w, S/4, S/4)
        return self.embed(h.flatten(1))  # (N, feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits: images (N, C, S, S) in [-1, 1] -> (N, num_classes)."""
        return self.head(self.features(x))


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels in x and y, filling with -1 (black).

    x_shifted[n, :, i, j] = pad(x)[n, :, i + max_shift + dy_n, j + max_shift + dx_n]
    """
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)  # (N, C, H + 2s, W + 2s)
    # offsets drawn on the CPU generator so runs are reproducible on any device
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator).to(x.device)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]  # (N, 1, 1)
    # advanced indexing picks (N, H, W) pixels per channel: result (N, H, W, C)
    shifted = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return shifted.permute(0, 3, 1, 2)  # (N, C, H, W)


def train_classifier(
    model: Classifier,
    images: Tensor,
    labels: Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator | None = None,
    max_shift: int = 1,
) -> list[float]:
    """Train ``model`` on (images (N, C, S, S) in [-1, 1], labels (N,)) with cross-entropy.

    A plain AdamW loop with a cosine learning-rate decay, minibatches drawn with replacement
    from ``generator`` (a CPU generator) and random shifts of up to ``max_shift`` pixels as
    augmentation. Runs on ``images``' device; leaves the model in eval mode. Returns the
    loss of every step.
    """
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels; pass one label per image")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must both be positive")
    if labels.min() < 0 or labels.max() >= model.num_classes:
        raise ValueError(
            f"labels span [{int(labels.min())}, {int(labels.max())}] but the classifier has "
            f"{model.num_classes} classes; build it with num_classes covering every label"
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    model.train()
    losses = []
    for _ in range(steps):
        index = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        index = index.to(images.device)
        x = random_shift(images[index], max_shift, generator)
        loss = F.cross_entropy(model(x), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.detach())  # no host sync per step; converted once below
    model.eval()
    return torch.stack(losses).tolist()


class ClassifierObjective(Objective):
    """Cross-entropy of the classifier on batch ``"x_1"`` (images (N, C, S, S) in [-1, 1]) and
    ``"y"`` (class ids (N,), each in 0..num_classes-1; filter out unlabelled rows first),
    with the random shifts of :func:`train_classifier` as augmentation.

    L = -mean_n log softmax(f(shift(x_n)))_{y_n}

    Shifts come from torch's global RNG, which the training loop seeds and checkpoints.
    Logs the loss and the batch accuracy (detached, no host sync).
    """

    def __init__(self, max_shift: int = 1):
        if max_shift < 0:
            raise ValueError(f"max_shift={max_shift} must be >= 0 pixels")
        self.max_shift = max_shift

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        x = require(batch, "x_1", "ClassifierObjective")
        y = require(batch, "y", "ClassifierObjective")
        logits = model(random_shift(x, self.max_shift))  # (N, num_classes)
        loss = F.cross_entropy(logits.float(), y)
        accuracy = (logits.argmax(dim=1) == y).float().mean()
        return LossOutput(loss=loss, logs={"loss": loss.detach(), "accuracy": accuracy.detach()})


# build_model({"kind": "classifier", ...}) rebuilds it once this module is imported.
register_kind("classifier", ClassifierConfig, Classifier)
