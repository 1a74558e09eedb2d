"""Fit the (L0, L1) upper envelope L <= L0 + L1*g to measured points (g_i, L_i).

g is the gradient norm ||∇f(x)|| and L the local smoothness (||∇²f(x)|| or its finite-difference
estimate) at the same parameters. The (L0, L1) condition is an upper bound (Zhang et al. 2020,
Definition 1), so the fit is an upper envelope, not a least-squares line: linear quantile regression
at a high quantile tau with L0, L1 >= 0 (theory.md §3), solved exactly as a linear program.

numpy and scipy (imported by the solver, when a fit needs it) only: no torch, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MIN_POINTS",
    "EnvelopeFit",
    "FitError",
    "correlation_after_step",
    "fit_envelope",
    "quantile_envelope",
]

MIN_POINTS = 3

# Coefficients below this, in the units where max g = max L = 1, are solver round-off: set to 0.
_SNAP_TO_ZERO = 1e-12
# Relative tolerance of "on or below the envelope" in share_below.
_BELOW_RTOL = 1e-9


class FitError(ValueError):
    """Data cannot be fitted (too few usable points, ...). Message is one user-readable line."""


@dataclass(frozen=True)
class EnvelopeFit:
    """An (L0, L1) upper envelope of points (g_i, L_i) and statistics about the points.

    L0 has the units of L (1/step-length units of the parameters), L1 those of L/g.
    """

    L0: float  # intercept of the envelope, >= 0
    L1: float  # slope of the envelope, >= 0
    quantile: float  # the quantile tau of the fit
    num_points: int  # points used (finite, g > 0, L > 0)
    num_dropped: int  # rows dropped as non-finite or non-positive
    share_below: float  # share of used points with L_i <= L0 + L1*g_i (+ tiny tolerance)
    spearman_log: float  # Spearman correlation of log L with log g (NaN if undefined)
    pearson_log: float  # Pearson correlation of log L with log g (NaN if undefined)
    L_max: float  # largest smoothness among used points
    G_max: float  # largest gradient norm among used points
    L0_interval: tuple[float, float] | None  # bootstrap percentile interval; None if no bootstrap
    L1_interval: tuple[float, float] | None
    confidence: float  # confidence level of the intervals, e.g. 0.9
    G_min: float = math.nan  # smallest gradient norm among used points


def quantile_envelope(
    grad_norm: np.ndarray,
    smoothness: np.ndarray,
    quantile: float,
    *,
    weights: np.ndarray | None = None,
) -> tuple[float, float]:
    """(L0, L1) minimizing sum_i w_i·rho_tau(L_i - L0 - L1·g_i) subject to L0, L1 >= 0.

    rho_tau(u) = u·(tau - 1[u < 0]) is the check loss of quantile regression. The points must be
    finite with g >= 0 and L >= 0 (fit_envelope cleans them); `weights` are non-negative
    multiplicities (default 1). The LP is solved in units where max g = max L = 1 and unscaled.
    With a single distinct g the slope is not identifiable and L1 = 0 is returned.
    Raises FitError when the solver fails or the unscaled values overflow.
    """
    import scipy.sparse  # here, not at the top: reading a file or --help need not load scipy
    from scipy.optimize import linprog

    g = np.asarray(grad_norm, dtype=np.float64)
    L = np.asarray(smoothness, dtype=np.float64)
    n = g.size
    if g.shape != (n,) or L.shape != (n,) or n == 0:
        raise FitError("need two 1-D arrays of the same positive length")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    g_scale = float(np.max(g))
    L_scale = float(np.max(L))
    if not (math.isfinite(g_scale) and math.isfinite(L_scale)) or L_scale <= 0:
        raise FitError("need finite points with some positive smoothness")
    g_s = g / g_scale if g_scale > 0 else np.zeros(n)
    L_s = L / L_scale
    slope_free = bool(np.ptp(g_s) > 0)

    # Variables: [a0, a1, u_plus (n), u_minus (n)], all >= 0; a0 + a1*g_i + u+_i - u-_i = L_i.
    cost = np.concatenate(([0.0, 0.0], quantile * w, (1.0 - quantile) * w))
    eye = scipy.sparse.identity(n, format="csr")
    a_eq = scipy.sparse.hstack(
        [scipy.sparse.csr_matrix(np.column_stack((np.ones(n), g_s))), eye, -eye], format="csr"
    )
    bounds = [(0.0, None), (0.0, None if slope_free else 0.0)] + [(0.0, None)] * (2 * n)
    result = linprog(cost, A_eq=a_eq, b_eq=L_s, bounds=bounds, method="highs")
    if result.status != 0 or result.x is None:
        raise FitError(f"the envelope linear program failed: {result.message}")
    a0, a1 = (float(v) if v > _SNAP_TO_ZERO else 0.0 for v in result.x[:2])
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        L0 = a0 * L_scale
        L1 = a1 * (L_scale / g_scale) if a1 > 0 else 0.0
    if not (math.isfinite(L0) and math.isfinite(L1)):
        raise FitError("the points span too many orders of magnitude to fit in float64")
    return L0, L1


def fit_envelope(
    grad_norm,
    smoothness,
    *,
    quantile: float = 0.95,
    num_bootstrap: int = 200,
    confidence: float = 0.9,
    seed: int = 0,
) -> EnvelopeFit:
    """Fit L <= L0 + L1*g as the `quantile` upper envelope of the points, with statistics.

    Rows with a non-finite or non-positive g or L are dropped (counted in num_dropped). The
    intervals are bootstrap percentile intervals at level `confidence` over `num_bootstrap`
    resamples of the points with replacement, drawn from numpy's Generator(seed): the same seed
    gives the same intervals. Raises FitError on unusable data, ValueError on bad options.
    """
    quantile = _open_unit_interval(quantile, "quantile")
    confidence = _open_unit_interval(confidence, "confidence")
    if isinstance(num_bootstrap, bool) or not isinstance(num_bootstrap, (int, np.integer)):
        raise ValueError(f"num_bootstrap must be an integer, got {num_bootstrap!r}")
    if num_bootstrap < 0:
        raise ValueError(f"num_bootstrap must be >= 0, got {num_bootstrap}")

    g_all = _as_float_array(grad_norm, "gradient norms")
    L_all = _as_float_array(smoothness, "smoothness values")
    if g_all.shape != L_all.shape:
        raise FitError(
            f"gradient norms and smoothness values differ in length: {g_all.size} != {L_all.size}"
        )
    with np.errstate(invalid="ignore"):
        usable = np.isfinite(g_all) & np.isfinite(L_all) & (g_all > 0) & (L_all > 0)
    g, L = g_all[usable], L_all[usable]
    n = int(g.size)
    if n < MIN_POINTS:
        raise FitError(
            f"need at least {MIN_POINTS} points with finite positive gradient norm "
            f"and smoothness, got {n}; probe more steps: `smoothprof run MODEL.py --num-probes 30`"
            " (or a smaller --probe-every)"
        )

    L0, L1 = quantile_envelope(g, L, quantile)
    with np.errstate(over="ignore", invalid="ignore"):
        envelope = L0 + L1 * g
        share_below = float(np.mean(envelope * (1.0 + _BELOW_RTOL) >= L))
    log_g, log_L = np.log(g), np.log(L)

    L0_interval = L1_interval = None
    if num_bootstrap > 0:
        L0_interval, L1_interval = _bootstrap_intervals(
            g, L, quantile, num_bootstrap, confidence, seed
        )

    return EnvelopeFit(
        L0=L0,
        L1=L1,
        quantile=quantile,
        num_points=n,
        num_dropped=int(g_all.size - n),
        share_below=share_below,
        spearman_log=_pearson(_average_ranks(log_g), _average_ranks(log_L)),
        pearson_log=_pearson(log_g, log_L),
        L_max=float(np.max(L)),
        G_max=float(np.max(g)),
        L0_interval=L0_interval,
        L1_interval=L1_interval,
        confidence=confidence,
        G_min=float(np.min(g)),
    )


def correlation_after_step(
    grad_norm,
    smoothness,
    steps,
    *,
    threshold: float = 0.5,
    max_share: float = 1 / 3,
    min_points: int = 10,
) -> tuple[int, float] | None:
    """The first probe step s such that the points at steps >= s have a Spearman correlation of
    log L with log g above ``threshold``, and that correlation; None when none does.

    Only the steps of the first ``max_share`` of the usable points are tried, and at least
    ``min_points`` points must remain: this finds a correlation hidden by the first steps of a
    run (where the gradient norm often falls while the smoothness rises), not a subset chosen to
    correlate.

    >>> g = [0.5, 0.4, 0.3, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    >>> L = [1.0, 1.5, 2.0, 2.5, 2.6, 2.7, 2.8, 2.9, 3.0, 3.1, 3.2, 3.3]
    >>> step, rho = correlation_after_step(g, L, range(0, 120, 10), min_points=8)
    >>> step, round(rho, 2)
    (10, 0.91)
    """
    g = _as_float_array(grad_norm, "gradient norms")
    L = _as_float_array(smoothness, "smoothness values")
    t = _as_float_array(steps, "steps")
    if not g.shape == L.shape == t.shape:
        raise FitError("gradient norms, smoothness values and steps differ in length")
    with np.errstate(invalid="ignore"):
        usable = np.isfinite(g) & np.isfinite(L) & np.isfinite(t) & (g > 0) & (L > 0)
    g, L, t = g[usable], L[usable], t[usable]
    log_g, log_L = np.log(g), np.log(L)
    candidates = np.unique(t)
    candidates = candidates[candidates <= np.quantile(t, max_share)] if t.size else candidates
    for step in candidates[1:]:
        later = t >= step
        if int(np.sum(later)) < min_points:
            break
        rho = _pearson(_average_ranks(log_g[later]), _average_ranks(log_L[later]))
        if rho > threshold:
            return int(step), rho
    return None


def _open_unit_interval(value, name: str) -> float:
    """value as a float strictly between 0 and 1, or ValueError."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not 0.0 < number < 1.0:
        raise ValueError(f"{name} must be strictly between 0 and 1, got {value!r}")
    return number


def _as_float_array(values, what: str) -> np.ndarray:
    """values as a 1-D float64 array, or FitError."""
    if np.iscomplexobj(values):
        raise FitError(f"{what} are complex numbers; smoothness data are real")
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise FitError(f"{what} are not an array of numbers ({error})") from None
    if array.ndim != 1:
        raise FitError(f"{what} must be a 1-D array, got {array.ndim} dimensions")
    return array


def _bootstrap_intervals(
    g: np.ndarray, L: np.ndarray, quantile: float, num_bootstrap: int, confidence: float, seed
) -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
    """Percentile intervals of (L0, L1) over resamples with replacement.

    A resample is solved as one LP over its distinct points weighted by multiplicity, which is
    the same objective as the resample itself and about a third smaller.
    """
    try:
        rng = np.random.Generator(np.random.PCG64(seed))
    except (TypeError, ValueError) as error:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r} ({error})") from None
    n = g.size
    estimates = []
    for indices in rng.integers(0, n, size=(num_bootstrap, n)):
        counts = np.bincount(indices, minlength=n)
        drawn = counts > 0
        try:
            estimates.append(quantile_envelope(g[drawn], L[drawn], quantile, weights=counts[drawn]))
        except FitError:
            continue
    if not estimates:
        return None, None
    values = np.asarray(estimates)
    tail = 50.0 * (1.0 - confidence)
    low, high = np.percentile(values, [tail, 100.0 - tail], axis=0)
    return (float(low[0]), float(high[0])), (float(low[1]), float(high[1]))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of x, ties sharing their average rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    return average_rank[inverse.reshape(-1)]


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of x and y; NaN when either is constant or the value is not finite."""
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        dx, dy = x - np.mean(x), y - np.mean(y)
        # Normalize first so that the sums of squares cannot overflow.
        sx, sy = np.max(np.abs(dx)), np.max(np.abs(dy))
        if not (sx > 0 and sy > 0 and np.isfinite(sx) and np.isfinite(sy)):
            return math.nan
        dx, dy = dx / sx, dy / sy
        r = float(np.sum(dx * dy) / math.sqrt(float(np.sum(dx * dx)) * float(np.sum(dy * dy))))
    return min(1.0, max(-1.0, r)) if math.isfinite(r) else math.nan
