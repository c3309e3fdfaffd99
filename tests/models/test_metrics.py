"""Metrics against closed forms: Fréchet distance of Gaussians, k-NN precision/recall, accuracy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.metrics import (
    Gaussian,
    PrecisionRecall,
    class_accuracy,
    feature_stats,
    fid,
    frechet_distance,
    precision_recall,
)


def random_orthogonal(d: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return q


def diagonal_closed_form(mu1, a, mu2, b) -> float:
    """d^2 between N(mu1, diag a) and N(mu2, diag b) = ||mu1 - mu2||^2 + sum (sqrt a - sqrt b)^2."""
    return float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())


# ---- feature_stats ----------------------------------------------------------------------


def test_feature_stats_is_float64_mean_and_unbiased_covariance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, generator=g)  # float32 in
    stats = feature_stats(x)
    assert isinstance(stats, Gaussian)
    assert stats.mu.dtype == stats.sigma.dtype == torch.float64
    reference = np.cov(x.double().numpy(), rowvar=False)  # unbiased, independent of our code
    np.testing.assert_allclose(stats.sigma.numpy(), reference, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.mu.numpy(), x.double().numpy().mean(0), rtol=1e-12)


@pytest.mark.parametrize("bad", [torch.zeros(1, 4), torch.zeros(10), torch.full((5, 2), math.nan)])
def test_feature_stats_rejects_unusable_features(bad):
    with pytest.raises(ValueError):
        feature_stats(bad)


# ---- frechet_distance on exact (mu, sigma) --------------------------------------------------


def test_frechet_distance_of_diagonal_gaussians_matches_closed_form():
    g = torch.Generator().manual_seed(1)
    mu1, mu2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    a = torch.rand(6, generator=g, dtype=torch.float64) * 3 + 0.1
    b = torch.rand(6, generator=g, dtype=torch.float64) * 3 + 0.1
    got = frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))
    assert got == pytest.approx(diagonal_closed_form(mu1, a, mu2, b), abs=1e-8)


def test_frechet_distance_is_rotation_invariant_for_dense_covariances():
    # Rotating both Gaussians by one orthogonal Q gives dense, non-commuting-looking inputs
    # whose distance must still equal the diagonal closed form.
    g = torch.Generator().manual_seed(2)
    d = 8
    q = random_orthogonal(d, g)
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    a = torch.rand(d, generator=g, dtype=torch.float64) * 2 + 0.05
    b = torch.rand(d, generator=g, dtype=torch.float64) * 2 + 0.05
    got = frechet_distance(q @ mu1, q @ torch.diag(a) @ q.T, q @ mu2, q @ torch.diag(b) @ q.T)
    assert got == pytest.approx(diagonal_closed_form(mu1, a, mu2, b), abs=1e-8)


def test_frechet_distance_of_non_commuting_covariances_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(3)
    d = 5
    m1 = torch.randn(d, d, generator=g, dtype=torch.float64)
    m2 = torch.randn(d, d, generator=g, dtype=torch.float64)
    s1, s2 = m1 @ m1.T + 0.1 * torch.eye(d), m2 @ m2.T  # s2 may be near-singular
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    root = linalg.sqrtm(s1.numpy() @ s2.numpy())
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1.numpy()) + np.trace(s2.numpy()) - 2 * np.trace(root).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-8)


def test_frechet_distance_is_symmetric_and_zero_on_equal_gaussians():
    g = torch.Generator().manual_seed(4)
    m = torch.randn(7, 7, generator=g, dtype=torch.float64)
    s1, s2 = m @ m.T, torch.eye(7, dtype=torch.float64) * 2
    mu = torch.randn(7, generator=g, dtype=torch.float64)
    assert frechet_distance(mu, s1, mu, s1) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(mu, s1, -mu, s2) == pytest.approx(frechet_distance(-mu, s2, mu, s1), abs=1e-8)


def test_frechet_distance_of_singular_covariances_is_finite_and_correct():
    # Rank-deficient covariances (fewer samples than dimensions) are the usual FID case.
    a = torch.tensor([1.0, 4.0, 0.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 1.0, 9.0, 0.0], dtype=torch.float64)
    mu = torch.zeros(4, dtype=torch.float64)
    got = frechet_distance(mu, torch.diag(a), mu, torch.diag(b))
    assert got == pytest.approx(diagonal_closed_form(mu, a, mu, b), abs=1e-8)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="mu"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))


# ---- fid on samples ---------------------------------------------------------------------------


def test_fid_of_a_set_against_itself_is_zero():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(500, 16, generator=g) * 3 + 1
    scale = float(feature_stats(x).sigma.trace())
    assert abs(fid(x, x)) < 1e-6 * scale


def test_fid_of_a_mean_shifted_copy_is_the_squared_shift():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(400, 8, generator=g, dtype=torch.float64)
    shift = torch.randn(8, generator=g, dtype=torch.float64)
    assert fid(x, x + shift) == pytest.approx(float(shift.square().sum()), rel=1e-8)


def test_fid_of_independent_gaussian_samples_matches_closed_form():
    g = torch.Generator().manual_seed(7)
    n, d = 20_000, 4
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    a = torch.tensor([1.0, 2.0, 0.5, 4.0], dtype=torch.float64)
    b = torch.tensor([1.0, 0.5, 2.0, 1.0], dtype=torch.float64)
    x = mu1 + a.sqrt() * torch.randn(n, d, generator=g, dtype=torch.float64)
    y = mu2 + b.sqrt() * torch.randn(n, d, generator=g, dtype=torch.float64)
    expected = diagonal_closed_form(mu1, a, mu2, b)  # = 7.25
    # sampling error of the mean/covariance estimates at n = 20k is ~1e-2 here
    assert fid(x, y) == pytest.approx(expected, abs=0.1)


def test_fid_rejects_feature_sets_of_different_widths():
    with pytest.raises(ValueError, match="same extractor"):
        fid(torch.randn(10, 3), torch.randn(10, 4))


# ---- precision & recall -----------------------------------------------------------------------


def brute_force_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Independent loop-by-loop reference of Kynkäänniemi et al.'s definition."""

    def radii(points):
        out = []
        for i, p in enumerate(points):
            dist = sorted(np.linalg.norm(p - q) for j, q in enumerate(points) if j != i)
            out.append(dist[k - 1])
        return out

    def share_inside(queries, centres, r):
        return float(np.mean([any(np.linalg.norm(q - c) <= rc for c, rc in zip(centres, r)) for q in queries]))

    return share_inside(fake, real, radii(real)), share_inside(real, fake, radii(fake))


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_matches_brute_force_reference(k):
    g = torch.Generator().manual_seed(8)
    real = torch.randn(60, 3, generator=g, dtype=torch.float64)
    fake = torch.randn(45, 3, generator=g, dtype=torch.float64) * 1.5 + 0.5
    got = precision_recall(real, fake, k=k, batch_size=7)  # several uneven batches
    precision, recall = brute_force_precision_recall(real.numpy(), fake.numpy(), k)
    assert isinstance(got, PrecisionRecall)
    assert got.precision == pytest.approx(precision, abs=1e-12)
    assert got.recall == pytest.approx(recall, abs=1e-12)


