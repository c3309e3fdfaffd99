"""What every generated sample is scored beside: the real test split, the floor and the VAE ceiling.

Shared by the evaluate and probe stages (a stage never imports another):

    floor     the first ``n`` real train images scored against the test split: what a perfect
              sampler of the data would score at this n (FID's small-sample bias)
    ceiling   the same train images encoded and decoded with the VAE's mean: the best a
              generator of this VAE's latents can hope for

and the fixed noise and labels of generated images: image ``i`` asks for class ``i mod K``
and its noise comes from the seed ``(chunk seed, i)``, the chunk seeds derived from a stage's
seed with the fixed chunk size :data:`GEN_CHUNK`, so the same seed draws the same images
whatever the number of tasks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from infra.cards import ImagesCard
from infra.store import Store
from workers.data import read_split
from workers.evaluation.grids import make_grid
from workers.evaluation.scoring import ExtractorSource, Scored, Scorer
from workers.pixels import tensor_to_uint8, to_model_range
from workers.vae_kinds import load_vae

GEN_CHUNK = 250  # images per forward pass; fixed, because the chunk seeds depend on it
MAX_REAL = 10_000  # real images per split that the features are computed on


@dataclass(frozen=True)
class ReferenceResult:
    test: Scored
    train: Scored
    recon: Scored
    recon_seconds: float
    grids: dict[str, bytes]


def chunk_seed(seed: int, chunk: int) -> int:
    """Distinct per chunk, so (chunk seed, row) -> row_seed never repeats a draw within a cell."""
    return int(seed) * 100_003 + int(chunk)


def requested_labels(n: int, num_classes: int) -> np.ndarray:
    """Class i mod K for image i (K = 0: every image unconditional, labelled K)."""
    return np.arange(n) % num_classes if num_classes > 0 else np.full(n, num_classes)


@torch.no_grad()
def reconstruct(vae: nn.Module, pixels: np.ndarray, device: torch.device, batch: int = 256) -> np.ndarray:
    """x_hat = decode(mean of q(z | x)) for uint8 (N, H, W, C) images -> uint8 (N, H, W, C)."""
    out = []
    for start in range(0, len(pixels), batch):
        x = torch.from_numpy(to_model_range(pixels[start : start + batch])).to(device)  # (B, C, H, W)
        out.append(tensor_to_uint8(vae.decode(vae.encode(x).mean)))
    return np.concatenate(out)


def evaluate_references(
    store: Store,
    images_ref: str,
    vae_ref: str,
    n: int,
    source: ExtractorSource,
    features_ref: str | None,
    device: str = "cpu",
) -> ReferenceResult:
    """Real test images (the target), the first ``n`` train images (the floor) and their VAE reconstructions."""
    images = store.get_ref(images_ref)
    num_classes = ImagesCard.from_manifest(images).num_classes
    test = read_split(store, images, "test", MAX_REAL)
    train = read_split(store, images, "train", min(n, MAX_REAL))
    vae = load_vae(store, store.get_ref(vae_ref)).to(device)
    started = time.perf_counter()
    recon = reconstruct(vae, train.pixels, torch.device(device))
    recon_seconds = time.perf_counter() - started
    scorer = Scorer.load(store, source, features_ref, device)
    return ReferenceResult(
        test=scorer.score(test.pixels, test.labels),
        train=scorer.score(train.pixels, train.labels),
        recon=scorer.score(recon, train.labels),
        recon_seconds=recon_seconds,
        grids={
            "grids/real-test.png": make_grid(test.pixels, test.labels, num_classes),
            "grids/vae-recon.png": make_grid(recon, train.labels, num_classes),
        },
    )
