"""The ``smoothprof`` command: parse options, call the library, display.

The only place where errors become exit codes: 0 success, 1 a problem with the user's file or
data (one line on stderr; ``--debug`` shows the traceback), 2 a usage error, 3 the run diverged,
130 interrupted by Ctrl-C. The data measured before an error, a divergence or an interrupt is
always in the trajectory file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import json
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text
from typer.core import TyperGroup

# torch, and the modules that import it, only where `run` needs them: the other commands, --help
# and --version start without it.
from . import __version__
from .analysis import ESTIMATOR_COLUMNS, Analysis, analyze
from .choices import AMP_DTYPES, OPTIMIZERS
from .compare import CompareError, compare_trajectories, comparison_as_json
from .cost import first_probe_note
from .display import (
    ESTIMATOR_LABELS,
    compare_plot,
    compare_table,
    edge_of_stability_table,
    envelope_plot,
    fit_summary,
    format_number,
    group_envelope_plot,
    group_sharpness_plot,
    per_layer_view,
    probe_line,
    profile_sweep_commands,
    recommendations_view,
    series_plot,
    to_ascii,
    watch_view,
)
from .errors import ConfigError, ModelFileError
from .fit import FitError
from .per_layer import PerLayerAnalysis, analyze_per_layer
from .report import ReportError, require_matplotlib, write_report
from .schedule import BUDGET_FLOOR, DEFAULT_NUM_PROBES, planned_probe_steps
from .trajectory import (
    Trajectory,
    TrajectoryError,
    TrajectoryWriter,
    read_trajectory,
    repair_trajectory,
)
from .wording import plural

if TYPE_CHECKING:
    import torch

    from .distributed import Launch
    from .train import PreparedRun, RunConfig, StepReport

EXIT_USER_ERROR = 1
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


class _LiteralHelpGroup(TyperGroup):
    """The command group whose help shows every help text as written: what rich would take
    for markup (``[default: 500]``, ``smoothprof[science]``) is escaped, in every command's and
    every option's help, however they are added."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        for command in (self, *self.commands.values()):
            command.help = escape(command.help) if command.help else command.help
            for param in command.params:
                if getattr(param, "help", None):
                    param.help = escape(param.help)


