"""The probe's memory against a training step's, in counted bytes, and the Lanczos basis and
double-backward graph a run chooses so that the probe fits.

Arithmetic only: ``train.count_memory_footprint`` counts the bytes once before
training (one vector of the model's size, the optimizer's state, one batch's activations and
its double-backward graph: ``objective.saved_activation_bytes`` and ``saved_graph_bytes``);
this module estimates both peaks from them and makes the choice. Counts, not timings: the same
options on the same device choose the same, whatever else the machine runs.

A training step holds the parameters, the optimizer's state, and one batch's activations or the
gradients, whichever is larger (``MemoryFootprint.training_step_bytes``). A probe runs between
two steps: the parameters, the training's gradients and the optimizer's state stay, and the
probe adds, while it takes a product, the double-backward graph of every probe batch it retains
through the solve (``retained`` HVPs), or of one batch, rebuilt for every product and freed by
its backward as it goes (``double-backward``); the intermediate gradients of that backward; the
Lanczos basis (``max_basis`` vectors of the model's size) and ``PRODUCT_VECTORS`` more. The end
of a solve holds less: the retained graphs, the basis, and 6 to 7 vectors (the gradient, the
warm start, the eigenvector, the solver's last two), no intermediate gradients.

The constants are measured: benchmarks/probe_memory.py reads the peak resident memory of a
training step and of a probe on the 3.3M- and 25.5M-parameter transformers of
benchmarks/models/transformer_lm_25m.py, each solve filling its basis (docs/scaling.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .estimators import DEFAULT_MAX_BASIS, MIN_BASIS

RETAINED_MIN_BASIS = 8
"""The smallest basis the choice keeps the retained graph for. Below it restarts cost many
products (on the tests' hardest spectrum a basis of 10 took 131 against 62 for 20,
docs/scaling.md), so the choice rather rebuilds the graph for every product (about one more
gradient each) and keeps a larger basis."""

PRODUCT_VECTORS = 7
"""Vectors of the model's size a probe holds besides the basis while it takes a product (the
graph rebuilt per product): the gradient, the warm start, the solver's last vector and the new
one, the product per parameter and flat, the gradient being differentiated. Measured 6.3 (with
``REBUILT_BACKWARD_ACTIVATIONS`` at 0.8), on the 3.3M and 25.5M transformers at bases 4 and
20; one more with the graph retained (its gradient stays), two more with finite-difference
products (the saved parameters, the first gradient)."""
REBUILT_BACKWARD_ACTIVATIONS = 1.0
"""Intermediate gradients of a product's backward through a rebuilt graph, in one batch's
activations (0.8 measured): the backward frees the graph's tensors as it goes."""
RETAINED_BACKWARD_ACTIVATIONS = 2.0
"""The same through a retained graph, which the backward keeps (1.6 to 1.7 measured)."""
PRECONDITIONED_VECTORS = 3
"""More with Adam: the preconditioner, its eigenvector and the scaled vector of a product."""
DEVICE_SHARE = 0.8
"""By default a probe is fitted to this share of the device's memory: the rest is left for what
the estimate does not count (the runtime, allocator caches, the user's own tensors)."""


