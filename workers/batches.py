"""Batch adapters: what a stored table's rows become before an objective sees them.

The training loop hands each batch of rows (torch tensors on the worker's device) to the
stage's adapter and the result to the objective. Adapters are small frozen dataclasses, so
they pickle into the Ray Train job and do no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from workers.pixels import tensor_to_model_range


def labels_for_training(labels: Tensor, num_classes: int) -> Tensor:
    """Unlabelled rows (-1) train the null class ``num_classes``."""
    return torch.where(labels < 0, torch.full_like(labels, num_classes), labels)


@dataclass(frozen=True)
class LatentBatch:
    """Latents rows -> {"x_1", "y"}: the posterior mean, or a sample z = mean + std * eps, times the scale.

    Which one is the latents stage's decision (its card's ``draw``): a small VAE whose posterior
    std is as large as the spread of its means would otherwise ask the generator to model as
    much i.i.d. noise as signal.
    """

    scale: float
    num_classes: int
    sample: bool = False

    def __call__(self, rows: Mapping[str, Tensor]) -> dict[str, Tensor]:
        z = rows["mean"].float()
        if self.sample:
            z = z + torch.exp(0.5 * rows["logvar"].float()) * torch.randn_like(z)
        return {"x_1": z * self.scale, "y": labels_for_training(rows["label"].long(), self.num_classes)}

    @classmethod
    def of(cls, latents) -> LatentBatch:
        """The adapter a latents card asks for (``latents``: an infra.cards.LatentsCard)."""
        return cls(latents.latent_scale, latents.num_classes, sample=latents.draw == "sample")


@dataclass(frozen=True)
class PairBatch:
    """Pairs rows -> {"x_0", "x_1", "y"}: already in the scaled latent space."""

    num_classes: int

    def __call__(self, rows: Mapping[str, Tensor]) -> dict[str, Tensor]:
        y = labels_for_training(rows["label"].long(), self.num_classes)
        return {"x_0": rows["x_0"].float(), "x_1": rows["x_1"].float(), "y": y}


@dataclass(frozen=True)
class PixelBatch:
    """Rows {"pixels": uint8 (N, C, H, W)[, "label"]} -> {"x_1": images in [-1, 1][, "y"]}."""

    def __call__(self, rows: Mapping[str, Tensor]) -> dict[str, Tensor]:
        batch = {"x_1": tensor_to_model_range(rows["pixels"])}
        if "label" in rows:
            batch["y"] = rows["label"].long()
        return batch
