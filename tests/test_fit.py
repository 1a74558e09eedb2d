"""The (L0, L1) envelope fit: recovery of known constants, exact cases, statistics, robustness."""

import math
import time
import warnings

import numpy as np
import pytest
import scipy.stats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smoothprof.fit import MIN_POINTS, EnvelopeFit, FitError, fit_envelope, quantile_envelope


def points_under_envelope(L0, L1, *, n=500, decades=(-3.0, 3.0), on_envelope=10, seed=0):
    """g log-uniform over `decades`; L = (L0 + L1*g)*U, U ~ uniform(0.3, 1]; a few L on the line."""
    rng = np.random.default_rng(seed)
    g = 10.0 ** rng.uniform(*decades, size=n)
    L = (L0 + L1 * g) * rng.uniform(0.3, 1.0, size=n)
    L[:on_envelope] = L0 + L1 * g[:on_envelope]
    return g, L


@pytest.mark.parametrize("quantile", [0.95, 0.99])
@pytest.mark.parametrize(
    ("L0", "L1", "decades"),
    [
        (1.0, 2.0, (-3, 3)),
        (6.0, 2.0, (-2, 2)),
        (0.5, 10.0, (-4, 2)),
        (100.0, 0.1, (-2, 4)),
        (3e-6, 1e-6, (-3, 3)),
        (3e6, 2e5, (-1, 3)),
    ],
)
def test_recovers_known_constants_within_ten_percent(L0, L1, decades, quantile):
    # 2% of the points on the envelope: with only 1% there, at tau = 0.99 over six decades of g
    # the unweighted check loss leaves L0 with a spread near 9% (large-g residuals dominate).
    for seed in range(3):
        g, L = points_under_envelope(L0, L1, decades=decades, seed=seed)
        fit = fit_envelope(g, L, quantile=quantile, num_bootstrap=0)
        assert pytest.approx(L0, rel=0.1) == fit.L0
        assert pytest.approx(L1, rel=0.1) == fit.L1
        assert fit.num_points == g.size and fit.num_dropped == 0
        assert fit.L_max == L.max() and fit.G_max == g.max() and fit.G_min == g.min()


def test_recovers_cosh_constants():
    # f(x) = cosh(b x)/b^2: f'' = cosh(bx) <= 1 + b|f'|, tight at x = 0 and for large |x|.
    b = 3.0
    x = np.concatenate(([0.0], np.geomspace(1e-4, 4.0, 200), -np.geomspace(1e-4, 4.0, 200)))
    g, L = np.abs(np.sinh(b * x)) / b, np.cosh(b * x)
    fit = fit_envelope(g, L, quantile=0.99, num_bootstrap=0)
    assert fit.num_dropped == 1  # x = 0 has g = 0
    assert pytest.approx(1.0, rel=0.1) == fit.L0
    assert pytest.approx(b, rel=0.1) == fit.L1


def test_exponential_gives_L0_zero():
    # f(x) = exp(b x)/b: f'' = b f', so (L0, L1) = (0, b) exactly.
    b = 0.7
    g = np.exp(b * np.linspace(-5, 5, 50))
    fit = fit_envelope(g, b * g, num_bootstrap=0)
    assert fit.L0 == 0.0
    assert pytest.approx(b, rel=1e-9) == fit.L1
    assert fit.share_below == 1.0
    assert fit.spearman_log == pytest.approx(1.0)
    assert fit.pearson_log == pytest.approx(1.0)


def test_upper_envelope_not_least_squares():
    g, L = points_under_envelope(1.0, 2.0, on_envelope=0, seed=3)
    fit = fit_envelope(g, L, quantile=0.95, num_bootstrap=0)
    assert fit.share_below >= 0.95 - 0.01
    # The least-squares line through the same points leaves far more than 5% above it.
    slope, intercept = np.polyfit(g, L, 1)
    share_below_least_squares = np.mean(intercept + slope * g >= L)
    assert share_below_least_squares < 0.8


def test_exact_line():
    g = np.array([1.0, 2.0, 3.0, 4.0])
    for quantile in (0.5, 0.9, 0.99):
        L0, L1 = quantile_envelope(g, 2.0 + 3.0 * g, quantile)
        assert pytest.approx(2.0, rel=1e-12) == L0
        assert pytest.approx(3.0, rel=1e-12) == L1


