"""Per-layer smoothness from a per-layer run's ``groups/``: which group is sharp, and a clip
threshold per group.

For each parameter group k the probe measured g_k = ||∇_k f||, the norm of the group's block of
the gradient, and L_k = ||H_kk||, the spectral norm of the Hessian's diagonal block for the
group. ``analyze_per_layer`` fits (L0, L1) to each group's points as ``fit`` does to the whole
model's, ranks the groups by their share of the whole-model sharpness (the median over the
probes of ||H_kk|| / ||H||, at most 1 by Cauchy interlacing), and suggests a clip threshold per
group (``recommend.group_clip``: measured, not proved; ``recommend.GROUP_CAVEATS``).

numpy, the trajectory reader and the fit: no torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .analysis import FitPoints, finite_or_none, last_step, training_progress
from .fit import EnvelopeFit, FitError, fit_envelope
from .recommend import GROUP_CAVEATS, GroupClip, group_clip, pytorch_group_snippet
from .trajectory import Trajectory, read_trajectory

INTERLACING_SLACK = 2.0
"""A block's norm may exceed the whole Hessian's by this many times the run's ``rtol`` (both
are solver estimates) before the analysis warns that a certificate missed."""


@dataclass(frozen=True, eq=False)  # holds arrays
class GroupFit:
    """One parameter group: its (L0, L1) fit and its share of the whole-model sharpness.

    ``sharpness_share`` is the median over the probes of ||H_kk|| / ||H|| (0 to 1: by Cauchy
    interlacing a diagonal block's norm is at most the whole Hessian's); ``largest_at`` counts
    the probes at which this group's block was the sharpest of the groups; ``max_ratio`` is the
    largest ||H_kk|| / ||H|| seen (above 1 only by the solvers' error). ``fit`` is None when
    the group's points cannot be fitted (``fit_problem`` says why).
    """

    name: str
    patterns: tuple[str, ...]
    num_parameters: int
    points: FitPoints
    fit: EnvelopeFit | None
    fit_problem: str
    sharpness_share: float
    largest_at: int
    max_ratio: float
    clip: GroupClip


@dataclass(frozen=True, eq=False)
class PerLayerAnalysis:
    """Every group's fit, ranked by ``sharpness_share`` (largest first), and what follows.

    ``order`` lists the group names in the run's matching order (a parameter joins the first
    group whose pattern matches: the order the snippet keeps); ``lr`` is the step size the
    snippet uses for every group (None: not known); ``num_probes`` the probes with both a
    whole-model and a per-group measurement.
    """

    groups: tuple[GroupFit, ...]
    order: tuple[str, ...]
    num_probes: int
    lr: float | None
    files: tuple[str, ...]
    warnings: tuple[str, ...]
    caveats: tuple[str, ...] = GROUP_CAVEATS

    def group(self, name: str) -> GroupFit:
        return next(g for g in self.groups if g.name == name)

    def snippet(self) -> str:
        """PyTorch parameter groups and per-group ``clip_grad_norm_`` with the thresholds."""
        rows = [
            (name, self.group(name).patterns, self.group(name).clip.clip_threshold)
            for name in self.order
        ]
        return pytorch_group_snippet(rows, lr=self.lr)

    def as_json(self) -> dict[str, Any]:
        """The ``per_layer`` object of ``smoothprof fit --per-layer --json``; non-finite
        numbers are None."""
        groups = []
        for group in self.groups:
            fit = group.fit
            groups.append(
                {
                    "name": group.name,
                    "patterns": list(group.patterns),
                    "parameters": group.num_parameters,
                    "sharpness_share": group.sharpness_share,
                    "largest_at_probes": group.largest_at,
                    "max_ratio": group.max_ratio,
                    "L0": fit.L0 if fit else None,
                    "L1": fit.L1 if fit else None,
                    "num_points": fit.num_points if fit else 0,
                    "spearman_log": fit.spearman_log if fit else None,
                    "L_max": fit.L_max if fit else None,
                    "G_max": fit.G_max if fit else None,
                    "fit_problem": group.fit_problem or None,
                    "clip_threshold": group.clip.clip_threshold,
                    "clip_note": group.clip.note,
                }
            )
        return finite_or_none(
            {
                "groups": groups,
                "num_probes": self.num_probes,
                "lr": self.lr,
                "source": groups and self.groups[0].clip.source,
                "warnings": list(self.warnings),
                "caveats": list(self.caveats),
                "snippet": self.snippet(),
            }
        )


TrajectorySource = str | os.PathLike[str] | Trajectory


def analyze_per_layer(
    paths_or_trajectories: TrajectorySource | Iterable[TrajectorySource],
    *,
    skip_steps: int = 0,
    quantile: float = 0.95,
    bootstrap: int = 200,
    lr: float | None = None,
    profile_clip: float | None = None,
) -> PerLayerAnalysis:
    """Fit each parameter group of per-layer trajectories (``smoothprof run --per-layer``).

    Several files are fitted together, group by group; they must have the same groups.
    ``skip_steps``, ``quantile`` and ``bootstrap`` mean what they mean for ``analyze``; ``lr``
    is the step size the snippet writes (``smoothprof fit`` passes its headline's) and
    ``profile_clip`` the profiling run's clip, which caps each group's (``group_clip``). Raises
    ``FitError`` when a file has no per-layer measurements or the files' groups differ.
    """
    sources = (
        [paths_or_trajectories]
        if isinstance(paths_or_trajectories, (str, os.PathLike, Trajectory))
        else list(paths_or_trajectories)
    )
    if not sources:
        raise ValueError("analyze_per_layer needs at least one trajectory")
    trajectories = [s if isinstance(s, Trajectory) else read_trajectory(s) for s in sources]
    layouts = _checked_layouts(trajectories)
    names, patterns, sizes = layouts
    per_group: dict[str, dict[str, list[np.ndarray]]] = {
        name: {"g": [], "L": [], "progress": [], "step": [], "ratio": []} for name in names
    }
    largest = dict.fromkeys(names, 0)
    warnings: list[str] = []
    num_probes = 0
    for trajectory in trajectories:
        layer = trajectory.groups
        assert layer is not None
        probes = trajectory.probes
        keep = probes["step"] >= skip_steps
        steps = probes["step"][keep]
        whole = dict(zip(steps.tolist(), probes["hessian_norm"][keep].tolist()))
        table = np.full((len(names), len(steps)), math.nan)
        position = {step: i for i, step in enumerate(steps.tolist())}
        for k, name in enumerate(names):
            group_steps, L = layer.series(name, "hessian_norm")
            g = layer.series(name, "grad_norm")[1]
            chosen = group_steps >= skip_steps
            group_steps, L, g = group_steps[chosen], L[chosen], g[chosen]
            whole_at = np.array([whole.get(s, math.nan) for s in group_steps.tolist()])
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio = np.where(whole_at > 0, L / whole_at, math.nan)
            data = per_group[name]
            data["g"].append(g)
            data["L"].append(L)
            data["progress"].append(training_progress(group_steps, last_step(trajectory)))
            data["step"].append(group_steps)
            data["ratio"].append(ratio)
            for s, value in zip(group_steps.tolist(), L.tolist()):
                if s in position:
                    table[k, position[s]] = value
        measured = np.isfinite(table).any(axis=0)
        num_probes += int(np.sum(measured & np.isfinite([whole[s] for s in steps.tolist()])))
        for column in np.flatnonzero(measured):
            values = np.where(np.isfinite(table[:, column]), table[:, column], -math.inf)
            largest[names[int(np.argmax(values))]] += 1
        warnings += _interlacing_warnings(trajectory, names, per_group)
    if not any(np.concatenate(per_group[n]["L"]).size for n in names):
        raise FitError(
            f"{', '.join(str(t.path) for t in trajectories)}: no per-layer measurements"
            + (f" at steps >= {skip_steps}" if skip_steps else "")
        )
    fits = []
    for name, group_patterns, size in zip(names, patterns, sizes):
        data = {key: np.concatenate(values) for key, values in per_group[name].items()}
        points = FitPoints(data["g"], data["L"], data["progress"], data["step"])
        try:
            fit: EnvelopeFit | None = fit_envelope(
                data["g"], data["L"], quantile=quantile, num_bootstrap=bootstrap
            )
            problem = ""
        except FitError as error:
            fit, problem = None, str(error).split(";")[0]
        ratios = data["ratio"][np.isfinite(data["ratio"])]
        fits.append(
            GroupFit(
                name=name,
                patterns=group_patterns,
                num_parameters=size,
                points=points,
                fit=fit,
                fit_problem=problem,
                sharpness_share=float(np.median(ratios)) if ratios.size else math.nan,
                largest_at=largest[name],
                max_ratio=float(np.max(ratios)) if ratios.size else math.nan,
                clip=group_clip(name, fit, profile_clip=profile_clip),
            )
        )
    ranked = sorted(
        fits,
        key=lambda f: -f.sharpness_share if math.isfinite(f.sharpness_share) else math.inf,
    )
    return PerLayerAnalysis(
        groups=tuple(ranked),
        order=names,
        num_probes=num_probes,
        lr=lr if lr is not None and math.isfinite(lr) and lr > 0 else None,
        files=tuple(str(t.path) for t in trajectories),
        warnings=tuple(dict.fromkeys(warnings)),
    )


def _checked_layouts(
    trajectories: Sequence[Trajectory],
) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...], tuple[int, ...]]:
    """The groups' names, patterns and sizes, the same in every file, or FitError."""
    missing = [str(t.path) for t in trajectories if t.groups is None]
    if missing:
        raise FitError(
            f"{', '.join(missing)}: no per-layer measurements (groups/); make the run with "
            "`smoothprof run MODEL.py --per-layer`"
        )
    first = trajectories[0].groups
    assert first is not None
    for trajectory in trajectories[1:]:
        other = trajectory.groups
        assert other is not None
        if other.names != first.names:
            raise FitError(
                f"{trajectory.path}: its groups ({', '.join(other.names)}) differ from "
                f"{trajectories[0].path}'s ({', '.join(first.names)}); fit them apart"
            )
    return first.names, first.patterns, first.sizes


def _interlacing_warnings(
    trajectory: Trajectory, names: Sequence[str], per_group: dict[str, dict[str, list]]
) -> list[str]:
    """A warning for each group whose block norm exceeded the whole Hessian's beyond the
    solvers' tolerance in this file: one of the two solvers missed its top eigenvalue."""
    rtol = trajectory.config.get("rtol")
    rtol = float(rtol) if isinstance(rtol, (int, float)) and rtol > 0 else 1e-3
    found = []
    for name in names:
        ratio = per_group[name]["ratio"][-1]
        steps = per_group[name]["step"][-1]
        over = np.isfinite(ratio) & (ratio > 1 + INTERLACING_SLACK * rtol)
        if over.any():
            found.append(
                f"{trajectory.path}: group {name}'s block norm exceeds the whole Hessian's "
                f"at step {int(steps[over][0])} (x{float(ratio[over][0]):.4f}); by interlacing "
                "it cannot, so a solver missed the top eigenvalue there (see hessian_converged)"
            )
    return found


__all__ = ["GroupFit", "PerLayerAnalysis", "analyze_per_layer"]