def test_precision_recall_of_identical_distributions_are_both_high():
    g = torch.Generator().manual_seed(9)
    real = torch.randn(2000, 4, generator=g)
    fake = torch.randn(2000, 4, generator=g)
    pr = precision_recall(real, fake, k=3)
    assert pr.precision > 0.8 and pr.recall > 0.8, pr


def test_precision_recall_of_a_mode_collapsed_fake_is_high_precision_low_recall():
    g = torch.Generator().manual_seed(10)
    centre = torch.tensor([8.0, 0.0, 0.0, 0.0])
    signs = torch.where(torch.rand(2000, 1, generator=g) < 0.5, -1.0, 1.0)
    real = signs * centre + torch.randn(2000, 4, generator=g)  # two modes at +-centre
    fake = centre + torch.randn(1000, 4, generator=g)  # only the + mode
    pr = precision_recall(real, fake, k=3)
    assert pr.precision > 0.8, pr
    assert pr.recall < 0.55, pr


def test_precision_recall_of_a_far_away_fake_are_both_zero():
    g = torch.Generator().manual_seed(11)
    real = torch.randn(500, 4, generator=g)
    fake = torch.randn(500, 4, generator=g) + 100.0
    pr = precision_recall(real, fake, k=3)
    assert pr.precision < 0.01 and pr.recall < 0.01, pr


def test_precision_recall_rejects_too_few_points_and_bad_k():
    with pytest.raises(ValueError, match="at least 4"):
        precision_recall(torch.randn(3, 2), torch.randn(10, 2), k=3)
    with pytest.raises(ValueError, match="k="):
        precision_recall(torch.randn(10, 2), torch.randn(10, 2), k=0)


# ---- class accuracy ---------------------------------------------------------------------------


def test_class_accuracy_counts_argmax_hits():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.1, 3.0], [1.0, 5.0, 0.0], [0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 2, 0, 1])
    assert class_accuracy(logits, labels) == pytest.approx(0.5)


def test_class_accuracy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="labels"):
        class_accuracy(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))
