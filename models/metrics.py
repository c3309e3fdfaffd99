"""Sample-quality metrics on feature vectors: Fréchet distance (FID), precision & recall, accuracy.

Every metric here takes features that an extractor (models/extractors.py) already computed,
so the same code serves any feature space: the small digits classifier's penultimate layer,
a user-supplied TorchScript module, or Inception-v3 pool features (the classic FID).
Numbers are only comparable between runs that used the same extractor and the same n.

- FID (Heusel et al., 2017): fit a Gaussian to each feature set and take the Fréchet
  (2-Wasserstein) distance between the two Gaussians.
- Precision & recall (Kynkäänniemi et al., 2019): approximate each set's manifold by the
  union of balls around its points, each with radius the distance to its k-th nearest
  neighbour; precision is the share of fake points inside the real manifold, recall the
  share of real points inside the fake manifold.

Statistics are computed in float64 on the features' device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Gaussian:
    """Mean ``mu`` (D,) and covariance ``sigma`` (D, D) of a feature set, in float64."""

    mu: Tensor
    sigma: Tensor


@dataclass(frozen=True)
class PrecisionRecall:
    """Improved precision (fidelity) and recall (coverage), each in [0, 1]."""

    precision: float
    recall: float


def _check_features(name: str, features: Tensor, min_rows: int) -> None:
    if features.ndim != 2:
        raise ValueError(
            f"{name} must be a (N, D) matrix of feature vectors, got shape {tuple(features.shape)}; "
            "flatten per-sample features with features.flatten(1)"
        )
    if features.shape[0] < min_rows:
        raise ValueError(
            f"{name} has {features.shape[0]} rows but this metric needs at least {min_rows}; "
            "evaluate on more samples"
        )
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} contains NaN or inf; check the generator and the extractor")


def feature_stats(features: Tensor) -> Gaussian:
    """Fit a Gaussian to ``features`` (N, D), N >= 2, in float64.

    mu = mean_i f_i,   sigma = 1 / (N - 1) * sum_i (f_i - mu)(f_i - mu)^T   (unbiased)
    """
    _check_features("features", features, min_rows=2)
    f = features.to(torch.float64)
    mu = f.mean(dim=0)  # (D,)
    centered = f - mu  # (N, D)
    sigma = centered.T @ centered / (f.shape[0] - 1)  # (D, D)
    return Gaussian(mu=mu, sigma=sigma)


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix.

    A = Q diag(lambda) Q^T  ->  A^{1/2} = Q diag(sqrt(max(lambda, 0))) Q^T
    (round-off can make tiny eigenvalues negative; they are clamped to 0.)
    """
    eigenvalues, q = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (q * eigenvalues.clamp(min=0).sqrt()) @ q.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})

    The trace of the non-symmetric root (S1 S2)^{1/2} is computed from a symmetric PSD
    matrix with the same eigenvalues, so no complex arithmetic is needed:

    S1 S2 = S1^{1/2} (S1^{1/2} S2 S1^{1/2}) S1^{-1/2}  (similar matrices)
    =>  Tr (S1 S2)^{1/2} = sum_i sqrt(lambda_i),  lambda_i = eig(S1^{1/2} S2 S1^{1/2}) >= 0

    Works in float64 whatever the input dtype; returns a Python float (>= 0 up to round-off).
    """
    mu1, mu2 = mu1.to(torch.float64), mu2.to(torch.float64)
    sigma1, sigma2 = sigma1.to(torch.float64), sigma2.to(torch.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            "frechet_distance needs mu (D,) and sigma (D, D) of one size D; got "
            f"mu1 {tuple(mu1.shape)}, sigma1 {tuple(sigma1.shape)}, "
            f"mu2 {tuple(mu2.shape)}, sigma2 {tuple(sigma2.shape)}"
        )
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1  # (D, D), symmetric PSD
    eigenvalues = torch.linalg.eigvalsh((middle + middle.T) / 2)
    # Tr (S1 S2)^{1/2} = sum_i sqrt(lambda_i)
    trace_sqrt_product = eigenvalues.clamp(min=0).sqrt().sum()
    # d^2 = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr (S1 S2)^{1/2}
    distance = (
        (mu1 - mu2).square().sum()
        + torch.trace(sigma1)
        + torch.trace(sigma2)
        - 2 * trace_sqrt_product
    )
    return float(distance)


def fid(features_a: Tensor, features_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D).

    FID = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})
    """
    if features_a.ndim == 2 and features_b.ndim == 2 and features_a.shape[1] != features_b.shape[1]:
        raise ValueError(
            f"feature sets have different widths: {features_a.shape[1]} vs {features_b.shape[1]}; "
            "extract both with the same extractor"
        )
    a, b = feature_stats(features_a), feature_stats(features_b)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def _kth_neighbour_radii(points: Tensor, k: int, batch_size: int) -> Tensor:
    """Distance from each point (N, D) to its k-th nearest other point, (N,).

    Each point is at distance 0 from itself, so the k-th neighbour is the (k+1)-th smallest
    distance in its row. Rows are processed in batches so memory stays at batch_size x N.
    """
    radii = []
    for start in range(0, points.shape[0], batch_size):
        distances = torch.cdist(points[start : start + batch_size], points)  # (B, N)
        radii.append(distances.topk(k + 1, dim=1, largest=False).values[:, k])  # (B,)
    return torch.cat(radii)


