"""The self-supervised encoder (models/encoder.py): network, augmentations, NT-Xent, training."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.encoder import (
    Augmentations,
    ContrastiveObjective,
    Encoder,
    EncoderConfig,
    _gray,
    _rotate_hue,
    augment_images,
    colour_jitter,
    gaussian_blur,
    nt_xent,
    random_resized_crop,
)
from models.extractors import encoder_extractor, extract_features
from models.registry import build_model, model_spec
from workers.sources.shapes import render_shapes

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]


def small(**overrides) -> Encoder:
    return Encoder(EncoderConfig(**({"width": 8, "feature_dim": 16, "projection_dim": 8} | overrides)))


# ---- the network ---------------------------------------------------------------------------


def test_encoder_shapes_and_the_head_reads_the_features():
    model = small(in_channels=1, image_size=12)
    x = torch.rand(5, 1, 12, 12) * 2 - 1
    features = model.features(x)
    assert features.shape == (5, 16)
    assert model(x).shape == (5, 8)
    torch.testing.assert_close(model.head(features), model(x))


def test_encoder_features_do_not_depend_on_the_batch():
    model = small()
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(model.features(x)[:2], model.features(x[:2]), rtol=1e-5, atol=1e-6)


def test_encoder_rejects_images_of_the_wrong_shape_and_bad_configs():
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        small()(torch.zeros(2, 3, 16, 16))
    for bad in (dict(image_size=4), dict(feature_dim=0), dict(projection_dim=-1)):
        with pytest.raises(ValueError):
            EncoderConfig(**bad)


def test_encoder_is_a_registered_kind_that_rebuilds_without_a_prior_import():
    model = small()
    spec = model_spec(model)
    assert spec == {
        "kind": "encoder",
        "config": {"in_channels": 3, "image_size": 32, "width": 8, "feature_dim": 16, "projection_dim": 8},
    }
    assert build_model(spec).config == model.config
    # A fresh interpreter that imports only the registry (as a worker loading a checkpoint does).
    code = (
        "from models.registry import build_model; "
        "print(type(build_model({'kind': 'encoder', 'config': {}})).__name__, "
        "type(build_model({'kind': 'classifier', 'config': {}})).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["Encoder", "Classifier"]


# ---- augmentations ---------------------------------------------------------------------------


def test_a_full_crop_without_flip_is_the_identity_and_with_flip_the_mirror():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 12, 12) * 2 - 1
    same = random_resized_crop(x, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0)
    torch.testing.assert_close(same, x, rtol=0, atol=1e-5)
    mirrored = random_resized_crop(x, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=1.0)
    torch.testing.assert_close(mirrored, x.flip(-1), rtol=0, atol=1e-5)


def test_a_crop_zooms_into_part_of_the_image():
    torch.manual_seed(1)
    ramp = torch.linspace(-1, 1, 32).expand(64, 1, 32, 32).contiguous()  # value = x coordinate
    crops = random_resized_crop(ramp, scale=(0.25, 0.25), ratio=(1.0, 1.0), flip=0.0)  # w = h = 0.5
    span = crops[:, 0, 16, -1] - crops[:, 0, 16, 0]  # (N,): the crop's width in input units
    full_span = ramp[0, 0, 16, -1] - ramp[0, 0, 16, 0]
    torch.testing.assert_close(span, torch.full_like(span, 0.5 * float(full_span)), rtol=0, atol=0.02)
    assert crops.min() >= -1 and crops.max() <= 1
    assert crops[:, 0, 16, 0].std() > 0.1  # crops land in different places


def test_colour_jitter_without_strength_is_the_identity_and_stays_in_range():
    x01 = torch.rand(6, 3, 8, 8)
    none = Augmentations(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    torch.testing.assert_close(colour_jitter(x01, none), x01, rtol=0, atol=1e-6)
    strong = colour_jitter(x01, Augmentations(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.5))
    assert strong.min() >= 0 and strong.max() <= 1 and not torch.allclose(strong, x01)
    grey = colour_jitter(torch.rand(3, 1, 8, 8), Augmentations())  # single-channel images work
    assert grey.shape == (3, 1, 8, 8)


def test_hue_rotation_keeps_luma_and_a_full_turn_is_the_identity():
    x01 = torch.rand(5, 3, 6, 6, dtype=torch.float64)
    turns = torch.tensor([0.1, -0.3, 0.25, 0.5, 0.9], dtype=torch.float64)
    rotated = _rotate_hue(x01, turns)
    torch.testing.assert_close(_gray(rotated), _gray(x01), rtol=0, atol=1e-12)
    torch.testing.assert_close(_rotate_hue(x01, torch.ones(5, dtype=torch.float64)), x01, rtol=0, atol=1e-12)
    grey = _gray(x01).expand(-1, 3, -1, -1)  # no chroma: nothing to rotate
    torch.testing.assert_close(_rotate_hue(grey, turns), grey, rtol=0, atol=1e-12)


def test_gaussian_blur_matches_scipy_per_image():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.rand(3, 2, 10, 10, dtype=torch.float64)
    sigma = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    got = gaussian_blur(x, sigma, radius=2)
    for n in range(3):
        for c in range(2):
            # radius 2 = int(truncate * sigma + 0.5); torch's "reflect" is scipy's "mirror"
            expected = ndimage.gaussian_filter(
                x[n, c].numpy(), sigma=float(sigma[n]), mode="mirror", truncate=2.0 / float(sigma[n])
            )
            np.testing.assert_allclose(got[n, c].numpy(), expected, atol=1e-12)
    flat = torch.full((2, 3, 7, 7), 0.3, dtype=torch.float64)
    torch.testing.assert_close(gaussian_blur(flat, torch.tensor([0.7, 1.9], dtype=torch.float64)), flat)


def test_augment_images_is_seeded_by_the_global_rng_and_covers_grayscale():
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    torch.manual_seed(3)
    a = augment_images(x, Augmentations(blur=0.5))
    torch.manual_seed(3)
    b = augment_images(x, Augmentations(blur=0.5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.shape == x.shape and a.min() >= -1 and a.max() <= 1
    assert not torch.allclose(a, augment_images(x, Augmentations(blur=0.5)))
    grey = augment_images(x, Augmentations(grayscale=1.0))
    torch.testing.assert_close(grey[:, 0], grey[:, 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(grey[:, 1], grey[:, 2], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "bad", [dict(crop_scale=(0.0, 1.0)), dict(crop_scale=(0.8, 0.5)), dict(flip=1.5), dict(blur=-0.1)]
)
def test_augmentations_reject_bad_settings(bad):
    with pytest.raises(ValueError):
        Augmentations(**bad)


# ---- NT-Xent -----------------------------------------------------------------------------------


def loop_nt_xent(z_a: np.ndarray, z_b: np.ndarray, tau: float) -> float:
    """SimCLR's loss written out: l(i, j) = -log exp(s_ij) / sum_{k != i} exp(s_ik), averaged over all 2N anchors."""
    z = np.concatenate([z_a, z_b])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z_a)
    total = 0.0
    for i in range(2 * n):
        pair = i + n if i < n else i - n
        s = [float(z[i] @ z[k]) / tau for k in range(2 * n)]
        total += -s[pair] + math.log(sum(math.exp(s[k]) for k in range(2 * n) if k != i))
    return total / (2 * n)


