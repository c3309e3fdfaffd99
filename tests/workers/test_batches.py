"""Batch adapters: what the objectives see of a stored table's rows."""

from __future__ import annotations

import torch

from infra.cards import LatentsCard
from workers.batches import LatentBatch, PixelBatch


def card(draw: str) -> LatentsCard:
    return LatentsCard(
        latent_shape=(2, 2, 2),
        num_classes=3,
        latent_scale=2.0,
        vae_ref="vae/x",
        n_latents=4,
        n_train=4,
        n_test=0,
        dtype="float32",
        draw=draw,
    )


def test_latents_train_on_the_posterior_mean_unless_the_card_asks_for_samples():
    rows = {"mean": torch.ones(4, 2, 2, 2), "logvar": torch.zeros(4, 2, 2, 2), "label": torch.tensor([0, 1, -1, 2])}
    batch = LatentBatch.of(card("mean"))(rows)
    torch.testing.assert_close(batch["x_1"], torch.full((4, 2, 2, 2), 2.0))  # scale * mean, exactly
    assert batch["y"].tolist() == [0, 1, 3, 2]  # unlabelled rows train the null class
    torch.manual_seed(0)
    sampled = LatentBatch.of(card("sample"))(rows)["x_1"]
    assert 0.5 < float((sampled - 2.0).std()) / 2.0 < 1.5  # scale * (mean + 1 * eps)


def test_pixels_become_images_in_minus_one_to_one():
    batch = PixelBatch()({"pixels": torch.tensor([[[[0, 255]]]], dtype=torch.uint8), "label": torch.tensor([4])})
    assert batch["x_1"].flatten().tolist() == [-1.0, 1.0] and batch["y"].tolist() == [4]
