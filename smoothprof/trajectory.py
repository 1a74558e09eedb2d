"""The trajectory file (HDF5, format version 1): write as the run goes, read back, repair.

The only module that imports h5py. Every column is a resizable 1-D dataset; a row is appended to
every column of its group and the file is flushed, so a run that dies keeps what it measured.

Crash consistency. The file is written in HDF5's single-writer/multiple-reader (SWMR) mode, whose
writer orders its metadata writes so that the file on disk is consistent after every flush: a run
killed at any moment leaves a file that holds every row flushed before the kill, and readers can
open it while the run still writes. (Measured with h5py 3.16 / HDF5 2.0 by killing a writer at
each of its write system calls: the default file format left unreadable files when a kill landed
while a flush allocated space, e.g. every 1024 rows; SWMR did not.) The file skeleton is built
under a temporary name and renamed into place, and the attributes of the end of a run are added
to a copy that replaces the file, so creating and closing are atomic too. A crash can still cut
the last row between columns, so the reader keeps only rows that every column of a group holds.

HDF5 marks a file "open for writing" until its writer closes it; a killed run leaves the mark,
and plain HDF5 readers then refuse the file ("file is already open for write"). ``read_trajectory``
reads such a file as is (it opens it in SWMR mode), h5py reads it with
``h5py.File(path, "r", swmr=True)``, and ``repair_trajectory`` clears the mark for every reader.

Nothing is pickled: reading a trajectory never executes code.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

try:  # POSIX: the writer holds a lock, so readers can tell a live run from a killed one
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

FORMAT = "smoothprof.trajectory"
FORMAT_VERSION = 1

PROBE_COLUMNS: dict[str, type] = {
    "step": np.int64,
    "loss": np.float64,
    "grad_norm": np.float64,
    "grad_noise": np.float64,
    "grad_curvature": np.float64,
    "smoothness_fd": np.float64,
    "hessian_norm": np.float64,
    "hessian_eig": np.float64,
    "hvp_count": np.int64,
    "hessian_converged": np.uint8,
    "seconds": np.float64,
    "preconditioned_sharpness": np.float64,
    "preconditioned_hvp_count": np.int64,
    "preconditioned_converged": np.uint8,
    "stability_threshold": np.float64,
    "stability_kind": np.int64,
}
TRAIN_COLUMNS: dict[str, type] = {
    "step": np.int64,
    "loss": np.float64,
    "grad_norm": np.float64,
    "lr": np.float64,
    "clipped": np.uint8,
    "skipped": np.uint8,  # --amp fp16: the GradScaler skipped the update (gradient overflow)
}
REQUIRED_PROBE_COLUMNS = ("step", "loss", "grad_norm", "smoothness_fd", "hessian_norm")
LAYER_COLUMNS: dict[str, type] = {
    "step": np.int64,
    "group": np.int64,  # the group's position in the "layout" attribute of groups/
    "grad_norm": np.float64,
    "hessian_norm": np.float64,
    "hessian_eig": np.float64,
    "hvp_count": np.int64,
    "hessian_converged": np.uint8,
}
"""``groups/``, written by a per-layer run only: one row per group of each probe. Format
version 1 readers that know only ``probes/`` and ``train/`` read such a file unchanged."""
GROUPS = {"probes": PROBE_COLUMNS, "train": TRAIN_COLUMNS, "groups": LAYER_COLUMNS}
_FILL = {np.int64: -1, np.uint8: 0}

# Trajectory.status: how the file's writer left it.
CLOSED = "closed"  # closed by its writer (or repaired)
WRITING = "writing"  # a run is writing it now
UNCLOSED = "unclosed"  # left open by a run that stopped without closing it (killed, crashed)


class TrajectoryError(Exception):
    """A trajectory file cannot be read or written; the message names the file and the problem."""


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C until the block is done, so that a row is written whole; then raise it.

    Only in the main thread and when Python's own handler is installed (else a no-op).
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if received:
            raise KeyboardInterrupt


def _lock_held_elsewhere(path: Path) -> bool | None:
    """True when a live ``TrajectoryWriter`` holds ``path``; None where locks are unavailable."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


