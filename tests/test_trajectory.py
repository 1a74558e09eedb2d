"""The HDF5 trajectory format: round trip, partial rows, and files that are not ours."""

import json
import math
import subprocess
import sys

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smoothprof.trajectory import (
    FORMAT_VERSION,
    PROBE_COLUMNS,
    TRAIN_COLUMNS,
    TrajectoryError,
    TrajectoryWriter,
    read_trajectory,
)


def probe_row(step, **extra):
    row = {
        "step": step,
        "loss": 1.0 / (step + 1),
        "grad_norm": 2.0 * step,
        "grad_noise": 0.1,
        "smoothness_fd": 3.0,
        "hessian_norm": 4.5,
        "hessian_eig": -4.5,
        "hvp_count": 11,
        "hessian_converged": True,
        "seconds": 0.25,
    }
    row.update(extra)
    return row


def test_round_trip(tmp_path):
    path = tmp_path / "t.h5"
    config = {"steps": 3, "lr": 0.5}
    with TrajectoryWriter(path, attributes={"config": config, "device": "cpu"}) as writer:
        for step in range(3):
            writer.append_probe(probe_row(step))
            writer.append_train(
                {"step": step, "loss": 0.5, "grad_norm": 1.5, "lr": 0.5, "clipped": step == 1}
            )
    trajectory = read_trajectory(path)
    assert trajectory.config == config
    assert trajectory.attributes["format_version"] == FORMAT_VERSION
    assert trajectory.attributes["device"] == "cpu"
    assert trajectory.num_probes == 3
    assert trajectory.probes["step"].tolist() == [0, 1, 2]
    assert trajectory.probes["hessian_eig"].tolist() == [-4.5] * 3
    assert trajectory.train["clipped"].tolist() == [0, 1, 0]
    with h5py.File(path, "r") as handle:  # design.md's names and dtypes, for other readers
        for name, dtype in PROBE_COLUMNS.items():
            assert handle["probes"][name].dtype == np.dtype(dtype)
        for name, dtype in TRAIN_COLUMNS.items():
            assert handle["train"][name].dtype == np.dtype(dtype)
        assert json.loads(handle.attrs["config"]) == config


def test_missing_values_are_nan(tmp_path):
    path = tmp_path / "t.h5"
    with TrajectoryWriter(path) as writer:
        writer.append_probe({"step": 0, "loss": 1.0, "grad_norm": 2.0})
    probes = read_trajectory(path).probes
    assert math.isnan(probes["hessian_norm"][0]) and probes["hvp_count"][0] == -1


def test_rows_reach_disk_before_close(tmp_path):
    """Another process reads every row written so far while the writer still has the file open."""
    path = tmp_path / "t.h5"
    writer = TrajectoryWriter(path)
    writer.append_train({"step": 0, "loss": 1.0, "grad_norm": 1.0, "lr": 0.1, "clipped": False})
    writer.append_probe(probe_row(0))
    reader = (
        "import sys; from smoothprof.trajectory import read_trajectory as read; "
        "t = read(sys.argv[1]); print(t.num_probes, len(t.train['step']))"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", reader, str(path)], capture_output=True, text=True, check=True
        )
        assert done.stdout.split() == ["1", "1"]
    finally:
        writer.close()


def test_reader_keeps_only_complete_rows(tmp_path):
    path = tmp_path / "t.h5"
    with TrajectoryWriter(path) as writer:
        writer.append_probe(probe_row(0))
        writer.append_probe(probe_row(1))
    with h5py.File(path, "a") as handle:  # a crash that cut row 1 between columns
        handle["probes/hessian_norm"].resize((1,))
    assert read_trajectory(path).probes["step"].tolist() == [0]


def test_refuses_to_overwrite(tmp_path):
    path = tmp_path / "t.h5"
    path.write_bytes(b"precious")
    with pytest.raises(TrajectoryError, match="already exists"):
        TrajectoryWriter(path)
    assert path.read_bytes() == b"precious"


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_text("hello"), "not an HDF5 file"),
        (lambda p: h5py.File(p, "w").close(), "not a smoothprof trajectory"),
    ],
)
def test_foreign_files(tmp_path, make, expected):
    path = tmp_path / "x.h5"
    make(path)
    with pytest.raises(TrajectoryError, match=expected):
        read_trajectory(path)


def test_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "t.h5"
    with TrajectoryWriter(path):
        pass
    with h5py.File(path, "a") as handle:
        handle.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(TrajectoryError, match=f"reads version {FORMAT_VERSION}"):
        read_trajectory(path)


def test_missing_dataset(tmp_path):
    path = tmp_path / "t.h5"
    with TrajectoryWriter(path):
        pass
    with h5py.File(path, "a") as handle:
        del handle["probes/grad_norm"]
    with pytest.raises(TrajectoryError, match="probes/grad_norm"):
        read_trajectory(path)


floats = st.floats(allow_nan=True, allow_infinity=True, width=64)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(-(2**62), 2**62), floats, floats, floats), max_size=20))
def test_round_trip_property(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("prop") / "t.h5"
    with TrajectoryWriter(path) as writer:
        for step, loss, grad, hess in rows:
            writer.append_probe(
                {"step": step, "loss": loss, "grad_norm": grad, "hessian_norm": hess}
            )
    probes = read_trajectory(path).probes
    assert probes["step"].tolist() == [r[0] for r in rows]
    np.testing.assert_array_equal(probes["loss"], np.array([r[1] for r in rows], dtype=float))
    np.testing.assert_array_equal(
        probes["hessian_norm"], np.array([r[3] for r in rows], dtype=float)
    )
