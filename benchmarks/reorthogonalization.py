"""How much keeping the Lanczos basis orthogonal costs, and what cheaper schemes would break.

    python benchmarks/reorthogonalization.py [--markdown] [--models]

Four schemes, each on the spectra of tests/test_estimators.py (dense float64 references, in
float64 and in float32, with the default basis of 20, one of 8 and unbounded) and, with
``--models``, on the four models of benchmarks/probe_speed.py (eval mode, reference: Lanczos
to rtol 1e-9):

- ``full``: every new vector's inner products with the whole basis are subtracted at every step
  (a second time when that cancelled most of it), the solver as it was until issue 17;
- ``measured``: the solver as shipped (``smoothprof.estimators``): the inner products are
  computed at every step and subtracted only when one is above ``REORTHOGONALIZE_ABOVE`` units
  of rounding;
- ``selective``: Parlett and Scott's selective orthogonalization: against the Ritz vectors whose
  residual is below sqrt(eps) ||T|| (formed once, when they get there) and nothing else;
- ``local``: the three-term recurrence alone (Paige: a Ritz value with a small residual is near
  an eigenvalue even after orthogonality is lost; its copies, "ghosts", only repeat it).

Per scheme: products (HVPs), basis rows read to orthogonalize (dot products and multiply-adds
over the operator's size; a thick restart's rotation counted apart), the largest relative error
of the value, the certificate's failures (converged, not within rtol of the top, and the
returned vector's |cos| with the top eigenvector above ``MISSED_OVERLAP``: what ``converged``
rules out), the largest gap between the reported residual and the true one of the returned
vector (relative to |lambda|; the certificate asks the residual for 0.1 rtol |lambda| at most) and
the basis's largest loss of orthogonality. Everything is a count or a rounding error: the same
on every machine with the same torch.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from smoothprof.estimators import (
    MISSED_OVERLAP,
    LanczosWork,
    _BlockBasis,
    _lanczos,
    _no_larger_eigenvalue_missed,
    _symmetric_eigh,
    _thick_restart,
)

SCHEMES = ("full", "measured", "selective", "local")
RTOL = 1e-3


def variant_lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    *,
    scheme: str,
    max_basis: int | None,
    max_matvecs: int = 2000,
    work: LanczosWork,
) -> tuple[float, torch.Tensor, int, bool, float, torch.Tensor]:
    """The library's Lanczos loop (stopping test, thick restart) with the scheme's
    orthogonalization instead of its own. Returns eigenvalue, eigenvector, products, converged,
    reported residual and the final basis (rows)."""
    dim = start.numel()
    rows = min(max_matvecs, dim) if max_basis is None else min(max_matvecs, dim, max_basis)
    basis = _BlockBasis(start.reshape(-1) / torch.linalg.vector_norm(start), rows)
    projected = torch.zeros((rows, rows), dtype=torch.float64)
    size, kept, count, converged = 1, 0, 0, False
    eps = torch.finfo(start.dtype).eps
    good: list[torch.Tensor] = []  # selective: the Ritz vectors it orthogonalizes against
    good_values: list[float] = []
    while count < max_matvecs:
        k = size - 1
        q = basis.row(k)
        w = matvec(q).reshape(-1).to(dtype=q.dtype, copy=True)
        count += 1
        alpha = float(torch.dot(q, w))
        projected[k, k] = alpha
        w.add_(q, alpha=-alpha)
        if k > 0 and k == kept:
            basis.subtract_combination(w, projected[:kept, k])
        elif k > 0:
            w.add_(basis.row(k - 1), alpha=-float(projected[k - 1, k]))
        beta = float(torch.linalg.vector_norm(w))
        if scheme == "full":
            for _ in range(2):  # "twice is enough": the second pass when most cancelled
                norm_before = beta
                basis.subtract_combination(w, basis.inner_products(w, size))
                work.inner_product_rows += size
                work.subtracted_rows += size
                beta = float(torch.linalg.vector_norm(w))
                if beta >= 0.7 * norm_before:
                    break
        thetas, vectors = _symmetric_eigh(projected[:size, :size])
        if scheme == "selective":
            scale = float(np.max(np.abs(thetas)))
            for i in np.flatnonzero(beta * np.abs(vectors[-1]) <= math.sqrt(eps) * scale):
                if all(abs(thetas[i] - value) > math.sqrt(eps) * scale for value in good_values):
                    ritz = basis.combination(torch.as_tensor(vectors[:, i]), size)
                    work.subtracted_rows += size  # forming it: multiply-adds over the basis
                    good.append(ritz / torch.linalg.vector_norm(ritz))
                    good_values.append(float(thetas[i]))
            if good:
                against = torch.stack(good)
                w.sub_(against.T @ (against @ w))
                work.inner_product_rows += len(good)
                work.subtracted_rows += len(good)
                beta = float(torch.linalg.vector_norm(w))
        index = int(np.argmax(np.abs(thetas)))
        theta, ritz_vector = float(thetas[index]), vectors[:, index]
        residual = beta * abs(float(ritz_vector[-1]))
        scale = max(abs(theta), float(np.max(np.abs(thetas))), 1e-300)
        if (
            _no_larger_eigenvalue_missed(thetas, beta * np.abs(vectors[-1]), RTOL)
            or beta <= 64 * eps * scale
            or size == dim
        ):
            converged = True
            break
        if size == rows:
            kept = _thick_restart(basis, projected, thetas, vectors, beta, max_basis or rows)
            work.restart_rows += size + kept
            size = kept
        if kept != size:
            projected[k, k + 1] = projected[k + 1, k] = beta
        basis.set_row(size, w, divisor=beta)
        size += 1
    vector = basis.combination(torch.as_tensor(ritz_vector), size)
    vector = vector / torch.linalg.vector_norm(vector)
    return theta, vector, count, converged, residual, basis.matrix(size)


def solve(scheme, matvec, start, max_basis, work):
    if scheme == "measured":
        result, rows, size = _lanczos(
            matvec, start, rtol=RTOL, max_matvecs=2000, max_basis=max_basis, work=work
        )
        return (result.eigenvalue, result.eigenvector, result.num_matvecs, result.converged,
                result.residual, rows.matrix(size))  # fmt: skip
    return variant_lanczos(matvec, start, scheme=scheme, max_basis=max_basis, work=work)


def rotated(eigenvalues, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    rotation, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    eigenvalues = torch.as_tensor(eigenvalues, dtype=torch.float64)
    start = torch.randn(n, generator=torch.Generator().manual_seed(seed + 100),
                        dtype=torch.float64)  # fmt: skip
    return (rotation * eigenvalues) @ rotation.T, start


def four_cluster(rest, seed):
    generator = torch.Generator().manual_seed(seed)
    low, high = rest
    below = low + (high - low) * torch.rand(96, generator=generator, dtype=torch.float64)
    return rotated([10.0, 9.99, 9.98, 9.97, *below.tolist()], seed)


def spectra() -> list[tuple[str, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """The spectra of tests/test_estimators.py, several starts each."""
    dense = torch.linspace(0.0, 100.0, 399).tolist()
    return [
        ("10, 9.99, 9.98, 9.97; 96 in [0, 9.9]",
         [four_cluster((0.0, 9.9), s) for s in range(20)]),
        ("10, 9.99, 9.98, 9.97; 96 in [-5, 5]",
         [four_cluster((-5.0, 5.0), s) for s in range(20)]),
        ("10, 10 - 1e-6, 10 - 2e-6, 9.999; 60 in [0, 6]",
         [rotated([10.0, 10 - 1e-6, 10 - 2e-6, 9.999, *[i / 10 for i in range(60)]], s)
          for s in range(5)]),
        ("-50 beside 399 in [0, 100]", [rotated([-50.0, *dense], s) for s in range(5)]),
        ("-100, 50, 198 in [-99.8, 0]",
         [rotated([-100.0, 50.0, *torch.linspace(-99.8, 0.0, 198).tolist()], s)
          for s in range(5)]),
        ("10, 5, 98 in [-2, 2]",
         [rotated([10.0, 5.0, *torch.linspace(-2.0, 2.0, 98).tolist()], s) for s in range(5)]),
        ("-7, 5, 3, 1, 0.5, -0.1, each 10 times",
         [rotated([-7.0, 5.0, 3.0, 1.0, 0.5, -0.1] * 10, s) for s in range(5)]),
        ("10, -9.985, 98 in [0, 9.9]",
         [rotated([10.0, -9.985, *torch.linspace(0.0, 9.9, 98).tolist()], s)
          for s in range(5)]),
    ]  # fmt: skip


@dataclass
class Tally:
    hvps: list[int] = field(default_factory=list)
    work: LanczosWork = field(default_factory=LanczosWork)
    error: float = 0.0
    failures: int = 0
    not_converged: int = 0
    residual_gap: float = 0.0
    orthogonality: float = 0.0

    def cells(self) -> list[str]:
        solves = len(self.hvps)
        unconverged = f" ({self.not_converged} unconverged)" if self.not_converged else ""
        return [
            f"{statistics.mean(self.hvps):.1f}",
            f"{self.work.orthogonalization_rows / solves:.0f}",
            f"{self.error:.1e}",
            f"{self.failures}{unconverged}",
            f"{self.residual_gap:.0e}",
            f"{self.orthogonality:.0e}",
        ]


def loss_of_orthogonality(basis: torch.Tensor) -> float:
    basis = basis.double()
    return float((basis @ basis.T - torch.eye(len(basis), dtype=torch.float64)).abs().max())


def spectra_rows(dtypes, bases) -> list[list[str]]:
    rows = []
    for label, problems in spectra():
        for dtype in dtypes:
            for max_basis in bases:
                cells = [label, str(dtype).removeprefix("torch."), str(max_basis or "unbounded")]
                for scheme in SCHEMES:
                    tally = Tally()
                    for matrix, first in problems:
                        values, vectors = torch.linalg.eigh(matrix)
                        top = int(values.abs().argmax())
                        exact = float(values[top])
                        operator = matrix.to(dtype)
                        theta, vector, count, converged, residual, basis = solve(
                            scheme, operator.matmul, first.to(dtype), max_basis, tally.work
                        )
                        error = abs(abs(theta) - abs(exact)) / abs(exact)
                        overlap = abs(float(vectors[:, top] @ vector.double()))
                        tally.hvps.append(count)
                        tally.error = max(tally.error, error)
                        slack = 1e-6 if dtype == torch.float32 else 0.0  # its rounding
                        if not converged:
                            tally.not_converged += 1
                            tally.failures += 1
                        elif error > RTOL + slack and overlap > MISSED_OVERLAP:
                            tally.failures += 1
                        u = vector.double()
                        true_residual = float(torch.linalg.vector_norm(matrix @ u - theta * u))
                        gap = abs(true_residual - residual) / abs(exact)
                        tally.residual_gap = max(tally.residual_gap, gap)
                        tally.orthogonality = max(tally.orthogonality, loss_of_orthogonality(basis))
                    cells += tally.cells()
                rows.append(cells)
                print(" ".join(cells), file=sys.stderr, flush=True)
    return rows


def model_rows() -> list[list[str]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from probe_speed import cross_entropy, models

    from smoothprof import hessian_norm
    from smoothprof.objective import ProbeObjective, double_backward_backends

    rows = []
    for name, model, batch in models(False):
        model.eval()
        reference = hessian_norm(model, cross_entropy, [batch], rtol=1e-9, max_hvps=300).value
        cells = [name, f"{sum(p.numel() for p in model.parameters()):,}"]
        with double_backward_backends(torch.device("cpu")):
            objective = ProbeObjective(model, cross_entropy, [batch], retain_graphs=True)
            objective.gradient(create_graph=True)
            dim = sum(p.numel() for p in objective.parameters)
            start = torch.randn(dim, generator=torch.Generator().manual_seed(1))
            for scheme in SCHEMES:
                work = LanczosWork()
                theta, _, count, _, _, basis = solve(scheme, objective.hvp, start, 20, work)
                error = abs(abs(theta) - reference) / reference
                cells += [str(count), str(work.orthogonalization_rows), f"{error:.1e}",
                          f"{loss_of_orthogonality(basis):.0e}"]  # fmt: skip
            objective.release()
        rows.append(cells)
        print(" ".join(cells), file=sys.stderr, flush=True)
    return rows


def table(title: str, header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths))]
    return "\n".join(lines + ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--models", action="store_true", help="also the benchmark's models")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, rtol {RTOL}\n")
    per_scheme = ["HVPs", "rows read", "max error", "failures", "residual gap", "orthogonality"]
    header = ["spectrum", "dtype", "basis"]
    header += [f"{scheme}: {column}" for scheme in SCHEMES for column in per_scheme]
    rows = spectra_rows((torch.float64, torch.float32), (20, 8, None))
    print(table("The tests' spectra, mean per solve (rows read) and worst over the starts",
                header, rows, args.markdown))  # fmt: skip
    if args.models:
        header = ["model", "parameters"]
        header += [f"{scheme}: {column}" for scheme in SCHEMES
                   for column in ("HVPs", "rows read", "error", "orthogonality")]  # fmt: skip
        print(table("The benchmark's models (float32, eval mode, basis of 20, one start)",
                    header, model_rows(), args.markdown))  # fmt: skip


if __name__ == "__main__":
    main()
