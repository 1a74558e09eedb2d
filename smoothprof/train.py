"""The training loop that ``smoothprof run`` drives: optimizer and LR schedule (the options' or the
model file's), mixed precision, gradient accumulation, clipping, device, probe, file.

Seeding and order are fixed so that a run with probes and a run without them train bit for bit
the same on the CPU: the probe batches are drawn, and the probe measures, under a saved RNG state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .choices import AMP_DTYPES, FILE_OPTIMIZER_OPTIONS, OPTIMIZERS
from .cost import ProbeWork, ProbingCost, probe_work
from .distributed import Communicator, ShardedLoader, shard_dataloader
from .errors import ConfigError
from .estimators import DEFAULT_MAX_BASIS, MIN_BASIS
from .groups import ParameterGroup, group_entries, resolve_groups
from .loading import (
    ModelFile,
    check_loss,
    first_batches,
    instantiate_model,
    instantiate_optimizer,
    instantiate_scheduler,
    make_dataloader,
    step_scheduler,
)
from .memory import (
    CLI_OPTIONS,
    DEVICE_SHARE,
    MemoryFootprint,
    OptionNames,
    ProbeMemoryChoice,
    choose_probe_memory,
)
from .objective import (
    HVP_METHODS,
    LossFn,
    double_backward_backends,
    saved_activation_bytes,
    saved_graph_bytes,
    trainable_parameters,
)
from .preconditioner import is_adam
from .probe import ESTIMATORS, MODES, Probe, ProbeRecord, unchanged_model_state
from .schedule import (
    DEFAULT_NUM_PROBES,
    DEFAULT_PROBE_EVERY,
    SCHEDULE_OPTIONS,
    budget_floor_steps,
    probe_schedule,
)
from .wording import plural

SCHEDULES = ("auto", "every", "log")
"""auto: ``num_probes`` probes spread over the run (``schedule.spread_steps``); every: every
``probe_every`` steps; log: ``probes_per_decade`` log-spaced probes per decade of steps."""


@dataclass(frozen=True)
class RunConfig:
    """Every option of ``smoothprof run``; stored as JSON in the trajectory file."""

    steps: int = 500
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    clip: float | None = None
    amp: str | None = None  # None: float32; "bf16" or "fp16": autocast (fp16 with a GradScaler)
    accumulate: int = 1  # batches whose gradients add up to one optimizer step
    probe_schedule: str = "auto"
    probe_every: int | None = None
    num_probes: int = DEFAULT_NUM_PROBES
    probes_per_decade: float = 10.0
    max_overhead: float | None = None
    hvp_method: str = "auto"
    retain_graphs: bool | None = None
    probe_batches: int | None = None  # None: by the model's size (default_probe_batches)
    estimators: tuple[str, ...] = ESTIMATORS
    fd_points: tuple[float, ...] = (0.5,)
    probe_mode: str = "train"
    rtol: float = 1e-3
    max_hvps: int = 100
    max_basis: int | None = None  # vectors of the model's size an eigen-solver holds; None:
    # DEFAULT_MAX_BASIS, or fewer where the probe would not fit (``choose_run_probe_memory``)
    probe_memory: float | None = None  # the probe's memory, at most this times a training
    # step's (estimated); None: fit ``memory.DEVICE_SHARE`` of the device's memory
    seed: int = 0
    device: str = "auto"
    lr_search: bool = True  # after training, the step-size search (smoothprof.step_search)
    per_layer: bool = False  # also measure each parameter group's gradient and Hessian block
    groups: tuple[str, ...] | None = None  # "name=pattern" texts; None: the default groups

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_options(
        cls,
        defaults: Mapping[str, Any],
        overrides: Mapping[str, Any],
        *,
        check_conflicts: bool = True,
    ) -> RunConfig:
        """Built-in defaults, then the model file's ``defaults``, then command-line values.

        The schedule options (``SCHEDULE_OPTIONS``) go together: any of them given on the
        command line replaces all of the file's. ``probe_every`` alone means the ``every``
        schedule; an option that the chosen schedule would not use is an error, not ignored.

        ``check_conflicts=False`` checks each value alone, not whether values that work alone
        work together (e.g. ``hvp_method`` retained with several probe batches): for command-line
        values checked before the file's defaults are known."""
        names = set(cls.option_names())
        unknown = sorted(set(defaults) - names)
        if unknown:
            raise ConfigError(
                f"unknown option(s) in defaults: {', '.join(unknown)}; "
                f"known: {', '.join(sorted(names))}"
            )
        given = {k: v for k, v in overrides.items() if v is not None}
        if any(key in given for key in SCHEDULE_OPTIONS):
            defaults = {k: v for k, v in defaults.items() if k not in SCHEDULE_OPTIONS}
        values = {**defaults, **given}
        values.update(_resolved_schedule(values))
        for key in ("estimators", "fd_points"):
            if key in values and not isinstance(values[key], tuple):
                raw = values[key]
                values[key] = tuple(raw.split(",")) if isinstance(raw, str) else tuple(raw)
        if values.get("groups") is not None:  # any GroupSpec: "a=x,b=y", a list or a dict
            values["groups"] = group_entries(values["groups"])
        try:
            config = cls(**values)
        except TypeError as error:
            raise ConfigError(str(error)) from None
        config.validate(check_conflicts=check_conflicts)
        return config

    def validate(self, *, check_conflicts: bool = True) -> None:
        """Raise ConfigError for a value that cannot work, or (``check_conflicts``) values
        that cannot work together."""
        problems = []
        if not isinstance(self.steps, int) or self.steps <= 0:
            problems.append(f"steps must be a positive integer, got {self.steps!r}")
        if not _positive(self.lr):
            problems.append(f"lr must be positive, got {self.lr!r}")
        if self.clip is not None and not _positive(self.clip):
            problems.append(f"clip must be positive, got {self.clip!r}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(
                f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}"
            )
        if self.amp is not None and self.amp not in AMP_DTYPES:
            problems.append(f"amp must be one of {', '.join(AMP_DTYPES)}, got {self.amp!r}")
        if not isinstance(self.accumulate, int) or self.accumulate <= 0:
            problems.append(f"accumulate must be a positive integer, got {self.accumulate!r}")
        unknown = [e for e in self.estimators if e not in ESTIMATORS]
        if unknown or not self.estimators:
            problems.append(
                f"unknown estimator(s) {', '.join(unknown) or '(none given)'}; "
                f"choose from {', '.join(ESTIMATORS)}"
            )
        if self.probe_every is not None and (
            not isinstance(self.probe_every, int) or self.probe_every < 0
        ):
            problems.append(f"probe_every must be an integer >= 0, got {self.probe_every!r}")
        if not isinstance(self.num_probes, int) or self.num_probes < 0:
            problems.append(f"num_probes must be an integer >= 0, got {self.num_probes!r}")
        if self.probe_schedule not in SCHEDULES:
            problems.append(
                f"probe_schedule must be one of {', '.join(SCHEDULES)}, got {self.probe_schedule!r}"
            )
        if not _positive(self.probes_per_decade):
            problems.append(f"probes_per_decade must be positive, got {self.probes_per_decade!r}")
        if self.max_overhead is not None and not (
            isinstance(self.max_overhead, (int, float)) and self.max_overhead > 0
        ):
            problems.append(
                f"max_overhead must be positive (inf: no cap), got {self.max_overhead!r}"
            )
        if self.hvp_method not in ("auto", *HVP_METHODS):
            problems.append(
                f"hvp_method must be one of auto, {', '.join(HVP_METHODS)}, got {self.hvp_method!r}"
            )
        if self.probe_batches is not None and (
            not isinstance(self.probe_batches, int) or self.probe_batches <= 0
        ):
            problems.append(f"probe_batches must be a positive integer, got {self.probe_batches!r}")
        elif (
            check_conflicts
            and self.hvp_method == "retained"
            and (
                self.retain_graphs is False
                # several batches given; several chosen by the model's size are retained
                or (self.retain_graphs is None and (self.probe_batches or 1) > 1)
            )
        ):
            problems.append(
                "hvp_method retained keeps every probe batch's double-backward graph: allow it "
                "with retain_graphs (--retain-graphs) or use one probe batch"
            )
        if any(not (isinstance(g, (int, float)) and 0 < g <= 1) for g in self.fd_points):
            problems.append(f"fd_points must lie in (0, 1], got {list(self.fd_points)}")
        if self.probe_mode not in MODES:
            problems.append(
                f"probe_mode must be one of {', '.join(MODES)}, got {self.probe_mode!r}"
            )
        if not _positive(self.rtol):
            problems.append(f"rtol must be positive, got {self.rtol!r}")
        if not isinstance(self.max_hvps, int) or self.max_hvps <= 0:
            problems.append(f"max_hvps must be a positive integer, got {self.max_hvps!r}")
        if self.max_basis is not None and (
            not isinstance(self.max_basis, int) or self.max_basis < MIN_BASIS
        ):
            problems.append(
                f"max_basis must be an integer of at least {MIN_BASIS}, got {self.max_basis!r}"
            )
        if self.probe_memory is not None and not (
            _positive(self.probe_memory) and self.probe_memory > 1
        ):
            problems.append(
                "probe_memory must be a number above 1 (the probe's peak memory as a multiple "
                f"of a training step's), got {self.probe_memory!r}"
            )
        if check_conflicts and self.probe_memory is not None and "hvp" not in self.estimators:
            problems.append(
                "probe_memory sizes the hvp estimator's eigen-solver: add hvp to estimators"
            )
        if self.per_layer not in (True, False):
            problems.append(f"per_layer must be true or false, got {self.per_layer!r}")
        elif self.per_layer and "hvp" not in self.estimators:
            problems.append(
                "per_layer measures each group's Hessian block with the hvp estimator: "
                "add hvp to estimators"
            )
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                problems.append(f"unknown device {self.device!r}")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def overhead_cap(self) -> float | None:
        """The probe's overhead cap; None for none (``max_overhead`` None or inf)."""
        if self.max_overhead is None or math.isinf(self.max_overhead):
            return None
        return float(self.max_overhead)

    def as_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["max_overhead"] = self.overhead_cap  # JSON has no inf: null means no cap
        data["estimators"] = list(self.estimators)
        data["fd_points"] = list(self.fd_points)
        data["groups"] = None if self.groups is None else list(self.groups)
        return data