@dataclass(frozen=True)
class MemoryFootprint:
    """What a run's memory is made of, in bytes counted on the model and one probe batch.

    ``vector_bytes``: one vector of the model's size (its trainable parameters, so also their
    gradient, a Lanczos vector); ``optimizer_vectors``: vectors of state the optimizer keeps
    (0 for plain SGD, 1 with momentum, 2 for Adam); ``activation_bytes``: what a training
    batch's forward pass saves for its gradient; ``graph_bytes``: one probe batch's
    double-backward graph; ``preconditioned``: the probe also solves for Adam's
    preconditioned sharpness."""

    vector_bytes: int
    optimizer_vectors: int
    activation_bytes: int
    graph_bytes: int
    num_probe_batches: int = 1
    preconditioned: bool = False

    @property
    def training_step_bytes(self) -> int:
        """A training step's peak: the parameters and the optimizer's state, and the larger of
        one batch's activations and the gradients: the step sets the last gradients to None,
        and its backward frees the activations as it makes the new ones (2.5% below the peak
        resident memory measured on the 25.5M transformer, benchmarks/probe_memory.py)."""
        held = (1 + self.optimizer_vectors) * self.vector_bytes
        return held + max(self.activation_bytes, self.vector_bytes)

    def probe_bytes(self, max_basis: int, *, retained_graphs: int, hvp_method: str) -> int:
        """A probe's peak with a basis of ``max_basis`` vectors, ``retained_graphs`` probe
        batches' graphs kept through the solve (0: one batch's graph rebuilt per product), and
        ``hvp_method`` (``finite-difference`` products hold a gradient's activations, no
        graph; the others are counted as double-backward ones)."""
        retained = retained_graphs > 0 and hvp_method != "finite-difference"
        held = (2 + self.optimizer_vectors) * self.vector_bytes  # parameters, gradients, state
        extra = PRECONDITIONED_VECTORS if self.preconditioned else 0
        graphs = retained_graphs * self.graph_bytes if retained else 0
        if hvp_method == "finite-difference":  # two gradients: activations, no graph
            product_graph = self.activation_bytes
            product_vectors = PRODUCT_VECTORS + 2
        elif retained:
            product_graph = graphs + RETAINED_BACKWARD_ACTIVATIONS * self.activation_bytes
            product_vectors = PRODUCT_VECTORS + 1
        else:
            product_graph = self.graph_bytes + REBUILT_BACKWARD_ACTIVATIONS * self.activation_bytes
            product_vectors = PRODUCT_VECTORS
        product = product_graph + (max_basis + product_vectors + extra) * self.vector_bytes
        return math.ceil(held + product)


@dataclass(frozen=True)
class OptionNames:
    """How the options that set the probe's memory are spelled where the user gives them."""

    max_basis: str  # e.g. "--max-basis {}"
    set_by: str  # the options that set the choice, in words
    probe_memory: str  # e.g. "--probe-memory {}"
    smaller_batches: str  # where the probe batches are chosen


CLI_OPTIONS = OptionNames(
    "--max-basis {}",
    "--max-basis, --retain-graphs and --probe-memory",
    "--probe-memory {}",
    "probe_batches() in the model file",
)
CALLBACK_OPTIONS = OptionNames(
    "max_basis={}", "max_basis and probe_memory", "probe_memory={}", "probe_batches=[batch, ...]"
)


@dataclass(frozen=True)
class ProbeMemoryChoice:
    """The Lanczos basis, and whether the graph is retained, as a run chose them for memory.

    ``retain_graphs`` is False when the choice rebuilds the graph for every product (the run's
    ``retain_graphs`` becomes False), None when it leaves the run's setting as it was;
    ``graph_kept`` whether the probe keeps graphs through its solves, as chosen.
    ``limit_bytes`` is what the probe was fitted to, ``limit`` says what that is in words;
    ``fits`` whether the estimate is within it; ``changed`` whether the choice differs from
    what the run would do without a limit (the default basis, the graph as the options keep
    it); ``smallest_bytes`` the leanest probe the options allow; ``names`` how the user spells
    the options (``smoothprof run``'s flags, or a trainer callback's arguments)."""

    max_basis: int
    retain_graphs: bool | None
    graph_kept: bool
    probe_bytes: int
    training_step_bytes: int
    limit_bytes: int
    limit: str
    fits: bool
    changed: bool
    smallest_bytes: int
    names: OptionNames = CLI_OPTIONS

    def _estimate(self, probe_bytes: int) -> str:
        return (
            f"about {size_words(probe_bytes)}, "
            f"{probe_bytes / self.training_step_bytes:.1f}x a training step's "
            f"{size_words(self.training_step_bytes)}"
        )

    def _setting(self) -> str:
        graph = "kept" if self.graph_kept else "rebuilt per product"
        return f"{self.names.max_basis.format(self.max_basis)}, the double-backward graph {graph}"

    def describe(self) -> str:
        """The run header's line for the choice."""
        if not self.fits:
            return (
                f"note: the probe needs {self._estimate(self.probe_bytes)} even at "
                f"{self._setting()}: over {self.limit} ({size_words(self.limit_bytes)}), "
                "so it may run out of memory (docs/scaling.md)"
            )
        return (
            f"probe memory: {self._estimate(self.probe_bytes)} at {self._setting()}; chosen to "
            f"fit {self.limit} ({size_words(self.limit_bytes)}); {self.names.set_by} set it"
        )

    def shortfall(self) -> str:
        """Why the limit cannot be met (a user's ``--probe-memory``), as one line."""
        needed = math.ceil(10 * self.smallest_bytes / self.training_step_bytes) / 10
        return (
            f"the probe cannot fit {self.limit}: it needs {self._estimate(self.probe_bytes)} "
            f"even at {self._setting()}; allow {self.names.probe_memory.format(f'{needed:g}')} "
            f"or more, or probe on smaller batches ({self.names.smaller_batches}); see "
            "docs/scaling.md"
        )

    def as_json(self) -> dict[str, Any]:
        """What the trajectory's config records of the choice."""
        return {
            "probe_bytes": self.probe_bytes,
            "training_step_bytes": self.training_step_bytes,
            "limit_bytes": self.limit_bytes,
            "fits": self.fits,
            "changed": self.changed,
        }


