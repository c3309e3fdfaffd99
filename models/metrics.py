"""Sample-quality metrics on feature vectors: Fréchet distance (FID), precision & recall, accuracy.

One module, because the intervals resample the very moments and kernels the point estimators compute.

Every metric here takes features that an extractor (models/extractors.py) already computed,
so the same code serves any feature space: the small digits classifier's penultimate layer,
a user-supplied TorchScript module, or Inception-v3 pool features (the classic FID).
Numbers are only comparable between runs that used the same extractor and the same n.

- FID (Heusel et al., 2017): fit a Gaussian to each feature set and take the Fréchet
  (2-Wasserstein) distance between the two Gaussians.
- KID (Binkowski et al., 2018): the unbiased estimate of the squared MMD between the two
  feature distributions under the cubic polynomial kernel, averaged over random subsets.
  Unlike FID it has no small-sample bias: two samples of one distribution score 0 on average.
- Precision & recall (Kynkäänniemi et al., 2019): approximate each set's manifold by the
  union of balls around its points, each with radius the distance to its k-th nearest
  neighbour; precision is the share of fake points inside the real manifold, recall the
  share of real points inside the fake manifold.

Intervals (for tables that compare several models against one reference set): ``fid_draws``
and ``kid_draws`` score every row against the reference on B paired resamples (the same
reference resample for every row in resample b), ``interval`` turns a row's draws into an
:class:`Interval`, and ``excess_ratio`` compares two rows on their excess over a floor row
(real images disjoint from the reference), with an interval from the same paired draws.

Statistics are computed in float64 on the features' device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
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
            f"{name} has {features.shape[0]} rows but this metric needs at least {min_rows}; evaluate on more samples"
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
    distance = (mu1 - mu2).square().sum() + torch.trace(sigma1) + torch.trace(sigma2) - 2 * trace_sqrt_product
    return float(distance)


@dataclass(frozen=True)
class _Moments:
    """Mean mu (D,), Tr(S), and a factor F (D, r) with F F^T = S, of one feature set."""

    mu: Tensor
    trace: Tensor
    factor: Tensor


def _reference_moments(x: Tensor) -> _Moments:
    """Moments of the reference set x (n, D), float64.

    F = A^T / sqrt(n - 1) (D, n) when n <= D (no decomposition), else the Cholesky factor of
    S = A^T A / (n - 1) (D, D), or its symmetric root when S is singular; A = x - mu.
    """
    n, d = x.shape
    mu = x.mean(dim=0)  # (D,)
    a = x - mu  # (n, D)
    trace = a.square().sum() / (n - 1)
    if n <= d:
        return _Moments(mu, trace, a.T / (n - 1) ** 0.5)  # (D, n)
    sigma = a.T @ a / (n - 1)  # (D, D)
    factor, info = torch.linalg.cholesky_ex(sigma)
    if int(info) != 0:  # not positive definite (e.g. a constant feature): use the PSD root
        factor = _psd_sqrt(sigma)
    return _Moments(mu, trace, factor)


def _fid_against(reference: _Moments, y: Tensor) -> Tensor:
    """FID between the reference moments and the feature set y (n, D), float64 scalar.

    With S_ref = F F^T and S_y = A^T A / (n - 1), A = y - mu_y centred:
    Tr (S_ref S_y)^{1/2} = sum_i sqrt(lambda_i),  lambda = eig(F^T S_y F) = eig of the
    smaller Gram matrix of G = A F / sqrt(n - 1)  (the nonzero eigenvalues of G^T G and
    G G^T agree). The cheaper of the two products is formed: F^T (A^T A) F when n > r
    (cost n D^2 + D^2 r), G^T G or G G^T otherwise (cost n D r + min(n, r)^2 max(n, r)).
    """
    n = y.shape[0]
    mu = y.mean(dim=0)  # (D,)
    a = y - mu  # (n, D)
    f = reference.factor  # (D, r)
    r = f.shape[1]
    if n > r:
        gram = f.T @ (a.T @ a) @ f / (n - 1)  # (r, r)
    else:
        g = a @ f / (n - 1) ** 0.5  # (n, r)
        gram = g @ g.T  # (n, n), n <= r
    eigenvalues = torch.linalg.eigvalsh((gram + gram.T) / 2)
    # Eigenvalues within round-off of 0 (each set's centring alone leaves one when n <= D) are
    # set to 0: the square root would turn round-off of 1e-16 into an error of 1e-8.
    noise = eigenvalues.abs().max() * gram.shape[0] * torch.finfo(torch.float64).eps
    trace_sqrt_product = torch.where(eigenvalues > noise, eigenvalues, 0.0).sqrt().sum()
    # FID = ||mu_ref - mu_y||^2 + Tr S_ref + Tr S_y - 2 Tr (S_ref S_y)^{1/2}
    return (reference.mu - mu).square().sum() + reference.trace + a.square().sum() / (n - 1) - 2 * trace_sqrt_product


def fid(features_a: Tensor, features_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D).

    FID = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})
    """
    if features_a.ndim == 2 and features_b.ndim == 2 and features_a.shape[1] != features_b.shape[1]:
        raise ValueError(
            f"feature sets have different widths: {features_a.shape[1]} vs {features_b.shape[1]}; "
            "extract both with the same extractor"
        )
    _check_features("features_a", features_a, min_rows=2)
    _check_features("features_b", features_b, min_rows=2)
    # The same number as frechet_distance(feature_stats(a), feature_stats(b)), computed through
    # a factor of S_a (see _fid_against): an eigvalsh of size min(n, D) instead of two eighs of
    # size D, which is what makes 2048-d Inception features cheap at n ~ 1k.
    return float(_fid_against(_reference_moments(features_a.to(torch.float64)), features_b.to(torch.float64)))


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