def _resolved_schedule(values: Mapping[str, Any]) -> dict[str, Any]:
    """The schedule that the given option values ask for, or ConfigError for options that the
    schedule would not use (never silently ignored)."""
    every = values.get("probe_every")
    schedule = values.get("probe_schedule")
    if schedule is None:
        schedule = "every" if every is not None else "auto"
    if every == 0:  # no probes, whatever the schedule
        return {"probe_schedule": schedule}
    unused = {
        "auto": ("probe_every", "probes_per_decade"),
        "every": ("num_probes", "probes_per_decade"),
        "log": ("probe_every", "num_probes"),
    }.get(schedule, ())
    extra = [name for name in unused if values.get(name) is not None]
    if extra:
        flags = " and ".join("--" + name.replace("_", "-") for name in extra)
        verb = "does" if len(extra) == 1 else "do"
        raise ConfigError(
            f"{flags} {verb} not apply to probe_schedule {schedule} (--probe-schedule); "
            "auto takes --num-probes, every --probe-every, log --probes-per-decade"
        )
    if schedule == "every" and every is None:
        return {"probe_schedule": schedule, "probe_every": DEFAULT_PROBE_EVERY}
    return {"probe_schedule": schedule}


SMALL_PROBE_PARAMETERS = 1_000_000
SMALL_PROBE_GRAPH_BYTES = 4 * 2**20
SMALL_PROBE_BATCHES = 4
"""A run that does not choose its probe batches gets ``SMALL_PROBE_BATCHES`` of them when the
model is small in parameters (under ``SMALL_PROBE_PARAMETERS``) and in activations (one batch's
double-backward graph holds at most ``SMALL_PROBE_GRAPH_BYTES``, measured by
``objective.saved_graph_bytes``: a count of bytes, the same on every machine), with all their
graphs retained (the cheapest HVPs, at most 16 MiB); any other model gets one batch and its
retained graph. Every probe batch multiplies a probe's cost, as each HVP runs over all of them:
on a CPU a cold probe of a 4.9M-parameter timm ResNet took the time of 124 training steps on four
batches and 41 on one, and a 2-layer GPT-2 of 118,528 parameters but 18 MiB of graph per batch of
16 x 32 tokens took 198 to 358 on four. With one batch the gradient noise τ is not measured."""


