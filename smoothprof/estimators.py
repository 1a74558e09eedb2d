"""Pure numerical estimators of local smoothness, on matvecs and gradient callables.

Nothing here knows about models: an eigen-solver takes a symmetric matvec ``v -> H v`` on flat
vectors, so it can be tested on a plain matrix; the finite-difference estimator takes a callable
that returns the gradient at a point along a segment.

>>> import torch
>>> H = torch.diag(torch.tensor([1.0, -5.0, 3.0], dtype=torch.float64))
>>> result = lanczos_top_eigenpair(lambda v: H @ v, torch.ones(3, dtype=torch.float64))
>>> round(result.eigenvalue, 6), result.converged
(-5.0, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]

# ``converged`` bounds by this the |cos| between a vector the solver found and any eigenvector
# whose eigenvalue is more than rtol larger in magnitude (see EigenResult). With 1, the test was a
# residual below rtol |eigenvalue|: on top eigenvalues 1e-3 apart it certified values up to
# 2.7e-3 below the top at rtol 1e-3 for 28% of random starts (114 of 400), and a warm start on
# the benchmark's MLP 5e-3 below it (0.25 still did); with 0.1, 1 of the 400, whose start had
# 0.1% of a neighbour's component along the top eigenvector. Its price: 1 to 3 more products on
# well-separated spectra, 10.0 to 13.7 per warm-started probe on the benchmark's models (4.1 to
# 6.8), 2 to 15 more for a cold start.
MISSED_OVERLAP = 0.1


@dataclass(frozen=True)
class EigenResult:
    """The eigenvalue of largest magnitude of a symmetric operator, as an eigen-solver found it.

    ``residual`` is ||H u - eigenvalue * u|| for the unit vector ``u = eigenvector``: some
    eigenvalue of H lies within ``residual`` of ``eigenvalue``, not necessarily the largest.
    ``converged`` means more: ``value`` is within ``rtol`` (relative) of the largest |eigenvalue|
    of H, unless that eigenvalue's eigenvector has |cos| <= ``MISSED_OVERLAP`` (0.1) with what
    the solver found at its end of the spectrum (``u``, or for Lanczos the Ritz vector at the
    other end): no solver that only multiplies by H finds an eigenvector its start vector (nearly)
    lacks. ``value`` is never above the largest |eigenvalue| (it is a Rayleigh quotient); where
    the two ends of the spectrum are within ``rtol`` in magnitude, either may be returned.
    """

    eigenvalue: float
    eigenvector: torch.Tensor
    num_matvecs: int
    converged: bool
    residual: float

    @property
    def value(self) -> float:
        """The spectral norm estimate: |eigenvalue|."""
        return abs(self.eigenvalue)


def lanczos_top_eigenpair(
    matvec: Matvec,
    start: torch.Tensor,
    *,
    rtol: float = 1e-3,
    max_matvecs: int = 100,
) -> EigenResult:
    """Lanczos with full reorthogonalization for the eigenvalue of largest magnitude.

    Stops, ``converged`` (see ``EigenResult`` for what it guarantees), when the Ritz pair at
    each end of the spectrum has a residual ``|beta_k * y_k|`` at most ``MISSED_OVERLAP`` (0.1)
    times its distance to the eigenvalues of magnitude above ``(1 + rtol) |theta|`` beyond it,
    ``theta`` the Ritz value of largest magnitude: a residual at most ``0.1 * rtol * |theta|``
    at theta's end. A residual below ``rtol * |theta|`` only certifies that *some* eigenvalue is
    that close: one Ritz value stands for a cluster of eigenvalues until Lanczos resolves it, its
    residual the cluster's spread. Also stops, exact, when the Krylov space is invariant.

    The tridiagonal matrix is solved in float64; the basis is kept in ``start``'s dtype and
    device and reorthogonalized against at every step, a second time when the first pass
    cancelled most of the new vector ("twice is enough").
    """
    return _lanczos(matvec, start, rtol=rtol, max_matvecs=max_matvecs)[0]


def _lanczos(
    matvec: Matvec,
    start: torch.Tensor,
    *,
    rtol: float,
    max_matvecs: int,
) -> tuple[EigenResult, torch.Tensor]:
    """``lanczos_top_eigenpair`` and the orthonormal basis it built (rows), for tests.

    Every new vector, after the three-term recurrence, is orthogonalized against the whole
    basis, a second time only when that pass cancelled most of what the recurrence left
    (Kahan-Parlett, "twice is enough"): the basis stays orthogonal to working precision. Partial
    reorthogonalization (Simon's estimates, as in PROPACK) would skip most of these passes, but
    its estimates fell behind the true loss of orthogonality on some spectra in float32 (tests:
    the basis must stay orthogonal where plain Lanczos loses it), so the solver pays for them.
    """
    if rtol <= 0:
        raise ValueError(f"rtol must be positive, got {rtol}")
    if max_matvecs < 1:
        raise ValueError(f"max_matvecs must be at least 1, got {max_matvecs}")
    start_norm = torch.linalg.vector_norm(start)
    if not torch.isfinite(start_norm) or start_norm == 0:
        raise ValueError("the start vector must be finite and non-zero")
    dim = start.numel()
    max_steps = min(max_matvecs, dim)
    # The basis grows by doubling: memory follows the iterations used, not the budget.
    basis = torch.empty((min(max_steps, 8), dim), dtype=start.dtype, device=start.device)
    basis[0] = start.reshape(-1) / start_norm
    alphas: list[float] = []
    betas: list[float] = []
    theta, ritz_vector, residual = 0.0, np.ones(1), math.inf
    converged = False
    invariant_tol = 64 * torch.finfo(start.dtype).eps
    for k in range(max_steps):
        q = basis[k]
        # In place from here on: with HVPs of a millisecond, allocating vectors shows.
        w = matvec(q).reshape(-1).to(dtype=basis.dtype, copy=True)
        alpha = float(torch.dot(q, w))
        alphas.append(alpha)
        # The three-term recurrence first, so that the test below sees only what the full
        # pass removes: a second pass is needed when orthogonality was lost, not because
        # H q is mostly alpha q + beta q_prev (which it is at every step).
        w.add_(q, alpha=-alpha)
        if k > 0:
            w.add_(basis[k - 1], alpha=-betas[-1])
        active = basis[: k + 1]
        norm_before = float(torch.linalg.vector_norm(w))
        w.addmv_(active.T, active @ w, alpha=-1)
        beta = float(torch.linalg.vector_norm(w))
        if beta < 0.7 * norm_before:
            w.addmv_(active.T, active @ w, alpha=-1)
            beta = float(torch.linalg.vector_norm(w))
        thetas, vectors = _tridiagonal_eigh(alphas, betas)
        index = int(np.argmax(np.abs(thetas)))
        theta, ritz_vector = float(thetas[index]), vectors[:, index]
        residual = beta * abs(float(ritz_vector[-1]))
        betas.append(beta)
        scale = max(abs(theta), float(np.max(np.abs(thetas))), 1e-300)
        residuals = beta * np.abs(vectors[-1])
        if _no_larger_eigenvalue_missed(thetas, residuals, rtol) or beta <= invariant_tol * scale:
            converged = True
            break
        if not math.isfinite(beta):
            break
        if k + 1 < max_steps:
            if k + 1 == basis.shape[0]:
                rows = min(2 * basis.shape[0], max_steps)
                grown = torch.empty((rows, dim), dtype=basis.dtype, device=basis.device)
                grown[: k + 1] = basis
                basis = grown
            torch.div(w, beta, out=basis[k + 1])
    num_matvecs = len(alphas)
    coefficients = torch.as_tensor(ritz_vector, dtype=start.dtype, device=start.device)
    eigenvector = basis[:num_matvecs].T @ coefficients
    eigenvector = eigenvector / torch.linalg.vector_norm(eigenvector)
    result = EigenResult(
        eigenvalue=theta,
        eigenvector=eigenvector.reshape(start.shape),
        num_matvecs=num_matvecs,
        converged=converged or num_matvecs == dim,
        residual=residual,
    )
    return result, basis[:num_matvecs]


def _no_larger_eigenvalue_missed(thetas: np.ndarray, residuals: np.ndarray, rtol: float) -> bool:
    """Lanczos's test: the extreme Ritz pairs (``thetas`` ascending, ``residuals`` theirs) have
    residuals at most ``MISSED_OVERLAP`` times their distance to the eigenvalues of magnitude
    above ``(1 + rtol) max |theta|`` beyond them.

    A unit vector y with Rayleigh quotient theta and residual r = ||H y - theta y|| puts at most
    (r / t)^2 of its weight on the eigenvalues farther than t from theta, since
    r^2 = sum_i cos(y, v_i)^2 (lambda_i - theta)^2. So an eigenvalue of magnitude above the bound
    has |cos| <= MISSED_OVERLAP with the Ritz vector of its end.
    """
    bound = (1 + rtol) * max(abs(float(thetas[0])), abs(float(thetas[-1])))
    top_distance = bound - float(thetas[-1])
    bottom_distance = bound + float(thetas[0])
    return bool(
        residuals[-1] <= MISSED_OVERLAP * top_distance
        and residuals[0] <= MISSED_OVERLAP * bottom_distance
    )


def _tridiagonal_eigh(alphas: Sequence[float], betas: Sequence[float]):
    """Eigenpairs of the Lanczos tridiagonal matrix, in float64, by torch on the CPU: numpy's
    threaded LAPACK would compete with torch's threads for the cores between HVPs."""
    size = len(alphas)
    tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if size > 1:
        off = torch.tensor(betas[: size - 1], dtype=torch.float64)
        tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(tridiagonal)
    return values.numpy(), vectors.numpy()


def power_iteration_top_eigenpair(
    matvec: Matvec,
    start: torch.Tensor,
    *,
    rtol: float = 1e-3,
    max_matvecs: int = 100,
) -> EigenResult:
    """Power iteration with PyHessian's stopping rule, kept as the reference the field uses.

    Stops when the Rayleigh quotient changes by less than ``rtol`` relative between iterations,
    which certifies nothing: where the top eigenvalues are close the quotient creeps, far below
    the top. ``converged`` is the residual test instead, with ``EigenResult``'s meaning for its
    one vector: ``residual <= MISSED_OVERLAP * rtol * |eigenvalue|``.
    """
    vector = start.reshape(-1) / torch.linalg.vector_norm(start)
    eigenvalue = math.nan
    residual = math.inf
    count = 0
    while count < max_matvecs:
        count += 1
        product = matvec(vector).reshape(-1)
        new_eigenvalue = float(torch.dot(vector, product))
        residual = float(torch.linalg.vector_norm(product - new_eigenvalue * vector))
        norm = torch.linalg.vector_norm(product)
        done = math.isfinite(eigenvalue) and abs(new_eigenvalue - eigenvalue) <= rtol * abs(
            eigenvalue
        )
        eigenvalue = new_eigenvalue
        if done or norm == 0 or not torch.isfinite(norm):
            break
        vector = product / norm
    return EigenResult(
        eigenvalue=eigenvalue,
        eigenvector=vector.reshape(start.shape),
        num_matvecs=count,
        converged=residual <= MISSED_OVERLAP * rtol * abs(eigenvalue),
        residual=residual,
    )


def finite_difference_smoothness(
    gradient_at: Callable[[float], torch.Tensor],
    gradient: torch.Tensor,
    step_norm: float,
    fractions: Sequence[float] = (0.5,),
) -> float:
    """The paper's secant estimate of local smoothness along an update d = x_{t+1} - x_t.

    ``max over gamma of ||grad f(x_t + gamma d) - grad f(x_t)|| / (gamma ||d||)``, with
    ``gradient_at(gamma)`` returning grad f(x_t + gamma d) and ``gradient`` = grad f(x_t) (flat).
    NaN when the update is zero or not finite: there is no segment to measure along.
    """
    if not fractions:
        raise ValueError("at least one point along the update is needed")
    if any(not 0 < gamma <= 1 for gamma in fractions):
        raise ValueError(f"points along the update must lie in (0, 1], got {list(fractions)}")
    if not math.isfinite(step_norm) or step_norm <= 0:
        return math.nan
    estimates = []
    for gamma in fractions:
        difference = gradient_at(gamma).reshape(-1) - gradient.reshape(-1)
        estimates.append(float(torch.linalg.vector_norm(difference)) / (gamma * step_norm))
    return max(estimates)
