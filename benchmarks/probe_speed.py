"""How fast and how exact the probe is, measured side by side in one run.

    python benchmarks/probe_speed.py [--quick] [--markdown] [--tables hvp,eigen,warm,overhead]
    python benchmarks/probe_speed.py --markdown --tables peers

Prints four tables:

1. HVP cost: seconds per Hessian-vector product by each method, as a multiple of one gradient on
   the same batch as training computes it (the median over 9 rounds that time both), for an
   MLP, a CNN with BatchNorm, an LSTM and a transformer layer; "fails" where a method raises.
   "graph MiB" is the memory the retained double-backward graph of that one batch holds
   (``objective.saved_graph_bytes``): the price of the ``retained`` method, per probe batch.
2. Top eigenvalue to rtol 1e-3: smoothprof's Lanczos (residual-certified) against power iteration
   with PyHessian's stopping rule, and PyHessian itself (``pip install pyhessian==0.1``; the
   column is skipped when it is not installed): HVPs, wall time (the median of 3 interleaved
   rounds after an untimed solve) and the relative error against
   a reference eigenvalue (Lanczos to rtol 1e-9). PyHessian forces eval mode, so all solvers
   here measure the eval-mode Hessian.
3. Warm start: mean HVPs per probe along a training run, probing every 5 steps: in its first
   60 steps and over all 300.
4. Overhead: wall time of each sample model's run at its defaults, with probes and with
   ``--probe-every 0``, and their ratio (medians of 3 interleaved rounds).
5. Real models (``--tables real``; the sample models that need ``transformers``, ``timm`` or
   ``torchvision``, each skipped with the reason when its package does not import): a short run
   at the tool's defaults but for its length, with the HVP method the probe chose, the probe
   batches chosen for the model's size, the mean HVPs per probe, and a probe's time in gradient
   evaluations (its seconds over a training step's, the step being one gradient and one update).
6. Per-layer probe cost (``--tables layers``): two sample models at their defaults, with and
   without ``--per-layer`` (the default groups): the HVPs per probe of the whole-model solvers
   and of the per-group solvers, all groups and per group, and the per-layer probe's time over
   the plain probe's (the median of the probes' seconds of each run).
7. Peers at equal accuracy (``--tables peers``, not in the default set): smoothprof's solve
   certified to rtol 1e-3 beside PyHessian 0.1 at tol 1e-5, hessian-eigenthings 1.0.0a5's
   ``lanczos(k=1)`` at the smallest step count within 1e-3 of a reference (an oracle in its
   favour) and curvlinops 3.0.1 with scipy's ``eigsh(k=1, which="LM", tol=1e-3)``, on the four
   models above and the 25.5M-parameter LM of benchmarks/models/transformer_lm_25m.py (its
   3.3M member with ``--quick``): products, errors against a reference certified to rtol 1e-6,
   and time in interleaved rounds (3 for the small models, the first solve for the LM). A peer
   that is not installed, or that fails, is listed as such.

Ratios, not seconds, are the figures to compare: they are measured in one process on one
machine, which the header states.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from smoothprof import Probe, hessian_norm
from smoothprof.estimators import lanczos_top_eigenpair, power_iteration_top_eigenpair
from smoothprof.loading import load_model_file
from smoothprof.objective import (
    HVP_METHODS,
    ProbeObjective,
    double_backward_backends,
    preserved_rng,
    saved_graph_bytes,
)
from smoothprof.train import RunConfig, prepare_run, train

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/tables.py
from tables import table

REPO = Path(__file__).resolve().parent.parent


def cross_entropy(model: nn.Module, batch) -> torch.Tensor:
    inputs, targets = batch
    return nn.functional.cross_entropy(model(inputs), targets)


class CharLSTM(nn.Module):
    def __init__(self, vocab: int = 64, embed: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(tokens))[0]).flatten(0, 1)


class TransformerLayer(nn.Module):
    def __init__(self, vocab: int = 64, width: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layer = nn.TransformerEncoderLayer(
            width, 4, dim_feedforward=4 * width, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(tokens))).flatten(0, 1)


def cnn_with_batchnorm() -> nn.Module:
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(
        block(3, 16), nn.MaxPool2d(2), block(16, 32), nn.MaxPool2d(2), block(32, 32),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


def models(quick: bool) -> list[tuple[str, nn.Module, tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    batch = 32 if quick else 64
    tokens = torch.randint(0, 64, (batch // 2, 51))
    text_batch = (tokens[:, :-1], tokens[:, 1:].flatten())
    return [
        (
            "MLP 784-256-256-10",
            nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(),
                          nn.Linear(256, 10)),
            (torch.randn(batch, 784), torch.randint(0, 10, (batch,))),
        ),
        (
            "CNN with BatchNorm",
            cnn_with_batchnorm(),
            (torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))),
        ),
        ("char-LSTM 32/128", CharLSTM(), text_batch),
        ("transformer layer 128", TransformerLayer(), text_batch),
    ]  # fmt: skip


def median_timed(work: Callable[[], object], repeats: int) -> tuple[float, object]:
    """The median wall time of ``repeats`` calls after one untimed warm-up call (the first call
    pays one-time costs: allocations, lazy initialization), and the last call's result."""
    result = work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def hvp_costs(quick: bool) -> list[list[str]]:
    """Per round, the gradient as training computes it (ATen's kernels) and then each HVP
    method with the probe's kernels, each the median of 3 calls after a warm-up; a method's
    figure is the median over the rounds of its ratio to that round's gradient, so the
    machine's drift from one minute to the next cancels out of the ratios."""
    rows = []
    rounds = 3 if quick else 9
    cpu = torch.device("cpu")
    for name, model, batch in models(quick):
        model.train()
        parameters = [p for p in model.parameters() if p.requires_grad]

        def gradient() -> object:
            return torch.autograd.grad(cross_entropy(model, batch), parameters)

        with preserved_rng():
            with double_backward_backends(cpu):
                objective = ProbeObjective(model, cross_entropy, [batch], retain_graphs=True)
                objective.gradient(create_graph=True)
                vector = torch.randn(sum(p.numel() for p in parameters))
                graph_mib = saved_graph_bytes(model, cross_entropy, batch) / 2**20
                failures: dict[str, str] = {}
                for method in HVP_METHODS:
                    try:
                        objective.hvp_with(method, vector)
                    except Exception as error:
                        failures[method] = f"fails ({type(error).__name__})"
            ratios: dict[str, list[float]] = {m: [] for m in HVP_METHODS if m not in failures}
            gradient_times = []
            for _ in range(rounds):
                gradient_seconds = median_timed(gradient, 3)[0]
                gradient_times.append(gradient_seconds)
                with double_backward_backends(cpu):
                    for method, values in ratios.items():
                        seconds = median_timed(lambda m=method: objective.hvp_with(m, vector), 3)[0]
                        values.append(seconds / gradient_seconds)
            objective.release()
        cells = [
            name,
            f"{sum(p.numel() for p in parameters):,}",
            f"{statistics.median(gradient_times) * 1e3:.1f}",
            f"{graph_mib:.1f}",
        ]
        for method in HVP_METHODS:
            cells.append(failures.get(method) or f"{statistics.median(ratios[method]):.2f}x")
        rows.append(cells)
    return rows