class TrajectoryWriter:
    """Appends probe and training rows to a new trajectory file as they are measured.

    Probe rows reach the disk at once. Training rows, one per optimizer step, are buffered and
    written with the next probe row, at ``close()``, or after ``train_flush_seconds``.
    ``attributes`` become root attributes (``config`` is stored as JSON text); attributes set
    after the first row are written at ``close()``. An existing file is replaced only with
    ``overwrite``, and only once the new file is ready.

    ``groups`` (a per-layer probe's ``parameter_groups``) adds the ``groups/`` section, whose
    ``layout`` attribute (JSON) names each group, its patterns, parameters and size; a probe
    row's ``groups`` measurements are then written there. Without it, a row that holds group
    measurements is refused: its per-layer data would be lost.
    ``resume_at_step``: a training run resumed from a checkpoint at that step goes on in the
    file it wrote before, when there is one (``appended`` is then True): the rows of steps from
    ``resume_at_step`` on are dropped (``dropped_rows`` counts them: the run trains those steps
    again), the file's own attributes are kept (``attributes`` only adds the ones it lacks), and
    ``resumed_at_steps`` lists every step a run resumed at. The file is reopened under a
    temporary name and renamed into place, like a new one.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        attributes: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        train_flush_seconds: float = 2.0,
        groups: Sequence[Any] | None = None,
        resume_at_step: int | None = None,
    ) -> None:
        self.path = Path(path)
        self._layout = _layout_of(groups) if groups else None
        if self.path.is_dir():
            raise TrajectoryError(f"{self.path}: is a directory")
        appending = resume_at_step is not None and self.path.exists()
        if self.path.exists() and not overwrite and not appending:
            raise TrajectoryError(f"{self.path}: already exists (use --force to overwrite)")
        if self.path.exists() and _lock_held_elsewhere(self.path):
            verb = "appended to" if appending else "overwritten"
            raise TrajectoryError(f"{self.path}: a run is still writing it; not {verb}")
        self._pending: dict[str, Any] = {}
        self._train_rows: list[Mapping[str, Any]] = []
        self._train_flush_seconds = train_flush_seconds
        self._last_flush = time.monotonic()
        self.num_probe_rows = 0
        self.num_train_rows = 0
        self.appended = appending
        self.dropped_rows = {"probes": 0, "train": 0}
        self._lock_fd: int | None = None
        self._remove_stale_temporaries()
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        if appending:
            assert resume_at_step is not None
            self._reopen(temporary, resume_at_step, attributes or {})
            return
        try:
            self._file = h5py.File(temporary, "w", libver="latest", locking=False)
            if fcntl is not None:
                self._lock_fd = os.open(temporary, os.O_RDONLY)
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._file.attrs["format"] = FORMAT
            self._file.attrs["format_version"] = FORMAT_VERSION
            self._file.attrs["created_utc"] = _utc_now()
            for key, value in (attributes or {}).items():
                self._write_attribute(self._file, key, value)
            for group_name, columns in GROUPS.items():
                if group_name == "groups" and self._layout is None:
                    continue  # the default run's file: no per-layer section
                group = self._file.create_group(group_name)
                if group_name == "groups":
                    group.attrs["layout"] = json.dumps(self._layout)
                for name, dtype in columns.items():
                    group.create_dataset(
                        name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(1024,)
                    )
            self._file.swmr_mode = True  # flushes the skeleton
            os.fsync(self._file.id.get_vfd_handle())
            os.replace(temporary, self.path)
        except OSError as error:
            self._abandon(temporary)
            raise TrajectoryError(f"{self.path}: cannot create: {_one_line(error)}") from None
        except BaseException:
            self._abandon(temporary)
            raise

    def _reopen(
        self, temporary: Path, resume_at_step: int, attributes: Mapping[str, Any]
    ) -> None:
        """Open a copy of the existing file for appending, cut it to the steps before
        ``resume_at_step``, and rename it into place."""
        read_trajectory(self.path)  # a smoothprof trajectory of a version this one writes
        try:
            shutil.copyfile(self.path, temporary)
            repair_trajectory(temporary)  # a killed run's "open for writing" mark
            self._file = h5py.File(temporary, "r+", libver="latest", locking=False)
            if fcntl is not None:
                self._lock_fd = os.open(temporary, os.O_RDONLY)
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            for group_name in GROUPS:
                if group_name == "groups":
                    if "groups" not in self._file and self._layout is None:
                        continue  # neither run is per-layer: no per-layer section
                    if "groups" not in self._file:  # the resumed run measures groups
                        self._file.create_group("groups").attrs["layout"] = json.dumps(
                            self._layout
                        )
                    elif self._layout is None:  # keep measuring the file's groups
                        self._layout = json.loads(
                            _attribute_value(self._file["groups"].attrs["layout"])
                        )
                kept, dropped = self._cut_group(group_name, resume_at_step)
                self.dropped_rows[group_name] = dropped
                if group_name == "probes":
                    self.num_probe_rows = kept
                elif group_name == "train":
                    self.num_train_rows = kept
            for key in ("closed_utc", "interrupted", "error", "diverged_at_step"):
                if key in self._file.attrs:  # how the earlier run ended, not this one
                    del self._file.attrs[key]
            for key, value in attributes.items():
                if key not in self._file.attrs:
                    self._write_attribute(self._file, key, value)
            resumed = _attribute_value(self._file.attrs.get("resumed_at_steps", []))
            resumed = resumed if isinstance(resumed, list) else [resumed]
            self._file.attrs["resumed_at_steps"] = np.asarray(
                [*resumed, resume_at_step], dtype=np.int64
            )
            self._file.swmr_mode = True
            os.fsync(self._file.id.get_vfd_handle())
            os.replace(temporary, self.path)
        except (OSError, KeyError, ValueError, TypeError) as error:
            self._abandon(temporary)
            raise TrajectoryError(f"{self.path}: cannot append to it: {_one_line(error)}") from None
        except BaseException:
            self._abandon(temporary)
            raise

    def _cut_group(self, group_name: str, resume_at_step: int) -> tuple[int, int]:
        """Cut every column of the group (created where missing) to the complete rows of steps
        before ``resume_at_step``; the rows kept and the rows dropped."""
        group = self._file.require_group(group_name)
        for name, dtype in GROUPS[group_name].items():
            if name not in group:
                group.create_dataset(
                    name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(1024,)
                )
        steps = np.asarray(group["step"][()])
        lengths = [group[name].shape[0] for name in GROUPS[group_name]]
        complete = min([len(steps), *lengths])
        later = np.flatnonzero(steps[:complete] >= resume_at_step)
        kept = int(later[0]) if len(later) else complete
        for name in group:
            column = group[name]
            if isinstance(column, h5py.Dataset) and column.ndim == 1 and column.shape[0] > kept:
                column.resize((kept,))
        return kept, max(lengths, default=0) - kept

    def _remove_stale_temporaries(self) -> None:
        """Temporary files of earlier writers of this path that were killed while creating or
        closing it (no live writer holds them)."""
        with contextlib.suppress(OSError):
            for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
                if not _lock_held_elsewhere(stale):
                    stale.unlink()

    def _abandon(self, temporary: Path) -> None:
        with contextlib.suppress(Exception):
            self._file.close()
        self._release_lock()
        with contextlib.suppress(OSError):
            temporary.unlink()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the lock
            self._lock_fd = None

    @staticmethod
    def _write_attribute(handle: h5py.File, key: str, value: Any) -> None:
        if key == "config":
            value = json.dumps(value)
        handle.attrs[key] = str(value) if isinstance(value, str) else value

    def _append(self, group_name: str, rows: list[Mapping[str, Any]]) -> None:
        if not rows:
            return
        group = self._file[group_name]
        for name, dtype in GROUPS[group_name].items():
            column = group[name]
            start = column.shape[0]
            values = [row.get(name, _FILL.get(dtype, math.nan)) for row in rows]
            column.resize((start + len(rows),))
            column[start:] = np.asarray(values, dtype=dtype)
        if group_name == "probes":
            self.num_probe_rows += len(rows)
        elif group_name == "train":
            self.num_train_rows += len(rows)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A whole row or none: Ctrl-C waits for it, and an I/O failure is a TrajectoryError."""
        if not self._file.id.valid:
            raise TrajectoryError(f"{self.path}: the writer is closed")
        with _sigint_deferred():
            try:
                yield
            except OSError as error:
                raise TrajectoryError(f"{self.path}: cannot write: {_one_line(error)}") from None

    def append_probe(self, row: Mapping[str, Any] | Any) -> None:
        """Write one probe row (a mapping or an object with ``as_row()``) and flush."""
        mapping = row.as_row() if hasattr(row, "as_row") else row
        group_rows = self._group_rows(mapping)
        with self._writing():
            self._write_train_buffer()
            self._append("probes", [mapping])
            self._append("groups", group_rows)
            self._flush()

    def _group_rows(self, mapping: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        """The ``groups/`` rows of a probe row's group measurements (a list of mappings or of
        objects with those attributes), each with the probe's step and its group's position."""
        measured = list(mapping.get("groups") or ())
        if not measured:
            return []
        if self._layout is None:
            raise TrajectoryError(
                f"{self.path}: the probe row holds per-layer measurements, but the writer has "
                "no groups; create it with TrajectoryWriter(..., groups=probe.parameter_groups)"
            )
        positions = {entry["name"]: index for index, entry in enumerate(self._layout)}
        rows = []
        for item in measured:
            values = item if isinstance(item, Mapping) else vars(item)
            if values.get("group") not in positions:
                raise TrajectoryError(
                    f"{self.path}: group {values.get('group')!r} is not one of the writer's "
                    f"({', '.join(positions)})"
                )
            rows.append({**values, "step": mapping["step"], "group": positions[values["group"]]})
        return rows

    def append_train(self, row: Mapping[str, Any]) -> None:
        """Buffer one training-step row; written with the next probe or flush."""
        self._train_rows.append(row)
        if time.monotonic() - self._last_flush > self._train_flush_seconds:
            with self._writing():
                self._write_train_buffer()
                self._flush()

    def set_attribute(self, key: str, value: Any) -> None:
        """A root attribute; strings (also str subclasses such as torch's version) as UTF-8 text.

        Written into the file at ``close()`` (in SWMR mode the file's structure is fixed).
        """
        self._pending[key] = value

    def _write_train_buffer(self) -> None:
        rows, self._train_rows = self._train_rows, []
        self._append("train", rows)

    def _flush(self) -> None:
        self._file.flush()
        self._last_flush = time.monotonic()

    def flush(self) -> None:
        """Write buffered training rows and flush everything to disk."""
        with self._writing():
            self._write_train_buffer()
            self._flush()

    def close(self) -> None:
        """Write what is buffered, close the file, and add the pending attributes atomically.

        Safe to call twice. Ctrl-C during ``close()`` waits until it is done.
        """
        if not self._file.id.valid:
            return
        with _sigint_deferred():
            try:
                try:
                    self._write_train_buffer()
                finally:
                    self._file.close()  # clears the "open for writing" mark
                self._pending["closed_utc"] = _utc_now()
                self._add_attributes_atomically()
            except OSError as error:
                raise TrajectoryError(f"{self.path}: cannot close: {_one_line(error)}") from None
            finally:
                self._release_lock()

    def _add_attributes_atomically(self) -> None:
        """Add the pending attributes to a copy of the closed file, then rename it into place."""
        copy = self.path.with_name(f".{self.path.name}.{os.getpid()}.close.tmp")
        try:
            shutil.copyfile(self.path, copy)
            with h5py.File(copy, "r+", locking=False) as handle:
                for key, value in self._pending.items():
                    self._write_attribute(handle, key, value)
            with open(copy, "rb+") as raw:
                os.fsync(raw.fileno())
            os.replace(copy, self.path)
        finally:
            with contextlib.suppress(OSError):
                copy.unlink()

    def __enter__(self) -> TrajectoryWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _layout_of(groups: Sequence[Any]) -> list[dict[str, Any]]:
    """The ``layout`` attribute from parameter groups (objects with ``name``, ``patterns``,
    ``parameter_names`` and ``size``, as ``groups.ParameterGroup``) or from such mappings."""
    layout = []
    for group in groups:
        if isinstance(group, Mapping):
            entry = {
                "name": str(group["name"]),
                "patterns": [str(p) for p in group.get("patterns", ())],
                "parameters": [str(p) for p in group.get("parameters", ())],
                "size": int(group.get("size", 0)),
            }
        else:
            entry = {
                "name": str(group.name),
                "patterns": [str(p) for p in group.patterns],
                "parameters": [str(p) for p in group.parameter_names],
                "size": int(group.size),
            }
        layout.append(entry)
    names = [entry["name"] for entry in layout]
    if len(set(names)) != len(names):
        raise TrajectoryError(f"parameter group names must be distinct, got {names}")
    return layout


@dataclass(frozen=True, eq=False)  # arrays: == would be ambiguous
class LayerGroups:
    """The ``groups/`` section of a per-layer run: the groups and one row per group per probe.

    ``names``, ``patterns``, ``parameters`` (parameter names) and ``sizes`` (scalars) describe
    each group in order; ``columns`` (``LAYER_COLUMNS``) hold the rows, ``group`` being the
    group's position in ``names``.
    """

    names: tuple[str, ...]
    patterns: tuple[tuple[str, ...], ...]
    parameters: tuple[tuple[str, ...], ...]
    sizes: tuple[int, ...]
    columns: dict[str, np.ndarray] = field(repr=False)

    def series(self, name: str, column: str) -> tuple[np.ndarray, np.ndarray]:
        """The steps and values of ``column`` for the group ``name``, in step order."""
        rows = self.columns["group"] == self.names.index(name)
        steps = self.columns["step"][rows]
        order = np.argsort(steps, kind="stable")
        return steps[order], self.columns[column][rows][order]


@dataclass(frozen=True)
class Trajectory:
    """A trajectory file's contents: root attributes, the run config, and the columns.

    ``status`` says how the writer left the file: ``"closed"``, ``"writing"`` (a run is writing
    it now) or ``"unclosed"`` (its run stopped without closing it, e.g. killed; other HDF5 readers
    need ``repair_trajectory`` first). ``incomplete_rows`` counts rows cut between columns by a
    crash or read mid-write, which are left out.
    """

    path: Path
    attributes: dict[str, Any]
    config: dict[str, Any]
    probes: dict[str, np.ndarray] = field(repr=False)
    train: dict[str, np.ndarray] = field(repr=False)
    status: str = CLOSED
    incomplete_rows: int = 0
    groups: LayerGroups | None = field(default=None, repr=False)  # a per-layer run's groups/

    @property
    def num_probes(self) -> int:
        return len(self.probes["step"])


def _attribute_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _read_attributes(handle: h5py.File) -> dict[str, Any]:
    attributes = {}
    for key in handle.attrs:
        try:  # an attribute of a type h5py cannot read is left out, not fatal
            attributes[key] = _attribute_value(handle.attrs[key])
        except (OSError, TypeError, ValueError, KeyError):
            continue
    return attributes


def _read_group(path: Path, handle: h5py.File, group_name: str, required: tuple[str, ...]):
    """The group's numeric 1-D columns cut to the rows all of them hold, and the rows cut off."""
    if group_name not in handle or not isinstance(handle[group_name], h5py.Group):
        raise TrajectoryError(f"{path}: no '{group_name}' group; not a smoothprof trajectory?")
    group = handle[group_name]
    missing = [name for name in required if name not in group]
    if missing:
        raise TrajectoryError(
            f"{path}: missing dataset(s) {', '.join(group_name + '/' + m for m in missing)}"
        )
    columns = {}
    for name in group:
        item = group.get(name)
        if isinstance(item, h5py.Dataset) and item.ndim == 1 and item.dtype.kind in "biuf":
            columns[name] = np.asarray(item[()])
    unusable = [name for name in required if name not in columns]
    if unusable:
        raise TrajectoryError(
            f"{path}: dataset(s) {', '.join(group_name + '/' + u for u in unusable)} "
            "are not 1-D numeric columns"
        )
    lengths = [len(values) for values in columns.values()]
    complete = min(lengths, default=0)
    return {name: values[:complete] for name, values in columns.items()}, max(
        lengths, default=0
    ) - complete


def _open_for_reading(path: Path) -> tuple[h5py.File, str]:
    """Open read-only; a file marked open for writing (live or killed run) opens in SWMR mode."""
    try:
        return h5py.File(path, "r", locking=False), CLOSED
    except OSError as error:
        if "already open for write" not in str(error):
            raise
    handle = h5py.File(path, "r", swmr=True, locking=False)
    return handle, WRITING if _lock_held_elsewhere(path) else UNCLOSED


def read_trajectory(path: str | Path) -> Trajectory:
    """Read a trajectory file, keeping only rows that every column of a group holds.

    Works on a file a run is still writing and on one a killed run left behind. Raises
    ``TrajectoryError`` for a missing, unreadable, truncated, foreign or newer-format file.
    """
    path = Path(path)
    if not path.exists():
        raise TrajectoryError(f"{path}: no such file")
    if path.is_dir():
        raise TrajectoryError(f"{path}: is a directory, not a trajectory file")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as error:
        raise TrajectoryError(f"{path}: cannot read: {_one_line(error)}") from None
    if not is_hdf5:
        raise TrajectoryError(f"{path}: not an HDF5 file")
    try:
        handle, status = _open_for_reading(path)
    except OSError as error:
        raise TrajectoryError(
            f"{path}: cannot open: a truncated or damaged HDF5 file ({_one_line(error)})"
        ) from None
    try:
        with handle:
            attributes = _read_attributes(handle)
            if attributes.get("format") != FORMAT:
                raise TrajectoryError(f"{path}: an HDF5 file, but not a smoothprof trajectory")
            version = attributes.get("format_version")
            if isinstance(version, bool) or not isinstance(version, int) or version < 1:
                raise TrajectoryError(f"{path}: invalid format version {version!r}")
            if version > FORMAT_VERSION:
                raise TrajectoryError(
                    f"{path}: format version {version}; this smoothprof reads version "
                    f"{FORMAT_VERSION} (upgrade smoothprof)"
                )
            probes, cut_probes = _read_group(path, handle, "probes", REQUIRED_PROBE_COLUMNS)
            train, cut_train = (
                _read_group(path, handle, "train", ("step",)) if "train" in handle else ({}, 0)
            )
            groups = _read_layer_groups(path, handle, probes["step"])
    except TrajectoryError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as error:
        raise TrajectoryError(
            f"{path}: cannot read: a truncated or damaged HDF5 file ({_one_line(error)})"
        ) from None
    try:
        config = json.loads(attributes.get("config", "{}"))
    except (TypeError, ValueError):
        config = {}
    if not isinstance(config, dict):
        config = {}
    return Trajectory(
        path=path,
        attributes=attributes,
        config=config,
        probes=probes,
        train=train,
        status=status,
        incomplete_rows=cut_probes + cut_train,
        groups=groups,
    )


def _read_layer_groups(path: Path, handle: h5py.File, probe_steps: np.ndarray):
    """The ``groups/`` section, or None for a file without one. Rows whose probe row is not
    complete (a crash between the two) are left out, as are rows of unknown groups."""
    if "groups" not in handle:
        return None
    if not isinstance(handle["groups"], h5py.Group):
        raise TrajectoryError(f"{path}: 'groups' is not an HDF5 group")
    try:
        layout = json.loads(_attribute_value(handle["groups"].attrs["layout"]))
        names = tuple(str(entry["name"]) for entry in layout)
        patterns = tuple(tuple(str(p) for p in entry["patterns"]) for entry in layout)
        parameters = tuple(tuple(str(p) for p in entry["parameters"]) for entry in layout)
        sizes = tuple(int(entry["size"]) for entry in layout)
    except (KeyError, TypeError, ValueError) as error:
        raise TrajectoryError(
            f"{path}: groups/ has no readable layout attribute ({_one_line(error)})"
        ) from None
    columns, _ = _read_group(path, handle, "groups", tuple(LAYER_COLUMNS))
    keep = np.isin(columns["step"], probe_steps) & (columns["group"] >= 0)
    keep &= columns["group"] < len(names)
    return LayerGroups(
        names=names,
        patterns=patterns,
        parameters=parameters,
        sizes=sizes,
        columns={name: values[keep] for name, values in columns.items()},
    )


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle``, the checksum of HDF5's metadata.

    >>> hex(_lookup3(b""))
    '0xdeadbeef'
    >>> hex(_lookup3(b"Four score and seven years ago"))
    '0x17770551'
    """
    mask = 0xFFFFFFFF

    def rot(x: int, k: int) -> int:
        return ((x << k) | (x >> (32 - k))) & mask

    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & mask
    offset = 0
    while length > 12:
        a = (a + int.from_bytes(data[offset : offset + 4], "little")) & mask
        b = (b + int.from_bytes(data[offset + 4 : offset + 8], "little")) & mask
        c = (c + int.from_bytes(data[offset + 8 : offset + 12], "little")) & mask
        a = ((a - c) & mask) ^ rot(c, 4)
        c = (c + b) & mask
        b = ((b - a) & mask) ^ rot(a, 6)
        a = (a + c) & mask
        c = ((c - b) & mask) ^ rot(b, 8)
        b = (b + a) & mask
        a = ((a - c) & mask) ^ rot(c, 16)
        c = (c + b) & mask
        b = ((b - a) & mask) ^ rot(a, 19)
        a = (a + c) & mask
        c = ((c - b) & mask) ^ rot(b, 4)
        b = (b + a) & mask
        offset += 12
        length -= 12
    if length == 0:
        return c
    tail = data[offset:] + bytes(12 - length)
    a = (a + int.from_bytes(tail[0:4], "little")) & mask
    b = (b + int.from_bytes(tail[4:8], "little")) & mask
    c = (c + int.from_bytes(tail[8:12], "little")) & mask
    c = ((c ^ b) - rot(b, 14)) & mask
    a = ((a ^ c) - rot(c, 11)) & mask
    b = ((b ^ a) - rot(a, 25)) & mask
    c = ((c ^ b) - rot(b, 16)) & mask
    a = ((a ^ c) - rot(c, 4)) & mask
    b = ((b ^ a) - rot(a, 14)) & mask
    c = ((c ^ b) - rot(b, 24)) & mask
    return c


def repair_trajectory(path: str | Path) -> bool:
    """Clear the "open for writing" mark a killed run leaves, so that any HDF5 reader opens it.

    Rewrites only the 48-byte superblock at the start of the file (version 2 or 3, as the HDF5
    file format specification lays it out): the consistency flags become 0 and the end-of-file
    address covers the whole file; the checksum is recomputed. This is what HDF5's ``h5clear -s``
    does. Returns False when there was nothing to do. Refuses a file a run is still writing.
    """
    path = Path(path)
    if not path.is_file():
        raise TrajectoryError(f"{path}: no such file")
    if _lock_held_elsewhere(path):
        raise TrajectoryError(f"{path}: a run is still writing it; repair it after the run ends")
    try:
        with open(path, "rb+") as raw:
            head = raw.read(12)
            if len(head) < 12 or head[:8] != _HDF5_SIGNATURE:
                raise TrajectoryError(f"{path}: not an HDF5 file (or one with a user block)")
            version, size_of_offsets = head[8], head[9]
            if version < 2:
                return False  # superblocks 0 and 1 carry no mark
            fields_end = 12 + 4 * size_of_offsets
            head += raw.read(fields_end + 4 - 12)
            if len(head) < fields_end + 4:
                raise TrajectoryError(f"{path}: truncated HDF5 superblock")
            if _lookup3(head[:fields_end]) != int.from_bytes(head[fields_end:], "little"):
                raise TrajectoryError(f"{path}: damaged HDF5 superblock (checksum mismatch)")
            base = int.from_bytes(head[12 : 12 + size_of_offsets], "little")
            eof_at = 12 + 2 * size_of_offsets
            stored_eof = int.from_bytes(head[eof_at : eof_at + size_of_offsets], "little")
            eof = max(stored_eof, os.path.getsize(path) - base)
            if head[11] == 0 and eof == stored_eof:
                return False
            fields = bytearray(head[:fields_end])
            fields[11] = 0
            fields[eof_at : eof_at + size_of_offsets] = eof.to_bytes(size_of_offsets, "little")
            raw.seek(0)
            raw.write(bytes(fields) + _lookup3(bytes(fields)).to_bytes(4, "little"))
            raw.flush()
            os.fsync(raw.fileno())
    except OSError as error:
        raise TrajectoryError(f"{path}: cannot repair: {_one_line(error)}") from None
    return True
