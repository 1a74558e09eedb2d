"""The probe: smoothness measurements at chosen training steps, invisible to the training.

A probe at step t measures at x_t, the parameters before update t, on fixed batches: the loss, the
gradient norm, the top Hessian eigenvalue by Lanczos on Hessian-vector products, and, once the
optimizer has made update t, the paper's finite-difference estimate along d = x_{t+1} - x_t.

Afterwards the parameters, ``.grad`` tensors, buffers (BatchNorm statistics), train/eval modes and
the global torch, numpy and Python RNG states are exactly as before: the probe never changes the
run it observes.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .distributed import Communicator, communicator, unwrap
from .estimators import (
    DEFAULT_MAX_BASIS,
    MIN_BASIS,
    EigenResult,
    finite_difference_smoothness,
    lanczos_top_eigenpair,
)
from .groups import GroupSpec, ParameterGroup, resolve_groups
from .objective import (
    HVP_METHODS,
    LossFn,
    ProbeObjective,
    double_backward_backends,
    flatten,
    preserved_rng,
    trainable_parameters,
    unflatten,
)
from .preconditioner import adam_inverse_sqrt_preconditioner, is_adam, optimizer_stability
from .schedule import BUDGET_FLOOR, Schedule, as_schedule, every_k_steps
from .stability import kind_code

ESTIMATORS = ("fd", "hvp", "curvature")
PER_LAYER = "per-layer sharpness"
"""Measured with "hvp" when the probe has parameter groups; it can fail on its own."""
PRECONDITIONED = "preconditioned sharpness"
"""Measured with "hvp" when the optimizer is Adam or AdamW; it can fail on its own."""
MODES = ("train", "eval")


class ProbeEstimatorWarning(UserWarning):
    """An estimator failed during a probe: it is left out of this probe and of every later one
    (NaN in its columns), and the run goes on. Warned once per failure."""


@dataclass(frozen=True)
class HessianNorm:
    """The spectral norm of the Hessian of f at the model's parameters.

    ``value`` = |eigenvalue| >= 0; ``eigenvalue`` is the signed eigenvalue of largest magnitude;
    ``eigenvector`` is its unit eigenvector as one flat tensor over the trainable parameters in
    ``model.parameters()`` order; ``residual`` is ||H u - eigenvalue u|| for that eigenvector
    u: some eigenvalue lies within it, not necessarily the largest. ``converged`` (within the
    HVP budget) means that ``value`` is within ``rtol`` (relative) of the largest |eigenvalue|,
    unless that eigenvalue's eigenvector has |cos| <= 0.1 with the vector the solver found at
    its end of the spectrum: the solver cannot find an eigenvector its start vector (nearly)
    lacks (``smoothprof.estimators.EigenResult``).
    With finite-difference HVPs the residual is that of the finite-difference operator: the
    certificate holds up to its error (see ``objective.FINITE_DIFFERENCE_HVP_RTOL``).
    """

    value: float
    eigenvalue: float
    eigenvector: torch.Tensor
    num_hvps: int
    converged: bool
    residual: float
    restarts: int = 0  # times the solver's basis was full and restarted (``max_basis``)


@dataclass(frozen=True)
class GroupMeasurement:
    """One parameter group at one probe: the norm of the group's block of the gradient and the
    top eigenpair of the Hessian's diagonal block for the group (``HessianNorm``'s meanings,
    in the group's coordinates). By Cauchy interlacing, ``hessian_norm`` is at most the whole
    Hessian's norm (up to both solvers' ``rtol``)."""

    group: str
    grad_norm: float
    hessian_norm: float
    hessian_eig: float
    hvp_count: int
    hessian_converged: bool


@dataclass(frozen=True)
class ProbeRecord:
    """One probe: the row written to ``probes/`` in the trajectory file."""

    step: int
    loss: float
    grad_norm: float
    grad_noise: float
    grad_curvature: float
    smoothness_fd: float
    hessian_norm: float
    hessian_eig: float
    hvp_count: int
    hessian_converged: bool
    seconds: float
    # The edge of stability (``stability.py``): with an Adam/AdamW optimizer, the largest
    # eigenvalue of P^-1/2 H P^-1/2 (NaN otherwise, and before Adam's first update); the
    # threshold of the optimizer at this step and its kind (``stability.kind_code``).
    preconditioned_sharpness: float = math.nan
    preconditioned_hvp_count: int = 0
    preconditioned_converged: bool = False
    stability_threshold: float = math.nan
    stability_kind: int = -1
    # Per-layer (a probe with parameter groups): one measurement per group, in group order.
    groups: tuple[GroupMeasurement, ...] = ()

    def as_row(self) -> dict[str, Any]:
        """The record as a mapping; ``groups`` as a list of mappings (``TrajectoryWriter``
        writes them to ``groups/``)."""
        return asdict(self)

    @property
    def group_hvp_count(self) -> int:
        """HVPs of the per-layer solvers, all groups together."""
        return sum(g.hvp_count for g in self.groups)


@contextlib.contextmanager
def unchanged_model_state(model: nn.Module, device: torch.device | None = None) -> Iterator[None]:
    """Restore buffers, train/eval modes and all global RNG states on exit; enable autograd.

    Parameters are not copied here: code that moves them restores them itself.
    """
    modes = [(module, module.training) for module in model.modules()]
    buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        with preserved_rng(device), torch.enable_grad():
            yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for module, training in modes:
            module.training = training


def _random_start(parameters: Sequence[torch.Tensor], seed: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    total = sum(p.numel() for p in parameters)
    vector = torch.randn(total, generator=generator, dtype=torch.float64)
    return vector.to(dtype=parameters[0].dtype, device=parameters[0].device)


def _set_mode(model: nn.Module, mode: str | None) -> None:
    if mode is not None:
        model.train(mode == "train")


def hessian_norm(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    *,
    rtol: float = 1e-3,
    max_hvps: int = 100,
    max_basis: int | None = DEFAULT_MAX_BASIS,
    start: torch.Tensor | None = None,
    mode: str | None = None,
    seed: int = 0,
    hvp_method: str = "auto",
    retain_graphs: bool | None = None,
    distributed: bool | None = None,
    process_group: Any = None,
) -> HessianNorm:
    """The largest |eigenvalue| of the Hessian of f = mean of ``loss_fn(model, b)`` over batches.

    Lanczos on Hessian-vector products (``lanczos_top_eigenpair``). ``converged``: the value
    is within ``rtol`` (relative) of the largest |eigenvalue|, unless the start vector (nearly)
    lacked its eigenvector, which no solver on Hessian-vector products can see (the exact
    guarantee: see ``HessianNorm``); false when ``max_hvps`` products did not suffice to show
    it. The solver holds at most ``max_basis`` vectors of the model's size (None: one per HVP)
    and restarts when it needs more, with the same guarantee (``estimators.lanczos_top_eigenpair``).
    The Hessian is taken in the model's own dtype and device, in its current train/eval mode
    unless ``mode`` ("train" or "eval") is given; ``start`` (flat) warm starts the solver, e.g.
    with a previous result's ``eigenvector``. Dropout draws one fixed mask per batch (seeded by
    ``seed``). The model and the global RNG states are left as they were.
    In a data-parallel run (a ``DistributedDataParallel`` model, or ``distributed=True``) call it
    on every rank with the same ``batches``: see ``Probe`` for how they are shared.

    >>> import torch
    >>> model = torch.nn.Linear(2, 1, bias=False)
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.tensor([[1.0, 1.0]]))
    >>> x = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    >>> loss = lambda m, b: (m(b) ** 2).sum() / 2      # Hessian = x^T x = diag(9, 1)
    >>> result = hessian_norm(model, loss, [x])
    >>> round(result.value, 4), result.converged
    (9.0, True)
    """
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
    model, comm = _model_and_communicator(model, distributed, process_group, mode)
    parameters = trainable_parameters(model)
    if not parameters:
        raise ValueError("the model has no parameters with requires_grad=True")
    device = parameters[0].device
    with unchanged_model_state(model, device), double_backward_backends(device):
        _set_mode(model, mode)
        objective = ProbeObjective(
            model,
            loss_fn,
            batches,
            seed=seed,
            hvp_method=hvp_method,
            retain_graphs=retain_graphs,
            comm=comm,
        )
        objective.gradient(create_graph=True)
        result = _top_eigenpair(
            objective, start, rtol=rtol, max_hvps=max_hvps, max_basis=max_basis, seed=seed
        )
        objective.release()
    return result


def _model_and_communicator(
    model: nn.Module, distributed: bool | None, process_group: Any, mode: str | None
) -> tuple[nn.Module, Communicator | None]:
    """The module to evaluate (inside a DDP wrapper) and the ranks to sum over (None: this
    process alone). ``distributed=None`` means: when the model is DDP-wrapped."""
    module, ddp_group = unwrap(model)
    if distributed is None:
        distributed = module is not model or process_group is not None
    if not distributed:
        return module, None
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise ValueError("distributed probing needs torch.distributed.init_process_group() first")
    comm = communicator(process_group if process_group is not None else ddp_group)
    in_train_mode = mode == "train" or (mode is None and module.training)
    if (
        comm is not None
        and in_train_mode
        and any(isinstance(m, nn.SyncBatchNorm) for m in module.modules())
    ):
        # Its forward is a collective, and the ranks evaluate different numbers of probe batches.
        raise ValueError(
            "the distributed probe cannot evaluate SyncBatchNorm in train mode; "
            "probe in eval mode (mode='eval', --probe-mode eval)"
        )
    return module, comm


def _top_eigenpair(
    objective: ProbeObjective,
    start: torch.Tensor | None,
    *,
    rtol: float,
    max_hvps: int,
    seed: int,
    max_basis: int | None = DEFAULT_MAX_BASIS,
    on_hvp: Callable[[], None] | None = None,
) -> HessianNorm:
    if start is None:
        start = _random_start(objective.parameters, seed)
    start = start.detach().reshape(-1).to(objective.parameters[0])
    matvec = objective.hvp
    if on_hvp is not None:

        def matvec(vector: torch.Tensor) -> torch.Tensor:
            product = objective.hvp(vector)
            on_hvp()
            return product

    eig = lanczos_top_eigenpair(
        matvec, start, rtol=rtol, max_matvecs=max_hvps, max_basis=max_basis
    )
    return _as_hessian_norm(eig)


def _as_hessian_norm(eig: EigenResult) -> HessianNorm:
    return HessianNorm(
        value=eig.value,
        eigenvalue=eig.eigenvalue,
        eigenvector=eig.eigenvector.detach(),
        num_hvps=eig.num_matvecs,
        converged=eig.converged,
        residual=eig.residual,
        restarts=eig.restarts,
    )


def group_coordinates(
    parameters: Sequence[torch.Tensor], group: ParameterGroup
) -> slice | torch.Tensor:
    """Where ``group``'s parameters sit in the flat vector over ``parameters``: a slice when
    they are contiguous (a module's parameters are), else an index tensor."""
    offsets = [0]
    for parameter in parameters:
        offsets.append(offsets[-1] + parameter.numel())
    ranges = [(offsets[i], offsets[i + 1]) for i in group.indices]
    if all(ranges[k][1] == ranges[k + 1][0] for k in range(len(ranges) - 1)):
        return slice(ranges[0][0], ranges[-1][1])
    return torch.cat([torch.arange(a, b) for a, b in ranges]).to(parameters[0].device)


def _group_start(group_number: int, size: int, seed: int, like: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed + 7919 * (group_number + 1))
    vector = torch.randn(size, generator=generator, dtype=torch.float64)
    return vector.to(dtype=like.dtype, device=like.device)


def _block_top_eigenpair(
    objective: ProbeObjective,
    coordinates: slice | torch.Tensor,
    start: torch.Tensor,
    *,
    rtol: float,
    max_hvps: int,
    max_basis: int | None = DEFAULT_MAX_BASIS,
    on_hvp: Callable[[], None] | None = None,
) -> HessianNorm:
    """The top eigenpair of the Hessian's diagonal block at ``coordinates``: Lanczos in the
    block's coordinates on v -> (H [v on the block, 0 elsewhere]) restricted to the block. Each
    product is one whole HVP, so a block costs what the whole Hessian costs per iteration."""
    template = objective.parameters[0]
    total = sum(p.numel() for p in objective.parameters)

    def matvec(vector: torch.Tensor) -> torch.Tensor:
        padded = torch.zeros(total, dtype=template.dtype, device=template.device)
        padded[coordinates] = vector
        product = objective.hvp(padded)[coordinates]
        if on_hvp is not None:
            on_hvp()
        return product

    eig = lanczos_top_eigenpair(
        matvec,
        start.detach().reshape(-1).to(template),
        rtol=rtol,
        max_matvecs=max_hvps,
        max_basis=max_basis,
    )
    return _as_hessian_norm(eig)


def hessian_block_norms(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    *,
    groups: GroupSpec | None = None,
    rtol: float = 1e-3,
    max_hvps: int = 100,
    max_basis: int | None = DEFAULT_MAX_BASIS,
    mode: str | None = None,
    seed: int = 0,
    hvp_method: str = "auto",
    retain_graphs: bool | None = None,
) -> dict[str, HessianNorm]:
    """For each parameter group (``groups.resolve_groups``: the default groups when ``groups``
    is None), the largest |eigenvalue| of the Hessian's diagonal block for the group, as a
    ``HessianNorm`` whose ``eigenvector`` lies in the group's coordinates (its parameters'
    flat values, in ``model.parameters()`` order). f, the mode, ``rtol`` and ``converged`` are
    those of ``hessian_norm`` (and ``max_basis``); by Cauchy interlacing each value is at most
    ``hessian_norm``'s.
    The model and the global RNG states are left as they were.

    >>> import torch
    >>> model = torch.nn.Linear(2, 1, bias=False)    # one group: its own parameter "weight"
    >>> loss = lambda m, b: (m(b) ** 2).sum() / 2     # Hessian = x^T x = diag(9, 1)
    >>> blocks = hessian_block_norms(model, loss, [torch.tensor([[3.0, 0.0], [0.0, 1.0]])])
    >>> {name: round(block.value, 4) for name, block in blocks.items()}
    {'weight': 9.0}
    """
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
    model, _ = _model_and_communicator(model, False, None, mode)
    parameter_groups = resolve_groups(model, groups)
    parameters = trainable_parameters(model)
    device = parameters[0].device
    results: dict[str, HessianNorm] = {}
    with unchanged_model_state(model, device), double_backward_backends(device):
        _set_mode(model, mode)
        objective = ProbeObjective(
            model, loss_fn, batches, seed=seed, hvp_method=hvp_method, retain_graphs=retain_graphs
        )
        objective.gradient(create_graph=True)
        for number, group in enumerate(parameter_groups):
            start = _group_start(number, group.size, seed, parameters[0])
            results[group.name] = _block_top_eigenpair(
                objective,
                group_coordinates(objective.parameters, group),
                start,
                rtol=rtol,
                max_hvps=max_hvps,
                max_basis=max_basis,
            )
        objective.release()
    return results


def fastest_hvp_method(
    objective: ProbeObjective, vector: torch.Tensor, *, repeats: int = 2
) -> tuple[str, dict[str, float]]:
    """Time every HVP method that works on this objective; return the fastest and the timings.

    A method that raises, or whose product disagrees with the first working one beyond float
    round-off, is left out. When none works, the first method's error is raised.
    """
    timings: dict[str, float] = {}
    reference: torch.Tensor | None = None
    errors: list[Exception] = []
    for method in objective.available_hvp_methods():
        try:
            product = objective.hvp_with(method, vector)  # also a warm-up
            seconds = math.inf
            for _ in range(repeats):  # the fastest repeat: least disturbed by other work
                started = time.perf_counter()
                objective.hvp_with(method, vector)
                seconds = min(seconds, time.perf_counter() - started)
        except Exception as error:  # a method that fails here is skipped, never fatal
            errors.append(error)
            continue
        if reference is None:
            reference = product
        else:
            tolerance = 1e-3 * float(torch.linalg.vector_norm(reference)) + 1e-12
            if float(torch.linalg.vector_norm(product - reference)) > tolerance:
                continue
        timings[method] = seconds
    if not timings:
        raise errors[0]
    return min(timings, key=timings.__getitem__), timings


def _stability_fields(
    preconditioned: HessianNorm | None, kind: int, threshold: float
) -> dict[str, Any]:
    """The edge-of-stability fields of a ``ProbeRecord``."""
    return {
        "preconditioned_sharpness": preconditioned.eigenvalue if preconditioned else math.nan,
        "preconditioned_hvp_count": preconditioned.num_hvps if preconditioned else 0,
        "preconditioned_converged": preconditioned.converged if preconditioned else False,
        "stability_threshold": threshold,
        "stability_kind": kind,
    }


class Probe:
    """Measures smoothness at scheduled steps of a training loop it does not disturb.

    Use it around the optimizer step of each training iteration::

        probe = Probe(model, loss_fn, probe_batches, every=10)
        for step, batch in enumerate(loader):
            with probe.around_step(step):
                optimizer.zero_grad()
                loss_fn(model, batch).backward()
                optimizer.step()

    ``probe.records`` holds one ``ProbeRecord`` per probe; ``on_record`` (e.g. a
    ``TrajectoryWriter.append_probe``) is called with each as soon as it is complete.
    ``on_hvp(step, count)``, for a display during long probes, is called after each
    Hessian-vector product of the probe at ``step`` with the number taken so far.

    ``estimators`` selects "fd" (finite difference along the update), "hvp" (top Hessian
    eigenvalue) and "curvature" (g'Hg/||g||^2, the curvature along the gradient, one HVP);
    ``fd_points`` are the fractions gamma of the update where the gradient is taken; ``mode`` is
    the train/eval mode the probe objective is evaluated in ("train" as the paper's code,
    "eval", or None for the model's own mode at the time). ``schedule`` (a function of the step,
    e.g. ``schedule.log_spaced_steps()``, or a collection of steps, e.g.
    ``schedule.spread_steps(num_steps)``) overrides ``every``; the probe takes every probe its
    schedule names. A time budget is opt-in: ``max_overhead`` (e.g. 0.25) skips a due probe when
    it would take the time spent probing (``on_record`` included; the next probe counted at the
    last one's cost) over that fraction of the time spent training, except the probes at
    ``floor_steps`` (default: the first ``schedule.BUDGET_FLOOR`` due probes), which always run
    so that a fit has its points. Only this budget makes what is measured depend on a clock.
    ``hvp_method`` is one of ``objective.HVP_METHODS`` or "auto" (the first of them, in that
    order, that works on the model: chosen at the first probe, by trying, not by timing);
    ``retain_graphs`` allows the "retained" method to keep every probe batch's graph at once
    (default: only for a single batch). Each eigen-solver holds at most ``max_basis`` vectors of
    the model's size (None: one per HVP, up to ``max_hvps``) and restarts when it needs more
    (``hessian_norm``); ``restarted_solves`` counts the solves that did.

    An estimator that raises (after every HVP method ``hvp_method`` allows has been tried) is
    recorded as NaN, left out of later probes, and reported once as a ``ProbeEstimatorWarning``
    ("hvp failed at step 30 (RuntimeError: ...); the run goes on without it"); ``failed`` maps
    each failed estimator to that message. The training is never affected.

    In a data-parallel loop, give every rank the same ``batches`` (the global probe batches) and
    the ``DistributedDataParallel`` model (or the plain module with ``distributed=True`` and,
    optionally, a ``process_group``): each rank evaluates the batches i with
    ``i % world_size == rank``, and losses, gradients, HVPs and finite differences are summed over
    the ranks, so every rank measures f over all the batches, as one process would. The probe
    evaluates the module inside the wrapper, so DDP's hooks and buffer broadcasts do not run.
    Call it on every rank at the same steps; the one decision that depends on a clock (the
    overhead budget, when given) is rank 0's. ``on_record`` is called on every rank; write on one.

    ``groups`` turns on the per-layer probe (with the "hvp" estimator): a ``groups.GroupSpec``
    (name patterns over ``model.named_parameters()``), "default" (the model's top-level
    children, see ``groups.default_group_patterns``) or groups ``groups.resolve_groups``
    returned; ``parameter_groups`` holds them resolved.
    Each probe then also measures, for each group, the norm of its gradient block and the top
    eigenvalue of the Hessian's diagonal block for the group: Lanczos on the HVP restricted to
    the group, warm started from the group's eigenvector of the previous probe, up to
    ``max_hvps`` products per group (``ProbeRecord.groups``; ``TrajectoryWriter(groups=...)``
    writes them). Each product is a whole HVP: a group costs about what the whole Hessian does.

    ``optimizer`` (optional, read only) is the optimizer of the loop. With it, each record holds
    the optimizer's stability threshold at that step (``stability.py``); and when it is
    ``torch.optim.Adam`` or ``AdamW``, the "hvp" estimator also measures the preconditioned
    sharpness, the largest eigenvalue of P^-1 H with Adam's P = sqrt(v_hat) + eps from the state of
    its last update (Lanczos on P^-1/2 H P^-1/2, warm started from the previous probe's
    eigenvector; NaN at a probe before Adam's first update).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Any],
        *,
        every: int = 10,
        schedule: Schedule | Collection[int] | None = None,
        max_overhead: float | None = None,
        floor_steps: Collection[int] | None = None,
        estimators: Sequence[str] = ESTIMATORS,
        rtol: float = 1e-3,
        max_hvps: int = 100,
        max_basis: int | None = DEFAULT_MAX_BASIS,
        fd_points: Sequence[float] = (0.5,),
        mode: str | None = "train",
        seed: int = 0,
        hvp_method: str = "auto",
        retain_graphs: bool | None = None,
        on_record: Callable[[ProbeRecord], None] | None = None,
        on_hvp: Callable[[int, int], None] | None = None,
        distributed: bool | None = None,
        process_group: Any = None,
        optimizer: torch.optim.Optimizer | None = None,
        groups: GroupSpec | Sequence[ParameterGroup] | None = None,
    ) -> None:
        unknown = sorted(set(estimators) - set(ESTIMATORS))
        if unknown:
            raise ValueError(f"unknown estimator(s) {unknown}; choose from {list(ESTIMATORS)}")
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
        if any(not 0 < gamma <= 1 for gamma in fd_points) or not fd_points:
            raise ValueError(f"fd_points must lie in (0, 1], got {list(fd_points)}")
        if hvp_method != "auto" and hvp_method not in HVP_METHODS:
            raise ValueError(f"hvp_method must be 'auto' or one of {HVP_METHODS}")
        if max_overhead is not None and max_overhead < 0:
            raise ValueError(f"max_overhead must be >= 0, got {max_overhead}")
        if max_basis is not None and max_basis < MIN_BASIS:
            raise ValueError(f"max_basis must be at least {MIN_BASIS}, got {max_basis}")
        self.model, self.comm = _model_and_communicator(model, distributed, process_group, mode)
        self.loss_fn = loss_fn
        self.batches = list(batches)
        if not self.batches:
            raise ValueError("the probe needs at least one batch")
        self.schedule = as_schedule(schedule) if schedule is not None else every_k_steps(every)
        self.max_overhead = max_overhead
        self.floor_steps = None if floor_steps is None else frozenset(floor_steps)
        self.estimators = tuple(estimators)
        self.rtol = rtol
        self.max_hvps = max_hvps
        self.max_basis = max_basis
        # Solves (whole Hessian, preconditioned, per group) whose basis was full and restarted.
        self.restarted_solves = 0
        self.fd_points = tuple(fd_points)
        self.mode = mode
        self.seed = seed
        self.hvp_method = hvp_method
        self.retain_graphs = retain_graphs
        self.on_record = on_record
        self.on_hvp = on_hvp
        self.records: list[ProbeRecord] = []
        self.skipped = 0
        self.probe_seconds = 0.0
        self._started: float | None = None
        self._eigenvector: torch.Tensor | None = None
        self.optimizer = optimizer
        self._preconditioned_vector: torch.Tensor | None = None
        self._pending: dict[str, Any] | None = None
        self.failed: dict[str, str] = {}
        self.parameter_groups: list[ParameterGroup] = []
        if groups is not None:
            if "hvp" not in self.estimators:
                raise ValueError("the per-layer probe (groups) needs the 'hvp' estimator")
            if isinstance(groups, Sequence) and all(isinstance(g, ParameterGroup) for g in groups):
                self.parameter_groups = list(groups)  # resolved already (``resolve_groups``)
            else:
                default = isinstance(groups, str) and groups == "default"
                self.parameter_groups = resolve_groups(self.model, None if default else groups)
        self._group_vectors: dict[str, torch.Tensor] = {}

    @property
    def parameters(self) -> list[torch.Tensor]:
        return trainable_parameters(self.model)

    def is_due(self, step: int) -> bool:
        """Whether to probe at ``step``: the schedule says so and, when a time budget is set, the
        budget allows or the step is one of the floor's."""
        now = time.perf_counter()
        if self._started is None:
            self._started = now
        if not self.schedule(step):
            return False
        if self.max_overhead is not None and not self._in_floor(step):
            training_seconds = now - self._started - self.probe_seconds
            # Would this probe, costing what the last one did, take probing over the budget?
            expected = self.probe_seconds + self.records[-1].seconds
            over = expected > self.max_overhead * training_seconds
            if self.comm is not None:
                over = self.comm.from_rank0(over)  # rank 0's clock decides for all
            if over:
                self.skipped += 1
                return False
        return True

    def _in_floor(self, step: int) -> bool:
        """Whether the time budget must leave the probe at ``step`` alone."""
        if self.floor_steps is None:
            return len(self.records) < BUDGET_FLOOR
        return step in self.floor_steps or not self.records

    @contextlib.contextmanager
    def around_step(self, step: int) -> Iterator[None]:
        """Measure before the enclosed update when ``step`` is due, and finish after it."""
        due = self.is_due(step)
        if due:
            self.before_step(step)
        yield
        if due:
            self.after_step()

    def _objective(self) -> ProbeObjective:
        return ProbeObjective(
            self.model,
            self.loss_fn,
            self.batches,
            seed=self.seed,
            hvp_method=self.hvp_method,
            retain_graphs=self.retain_graphs,
            comm=self.comm,
        )

    def before_step(self, step: int) -> None:
        """Measure at x_t: loss, gradient, Hessian norm; remember x_t for the finite difference."""
        started = time.perf_counter()
        parameters = self.parameters
        device = parameters[0].device
        eig: HessianNorm | None = None
        curvature = math.nan
        preconditioned: HessianNorm | None = None
        per_group: tuple[GroupMeasurement, ...] = ()
        with unchanged_model_state(self.model, device), double_backward_backends(device):
            _set_mode(self.model, self.mode)
            objective = self._objective()
            want_hvp = self._wants("hvp")
            want_curvature = self._wants("curvature")
            loss, gradient, spread = objective.gradient(create_graph=want_hvp or want_curvature)
            gradient_norm = torch.linalg.vector_norm(gradient)
            if (want_hvp or want_curvature) and self.hvp_method == "auto":
                try:
                    self.hvp_method = self._choose_hvp_method(objective, gradient)
                except Exception as error:
                    wanted = [name for name in ("hvp", "curvature") if self._wants(name)]
                    self._estimators_failed(wanted, step, error)
                    want_hvp = want_curvature = False
                objective.hvp_method = self.hvp_method
            hvps_taken = 0

            def hvp_taken() -> None:
                nonlocal hvps_taken
                hvps_taken += 1
                if self.on_hvp is not None:
                    self.on_hvp(step, hvps_taken)

            if want_curvature and gradient_norm > 0:
                unit = gradient / gradient_norm
                try:
                    product = objective.hvp_with(objective.hvp_method, unit)
                except Exception as error:
                    self._estimators_failed(["curvature"], step, error)
                else:
                    curvature = float(torch.dot(unit, product))
                    hvp_taken()
            if want_hvp:
                try:
                    eig = _top_eigenpair(
                        objective,
                        self._eigenvector,
                        rtol=self.rtol,
                        max_hvps=self.max_hvps,
                        max_basis=self.max_basis,
                        seed=self.seed + step + 1,
                        on_hvp=hvp_taken if self.on_hvp is not None else None,
                    )
                except Exception as error:
                    self._estimators_failed(["hvp"], step, error)
                else:
                    self.restarted_solves += eig.restarts > 0
                    if math.isfinite(eig.eigenvalue):
                        self._eigenvector = eig.eigenvector
                    if PRECONDITIONED not in self.failed:
                        try:
                            preconditioned = self._preconditioned_sharpness(
                                objective, step, hvp_taken if self.on_hvp is not None else None
                            )
                        except Exception as error:
                            self._estimators_failed([PRECONDITIONED], step, error)
                    if self.parameter_groups and PER_LAYER not in self.failed:
                        try:
                            per_group = self._per_layer(
                                objective,
                                gradient,
                                step,
                                hvp_taken if self.on_hvp is not None else None,
                            )
                        except Exception as error:
                            self._estimators_failed([PER_LAYER], step, error)
                finally:
                    objective.release()
        stability_kind, threshold = optimizer_stability(self.optimizer)
        self._pending = {
            "step": step,
            "loss": loss,
            "gradient": gradient,
            "grad_noise": float(spread),
            "grad_curvature": curvature,
            "eig": eig,
            "preconditioned": preconditioned,
            "groups": per_group,
            "stability": (kind_code(stability_kind), threshold),
            "point": flatten([p.detach() for p in parameters]).clone()
            if self._wants("fd")
            else None,
            "seconds": time.perf_counter() - started,
        }

    def _wants(self, estimator: str) -> bool:
        """Whether this probe runs ``estimator``: asked for, and not failed at an earlier probe."""
        return estimator in self.estimators and estimator not in self.failed

    def _estimators_failed(self, estimators: Sequence[str], step: int, error: Exception) -> None:
        """Leave ``estimators`` out from now on and say so once, in one line."""
        if not estimators:
            return
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        cause = f"{type(error).__name__}: {reason}" if reason else type(error).__name__
        names, them = " and ".join(estimators), "them" if len(estimators) > 1 else "it"
        message = f"{names} failed at step {step} ({cause}); the run goes on without {them}"
        for name in estimators:
            self.failed[name] = message
        warnings.warn(message, ProbeEstimatorWarning, stacklevel=3)

    def _preconditioned_sharpness(
        self, objective: ProbeObjective, step: int, on_hvp: Callable[[], None] | None
    ) -> HessianNorm | None:
        """The largest (algebraic) eigenvalue of P^-1/2 H P^-1/2 with Adam's P (see
        ``preconditioner``) and its eigenvector; None when the optimizer is not Adam/AdamW or
        has made no update yet.

        Lanczos finds the eigenvalue of largest magnitude; when that one is negative, a second
        run on the operator shifted by its magnitude (all eigenvalues then >= 0) finds the
        largest, which bounds Adam's stability; ``num_hvps`` counts both runs and ``converged``
        certifies the shifted run's relative error."""
        if not is_adam(self.optimizer):
            return None
        scale = adam_inverse_sqrt_preconditioner(self.optimizer, objective.parameters)
        if scale is None:
            return None

        def matvec(vector: torch.Tensor) -> torch.Tensor:
            product = scale * objective.hvp(scale * vector)
            if on_hvp is not None:
                on_hvp()
            return product

        start = self._preconditioned_vector
        if start is None:
            start = _random_start(objective.parameters, self.seed + step + 1)
        start = start.to(scale)
        eig = lanczos_top_eigenpair(
            matvec, start, rtol=self.rtol, max_matvecs=self.max_hvps, max_basis=self.max_basis
        )
        self.restarted_solves += eig.restarts > 0
        eigenvalue, num_hvps = eig.eigenvalue, eig.num_matvecs
        if math.isfinite(eigenvalue) and eigenvalue < 0:
            shift = -eigenvalue
            eig = lanczos_top_eigenpair(
                lambda vector: matvec(vector).add_(vector, alpha=shift),
                start,
                rtol=self.rtol,
                max_matvecs=self.max_hvps,
                max_basis=self.max_basis,
            )
            self.restarted_solves += eig.restarts > 0
            eigenvalue, num_hvps = eig.eigenvalue - shift, num_hvps + eig.num_matvecs
        if math.isfinite(eigenvalue):
            self._preconditioned_vector = eig.eigenvector.detach()
        return HessianNorm(
            value=abs(eigenvalue),
            eigenvalue=eigenvalue,
            eigenvector=eig.eigenvector.detach(),
            num_hvps=num_hvps,
            converged=eig.converged,
            residual=eig.residual,
        )

    def _per_layer(
        self,
        objective: ProbeObjective,
        gradient: torch.Tensor,
        step: int,
        on_hvp: Callable[[], None] | None,
    ) -> tuple[GroupMeasurement, ...]:
        """Each group's gradient norm and diagonal-block eigenpair, each block's solver warm
        started from its previous eigenvector (a random start, seeded by the step, at first)."""
        measured = []
        for number, group in enumerate(self.parameter_groups):
            coordinates = group_coordinates(objective.parameters, group)
            start = self._group_vectors.get(group.name)
            if start is None:
                start = _group_start(number, group.size, self.seed + step + 1, gradient)
            eig = _block_top_eigenpair(
                objective,
                coordinates,
                start,
                rtol=self.rtol,
                max_hvps=self.max_hvps,
                max_basis=self.max_basis,
                on_hvp=on_hvp,
            )
            self.restarted_solves += eig.restarts > 0
            if math.isfinite(eig.eigenvalue):
                self._group_vectors[group.name] = eig.eigenvector
            measured.append(
                GroupMeasurement(
                    group=group.name,
                    grad_norm=float(torch.linalg.vector_norm(gradient[coordinates])),
                    hessian_norm=eig.value,
                    hessian_eig=eig.eigenvalue,
                    hvp_count=eig.num_hvps,
                    hessian_converged=eig.converged,
                )
            )
        return tuple(measured)

    def _choose_hvp_method(self, objective: ProbeObjective, gradient: torch.Tensor) -> str:
        """The first of ``HVP_METHODS`` that works on this objective, in their order: the retained
        graph (the fastest on every model measured, see benchmarks/probe_speed.py) when allowed,
        then a graph rebuilt per product, then forward-over-reverse. Chosen by trying, never by
        timing, so the same options measure with the same arithmetic on any machine. With several
        ranks a method that fails on one fails on all (``hvp_with``), so they choose alike."""
        direction = gradient if bool(torch.any(gradient != 0)) else torch.ones_like(gradient)
        errors: list[Exception] = []
        for method in objective.available_hvp_methods():
            try:
                objective.hvp_with(method, direction)
            except Exception as error:  # a method that fails here is skipped, never fatal
                errors.append(error)
                continue
            return method
        raise errors[0]

    def after_step(self, *, update_made: bool = True) -> ProbeRecord:
        """Finish the pending probe with the finite difference along the update just made."""
        if self._pending is None:
            raise RuntimeError("after_step() called without a matching before_step()")
        pending, self._pending = self._pending, None
        started = time.perf_counter()
        smoothness_fd = math.nan
        if pending["point"] is not None and update_made:
            try:
                smoothness_fd = self._finite_difference(pending["point"], pending["gradient"])
            except Exception as error:  # the parameters are back at x_{t+1} (its finally)
                self._estimators_failed(["fd"], pending["step"], error)
        eig: HessianNorm | None = pending["eig"]
        record = ProbeRecord(
            step=pending["step"],
            loss=pending["loss"],
            grad_norm=float(torch.linalg.vector_norm(pending["gradient"])),
            grad_noise=pending["grad_noise"],
            grad_curvature=pending["grad_curvature"],
            smoothness_fd=smoothness_fd,
            hessian_norm=eig.value if eig else math.nan,
            hessian_eig=eig.eigenvalue if eig else math.nan,
            hvp_count=eig.num_hvps if eig else 0,
            hessian_converged=eig.converged if eig else False,
            seconds=pending["seconds"] + time.perf_counter() - started,
            **_stability_fields(pending["preconditioned"], *pending["stability"]),
            groups=pending["groups"],
        )
        self.probe_seconds += record.seconds
        self.records.append(record)
        if self.on_record is not None:
            written = time.perf_counter()
            self.on_record(record)
            # Writing the row is probing's cost too, for the budget (the row cannot hold it).
            self.probe_seconds += time.perf_counter() - written
        return record

    def _finite_difference(self, point: torch.Tensor, gradient: torch.Tensor) -> float:
        parameters = self.parameters
        device = parameters[0].device
        updated = flatten([p.detach() for p in parameters]).clone()
        direction = updated - point
        step_norm = float(torch.linalg.vector_norm(direction))

        def gradient_at(gamma: float) -> torch.Tensor:
            with torch.no_grad():
                for parameter, value in zip(
                    parameters, unflatten(point + gamma * direction, parameters)
                ):
                    parameter.copy_(value)
            return self._objective().gradient()[1]

        try:
            # The kernels of before_step's gradient: the difference must not see two kernels'
            # rounding (flash against math attention, ATen's against the probe's batch norm).
            with unchanged_model_state(self.model, device), double_backward_backends(device):
                _set_mode(self.model, self.mode)
                return finite_difference_smoothness(
                    gradient_at, gradient, step_norm, self.fd_points
                )
        finally:
            with torch.no_grad():
                for parameter, value in zip(parameters, unflatten(updated, parameters)):
                    parameter.copy_(value)