@dataclass(frozen=True)
class ProbeBatchesChoice:
    """How a run that does not choose its probe batches chose them, and from what."""

    batches: int
    num_parameters: int
    graph_bytes: int  # one probe batch's double-backward graph

    retain_graphs: bool = True  # the chosen batches' graphs are kept through a probe's solve

    def describe(self) -> str:
        """The header's words for the choice."""
        mib = self.graph_bytes / 2**20
        size = f"{self.num_parameters:,} parameters, {mib:.3g} MiB of graph per batch"
        return f"chosen for the model's size: {size}; --probe-batches sets it"


def default_probe_batches(num_parameters: int, graph_bytes: int) -> int:
    """The probe batches of a run that does not choose them: ``SMALL_PROBE_BATCHES`` for a model
    small in parameters and in one batch's double-backward graph, else 1."""
    small = num_parameters < SMALL_PROBE_PARAMETERS and graph_bytes <= SMALL_PROBE_GRAPH_BYTES
    return SMALL_PROBE_BATCHES if small else 1


def choose_probe_batches(
    model_file: ModelFile, model: torch.nn.Module, batch: Any, device: torch.device
) -> ProbeBatchesChoice:
    """Choose the probe batches of a run that does not: from the model's trainable parameters and
    the bytes of one batch's double-backward graph, as the probe builds it. The caller owns the
    model's state (``unchanged_model_state``)."""
    num_parameters = sum(p.numel() for p in trainable_parameters(model))
    with double_backward_backends(device):
        graph_bytes = saved_graph_bytes(model, model_file.call_loss, batch)
    return ProbeBatchesChoice(
        default_probe_batches(num_parameters, graph_bytes), num_parameters, graph_bytes
    )