def _share_inside_manifold(queries: Tensor, centres: Tensor, radii: Tensor, batch_size: int) -> float:
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


# ---- KID ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class KID:
    """Kernel Inception Distance: mean and std of the unbiased MMD^2 over random subsets.

    ``std`` is the spread of one subset's estimate (Binkowski et al.'s convention), i.e. the
    uncertainty of a KID measured on ``subset_size`` samples, not the smaller one of the mean.
    """

    mean: float
    std: float
    subsets: int
    subset_size: int


def polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """k(x, y) = (x . y / d + 1)^3 for rows x (M, D) and y (N, D): the (M, N) kernel matrix."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def _off_diagonal_sum(kernel: Tensor) -> Tensor:
    return kernel.sum() - kernel.diagonal().sum()


def mmd2_unbiased(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD^2 between samples x (m, D) and y (n, D) with the polynomial kernel.

    MMD^2_u = 1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(n(n-1)) sum_{i != j} k(y_i, y_j)
              - 2/(m n) sum_{i, j} k(x_i, y_j)
    """
    return _within_mean(x) + _within_mean(y) - 2 * polynomial_kernel(x, y).mean()


def _within_mean(x: Tensor) -> Tensor:
    """1/(m(m-1)) sum_{i != j} k(x_i, x_j): the mean kernel value between distinct rows of x (m, D)."""
    m = x.shape[0]
    return _off_diagonal_sum(polynomial_kernel(x, x)) / (m * (m - 1))


# ---- paired draws for intervals ------------------------------------------------------------


