"""KID, FID intervals and excess-over-floor ratios (models/metrics.py), against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.metrics import (
    KID,
    Draws,
    Interval,
    excess_ratio,
    feature_stats,
    fid,
    fid_draws,
    fid_interval,
    frechet_distance,
    interval,
    kid,
    kid_draws,
    mmd2_unbiased,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian(n: int, d: int, shift: float, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return shift + scale * torch.randn(n, d, generator=g, dtype=torch.float64)


# ---- KID -------------------------------------------------------------------------------------


def numpy_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Loop-by-loop U-statistic with k(a, b) = (a . b / d + 1)^3 (Binkowski et al. 2018, eq. 3)."""
    d = x.shape[1]
    k = lambda a, b: (float(a @ b) / d + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_mmd2_unbiased_matches_the_loop_formula():
    x, y = gaussian(7, 3, 0.0, 0), gaussian(9, 3, 0.5, 1, scale=2.0)
    got = float(mmd2_unbiased(x, y))
    assert got == pytest.approx(numpy_mmd2_unbiased(x.numpy(), y.numpy()), rel=1e-12, abs=1e-12)


def test_kid_with_subsets_covering_all_the_data_is_the_full_u_statistic():
    x, y = gaussian(12, 4, 0.0, 2), gaussian(10, 4, 0.3, 3)
    result = kid(x, y, subsets=3, subset_size=100)  # clamped to 10: every y row, 10 of x's rows
    assert isinstance(result, KID) and result.subset_size == 10 and result.subsets == 3
    full = kid(x[:10], y, subsets=3, subset_size=10)
    assert full.mean == pytest.approx(numpy_mmd2_unbiased(x[:10].numpy(), y.numpy()), rel=1e-10)
    assert full.std == pytest.approx(0.0, abs=1e-12)  # every subset is the whole of both sets


def test_mmd2_unbiased_is_unbiased_where_the_plug_in_estimate_is_not():
    # Two distributions on a few points, so the population MMD^2 is an exact finite sum.
    g = torch.Generator().manual_seed(4)
    p_support = torch.randn(4, 2, generator=g, dtype=torch.float64)
    q_support = torch.randn(3, 2, generator=g, dtype=torch.float64) + 0.7
    k = lambda a, b: (a @ b.T / 2 + 1) ** 3  # noqa: E731
    population = float(
        k(p_support, p_support).mean() + k(q_support, q_support).mean() - 2 * k(p_support, q_support).mean()
    )

    m, trials = 5, 4000
    x = p_support[torch.randint(0, 4, (trials, m), generator=g)]  # (T, m, 2)
    y = q_support[torch.randint(0, 3, (trials, m), generator=g)]
    unbiased = torch.stack([mmd2_unbiased(x[t], y[t]) for t in range(trials)])
    plug_in = torch.stack(
        [k(x[t], x[t]).mean() + k(y[t], y[t]).mean() - 2 * k(x[t], y[t]).mean() for t in range(trials)]
    )
    standard_error = float(unbiased.std()) / trials**0.5
    assert abs(float(unbiased.mean()) - population) < 3.5 * standard_error
    assert abs(float(plug_in.mean()) - population) > 10 * standard_error  # the O(1/m) bias KID removes


def test_kid_of_identical_distributions_is_zero_within_its_std_and_positive_otherwise():
    real, same = gaussian(600, 16, 0.0, 5), gaussian(600, 16, 0.0, 6)
    null = kid(real, same, subsets=50, subset_size=200, seed=1)
    assert abs(null.mean) < null.std
    shifted = kid(real, gaussian(600, 16, 0.4, 7), subsets=50, subset_size=200, seed=1)
    assert shifted.mean > 5 * shifted.std > 0


def test_kid_draws_are_seeded_paired_and_independent_of_the_other_rows():
    reference = gaussian(300, 8, 0.0, 8)
    rows = {"a": gaussian(250, 8, 0.2, 9), "b": gaussian(400, 8, 0.5, 10)}
    both = kid_draws(reference, rows, subsets=6, subset_size=100, seed=3)
    alone = kid_draws(reference, {"b": rows["b"]}, subsets=6, subset_size=100, seed=3)
    torch.testing.assert_close(both["b"].draws, alone["b"].draws, rtol=0, atol=0)
    again = kid_draws(reference, rows, subsets=6, subset_size=100, seed=3)
    torch.testing.assert_close(again["a"].draws, both["a"].draws, rtol=0, atol=0)
    other = kid_draws(reference, rows, subsets=6, subset_size=100, seed=4)
    assert not torch.equal(other["a"].draws, both["a"].draws)
    assert both["a"].value == pytest.approx(float(both["a"].draws.mean()))


# ---- FID through the factor route --------------------------------------------------------------


def svd_reference_fid(x: torch.Tensor, y: torch.Tensor) -> float:
    """FID with Tr (S_x S_y)^{1/2} = nuclear norm of A_x A_y^T / sqrt((n_x - 1)(n_y - 1)) (numpy SVD)."""
    a, b = (x - x.mean(0)).numpy(), (y - y.mean(0)).numpy()
    nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt((len(a) - 1) * (len(b) - 1))
    mean_term = float(((x.mean(0) - y.mean(0)) ** 2).sum())
    return mean_term + (a**2).sum() / (len(a) - 1) + (b**2).sum() / (len(b) - 1) - 2 * nuclear


@pytest.mark.parametrize("n_x, n_y", [(40, 30), (30, 200), (200, 30), (300, 250)])
def test_fid_agrees_with_an_svd_reference_on_every_route(n_x, n_y):
    # D = 48: rank-deficient and full-rank covariances on either side.
    x, y = gaussian(n_x, 48, 0.0, 11, scale=1.5), gaussian(n_y, 48, 0.2, 12)
    expected = svd_reference_fid(x, y)
    assert fid(x, y) == pytest.approx(expected, rel=1e-9)
    assert fid_draws(x, {"y": y}, resamples=2)["y"].value == pytest.approx(expected, rel=1e-9)
    sx, sy = feature_stats(x), feature_stats(y)
    assert frechet_distance(sx.mu, sx.sigma, sy.mu, sy.sigma) == pytest.approx(expected, rel=1e-6)


def test_fid_handles_a_constant_feature_in_the_reference():
    x, y = gaussian(300, 6, 0.0, 13), gaussian(300, 6, 0.1, 14)
    x[:, 2] = 1.0  # singular covariance: the Cholesky factor fails, the PSD root takes over
    assert fid(x, y) == pytest.approx(svd_reference_fid(x, y), rel=1e-9)


# ---- FID intervals -------------------------------------------------------------------------


def test_fid_draws_pair_the_reference_resample_across_rows():
    # A tiny reference and large rows: the reference resample drives each draw, so two rows'
    # draws move together; a second call with another seed does not.
    reference = gaussian(25, 4, 0.0, 15)
    rows = {"a": gaussian(3000, 4, 0.5, 16), "b": gaussian(3000, 4, 0.5, 17)}
    paired = fid_draws(reference, rows, resamples=40, seed=0)
    unpaired = fid_draws(reference, {"b": rows["b"]}, resamples=40, seed=1)["b"]
    corr = lambda u, v: float(torch.corrcoef(torch.stack([u, v]))[0, 1])  # noqa: E731
    assert corr(paired["a"].draws, paired["b"].draws) > 0.9
    assert abs(corr(paired["a"].draws, unpaired.draws)) < 0.5
    alone = fid_draws(reference, {"a": rows["a"]}, resamples=40, seed=0)["a"]
    torch.testing.assert_close(alone.draws, paired["a"].draws, rtol=0, atol=0)


def test_fid_interval_contains_the_true_fid_of_two_gaussians_in_most_seeds():
    d, n = 16, 400
    true_fid = d * 0.3**2  # N(0, I) vs N(0.3, I)
    hits, corrected_closer = 0, 0
    for seed in range(20):
        result = fid_interval(gaussian(n, d, 0.0, 100 + seed), gaussian(n, d, 0.3, 200 + seed), resamples=50, seed=seed)
        assert isinstance(result, Interval) and result.draws == 50 and result.level == 0.95
        hits += result.low <= true_fid <= result.high
        corrected_closer += abs(result.value - result.bias - true_fid) < abs(result.value - true_fid)
        assert result.bias > 0  # the plug-in FID is biased upwards, and the bootstrap sees it
    assert hits >= 16, f"the 95% interval held the true FID in {hits} of 20 seeds"
    assert corrected_closer >= 15


def test_fid_intervals_shrink_with_n():
    widths = {}
    for n in (250, 2000):
        result = fid_interval(gaussian(n, 8, 0.0, 21), gaussian(n, 8, 0.3, 22), resamples=60, seed=0)
        widths[n] = result.high - result.low
    assert widths[2000] < 0.6 * widths[250], widths  # ~ 1/sqrt(8) expected


def test_the_floor_interval_is_about_zero_while_its_plug_in_value_is_not():
    d, n = 32, 300
    floor = fid_interval(gaussian(n, d, 0.0, 23), gaussian(n, d, 0.0, 24), resamples=60, seed=0)
    assert floor.value > 5 * floor.std  # small-sample bias: the plug-in FID of equal laws is not 0
    assert floor.low <= 0 <= floor.high


def test_the_corrected_fid_lies_inside_its_interval_where_the_plug_in_value_does_not():
    """The report once showed a floor of "FID 7.43 [-9.86, 1.95]": the basic interval is for the
    population FID, built around the bias-corrected value, and the plug-in value can fall outside."""
    d, n = 32, 300
    reference, row = gaussian(n, d, 0.0, 23), gaussian(n, d, 0.0, 24)
    draws = fid_draws(reference, {"floor": row}, resamples=60, seed=0)["floor"]
    floor = interval(draws)
    assert not floor.low <= floor.value <= floor.high, floor  # the plug-in value: outside
    assert floor.low <= floor.corrected <= floor.high, floor  # the value the interval belongs to: inside
    assert floor.corrected == pytest.approx(2 * floor.value - float(np.median(draws.draws.numpy())), abs=1e-9)
    assert abs(floor.corrected) < floor.value  # the correction removes most of the small-sample bias


def test_the_corrected_value_is_inside_for_any_draws():
    generator = torch.Generator().manual_seed(3)
    for level in (0.5, 0.9, 0.95, 0.99):
        for _ in range(50):
            skewed = torch.randn(40, generator=generator, dtype=torch.float64).exp() ** 3  # heavy right tail
            value = float(torch.randn(1, generator=generator)) * 5
            result = interval(Draws(value=value, draws=skewed), level)
            assert result.low <= result.corrected <= result.high, (level, result)


# ---- intervals and ratios ----------------------------------------------------------------------


def test_interval_is_the_basic_bootstrap_interval():
    draws = torch.linspace(0.0, 10.0, 101, dtype=torch.float64) + 3.0  # quantiles 3.25 and 12.75
    result = interval(Draws(value=5.0, draws=draws), level=0.95)
    assert result.low == pytest.approx(2 * 5.0 - 12.75)
    assert result.high == pytest.approx(2 * 5.0 - 3.25)
    assert result.bias == pytest.approx(8.0 - 5.0)
    assert result.corrected == pytest.approx(2 * 5.0 - 8.0)  # the reflected median: inside [low, high]
    assert result.std == pytest.approx(float(draws.std()))
    with pytest.raises(ValueError, match="level"):
        interval(Draws(value=0.0, draws=draws), level=1.5)
    with pytest.raises(ValueError, match="at least 2 draws"):
        interval(Draws(value=0.0, draws=draws[:1]))


def test_excess_ratio_contains_the_true_ratio_in_most_seeds():
    d, n = 16, 500
    true_ratio = 0.3**2 / 0.5**2  # FID of N(0.3, I) and N(0.5, I) against N(0, I): d shift^2
    hits = 0
    for seed in range(15):
        rows = {
            "floor": gaussian(n, d, 0.0, 300 + seed),
            "row": gaussian(n, d, 0.3, 400 + seed),
            "baseline": gaussian(n, d, 0.5, 500 + seed),
        }
        draws = fid_draws(gaussian(n, d, 0.0, 600 + seed), rows, resamples=50, seed=seed)
        ratio = excess_ratio(draws["row"], draws["baseline"], draws["floor"])
        hits += ratio.low <= true_ratio <= ratio.high
        # the bare FID ratio is pulled towards 1 by the bias every row shares
        naive = draws["row"].value / draws["baseline"].value
        assert naive > ratio.value
    assert hits >= 12, f"the 95% interval held the true ratio in {hits} of 15 seeds"


def test_excess_ratio_works_on_kid_draws_and_refuses_unpaired_or_undefined_input():
    reference = gaussian(400, 8, 0.0, 30)
    rows = {"floor": gaussian(400, 8, 0.0, 31), "row": gaussian(400, 8, 0.6, 32), "baseline": gaussian(400, 8, 0.3, 33)}
    kids = kid_draws(reference, rows, subsets=30, subset_size=200, seed=0)
    ratio = excess_ratio(kids["row"], kids["baseline"], kids["floor"])
    assert 1.5 < ratio.low < ratio.value < ratio.high  # (0.6 / 0.3)^2 = 4 to first order in the shift

    with pytest.raises(ValueError, match="paired"):
        excess_ratio(kids["row"], Draws(kids["baseline"].value, kids["baseline"].draws[:5]), kids["floor"])
    with pytest.raises(ValueError, match="not above the floor"):
        excess_ratio(kids["row"], kids["floor"], kids["floor"])


def test_draw_functions_reject_bad_input():
    x = gaussian(20, 3, 0.0, 40)
    with pytest.raises(ValueError, match="resamples"):
        fid_draws(x, {"a": x}, resamples=1)
    with pytest.raises(ValueError, match="subset_size"):
        kid_draws(x, {"a": x}, subset_size=1)
    with pytest.raises(ValueError, match="same extractor"):
        fid_draws(x, {"a": gaussian(20, 4, 0.0, 41)})
    with pytest.raises(ValueError, match="no rows"):
        kid_draws(x, {})
