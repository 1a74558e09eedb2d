"""The probe's memory against a training step's, and its cost as the model grows (issue 17).

    python benchmarks/probe_memory.py [--quick] [--markdown] [--tables memory,bytes,cost]

On the byte-level transformer language model of ``benchmarks/models/transformer_lm_25m.py``
(25.5M parameters) and its family at 0.5M, 3.3M and 10.8M (``build(width, layers)``), batches
of 8 sequences of 128 bytes:

1. Memory (``memory``): the peak resident set size (VmHWM) of one training step and of one
   probe, each configuration in a process of its own (``--child``), on the 25.5M model (3.3M
   with ``--quick``). The process first sets glibc's mmap threshold to 64 KiB (``mallopt``), so
   that every tensor of a model's size lives in its own mapping and is returned to the system
   when freed: the RSS then follows the tensors' lifetimes instead of the allocator's caches.
   It builds the model and its optimizer, takes one training step (so that gradients and the
   optimizer's state exist, as in a run), then measures, resetting the high-water mark before
   each (``/proc/self/clear_refs``): a training step ("training step"); a probe as ``smoothprof
   run`` takes it ("probe": the larger of ``Probe.before_step``, the loss, gradient, curvature
   and top eigenpair, and ``after_step``, the finite difference along the update, on one probe
   batch); and the training step between them, while the probe holds its gradient and the
   point to difference from ("probed step"). The eigen-solve either fills its basis and
   restarts once (``rtol`` 1e-12, ``max_basis`` + 1 products: the most a solve with that bound
   holds) or runs to rtol 1e-3, the run's default (its eigenvalue, HVPs and certificate).
   "other" is what the process holds besides the model's tensors (the Python and torch runtime,
   the data, kernels' caches): its RSS before the measured step less the parameters, gradients
   and optimizer state. "tensors only" is the probe's peak over the step's with "other" taken
   off both: what ``torch.cuda.max_memory_allocated`` would compare on a GPU. "estimate" is
   ``smoothprof.memory``'s count of the step and of the probe (plus "other"), as a run makes it
   before training.
2. Bytes (``bytes``): counted, not timed, per model: one vector of the model's size, one batch's
   training activations and the probe's double-backward graph (``objective.
   saved_activation_bytes`` and ``saved_graph_bytes``), and these per token; and the graph per
   token and layer fitted as ``a * width + b * heads * length`` from two sequence lengths.
3. Cost (``cost``): per model, one gradient and one HVP on one batch (the retained graph, and
   the graph rebuilt per product), timed in 3 interleaved rounds (the median of the rounds'
   ratios); a run's probes (SGD at lr 0.1, probes at steps 0 and 3 at the run's defaults:
   estimators fd, hvp and curvature, rtol 1e-3, a basis of 20): the cold and the warm one, their
   HVPs (the solve's and the curvature's) and wall time in gradients; and the finite-difference
   HVP's relative error ||FD(u) - H u|| / ||H u|| along the probe's last eigenvector u.

Timings are ratios measured in one process; memory is counted, or read from the kernel for
this process alone, which other processes running on the machine do not change.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/tables.py

from tables import table

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20
FAMILY = ((128, 2), (256, 4), (384, 6), (512, 8))
"""(width, layers) of the family: 0.5M, 3.3M, 10.8M and 25.5M parameters."""
MMAP_THRESHOLD = 1 << 16


def use_mmap_for_large_allocations() -> None:
    """glibc: allocations of 64 KiB and more get their own mapping, returned when freed
    (``M_MMAP_THRESHOLD`` = -3 fixes the threshold; ``M_TRIM_THRESHOLD`` = -1 trims the heap)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, MMAP_THRESHOLD)
    libc.mallopt(-1, MMAP_THRESHOLD)