def choose_probe_memory(
    footprint: MemoryFootprint,
    *,
    limit_bytes: int,
    limit: str,
    hvp_method: str,
    max_basis: int | None = None,
    retain_graphs: bool | None = None,
    retain_given: bool = False,
    names: OptionNames = CLI_OPTIONS,
) -> ProbeMemoryChoice:
    """The fastest probe that fits in ``limit_bytes``, of: the graph kept (as ``hvp_method``
    ``auto`` or ``retained`` and ``retain_graphs`` keep it) with the largest basis down to
    ``RETAINED_MIN_BASIS``, then the graph rebuilt for every product with the largest basis down
    to ``MIN_BASIS``. When nothing fits, the leanest, with ``fits`` False.

    Options the user gave stay as they are: ``max_basis`` (None: chosen, up to
    ``DEFAULT_MAX_BASIS``), and ``retain_graphs`` when ``retain_given``; the graph is rebuilt
    instead of kept only when ``hvp_method`` is ``auto`` (which then moves on to the next
    method that works). ``retain_graphs`` None keeps the graph of one probe batch only, as
    ``ProbeObjective`` does.
    """
    batches = footprint.num_probe_batches
    keeps = hvp_method in ("auto", "retained") and (
        retain_graphs is True or (retain_graphs is None and batches == 1)
    )
    retained_options = [batches if keeps else 0]
    if keeps and hvp_method == "auto" and not retain_given:
        retained_options.append(0)
    bases = (
        [max_basis] if max_basis is not None else list(range(DEFAULT_MAX_BASIS, MIN_BASIS - 1, -1))
    )
    settings = [
        (basis, retained)
        for retained in retained_options
        for basis in bases
        if not (
            retained and len(retained_options) > 1 and len(bases) > 1 and basis < RETAINED_MIN_BASIS
        )
    ]

    def needed(setting: tuple[int, int]) -> int:
        basis, retained = setting
        return footprint.probe_bytes(basis, retained_graphs=retained, hvp_method=hvp_method)

    chosen = next((s for s in settings if needed(s) <= limit_bytes), settings[-1])
    return ProbeMemoryChoice(
        max_basis=chosen[0],
        retain_graphs=False if chosen[1] != retained_options[0] else None,
        graph_kept=chosen[1] > 0 and hvp_method != "finite-difference",
        probe_bytes=needed(chosen),
        training_step_bytes=footprint.training_step_bytes,
        limit_bytes=limit_bytes,
        limit=limit,
        fits=needed(chosen) <= limit_bytes,
        changed=chosen != settings[0],
        smallest_bytes=needed(settings[-1]),
        names=names,
    )


def size_words(num_bytes: float) -> str:
    """Bytes as MiB below one GiB, else GiB, to 3 significant digits."""
    if num_bytes < 2**30:
        return f"{num_bytes / 2**20:.3g} MiB"
    return f"{num_bytes / 2**30:.3g} GiB"