def eigen_accuracy(quick: bool) -> list[list[str]]:
    """Each solver once untimed, then in interleaved rounds (3) one timed solve each; seconds
    are medians over the rounds, and Lanczos / PyHessian the median of the rounds' ratios."""
    try:
        from pyhessian import hessian as pyhessian_hessian
    except ImportError:
        pyhessian_hessian = None
    rows = []
    rounds = 1 if quick else 3
    for name, model, batch in models(quick):
        model.eval()
        reference = hessian_norm(model, cross_entropy, [batch], rtol=1e-9, max_hvps=300).eigenvalue

        def relative_error(value: float) -> str:
            return f"{abs(abs(value) - abs(reference)) / abs(reference):.1e}"

        def ours(solver) -> Callable[[], tuple[float, int]]:
            def solve() -> tuple[float, int]:
                with double_backward_backends(torch.device("cpu")):
                    objective = ProbeObjective(model, cross_entropy, [batch], retain_graphs=True)
                    objective.gradient(create_graph=True)
                    generator = torch.Generator().manual_seed(1)
                    start = torch.randn(
                        sum(p.numel() for p in objective.parameters), generator=generator
                    )
                    result = solver(objective.hvp, start, rtol=1e-3, max_matvecs=100)
                    objective.release()
                return result.eigenvalue, result.num_matvecs

            return solve

        def pyhessian_top(math_attention: bool) -> tuple[float, int]:
            torch.manual_seed(1)
            with contextlib.ExitStack() as stack:
                # PyHessian takes its gradient with backward(create_graph=True): torch warns.
                stack.enter_context(warnings.catch_warnings())
                warnings.filterwarnings("ignore", message="Using backward.. with create_graph")
                if math_attention:
                    from torch.nn.attention import SDPBackend, sdpa_kernel

                    stack.enter_context(sdpa_kernel(SDPBackend.MATH))
                computer = pyhessian_hessian(
                    model, nn.functional.cross_entropy, data=batch, cuda=False
                )
                values, _ = computer.eigenvalues(maxIter=100, tol=1e-3, top_n=1)
            return values[0], -1

        solvers = {
            "lanczos": ours(lanczos_top_eigenpair),
            "power": ours(power_iteration_top_eigenpair),
        }
        results = {key: solve() for key, solve in solvers.items()}  # untimed warm-up
        note = ""
        if pyhessian_hessian is not None:
            try:
                results["pyhessian"] = pyhessian_top(False)
                solvers["pyhessian"] = lambda: pyhessian_top(False)
            except RuntimeError:
                note = " (fails as is; with math attention)"
                results["pyhessian"] = pyhessian_top(True)
                solvers["pyhessian"] = lambda: pyhessian_top(True)
        times: dict[str, list[float]] = {key: [] for key in solvers}
        for _ in range(rounds):
            for key, solve in solvers.items():
                started = time.perf_counter()
                solve()
                times[key].append(time.perf_counter() - started)
        cells = [name, f"{reference:.4g}"]
        for key in ("lanczos", "power"):
            value, count = results[key]
            cells += [str(count), f"{statistics.median(times[key]):.3f}", relative_error(value)]
        if "pyhessian" in solvers:
            ratios = [mine / theirs for mine, theirs in zip(times["lanczos"], times["pyhessian"])]
            cells += [
                f"{statistics.median(times['pyhessian']):.3f}{note}",
                relative_error(results["pyhessian"][0]),
                f"{statistics.median(ratios):.2f}",
            ]
        rows.append(cells)
    return rows, pyhessian_hessian is not None