def test_covering_line_by_hand():
    # With tau > 1 - 1/n no point may lie above the optimum, which then minimizes
    # sum_i (L0 + L1*g_i) = 3*L0 + 7*L1 over covering lines: L0 = 0, L1 = max L_i/g_i = 9/4.
    g, L = np.array([1.0, 2.0, 4.0]), np.array([2.0, 3.0, 9.0])
    assert quantile_envelope(g, L, 0.9) == pytest.approx((0.0, 2.25), rel=1e-12)


def test_single_gradient_norm_gives_quantile_of_smoothness():
    # One distinct g: the slope is not identifiable, L1 = 0 and L0 is the tau-quantile of L:
    # the smallest value with at least 95% of 1..10 at or below it is 10.
    fit = fit_envelope(np.full(10, 0.5), np.arange(1.0, 11.0), quantile=0.95, num_bootstrap=10)
    assert (pytest.approx(10.0), 0.0) == (fit.L0, fit.L1)
    assert math.isnan(fit.spearman_log) and math.isnan(fit.pearson_log)


def test_constraints_hold_when_data_slope_downward():
    g = np.arange(1.0, 21.0)
    fit = fit_envelope(g, 30.0 - g, quantile=0.9, num_bootstrap=20)
    assert fit.L1 == 0.0
    assert fit.L0 == 27.0  # the 0.9-quantile of 10..29: 18 of the 20 values are <= 27
    assert fit.L0_interval[0] >= 0.0 and fit.L1_interval == (0.0, 0.0)
    assert fit.spearman_log == pytest.approx(-1.0)


def test_scale_equivariance_across_twelve_decades():
    g, L = points_under_envelope(1.0, 2.0, n=200)
    base = fit_envelope(g, L, num_bootstrap=0)
    for g_unit, L_unit in [(1e6, 1e-6), (1e-6, 1e6), (1e-6, 1e-6)]:
        scaled = fit_envelope(g * g_unit, L * L_unit, num_bootstrap=0)
        assert pytest.approx(base.L0 * L_unit, rel=1e-6) == scaled.L0
        assert pytest.approx(base.L1 * L_unit / g_unit, rel=1e-6) == scaled.L1


def test_bootstrap_intervals_contain_estimate_and_are_deterministic():
    g, L = points_under_envelope(6.0, 2.0, n=200, decades=(-2, 2), seed=7)
    fit = fit_envelope(g, L, num_bootstrap=100, confidence=0.9, seed=11)
    assert fit.confidence == 0.9
    assert fit.L0_interval[0] <= fit.L0 <= fit.L0_interval[1]
    assert fit.L1_interval[0] <= fit.L1 <= fit.L1_interval[1]
    assert fit_envelope(g, L, num_bootstrap=100, confidence=0.9, seed=11) == fit
    other = fit_envelope(g, L, num_bootstrap=100, confidence=0.9, seed=12)
    assert (other.L0_interval, other.L1_interval) != (fit.L0_interval, fit.L1_interval)
    # A wider confidence level gives a wider interval from the same resamples.
    wide = fit_envelope(g, L, num_bootstrap=100, confidence=0.99, seed=11)
    assert wide.L0_interval[0] <= fit.L0_interval[0] and wide.L0_interval[1] >= fit.L0_interval[1]


def test_no_bootstrap_gives_no_intervals():
    g, L = points_under_envelope(1.0, 2.0, n=50)
    fit = fit_envelope(g, L, num_bootstrap=0)
    assert fit.L0_interval is None and fit.L1_interval is None


def test_bootstrap_is_fast():
    g, L = points_under_envelope(1.0, 2.0, n=500)
    start = time.perf_counter()
    fit_envelope(g, L, num_bootstrap=200)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"200 resamples of 500 points took {elapsed:.2f} s"


def test_drops_unusable_rows_and_counts_them():
    g = np.array([1.0, 2.0, np.nan, 3.0, np.inf, 0.0, -1.0, 4.0, 5.0])
    L = np.array([1.0, 2.0, 1.0, -np.inf, 2.0, 1.0, 1.0, 0.0, 5.0])
    fit = fit_envelope(g, L, num_bootstrap=0)
    assert (fit.num_points, fit.num_dropped) == (3, 6)
    assert (fit.L_max, fit.G_max, fit.G_min) == (5.0, 5.0, 1.0)


