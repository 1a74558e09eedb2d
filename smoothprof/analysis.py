"""What ``smoothprof fit`` does with trajectory files, as a library: ``analyze`` reads them,
chooses the smoothness column, gathers the probes of every file, fits the envelope and
recommends, with everything the files say about the profiling run.

``smoothprof fit``, ``report`` and a notebook call the same function::

    analysis = smoothprof.analyze(["a.h5", "b.h5"], skip_steps=100)
    analysis.fit.L0, analysis.recommendations.headline, analysis.as_json()

numpy, the trajectory reader (h5py) and scipy once the fit solves: no torch, no typer, rich or
plotext.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .fit import MIN_POINTS, EnvelopeFit, FitError, correlation_after_step, fit_envelope
from .recommend import WEAK_CORRELATION, ProfilingRun, Recommendations, recommend
from .stability import EdgeOfStability, edge_of_stability
from .step_search import ATTRIBUTE as SEARCH_ATTRIBUTE
from .step_search import StepSizeSearch
from .trajectory import Trajectory, read_trajectory

ESTIMATOR_COLUMNS = {"hvp": "hessian_norm", "fd": "smoothness_fd"}
"""The probe column each smoothness estimator of the fit reads."""


@dataclass(frozen=True, eq=False)  # arrays: == would be ambiguous
class FitPoints:
    """The probes a fit uses, from every file, at steps >= skip_steps."""

    grad_norm: np.ndarray
    smoothness: np.ndarray
    progress: np.ndarray  # training progress, 0 to 1, of each point's run
    step: np.ndarray


@dataclass(frozen=True, eq=False)  # holds arrays and trajectories: compare as_json() instead
class Analysis:
    """The fit of one or more trajectory files and what follows from it.

    ``fit`` was fitted to ``points``, the probes of every file at steps >= ``skip_steps`` in
    the column of ``estimator`` (``hvp`` or ``fd``); ``recommendations`` used ``grad_noise``
    (τ, None when not measured), ``num_steps`` (T, the longest run's steps) and ``profile``
    (how the runs trained). ``files`` names the trajectories as given.
    """

    fit: EnvelopeFit
    recommendations: Recommendations
    estimator: str
    points: FitPoints
    grad_noise: float | None
    num_steps: int | None
    skip_steps: int
    profile: ProfilingRun
    files: tuple[str, ...]
    trajectories: tuple[Trajectory, ...] = dataclasses.field(repr=False)
    search: StepSizeSearch | None = None  # the run's step-size search, when its file holds one

    @property
    def edge_of_stability(self) -> list[tuple[str, EdgeOfStability]]:
        """(file, its sharpness against its optimizer's stability threshold) for each file whose
        probes hold both (``stability.edge_of_stability``)."""
        views = []
        for name, trajectory in zip(self.files, self.trajectories):
            view = edge_of_stability(trajectory.probes, trajectory.train, trajectory.config)
            if view is not None:
                views.append((name, view))
        return views

    def as_json(self) -> dict[str, Any]:
        """The JSON document of ``smoothprof fit --json`` (documented in README.md):
        non-finite numbers are None."""
        fit, recs = self.fit, self.recommendations
        statistics = {
            key: getattr(fit, key)
            for key in ("num_points", "num_dropped", "share_below", "spearman_log",
                        "pearson_log", "L_max", "G_max", "quantile", "confidence")
        }  # fmt: skip
        return finite_or_none(
            {
                "files": list(self.files),
                "estimator": self.estimator,
                "skip_steps": self.skip_steps,
                "L0": fit.L0,
                "L1": fit.L1,
                "L0_interval": list(fit.L0_interval) if fit.L0_interval else None,
                "L1_interval": list(fit.L1_interval) if fit.L1_interval else None,
                "clip_threshold": recs.headline.clip_threshold,
                "step_size": recs.headline.step_size,
                "headline": asdict(recs.headline),
                "recommendations": [asdict(r) for r in recs.rules],
                "fixed_step_observed": recs.fixed_step_observed,
                "predicted_speedup": recs.predicted_speedup,
                "grad_noise": self.grad_noise,
                "num_steps": self.num_steps,
                "sweep_lrs": list(recs.sweep_lrs),
                "step_size_search": None if self.search is None else self.search.as_json(),
                "explanation": recs.explanation,
                "warnings": list(recs.warnings),
                "caveats": list(recs.caveats),
                "statistics": statistics,
                "edge_of_stability": [
                    {
                        "file": name,
                        "optimizer": view.kind,
                        "sharpness": view.column,
                        "threshold": view.rule.formula,
                        "late_ratio": view.late_ratio,
                        "late_steps": list(view.late_steps) if view.late_steps else None,
                        "late_threshold": view.late_threshold,
                        "source": view.rule.source,
                    }
                    for name, view in self.edge_of_stability
                ],
            }
        )


TrajectorySource = str | os.PathLike[str] | Trajectory


def analyze(
    paths_or_trajectories: TrajectorySource | Iterable[TrajectorySource],
    *,
    estimator: str | None = None,
    skip_steps: int = 0,
    quantile: float = 0.95,
    bootstrap: int = 200,
) -> Analysis:
    """Fit L0 and L1 to the probes of one or more trajectories and recommend, as ``smoothprof
    fit`` does.

    ``paths_or_trajectories``: file paths (read with ``read_trajectory``) or ``Trajectory``
    objects, one or several; several are fitted together as one set of points. ``estimator``:
    the smoothness column, ``hvp`` or ``fd`` (default: hvp when any file measured it, else fd).
    ``skip_steps`` drops the probes before that step of every file; ``quantile`` is the
    envelope's; ``bootstrap`` resamples give the intervals (0: none; the same data give the same
    intervals). Raises ``TrajectoryError`` for a file that cannot be read, ``FitError`` for data
    that cannot be fitted, ``ValueError`` for a bad option.
    """
    if estimator is not None and estimator not in ESTIMATOR_COLUMNS:
        raise ValueError(f"estimator must be hvp or fd, got {estimator!r}")
    if isinstance(skip_steps, bool) or not isinstance(skip_steps, (int, np.integer)):
        raise ValueError(f"skip_steps must be an integer, got {skip_steps!r}")
    if skip_steps < 0:
        raise ValueError(f"skip_steps must be >= 0, got {skip_steps}")
    sources = (
        [paths_or_trajectories]
        if isinstance(paths_or_trajectories, (str, os.PathLike, Trajectory))
        else list(paths_or_trajectories)
    )
    if not sources:
        raise ValueError("analyze needs at least one trajectory")
    trajectories = tuple(s if isinstance(s, Trajectory) else read_trajectory(s) for s in sources)
    chosen = choose_estimator(trajectories, estimator)
    points = fit_points(trajectories, ESTIMATOR_COLUMNS[chosen], skip_steps)
    search = step_size_search(trajectories)
    try:
        fit = fit_envelope(
            points.grad_norm, points.smoothness, quantile=quantile, num_bootstrap=bootstrap
        )
    except FitError as error:
        raise FitError(_with_search_advice(str(error), trajectories, search)) from None
    grad_noise, num_steps = noise_level(trajectories), planned_steps(trajectories)
    profile = profiling_run(trajectories)
    recs = recommend(
        fit,
        grad_noise=grad_noise,
        num_steps=num_steps,
        profile=profile,
        search=search,
    )
    return Analysis(
        fit=fit,
        recommendations=_with_early_steps_note(recs, fit, points),
        estimator=chosen,
        points=points,
        grad_noise=grad_noise,
        num_steps=num_steps,
        skip_steps=int(skip_steps),
        profile=profile,
        files=tuple(str(t.path) for t in trajectories),
        trajectories=trajectories,
        search=search,
    )


def choose_estimator(trajectories: Sequence[Trajectory], estimator: str | None) -> str:
    """``estimator`` when some file measured it; without one, hvp when measured, else fd.
    Raises FitError when the files hold no such measurement."""

    def has(column: str) -> bool:
        return any(np.isfinite(t.probes.get(column, np.array([]))).any() for t in trajectories)

    if estimator is not None:
        if estimator not in ESTIMATOR_COLUMNS:
            raise ValueError(f"estimator must be hvp or fd, got {estimator!r}")
        if not has(ESTIMATOR_COLUMNS[estimator]):
            raise FitError(
                f"no {estimator} measurements in {', '.join(str(t.path) for t in trajectories)}"
            )
        return estimator
    for name in ("hvp", "fd"):
        if has(ESTIMATOR_COLUMNS[name]):
            return name
    raise FitError(
        f"{', '.join(str(t.path) for t in trajectories)}: no smoothness measurements "
        "(was the run made with --probe-every 0?)"
    )


def fit_points(trajectories: Sequence[Trajectory], column: str, skip_steps: int) -> FitPoints:
    """Gradient norms, smoothness, training progress and steps of the probes of every file at
    steps >= skip_steps."""
    grads, values, progress, kept_steps = [], [], [], []
    for trajectory in trajectories:
        steps = trajectory.probes["step"]
        keep = steps >= skip_steps
        grads.append(trajectory.probes["grad_norm"][keep])
        values.append(trajectory.probes[column][keep])
        progress.append(training_progress(steps[keep], last_step(trajectory)))
        kept_steps.append(steps[keep])
    if skip_steps and sum(int(np.sum(np.isfinite(v))) for v in values) < MIN_POINTS:
        kept = sum(len(v) for v in values)
        raise FitError(
            f"--skip-steps {skip_steps} leaves {kept} probe(s); the fit needs at least "
            f"{MIN_POINTS} (the last probe is at step "
            f"{max(int(t.probes['step'].max(initial=-1)) for t in trajectories)})"
        )
    return FitPoints(
        np.concatenate(grads),
        np.concatenate(values),
        np.concatenate(progress),
        np.concatenate(kept_steps),
    )


def training_progress(steps: np.ndarray, last_step: float) -> np.ndarray:
    """step / last_step clipped to [0, 1]: the fraction of a run done when each probe measured.

    >>> training_progress(np.array([0, 50, 100]), 100).tolist()
    [0.0, 0.5, 1.0]
    """
    steps = np.asarray(steps, dtype=np.float64)
    if not last_step > 0:
        return np.zeros_like(steps)
    return np.clip(steps / float(last_step), 0.0, 1.0)


def last_step(trajectory: Trajectory) -> float:
    """The last step of the run: the last training row, else the planned steps, else the last
    probe."""
    train_steps = trajectory.train.get("step", np.array([]))
    if len(train_steps):
        return float(np.max(train_steps))
    planned = trajectory.config.get("steps")
    if isinstance(planned, int) and planned > 0:
        return float(planned - 1)
    return float(np.max(trajectory.probes["step"], initial=0))


def planned_steps(trajectories: Sequence[Trajectory]) -> int | None:
    """T of the stochastic rule: the longest run's planned steps, else its training rows."""
    counts = []
    for trajectory in trajectories:
        planned = trajectory.config.get("steps")
        if isinstance(planned, int) and not isinstance(planned, bool) and planned > 0:
            counts.append(planned)
        elif len(trajectory.train.get("step", [])):
            counts.append(len(trajectory.train["step"]))
    return max(counts) if counts else None


def profiling_run(trajectories: Sequence[Trajectory]) -> ProfilingRun:
    """How the fitted runs trained: the smallest recorded lr (config, else the training rows),
    clipped if any run clipped, the optimizer when all runs name the same one."""
    lrs, clips, optimizers, from_file = [], [], set(), False
    for trajectory in trajectories:
        config = trajectory.config
        lr = config.get("lr")
        if not _positive_number(lr):
            recorded = trajectory.train.get("lr", np.array([]))
            recorded = recorded[np.isfinite(recorded) & (recorded > 0)]
            lr = float(np.median(recorded)) if len(recorded) else None
        if lr is not None:
            lrs.append(float(lr))
        if _positive_number(config.get("clip")):
            clips.append(float(config["clip"]))
        optimizers.add(
            config.get("optimizer") if isinstance(config.get("optimizer"), str) else None
        )
        from_file = from_file or config.get("optimizer_source") == "model file"
    return ProfilingRun(
        lr=min(lrs) if lrs else None,
        clip=min(clips) if clips else None,
        optimizer=optimizers.pop() if len(optimizers) == 1 else None,
        optimizer_from_file=from_file,
    )


def _with_search_advice(
    message: str, trajectories: Sequence[Trajectory], search: StepSizeSearch | None
) -> str:
    """A fit's error, and when its run stopped early but its step-size search found a step that
    trains, the profiling run to make instead."""
    best = None if search is None else search.best
    if best is None:
        return message
    steps = [t.config.get("steps") for t in trajectories]
    done = [
        int(t.train["step"][-1]) + 1 if len(t.train.get("step", [])) else 0 for t in trajectories
    ]
    if not any(isinstance(s, int) and d < s for s, d in zip(steps, done)):
        return message
    return (
        f"{message}. The run stopped at step {max(done)} of {max(s for s in steps if s)}, but "
        f"its step-size search found lr {best.lr:.3g} to train (loss {best.loss_start:.4g} -> "
        f"{best.loss_end:.4g} in {search.best_steps} steps): profile at it, "
        f"`smoothprof run MODEL.py --lr {best.lr:.3g}`"
    )


def step_size_search(trajectories: Sequence[Trajectory]) -> StepSizeSearch | None:
    """The step-size search a run wrote into its file (``smoothprof.step_search``); None when
    no file, or more than one, holds one (the trials belong to one run), or it cannot be read."""
    found = [t.attributes.get(SEARCH_ATTRIBUTE) for t in trajectories]
    found = [value for value in found if isinstance(value, str)]
    if len(found) != 1:
        return None
    try:
        return StepSizeSearch.from_json(json.loads(found[0]))
    except (ValueError, TypeError):
        return None


def noise_level(trajectories: Sequence[Trajectory]) -> float | None:
    """τ: the median over the probes of the spread of per-batch gradients; None when no probe
    measured a positive spread (one probe batch, or identical batches)."""
    noise = np.concatenate([t.probes.get("grad_noise", np.array([])) for t in trajectories])
    noise = noise[np.isfinite(noise) & (noise > 0)]
    return float(np.median(noise)) if len(noise) else None


def _with_early_steps_note(
    recs: Recommendations, fit: EnvelopeFit, points: FitPoints
) -> Recommendations:
    """Add a warning when a weak correlation comes from the first steps only."""
    if fit.spearman_log > WEAK_CORRELATION:
        return recs
    found = correlation_after_step(points.grad_norm, points.smoothness, points.step)
    if found is None:
        return recs
    step, rho = found
    note = (
        f"without the probes before step {step} the Spearman correlation is {rho:.2f}: the "
        "first steps of the run move differently (often the gradient norm falls while the "
        f"smoothness rises); fit the rest with --skip-steps {step}."
    )
    return dataclasses.replace(recs, warnings=(*recs.warnings, note))


def _positive_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def finite_or_none(value: Any) -> Any:
    """``value`` (numbers, nested dicts and lists) with every non-finite float as None: JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value
