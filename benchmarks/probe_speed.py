"""How fast and how exact the probe is, measured side by side in one run.

    python benchmarks/probe_speed.py [--quick] [--markdown] [--tables hvp,eigen,warm,overhead]

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

Ratios, not seconds, are the figures to compare: they are measured in one process on one
machine, which the header states.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
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


def table(title: str, header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = [f"**{title}**", "", "| " + " | ".join(header) + " |",
                 "|" + "---|" * len(header)]  # fmt: skip
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines) + "\n"
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches, fewer repeats")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument(
        "--tables",
        default="hvp,eigen,warm,overhead,real,layers",
        help="which tables to print, comma-separated (default: all six)",
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