def optimizer_state_vectors(optimizer: torch.optim.Optimizer) -> int:
    """Vectors of the model's size the optimizer's state holds: 2 for Adam and AdamW (3 with
    amsgrad), 1 for SGD with momentum, else 0 (plain SGD, and optimizers not known here: then
    a training step's estimate is the smaller and a limit relative to it the stricter)."""
    group = optimizer.param_groups[0]
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        return 3 if group.get("amsgrad") else 2
    if type(optimizer) is torch.optim.SGD and group.get("momentum"):
        return 1
    return 0


def device_memory_bytes(device: torch.device) -> int | None:
    """The memory of ``device``: a GPU's total memory; for the CPU the machine's physical memory,
    or its cgroup's limit when lower (a container). None where it is not known."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type != "cpu":
        return None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not a POSIX system
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def count_memory_footprint(
    loss_fn: LossFn,
    model: torch.nn.Module,
    batch: Any,
    device: torch.device,
    optimizer: torch.optim.Optimizer | None,
    *,
    num_probe_batches: int,
    amp: str | None = None,
    graph_bytes: int | None = None,
) -> MemoryFootprint:
    """Count what a run's memory is made of (``memory.MemoryFootprint``) on one probe batch:
    its activations as a training step computes them (under ``amp``'s autocast, with the
    default kernels), and its double-backward graph as the probe builds it (``graph_bytes`` when
    already counted). The caller owns the model's state (``unchanged_model_state``)."""
    parameters = trainable_parameters(model)
    autocast = (
        torch.autocast(device.type, dtype=_AMP_DTYPE[amp]) if amp else contextlib.nullcontext()
    )
    with autocast:
        activation_bytes = saved_activation_bytes(model, loss_fn, batch)
    if graph_bytes is None:
        with double_backward_backends(device):
            graph_bytes = saved_graph_bytes(model, loss_fn, batch)
    return MemoryFootprint(
        vector_bytes=sum(p.numel() * p.element_size() for p in parameters),
        optimizer_vectors=0 if optimizer is None else optimizer_state_vectors(optimizer),
        activation_bytes=activation_bytes,
        graph_bytes=graph_bytes,
        num_probe_batches=num_probe_batches,
        preconditioned=is_adam(optimizer),
    )


def choose_run_probe_memory(
    footprint: MemoryFootprint,
    config: RunConfig,
    device: torch.device,
    *,
    max_basis_given: int | None,
    retain_given: bool,
) -> ProbeMemoryChoice | None:
    """The run's Lanczos basis and graph for its probe's memory (``memory.choose_probe_memory``):
    within ``config.probe_memory`` times a training step's estimated peak when given, else
    within ``memory.DEVICE_SHARE`` of the device's memory (None where that is not known).
    ``max_basis_given`` is the basis the user gave (None: chosen); ``retain_given`` whether
    the user set ``retain_graphs`` (``config`` holds its value, or the probe batches' choice)."""
    limit = probe_memory_limit(footprint, config.probe_memory, device)
    if limit is None:
        return None
    limit_bytes, limit_words = limit
    return choose_probe_memory(
        footprint,
        limit_bytes=limit_bytes,
        limit=limit_words,
        hvp_method=config.hvp_method,
        max_basis=max_basis_given,
        retain_graphs=config.retain_graphs,
        retain_given=retain_given,
    )


def probe_memory_limit(
    footprint: MemoryFootprint,
    probe_memory: float | None,
    device: torch.device,
    names: OptionNames = CLI_OPTIONS,
) -> tuple[int, str] | None:
    """What a probe is fitted to, in bytes and in words: ``probe_memory`` times a training
    step's estimated peak when given (spelled as ``names`` spells the option), else
    ``memory.DEVICE_SHARE`` of the device's memory; None where that is not known."""
    if probe_memory is not None:
        multiple = f"{probe_memory:g}"
        words = f"{names.probe_memory.format(multiple)}, {multiple}x a training step's"
        return int(probe_memory * footprint.training_step_bytes), words
    total = device_memory_bytes(device)
    if total is None:
        return None
    return int(DEVICE_SHARE * total), f"{DEVICE_SHARE:.0%} of {_device_words(device)} memory"


def _device_words(device: torch.device) -> str:
    return "this machine's" if device.type == "cpu" else f"{device}'s"


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here")
    return device


def move_to_device(batch: Any, device: torch.device) -> Any:
    """A batch (tensor, tuple/list or dict of them, nested) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(value, device) for value in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to_device(value, device) for value in batch)
    return batch


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def file_optimizer_conflicts(model_file: ModelFile, given: Mapping[str, Any]) -> ConfigError | None:
    """The error for options ``given`` (not None) that the file's ``optimizer(parameters)``
    decides instead (``--optimizer``, ``--lr``); None when there is none."""
    if model_file.make_optimizer is None:
        return None
    flags = ["--" + name for name in FILE_OPTIMIZER_OPTIONS if given.get(name) is not None]
    if not flags:
        return None
    verb = "does" if len(flags) == 1 else "do"
    return ConfigError(
        f"{' and '.join(flags)} {verb} not apply: {model_file.path.name} defines "
        "optimizer(parameters), which chooses the optimizer and its lr; change them there, or "
        "remove optimizer() to use --optimizer and --lr"
    )


def make_optimizer(config: RunConfig, parameters: list[torch.Tensor]) -> torch.optim.Optimizer:
    """The optimizer that the run options name: sgd, momentum or adam at ``config.lr``."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr)
    if config.optimizer == "momentum":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum)
    return torch.optim.Adam(parameters, lr=config.lr)