def warm_start(quick: bool) -> list[list[str]]:
    """HVPs per probe along SGD on one batch, probing every 5 steps: the first (cold) probe,
    the mean of the warm-started ones in the first 60 steps (where the Hessian changes fastest)
    and over the whole run of 300."""
    rows = []
    early, steps = (20, 100) if quick else (60, 300)
    for name, model, batch in models(quick):
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        probe = Probe(model, cross_entropy, [batch], every=5, estimators=("hvp",), rtol=1e-3)
        for step in range(steps):
            with probe.around_step(step):
                optimizer.zero_grad()
                cross_entropy(model, batch).backward()
                optimizer.step()
        counts = [r.hvp_count for r in probe.records]
        warm_early = [r.hvp_count for r in probe.records[1:] if r.step < early]
        converged = sum(r.hessian_converged for r in probe.records)
        rows.append([
            name, str(len(counts)), str(counts[0]), f"{statistics.mean(warm_early):.1f}",
            f"{statistics.mean(counts[1:]):.1f}", f"{converged}/{len(counts)}", probe.hvp_method,
        ])  # fmt: skip
    return rows


PEER_RTOL = 1e-3
"""smoothprof's certified rtol, the relative error hessian-eigenthings' oracle step count must
reach, and scipy's eigsh tolerance (its own residual rule)."""
PYHESSIAN_TOL = 1e-5
PYHESSIAN_MAX_ITER = 300
EIGENTHINGS_MAX_ITER = 150
REFERENCE_RTOL = 1e-6
START_SEED = 1  # every solver's start vector; the reference starts elsewhere (seed 2)