def status_bytes(key: str) -> int:
    """A ``/proc/self/status`` figure (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> None:
    """Set VmHWM to the current RSS (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_of(work) -> tuple[int, object]:
    """The peak RSS while ``work()`` runs, and its result."""
    reset_peak()
    result = work()
    return status_bytes("VmHWM"), result


def family_model(width: int, layers: int):
    """The family's model module (imported from its file), a model of it, and its batches."""
    sys.path.insert(0, str(REPO / "benchmarks" / "models"))
    import torch
    import transformer_lm_25m as family

    torch.manual_seed(0)
    return family, family.build(width, layers), family.dataloader()


def memory_child(options: dict) -> dict:
    """One configuration's peaks, in this (fresh) process: see the module's docstring."""
    use_mmap_for_large_allocations()
    import torch

    from smoothprof import Probe

    runtime = status_bytes("VmRSS")
    family, model, batches = family_model(options["width"], options["layers"])
    if options["optimizer"] == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    stream = iter(batches[1:])

    def training_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        family.loss(model, next(stream)).backward()
        optimizer.step()

    training_step()  # gradients and the optimizer's state exist from here on, as in a run
    before = status_bytes("VmRSS")
    training_peak, _ = peak_of(training_step)
    max_basis = options["max_basis"]
    converge = options.get("converge", False)
    probe = Probe(
        model,
        family.loss,
        batches[:1],
        every=1,
        rtol=1e-3 if converge else 1e-12,
        max_hvps=100 if converge else max_basis + 1,
        max_basis=max_basis,
        hvp_method=options["hvp_method"],
        optimizer=optimizer,
    )
    solve_peak, _ = peak_of(lambda: probe.before_step(0))
    probed_step_peak, _ = peak_of(training_step)
    finite_difference_peak, record = peak_of(lambda: probe.after_step())
    return {
        **options,
        "parameters": sum(p.numel() for p in model.parameters()),
        "runtime": runtime,
        "before_training_step": before,
        "training_step": training_peak,
        "probe_solve": solve_peak,
        "probed_training_step": probed_step_peak,
        "probe_finite_difference": finite_difference_peak,
        "probe": max(solve_peak, finite_difference_peak),
        "eigenvalue": record.hessian_eig,
        "hvps": record.hvp_count,
        "converged": record.hessian_converged,
        "hvp_method": probe.hvp_method,
    }


def run_child(options: dict) -> dict:
    """``memory_child(options)`` in a fresh Python process (its peaks are its own)."""
    completed = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(options)],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"child {options} failed:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


MEMORY_CONFIGS = (
    # (optimizer, HVP method, max_basis, converge): the run's default probe, its solve filling
    # the basis (the most it holds) and to rtol 1e-3 (the run's); the leanest exact probe (the
    # graph rebuilt for every product, the smallest basis) to rtol 1e-3, and with AdamW; the
    # finite-difference HVP (no double-backward graph; not exact). A basis of 4 always fills.
    ("sgd", "retained", 20, False),
    ("sgd", "retained", 20, True),
    ("sgd", "double-backward", 4, True),
    ("adamw", "double-backward", 4, False),
    ("sgd", "finite-difference", 4, False),
)


def memory_rows(quick: bool) -> list[list[str]]:
    """One process per configuration (``memory_child``), beside ``smoothprof.memory``'s
    estimate of the same step and probe."""
    from smoothprof.memory import MemoryFootprint

    width, layers = FAMILY[1] if quick else FAMILY[-1]
    counted = counted_bytes(width, layers)
    rows = []
    for optimizer, method, max_basis, converge in MEMORY_CONFIGS:
        options = {"width": width, "layers": layers, "optimizer": optimizer,
                   "hvp_method": method, "max_basis": max_basis, "converge": converge}  # fmt: skip
        measured = run_child(options)
        footprint = MemoryFootprint(
            vector_bytes=counted["vector"],
            optimizer_vectors=2 if optimizer == "adamw" else 0,
            activation_bytes=counted["activations"],
            graph_bytes=counted["graph"],
            preconditioned=optimizer == "adamw",
        )
        estimate = footprint.probe_bytes(
            max_basis, retained_graphs=1 if method == "retained" else 0, hvp_method=method
        )
        # What the process holds besides the model's tensors (the runtime, the data, kernels'
        # caches): its RSS before the measured step less parameters, gradients and state.
        held = (2 + footprint.optimizer_vectors) * footprint.vector_bytes
        other = measured["before_training_step"] - held
        training, probe = measured["training_step"], measured["probe"]
        if converge:
            certified = "certified" if measured["converged"] else "not certified"
            solve = f"rtol 1e-3: {measured['eigenvalue']:.6g}, {measured['hvps']} HVPs, {certified}"
        else:
            solve = f"fills its basis: {measured['hvps']} HVPs"
        rows.append([
            f"{measured['parameters'] / 1e6:.1f}M", optimizer, method, str(max_basis), solve,
            mib(other), mib(training), mib(probe), f"{probe / training:.2f}",
            f"{(probe - other) / (training - other):.2f}",
            mib(measured["probed_training_step"]),
            f"{mib(other + footprint.training_step_bytes)} / {mib(other + estimate)}",
        ])  # fmt: skip
    return rows