def gradient_norm(parameters: list[torch.Tensor], max_norm: float | None) -> float:
    """The total gradient norm before clipping; clips in place when ``max_norm`` is given."""
    if max_norm is not None:
        return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm=max_norm))
    norms = [torch.linalg.vector_norm(p.grad) for p in parameters if p.grad is not None]
    if not norms:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def cycle_batches(model_file: ModelFile, loader: Any) -> Iterator[Any]:
    """Batches forever: the dataloader is iterated again as often as needed.

    ``train`` draws one batch per step from step 0, so the batches drawn so far are the step
    at which a pass comes up empty."""
    drawn = 0
    while True:
        count = 0
        for batch in model_file.batches(loader):
            count += 1
            yield batch
        if count == 0 and drawn == 0:
            raise model_file.error("dataloader() yields no batches")
        if count == 0:
            raise model_file.error(_empty_pass_message(loader, drawn))
        drawn += count


def _empty_pass_message(loader: Any, drawn: int) -> str:
    """Why a pass over the data after the first yielded nothing: most often ``dataloader()``
    returned an iterator (a generator), which a second pass finds exhausted."""
    source = loader.loader if isinstance(loader, ShardedLoader) else loader
    advice = "return a re-iterable (a DataLoader, a list, or a class with __iter__) instead"
    if isinstance(source, Iterator):
        kind = "a generator" if inspect.isgenerator(source) else type(source).__name__
        return (
            f"dataloader() returned a one-shot iterator ({kind}), which cannot be iterated "
            f"twice; it was exhausted after {plural(drawn, 'batch')} at step {drawn}; {advice}"
        )
    return (
        f"dataloader()'s iterable yielded no batches on a second pass, after "
        f"{plural(drawn, 'batch')} at step {drawn}; every pass must yield batches: {advice}"
    )


@dataclass(frozen=True)
class StepReport:
    """What the loop tells its caller after each optimizer step (for a progress display)."""

    step: int
    loss: float
    grad_norm: float
    probe: ProbeRecord | None
    train_seconds: float = 0.0  # wall time of the run's steps so far, probing left out


@dataclass
class RunResult:
    steps_done: int = 0
    final_loss: float = math.nan
    probes: list[ProbeRecord] = field(default_factory=list)
    probes_skipped: int = 0
    steps_skipped: int = 0  # --amp fp16: steps whose gradient overflowed, so no update was made
    hvp_method: str = ""
    diverged_at: int | None = None
    seconds: float = 0.0
    probe_seconds: float = 0.0  # of ``seconds``, the time spent probing (writing rows included)
    restarted_solves: int = 0  # eigen-solves whose basis reached --max-basis and restarted

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None


