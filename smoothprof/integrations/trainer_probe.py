"""What the trainer callbacks share: their options, the probe batches drawn from the training
data, and the probe around the trainer's optimizer step that writes the trajectory file.

A callback turns the trainer's hooks into three calls of ``TrainerProbe``: ``before_update(t)``
while the parameters are x_t (before update t), ``after_update()`` once the optimizer has made
update t, and ``append_train(row)`` with the trainer's own numbers for the step. Rank 0 alone
writes the file; every rank probes (the probe's collectives need them all).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import ConfigError
from ..estimators import DEFAULT_MAX_BASIS, MIN_BASIS
from ..memory import CALLBACK_OPTIONS, ProbeMemoryChoice, choose_probe_memory
from ..objective import HVP_METHODS, LossFn
from ..probe import ESTIMATORS, MODES, Probe, ProbeRecord, unchanged_model_state
from ..schedule import DEFAULT_NUM_PROBES, Schedule, as_schedule, every_k_steps, spread_steps
from ..train import count_memory_footprint, move_to_device, probe_memory_limit
from ..trajectory import TrajectoryWriter

logger = logging.getLogger("smoothprof")

LOGGED_PREFIX = "smoothprof/"
"""The probe's values reach the trainer's loggers under this prefix: ``smoothprof/hessian_norm``."""

LOGGED_COLUMNS = (
    "loss",
    "grad_norm",
    "hessian_norm",
    "smoothness_fd",
    "grad_curvature",
    "grad_noise",
    "preconditioned_sharpness",
)


@dataclass(frozen=True)
class CallbackOptions:
    """The probe's options as a trainer callback takes them.

    ``probe_batches``: a count of batches to draw from the trainer's training data (a seeded
    sample of its dataset, collated by its loader; the training's own order is not touched), or
    the batches themselves. The schedule: ``every`` k steps, or ``schedule`` (a function of the
    step or a collection of steps), or by default ``num_probes`` probes spread over the
    trainer's planned steps; giving two of them is an error, never a silent choice.
    ``max_basis``: the eigen-solver's bound on vectors of the model's size; None (default): 20,
    or fewer where the probe would not fit in 80% of the device's memory, or within
    ``probe_memory`` times a training step's when that is given (``fit_probe_to_memory``).
    """

    output: Path
    probe_batches: int | tuple[Any, ...] = 4
    every: int | None = None
    schedule: Callable[[int], bool] | Collection[int] | None = None
    num_probes: int | None = None
    estimators: tuple[str, ...] = ESTIMATORS
    rtol: float = 1e-3
    max_hvps: int = 100
    max_basis: int | None = None
    probe_memory: float | None = None
    fd_points: tuple[float, ...] = (0.5,)
    mode: str = "train"
    seed: int = 0
    hvp_method: str = "auto"
    overwrite: bool = False

    @classmethod
    def from_arguments(cls, output: str | Path, **arguments: Any) -> CallbackOptions:
        """The options from a callback's keyword arguments; ConfigError for a value that cannot
        work or values that conflict."""
        probe_batches = arguments.get("probe_batches", 4)
        if not isinstance(probe_batches, int) and probe_batches is not None:
            arguments["probe_batches"] = tuple(probe_batches)
        for key in ("estimators", "fd_points"):
            if key in arguments and not isinstance(arguments[key], tuple):
                raw = arguments[key]
                arguments[key] = tuple(raw.split(",")) if isinstance(raw, str) else tuple(raw)
        options = cls(Path(output), **arguments)
        options.validate()
        return options

    def validate(self) -> None:
        problems = []
        if isinstance(self.probe_batches, bool) or (
            isinstance(self.probe_batches, int) and self.probe_batches <= 0
        ):
            problems.append(f"probe_batches must be a positive count, got {self.probe_batches!r}")
        elif isinstance(self.probe_batches, tuple) and not self.probe_batches:
            problems.append("probe_batches is empty: give at least one batch, or a count")
        chosen = [
            name
            for name, value in (
                ("every", self.every),
                ("schedule", self.schedule),
                ("num_probes", self.num_probes),
            )
            if value is not None
        ]
        if len(chosen) > 1:
            both = " and ".join(chosen)
            problems.append(f"give one of every, schedule and num_probes, not {both}")
        if self.every is not None and (
            isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 0
        ):
            problems.append(f"every must be an integer >= 0, got {self.every!r}")
        if self.num_probes is not None and (
            isinstance(self.num_probes, bool)
            or not isinstance(self.num_probes, int)
            or self.num_probes < 0
        ):
            problems.append(f"num_probes must be an integer >= 0, got {self.num_probes!r}")
        unknown = [e for e in self.estimators if e not in ESTIMATORS]
        if unknown or not self.estimators:
            problems.append(
                f"unknown estimator(s) {', '.join(unknown) or '(none given)'}; "
                f"choose from {', '.join(ESTIMATORS)}"
            )
        if not (isinstance(self.rtol, (int, float)) and math.isfinite(self.rtol) and self.rtol > 0):
            problems.append(f"rtol must be positive, got {self.rtol!r}")
        if not _positive_int(self.max_hvps):
            problems.append(f"max_hvps must be a positive integer, got {self.max_hvps!r}")
        if self.max_basis is not None and not (
            _positive_int(self.max_basis) and self.max_basis >= MIN_BASIS
        ):
            problems.append(
                f"max_basis must be an integer >= {MIN_BASIS} (or None: chosen for the device's "
                f"memory), got {self.max_basis!r}"
            )
        if self.probe_memory is not None and not (
            isinstance(self.probe_memory, (int, float))
            and not isinstance(self.probe_memory, bool)
            and math.isfinite(self.probe_memory)
            and self.probe_memory > 1
        ):
            problems.append(
                "probe_memory must be a number above 1 (the probe's peak memory as a multiple "
                f"of a training step's), got {self.probe_memory!r}"
            )
        elif self.probe_memory is not None and "hvp" not in self.estimators:
            problems.append("probe_memory sizes the hvp estimator's eigen-solver: add hvp")
        if not self.fd_points or any(
            not (isinstance(g, (int, float)) and 0 < g <= 1) for g in self.fd_points
        ):
            problems.append(f"fd_points must lie in (0, 1], got {list(self.fd_points)}")
        if self.mode not in MODES:
            problems.append(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.hvp_method not in ("auto", *HVP_METHODS):
            problems.append(
                f"hvp_method must be one of auto, {', '.join(HVP_METHODS)}, got {self.hvp_method!r}"
            )
        if self.output.is_dir():
            problems.append(f"output {self.output} is a directory, not a file")
        elif not self.output.parent.is_dir():
            problems.append(f"output {self.output}: no such directory {self.output.parent}")
        if problems:
            raise ConfigError("; ".join(problems))

    def probe_schedule(self, num_steps: int | None) -> Schedule:
        """When to probe in a run of ``num_steps`` optimizer steps (None: not known)."""
        if self.schedule is not None:
            return as_schedule(self.schedule)
        if self.every is not None:
            return every_k_steps(self.every)
        if num_steps is None:
            raise ConfigError(
                "the trainer does not know its number of steps, so the default schedule (probes "
                "spread over the run) cannot be laid out: give every= or schedule="
            )
        return as_schedule(spread_steps(num_steps, self.num_probes or DEFAULT_NUM_PROBES))

    def as_json(self, num_steps: int | None) -> dict[str, Any]:
        """The options as the trajectory's ``config`` records them (``smoothprof run``'s names)."""
        if self.schedule is not None:
            schedule: dict[str, Any] = {"probe_schedule": "custom"}
        elif self.every is not None:
            schedule = {"probe_schedule": "every", "probe_every": self.every}
        else:
            schedule = {
                "probe_schedule": "auto",
                "num_probes": self.num_probes or DEFAULT_NUM_PROBES,
            }
        return {
            "steps": num_steps,
            **schedule,
            "estimators": list(self.estimators),
            "fd_points": list(self.fd_points),
            "probe_mode": self.mode,
            "rtol": self.rtol,
            "max_hvps": self.max_hvps,
            "max_basis": self.max_basis if self.max_basis is not None else DEFAULT_MAX_BASIS,
            "probe_memory": self.probe_memory,
            "hvp_method": self.hvp_method,
            "seed": self.seed,
            "max_overhead": None,
            "probe_autocast": False,
        }


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def sample_probe_batches(loader: Any, count: int, *, seed: int) -> list[Any]:
    """``count`` batches of the loader's batch size from its dataset, drawn by a generator of
    their own seeded with ``seed`` and put together by the loader's ``collate_fn``.

    Neither the loader, its sampler nor any global random state is used, so the training's
    order of batches stays exactly as without the probe."""
    dataset = getattr(loader, "dataset", None)
    if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset):
        raise ConfigError(
            "the training data is not a map-style dataset that probe batches can be drawn from; "
            "pass probe_batches=[batch, ...] (the batches themselves)"
        )
    try:
        size = len(dataset)
    except TypeError:
        raise ConfigError(
            "the training dataset has no length, so probe batches cannot be drawn from it; "
            "pass probe_batches=[batch, ...] (the batches themselves)"
        ) from None
    batch_size = getattr(loader, "batch_size", None) or getattr(
        getattr(loader, "batch_sampler", None), "batch_size", None
    )
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(
            "the training loader has no batch size to draw probe batches with; "
            "pass probe_batches=[batch, ...] (the batches themselves)"
        )
    if count * batch_size > size:
        raise ConfigError(
            f"probe_batches={count} batches of {batch_size} need {count * batch_size} examples; "
            f"the training dataset has {size}: ask for at most {size // batch_size}"
        )
    collate = getattr(loader, "collate_fn", None) or torch.utils.data.default_collate
    generator = torch.Generator(device="cpu").manual_seed(seed)
    order = torch.randperm(size, generator=generator).tolist()
    return [
        collate([dataset[i] for i in order[k * batch_size : (k + 1) * batch_size]])
        for k in range(count)
    ]


def optimizer_config(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """How the optimizer trains, as ``smoothprof run``'s config names it: ``optimizer`` (sgd,
    momentum, adam, or the class in lower case), ``lr`` (param group 0's before any schedule),
    ``momentum`` and ``optimizer_settings`` (group 0's other hyperparameters)."""
    group = optimizer.param_groups[0]
    name = type(optimizer).__name__.lower()
    if type(optimizer) is torch.optim.SGD and group.get("momentum"):
        name = "momentum"
    settings = {}
    for key, value in group.items():
        if key in ("params", "lr", "initial_lr"):
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (tuple, list)) and all(isinstance(v, (int, float)) for v in value):
            value = list(value)
        if isinstance(value, (bool, int, float, str, list)):
            settings[key] = value
    lr = group.get("initial_lr", group["lr"])
    return {
        "optimizer": name,
        "lr": float(lr.item() if isinstance(lr, torch.Tensor) else lr),
        "momentum": group.get("momentum"),
        "optimizer_settings": settings,
    }


def logged_values(record: ProbeRecord) -> dict[str, float]:
    """The probe's values for a trainer's loggers: the finite ones, under ``LOGGED_PREFIX``."""
    row = record.as_row()
    return {
        LOGGED_PREFIX + name: float(row[name])
        for name in LOGGED_COLUMNS
        if math.isfinite(float(row[name]))
    }


@contextlib.contextmanager
def _without_autocast(device: torch.device) -> Iterator[None]:
    """The probe measures the model's own dtype, even inside a trainer's autocast region."""
    if torch.amp.is_autocast_available(device.type):
        with torch.autocast(device.type, enabled=False):
            yield
    else:  # pragma: no cover - a device without autocast
        yield


def fit_probe_to_memory(probe: Probe, options: CallbackOptions) -> ProbeMemoryChoice | None:
    """The Lanczos basis and graph for the probe's memory, as ``smoothprof run`` chooses them
    (``memory.choose_probe_memory``): counted on the first probe batch before training, fitted
    to ``options.probe_memory`` times a training step's estimate when given, else to
    ``memory.DEVICE_SHARE`` of the device's memory; a ``max_basis`` the user gave is kept. None
    without the hvp estimator or where the device's memory is not known. In a data-parallel run
    rank 0's choice holds for every rank (they take their HVPs together). The model's state and
    the random state are as before (``unchanged_model_state``)."""
    if "hvp" not in options.estimators:
        return None
    device = probe.parameters[0].device
    choice = None
    if probe.comm is None or probe.comm.rank == 0:
        with unchanged_model_state(probe.model, device):
            footprint = count_memory_footprint(
                probe.loss_fn,
                probe.model,
                probe.batches[0],
                device,
                probe.optimizer,
                num_probe_batches=len(probe.batches),
            )
        limit = probe_memory_limit(footprint, options.probe_memory, device, CALLBACK_OPTIONS)
        if limit is not None:
            choice = choose_probe_memory(
                footprint,
                limit_bytes=limit[0],
                limit=limit[1],
                hvp_method=options.hvp_method,
                max_basis=options.max_basis,
                names=CALLBACK_OPTIONS,
            )
    if probe.comm is not None:
        choice = probe.comm.from_rank0(choice)
    return choice


class TrainerProbe:
    """The probe of one training run inside a trainer, and the file that rank 0 writes.

    ``start_step`` is the trainer's step count when training starts (above 0 when it resumed
    from a checkpoint: then the file, if there is one, is appended to, see
    ``TrajectoryWriter``'s ``resume_at_step``). ``attributes`` are the file's root attributes.
    """

    def __init__(
        self,
        options: CallbackOptions,
        *,
        model: torch.nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Any],
        optimizer: torch.optim.Optimizer | None,
        num_steps: int | None,
        start_step: int,
        writes: bool,
        attributes: Mapping[str, Any],
        distributed: bool,
    ) -> None:
        self.options = options
        self.writer: TrajectoryWriter | None = None
        if writes and start_step == 0 and options.output.exists() and not options.overwrite:
            raise ConfigError(
                f"{options.output}: already exists; pass overwrite=True to replace it (a run "
                "resumed from a checkpoint appends to it)"
            )
        self.probe = Probe(
            model,
            loss_fn,
            batches,
            schedule=options.probe_schedule(num_steps),
            estimators=options.estimators,
            rtol=options.rtol,
            max_hvps=options.max_hvps,
            max_basis=options.max_basis or DEFAULT_MAX_BASIS,
            fd_points=options.fd_points,
            mode=options.mode,
            seed=options.seed,
            hvp_method=options.hvp_method,
            distributed=distributed,
            optimizer=optimizer,
        )
        self.memory_choice = fit_probe_to_memory(self.probe, options)
        if self.memory_choice is not None:
            choice = self.memory_choice
            if not choice.fits and options.probe_memory is not None:
                raise ConfigError(choice.shortfall())
            if writes and (choice.changed or not choice.fits or options.probe_memory):
                logger.warning("smoothprof: %s", choice.describe())
            self.probe.max_basis = choice.max_basis
            if choice.retain_graphs is not None:
                self.probe.retain_graphs = choice.retain_graphs
            config = {
                **attributes.get("config", {}),
                "max_basis": choice.max_basis,
                "probe_memory_estimate": choice.as_json(),
            }
            attributes = {**attributes, "config": config}
        if writes:
            self.writer = TrajectoryWriter(
                options.output,
                attributes={"smoothprof_version": __version__, **attributes},
                overwrite=options.overwrite,
                resume_at_step=start_step if start_step > 0 else None,
            )
            self.probe.on_record = self.writer.append_probe
        self._due = False

    @property
    def device(self) -> torch.device:
        return self.probe.parameters[0].device

    def before_update(self, step: int) -> None:
        """Measure at x_t when ``step`` is due; call with the parameters before update t."""
        self._due = self.probe.is_due(step)
        if self._due:
            with _without_autocast(self.device):
                self.probe.before_step(step)

    def after_update(self, *, update_made: bool = True) -> ProbeRecord | None:
        """Finish a pending probe along the update just made (written to the file); None when
        no probe was pending. ``update_made=False``: the trainer skipped the update (an fp16
        overflow), so there is no finite difference."""
        if not self._due:
            return None
        self._due = False
        with _without_autocast(self.device):
            return self.probe.after_step(update_made=update_made)

    def append_train(self, row: Mapping[str, Any]) -> None:
        if self.writer is not None:
            self.writer.append_train(row)

    def close(self, **attributes: Any) -> None:
        """Close the file (safe to call twice), adding ``attributes`` (``hvp_method``, and
        ``interrupted`` or ``error`` when training ended that way)."""
        if self.writer is None:
            return
        probe = getattr(self, "probe", None)
        if probe is not None and probe.hvp_method != "auto":
            attributes.setdefault("hvp_method", probe.hvp_method)
        for key, value in attributes.items():
            self.writer.set_attribute(key, value)
        self.writer.close()


def probe_batches_on(options: CallbackOptions, loader: Any, device: torch.device) -> list[Any]:
    """The probe batches on ``device``: the options' own, or a count drawn from ``loader``."""
    if isinstance(options.probe_batches, int):
        batches = sample_probe_batches(loader, options.probe_batches, seed=options.seed)
    else:
        batches = list(options.probe_batches)
    return [move_to_device(batch, device) for batch in batches]