def test_nt_xent_matches_the_written_out_loss():
    g = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    loss, _ = nt_xent(z_a, z_b, temperature=0.5)
    assert float(loss) == pytest.approx(loop_nt_xent(z_a.numpy(), z_b.numpy(), 0.5), rel=1e-5)


def test_nt_xent_is_low_for_matched_views_and_counts_hits():
    z = torch.eye(4) * 3  # four orthogonal directions
    matched, hit_rate = nt_xent(z, z * 2, temperature=0.1)  # each view's pair points the same way
    shuffled, miss_rate = nt_xent(z, z.roll(1, dims=0), temperature=0.1)
    assert float(matched) < 0.01 < 5 < float(shuffled)
    assert float(hit_rate) == 1.0 and float(miss_rate) == 0.0


# ---- the objective ---------------------------------------------------------------------------


def test_contrastive_objective_trains_the_encoder():
    pixels = render_shapes(0, 256, seed=0).pixels
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, 32, 32)
    torch.manual_seed(0)
    model = small()
    objective = ContrastiveObjective()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        out = objective.loss(model, {"x_1": x[(step * 32) % 256 :][:32]})
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
    assert set(out.logs) == {"loss", "pair_top1"}
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.3, losses


def test_contrastive_objective_checks_its_input():
    with pytest.raises(KeyError, match="x_1"):
        ContrastiveObjective().loss(small(), {"y": torch.zeros(2)})
    with pytest.raises(ValueError, match="at least 2"):
        ContrastiveObjective().loss(small(), {"x_1": torch.zeros(1, 3, 32, 32)})
    with pytest.raises(ValueError, match="temperature"):
        ContrastiveObjective(temperature=0.0)


def test_encoder_extractor_returns_the_features_before_the_head():
    model = small().eval()
    images = torch.rand(7, 3, 32, 32) * 2 - 1
    extractor = encoder_extractor(model)
    assert extractor.name == "encoder"
    features = extract_features(extractor, images, batch_size=3)
    with torch.no_grad():
        torch.testing.assert_close(features, model.features(images))
