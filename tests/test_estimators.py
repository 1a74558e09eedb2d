"""The eigen-solvers and the finite difference on plain matrices, where the answer is known."""

import math

import pytest
import torch
from conftest import solver_storage_bytes

from smoothprof.estimators import (
    MISSED_OVERLAP,
    LanczosWork,
    finite_difference_smoothness,
    lanczos_top_eigenpair,
    power_iteration_top_eigenpair,
)


def symmetric(eigenvalues, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def start(n, seed=1):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


TOP_CLUSTER = [10.0, 9.99, 9.98, 9.97]  # 1e-3 apart, relative: rtol = 1e-3 must tell them apart


def four_cluster(n, rest, seed, dtype=torch.float64):
    """A symmetric matrix with the top eigenvalues 10, 9.99, 9.98, 9.97 and the others uniform
    in ``rest``; its eigenvectors (columns) and a random start vector, all from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    low, high = rest
    below = low + (high - low) * torch.rand(n - 4, generator=generator, dtype=torch.float64)
    eigenvalues = torch.cat([torch.tensor(TOP_CLUSTER, dtype=torch.float64), below])
    rotation, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    matrix = ((rotation * eigenvalues) @ rotation.T).to(dtype)
    first = torch.randn(n, generator=generator, dtype=torch.float64).to(dtype)
    return matrix, rotation, first


@pytest.mark.parametrize("rtol", [1e-3, 1e-6, 1e-10])
def test_lanczos_certified_on_random_symmetric_matrix(rtol):
    a = torch.randn(200, 200, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    matrix = (a + a.T) / 2
    exact = torch.linalg.eigvalsh(matrix)
    exact_top = float(exact[exact.abs().argmax()])
    result = lanczos_top_eigenpair(lambda v: matrix @ v, start(200), rtol=rtol, max_matvecs=200)
    assert result.converged
    assert abs(result.eigenvalue - exact_top) <= rtol * abs(exact_top)
    # the residual the solver reports is the true residual of the pair it returns
    u = result.eigenvector
    true_residual = torch.linalg.vector_norm(matrix @ u - result.eigenvalue * u)
    assert float(true_residual) == pytest.approx(result.residual, rel=1e-3, abs=1e-9)


def test_lanczos_negative_dominant_eigenvalue():
    matrix = symmetric([-7.0, 5.0, 3.0, 1.0, 0.5, -0.1])
    result = lanczos_top_eigenpair(lambda v: matrix @ v, start(6), rtol=1e-8)
    assert result.eigenvalue == pytest.approx(-7.0, rel=1e-8)
    assert result.value == pytest.approx(7.0, rel=1e-8)


def test_lanczos_clustered_top_eigenvalues():
    eigenvalues = [10.0, 10.0 - 1e-6, 10.0 - 2e-6, 9.999] + [float(i) / 10 for i in range(60)]
    matrix = symmetric(eigenvalues)
    result = lanczos_top_eigenpair(lambda v: matrix @ v, start(len(eigenvalues)), rtol=1e-3)
    assert result.converged
    assert abs(result.eigenvalue - 10.0) <= 1e-3 * 10.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rest", [(-5.0, 5.0), (0.0, 9.9)], ids=["rest-wide", "rest-close"])
def test_lanczos_converged_is_within_rtol_of_the_top_of_a_cluster(dtype, rest):
    # One Ritz value stands for the whole cluster until Lanczos resolves it, its residual the
    # cluster's spread: a residual below rtol |theta| alone certified 14 of these 80 starts up
    # to 2.7e-3 below the top.
    rtol = 1e-3
    for seed in range(20):
        matrix, _, first = four_cluster(100, rest, seed, dtype)
        exact = float(torch.linalg.eigvalsh(matrix.double()).abs().max())
        result = lanczos_top_eigenpair(matrix.matmul, first, rtol=rtol, max_matvecs=100)
        assert result.converged, seed
        # float32: the solver's rounding (1e-7 relative) on top of rtol
        slack = 0.0 if dtype == torch.float64 else 1e-6
        assert abs(result.value - exact) <= (rtol + slack) * exact, seed


@pytest.mark.parametrize("fraction", [1.0, 0.1, 0.01, 1e-3, 0.0])
def test_lanczos_guarantee_when_the_start_lacks_the_top_eigenvector(fraction):
    # What converged means, exactly: within rtol of the largest |eigenvalue|, or the returned
    # eigenvector has |cos| <= MISSED_OVERLAP with the top one, which Lanczos cannot find when
    # the start vector (nearly) lacks it. The start here has a ``fraction`` of its typical
    # component along the top eigenvector.
    rtol = 1e-3
    for seed in range(5):
        matrix, rotation, first = four_cluster(100, (-5.0, 5.0), seed)
        components = rotation.T @ first
        components[0] = fraction * max(abs(float(components[0])), 0.5)
        result = lanczos_top_eigenpair(matrix.matmul, rotation @ components, rtol=rtol)
        assert result.converged
        overlap = abs(float(rotation[:, 0] @ result.eigenvector))
        within = abs(result.value - 10.0) <= rtol * 10.0
        assert within or overlap <= MISSED_OVERLAP, (seed, result.value, overlap)
        if fraction >= 0.1:
            assert within, (seed, result.value)
        if fraction == 0.0:  # an eigenvector the start lacks stays out of the Krylov space
            assert not within and result.value <= 9.99 + 1e-9


def test_lanczos_checks_the_other_end_of_the_spectrum():
    # -9.985 stands alone and converges in a few steps; the top, 10, sits on a dense band and
    # converges slowly. A residual test at the dominant end alone returned -9.985 (1.5e-3 off).
    rtol = 1e-3
    eigenvalues = [10.0, -9.985, *torch.linspace(0.0, 9.9, 98).tolist()]
    for seed in range(5):
        matrix = symmetric(eigenvalues, seed=seed)
        result = lanczos_top_eigenpair(matrix.matmul, start(100, seed), rtol=rtol)
        assert result.converged
        assert abs(result.value - 10.0) <= rtol * 10.0, result.eigenvalue


def test_lanczos_invariant_subspace_is_exact():
    vector = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
    matrix = torch.outer(vector, vector)  # rank one: eigenvalue 9
    result = lanczos_top_eigenpair(lambda v: matrix @ v, start(3), rtol=1e-12)
    assert result.converged
    assert result.eigenvalue == pytest.approx(9.0, rel=1e-12)
    assert result.num_matvecs <= 2


def test_lanczos_says_when_budget_is_too_small():
    a = torch.randn(300, 300, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    matrix = (a + a.T) / 2
    result = lanczos_top_eigenpair(lambda v: matrix @ v, start(300), rtol=1e-9, max_matvecs=5)
    assert not result.converged
    assert result.num_matvecs == 5
    assert result.residual > 1e-9 * result.value


def test_lanczos_zero_matrix():
    result = lanczos_top_eigenpair(lambda v: 0 * v, start(4))
    assert result.converged and result.eigenvalue == 0.0


def test_lanczos_rejects_bad_arguments():
    with pytest.raises(ValueError):
        lanczos_top_eigenpair(lambda v: v, torch.zeros(3))
    with pytest.raises(ValueError):
        lanczos_top_eigenpair(lambda v: v, torch.ones(3), rtol=0)


def test_power_iteration_stopping_rule_is_no_certificate():
    # Two eigenvalues close in magnitude: the Rayleigh quotient creeps, the change looks small.
    matrix = symmetric([10.0, 9.9] + [1.0] * 50, seed=2)
    power = power_iteration_top_eigenpair(lambda v: matrix @ v, start(52), rtol=1e-3)
    lanczos = lanczos_top_eigenpair(lambda v: matrix @ v, start(52), rtol=1e-3)
    assert lanczos.converged and abs(lanczos.eigenvalue - 10.0) <= 1e-2
    assert not power.converged or abs(power.eigenvalue - 10.0) <= 1e-2


def test_power_iteration_converged_is_not_its_stopping_rule():
    # On the four-cluster with the rest close below, PyHessian's rule stops 0.8% to 1.8% below
    # the top: converged (the residual test) says so.
    rtol = 1e-3
    for seed in range(10):
        matrix, _, first = four_cluster(100, (0.0, 9.9), seed)
        result = power_iteration_top_eigenpair(matrix.matmul, first, rtol=rtol)
        assert result.num_matvecs < 100  # stopped by its rule, not by the budget
        assert abs(result.value - 10.0) > rtol * 10.0
        assert not result.converged


def test_finite_difference_on_a_quadratic_is_the_secant():
    matrix = symmetric([4.0, 1.0, -2.0])
    x = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    d = torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64)
    expected = float(torch.linalg.vector_norm(matrix @ d) / torch.linalg.vector_norm(d))
    for fractions in [(0.5,), (0.25, 0.5, 1.0)]:
        estimate = finite_difference_smoothness(
            lambda gamma: matrix @ (x + gamma * d),
            matrix @ x,
            float(torch.linalg.vector_norm(d)),
            fractions,
        )
        assert estimate == pytest.approx(expected, rel=1e-12)


def test_finite_difference_takes_the_max_over_points():
    # f(x) = x^3 / 3 in 1-D: f' = x^2; secant from 0 over gamma*d is gamma*d.
    d = 2.0
    estimate = finite_difference_smoothness(
        lambda gamma: torch.tensor([(gamma * d) ** 2]), torch.tensor([0.0]), d, (0.25, 0.5, 1.0)
    )
    assert estimate == pytest.approx(2.0)


def test_finite_difference_without_an_update_is_nan():
    assert math.isnan(finite_difference_smoothness(lambda g: torch.ones(2), torch.ones(2), 0.0))
    with pytest.raises(ValueError):
        finite_difference_smoothness(lambda g: torch.ones(2), torch.ones(2), 1.0, (1.5,))


def _plain_lanczos_basis(matrix: torch.Tensor, first: torch.Tensor, steps: int) -> torch.Tensor:
    """The three-term recurrence without any reorthogonalization, for contrast."""
    basis = [first / first.norm()]
    previous, beta = torch.zeros_like(first), 0.0
    for _ in range(steps - 1):
        w = matrix @ basis[-1] - beta * previous
        w = w - torch.dot(basis[-1], w) * basis[-1]
        beta = float(w.norm())
        previous = basis[-1]
        basis.append(w / beta)
    return torch.stack(basis)


@pytest.mark.parametrize("seed", range(5))
def test_lanczos_keeps_the_basis_orthogonal_where_plain_lanczos_loses_it(seed):
    from smoothprof.estimators import _lanczos

    # The isolated eigenvalue -50 converges in a few steps, and plain Lanczos then loses
    # orthogonality against its Ritz vector; the top of the dense part [0, 100] converges slowly.
    eigenvalues = torch.cat([torch.tensor([-50.0]), torch.linspace(0.0, 100.0, 399)])
    generator = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(400, 400, generator=generator))
    matrix = (rotation * eigenvalues) @ rotation.T
    first = torch.randn(400, generator=generator)
    work = LanczosWork()
    result, rows, size = _lanczos(
        lambda v: matrix @ v, first, rtol=1e-9, max_matvecs=120, work=work
    )
    basis = rows.matrix(size)
    assert result.num_matvecs >= 100  # far past the convergence of -50
    loss = (basis @ basis.T - torch.eye(len(basis))).abs().max()
    # Orthogonal to working precision (measured 8e-7 to 1e-6, 7 to 8 eps: the components above
    # REORTHOGONALIZE_ABOVE eps are subtracted), where semi-orthogonality (sqrt(eps), 3e-4) is
    # all that partial schemes promise.
    assert loss <= 32 * torch.finfo(torch.float32).eps
    # measured, not assumed: some steps needed no subtraction, others did
    assert 0 < work.subtracted_rows < work.inner_product_rows
    assert result.eigenvalue == pytest.approx(100.0, rel=1e-3)
    plain = _plain_lanczos_basis(matrix, first, 120)
    assert (plain @ plain.T - torch.eye(120)).abs().max() > 0.1  # what reorthogonalizing prevents


# The bounded basis (thick restart): the same certificate against the same dense references,
# on solves that need several restarts.

NEGATIVE_BESIDE_DENSE = [-50.0, *torch.linspace(0.0, 100.0, 199).tolist()]
NEGATIVE_DOMINANT = [-100.0, 50.0, *torch.linspace(-99.8, 0.0, 198).tolist()]
WELL_SEPARATED = [10.0, 5.0, *torch.linspace(-2.0, 2.0, 98).tolist()]


@pytest.mark.parametrize("max_basis", [6, 10, 20])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rest", [(-5.0, 5.0), (0.0, 9.9)], ids=["rest-wide", "rest-close"])
def test_bounded_lanczos_within_rtol_of_the_top_of_a_cluster(max_basis, dtype, rest):
    from smoothprof.estimators import _lanczos

    rtol = 1e-3
    restarted = 0
    for seed in range(10):
        matrix, _, first = four_cluster(100, rest, seed, dtype)
        exact = float(torch.linalg.eigvalsh(matrix.double()).abs().max())
        result, _, size = _lanczos(
            matrix.matmul, first, rtol=rtol, max_matvecs=1000, max_basis=max_basis
        )
        assert result.converged, seed
        assert size <= max_basis
        slack = 0.0 if dtype == torch.float64 else 1e-6
        assert abs(result.value - exact) <= (rtol + slack) * exact, (seed, result.value)
        restarted += result.restarts > 0
    assert restarted >= 5  # the bound was hit: these solves take 25 to 60 products unbounded


@pytest.mark.parametrize("max_basis", [4, 8, 20])
@pytest.mark.parametrize(
    "eigenvalues, top",
    [
        (NEGATIVE_BESIDE_DENSE, 100.0),
        (NEGATIVE_DOMINANT, -100.0),
        (WELL_SEPARATED, 10.0),
        ([-7.0, 5.0, 3.0, 1.0, 0.5, -0.1] * 10, -7.0),
    ],
    ids=["negative-beside-dense", "negative-dominant", "well-separated", "negative-repeated"],
)
def test_bounded_lanczos_against_dense_reference(max_basis, eigenvalues, top):
    from smoothprof.estimators import _lanczos

    rtol = 1e-3
    for seed in range(3):
        matrix = symmetric(eigenvalues, seed=seed)
        exact = torch.linalg.eigvalsh(matrix)
        assert float(exact[exact.abs().argmax()]) == pytest.approx(top)
        result, rows, size = _lanczos(
            matrix.matmul,
            start(len(eigenvalues), seed),
            rtol=rtol,
            max_matvecs=1000,
            max_basis=max_basis,
        )
        basis = rows.matrix(size)
        assert result.converged
        assert abs(result.eigenvalue - top) <= rtol * abs(top), (seed, result.eigenvalue)
        assert len(basis) <= max_basis
        if max_basis == 4:  # every one of these solves needs more (6 to 70 products unbounded)
            assert result.restarts >= 1
        # the residual the solver reports is the true residual of the pair it returns
        u = result.eigenvector
        true_residual = float(torch.linalg.vector_norm(matrix @ u - result.eigenvalue * u))
        assert true_residual == pytest.approx(result.residual, rel=1e-3, abs=1e-9)
        # the restarted basis stays orthonormal to working precision
        assert (basis @ basis.T - torch.eye(len(basis), dtype=basis.dtype)).abs().max() < 1e-12


@pytest.mark.parametrize("seed", range(5))
def test_bounded_lanczos_is_the_unbounded_one_until_the_basis_is_full(seed):
    matrix, _, first = four_cluster(100, (-5.0, 5.0), seed)
    unbounded = lanczos_top_eigenpair(matrix.matmul, first, max_basis=None)
    assert unbounded.restarts == 0
    for max_basis in [unbounded.num_matvecs, unbounded.num_matvecs + 1, 100]:
        bounded = lanczos_top_eigenpair(matrix.matmul, first, max_basis=max_basis)
        assert bounded.restarts == 0
        assert bounded.num_matvecs == unbounded.num_matvecs
        assert bounded.eigenvalue == unbounded.eigenvalue
        assert bounded.residual == unbounded.residual
        assert torch.equal(bounded.eigenvector, unbounded.eigenvector)
    smaller = lanczos_top_eigenpair(matrix.matmul, first, max_basis=unbounded.num_matvecs - 1)
    assert smaller.restarts >= 1


def test_bounded_lanczos_still_says_when_the_budget_is_too_small():
    matrix, _, first = four_cluster(100, (0.0, 9.9), 0)
    result = lanczos_top_eigenpair(matrix.matmul, first, max_matvecs=30, max_basis=6)
    assert result.num_matvecs == 30 and result.restarts >= 1
    assert not result.converged


def test_bounded_lanczos_guarantee_when_the_start_lacks_the_top_eigenvector():
    rtol = 1e-3
    for seed in range(5):
        matrix, rotation, first = four_cluster(100, (-5.0, 5.0), seed)
        components = rotation.T @ first
        components[0] = 0.0
        result = lanczos_top_eigenpair(
            matrix.matmul, rotation @ components, rtol=rtol, max_matvecs=1000, max_basis=6
        )
        assert result.converged and result.restarts >= 1
        # restarts rotate within the Krylov space: the missing eigenvector stays missing
        assert abs(float(rotation[:, 0] @ result.eigenvector)) <= MISSED_OVERLAP
        assert result.value <= 9.99 + 1e-9


def test_bounded_lanczos_rejects_a_basis_too_small_to_restart():
    with pytest.raises(ValueError, match="max_basis"):
        lanczos_top_eigenpair(lambda v: v, torch.ones(10), max_basis=3)


@pytest.mark.parametrize("max_basis", [20, 9, None])
def test_bounded_lanczos_holds_at_most_max_basis_vectors_and_two(max_basis):
    from smoothprof.estimators import _lanczos

    matrix, _, first = four_cluster(100, (0.0, 9.9), 0)  # 60 products unbounded
    peak = 0

    def matvec(vector):
        nonlocal peak
        peak = max(peak, solver_storage_bytes(100))
        return matrix @ vector

    result, _, _ = _lanczos(matvec, first, rtol=1e-3, max_matvecs=1000, max_basis=max_basis)
    assert result.converged
    vector_bytes = 100 * 8
    if max_basis is None:  # what the bound prevents: a vector per product
        assert peak >= result.num_matvecs * vector_bytes > 40 * vector_bytes
    else:
        assert result.restarts >= 1
        # held at every product: the basis, the new vector and the start
        assert peak <= (max_basis + 2) * vector_bytes


def test_a_solve_ends_without_copying_its_basis(monkeypatch):
    # The end of a solve holds the basis and the eigenvector: copying the used rows (as the
    # solver once did for its tests) was up to another max_basis vectors, a third of what the
    # default probe held on the 25.5M-parameter transformer (docs/scaling.md).
    import smoothprof.estimators as estimators

    def copy(self, size):
        raise AssertionError("the solver copied its basis")

    monkeypatch.setattr(estimators._BlockBasis, "matrix", copy)
    matrix, _, first = four_cluster(100, (0.0, 9.9), 0)
    result = lanczos_top_eigenpair(matrix.matmul, first, rtol=1e-3, max_matvecs=1000)
    assert result.converged and result.restarts >= 1


def test_the_basis_grows_without_copying_up_to_its_bound():
    from smoothprof.estimators import _BlockBasis

    vectors = torch.eye(30, dtype=torch.float64)
    basis = _BlockBasis(vectors[0], rows=20)
    first_block = basis.blocks[0].untyped_storage().data_ptr()
    for row in range(1, 20):
        basis.set_row(row, vectors[row])
    # rows 0..7 never moved: growing allocated new blocks (8, 8 and 4 rows), copied nothing
    assert basis.blocks[0].untyped_storage().data_ptr() == first_block
    assert [len(block) for block in basis.blocks] == [8, 8, 4]
    assert torch.equal(basis.matrix(20), vectors[:20])
    with pytest.raises(IndexError):
        basis.set_row(20, vectors[20])


def test_bounded_lanczos_rotates_the_basis_in_column_blocks(monkeypatch):
    import smoothprof.estimators as estimators

    matrix, _, first = four_cluster(100, (0.0, 9.9), 1)
    whole = estimators.lanczos_top_eigenpair(matrix.matmul, first, max_basis=8)
    monkeypatch.setattr(estimators, "_RESTART_BLOCK", 7)  # 15 blocks, the last of 2 columns
    blocks = estimators.lanczos_top_eigenpair(matrix.matmul, first, max_basis=8)
    assert whole.restarts >= 2
    assert (blocks.num_matvecs, blocks.restarts) == (whole.num_matvecs, whole.restarts)
    assert blocks.eigenvalue == pytest.approx(whole.eigenvalue, rel=1e-12)
    torch.testing.assert_close(blocks.eigenvector, whole.eigenvector, rtol=0, atol=1e-10)


@pytest.mark.parametrize("max_basis", [8, 20, None])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "eigenvalues",
    [
        [*TOP_CLUSTER, *torch.linspace(0.0, 9.9, 96).tolist()],
        [10.0, 10.0 - 1e-6, 10.0 - 2e-6, 9.999] + [float(i) / 10 for i in range(60)],
        NEGATIVE_BESIDE_DENSE,
        NEGATIVE_DOMINANT,
        WELL_SEPARATED,
        [-7.0, 5.0, 3.0, 1.0, 0.5, -0.1] * 10,
    ],
    ids=["four-cluster", "clustered", "negative-beside-dense", "negative-dominant",
         "well-separated", "negative-repeated"],
)  # fmt: skip
def test_subtracting_only_components_above_rounding_is_subtracting_all(
    monkeypatch, max_basis, dtype, eigenvalues
):
    # REORTHOGONALIZE_ABOVE = 0 subtracts every component at every step (full
    # reorthogonalization); the default skips those at rounding level. Same products, the same
    # eigenvalue to rounding, both within rtol of the dense one, for fewer rows read.
    import smoothprof.estimators as estimators

    rtol = 1e-3
    for seed in range(3):
        matrix = symmetric(eigenvalues, seed=seed)
        exact = torch.linalg.eigvalsh(matrix)
        top = float(exact[exact.abs().argmax()])
        operator, first = matrix.to(dtype), start(len(eigenvalues), seed + 10).to(dtype)
        solves = {}
        for above in (0, estimators.REORTHOGONALIZE_ABOVE):
            monkeypatch.setattr(estimators, "REORTHOGONALIZE_ABOVE", above)
            work = LanczosWork()
            result, rows, size = estimators._lanczos(
                operator.matmul, first, rtol=rtol, max_matvecs=2000, max_basis=max_basis,
                work=work,
            )  # fmt: skip
            basis = rows.matrix(size)
            assert result.converged
            assert abs(result.eigenvalue - top) <= rtol * abs(top), (above, seed)
            u = result.eigenvector.double()
            true_residual = float(torch.linalg.vector_norm(matrix @ u - result.eigenvalue * u))
            assert true_residual == pytest.approx(result.residual, rel=1e-3, abs=1e-6 * abs(top))
            loss = float((basis.double() @ basis.double().T - torch.eye(len(basis))).abs().max())
            # working precision (a basis of 8 adds up rounding over its restarts: 51 eps measured)
            assert loss <= 256 * torch.finfo(dtype).eps, (above, seed, loss)
            solves[above] = result, work
        (full, full_work), (measured, measured_work) = solves.values()
        assert measured.num_matvecs == full.num_matvecs
        assert measured.eigenvalue == pytest.approx(full.eigenvalue, rel=8 * torch.finfo(dtype).eps)
        assert measured_work.inner_product_rows == full_work.inner_product_rows
        assert measured_work.subtracted_rows < full_work.subtracted_rows