@dataclass
class PreparedRun:
    """Model, data, probe batches and optimizer, ready to train; all user code already checked."""

    model_file: ModelFile
    config: RunConfig
    device: torch.device
    model: torch.nn.Module
    loader: Any
    probe_batches: list[Any]
    optimizer: torch.optim.Optimizer
    comm: Communicator | None = None
    train_model: torch.nn.Module | None = None  # the DDP wrapper that training goes through
    scheduler: Any = None  # the model file's scheduler(optimizer), stepped once per step
    scaler: Any = None  # the GradScaler of --amp fp16
    initial_lr: float | None = None  # param group 0's lr before any schedule: what --lr says
    probe_batches_choice: ProbeBatchesChoice | None = None  # when no option chose them
    parameter_groups: list[ParameterGroup] | None = None  # --per-layer: the groups it measures
    probe_memory_choice: ProbeMemoryChoice | None = None  # the basis and graph for memory

    @property
    def probe_batches_by_size(self) -> bool:
        """The run's probe batches were chosen by ``default_probe_batches``."""
        return self.probe_batches_choice is not None

    @property
    def world_size(self) -> int:
        return 1 if self.comm is None else self.comm.world_size

    @property
    def optimizer_from_file(self) -> bool:
        return self.model_file.make_optimizer is not None

    @property
    def optimizer_name(self) -> str:
        """The options' name (sgd, momentum, adam) or the file's optimizer class in lower case
        (an SGD with momentum is "momentum", as the options name it)."""
        if not self.optimizer_from_file:
            return self.config.optimizer
        if type(self.optimizer) is torch.optim.SGD and self.optimizer.param_groups[0].get(
            "momentum"
        ):
            return "momentum"
        return type(self.optimizer).__name__.lower()

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context of a training forward pass (none without ``--amp``); the probe
        never runs in it."""
        if self.config.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_AMP_DTYPE[self.config.amp])

    def recorded_config(self) -> dict[str, Any]:
        """The run's config as the trajectory file records it: every option, and how the run
        trained where the model file decided it (optimizer, lr, schedule) or the model's
        parameters do (the probe's dtype: the probe evaluates without autocast; the number of
        probe batches when no option chose it)."""
        data = {**self.config.as_json(), "world_size": self.world_size}
        data["probe_batches_by_size"] = self.probe_batches_by_size
        if self.probe_batches_choice is not None:
            data["probe_graph_bytes"] = self.probe_batches_choice.graph_bytes
        if self.probe_memory_choice is not None:
            data["probe_memory_estimate"] = self.probe_memory_choice.as_json()
        data["optimizer_source"] = "model file" if self.optimizer_from_file else "options"
        data["scheduler"] = None if self.scheduler is None else type(self.scheduler).__name__
        if self.optimizer_from_file:
            group = self.optimizer.param_groups[0]
            data["optimizer"] = self.optimizer_name
            data["lr"] = self.initial_lr
            data["momentum"] = group.get("momentum")
            data["optimizer_settings"] = {  # the lr is ``lr`` above: the schedule moves it
                key: _json_value(value)
                for key, value in group.items()
                if key not in ("params", "lr", "initial_lr") and _json_value(value) is not None
            }
        data["probe_autocast"] = False
        data["probe_dtype"] = str(self.model_dtype).removeprefix("torch.")
        return data

    def probe_work(self, records: list[ProbeRecord]) -> ProbeWork:
        """The mean work of ``records``' probes: gradients and HVPs (both solvers': the Hessian
        norm's and, with Adam, the preconditioned sharpness's) over the probe batches."""
        return probe_work(
            [r.hvp_count + r.preconditioned_hvp_count + r.group_hvp_count for r in records],
            num_batches=len(self.probe_batches),
            estimators=self.config.estimators,
            num_fd_points=len(self.config.fd_points),
            group_hvp_counts=[r.group_hvp_count for r in records] if self.parameter_groups else (),
            num_groups=len(self.parameter_groups or ()),
        )

    def probing_cost(self, result: RunResult) -> ProbingCost:
        """What probing cost the run that ``train`` returned as ``result``."""
        return ProbingCost(
            num_probes=len(result.probes),
            probe_seconds=result.probe_seconds,
            run_seconds=result.seconds,
            steps_done=result.steps_done,
            work=self.probe_work(result.probes),
        )

    @property
    def model_dtype(self) -> torch.dtype:
        return trainable_parameters(self.model)[0].dtype


_AMP_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _json_value(value: Any) -> Any:
    """A hyperparameter as JSON (numbers, text, flags, tuples of numbers); None if it is not."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (tuple, list)) and all(isinstance(v, (int, float)) for v in value):
        return list(value)
    return None


