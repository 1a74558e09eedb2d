"""The trajectory file (HDF5, format version 1): write as the run goes, read back.

The only module that imports h5py. Every column is a resizable 1-D dataset; a row is appended to
every column of its group and the file is flushed, so a run that dies keeps what it measured. A
row can be cut between columns by a crash, so the reader keeps only rows that every column of the
group holds. Nothing is pickled: reading a trajectory never executes code.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

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
}
TRAIN_COLUMNS: dict[str, type] = {
    "step": np.int64,
    "loss": np.float64,
    "grad_norm": np.float64,
    "lr": np.float64,
    "clipped": np.uint8,
}
REQUIRED_PROBE_COLUMNS = ("step", "loss", "grad_norm", "smoothness_fd", "hessian_norm")
GROUPS = {"probes": PROBE_COLUMNS, "train": TRAIN_COLUMNS}
_FILL = {np.int64: -1, np.uint8: 0}


class TrajectoryError(Exception):
    """A trajectory file cannot be read or written; the message names the file and the problem."""


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class TrajectoryWriter:
    """Appends probe and training rows to a new trajectory file as they are measured.

    Probe rows reach the disk at once. Training rows, one per optimizer step, are buffered and
    written with the next probe row, at ``close()``, or after ``train_flush_seconds``.
    ``attributes`` become root attributes (``config`` is stored as JSON text).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        attributes: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        train_flush_seconds: float = 2.0,
    ) -> None:
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise TrajectoryError(f"{self.path}: already exists (use --force to overwrite)")
        if self.path.is_dir():
            raise TrajectoryError(f"{self.path}: is a directory")
        try:
            self._file = h5py.File(self.path, "w")
        except OSError as error:
            raise TrajectoryError(f"{self.path}: cannot create: {error}") from None
        self._file.attrs["format"] = FORMAT
        self._file.attrs["format_version"] = FORMAT_VERSION
        self._file.attrs["created_utc"] = _utc_now()
        for key, value in (attributes or {}).items():
            self.set_attribute(key, json.dumps(value) if key == "config" else value)
        for group_name, columns in GROUPS.items():
            group = self._file.create_group(group_name)
            for name, dtype in columns.items():
                group.create_dataset(
                    name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(1024,)
                )
        self._file.flush()
        self._train_rows: list[Mapping[str, Any]] = []
        self._train_flush_seconds = train_flush_seconds
        self._last_flush = time.monotonic()

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

    def append_probe(self, row: Mapping[str, Any] | Any) -> None:
        """Write one probe row (a mapping or an object with ``as_row()``) and flush."""
        mapping = row.as_row() if hasattr(row, "as_row") else row
        self._write_train_buffer()
        self._append("probes", [mapping])
        self.flush()

    def append_train(self, row: Mapping[str, Any]) -> None:
        """Buffer one training-step row; written with the next probe or flush."""
        self._train_rows.append(row)
        if time.monotonic() - self._last_flush > self._train_flush_seconds:
            self._write_train_buffer()
            self.flush()

    def set_attribute(self, key: str, value: Any) -> None:
        """A root attribute; strings (also str subclasses such as torch's version) as UTF-8 text."""
        self._file.attrs[key] = str(value) if isinstance(value, str) else value

    def _write_train_buffer(self) -> None:
        rows, self._train_rows = self._train_rows, []
        self._append("train", rows)

    def flush(self) -> None:
        self._file.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if self._file.id.valid:
            self._write_train_buffer()
            self._file.attrs["closed_utc"] = _utc_now()
            self._file.close()

    def __enter__(self) -> TrajectoryWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(frozen=True)
class Trajectory:
    """A trajectory file's contents: root attributes, the run config, and the columns."""

    path: Path
    attributes: dict[str, Any]
    config: dict[str, Any]
    probes: dict[str, np.ndarray] = field(repr=False)
    train: dict[str, np.ndarray] = field(repr=False)

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


def _read_group(path: Path, handle: h5py.File, group_name: str, required: tuple[str, ...]):
    if group_name not in handle or not isinstance(handle[group_name], h5py.Group):
        raise TrajectoryError(f"{path}: no '{group_name}' group; not a smoothprof trajectory?")
    group = handle[group_name]
    missing = [name for name in required if name not in group]
    if missing:
        raise TrajectoryError(
            f"{path}: missing dataset(s) {', '.join(group_name + '/' + m for m in missing)}"
        )
    columns = {}
    for name, item in group.items():
        if isinstance(item, h5py.Dataset) and item.ndim == 1 and item.dtype.kind in "biuf":
            columns[name] = np.asarray(item[()])
    complete = min((len(values) for values in columns.values()), default=0)
    return {name: values[:complete] for name, values in columns.items()}


def read_trajectory(path: str | Path) -> Trajectory:
    """Read a trajectory file, keeping only rows that every column holds.

    Raises ``TrajectoryError`` for a missing, unreadable, foreign or newer-format file.
    """
    path = Path(path)
    if not path.exists():
        raise TrajectoryError(f"{path}: no such file")
    if path.is_dir():
        raise TrajectoryError(f"{path}: is a directory, not a trajectory file")
    if not h5py.is_hdf5(path):
        raise TrajectoryError(f"{path}: not an HDF5 file")
    try:
        handle = h5py.File(path, "r", locking=False)
    except OSError as error:
        raise TrajectoryError(f"{path}: cannot open as HDF5 ({error})") from None
    with handle:
        attributes = {key: _attribute_value(handle.attrs[key]) for key in handle.attrs}
        if attributes.get("format") != FORMAT:
            raise TrajectoryError(f"{path}: an HDF5 file, but not a smoothprof trajectory")
        version = attributes.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise TrajectoryError(
                f"{path}: format version {version}; this smoothprof reads version "
                f"{FORMAT_VERSION} (upgrade smoothprof)"
            )
        probes = _read_group(path, handle, "probes", REQUIRED_PROBE_COLUMNS)
        train = _read_group(path, handle, "train", ("step",)) if "train" in handle else {}
    try:
        config = json.loads(attributes.get("config", "{}"))
    except (TypeError, ValueError):
        config = {}
    if not isinstance(config, dict):
        config = {}
    return Trajectory(path=path, attributes=attributes, config=config, probes=probes, train=train)
