"""Several training runs side by side: final loss and steps to reach a target loss.

Pure functions on numpy arrays and plain dataclasses (``smoothprof compare`` displays them). The
minibatch loss is noisy, so every test against the target runs on a trailing mean of it: a run
reaches the target at the first step where the mean of its last ``window`` minibatch losses is at
or below the target.

Without a target given, the target is one every run works for: below where each run's smoothed
loss starts (so none has reached it at its first step) and at or above where each ends (so each
reaches it by its end), a tenth of the way (``TARGET_SHARE``) from the worst final smoothed loss
up to the lowest starting one. When no level lies between them for every run (a run ends above
where another starts, a run never went down, a run diverged), the target is chosen for the most
runs at once, the lowest such level on a tie, and the comparison's ``target_note`` says which
runs it does not suit and why. When no run went down, there is no default target.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .trajectory import Trajectory

TARGET_SHARE = 0.1  # the default target: 10% of the way from the worst final to the lowest start
FINAL_SHARE = 0.05  # the final loss is the mean over the last 5% of the training rows
SMOOTHING_SHARE = 0.02  # the default trailing window: a fiftieth of the longest run


class CompareError(ValueError):
    """The runs cannot be compared (no training rows, a bad target or window)."""


def trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """The mean of the last ``window`` values at each index (fewer at the start).

    A non-finite value makes every mean whose window holds it non-finite.

    >>> trailing_mean(np.array([4.0, 2.0, 0.0, 2.0]), 2).tolist()
    [4.0, 3.0, 1.0, 1.0]
    """
    values = np.asarray(values, dtype=np.float64)
    if window < 1:
        raise CompareError(f"the smoothing window must be >= 1 step, got {window}")
    if values.size == 0:
        return values.copy()
    # Cumulative sums would carry a nan or inf into every later mean; sum each window instead.
    ends = np.arange(1, values.size + 1)
    starts = np.maximum(ends - window, 0)
    finite = np.where(np.isfinite(values), values, 0.0)
    totals = np.concatenate(([0.0], np.cumsum(finite)))
    bad = np.concatenate(([0], np.cumsum(~np.isfinite(values))))
    means = (totals[ends] - totals[starts]) / (ends - starts)
    return np.where(bad[ends] - bad[starts] > 0, np.nan, means)


def first_step_at_or_below(steps: np.ndarray, values: np.ndarray, target: float) -> int | None:
    """The first step whose value is at or below ``target``; None when none is.

    >>> first_step_at_or_below(np.array([0, 10, 20]), np.array([3.0, 1.0, 0.5]), 1.0)
    10
    >>> first_step_at_or_below(np.array([0, 10]), np.array([3.0, 2.0]), 1.0) is None
    True
    """
    with np.errstate(invalid="ignore"):
        hits = np.flatnonzero(np.asarray(values, dtype=np.float64) <= target)
    return int(np.asarray(steps)[hits[0]]) if hits.size else None


def default_window(num_rows: Sequence[int]) -> int:
    """The trailing window for runs of these lengths: a fiftieth of the longest, at least 1.

    >>> default_window([300, 1000])
    20
    """
    return max(1, int(max(num_rows, default=0) * SMOOTHING_SHARE))


def short_labels(files: Sequence[str]) -> list[str]:
    """File names without their folders, unless two runs share a name.

    >>> short_labels(["a/run.h5", "b/other.h5"])
    ['run.h5', 'other.h5']
    >>> short_labels(["a/run.h5", "b/run.h5"])
    ['a/run.h5', 'b/run.h5']
    """
    names = [PurePath(f).name for f in files]
    return names if len(set(names)) == len(names) else list(files)


@dataclass(frozen=True)
class DefaultTarget:
    """The default target loss and how it was chosen."""

    value: float | None  # None: no run's smoothed loss went down
    rule: str  # how it was chosen, in words
    note: str  # "" when it suits every run; else which runs it does not suit, and why
    suited: tuple[int, ...]  # the runs it suits: they start above it and end at or below it


def default_target(
    starts: Sequence[float], finals: Sequence[float], labels: Sequence[str] | None = None
) -> DefaultTarget:
    """A target loss every run works for, from each run's first and last smoothed loss.

    A target t suits run i when ``finals[i] <= t < starts[i]``: the run is above it at its first
    step and reaches it by its end. The target suits as many runs as one level can (the lowest
    such level on a tie) and lies ``TARGET_SHARE`` of the way from their worst final loss up to
    their lowest start. ``labels`` name the runs in the note.

    >>> choice = default_target([4.0, 3.0], [1.0, 2.0])
    >>> round(choice.value, 6), choice.suited, choice.note
    (2.1, (0, 1), '')
    >>> choice = default_target([4.0, 1.5], [2.0, 0.5], ["A", "B"])
    >>> round(choice.value, 6), choice.suited
    (0.6, (1,))
    >>> print(choice.note)
    no target suits every run: A ends at or above where B starts; this one suits 1 of the 2 runs
    """
    labels = list(labels) if labels is not None else [f"run {i + 1}" for i in range(len(starts))]
    went_down = [
        i
        for i, (start, final) in enumerate(zip(starts, finals))
        if math.isfinite(start) and math.isfinite(final) and final < start
    ]
    if not went_down:
        return DefaultTarget(
            None,
            "none: no run's smoothed loss went down",
            "no target suits any run: none ended below where it started; give one with --target",
            (),
        )

    def suited_at(level: float) -> list[int]:
        return [i for i in went_down if finals[i] <= level < starts[i]]

    # The most runs a level suits is reached at some run's final loss; the lowest wins a tie.
    worst = max(sorted(went_down, key=lambda i: finals[i]), key=lambda i: len(suited_at(finals[i])))
    group = suited_at(finals[worst])
    lowest_start = min(group, key=lambda i: starts[i])
    value = finals[worst] + TARGET_SHARE * (starts[lowest_start] - finals[worst])
    reasons = []
    for i, label in enumerate(labels):
        if i in group:
            continue
        if not (math.isfinite(starts[i]) and math.isfinite(finals[i])):
            reasons.append(f"{label} has no finite loss at its start or end")
        elif i not in went_down:
            reasons.append(f"{label} never went down")
        elif starts[i] <= value:  # then it starts at or below where the worst suited run ends
            reasons.append(f"{label} starts at or below where {labels[worst]} ends")
        else:  # it ends at or above where the suited run that starts lowest starts
            reasons.append(f"{label} ends at or above where {labels[lowest_start]} starts")
    of_runs = f"of the {len(group)} runs it suits" if reasons else "of the runs"
    rule = (
        f"{TARGET_SHARE:.0%} of the way from the worst final smoothed loss {of_runs} up to "
        "their lowest starting one"
    )
    note = (
        f"no target suits every run: {'; '.join(reasons)}; this one suits {len(group)} of the "
        f"{len(labels)} runs"
        if reasons
        else ""
    )
    return DefaultTarget(value, rule, note, tuple(group))


@dataclass(frozen=True)
class RunSummary:
    """One run of a comparison."""

    label: str
    optimizer: str | None
    lr: float | None
    clip: float | None  # None: no clipping
    num_steps: int  # training rows in the file
    final_loss: float  # mean of the last FINAL_SHARE of the minibatch losses
    final_smoothed_loss: float  # the trailing mean at the last step
    last_probe_loss: float | None  # the probe objective at the last probe, when probed
    last_probe_step: int | None  # the step of that probe (runs probed at different steps)
    steps_to_target: int | None  # first step where the trailing mean is <= target; None: never
    diverged_at_step: int | None


@dataclass(frozen=True)
class Comparison:
    runs: tuple[RunSummary, ...]
    target: float | None
    target_rule: str  # how the target was chosen, in words
    window: int  # the trailing-mean window, in steps
    # The curves to draw: per run, (steps, trailing mean of the minibatch loss).
    curves: tuple[tuple[np.ndarray, np.ndarray], ...]
    target_note: str = ""  # why the default target does not suit every run ("" when it does)


def _number(config: Mapping[str, Any], key: str) -> float | None:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def compare_runs(
    labels: Sequence[str],
    train_columns: Sequence[Mapping[str, np.ndarray]],
    configs: Sequence[Mapping[str, Any]],
    *,
    probe_losses: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    diverged_at: Sequence[int | None] | None = None,
    target: float | None = None,
    window: int | None = None,
) -> Comparison:
    """Summarise runs given their ``train`` columns (``step``, ``loss``) and run configs.

    ``probe_losses`` are per run the probe rows' (steps, losses). ``target`` None picks the
    default target (see the module docstring); ``window`` None picks ``default_window``.
    """
    if target is not None and not math.isfinite(target):
        raise CompareError(f"the target loss must be a finite number, got {target}")
    rows = []
    for label, train in zip(labels, train_columns):
        steps = np.asarray(train.get("step", []), dtype=np.int64)
        losses = np.asarray(train.get("loss", []), dtype=np.float64)
        if steps.size == 0 or losses.size != steps.size:
            raise CompareError(f"{label}: holds no training rows (train/step, train/loss)")
        rows.append((steps, losses))
    if window is None:
        window = default_window([len(steps) for steps, _ in rows])
    curves = tuple((steps, trailing_mean(losses, window)) for steps, losses in rows)
    final_smoothed = [float(smoothed[-1]) for _, smoothed in curves]
    note = ""
    if target is None:
        choice = default_target(
            [float(smoothed[0]) for _, smoothed in curves], final_smoothed, short_labels(labels)
        )
        target, rule, note = choice.value, choice.rule, choice.note
    else:
        rule = "given (--target)"
    runs = []
    for index, (label, (steps, losses), (_, smoothed), config) in enumerate(
        zip(labels, rows, curves, configs)
    ):
        tail = losses[-max(1, math.ceil(len(losses) * FINAL_SHARE)) :]
        probe_loss = probe_step = None
        if probe_losses is not None and len(probe_losses[index][0]):
            probe_steps, values = probe_losses[index]
            last = float(np.asarray(values, dtype=np.float64)[-1])
            probe_loss = last if math.isfinite(last) else None
            probe_step = int(np.asarray(probe_steps)[-1])
        clip = _number(config, "clip")
        optimizer = config.get("optimizer")
        runs.append(
            RunSummary(
                label=label,
                optimizer=optimizer if isinstance(optimizer, str) else None,
                lr=_number(config, "lr"),
                clip=clip if clip is not None and clip > 0 else None,
                num_steps=len(steps),
                final_loss=float(np.mean(tail)),
                final_smoothed_loss=final_smoothed[index],
                last_probe_loss=probe_loss,
                last_probe_step=probe_step,
                steps_to_target=(
                    None if target is None else first_step_at_or_below(steps, smoothed, target)
                ),
                diverged_at_step=None if diverged_at is None else diverged_at[index],
            )
        )
    return Comparison(
        runs=tuple(runs),
        target=target,
        target_rule=rule,
        window=window,
        curves=curves,
        target_note=note,
    )


def compare_trajectories(
    trajectories: Sequence[Trajectory],
    *,
    target: float | None = None,
    window: int | None = None,
) -> Comparison:
    """``compare_runs`` on trajectories read with ``read_trajectory``, labelled by their paths:
    their training rows, configs, probe losses and the step at which each diverged."""
    return compare_runs(
        [str(t.path) for t in trajectories],
        [t.train for t in trajectories],
        [t.config for t in trajectories],
        probe_losses=[(t.probes["step"], t.probes["loss"]) for t in trajectories],
        diverged_at=[diverged_at_step(t) for t in trajectories],
        target=target,
        window=window,
    )


def diverged_at_step(trajectory: Trajectory) -> int | None:
    """The step at which the run of ``trajectory`` diverged, as its file records; None if not."""
    value = trajectory.attributes.get("diverged_at_step")
    return int(value) if isinstance(value, (int, np.integer)) else None


def comparison_as_json(comparison: Comparison) -> dict[str, Any]:
    """The JSON document of ``smoothprof compare --json`` (non-finite numbers become None)."""

    def finite(value: Any) -> Any:
        return value if not isinstance(value, float) or math.isfinite(value) else None

    return {
        "target": finite(comparison.target),
        "target_rule": comparison.target_rule,
        "target_note": comparison.target_note,
        "smoothing_window": comparison.window,
        "runs": [
            {
                "file": run.label,
                "optimizer": run.optimizer,
                "lr": finite(run.lr),
                "clip": finite(run.clip),
                "steps": run.num_steps,
                "final_loss": finite(run.final_loss),
                "final_smoothed_loss": finite(run.final_smoothed_loss),
                "last_probe_loss": finite(run.last_probe_loss),
                "last_probe_step": run.last_probe_step,
                "steps_to_target": run.steps_to_target,
                "diverged_at_step": run.diverged_at_step,
            }
            for run in comparison.runs
        ],
    }