class FlatLogits(nn.Module):
    """A language model's logits with one row per token, so that every solver's loss is
    ``cross_entropy(model(inputs), targets)`` on a batch ``(inputs, flat targets)``."""

    def __init__(self, language_model: nn.Module) -> None:
        super().__init__()
        self.language_model = language_model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.language_model(tokens)
        return logits.reshape(-1, logits.shape[-1])


def language_model(quick: bool) -> tuple[str, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """benchmarks/models/transformer_lm_25m.py (25.5M parameters; with ``quick`` its 3.3M
    member, width 256 and 4 layers) on its first batch of 8 x 128 bytes."""
    import importlib.util

    path = REPO / "benchmarks" / "models" / "transformer_lm_25m.py"
    spec = importlib.util.spec_from_file_location("transformer_lm_25m", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.build(256, 4) if quick else module.build()
    tokens = module.dataloader()[0]
    size = sum(p.numel() for p in model.parameters())
    name = f"transformer LM {size / 1e6:.1f}M"
    return name, FlatLogits(model), (tokens[:, :-1], tokens[:, 1:].reshape(-1))


@dataclass
class PeerRun:
    """One solver on one model: its eigenvalue and products from the first solve, the wall
    times of the timed solves, and what had to change for it to run (or why it did not)."""

    name: str
    solve: Callable[[], tuple[float, int]] | None
    note: str = ""
    eigenvalue: float = math.nan
    hvps: int = 0
    seconds: list[float] = field(default_factory=list)

    def first(self, math_attention: Callable[[], tuple[float, int]] | None) -> None:
        """The first solve, as is; when it raises, once more with PyTorch's math attention
        kernel (double backward through the CPU's flash kernel fails); else the run fails."""
        if self.solve is None:
            return
        try:
            self.eigenvalue, self.hvps = self.solve()
        except Exception as error:  # a peer's own failure, reported in the table
            if math_attention is None:
                self.solve, self.note = None, f"fails ({type(error).__name__})"
                return
            try:
                self.eigenvalue, self.hvps = math_attention()
            except Exception as second:
                self.solve, self.note = None, f"fails ({type(second).__name__})"
                return
            self.solve = math_attention
            self.note = ", ".join(filter(None, [self.note, "with math attention"]))

    def timed(self) -> None:
        if self.solve is not None:
            started = time.perf_counter()
            self.solve()
            self.seconds.append(time.perf_counter() - started)


def with_math_attention(solve: Callable[[], tuple[float, int]]) -> Callable[[], tuple[float, int]]:
    def wrapped() -> tuple[float, int]:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return solve()

    return wrapped


def smoothprof_solver(model, batch, start) -> Callable[[], tuple[float, int]]:
    def solve() -> tuple[float, int]:
        result = hessian_norm(
            model, cross_entropy, [batch], rtol=PEER_RTOL, start=start, mode="eval"
        )
        return result.eigenvalue, result.num_hvps

    return solve


def pyhessian_solver(model, batch) -> Callable[[], tuple[float, int]]:
    """PyHessian 0.1's power iteration at ``tol`` PYHESSIAN_TOL (its rule: the Rayleigh
    quotient changed by less than tol, relative), its products counted."""
    import importlib

    module = importlib.import_module("pyhessian.hessian")  # the package shadows it by a class

    def solve() -> tuple[float, int]:
        count = 0
        original = module.hessian_vector_product

        def counted(*args):
            nonlocal count
            count += 1
            return original(*args)

        torch.manual_seed(START_SEED)
        model.zero_grad(set_to_none=True)
        module.hessian_vector_product = counted
        try:
            with warnings.catch_warnings():  # its backward(create_graph=True): torch warns
                warnings.filterwarnings("ignore", message="Using backward.. with create_graph")
                computer = module.hessian(model, nn.functional.cross_entropy, data=batch,
                                          cuda=False)  # fmt: skip
                values, _ = computer.eigenvalues(
                    maxIter=PYHESSIAN_MAX_ITER, tol=PYHESSIAN_TOL, top_n=1
                )
        finally:
            module.hessian_vector_product = original
            model.zero_grad(set_to_none=True)
        return values[0], count

    return solve


def eigenthings_operator(model, batch):
    from hessian_eigenthings import HessianOperator

    def loss(model, batch) -> torch.Tensor:
        inputs, targets = batch
        return nn.functional.cross_entropy(model(inputs), targets)

    return HessianOperator(model, [batch], loss)


def eigenthings_smallest_max_iters(
    model, batch, reference: float, errors: tuple[float, ...], math_attention: bool, hint: int
) -> list[int]:
    """For each relative error in ``errors``, the smallest ``max_iter`` at which
    hessian-eigenthings' ``lanczos(k=1)`` is within it of ``reference`` (0: not within
    EIGENTHINGS_MAX_ITER steps): the top |Ritz value| of each leading block of the tridiagonal
    matrix of one run of its ``lanczos_tridiagonal`` from the start vector ``lanczos`` draws.
    These are the steps ``lanczos(max_iter=m)`` takes, as it reorthogonalizes up to 50 steps
    and not beyond. The run goes to ``hint`` steps (at most 50), to 50 when that does not
    suffice, and then, without reorthogonalizing, from step 51. Outside the timed rounds;
    counts and rounding, no clock."""
    from hessian_eigenthings import lanczos_tridiagonal

    context = contextlib.nullcontext()
    if math_attention:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        context = sdpa_kernel(SDPBackend.MATH)
    operator = eigenthings_operator(model, batch)
    generator = torch.Generator().manual_seed(START_SEED)
    start = torch.randn(operator.size, dtype=operator.dtype, generator=generator)
    found = [0] * len(errors)
    stages = [(1, min(hint, 50), True)]
    if hint < 50:
        stages.append((1, 50, True))
    stages.append((51, EIGENTHINGS_MAX_ITER, False))
    for first, last, reorthogonalize in stages:
        if all(found):
            break
        with context:
            steps = lanczos_tridiagonal(operator, start, last, reorthogonalize=reorthogonalize)
        alphas, betas = steps.alphas.double(), steps.betas.double()
        for m in range(first, steps.iterations + 1):
            tridiagonal = torch.diag(alphas[:m])
            if m > 1:
                tridiagonal += torch.diag(betas[: m - 1], 1) + torch.diag(betas[: m - 1], -1)
            top = float(torch.linalg.eigvalsh(tridiagonal).abs().max())
            for i, error in enumerate(errors):
                if not found[i] and abs(top - abs(reference)) <= error * abs(reference):
                    found[i] = m
    return found


def eigenthings_solver(model, batch, max_iter: int) -> Callable[[], tuple[float, int]]:
    from hessian_eigenthings import lanczos

    def solve() -> tuple[float, int]:
        model.zero_grad(set_to_none=True)
        operator = eigenthings_operator(model, batch)
        result = lanczos(operator, k=1, max_iter=max_iter, seed=START_SEED)
        return float(result.eigenvalues[0]), result.iterations

    return solve


def curvlinops_solver(model, batch, start) -> Callable[[], tuple[float, int]]:
    """curvlinops' HessianLinearOperator as a scipy operator, ``eigsh(k=1, which="LM")`` (the
    largest magnitude: the quantity measured here) at ``tol`` PEER_RTOL from the same start.
    Its determinism check (extra products at construction) is turned off: in its favour."""
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    def solve() -> tuple[float, int]:
        parameters = [p for p in model.parameters() if p.requires_grad]
        hessian = HessianLinearOperator(
            model, nn.CrossEntropyLoss(), parameters, [batch],
            check_deterministic=False, num_data=len(batch[0]),
        ).to_scipy()  # fmt: skip
        count = 0

        def matvec(vector):
            nonlocal count
            count += 1
            return hessian @ vector

        operator = LinearOperator(hessian.shape, matvec=matvec, dtype=hessian.dtype)
        values = eigsh(operator, k=1, which="LM", tol=PEER_RTOL, v0=start.double().numpy(),
                       return_eigenvectors=False)  # fmt: skip
        return float(values[0]), count

    return solve


PEER_PACKAGES = {
    "PyHessian": "pyhessian",
    "hessian-eigenthings": "hessian_eigenthings",
    "curvlinops": "curvlinops",
}


def installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def peer_speed(quick: bool) -> tuple[list[list[str]], list[list[str]]]:
    """Per model: a reference eigenvalue (Lanczos certified to REFERENCE_RTOL from another
    start), each solver's first solve (products, error; untimed for the small models), then
    interleaved timed rounds (3 for the small models, 1 for the language model; 1 and 1 with
    ``quick``). Seconds are medians over the rounds, ratios medians of the rounds' ratios."""
    accuracy, speed = [], []
    small = [(name, model, batch, False) for name, model, batch in models(quick)]
    for name, model, batch, large in [*small, (*language_model(quick), True)]:
        model.eval()
        dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{name}: {dim:,} parameters", file=sys.stderr, flush=True)
        reference = hessian_norm(
            model, cross_entropy, [batch], rtol=REFERENCE_RTOL, max_hvps=300, mode="eval",
            start=torch.randn(dim, generator=torch.Generator().manual_seed(2)),
        )  # fmt: skip
        print(f"  reference: {reference.num_hvps} products, {reference.eigenvalue:.8g}, "
              f"converged {reference.converged}", file=sys.stderr, flush=True)  # fmt: skip
        start = torch.randn(dim, generator=torch.Generator().manual_seed(START_SEED))
        runs = [PeerRun("smoothprof", smoothprof_solver(model, batch, start))]
        for peer, module in PEER_PACKAGES.items():
            if not installed(module):
                runs.append(PeerRun(peer, None, note="not installed"))
            elif peer == "PyHessian":
                runs.append(PeerRun(peer, pyhessian_solver(model, batch)))
            elif peer == "curvlinops":
                runs.append(PeerRun(peer, curvlinops_solver(model, batch, start)))
            else:
                runs.append(PeerRun(peer, None))  # its step count is searched below
        for run in runs:
            if run.name == "hessian-eigenthings" and not run.note:
                # the oracle step count, and the one for smoothprof's own error
                ours_error = abs(abs(runs[0].eigenvalue) - reference.value) / reference.value
                errors = (PEER_RTOL, max(ours_error, 1e-7))
                math_attention = False
                try:
                    found = eigenthings_smallest_max_iters(
                        model, batch, reference.value, errors, False, runs[0].hvps + 10
                    )
                except RuntimeError:
                    found = eigenthings_smallest_max_iters(
                        model, batch, reference.value, errors, True, runs[0].hvps + 10
                    )
                    math_attention = True
                steps_for_ours = f"{found[1]} for {errors[1]:.0e}" if found[1] else (
                    f"> {EIGENTHINGS_MAX_ITER} for {errors[1]:.0e}"
                )  # fmt: skip
                if not found[0]:
                    run.note = f"not within {PEER_RTOL:g} in {EIGENTHINGS_MAX_ITER} steps"
                    continue
                run.solve = eigenthings_solver(model, batch, found[0])
                run.note = steps_for_ours
                if math_attention:
                    run.solve = with_math_attention(run.solve)
                    run.note += ", with math attention"
            fallback = None if run.name == "smoothprof" or run.solve is None else (
                with_math_attention(run.solve)
            )  # fmt: skip
            if large:
                started = time.perf_counter()
                run.first(fallback)
                run.seconds.append(time.perf_counter() - started)
            else:
                run.first(fallback)
            print(f"  {run.name}: {run.hvps} products, {run.eigenvalue:.6g} {run.note}",
                  file=sys.stderr, flush=True)  # fmt: skip
        rounds = (0 if large else 1) if quick else (0 if large else 3)
        for _ in range(rounds):
            for run in runs:
                run.timed()

        def error(value: float) -> str:
            return f"{abs(abs(value) - reference.value) / reference.value:.1e}"

        row = [name, f"{dim:,}", f"{reference.value:.5g}"]
        timing = [name]
        ours = runs[0]
        for run in runs:
            if run.solve is None:
                row += [run.note or "-", "", ""]
                timing += [run.note or "-", ""]
                continue
            row += [str(run.hvps), error(run.eigenvalue), run.note]
            timing.append(f"{statistics.median(run.seconds):.3f}")
            if run is not ours:
                ratios = [mine / theirs for mine, theirs in zip(ours.seconds, run.seconds)]
                timing.append(f"{statistics.median(ratios):.2f}")
        accuracy.append(row)
        speed.append(timing)
    return accuracy, speed


REAL_MODELS = ("gpt2_bytes.py", "gpt2_bytes_adamw.py", "timm_resnet.py", "mobilenet_small.py")
"""Sample models of packages users train with: optional extras, not in the other tables."""


def overhead(quick: bool) -> list[list[str]]:
    """Each sample model at its defaults without probes, with probes at its own schedule, and
    with an overhead budget of 0.25 (``--max-overhead``, opt-in) on top of that schedule; the
    three runs interleaved and repeated (3 rounds, the median of each), as wall times on a
    shared machine drift by tens of percent between minutes."""
    rows = []
    rounds = 1 if quick else 3
    for path in sorted((REPO / "sample_models").glob("*.py")):
        if path.name in REAL_MODELS:
            continue
        spec = load_model_file(path)
        seconds: dict[str, list[float]] = {"off": [], "own": [], "capped": []}
        probes: dict[str, int] = {}
        variants = (("off", {"probe_every": 0}), ("own", {}), ("capped", {"max_overhead": 0.25}))
        for _ in range(rounds):
            for label, options in variants:
                if quick:
                    options = {**options, "steps": 100}
                config = RunConfig.from_options(spec.defaults, options)
                started = time.perf_counter()
                result = train(prepare_run(spec, config))
                seconds[label].append(time.perf_counter() - started)
                probes[label] = len(result.probes)
        off, own, capped = (statistics.median(seconds[k]) for k in ("off", "own", "capped"))
        rows.append([
            path.name, f"{off:.2f}",
            f"{own / off:.2f}x", str(probes["own"]),
            f"{capped / off:.2f}x", str(probes["capped"]),
        ])  # fmt: skip
    return rows


def real_models(quick: bool) -> list[list[str]]:
    """Each real sample model for a short run at the tool's defaults (the schedule's probes, the
    probe batches chosen for the model's size, the first HVP method that works)."""
    from smoothprof.errors import ModelFileError

    rows = []
    steps, num_probes = (10, 3) if quick else (40, 6)
    for name in REAL_MODELS:
        path = REPO / "sample_models" / name
        if not path.exists():
            rows.append([name, "-", "missing", "", "", "", "", ""])
            continue
        try:
            spec = load_model_file(path)
        except ModelFileError as error:  # its package is not installed here
            rows.append([name, "-", f"skipped: {error}".split(";")[0][:60], "", "", "", "", ""])
            continue
        config = RunConfig.from_options({}, {"steps": steps, "num_probes": num_probes})
        prepared = prepare_run(spec, config)
        num_parameters = sum(p.numel() for p in prepared.model.parameters() if p.requires_grad)
        result = train(prepared)
        records = result.probes
        cost = prepared.probing_cost(result)
        work = cost.work
        warm = [r.seconds for r in records[1:]]
        step_seconds = (result.seconds - result.probe_seconds) / steps
        rows.append([
            name, f"{num_parameters:,}", result.hvp_method,
            str(len(prepared.probe_batches)), f"{work.hvps:.1f}",
            f"{records[0].seconds / step_seconds:.0f}",
            f"{statistics.median(warm) / step_seconds:.0f}" if warm else "-",
            f"{cost.share:.0%}",
        ])  # fmt: skip
    return rows


PER_LAYER_MODELS = ("linear_rnn.py", "mlp_spirals.py")


def per_layer_cost(quick: bool) -> list[list[str]]:
    """Each model's run at its defaults (``steps`` 100 with ``--quick``) with and without
    ``--per-layer``: the per-layer probe's extra HVPs (each a whole HVP, restricted to a group)
    and the ratio of the median probe times."""
    rows = []
    for name in PER_LAYER_MODELS:
        spec = load_model_file(REPO / "sample_models" / name)
        options = {"steps": 100} if quick else {}
        probes = {}
        for per_layer in (False, True):
            config = RunConfig.from_options(spec.defaults, {**options, "per_layer": per_layer})
            prepared = prepare_run(spec, config)
            result = train(prepared)
            probes[per_layer] = (prepared, result)
        prepared, result = probes[True]
        work = prepared.probing_cost(result).work
        plain_seconds = statistics.median(r.seconds for r in probes[False][1].probes)
        layer_seconds = statistics.median(r.seconds for r in result.probes)
        rows.append([
            name, str(work.num_groups), f"{work.hvps - work.group_hvps:.1f}",
            f"{work.group_hvps:.1f}", f"{work.group_hvps / work.num_groups:.1f}",
            f"{layer_seconds / plain_seconds:.2f}x",
        ])  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches, fewer repeats")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument(
        "--tables",
        default="hvp,eigen,warm,overhead,real,layers",
        help="which tables to print, comma-separated (default: all but peers)",
    )
    args = parser.parse_args()
    chosen = set(args.tables.split(","))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"Python {sys.version.split()[0]}\n"
    )
    if "hvp" in chosen:
        print(table(
            "HVP cost per eigen-solver iteration, as a multiple of one gradient (median)",
            ["model", "parameters", "gradient ms", "graph MiB", *HVP_METHODS],
            hvp_costs(args.quick), args.markdown,
        ))  # fmt: skip
    if "eigen" in chosen:
        rows, have_pyhessian = eigen_accuracy(args.quick)
        header = ["model", "abs(lambda) ref.", "Lanczos HVPs", "s", "rel. error",
                  "power-it. HVPs", "s", "rel. error"]  # fmt: skip
        if have_pyhessian:
            header += ["PyHessian s", "rel. error", "Lanczos s / PyHessian s"]
        print(table("Top eigenvalue to rtol 1e-3 (eval mode, same batch and start)", header,
                    rows, args.markdown))  # fmt: skip
    if "peers" in chosen:
        accuracy, speed = peer_speed(args.quick)
        solvers = ["smoothprof", *PEER_PACKAGES]
        header = ["model", "parameters", "abs(lambda) ref."]
        for solver in solvers:
            header += [f"{solver} HVPs", "rel. error", "note"]
        print(table(
            f"Top eigenvalue: smoothprof certified to rtol {PEER_RTOL:g}, PyHessian at tol "
            f"{PYHESSIAN_TOL:g}, hessian-eigenthings at its smallest max_iter within "
            f"{PEER_RTOL:g}, curvlinops + eigsh at tol {PEER_RTOL:g} (eval mode, same start)",
            header, accuracy, args.markdown,
        ))  # fmt: skip
        header = ["model", "smoothprof s"]
        for solver in PEER_PACKAGES:
            header += [f"{solver} s", f"smoothprof s / {solver} s"]
        print(table("The same solves' wall time (median) and smoothprof's over each peer's",
                    header, speed, args.markdown))  # fmt: skip
    if "warm" in chosen:
        print(table(
            "Warm start from the previous eigenvector, probing every 5 SGD steps",
            ["model", "probes", "HVPs first", "mean after, steps < 60", "mean after, all steps",
             "certified", "HVP method"],
            warm_start(args.quick), args.markdown,
        ))  # fmt: skip
    if "overhead" in chosen:
        print(table(
            "Sample models: run time with probes over run time without",
            ["model file", "no probes s", "own schedule", "probes", "with --max-overhead 0.25",
             "probes"],
            overhead(args.quick), args.markdown,
        ))  # fmt: skip
    if "real" in chosen:
        print(table(
            "Real models at the tool's defaults (short runs): a probe in gradient evaluations",
            ["model file", "parameters", "HVP method", "probe batches", "HVPs per probe",
             "first probe, gradients", "warm probe, gradients", "probing share"],
            real_models(args.quick), args.markdown,
        ))  # fmt: skip
    if "layers" in chosen:
        print(table(
            "Per-layer probe (--per-layer, default groups): HVPs per probe and probe time",
            ["model file", "groups", "whole-model HVPs", "per-layer HVPs", "per group",
             "probe time with / without"],
            per_layer_cost(args.quick), args.markdown,
        ))  # fmt: skip


if __name__ == "__main__":
    main()
