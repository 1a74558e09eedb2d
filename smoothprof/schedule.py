"""Which training steps the probe measures: pure functions of the options, never of a clock.

A schedule is a function ``due(step) -> bool``. ``spread_steps`` is the default of
``smoothprof run``: a fixed number of probes over the whole run, half of them evenly spaced and
half log-spaced (dense early, where the loss falls fastest), so every run of a hundred steps or
more gets enough points for a fit, on any machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from typing import Protocol

Schedule = Callable[[int], bool]

SCHEDULE_OPTIONS = ("probe_schedule", "probe_every", "num_probes", "probes_per_decade")
"""The run options that together say when to probe: given on the command line, they replace the
model file's, all of them, so that a file's ``probe_every`` never mixes with ``--num-probes``."""

DEFAULT_PROBE_EVERY = 10
"""The interval of ``--probe-schedule every`` when no ``--probe-every`` is given."""

DEFAULT_NUM_PROBES = 30
"""Probes of the default schedule: enough for a 0.95-quantile envelope with a few points above
it, and at most about 30 times one probe's cost however long the run."""

BUDGET_FLOOR = 10
"""Probes that an overhead budget (``max_overhead``) never skips: the fit needs at least 3 points
(``fit.MIN_POINTS``), and 10 spread over the run give it a trajectory to describe."""


def every_k_steps(every: int) -> Schedule:
    """Probe at steps 0, k, 2k, ...; ``every=0`` never probes."""
    if every < 0:
        raise ValueError(f"probe interval must be >= 0, got {every}")
    if every == 0:
        return lambda step: False
    return lambda step: step % every == 0


def log_spaced_steps(per_decade: float = 10.0) -> Schedule:
    """Probe at step 0 and about ``per_decade`` steps per decade after it (1, 2, 3, ..., 10, 13,
    16, 20, ...): dense while the early trajectory changes fast, sparse later (Cockpit's
    logarithmic schedule)."""
    if per_decade <= 0:
        raise ValueError(f"per_decade must be positive, got {per_decade}")

    def due(step: int) -> bool:
        if step <= 1:
            return step >= 0
        return math.floor(per_decade * math.log10(step)) > math.floor(
            per_decade * math.log10(step - 1)
        )

    return due


def spread_steps(num_steps: int, num_probes: int = DEFAULT_NUM_PROBES) -> tuple[int, ...]:
    """``min(num_probes, num_steps)`` distinct steps of a run of ``num_steps``, sorted: half evenly
    spaced from the first step to the last, the rest log-spaced from step 1 (dense early).

    >>> spread_steps(100, 10)
    (0, 1, 3, 8, 21, 25, 50, 59, 74, 99)
    """
    if num_steps < 0 or num_probes < 0:
        raise ValueError(f"steps and probes must be >= 0, got {num_steps} and {num_probes}")
    if num_probes >= num_steps:
        return tuple(range(num_steps))
    if num_probes == 0:
        return ()
    last = num_steps - 1
    num_even = max(min(2, num_probes), (num_probes + 1) // 2)
    chosen = {0} if num_even == 1 else {round(i * last / (num_even - 1)) for i in range(num_even)}
    density = num_probes
    while len(chosen) < num_probes:
        ladder = _log_ladder(last, density)
        fresh = [step for step in ladder if step not in chosen]
        if len(chosen) + len(fresh) >= num_probes:
            chosen.update(evenly_chosen(fresh, num_probes - len(chosen)))
        else:
            density *= 2
    return tuple(sorted(chosen))


def _log_ladder(last: int, count: int) -> list[int]:
    """About ``count`` log-spaced steps from 1 to ``last``, ascending, without repeats."""
    if last < 1:
        return []
    ratio = last ** (1.0 / max(count - 1, 1))
    return sorted({min(last, round(ratio**i)) for i in range(count)})


def steps_in(schedule: Schedule, num_steps: int) -> tuple[int, ...]:
    """The steps of a run of ``num_steps`` at which ``schedule`` is due."""
    return tuple(step for step in range(num_steps) if schedule(step))


def as_schedule(steps_or_schedule: Schedule | Collection[int]) -> Schedule:
    """A schedule from a function of the step or from a collection of steps (``range(0, T, 10)``,
    ``spread_steps(T)``)."""
    if callable(steps_or_schedule):
        return steps_or_schedule
    steps = frozenset(int(step) for step in steps_or_schedule)
    return steps.__contains__


def evenly_chosen(steps: Sequence[int], count: int) -> tuple[int, ...]:
    """``count`` of ``steps`` (all when there are fewer), spread evenly, first and last included."""
    if count >= len(steps):
        return tuple(steps)
    if count <= 0:
        return ()
    if count == 1:
        return (steps[0],)
    last = len(steps) - 1
    return tuple(sorted({steps[round(i * last / (count - 1))] for i in range(count)}))


class ScheduleOptions(Protocol):
    """The run options a schedule is made of (``train.RunConfig`` has them)."""

    steps: int
    probe_schedule: str
    probe_every: int | None
    num_probes: int
    probes_per_decade: float


def probe_schedule(config: ScheduleOptions) -> Callable[[int], bool]:
    """The steps to probe at: ``num_probes`` spread over the run, every ``probe_every`` steps,
    or log-spaced; never with ``probe_every=0``. A function of the options alone."""
    if config.probe_every == 0:
        return every_k_steps(0)
    if config.probe_schedule == "log":
        return log_spaced_steps(config.probes_per_decade)
    if config.probe_schedule == "every":
        return every_k_steps(config.probe_every or DEFAULT_PROBE_EVERY)
    return as_schedule(spread_steps(config.steps, config.num_probes))


def planned_probe_steps(config: ScheduleOptions) -> tuple[int, ...]:
    """Every step the run's schedule probes, in order."""
    if config.probe_schedule == "auto" and config.probe_every != 0:
        return spread_steps(config.steps, config.num_probes)
    return steps_in(probe_schedule(config), config.steps)


def budget_floor_steps(config: ScheduleOptions) -> tuple[int, ...]:
    """The probes a time budget (``max_overhead``) never skips: ``BUDGET_FLOOR`` of the planned
    ones, spread over the run, so the fit has its points however slow probing is."""
    return evenly_chosen(planned_probe_steps(config), BUDGET_FLOOR)
