"""``smoothprof watch``: follow a trajectory file while a run writes it.

``follow`` reads the file every ``interval_seconds`` and yields its contents each time they
change, until the run that writes it closes it (or stops without closing it: killed, crashed).
The file's rows reach the disk as they are measured (``trajectory.py``), so what is read is
what the run has measured so far. Plain numpy and h5py: no torch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .display import format_number
from .trajectory import CLOSED, WRITING, Trajectory, TrajectoryError, read_trajectory

READ_ATTEMPTS = 3
"""Reads in a row that may fail before ``follow`` gives up: a read can meet a row half written."""


def follow(
    path: str | Path,
    *,
    interval_seconds: float = 2.0,
    on_waiting: Callable[[], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[Trajectory]:
    """The file's contents, once now and again whenever its rows or its status change; the last
    one has a status other than ``"writing"``.

    A file that does not exist yet is waited for (``on_waiting`` is called once); a missing
    directory, or a file that is not a trajectory, raises ``TrajectoryError``."""
    path = Path(path)
    seen: tuple[int, int, str] | None = None
    failures = 0
    waiting = False
    while True:
        if not path.exists():
            if not path.parent.is_dir():
                raise TrajectoryError(f"{path}: no such directory {path.parent}")
            if not waiting and on_waiting is not None:
                on_waiting()
            waiting = True
            sleep(interval_seconds)
            continue
        try:
            trajectory = read_trajectory(path)
        except TrajectoryError:
            failures += 1
            if failures >= READ_ATTEMPTS:
                raise
            sleep(interval_seconds)
            continue
        failures = 0
        state = (trajectory.num_probes, len(trajectory.train.get("step", ())), trajectory.status)
        if state != seen:
            seen = state
            yield trajectory
        if trajectory.status != WRITING:
            return
        sleep(interval_seconds)


def probe_line(trajectory: Trajectory, index: int) -> str:
    """Probe ``index`` of the file as one line of a log."""
    probes = trajectory.probes

    def value(name: str) -> float:
        return float(probes[name][index]) if name in probes else math.nan

    parts = [
        f"step {int(probes['step'][index])}",
        f"loss {format_number(value('loss'))}",
        f"|g| {format_number(value('grad_norm'))}",
    ]
    hessian = value("hessian_norm")
    if math.isfinite(hessian):
        converged = "hessian_converged" not in probes or bool(probes["hessian_converged"][index])
        parts.append(f"|H| {format_number(hessian)}{'' if converged else '?'}")
    fd = value("smoothness_fd")
    if math.isfinite(fd):
        parts.append(f"L_fd {format_number(fd)}")
    return "  ".join(parts)


def status_line(trajectory: Trajectory) -> str:
    """Where the run is: its last training step, loss and lr, and the probes so far."""
    train = trajectory.train
    parts = [f"{trajectory.path}", _status_words(trajectory)]
    if len(train.get("step", ())):
        parts.append(f"step {int(np.max(train['step']))}")
        for name, label in (("loss", "train loss"), ("lr", "lr")):
            if name in train and math.isfinite(float(train[name][-1])):
                parts.append(f"{label} {format_number(float(train[name][-1]))}")
    parts.append(f"{trajectory.num_probes} probe{'' if trajectory.num_probes == 1 else 's'}")
    return "  ".join(parts)


def _status_words(trajectory: Trajectory) -> str:
    if trajectory.status == WRITING:
        return "running"
    if trajectory.status == CLOSED:
        return "closed"
    return "stopped without closing the file"