def _share_inside_manifold(
    queries: Tensor, centres: Tensor, radii: Tensor, batch_size: int
) -> float:
    """Share of queries (M, D) inside the union of balls B(centre_j, radius_j).

    inside(q) = exists j: ||q - c_j|| <= r_j
    """
    inside = []
    for start in range(0, queries.shape[0], batch_size):
        distances = torch.cdist(queries[start : start + batch_size], centres)  # (B, N)
        inside.append((distances <= radii.unsqueeze(0)).any(dim=1))  # (B,)
    return float(torch.cat(inside).to(torch.float64).mean())


def precision_recall(
    real_features: Tensor, fake_features: Tensor, k: int = 3, batch_size: int = 1024
) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al., 2019) with k-NN radii.

    manifold(X) = union_i B(x_i, ||x_i - NN_k(x_i, X)||)
    precision = mean_{fake f} 1[f in manifold(real)]
    recall    = mean_{real r} 1[r in manifold(fake)]

    Distances are computed in float64 in blocks of ``batch_size`` rows, so a few thousand
    points per set run on a CPU in seconds. Each set needs more than ``k`` points.
    """
    if k < 1:
        raise ValueError(f"k must be a positive neighbour count, got k={k}")
    _check_features("real_features", real_features, min_rows=k + 1)
    _check_features("fake_features", fake_features, min_rows=k + 1)
    if real_features.shape[1] != fake_features.shape[1]:
        raise ValueError(
            f"feature sets have different widths: {real_features.shape[1]} vs "
            f"{fake_features.shape[1]}; extract both with the same extractor"
        )
    real = real_features.to(torch.float64)
    fake = fake_features.to(torch.float64)
    real_radii = _kth_neighbour_radii(real, k, batch_size)  # (N_real,)
    fake_radii = _kth_neighbour_radii(fake, k, batch_size)  # (N_fake,)
    return PrecisionRecall(
        precision=_share_inside_manifold(fake, real, real_radii, batch_size),
        recall=_share_inside_manifold(real, fake, fake_radii, batch_size),
    )


def class_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Share of samples whose arg-max class equals the label.

    accuracy = mean_i 1[argmax_c logits_ic == y_i]
    """
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(
            f"class_accuracy needs logits (N, C) and labels (N,), got logits "
            f"{tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    if logits.shape[0] == 0:
        raise ValueError("class_accuracy got zero samples; evaluate on at least one")
    return float((logits.argmax(dim=1) == labels).to(torch.float64).mean())