def test_too_few_points_message():
    with pytest.raises(FitError) as raised:
        fit_envelope([1.0, 2.0, np.nan], [1.0, 2.0, 3.0])
    assert str(raised.value) == (
        "need at least 3 points with finite positive gradient norm and smoothness, got 2; "
        "probe more steps: `smoothprof run MODEL.py --num-probes 30` (or a smaller --probe-every)"
    )
    assert MIN_POINTS == 3


@pytest.mark.parametrize(
    ("g", "L"),
    [
        ([1.0, 2.0, 3.0], [1.0, 2.0]),
        (np.ones((3, 2)), np.ones((3, 2))),
        (1.0, 1.0),
        (["a", "b", "c"], [1.0, 2.0, 3.0]),
    ],
)
def test_malformed_arrays_raise_fit_error(g, L):
    with pytest.raises(FitError):
        fit_envelope(g, L)


@pytest.mark.parametrize(
    "options",
    [
        {"quantile": 0.0},
        {"quantile": 1.0},
        {"quantile": float("nan")},
        {"quantile": "high"},
        {"confidence": 1.5},
        {"num_bootstrap": -1},
        {"num_bootstrap": 2.5},
        {"seed": -3},
    ],
)
def test_bad_options_raise_value_error(options):
    g, L = points_under_envelope(1.0, 2.0, n=20)
    with pytest.raises(ValueError):
        fit_envelope(g, L, **options)


def test_correlations_match_scipy_with_ties():
    rng = np.random.default_rng(5)
    g = np.round(10.0 ** rng.uniform(-1, 1, 100), 1)  # rounding makes ties
    L = np.round(g * rng.uniform(0.5, 1.5, 100) + 1.0, 1)
    fit = fit_envelope(g, L, num_bootstrap=0)
    assert fit.spearman_log == pytest.approx(scipy.stats.spearmanr(np.log(g), np.log(L))[0])
    assert fit.pearson_log == pytest.approx(scipy.stats.pearsonr(np.log(g), np.log(L))[0])


def test_constant_smoothness_gives_nan_correlation_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = fit_envelope([0.1, 1.0, 10.0, 100.0], [0.1] * 4, num_bootstrap=5)
    assert math.isnan(fit.spearman_log) and math.isnan(fit.pearson_log)
    assert (pytest.approx(0.1), 0.0) == (fit.L0, fit.L1)


def test_fit_is_frozen():
    fit = fit_envelope([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], num_bootstrap=0)
    assert isinstance(fit, EnvelopeFit)
    with pytest.raises(AttributeError):
        fit.L0 = 1.0


any_float = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0.0, exclude_min=True, allow_infinity=False),
    st.sampled_from([1.0, 2.0, 1e-300, 1e300, 5e-324, 1.7976931348623157e308]),
)


@st.composite
def float_array_pairs(draw):
    n = draw(st.integers(0, 50))
    g = draw(st.lists(any_float, min_size=n, max_size=n))
    m = n if draw(st.booleans()) or n == 0 else draw(st.integers(0, 50))
    L = draw(st.lists(any_float, min_size=m, max_size=m))
    return np.array(g, dtype=float), np.array(L, dtype=float)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(float_array_pairs(), st.sampled_from([0.5, 0.9, 0.95, 0.99]))
def test_fit_never_raises_anything_but_fit_error(arrays, quantile):
    g, L = arrays
    try:
        fit = fit_envelope(g, L, quantile=quantile, num_bootstrap=3)
    except FitError:
        return
    assert math.isfinite(fit.L0) and fit.L0 >= 0
    assert math.isfinite(fit.L1) and fit.L1 >= 0
    assert 0.0 <= fit.share_below <= 1.0
    assert fit.num_points + fit.num_dropped == g.size
    for r in (fit.spearman_log, fit.pearson_log):
        assert math.isnan(r) or -1.0 <= r <= 1.0


def test_complex_input_is_refused_not_truncated():
    with pytest.raises(FitError, match="complex"):
        fit_envelope(np.array([1 + 1j, 2, 3]), np.array([1.0, 2.0, 3.0]))
