"""What probing costs a run, in its own units: the run's time, gradients and HVPs per probe.

Pure arithmetic on what a run measured (no torch): the run's closing summary says what probing
cost, and after the first probe of a run where probes cost far more than training the run
projects the schedule's cost and names the options that cut it. Nothing here changes which
steps are probed: the cost is reported, never used to drop a probe the user asked for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .wording import plural

EXPENSIVE_RATIO = 1.0
"""Probing is worth a note when the schedule's projected probing time exceeds this multiple of the
projected training time (the run would take more than twice as long as without probes)..."""
EXPENSIVE_SECONDS = 60.0
"""... and exceeds this many seconds: a note on a run of seconds would only be noise."""


@dataclass(frozen=True)
class ProbeWork:
    """The work of one probe, averaged over probes: gradients and Hessian-vector products, each
    over all ``num_batches`` probe batches."""

    gradients: float
    hvps: float
    num_batches: int
    group_hvps: float = 0.0  # of ``hvps``, the per-layer solvers' (all groups together)
    num_groups: int = 0  # parameter groups of a per-layer probe (0: not per-layer)

    def describe(self) -> str:
        text = (
            f"{plural(self.gradients, 'gradient')} and {plural(self.hvps, 'HVP')} "
            f"on {plural(self.num_batches, 'batch')}"
        )
        if self.num_groups:
            text += (
                f" (per-layer: {self.group_hvps:.1f} of them for "
                f"{plural(self.num_groups, 'group')}, "
                f"{self.group_hvps / self.num_groups:.1f} per group)"
            )
        return text


def probe_work(
    hvp_counts: Sequence[int],
    *,
    num_batches: int,
    estimators: Sequence[str],
    num_fd_points: int,
    group_hvp_counts: Sequence[int] = (),
    num_groups: int = 0,
) -> ProbeWork:
    """The mean work of the probes whose eigen-solvers took ``hvp_counts`` products: the
    gradient at x_t, one gradient per finite-difference point, one HVP for the curvature along
    the gradient, and the solvers' HVPs; of these, a per-layer probe's ``num_groups`` block
    solvers took ``group_hvp_counts``."""
    gradients = 1 + (num_fd_points if "fd" in estimators else 0)
    mean_solver = float(sum(hvp_counts)) / len(hvp_counts) if hvp_counts else 0.0
    hvps = mean_solver + (1 if "curvature" in estimators else 0)
    mean_groups = float(sum(group_hvp_counts)) / len(group_hvp_counts) if group_hvp_counts else 0.0
    return ProbeWork(float(gradients), hvps, num_batches, mean_groups, num_groups)


@dataclass(frozen=True)
class ProbingCost:
    """What probing cost a finished (or stopped) run."""

    num_probes: int
    probe_seconds: float
    run_seconds: float
    steps_done: int
    work: ProbeWork

    @property
    def share(self) -> float:
        """Probing's share of the run's wall time, 0 to 1."""
        return self.probe_seconds / self.run_seconds if self.run_seconds > 0 else math.nan

    @property
    def steps_per_probe(self) -> float:
        """A probe's mean time in training steps (the run's mean step, probing left out)."""
        train_seconds = self.run_seconds - self.probe_seconds
        if self.num_probes == 0 or self.steps_done == 0 or train_seconds <= 0:
            return math.nan
        return (self.probe_seconds / self.num_probes) / (train_seconds / self.steps_done)

    def summary(self) -> str:
        """One line for the run's closing summary."""
        if self.num_probes == 0:
            return "no probes"
        steps = self.steps_per_probe
        as_steps = ""
        if math.isfinite(steps):
            as_steps = f", the time of {plural(round(steps), 'training step')}"
        return (
            f"probing took {self.probe_seconds:.1f} s, {self.share:.0%} of the run; a probe "
            f"took {self.work.describe()}{as_steps}"
        )


def first_probe_note(
    *,
    probe_seconds: float,
    step_seconds: float,
    num_probes: int,
    num_steps: int,
    work: ProbeWork,
    cuts: Sequence[str],
) -> str | None:
    """A note for a run whose schedule would cost far more than its training, judged after the
    first probe (which took ``probe_seconds``; a training step took ``step_seconds``), or None.

    The first probe starts its eigen-solver cold, so the projection of ``num_probes`` such probes
    is an upper estimate: later probes start from the previous eigenvector. ``cuts`` are the
    options that would make probing cheaper, as the user would type them.
    """
    if step_seconds <= 0:
        return None
    projected_probing = num_probes * probe_seconds
    projected_training = num_steps * step_seconds
    if (
        projected_probing <= EXPENSIVE_SECONDS
        or projected_probing <= EXPENSIVE_RATIO * projected_training
    ):
        return None
    text = (
        f"note: the first probe took {_duration(probe_seconds)} ({work.describe()}), the time "
        f"of {plural(round(probe_seconds / step_seconds), 'training step')}; the schedule's "
        f"{plural(num_probes, 'probe')} may take up to {_duration(projected_probing)} against "
        f"about {_duration(projected_training)} of training (later probes start warm and are "
        "usually cheaper)"
    )
    if cuts:
        text += f". To cut it: {'; '.join(cuts)}"
    return text


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