@dataclass(frozen=True)
class Draws:
    """A statistic of one row: ``value`` on all the data and ``draws`` (B,) float64 on B paired
    resamples (FID: bootstrap resamples; KID: subsets). Rows made by one ``fid_draws`` /
    ``kid_draws`` call share the reference resample of each b, so they can be compared draw
    by draw (``excess_ratio``)."""

    value: float
    draws: Tensor


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval at ``level`` (basic bootstrap, see ``interval``).

    ``value`` is the plug-in estimate on all the data. The interval is one for the population
    statistic, built around ``corrected`` = 2 value - median(draws), the plug-in value less the
    bootstrap's (median) estimate of its bias: ``low <= corrected <= high`` always holds, while
    ``value`` itself lies outside when the bias exceeds half the interval (FID near the floor).
    ``bias`` = mean(draws) - value is the mean bias; ``std`` is the spread of the draws.
    """

    value: float
    low: float
    high: float
    std: float
    bias: float
    level: float
    draws: int
    corrected: float


def _stream_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for one named random stream, stable across processes and platforms."""
    digest = hashlib.blake2b(f"{seed}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _generator(seed: int, stream: str) -> torch.Generator:
    # CPU generators: the same indices whatever device the features are on.
    return torch.Generator().manual_seed(_stream_seed(seed, stream))


def _check_rows(reference: Tensor, rows: Mapping[str, Tensor], min_rows: int) -> None:
    _check_features("reference features", reference, min_rows)
    if not rows:
        raise ValueError("no rows to score: pass a mapping {row name: features (N, D)}")
    for name, features in rows.items():
        _check_features(f"features of row {name!r}", features, min_rows)
        if features.shape[1] != reference.shape[1]:
            raise ValueError(
                f"row {name!r} has {features.shape[1]}-d features but the reference has "
                f"{reference.shape[1]}; extract both with the same extractor"
            )


def fid_draws(reference: Tensor, rows: Mapping[str, Tensor], resamples: int = 100, seed: int = 0) -> dict[str, Draws]:
    """FID of every row against ``reference`` on all the data and on ``resamples`` paired
    bootstrap resamples.

    Resample b draws the reference's rows with replacement once (the same indices for every
    row) and each row's own rows with replacement independently. Indices come from seeded
    CPU generators: the reference's from ``seed``, each row's from ``seed`` and its name, so
    a row's draws do not depend on which other rows are scored with it.

    Cost per resample: one Cholesky of the reference covariance (when n_ref > D) plus, per
    row, about min(n, D) * D * max(n, D) multiply-adds and an eigvalsh of size min(n, D).
    """
    if resamples < 2:
        raise ValueError(f"resamples={resamples} must be at least 2 to give an interval")
    _check_rows(reference, rows, min_rows=2)
    ref = reference.to(torch.float64)
    features = {name: y.to(torch.float64) for name, y in rows.items()}
    full = _reference_moments(ref)
    values = {name: float(_fid_against(full, y)) for name, y in features.items()}

    ref_generator = _generator(seed, "fid:reference")
    row_generators = {name: _generator(seed, f"fid:row:{name}") for name in features}
    draws = {name: torch.empty(resamples, dtype=torch.float64) for name in features}
    for b in range(resamples):
        index = torch.randint(0, ref.shape[0], (ref.shape[0],), generator=ref_generator).to(ref.device)
        moments = _reference_moments(ref[index])
        for name, y in features.items():
            row_index = torch.randint(0, y.shape[0], (y.shape[0],), generator=row_generators[name]).to(y.device)
            draws[name][b] = _fid_against(moments, y[row_index]).cpu()
    return {name: Draws(value=values[name], draws=draws[name]) for name in features}


def kid_draws(
    reference: Tensor,
    rows: Mapping[str, Tensor],
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, Draws]:
    """KID of every row against ``reference``: the unbiased MMD^2 on ``subsets`` paired subsets.

    Subset s draws m = min(subset_size, n_ref, n_row) reference rows without replacement (the
    first m of one shared permutation, so rows of equal size share the reference subset) and
    m rows of the row's own features; ``value`` is the mean over subsets. Seeds as in
    ``fid_draws``. Cost per subset and row: about 2 m^2 D multiply-adds.
    """
    if subsets < 2:
        raise ValueError(f"subsets={subsets} must be at least 2 to give a spread")
    if subset_size < 2:
        raise ValueError(f"subset_size={subset_size} must be at least 2 (the estimator needs pairs)")
    _check_rows(reference, rows, min_rows=2)
    ref = reference.to(torch.float64)
    features = {name: y.to(torch.float64) for name, y in rows.items()}
    ref_generator = _generator(seed, "kid:reference")
    row_generators = {name: _generator(seed, f"kid:row:{name}") for name in features}
    draws = {name: torch.empty(subsets, dtype=torch.float64) for name in features}
    for s in range(subsets):
        permutation = torch.randperm(ref.shape[0], generator=ref_generator).to(ref.device)
        reference_term: dict[int, Tensor] = {}  # the reference's within-subset mean, per m
        for name, y in features.items():
            m = min(subset_size, ref.shape[0], y.shape[0])
            x = ref[permutation[:m]]  # (m, D)
            if m not in reference_term:
                reference_term[m] = _within_mean(x)
            y_s = y[torch.randperm(y.shape[0], generator=row_generators[name])[:m].to(y.device)]  # (m, D)
            # MMD^2_u = mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j)
            mmd2 = reference_term[m] + _within_mean(y_s) - 2 * polynomial_kernel(x, y_s).mean()
            draws[name][s] = mmd2.cpu()
    return {name: Draws(value=float(d.mean()), draws=d) for name, d in draws.items()}


def kid(real: Tensor, fake: Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> KID:
    """KID between two feature sets: mean and std of the unbiased polynomial-kernel MMD^2 over
    ``subsets`` random subsets of size min(subset_size, n_real, n_fake) (seeded by ``seed``)."""
    draws = kid_draws(real, {"fake": fake}, subsets=subsets, subset_size=subset_size, seed=seed)["fake"]
    return KID(
        mean=draws.value,
        std=float(draws.draws.std()),
        subsets=subsets,
        subset_size=min(subset_size, real.shape[0], fake.shape[0]),
    )


def interval(draws: Draws, level: float = 0.95) -> Interval:
    """The basic (reverse-percentile) bootstrap interval of a statistic from its draws.

    [low, high] = [2 v - q_{(1+level)/2}, 2 v - q_{(1-level)/2}]  (Davison & Hinkley 1997, eq. 5.6)

    with v the value on all the data and q the quantiles of the draws. It reflects the draws
    around v, so it removes the bias the resampling measures: FID's plug-in estimate is biased
    upwards by O(D / n) (two samples of one Gaussian score well above 0), its bootstrap draws
    by about as much again, and this interval is one for the population FID (which may be
    negative at the low end for distributions near the floor). The point it is built around
    is the reflected median, ``corrected`` = 2 v - q_{1/2}, which lies inside it for any draws;
    v lies outside when every draw is far above it. Draws that average to the value (KID
    subsets) give the plain symmetric spread.
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1), e.g. 0.95")
    d = draws.draws.to(torch.float64)
    if d.ndim != 1 or d.shape[0] < 2:
        raise ValueError(f"an interval needs at least 2 draws, got shape {tuple(d.shape)}")
    q = torch.quantile(d, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    v = draws.value
    return Interval(
        value=v,
        low=float(2 * v - q[1]),
        high=float(2 * v - q[0]),
        std=float(d.std()),
        bias=float(d.mean() - v),
        level=level,
        draws=d.shape[0],
        corrected=float(2 * v - torch.quantile(d, 0.5)),
    )


def fid_interval(real: Tensor, fake: Tensor, resamples: int = 100, level: float = 0.95, seed: int = 0) -> Interval:
    """FID between two feature sets with a ``level`` bootstrap interval (see ``fid_draws``, ``interval``)."""
    return interval(fid_draws(real, {"fake": fake}, resamples=resamples, seed=seed)["fake"], level)


def accuracy_draws(correct: Tensor, resamples: int = 100, seed: int = 0) -> Draws:
    """Class accuracy (the share of True in ``correct`` (N,)) on all rows and on ``resamples``
    bootstrap resamples of the rows (seeded CPU indices), for :func:`interval`."""
    if resamples < 2:
        raise ValueError(f"resamples={resamples} must be at least 2 to give an interval")
    if correct.ndim != 1 or correct.shape[0] == 0:
        raise ValueError(f"accuracy_draws needs a non-empty (N,) vector of hits, got shape {tuple(correct.shape)}")
    hits = correct.to(torch.float64).cpu()
    index = torch.randint(0, hits.shape[0], (resamples, hits.shape[0]), generator=_generator(seed, "accuracy"))
    return Draws(value=float(hits.mean()), draws=hits[index].mean(dim=1))


def excess_ratio(row: Draws, baseline: Draws, floor: Draws, level: float = 0.95) -> Interval:
    """How far ``row`` is above the floor, as a multiple of how far ``baseline`` is above it.

    ratio = (row - floor) / (baseline - floor)

    Both excesses subtract the same floor (e.g. real images disjoint from the reference,
    scored against it), so the metric's small-sample bias and the reference's own
    sampling noise largely cancel. The interval is the basic bootstrap interval of the
    per-draw ratios, which pair row, baseline and floor on the same reference resample;
    all three must come from one ``fid_draws`` / ``kid_draws`` call.
    """
    if not (row.draws.shape == baseline.draws.shape == floor.draws.shape):
        raise ValueError(
            f"row, baseline and floor have {row.draws.shape}, {baseline.draws.shape} and {floor.draws.shape} "
            "draws; score them in one fid_draws / kid_draws call so their draws are paired"
        )
    denominator = baseline.value - floor.value
    if not denominator > 0:
        raise ValueError(
            f"the baseline ({baseline.value:.6g}) is not above the floor ({floor.value:.6g}), so the "
            "ratio of excesses is undefined; the baseline cannot be told apart from real data"
        )
    ratio = (row.value - floor.value) / denominator
    per_draw = (row.draws - floor.draws) / (baseline.draws - floor.draws)  # (B,)
    return interval(Draws(value=ratio, draws=per_draw), level)