def mib(num_bytes: float) -> str:
    return f"{num_bytes / MIB:,.0f}"


def counted_bytes(width: int, layers: int, length: int | None = None) -> dict[str, int]:
    """One vector's bytes, one batch's training activations and double-backward graph (of
    ``length`` tokens per sequence: the model's own by default), counted."""
    import torch

    from smoothprof.objective import (
        double_backward_backends,
        saved_activation_bytes,
        saved_graph_bytes,
    )

    family, model, batches = family_model(width, layers)
    batch = batches[0] if length is None else batches[0][:, : length + 1]
    activations = saved_activation_bytes(model, family.loss, batch)
    with double_backward_backends(torch.device("cpu")):
        graph = saved_graph_bytes(model, family.loss, batch)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "vector": sum(p.numel() * p.element_size() for p in model.parameters()),
        "activations": activations,
        "graph": graph,
        "tokens": (batch.shape[1] - 1) * batch.shape[0],
        "length": batch.shape[1] - 1,
        "batch": batch.shape[0],
    }


def bytes_rows(quick: bool) -> tuple[list[list[str]], str]:
    """Per model, the counted bytes; and the graph per token and layer fitted as
    ``a * width + b * heads * length`` from two sequence lengths of each model."""
    rows = []
    fits = []
    for width, layers in FAMILY[:2] if quick else FAMILY:
        full = counted_bytes(width, layers)
        half = counted_bytes(width, layers, full["length"] // 2)
        heads = max(1, width // 64)
        # graph / (batch * layers * length) = a * width + b * heads * length, at two lengths
        per = [c["graph"] / (c["batch"] * layers * c["length"]) for c in (full, half)]
        b = (per[0] - per[1]) / (heads * (full["length"] - half["length"]))
        a = (per[0] - b * heads * full["length"]) / width
        fits.append((a, b))
        tokens = full["tokens"]
        rows.append([
            f"{full['parameters']:,}", f"{width} x {layers}", mib(full["vector"]),
            mib(full["activations"]), mib(full["graph"]),
            f"{full['activations'] / tokens / 1024:.1f}", f"{full['graph'] / tokens / 1024:.1f}",
            f"{full['graph'] / full['activations']:.2f}", f"{a:.1f}", f"{b:.1f}",
        ])  # fmt: skip
    return rows, ""


def cost_rows(quick: bool) -> list[list[str]]:
    """Per model: gradient and HVP timed in interleaved rounds; a run's cold and warm probes."""
    import torch

    from smoothprof import Probe
    from smoothprof.objective import ProbeObjective, double_backward_backends

    rounds = 3
    rows = []
    cpu = torch.device("cpu")
    for width, layers in FAMILY[:2] if quick else FAMILY:
        family, model, batches = family_model(width, layers)
        parameters = [p for p in model.parameters() if p.requires_grad]
        batch = batches[0]
        vector = torch.randn(sum(p.numel() for p in parameters), generator=torch.Generator())

        def gradient() -> object:
            return torch.autograd.grad(family.loss(model, batch), parameters)

        with double_backward_backends(cpu):
            objective = ProbeObjective(model, family.loss, [batch], hvp_method="retained")
            objective.gradient(create_graph=True)
        seconds: dict[str, list[float]] = {"gradient": [], "retained": [], "double-backward": []}
        timed = {
            "gradient": gradient,
            "retained": lambda: objective.hvp_with("retained", vector),
            "double-backward": lambda: objective.hvp_with("double-backward", vector),
        }
        for work in timed.values():  # untimed: first calls pay one-time costs
            with double_backward_backends(cpu) if work is not gradient else nullcontext():
                work()
        for _ in range(rounds):
            for name, work in timed.items():
                with double_backward_backends(cpu) if name != "gradient" else nullcontext():
                    started = time.perf_counter()
                    work()
                    seconds[name].append(time.perf_counter() - started)
        objective.release()
        ratios = {
            name: statistics.median([s / g for s, g in zip(seconds[name], seconds["gradient"])])
            for name in ("retained", "double-backward")
        }
        gradient_seconds = statistics.median(seconds["gradient"])
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        probe = Probe(model, family.loss, [batch], schedule={0, 3})
        for step, training_batch in enumerate(batches[1:5]):
            with probe.around_step(step):
                optimizer.zero_grad(set_to_none=True)
                family.loss(model, training_batch).backward()
                optimizer.step()
        cold, warm = probe.records
        rows.append([
            f"{sum(p.numel() for p in parameters) / 1e6:.1f}M",
            f"{gradient_seconds * 1e3:,.0f}", f"{ratios['retained']:.2f}",
            f"{ratios['double-backward']:.2f}",
            f"{cold.hvp_count + 1}", f"{cold.seconds / gradient_seconds:.0f}",
            f"{warm.hvp_count + 1}", f"{warm.seconds / gradient_seconds:.0f}",
            "yes" if cold.hessian_converged and warm.hessian_converged else "no",
            finite_difference_error(model, family.loss, batch, probe),
        ])  # fmt: skip
    return rows


def finite_difference_error(model, loss, batch, probe) -> str:
    """||FD(u) - H u|| / ||H u|| for the probe's last eigenvector u, at the model's parameters."""
    import torch

    from smoothprof.objective import ProbeObjective, double_backward_backends

    with double_backward_backends(torch.device("cpu")):
        objective = ProbeObjective(model, loss, [batch], hvp_method="retained")
        objective.gradient(create_graph=True)
        direction = probe._eigenvector
        exact = objective.hvp_with("retained", direction)
        approximate = objective.hvp_with("finite-difference", direction)
        objective.release()
    error = torch.linalg.vector_norm(approximate - exact) / torch.linalg.vector_norm(exact)
    return f"{float(error):.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller models, fewer rounds")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--tables", default="memory,bytes,cost", help="comma-separated")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(memory_child(json.loads(args.child))))
        return
    use_mmap_for_large_allocations()  # this process builds the models too: no cached GBs
    import torch

    chosen = set(args.tables.split(","))
    started = time.perf_counter()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"Python {sys.version.split()[0]}\n"
    )
    if "memory" in chosen:
        print(table(
            "Peak resident memory (MiB) of a training step and of a probe, one process each",
            ["model", "optimizer", "HVP method", "max basis", "solve", "other", "training step",
             "probe", "probe / step", "tensors only", "probed step", "estimate: step / probe"],
            memory_rows(args.quick), args.markdown,
        ))  # fmt: skip
    if "bytes" in chosen:
        rows, _ = bytes_rows(args.quick)
        print(table(
            "Counted bytes per model (one batch of 8 x 128 tokens)",
            ["parameters", "width x layers", "vector MiB", "activations MiB", "graph MiB",
             "activations KiB/token", "graph KiB/token", "graph / activations",
             "a (B per token, layer, width)", "b (B per token, layer, head, length)"],
            rows, args.markdown,
        ))  # fmt: skip
    if "cost" in chosen:
        print(table(
            "Cost: an HVP in gradients (median of interleaved rounds), a probe in gradients",
            ["model", "gradient ms", "HVP retained", "HVP rebuilt", "cold probe HVPs",
             "cold probe, in gradients", "warm probe HVPs", "warm probe, in gradients",
             "certified", "FD-HVP rel. error"],
            cost_rows(args.quick), args.markdown,
        ))  # fmt: skip
    print(f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