def prepare_run(
    model_file: ModelFile,
    config: RunConfig,
    *,
    comm: Communicator | None = None,
    device: torch.device | None = None,
) -> PreparedRun:
    """Seed, build the model and data, draw the probe batches, and check the loss on them.

    With a communicator (a data-parallel run), every rank builds the same model and draws the
    same probe batches; training goes through a ``DistributedDataParallel`` wrapper, each rank
    iterates its share of the data (``distributed.shard_dataloader``), and the global random
    generators of rank r continue from ``seed + r``.
    """
    device = resolve_device(config.device) if device is None else device
    given_max_basis, given_retain_graphs = config.max_basis, config.retain_graphs
    seed_everything(config.seed)
    model = instantiate_model(model_file).to(device)
    model.train()
    if config.probe_batches is None and config.probe_every == 0:  # no probes: nothing to size
        config = dataclasses.replace(config, probe_batches=1)
    by_size = config.probe_batches is None  # by the model's size; the run's header says so
    loader = make_dataloader(model_file)
    with unchanged_model_state(model, device):
        seed_everything(config.seed)
        count = SMALL_PROBE_BATCHES if by_size else config.probe_batches
        probe_batches = [move_to_device(b, device) for b in first_batches(model_file, count)]
        check_loss(model_file, model, probe_batches[0])
        choice = None
        if by_size:
            choice = choose_probe_batches(model_file, model, probe_batches[0], device)
    if choice is not None:
        probe_batches = probe_batches[: choice.batches]
        retain = config.retain_graphs if config.retain_graphs is not None else choice.retain_graphs
        config = dataclasses.replace(config, probe_batches=choice.batches, retain_graphs=retain)
        config.validate()
    parameters = trainable_parameters(model)
    parameter_groups = resolve_groups(model, config.groups) if config.per_layer else None
    if model_file.make_optimizer is not None:
        optimizer = instantiate_optimizer(model_file, parameters)
    else:
        optimizer = make_optimizer(config, parameters)
    initial_lr = float(optimizer.param_groups[0]["lr"])
    memory_choice = None
    if config.probe_every != 0 and "hvp" in config.estimators:
        with unchanged_model_state(model, device):
            seed_everything(config.seed)
            footprint = count_memory_footprint(
                model_file.call_loss,
                model,
                probe_batches[0],
                device,
                optimizer,
                num_probe_batches=len(probe_batches),
                amp=config.amp,
                graph_bytes=None if choice is None else choice.graph_bytes,
            )
        memory_choice = choose_run_probe_memory(
            footprint,
            config,
            device,
            max_basis_given=given_max_basis,
            retain_given=given_retain_graphs is not None,
        )
        if comm is not None:  # the ranks run one Lanczos iteration together: rank 0's choice
            memory_choice = comm.from_rank0(memory_choice)
    if memory_choice is not None:
        if not memory_choice.fits and config.probe_memory is not None:
            raise ConfigError(memory_choice.shortfall())
        retain = config.retain_graphs
        if memory_choice.retain_graphs is not None:
            retain = memory_choice.retain_graphs
        config = dataclasses.replace(
            config, max_basis=memory_choice.max_basis, retain_graphs=retain
        )
    if config.max_basis is None:
        config = dataclasses.replace(config, max_basis=DEFAULT_MAX_BASIS)
    scheduler = None
    if model_file.make_scheduler is not None:
        scheduler = instantiate_scheduler(model_file, optimizer)
    scaler = make_grad_scaler(config, device)
    train_model = model
    if comm is not None:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" and device.index is not None else None
        train_model = DistributedDataParallel(
            model, device_ids=device_ids, process_group=comm.group
        )
        loader = shard_dataloader(loader, comm, seed=config.seed)
        # Each rank draws its own dropout masks (and its loader workers' seeds), as the rows of
        # one big batch would; the model is built and the data split alike on every rank.
        seed_everything(config.seed + comm.rank)
    return PreparedRun(
        model_file,
        config,
        device,
        model,
        loader,
        probe_batches,
        optimizer,
        comm,
        train_model,
        scheduler=scheduler,
        scaler=scaler,
        initial_lr=initial_lr,
        probe_batches_choice=choice,
        parameter_groups=parameter_groups,
        probe_memory_choice=memory_choice,
    )


def make_grad_scaler(config: RunConfig, device: torch.device) -> torch.amp.GradScaler | None:
    """The GradScaler of ``--amp fp16`` (None otherwise); ConfigError where this torch cannot
    autocast float16 on the device."""
    if config.amp != "fp16":
        return None
    if not torch.amp.is_autocast_available(device.type):
        raise ConfigError(f"--amp fp16: torch {torch.__version__} has no autocast on {device}")
    try:
        return torch.amp.GradScaler(device.type)
    except (RuntimeError, ValueError) as error:
        raise ConfigError(f"--amp fp16 needs a GradScaler on {device}: {error}") from None


def train(
    run: PreparedRun,
    *,
    on_probe: Callable[[ProbeRecord], None] | None = None,
    on_train_row: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[StepReport], None] | None = None,
    on_probe_hvp: Callable[[int, int], None] | None = None,
) -> RunResult:
    """Train for ``config.steps`` optimizer steps, probing on schedule.

    ``on_probe``, ``on_train_row`` and ``on_step`` get each probe record, training row and
    step as it is done; ``on_probe_hvp(step, count)`` each Hessian-vector product of a probe.

    Each step adds up the gradients of ``config.accumulate`` batches, under autocast with
    ``config.amp``, and makes one optimizer step, then one step of the file's scheduler; the
    probe measures before the step's first batch, outside autocast.

    Stops early, with ``diverged_at`` set, at the first non-finite loss or gradient norm (that
    step is recorded, no update is made); under ``--amp fp16`` a non-finite gradient is the
    GradScaler's to skip (``skipped`` in the row), and only a non-finite loss stops the run.
    """
    config, model, model_file = run.config, run.model, run.model_file
    train_model = run.train_model if run.train_model is not None else model
    parameters = trainable_parameters(model)
    result = RunResult()
    probe = Probe(
        train_model,
        model_file.call_loss,
        run.probe_batches,
        schedule=probe_schedule(config),
        max_overhead=config.overhead_cap,
        floor_steps=budget_floor_steps(config) if config.overhead_cap is not None else None,
        hvp_method=config.hvp_method,
        retain_graphs=config.retain_graphs,
        estimators=config.estimators,
        rtol=config.rtol,
        max_hvps=config.max_hvps,
        max_basis=config.max_basis,
        fd_points=config.fd_points,
        mode=config.probe_mode,
        seed=config.seed,
        on_record=on_probe,
        on_hvp=on_probe_hvp,
        distributed=run.comm is not None,
        process_group=None if run.comm is None else run.comm.group,
        optimizer=run.optimizer,
        groups=run.parameter_groups,
    )
    started = time.perf_counter()
    batches = cycle_batches(model_file, run.loader)
    for step in range(config.steps):
        probed = probe.is_due(step)
        if probed:  # outside autocast: the probe measures the model's own dtype
            probe.before_step(step)
        loss, norm, lr, finite, skipped = training_step(
            run, train_model, parameters, batches, config.clip
        )
        record = probe.after_step(update_made=finite and not skipped) if probed else None
        row = {
            "step": step,
            "loss": loss,
            "grad_norm": norm,
            "lr": lr,
            "clipped": config.clip is not None and not skipped and norm > config.clip,
            "skipped": skipped,
        }
        if on_train_row is not None:
            on_train_row(row)
        result.steps_done = step + 1
        result.steps_skipped += skipped
        result.final_loss = loss
        if record is not None:
            result.probes.append(record)
        if on_step is not None:
            train_seconds = time.perf_counter() - started - probe.probe_seconds
            on_step(StepReport(step, loss, norm, record, train_seconds))
        if not finite:
            result.diverged_at = step
            break
    result.seconds = time.perf_counter() - started
    result.probe_seconds = probe.probe_seconds
    result.probes_skipped = probe.skipped
    result.restarted_solves = probe.restarted_solves
    result.hvp_method = probe.hvp_method
    return result