app = typer.Typer(
    name="smoothprof",
    cls=_LiteralHelpGroup,
    help=(
        "Measure (L0, L1)-smoothness along a PyTorch training run, fit L0 and L1, and suggest a "
        "gradient-clip threshold and a step size (Zhang, He, Sra, Jadbabaie, ICLR 2020)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

USER_ERRORS = (ModelFileError, TrajectoryError, FitError, ConfigError, CompareError, ReportError)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"smoothprof {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """smoothprof: (L0, L1)-smoothness profiler for PyTorch training."""


def _error_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _user_errors(debug: bool, *, rank: int = 0, as_json: bool = False) -> Iterator[None]:
    """Turn the user's mistakes into one line on stderr and exit code 1 (ranks other than 0 of
    a data-parallel run say which they are); ``as_json`` also prints ``{"error": line}`` on
    stdout, for a script that reads the command's JSON."""
    try:
        yield
    except USER_ERRORS as error:
        if debug:
            raise
        where = "" if rank == 0 else f"(rank {rank}) "
        _error_console().print(f"error: {where}{error}", markup=False)
        if as_json:
            typer.echo(json.dumps({"error": f"{where}{error}"}))
        raise typer.Exit(EXIT_USER_ERROR) from None


def _use_color() -> bool:
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ


def _output_width(width: int | None) -> int:
    if width is not None:
        return width
    try:
        return max(40, int(os.environ.get("COLUMNS", "")))
    except ValueError:
        return 100


def _stdout_console(width: int) -> Console:
    color = _use_color()
    return Console(width=width, highlight=False, no_color=not color, force_terminal=color or None)


def _emit(width: int, ascii_only: bool, *renderables: Any) -> None:
    """Print tables and plots to stdout at exactly ``width`` columns.

    Colour only on a terminal without NO_COLOR: otherwise no escape code at all, whatever rich
    would guess from the environment (FORCE_COLOR, TTY_COMPATIBLE, ...), so a log gets the same
    bytes for the same file. With ``ascii_only`` the renderables are already ASCII (display.py
    lays them out so); ``to_ascii`` is the guarantee for anything else.
    """
    color = _use_color() and not ascii_only
    console = Console(
        width=width,
        file=io.StringIO(),
        highlight=False,
        emoji=False,
        no_color=not color,
        force_terminal=color,
        force_jupyter=False,
        color_system="auto" if color else None,
        legacy_windows=False,
    )
    for renderable in renderables:
        console.print(renderable, crop=False)  # a command to paste stays whole on its line
    text = console.file.getvalue()
    if not color:  # rich pads centred titles and captions: drop the trailing blanks
        text = "\n".join(line.rstrip() for line in text.split("\n"))
    typer.echo(to_ascii(text) if ascii_only else text, nl=False, color=color)


DebugOption = Annotated[
    bool, typer.Option("--debug", help="Show the full traceback instead of a one-line error.")
]
WidthOption = Annotated[
    int | None,
    typer.Option("--width", min=40, help="Output width in columns [default: $COLUMNS, else 100]."),
]
# The fit's options, shared by the commands that fit (fit, report).
QuantileOption = Annotated[
    float, typer.Option(min=0.5, max=0.999, help="Quantile of the envelope fit.")
]
EstimatorOption = Annotated[
    str | None,
    typer.Option(help="Smoothness column to fit: hvp or fd [default: hvp when present]."),
]
SkipStepsOption = Annotated[
    int, typer.Option(min=0, help="Drop probes before this step (transient).")
]
BootstrapOption = Annotated[
    int, typer.Option(min=0, help="Bootstrap resamples for the confidence intervals (0: none).")
]
AsciiOption = Annotated[
    bool,
    typer.Option(
        "--ascii", help="Draw plots with ASCII characters only (for logs that mangle others)."
    ),
]


def _check_choices(values: list[str], allowed: tuple[str, ...], what: str) -> None:
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        raise typer.BadParameter(
            f"unknown {what} {', '.join(unknown) or '(none)'}; choose from {', '.join(allowed)}"
        )


@app.command()
def run(
    model_file: Annotated[
        Path, typer.Argument(help="Python file defining model() and dataloader().")
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Trajectory file to write [default: MODEL_FILE stem + .h5]."
        ),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(min=1, help="Optimizer steps [default: 500].")
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help="Step size (learning rate) [default: 0.1].")
    ] = None,
    optimizer: Annotated[
        str | None, typer.Option(help=f"One of {', '.join(OPTIMIZERS)} [default: sgd].")
    ] = None,
    clip: Annotated[
        float | None, typer.Option(help="Clip the gradient norm at this threshold [default: off].")
    ] = None,
    no_clip: Annotated[
        bool, typer.Option("--no-clip", help="Do not clip, even if the model file's defaults do.")
    ] = False,
    amp: Annotated[
        str | None,
        typer.Option(
            help=f"Train under autocast: {' or '.join(AMP_DTYPES)} (fp16 with a GradScaler, "
            "skipped steps recorded); the probe measures in the model's own dtype "
            "[default: off]."
        ),
    ] = None,
    accumulate: Annotated[
        int | None,
        typer.Option(
            min=1, help="Batches whose gradients add up to one optimizer step [default: 1]."
        ),
    ] = None,
    probe_every: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Probe every K steps (the every schedule); 0 turns probing off "
            "[default: the auto schedule].",
        ),
    ] = None,
    probe_schedule: Annotated[
        str | None,
        typer.Option(
            help="auto (--num-probes spread over the run: half evenly, half log-spaced), every "
            "(every --probe-every steps) or log (--probes-per-decade) [default: auto; every "
            "when --probe-every is given].",
        ),
    ] = None,
    num_probes: Annotated[
        int | None,
        typer.Option(
            min=0, help=f"Probes of the auto schedule [default: {DEFAULT_NUM_PROBES}]."
        ),
    ] = None,
    probes_per_decade: Annotated[
        float | None,
        typer.Option(help="Probes per decade of steps for --probe-schedule log [default: 10]."),
    ] = None,
    max_overhead: Annotated[
        float | None,
        typer.Option(
            envvar="SMOOTHPROF_MAX_OVERHEAD",
            help="A time budget: skip a due probe when it would take probing over this "
            f"fraction of the training time, but never {BUDGET_FLOOR} probes spread over the "
            "run (then which steps are probed depends on the machine's speed) [default: none, "
            "every scheduled probe runs].",
        ),
    ] = None,
    hvp_method: Annotated[
        str | None,
        typer.Option(
            help="auto (the first that works, in this order), retained, double-backward, "
            "forward-over-reverse or finite-difference (two gradients, not exact: for models "
            "that cannot be differentiated twice) [default: auto]."
        ),
    ] = None,
    retain_graphs: Annotated[
        bool | None,
        typer.Option(
            "--retain-graphs/--no-retain-graphs",
            help="Keep every probe batch's double-backward graph at once for faster HVPs "
            "[default: only with one probe batch].",
        ),
    ] = None,
    probe_batches: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Fixed batches the probe measures on [default: by the model's size: 4 below 1M "
            "trainable parameters, else 1].",
        ),
    ] = None,
    estimators: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated: fd (finite difference along the update), hvp (top Hessian "
            "eigenvalue), curvature (along the gradient) [default: fd,hvp,curvature]."
        ),
    ] = None,
    fd_points: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated fractions of the update where fd takes the gradient "
            "[default: 0.5]."
        ),
    ] = None,
    probe_mode: Annotated[
        str | None,
        typer.Option(help="Evaluate the probe objective in train or eval mode [default: train]."),
    ] = None,
    rtol: Annotated[
        float | None,
        typer.Option(help="Relative error the Hessian eigen-solver certifies [default: 1e-3]."),
    ] = None,
    max_hvps: Annotated[
        int | None,
        typer.Option(min=1, help="Hessian-vector products per probe at most [default: 100]."),
    ] = None,
    max_basis: Annotated[
        int | None,
        typer.Option(
            min=4,  # estimators.MIN_BASIS, not imported here: it imports torch
            help="Vectors of the model's size the eigen-solver holds at most; a solve that "
            "needs more restarts (thick restart, same certificate) [default: 20, fewer where "
            "the probe would not fit: see --probe-memory]."
        ),
    ] = None,
    probe_memory: Annotated[
        float | None,
        typer.Option(
            help="Fit the probe's peak memory, as counted before training, within this many "
            "times a training step's: the run chooses --max-basis and whether the "
            "double-backward graph is kept, leaving the ones you give as given, and stops if "
            "it cannot [default: fit 80% of the device's memory]."
        ),
    ] = None,
    per_layer: Annotated[
        bool | None,
        typer.Option(
            "--per-layer/--no-per-layer",
            help="Also measure, at every probe, each parameter group's gradient norm and the "
            "top eigenvalue of its diagonal Hessian block (a Lanczos run per group: about one "
            "more whole-Hessian solve per group) [default: off].",
        ),
    ] = None,
    groups: Annotated[
        str | None,
        typer.Option(
            help="The groups of --per-layer: comma-separated name=pattern (fnmatch patterns "
            "over parameter names; a name may repeat; parameters no pattern matches form "
            "'rest') [default: the model's top-level children and own parameters].",
        ),
    ] = None,
    lr_search: Annotated[
        bool | None,
        typer.Option(
            "--lr-search/--no-lr-search",
            help="After training, search the step size: trials of a tenth of the run's steps "
            "(at least 20) from the initialization, at lr doubling from a quarter of the "
            "stability threshold 2/λ0 that the first probe measured, until one does not train "
            "or improve; "
            "`fit` recommends the best [default: on; off without probes].",
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed for model, data and probe [default: 0].")
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            help="auto (cuda when available, else cpu), cpu, cuda, cuda:1 ... [default: auto]."
        ),
    ] = None,
    save_model: Annotated[
        Path | None,
        typer.Option(help="Write the final state_dict here (torch.save) [default: not saved]."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite an existing output file.")
    ] = False,
    debug: DebugOption = False,
) -> None:
    """Train the model of MODEL_FILE while probing its smoothness; write the trajectory (HDF5).

    Options not given on the command line come from the file's `defaults` dict, then from the
    defaults shown here. Exit codes: 0 done, 1 a problem with the model file, 2 bad usage,
    3 the run diverged (non-finite loss or gradient; rows so far are kept), 130 Ctrl-C.

    Started by torchrun (`torchrun --nproc_per_node N -m smoothprof run ...`), every process
    trains its share of the data with DistributedDataParallel, the probe measures over all the
    probe batches, and rank 0 alone prints and writes the file.
    """
    from .distributed import torchrun_launch
    from .train import ESTIMATORS, RunConfig, prepare_run, save_state_dict

    overrides: dict[str, Any] = {
        "steps": steps, "lr": lr, "optimizer": optimizer, "clip": clip,
        "amp": amp, "accumulate": accumulate,
        "probe_every": probe_every, "probe_batches": probe_batches, "rtol": rtol,
        "probe_schedule": probe_schedule, "probes_per_decade": probes_per_decade,
        "num_probes": num_probes,
        "max_overhead": max_overhead, "hvp_method": hvp_method, "retain_graphs": retain_graphs,
        "max_hvps": max_hvps, "max_basis": max_basis, "probe_memory": probe_memory,
        "seed": seed, "device": device,
        "probe_mode": probe_mode,
        "per_layer": per_layer, "groups": groups, "lr_search": lr_search,
    }  # fmt: skip
    if estimators is not None:
        overrides["estimators"] = tuple(e.strip() for e in estimators.split(",") if e.strip())
        _check_choices(list(overrides["estimators"]), ESTIMATORS, "estimator")
    if fd_points is not None:
        try:
            overrides["fd_points"] = tuple(float(v) for v in fd_points.split(","))
        except ValueError:
            raise typer.BadParameter(f"--fd-points must be numbers, got {fd_points!r}") from None
    try:  # each value alone now; together with the file's defaults once it is loaded
        RunConfig.from_options({}, overrides, check_conflicts=False)
    except ConfigError as error:
        raise typer.BadParameter(str(error)) from None
    output = output if output is not None else Path(model_file.stem + ".h5")
    launch = torchrun_launch()
    if launch is not None and launch.world_size > 1:
        _run_distributed(launch, model_file, output, overrides, no_clip, save_model, force, debug)
        return
    err = _error_console()
    try:
        with _user_errors(debug):
            _check_output(output, force)
            spec, config = _load_run(model_file, overrides, no_clip)
            prepared = prepare_run(spec, config)
            _print_header(err, prepared)
            with TrajectoryWriter(
                output,
                attributes=_run_attributes(prepared),
                overwrite=force,
                groups=prepared.parameter_groups,
            ) as writer:
                result = _train_into(writer, prepared, err, debug)
                search = _search_step_size(writer, prepared, result, err)
            if save_model is not None:
                save_state_dict(prepared.model, save_model)
    except KeyboardInterrupt:
        err.print("interrupted before training started; nothing was written", markup=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    _print_summary(output, prepared, result, save_model, search)


def _search_step_size(writer: Any, prepared: Any, result: Any, err: Console) -> Any:
    """The step-size search after training (``smoothprof.step_search``), into the file's
    attributes; None when the run does not search. Ctrl-C stops the search only: the run's rows
    are kept, as always."""
    from .step_search import ATTRIBUTE, measured_clip_threshold, search_step_size

    config = prepared.config
    if not config.lr_search or config.probe_every == 0 or prepared.comm is not None:
        return None
    first = next((r for r in result.probes if math.isfinite(r.hessian_norm)), None)
    clip = config.clip if config.clip is not None else _acting_clip(result.probes)
    measured_clip = None
    if clip is None:  # the search also tries a clip it measured
        measured_clip = measured_clip_threshold([r.grad_norm for r in result.probes])
    err.print(
        "searching the step size (smoothprof fit recommends from it)"
        + (f", clipped at {clip:.3g}" if clip is not None else "")
        + " ...",
        markup=False,
    )
    try:
        with _user_errors(False):
            search = search_step_size(
                prepared,
                first_hessian_norm=None if first is None else first.hessian_norm,
                at_step=None if first is None else first.step,
                trained=_trained(result),
                clip=clip,
                measured_clip=measured_clip,
            )
    except KeyboardInterrupt:
        err.print("step-size search interrupted: the run's rows are kept without it", markup=False)
        return None
    writer.set_attribute(ATTRIBUTE, json.dumps(search.as_json()))
    return search


def _acting_clip(probes: list[Any]) -> float | None:
    """The clip of an unclipped run's search: c = L0/L1 of its probes (the Hessian norm's, else
    the finite difference's) when that clip acts (``recommend.acting_clip``); None otherwise or
    with fewer points than a fit needs."""
    from .fit import FitError, fit_envelope
    from .recommend import acting_clip

    grad_norms = [r.grad_norm for r in probes]
    for column in ("hessian_norm", "smoothness_fd"):
        values = [getattr(r, column) for r in probes]
        if sum(math.isfinite(v) and v > 0 for v in values) < 3:
            continue
        try:
            fit = fit_envelope(grad_norms, values, num_bootstrap=0)
        except FitError:
            return None
        return acting_clip(fit)[0]
    return None


def _per_layer(
    analysis: Analysis, skip_steps: int, quantile: float, bootstrap: int
) -> PerLayerAnalysis:
    """The per-layer fit of an analysis's files, its group clips judged against the headline."""
    return analyze_per_layer(
        analysis.trajectories,
        skip_steps=skip_steps,
        quantile=quantile,
        bootstrap=bootstrap,
        lr=analysis.recommendations.headline.step_size,
        profile_clip=analysis.profile.clip,
    )


def _trained(result: Any) -> bool:
    """The run finished without diverging, its last probe's loss below its first's."""
    losses = [r.loss for r in result.probes if math.isfinite(r.loss)]
    return not result.diverged and len(losses) >= 2 and losses[-1] < losses[0]


def _load_run(model_file: Path, overrides: dict[str, Any], no_clip: bool) -> tuple[Any, RunConfig]:
    from .loading import load_model_file
    from .train import RunConfig, file_optimizer_conflicts

    spec = load_model_file(model_file)
    conflict = file_optimizer_conflicts(spec, overrides)
    if conflict is not None:
        raise typer.BadParameter(str(conflict))
    try:
        config = RunConfig.from_options(spec.defaults, overrides)
    except ConfigError as error:
        try:
            RunConfig.from_options(spec.defaults, {})
        except ConfigError:
            raise ModelFileError(f"{spec.path}: defaults: {error}") from None
        # The file's defaults work alone: the options given conflict with them.
        raise typer.BadParameter(f"{error} (with the defaults of {spec.path.name})") from None
    if no_clip:
        config = dataclasses.replace(config, clip=None)
    if overrides.get("groups") is not None and not config.per_layer:
        raise typer.BadParameter(
            "--groups names the groups that --per-layer measures; add --per-layer"
        )
    return spec, config


def _run_attributes(prepared: PreparedRun) -> dict[str, Any]:
    spec = prepared.model_file
    return {
        "smoothprof_version": __version__,
        "torch_version": _torch_version(),
        "device": str(prepared.device),
        "model_file": str(spec.path),
        "model_sha256": spec.sha256,
        "world_size": prepared.world_size,
        "config": prepared.recorded_config(),
    }


def _print_header(err: Console, prepared: PreparedRun) -> None:
    spec, config = prepared.model_file, prepared.config
    num_params = sum(p.numel() for p in prepared.model.parameters() if p.requires_grad)
    processes = ""
    if prepared.comm is not None:
        processes = f", {prepared.comm.world_size} processes ({prepared.comm.backend})"
    err.print(
        f"smoothprof {__version__}: {spec.path.name}, {num_params:,} parameters, "
        f"{config.steps} steps of {_optimizer_text(prepared)}"
        + (f", clip {config.clip:g}" if config.clip else "")
        + (
            f", {config.amp} autocast (the probe measures in "
            f"{str(prepared.model_dtype).removeprefix('torch.')})"
            if config.amp
            else ""
        )
        + (f", {config.accumulate} batches per step" if config.accumulate > 1 else "")
        + f", {_schedule_text(config)} on {plural(len(prepared.probe_batches), 'batch')}"
        + (
            f" ({prepared.probe_batches_choice.describe()})"
            if prepared.probe_batches_choice is not None
            else ""
        )
        + f", device {prepared.device}{processes}",
        markup=False,
    )
    memory = prepared.probe_memory_choice
    if memory is not None and (memory.changed or not memory.fits or config.probe_memory):
        err.print(memory.describe(), markup=False)
    if prepared.parameter_groups and config.probe_every != 0:
        groups = prepared.parameter_groups
        shown = ", ".join(f"{g.name} ({g.size:,})" for g in groups[:8])
        err.print(
            f"per-layer: {plural(len(groups), 'parameter group')}: {shown}"
            + (", ..." if len(groups) > 8 else "")
            + "; each probe also runs one Lanczos solve per group (up to --max-hvps each)",
            markup=False,
        )
    if config.overhead_cap is not None and config.probe_every != 0:
        planned = len(planned_probe_steps(config))
        floor = min(planned, BUDGET_FLOOR)
        err.print(
            f"time budget (--max-overhead {config.overhead_cap:g}): of the {planned} scheduled "
            f"probes, any beyond {floor} spread over the run are skipped when probing would "
            f"exceed {config.overhead_cap:.0%} of the training time, so which steps are "
            "probed depends on this machine's speed",
            markup=False,
        )


def _optimizer_text(prepared: PreparedRun) -> str:
    """``sgd at lr 0.1``, or what the model file's optimizer() and scheduler() made."""
    name = prepared.optimizer_name
    if prepared.optimizer_from_file:
        name = f"{type(prepared.optimizer).__name__} (model file)"
    text = f"{name} at lr {prepared.initial_lr:g}"
    if prepared.scheduler is not None:
        text += f" with {type(prepared.scheduler).__name__}"
    return text


def _print_summary(
    output: Path,
    prepared: PreparedRun,
    result: Any,
    save_model: Path | None,
    search: Any = None,
) -> None:
    """The run's closing lines (on rank 0 only in a data-parallel run); exit 3 if it diverged."""
    config = prepared.config
    err = _error_console()
    console = _stdout_console(_output_width(None))
    converged = sum(r.hessian_converged for r in result.probes)
    fd_hvps = ", up to the finite-difference HVPs' error" * (
        result.hvp_method == "finite-difference"
    )
    certified = (
        f" ({converged} of {len(result.probes)} Hessian norms certified{fd_hvps})"
        if "hvp" in config.estimators and result.probes
        else ""
    )
    console.print(
        f"wrote {output}: {plural(result.steps_done, 'step')}, "
        f"{plural(len(result.probes), 'probe')}{certified}, "
        f"final loss {format_number(result.final_loss)}, {result.seconds:.1f} s",
        markup=False,
        soft_wrap=True,
    )
    if result.probes:
        console.print(prepared.probing_cost(result).summary(), markup=False, soft_wrap=True)
    if result.steps_skipped:
        console.print(
            f"the fp16 GradScaler skipped {plural(result.steps_skipped, 'step')} whose gradient "
            "overflowed (train/skipped); the probes at those steps have no finite difference",
            markup=False,
            soft_wrap=True,
        )
    if result.restarted_solves:
        console.print(
            f"{plural(result.restarted_solves, 'eigen-solve')} filled the Lanczos basis "
            f"(--max-basis {config.max_basis}) and restarted, with the same certificate",
            markup=False,
            soft_wrap=True,
        )
    if result.probes_skipped:
        console.print(
            f"skipped {plural(result.probes_skipped, 'due probe')} to keep probing under "
            f"{config.overhead_cap:.0%} of the training time (--max-overhead)",
            markup=False,
            soft_wrap=True,
        )
    if search is not None:
        console.print(
            search.summary() + f", {plural(search.total_steps, 'step')} in all",
            markup=False,
            soft_wrap=True,
        )
    if save_model is not None:
        console.print(f"saved the final state_dict to {save_model}", markup=False, soft_wrap=True)
    if result.diverged:
        err.print(
            f"diverged: non-finite loss or gradient at step {result.diverged_at}; "
            f"earlier rows are kept in {output}",
            markup=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_DIVERGED)
    console.print(f"next: smoothprof fit {output}", markup=False, soft_wrap=True)


class _NoFile:
    """What ranks other than 0 write to: nothing (rank 0 alone writes the trajectory)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.num_probe_rows = 0
        self.num_train_rows = 0

    def append_probe(self, row: Any) -> None:
        pass

    def append_train(self, row: Any) -> None:
        pass

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _run_distributed(
    launch: Launch,
    model_file: Path,
    output: Path,
    overrides: dict[str, Any],
    no_clip: bool,
    save_model: Path | None,
    force: bool,
    debug: bool,
) -> None:
    """``smoothprof run`` as one rank of a torchrun launch: DDP training, a global probe, and
    rank 0 alone printing and writing. The user's mistakes found before training are agreed on
    by all ranks, so every rank exits 1 (and rank 0 says why, in one line) instead of hanging."""
    import torch

    from .distributed import launch_device

    rank0 = launch.rank == 0
    err = _error_console() if rank0 else Console(quiet=True)
    problem: Exception | None = None
    spec: Any = None
    config: RunConfig | None = None
    try:
        spec, config = _load_run(model_file, overrides, no_clip)
        device = launch_device(launch, config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {config.device!r} asked for, but CUDA is not available")
        if rank0:
            _check_output(output, force)
    except USER_ERRORS as error:
        problem = error
        device = launch_device(launch, overrides.get("device") or "auto")
        if device.type == "cuda" and not torch.cuda.is_available():
            device = torch.device("cpu")
    try:
        prepared, result = _train_distributed(
            launch, device, spec, config, problem, output, save_model, force, debug, err
        )
    except KeyboardInterrupt:
        err.print("interrupted before training started; nothing was written", markup=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if rank0:
        _print_summary(output, prepared, result, save_model)
    elif result.diverged:
        raise typer.Exit(EXIT_DIVERGED)


def _train_distributed(
    launch: Launch,
    device: torch.device,
    spec: Any,
    config: RunConfig | None,
    problem: Exception | None,
    output: Path,
    save_model: Path | None,
    force: bool,
    debug: bool,
    err: Console,
) -> tuple[PreparedRun, Any]:
    """Join the process group, agree on errors, prepare, and train; rank 0 writes."""
    from . import distributed
    from .train import prepare_run, save_state_dict

    rank0 = launch.rank == 0
    with distributed.process_group(device) as comm:
        _agree_on_errors(comm, problem, debug)
        assert spec is not None and config is not None
        prepared: PreparedRun | None = None
        try:
            prepared = prepare_run(spec, config, comm=comm, device=device)
        except USER_ERRORS as error:
            problem = error
        _agree_on_errors(comm, problem, debug)
        assert prepared is not None
        writer: Any = _NoFile(output)
        if rank0:
            try:
                writer = TrajectoryWriter(
                    output,
                    attributes=_run_attributes(prepared),
                    overwrite=force,
                    groups=prepared.parameter_groups,
                )
            except USER_ERRORS as error:
                problem = error
        _agree_on_errors(comm, problem, debug)
        if rank0:
            _print_header(err, prepared)
        try:
            with _user_errors(debug, rank=launch.rank):
                try:
                    result = _train_into(writer, prepared, err, debug)
                finally:
                    writer.close()
        except KeyboardInterrupt:  # _train_into has said where the rows are
            raise typer.Exit(EXIT_INTERRUPTED) from None
        if rank0 and save_model is not None:
            save_state_dict(prepared.model, save_model)
        # DDP holds the process group: freed at interpreter exit, gloo's threads can abort
        prepared.train_model = None
        gc.collect()
    return prepared, result


def _agree_on_errors(comm: Any, problem: Exception | None, debug: bool) -> None:
    """Exit 1 on every rank when some rank found a problem; rank 0 prints the first one."""
    messages = comm.gather(None if problem is None else str(problem))
    failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
    if not failed:
        return
    rank, message = failed[0]
    if comm.rank == 0 and not debug:
        where = "" if rank == 0 else f"(rank {rank}) "
        _error_console().print(f"error: {where}{message}", markup=False)
    comm.barrier()  # every rank done before any tears the group down
    if debug and problem is not None:
        raise problem
    raise typer.Exit(EXIT_USER_ERROR)


def _schedule_text(config: RunConfig) -> str:
    if config.probe_every == 0:
        return "no probes"
    planned = plural(len(planned_probe_steps(config)), "probe")
    if config.probe_schedule == "log":
        return f"{planned} log-spaced ({config.probes_per_decade:g} per decade)"
    if config.probe_schedule == "every":
        return f"{planned}, every {config.probe_every} steps"
    return f"{planned} spread over the run"


def _cheaper_probe_options(config: RunConfig, num_batches: int) -> list[str]:
    """The options that would cut probing's cost from where ``config`` stands, as the user
    would type them."""
    cuts = []
    if config.probe_schedule == "auto" and config.num_probes > BUDGET_FLOOR:
        cuts.append(f"--num-probes {max(BUDGET_FLOOR, config.num_probes // 3)} (fewer probes)")
    elif config.probe_schedule == "every":
        cuts.append(f"--probe-every {3 * (config.probe_every or 1)} (fewer probes)")
    elif config.probe_schedule == "log":
        cuts.append(f"--probes-per-decade {config.probes_per_decade / 3:g} (fewer probes)")
    if num_batches > 1:
        cuts.append("--probe-batches 1 (each product on one batch)")
    if config.per_layer:
        cuts.append("--groups with fewer groups, or no --per-layer (a solve per group)")
    if "hvp" in config.estimators:
        if config.max_hvps > 20:
            cuts.append("--max-hvps 20 (a shorter eigen-solve, certified less often)")
        cuts.append("--estimators fd (the paper's finite difference only: no HVPs)")
    return cuts


def _check_output(output: Path, force: bool) -> None:
    """Refuse an output path that cannot work before any work starts."""
    if output.is_dir():
        raise TrajectoryError(f"{output}: is a directory; -o takes a file name")
    if output.exists() and not force:
        raise TrajectoryError(f"{output}: already exists; choose another -o or pass --force")
    if not output.parent.is_dir():
        raise TrajectoryError(f"{output}: no such directory {output.parent}")


def _train_into(writer: TrajectoryWriter, prepared: Any, err: Console, debug: bool) -> Any:
    """Train while writing rows; on Ctrl-C or an error, close the file and say where it is.
    After the first probe, say when the schedule's probes would cost far more than training."""
    from .train import train

    steps_done, noted = 0, False
    try:
        with _progress(err, prepared.config.steps) as (report, report_hvp):

            def on_step(step: StepReport) -> None:
                nonlocal steps_done, noted
                steps_done = step.step + 1
                report(step)
                if step.probe is not None and not noted:
                    noted = True
                    note = first_probe_note(
                        probe_seconds=step.probe.seconds,
                        step_seconds=step.train_seconds / steps_done,
                        num_probes=len(planned_probe_steps(prepared.config)),
                        num_steps=prepared.config.steps,
                        work=prepared.probe_work([step.probe]),
                        cuts=_cheaper_probe_options(
                            prepared.config, len(prepared.probe_batches)
                        ),
                    )
                    if note is not None:
                        err.print(note, markup=False)

            with _probe_failure_notes(err):
                result = train(
                    prepared,
                    on_probe=writer.append_probe,
                    on_train_row=writer.append_train,
                    on_step=on_step,
                    on_probe_hvp=report_hvp,
                )
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the close
        writer.set_attribute("interrupted", True)
        writer.close()
        err.print(
            f"interrupted at step {steps_done}: the file is closed; its "
            f"{plural(writer.num_probe_rows, 'probe row')} and "
            f"{plural(writer.num_train_rows, 'training row')} are in {writer.path}",
            markup=False,
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as error:
        where = (
            f"the run stopped at step {steps_done}; the "
            f"{plural(writer.num_probe_rows, 'probe row')} measured before are in {writer.path}"
        )
        if isinstance(writer, _NoFile):  # a rank other than 0: its rank 0 says where the file is
            where = f"the run stopped at step {steps_done}"
        message = str(error) if isinstance(error, USER_ERRORS) else _one_line_error(error)
        if prepared.comm is not None and _lost_another_rank(error):
            message = "another process of the run stopped (its error is above)"
            error = ConfigError(message)  # not the model file's fault: no file name, no traceback
        writer.set_attribute("error", message)
        try:
            writer.close()
        except TrajectoryError as close_error:
            where += f" (closing it failed: {close_error})"
        if debug:
            raise
        if isinstance(error, USER_ERRORS):
            raise type(error)(f"{message}; {where}") from error
        raise ModelFileError(
            f"{prepared.model_file.path}: {message}; {where} (--debug shows the traceback)"
        ) from error
    if result.hvp_method != "auto":
        writer.set_attribute("hvp_method", result.hvp_method)
    if result.diverged:
        writer.set_attribute("diverged_at_step", result.diverged_at)
    return result


@contextlib.contextmanager
def _probe_failure_notes(err: Console) -> Iterator[None]:
    """Show a probe estimator's failure (the probe warns once per failure) as a one-line note;
    every other warning as Python shows it."""
    from .probe import ProbeEstimatorWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always", ProbeEstimatorWarning)
        show = warnings.showwarning

        def show_note(message, category, filename, lineno, file=None, line=None) -> None:
            if issubclass(category, ProbeEstimatorWarning):
                err.print(f"note: {message}", markup=False)
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = show_note
        yield


def _lost_another_rank(error: BaseException) -> bool:
    """Whether a collective failed because another rank of a data-parallel run went away."""
    import torch

    seen: BaseException | None = error
    while seen is not None:
        text = str(seen)
        if isinstance(seen, torch.distributed.DistError) or any(
            phrase in text for phrase in ("closed by peer", "reset by peer", "remote worker")
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _one_line_error(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _torch_version() -> str:
    import torch

    return torch.__version__


PROBE_NOTE_SECONDS = 30.0
"""In a log, a probe still taking Hessian-vector products says so this often (seconds)."""

StepReporter = Callable[["StepReport"], None]
HvpReporter = Callable[[int, int], None]


@contextlib.contextmanager
def _progress(console: Console, total: int) -> Iterator[tuple[StepReporter, HvpReporter]]:
    """Report training steps and the HVPs of long probes: a rich progress bar in a terminal
    (its status names the probe's HVPs while they run); in a log a plain line every tenth of
    the run, and one every ``PROBE_NOTE_SECONDS`` while a probe is still at its HVPs."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if console.is_terminal:
        progress = Progress(
            TextColumn("step"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
        )
        with progress:
            task = progress.add_task("train", total=total, status="")
            last = {"probe": "", "status": ""}

            def report(step: StepReport) -> None:
                if step.probe is not None:
                    last["probe"] = probe_line(step.probe)
                last["status"] = f"loss {format_number(step.loss, 4)}  {last['probe']}"
                progress.update(task, completed=step.step + 1, status=last["status"])

            def report_hvp(step: int, count: int) -> None:
                status = f"{last['status']}  probing step {step}: {count} HVPs".lstrip()
                progress.update(task, status=status)

            yield report, report_hvp
        return
    every = max(1, total // 10)
    last_probe = {"line": ""}
    probing = {"step": -1, "started": 0.0, "noted": 0.0}

    def report_plain(step: StepReport) -> None:
        if step.probe is not None:
            last_probe["line"] = probe_line(step.probe)
        if (step.step + 1) % every == 0 or step.step + 1 == total:
            console.print(
                f"step {step.step + 1}/{total}  loss {format_number(step.loss, 4)}  "
                f"{last_probe['line']}",
                markup=False,
            )

    def report_hvp_plain(step: int, count: int) -> None:
        now = time.monotonic()
        if probing["step"] != step:
            probing.update(step=step, started=now, noted=now)
        elif now - probing["noted"] >= PROBE_NOTE_SECONDS:
            probing["noted"] = now
            console.print(
                f"probing step {step}: {count} HVPs in {now - probing['started']:.0f} s",
                markup=False,
            )

    yield report_plain, report_hvp_plain


def _read_noting_status(path: Path) -> Trajectory:
    """Read a trajectory; say on stderr when a run is still writing it or never closed it."""
    trajectory = read_trajectory(path)
    if trajectory.status == "writing":
        _error_console().print(
            f"note: {path} is still being written; this uses its "
            f"{plural(trajectory.num_probes, 'probe')} so far",
            markup=False,
        )
    elif trajectory.status == "unclosed":
        _error_console().print(
            f"note: {path} was not closed (was its run killed?); every complete row is used. "
            f"`smoothprof repair {path}` lets other HDF5 tools open it",
            markup=False,
        )
    return trajectory


@app.command()
def fit(
    trajectory_files: Annotated[
        list[Path],
        typer.Argument(
            help="Trajectory file(s) written by smoothprof run; several are fitted together."
        ),
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of tables and plots.")
    ] = False,
    quantile: QuantileOption = 0.95,
    estimator: EstimatorOption = None,
    skip_steps: SkipStepsOption = 0,
    bootstrap: BootstrapOption = 200,
    plot: Annotated[
        bool, typer.Option("--plot/--no-plot", help="Draw the log-log scatter.")
    ] = True,
    per_layer: Annotated[
        bool,
        typer.Option(
            "--per-layer",
            help="Also fit each parameter group of a per-layer run (smoothprof run "
            "--per-layer), rank the groups by their share of the whole-model sharpness and "
            "suggest a clip threshold per group (measured, not proved).",
        ),
    ] = False,
    width: WidthOption = None,
    ascii_only: AsciiOption = False,
    debug: DebugOption = False,
) -> None:
    """Fit L0 and L1 as an upper envelope and suggest a clip threshold and a step size.

    With --json, a problem with the files is a JSON object too: {"error": "..."} on stdout
    (and the same line on stderr), exit code 1.
    """
    layers: PerLayerAnalysis | None = None
    with _user_errors(debug, as_json=as_json):
        analysis = _analyze_files(trajectory_files, estimator, skip_steps, quantile, bootstrap)
        if per_layer:
            layers = _per_layer(analysis, skip_steps, quantile, bootstrap)
    if as_json:
        document = analysis.as_json()
        if layers is not None:
            document["per_layer"] = layers.as_json()
        typer.echo(json.dumps(document, indent=2))
        return
    envelope, recs, points = analysis.fit, analysis.recommendations, analysis.points
    out_width = _output_width(width)
    color = _use_color() and not ascii_only
    parts: list[Any] = [
        fit_summary(
            envelope,
            analysis.estimator,
            list(analysis.files),
            grad_noise=analysis.grad_noise,
            skip_steps=skip_steps,
            ascii_only=ascii_only,
        )
    ]
    if plot:
        figure = envelope_plot(
            points.grad_norm,
            points.smoothness,
            envelope,
            progress=points.progress,
            width=out_width,
            color=color,
            ascii_only=ascii_only,
            smoothness_label=ESTIMATOR_LABELS[analysis.estimator],
        )
        parts.append(Text.from_ansi(figure) if color else Text(figure))
    if analysis.edge_of_stability:
        parts.append(edge_of_stability_table(analysis.edge_of_stability, ascii_only=ascii_only))
    commands = profile_sweep_commands(analysis.trajectories, recs)
    parts.append(recommendations_view(recs, ascii_only=ascii_only, commands=commands))
    if layers is not None:
        if plot:
            figure = group_envelope_plot(
                layers, width=out_width, color=color, ascii_only=ascii_only
            )
            parts.append(Text.from_ansi(figure) if color else Text(figure))
        parts.append(per_layer_view(layers, ascii_only=ascii_only))
    _emit(out_width, ascii_only, *parts)


def _analyze_files(
    paths: list[Path], estimator: str | None, skip_steps: int, quantile: float, bootstrap: int
) -> Analysis:
    """``analyze`` on the files, each read saying on stderr when a run is still writing it or
    left it unclosed; an unknown --estimator is a usage error."""
    if estimator is not None and estimator not in ESTIMATOR_COLUMNS:
        raise typer.BadParameter(f"--estimator must be hvp or fd, got {estimator!r}")
    return analyze(
        [_read_noting_status(path) for path in paths],
        estimator=estimator,
        skip_steps=skip_steps,
        quantile=quantile,
        bootstrap=bootstrap,
    )


@app.command()
def plot(
    trajectory_file: Annotated[
        Path, typer.Argument(help="Trajectory file written by smoothprof run.")
    ],
    width: WidthOption = None,
    ascii_only: AsciiOption = False,
    debug: DebugOption = False,
) -> None:
    """Plot loss, gradient norm, both smoothness estimates, the step size and the share of
    clipped steps over the training steps; for a per-layer run, each group's sharpness over
    the steps and each group's envelope too."""
    with _user_errors(debug):
        trajectory = _read_noting_status(trajectory_file)
        if trajectory.num_probes == 0 and not len(trajectory.train.get("step", [])):
            raise TrajectoryError(f"{trajectory_file}: holds no rows yet")
    out_width = _output_width(width)
    color = _use_color() and not ascii_only
    figures = [series_plot(trajectory, width=out_width, color=color, ascii_only=ascii_only)]
    if trajectory.groups is not None:  # a per-layer run: each group's sharpness and envelope
        sharpness = group_sharpness_plot(
            trajectory, width=out_width, color=color, ascii_only=ascii_only
        )
        if sharpness is not None:
            figures.append(sharpness)
            with contextlib.suppress(FitError):
                layers = analyze_per_layer(trajectory, bootstrap=0)
                figures.append(
                    group_envelope_plot(layers, width=out_width, color=color, ascii_only=ascii_only)
                )
    _emit(
        out_width,
        ascii_only,
        *(Text.from_ansi(figure) if color else Text(figure) for figure in figures),
    )


@app.command()
def watch(
    trajectory_file: Annotated[
        Path,
        typer.Argument(
            help="Trajectory file that a run (smoothprof run, a trainer callback) is writing."
        ),
    ],
    interval: Annotated[
        float, typer.Option(min=0.05, help="Seconds between two reads of the file.")
    ] = 2.0,
    width: WidthOption = None,
    ascii_only: AsciiOption = False,
    debug: DebugOption = False,
) -> None:
    """Follow a trajectory file while its run writes it: the latest probes, the loss and the
    smoothness against the step, and the envelope fitted so far, redrawn every --interval
    seconds. Ends when the run closes the file (exit code 1 when it stopped without closing it)
    or on Ctrl-C. In a log (stdout not a terminal), one line per new probe instead."""
    try:
        with _user_errors(debug):
            if sys.stdout.isatty():
                last = _watch_live(trajectory_file, interval, width, ascii_only)
            else:
                last = _watch_lines(trajectory_file, interval)
            if last.status == "unclosed":
                raise TrajectoryError(
                    f"{trajectory_file}: its run stopped without closing it (killed?); its "
                    f"{plural(last.num_probes, 'probe')} so far are readable (smoothprof fit), "
                    "and smoothprof repair lets other HDF5 tools open it"
                )
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _watch_lines(path: Path, interval: float) -> Trajectory:
    """One line per new probe, then one with where the run ended."""
    from .watch import follow, probe_line, status_line

    shown, last = 0, None
    for trajectory in follow(
        path,
        interval_seconds=interval,
        on_waiting=lambda: typer.echo(f"waiting for {path} to appear (Ctrl-C to stop)"),
    ):
        if last is None:
            writer = trajectory.attributes.get("trainer") or trajectory.attributes.get(
                "model_file", "a run"
            )
            typer.echo(f"watching {path}, written by {writer} (Ctrl-C to stop)")
        if trajectory.num_probes < shown:  # a run resumed from a checkpoint: measured again
            typer.echo(f"the run resumed: probes from step {_resumed_step(trajectory)} on again")
            shown = trajectory.num_probes
        for index in range(shown, trajectory.num_probes):
            typer.echo(probe_line(trajectory, index))
        shown, last = trajectory.num_probes, trajectory
    assert last is not None
    typer.echo(status_line(last))
    return last


def _resumed_step(trajectory: Trajectory) -> int:
    steps = trajectory.attributes.get("resumed_at_steps")
    if isinstance(steps, list) and steps:
        return int(steps[-1])
    return int(trajectory.probes["step"][-1]) + 1 if trajectory.num_probes else 0


def _watch_live(path: Path, interval: float, width: int | None, ascii_only: bool) -> Trajectory:
    """The view redrawn in place whenever the file changes."""
    from rich.live import Live

    from .watch import follow, status_line

    console = Console(highlight=False)
    color = _use_color() and not ascii_only
    last = None
    with Live(console=console, auto_refresh=False) as live:

        def waiting() -> None:
            live.update(Text(f"waiting for {path} to appear (Ctrl-C to stop)"), refresh=True)

        for trajectory in follow(path, interval_seconds=interval, on_waiting=waiting):
            out_width = width if width is not None else console.size.width
            view = watch_view(
                trajectory,
                status_line(trajectory),
                fit=_fit_so_far(trajectory),
                width=out_width,
                panel_height=max(6, (console.size.height - 13) // 3),  # the view fits
                color=color,
                ascii_only=ascii_only,
            )
            live.update(view, refresh=True)
            last = trajectory
    assert last is not None
    return last


def _fit_so_far(trajectory: Trajectory) -> Any:
    """The envelope of the probes so far, as ``watch_view`` draws it; None before there is one."""
    try:
        analysis = analyze([trajectory], bootstrap=0)
    except (FitError, ValueError, TrajectoryError):
        return None
    points = analysis.points
    return points.grad_norm, points.smoothness, analysis.fit, analysis.estimator


@app.command()
def compare(
    trajectory_files: Annotated[
        list[Path],
        typer.Argument(help="Trajectory files written by smoothprof run, one per run."),
    ],
    target: Annotated[
        float | None,
        typer.Option(
            help="Loss to reach [default: one every run starts above and reaches by its end, "
            "10% of the way from the worst final smoothed loss up to the lowest starting one; "
            "when no level suits every run, the one that suits the most, with a note why]."
        ),
    ] = None,
    window: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Steps of the trailing mean that smooths the minibatch loss "
            "[default: a fiftieth of the longest run].",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of the table and plot.")
    ] = False,
    plot: Annotated[bool, typer.Option("--plot/--no-plot", help="Draw the loss curves.")] = True,
    width: WidthOption = None,
    ascii_only: AsciiOption = False,
    debug: DebugOption = False,
) -> None:
    """Compare runs: their loss curves in one plot, and per run its lr, clip, optimizer, final
    loss and the step at which its smoothed loss first reached a target."""
    if target is not None and not math.isfinite(target):
        raise typer.BadParameter(f"--target must be a finite number, got {target}")
    with _user_errors(debug):
        trajectories = [_read_noting_status(path) for path in trajectory_files]
        comparison = compare_trajectories(trajectories, target=target, window=window)
    if as_json:
        typer.echo(json.dumps(comparison_as_json(comparison), indent=2))
        return
    out_width = _output_width(width)
    color = _use_color() and not ascii_only
    parts: list[Any] = []
    if plot:
        figure = compare_plot(comparison, width=out_width, color=color, ascii_only=ascii_only)
        parts.append(Text.from_ansi(figure) if color else Text(figure))
    parts.append(compare_table(comparison, ascii_only=ascii_only))
    _emit(out_width, ascii_only, *parts)


@app.command()
def report(
    trajectory_file: Annotated[
        Path, typer.Argument(help="Trajectory file written by smoothprof run.")
    ],
    output_dir: Annotated[
        Path | None,
        typer.Option(
            "--output-dir",
            "-o",
            help="Directory for the report (created; its earlier report files are replaced) "
            "[default: TRAJECTORY_FILE stem + _report].",
        ),
    ] = None,
    quantile: QuantileOption = 0.95,
    estimator: EstimatorOption = None,
    skip_steps: SkipStepsOption = 0,
    bootstrap: BootstrapOption = 200,
    debug: DebugOption = False,
) -> None:
    """Write the paper's Figure 1 (gradient norm against smoothness, coloured by step, with the
    fitted envelope) and the series over the steps as PNG, and one self-contained HTML page
    with both, the fit and the recommendations; for a per-layer run also each group's sharpness
    and envelope (per_layer.png) and its section. Needs matplotlib (smoothprof[science])."""
    with _user_errors(debug):
        require_matplotlib()
        analysis = _analyze_files([trajectory_file], estimator, skip_steps, quantile, bootstrap)
        directory = output_dir if output_dir is not None else Path(trajectory_file.stem + "_report")
        layers = None
        if analysis.trajectories[0].groups is not None:  # a per-layer run: its section too
            with contextlib.suppress(FitError):  # no group rows yet: the report goes without
                layers = _per_layer(analysis, skip_steps, quantile, bootstrap)
        files = write_report(
            analysis.trajectories[0],
            analysis.fit,
            analysis.recommendations,
            directory,
            estimator=analysis.estimator,
            grad_noise=analysis.grad_noise,
            skip_steps=skip_steps,
            per_layer=layers,
        )
    console = _stdout_console(_output_width(None))
    for path in (files.html, files.smoothness_png, files.series_png, files.per_layer_png):
        if path is not None:
            console.print(f"wrote {path}", markup=False)


@app.command()
def repair(
    trajectory_file: Annotated[Path, typer.Argument(help="Trajectory file a killed run left.")],
    debug: DebugOption = False,
) -> None:
    """Clear the "open for writing" mark a killed run leaves, so any HDF5 reader opens the file.

    smoothprof's own commands read such a file without this; plain h5py and HDF5 tools refuse it
    until it is repaired (as HDF5's h5clear -s does). Only the file's 48-byte superblock is
    rewritten; a file a run is still writing is refused.
    """
    with _user_errors(debug):
        changed = repair_trajectory(trajectory_file)
    typer.echo(f"{trajectory_file}: " + ("repaired" if changed else "nothing to repair"))
