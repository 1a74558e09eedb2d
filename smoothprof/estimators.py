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
from collections.abc import Callable, Iterator, Sequence
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

# The Lanczos basis holds at most this many vectors of the operator's size by default (the
# solver's working vectors add two): 80 MB for a 1M-parameter float32 model, where the unbounded
# basis took up to ``max_matvecs``. Chosen by HVP counts at rtol 1e-3 (deterministic; the tests'
# spectra, unbounded -> 20): the four-cluster with the rest close below 56.8 -> 62.4 per solve,
# -50 beside a dense [0, 100] (n = 400) 66.2 -> 69.8, the others within 1; a basis of 10 took
# 131 on the four-cluster, one of 30 58.3. All within rtol of the dense eigenvalues. On the sample
# models (`run --steps 300 --num-probes 8 --estimators hvp`, 20 against 100): mlp_spirals and
# linear_rnn never fill it (7 to 14 products); char_lstm's cold and third probes (27, 23) restart,
# with the same product counts and eigenvalues to 5 digits.
DEFAULT_MAX_BASIS = 20
MIN_BASIS = 4  # a Ritz vector at each end, the next Lanczos vector, and room for one step

# Lanczos computes a new vector's inner products with the whole basis at every step, and
# subtracts those above this many units of rounding (the basis dtype's eps) times the vector's
# norm: the basis stays orthogonal to working precision, as measured, not as estimated. Measured
# against subtracting every component at every step (benchmarks/reorthogonalization.py; counts,
# deterministic): 32% to 45% fewer basis rows read on the benchmark's four models, 21% (solves
# of 6 products) to 46% on the tests' spectra, with the same products, no certificate failure,
# and eigenvalues and residuals as close to the dense references; float32 bases orthogonal to
# 4e-6 (2e-7 to 7e-7 before). Parlett and Scott's selective orthogonalization (against
# converged Ritz vectors) read far fewer rows, but its semi-orthogonal float32 basis put the
# returned vector's true residual up to 2e-4 |lambda| from the computed one, twice what the
# certificate at rtol 1e-3 relies on; the three-term recurrence alone lost orthogonality
# entirely and took up to 19% more products with a basis of 8.
REORTHOGONALIZE_ABOVE = 8
_RESTART_BLOCK = 1 << 16  # columns rotated at a time at a restart


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
    ``restarts`` counts the times Lanczos's basis was full (``max_basis``) and restarted.
    """

    eigenvalue: float
    eigenvector: torch.Tensor
    num_matvecs: int
    converged: bool
    residual: float
    restarts: int = 0

    @property
    def value(self) -> float:
        """The spectral norm estimate: |eigenvalue|."""
        return abs(self.eigenvalue)


@dataclass
class LanczosWork:
    """What a Lanczos solve read of its basis beyond the products (full-size vectors, counted;
    each is a dot product or a multiply-add over the operator's size): the rows read computing
    a new vector's inner products with the basis, the rows read subtracting them, and those a
    thick restart rotated and wrote. Counts, not times: the same on every machine."""

    inner_product_rows: int = 0
    subtracted_rows: int = 0
    restart_rows: int = 0

    @property
    def orthogonalization_rows(self) -> int:
        return self.inner_product_rows + self.subtracted_rows


def lanczos_top_eigenpair(
    matvec: Matvec,
    start: torch.Tensor,
    *,
    rtol: float = 1e-3,
    max_matvecs: int = 100,
    max_basis: int | None = DEFAULT_MAX_BASIS,
) -> EigenResult:
    """Lanczos, its basis kept orthogonal to working precision, for the eigenvalue of largest
    magnitude.

    Stops, ``converged`` (see ``EigenResult`` for what it guarantees), when the Ritz pair at
    each end of the spectrum has a residual ``|beta_k * y_k|`` at most ``MISSED_OVERLAP`` (0.1)
    times its distance to the eigenvalues of magnitude above ``(1 + rtol) |theta|`` beyond it,
    ``theta`` the Ritz value of largest magnitude: a residual at most ``0.1 * rtol * |theta|``
    at theta's end. A residual below ``rtol * |theta|`` only certifies that *some* eigenvalue is
    that close: one Ritz value stands for a cluster of eigenvalues until Lanczos resolves it, its
    residual the cluster's spread. Also stops, exact, when the Krylov space is invariant.

    The basis holds at most ``max_basis`` vectors of ``start``'s size (None: as many as
    products taken). A solve that needs more restarts instead of growing (thick restart, Wu and
    Simon 2000): the basis shrinks to the Ritz vectors at both ends of the spectrum
    (``restart_sizes``) and the last Lanczos vector, and goes on from there with the same test,
    so the certificate is unchanged; ``EigenResult.restarts`` counts the restarts. Until the
    basis is full, the solver is the unbounded one, step for step.

    The projected matrix is solved in float64; the basis is kept in ``start``'s dtype and
    device. Every new vector's inner products with the basis are computed, and those above
    rounding (``REORTHOGONALIZE_ABOVE`` eps) subtracted; once more when that cancelled most of
    the vector ("twice is enough").
    """
    return _lanczos(matvec, start, rtol=rtol, max_matvecs=max_matvecs, max_basis=max_basis)[0]


def restart_sizes(max_basis: int) -> tuple[int, int]:
    """How many Ritz vectors a thick restart of a full basis of ``max_basis`` vectors keeps at
    the top and at the bottom of the spectrum: a third of the basis at each end (rounded down,
    at least one), leaving a third or more for new Lanczos vectors.
    Measured (HVP counts, rtol 1e-3, the tests' spectra) against keeping a fifth or 45% of a
    basis of 10, 20 or 30: a third was best or within 2% of it at 20 and 30; 45% restarts so
    often that the hardest spectrum took 15% more products."""
    each = max(1, max_basis // 3)
    return each, each


def _lanczos(
    matvec: Matvec,
    start: torch.Tensor,
    *,
    rtol: float,
    max_matvecs: int,
    max_basis: int | None = None,
    work: LanczosWork | None = None,
) -> tuple[EigenResult, _BlockBasis, int]:
    """``lanczos_top_eigenpair``, and the basis it holds at the end with its number of rows
    (``basis.matrix(size)`` copies them: tests do, the solver does not).

    Every new vector, after the three-term recurrence, has its inner products with the whole
    basis computed (one pass over it), and the components above ``REORTHOGONALIZE_ABOVE`` eps
    of its norm subtracted: usually none, or a few rows one by one, a pass over all when more
    than a third are; a second time only when that cancelled most of what the recurrence left
    (Kahan-Parlett, "twice is enough"). So the basis stays orthogonal to working precision by
    measurement. Partial reorthogonalization (Simon's estimates, as in PROPACK) would skip the
    inner products too, but its estimates fell behind the true loss of orthogonality on some
    spectra in float32 (tests: the basis must stay orthogonal where plain Lanczos loses it);
    ``work``, when given, counts the basis rows read (``LanczosWork``).

    After a thick restart the basis is [Ritz vectors kept, q], and H V = V T + beta q' e^T
    still holds with T the Ritz values on the diagonal and the couplings ``beta * y_last`` of
    each kept Ritz vector to q in q's row and column (an arrowhead); the recurrence of q's step
    subtracts those couplings, the later steps are tridiagonal again. So the residual of every
    Ritz pair is still ``beta * |y_last|``.
    """
    if rtol <= 0:
        raise ValueError(f"rtol must be positive, got {rtol}")
    if max_matvecs < 1:
        raise ValueError(f"max_matvecs must be at least 1, got {max_matvecs}")
    if max_basis is not None and max_basis < MIN_BASIS:
        raise ValueError(f"max_basis must be at least {MIN_BASIS}, got {max_basis}")
    start_norm = torch.linalg.vector_norm(start)
    if not torch.isfinite(start_norm) or start_norm == 0:
        raise ValueError("the start vector must be finite and non-zero")
    dim = start.numel()
    rows = min(max_matvecs, dim) if max_basis is None else min(max_matvecs, dim, max_basis)
    basis = _BlockBasis(start.reshape(-1) / start_norm, rows)
    projected = torch.zeros((rows, rows), dtype=torch.float64)
    size, kept, restarts, num_matvecs = 1, 0, 0, 0
    theta, ritz_vector, residual = 0.0, np.ones(1), math.inf
    converged = False
    invariant_tol = 64 * torch.finfo(start.dtype).eps
    orthogonal_within = REORTHOGONALIZE_ABOVE * torch.finfo(start.dtype).eps
    work = work if work is not None else LanczosWork()
    while num_matvecs < max_matvecs:
        k = size - 1
        q = basis.row(k)
        # In place from here on: with HVPs of a millisecond, allocating vectors shows.
        w = matvec(q).reshape(-1).to(dtype=q.dtype, copy=True)
        num_matvecs += 1
        alpha = float(torch.dot(q, w))
        projected[k, k] = alpha
        # The recurrence first, so that the test below sees only what the full pass removes:
        # a second pass is needed when orthogonality was lost, not because H q is mostly
        # alpha q + beta q_prev (which it is at every step).
        w.add_(q, alpha=-alpha)
        if k > 0 and k == kept:  # the first step after a restart: q couples to every kept vector
            basis.subtract_combination(w, projected[:kept, k])
        elif k > 0:
            w.add_(basis.row(k - 1), alpha=-float(projected[k - 1, k]))
        beta = float(torch.linalg.vector_norm(w))
        # One pass computes w's inner products with the basis; then only those above rounding
        # (REORTHOGONALIZE_ABOVE eps |w|) are subtracted, usually none or a few rows.
        products = basis.inner_products(w, size)
        work.inner_product_rows += size
        if float(products.abs().max()) > orthogonal_within * beta:
            norm_before = beta
            work.subtracted_rows += basis.subtract_above(w, products, orthogonal_within * beta)
            beta = float(torch.linalg.vector_norm(w))
            if beta < 0.7 * norm_before:  # most of w cancelled: its rounding is not orthogonal
                products = basis.inner_products(w, size)
                work.inner_product_rows += size
                above = orthogonal_within * beta
                work.subtracted_rows += basis.subtract_above(w, products, above)
                beta = float(torch.linalg.vector_norm(w))
        thetas, vectors = _symmetric_eigh(projected[:size, :size])
        index = int(np.argmax(np.abs(thetas)))
        theta, ritz_vector = float(thetas[index]), vectors[:, index]
        residual = beta * abs(float(ritz_vector[-1]))
        scale = max(abs(theta), float(np.max(np.abs(thetas))), 1e-300)
        residuals = beta * np.abs(vectors[-1])
        if _no_larger_eigenvalue_missed(thetas, residuals, rtol) or beta <= invariant_tol * scale:
            converged = True
            break
        if size == dim:  # the whole space: the Ritz values are the eigenvalues
            converged = True
            break
        if not math.isfinite(beta) or num_matvecs == max_matvecs:
            break
        if size == rows:
            kept = _thick_restart(basis, projected, thetas, vectors, beta, max_basis or rows)
            work.restart_rows += size + kept
            size = kept
            restarts += 1
        if kept != size:  # a plain step
            projected[k, k + 1] = projected[k + 1, k] = beta
        basis.set_row(size, w, divisor=beta)
        size += 1
    eigenvector = basis.combination(torch.as_tensor(ritz_vector), size)
    eigenvector.div_(torch.linalg.vector_norm(eigenvector))
    result = EigenResult(
        eigenvalue=theta,
        eigenvector=eigenvector.reshape(start.shape),
        num_matvecs=num_matvecs,
        converged=converged,
        residual=residual,
        restarts=restarts,
    )
    return result, basis, size


def _thick_restart(
    basis: _BlockBasis,
    projected: torch.Tensor,
    thetas: np.ndarray,
    vectors: np.ndarray,
    beta: float,
    max_basis: int,
) -> int:
    """Shrink a full basis, in place, to the Ritz vectors ``restart_sizes`` keeps at both ends
    of the spectrum, and ``projected`` to their Ritz values with their couplings ``beta *
    y_last`` to the next Lanczos vector (which the caller puts in the row after them).
    Returns how many were kept."""
    top, bottom = restart_sizes(max_basis)
    size = len(thetas)
    chosen = list(range(bottom)) + list(range(size - top, size))
    basis.rotate(torch.as_tensor(vectors[:, chosen].T.copy()), size)
    kept = len(chosen)
    projected.zero_()
    projected[:kept, :kept] = torch.diag(torch.as_tensor(thetas[chosen]))
    couplings = torch.as_tensor(beta * vectors[-1, chosen])
    projected[:kept, kept] = couplings
    projected[kept, :kept] = couplings
    return kept


class _BlockBasis:
    """The Lanczos basis: up to ``rows`` orthonormal rows, in blocks of 8, 8, 16, 32, ... rows
    that are allocated as the rows are used and never copied, so that memory follows the
    iterations used and never holds more than ``rows`` vectors (growing one array by doubling
    held the old and the new at once: 36 vectors for a bound of 20)."""

    def __init__(self, first: torch.Tensor, rows: int) -> None:
        self.rows = rows
        self.blocks = [first.new_empty((min(8, rows), first.numel()))]
        self.starts = [0]
        self.blocks[0][0] = first

    def _locate(self, index: int) -> tuple[torch.Tensor, int]:
        for block, first in zip(reversed(self.blocks), reversed(self.starts)):
            if index >= first:
                return block, index - first
        raise IndexError(index)

    def row(self, index: int) -> torch.Tensor:
        block, offset = self._locate(index)
        return block[offset]

    def set_row(self, index: int, vector: torch.Tensor, divisor: float = 1.0) -> None:
        """Row ``index`` becomes ``vector / divisor``, written in place (one pass)."""
        if index >= self.rows:
            raise IndexError(f"the basis holds {self.rows} rows, not {index + 1}")
        capacity = self.starts[-1] + self.blocks[-1].shape[0]
        if index == capacity:  # the next block: as many rows as there are, up to ``rows``
            size = min(capacity, self.rows - capacity)
            self.blocks.append(self.blocks[0].new_empty((size, self.blocks[0].shape[1])))
            self.starts.append(capacity)
        block, offset = self._locate(index)
        torch.div(vector, divisor, out=block[offset])

    def _pieces(self, size: int) -> Iterator[tuple[torch.Tensor, slice]]:
        """The blocks' first ``size`` rows, each with its rows' slice of a coefficient vector."""
        for block, first in zip(self.blocks, self.starts):
            if first >= size:
                break
            used = min(block.shape[0], size - first)
            yield block[:used], slice(first, first + used)

    def inner_products(self, vector: torch.Tensor, size: int) -> torch.Tensor:
        """The first ``size`` rows' inner products with ``vector`` (one pass over them)."""
        return torch.cat([rows @ vector for rows, _ in self._pieces(size)])

    def subtract_above(self, vector: torch.Tensor, products: torch.Tensor, above: float) -> int:
        """Subtract from ``vector``, in place, its components ``products`` (its inner products
        with the rows) that exceed ``above`` in magnitude; returns the rows read. A few rows are
        subtracted one by one, more than a third of them in one pass over all."""
        values = products.tolist()
        chosen = [i for i, value in enumerate(values) if abs(value) > above]
        if 3 * len(chosen) > len(values):
            self.subtract_combination(vector, products)
            return len(values)
        for i in chosen:
            vector.add_(self.row(i), alpha=-values[i])
        return len(chosen)

    def subtract_combination(self, vector: torch.Tensor, coefficients: torch.Tensor) -> None:
        """``vector -= sum_i coefficients[i] * row i``, in place."""
        coefficients = coefficients.to(dtype=vector.dtype, device=vector.device)
        for rows, part in self._pieces(len(coefficients)):
            vector.addmv_(rows.T, coefficients[part], alpha=-1)

    def combination(self, coefficients: torch.Tensor, size: int) -> torch.Tensor:
        """``sum_i coefficients[i] * row i`` over the first ``size`` rows."""
        result = self.blocks[0].new_zeros(self.blocks[0].shape[1])
        self.subtract_combination(result, -coefficients[:size])
        return result

    def rotate(self, coefficients: torch.Tensor, size: int) -> None:
        """Rows ``0..r-1`` become ``coefficients @ rows[:size]`` (``coefficients`` r x size),
        column block by column block, so that no second basis is held; each block of rows is
        read once where it lies (gathering the rows into one matrix first copied the basis:
        13% of a solve on the benchmark's MLP, which restarts 5 times in 59 products)."""
        kept = coefficients.shape[0]
        coefficients = coefficients.to(self.blocks[0])
        pieces = list(self._pieces(size))
        for first in range(0, self.blocks[0].shape[1], _RESTART_BLOCK):
            columns = slice(first, first + _RESTART_BLOCK)
            (rows, part), *rest = pieces
            new = coefficients[:, part] @ rows[:, columns]
            for rows, part in rest:
                new.addmm_(coefficients[:, part], rows[:, columns])
            for rows, part in self._pieces(kept):
                rows[:, columns] = new[part]

    def matrix(self, size: int) -> torch.Tensor:
        """The first ``size`` rows as one matrix (a copy)."""
        return torch.cat([rows for rows, _ in self._pieces(size)])


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


def _symmetric_eigh(projected: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of the projected matrix, in float64, by torch on the CPU: numpy's threaded
    LAPACK would compete with torch's threads for the cores between HVPs."""
    values, vectors = torch.linalg.eigh(projected)
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