def training_step(
    run: PreparedRun,
    train_model: torch.nn.Module,
    parameters: list[torch.Tensor],
    batches: Any,
    clip: float | None,
) -> tuple[float, float, float, bool, bool]:
    """One optimizer step of ``run``: the gradients of ``config.accumulate`` batches, clipped at
    ``clip``, the optimizer's step and one of the file's scheduler. Returns the loss (the mean
    over the ranks), the gradient norm before clipping, the step's lr (before the schedule
    moves), whether loss and gradient are finite (no step is taken otherwise; under ``--amp
    fp16`` a non-finite gradient is the GradScaler's to skip) and whether the scaler skipped."""
    run.optimizer.zero_grad(set_to_none=True)
    loss = _accumulate_gradients(run, train_model, batches)
    if run.comm is not None:  # the global minibatch loss: the mean over the ranks
        loss = run.comm.sum_floats(loss)[0] / run.comm.world_size
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)  # the norm and the clip of the true gradient
    norm = gradient_norm(parameters, clip)  # DDP averaged the gradients: global
    lr = run.optimizer.param_groups[0]["lr"]
    finite = math.isfinite(loss) and (math.isfinite(norm) or run.scaler is not None)
    skipped = False
    if finite:
        skipped = _optimizer_step(run)
        if run.scheduler is not None and not skipped:
            step_scheduler(run.model_file, run.scheduler, loss)
    return loss, norm, lr, finite, skipped


def _accumulate_gradients(run: PreparedRun, train_model: torch.nn.Module, batches: Any) -> float:
    """The gradients of ``config.accumulate`` batches, added up in ``.grad`` (each loss divided
    by their number, and scaled under ``--amp fp16``); returns the mean of their losses.

    In a data-parallel run the gradients are averaged over the ranks at the last batch only."""
    model_file, count = run.model_file, run.config.accumulate
    scaling = _backward_scaling(run)
    losses = []
    for index in range(count):
        batch = move_to_device(next(batches), run.device)
        last = index == count - 1
        syncing = last or not hasattr(train_model, "no_sync")
        with contextlib.nullcontext() if syncing else train_model.no_sync():
            with run.autocast():
                loss_tensor = model_file.call_loss(train_model, batch)
            model_file.backward(loss_tensor, scaling)
        losses.append(float(loss_tensor.detach()))
    return losses[0] if count == 1 else math.fsum(losses) / count


def _backward_scaling(run: PreparedRun) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What multiplies each loss before its backward pass: 1/accumulate and the fp16 scale."""
    count, scaler = run.config.accumulate, run.scaler
    if count == 1 and scaler is None:
        return None

    def scaled(loss: torch.Tensor) -> torch.Tensor:
        loss = loss / count if count > 1 else loss
        return scaler.scale(loss) if scaler is not None else loss

    return scaled


def _optimizer_step(run: PreparedRun) -> bool:
    """Step the optimizer (through the GradScaler under ``--amp fp16``); True when the scaler
    skipped the step because the gradient overflowed (then the parameters did not move)."""
    if run.scaler is None:
        run.optimizer.step()
        return False
    scale = run.scaler.get_scale()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return run.scaler.get_scale() < scale


def save_state_dict(model: torch.nn.Module, path: str | Path) -> None:
    torch.save(model.state_dict(), Path(path))
