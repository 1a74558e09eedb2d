"""The HDF5 trajectory format: round trip, partial rows, crashes, and files that are not ours."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import smoothprof.trajectory
from smoothprof.trajectory import (
    CLOSED,
    FORMAT_VERSION,
    PROBE_COLUMNS,
    TRAIN_COLUMNS,
    UNCLOSED,
    WRITING,
    TrajectoryError,
    TrajectoryWriter,
    read_trajectory,
    repair_trajectory,
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


# --- crashes, Ctrl-C, and the "open for writing" mark ---------------------------------------

# A writer that dies without closing, as after kill -9. It loads trajectory.py alone (h5py and
# numpy, no torch), so the subprocess starts fast.
DYING_WRITER = """
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("trajectory", sys.argv[1])
trajectory = sys.modules["trajectory"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trajectory)
writer = trajectory.TrajectoryWriter(sys.argv[2])
for step in range(int(sys.argv[3])):
    writer.append_probe({"step": step, "loss": 1.0, "grad_norm": step + 1.0, "hessian_norm": 2.0})
if sys.argv[4] == "die":
    os._exit(0)
if sys.argv[4] == "wait":
    print("ready", flush=True)
    sys.stdin.readline()
writer.close()
"""


def writer_process(path: Path, rows: int, how: str) -> subprocess.Popen:
    module = Path(smoothprof.trajectory.__file__)
    return subprocess.Popen(
        [sys.executable, "-c", DYING_WRITER, str(module), str(path), str(rows), how],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_a_killed_writer_leaves_a_file_that_opens_and_repair_clears_the_mark(tmp_path):
    path = tmp_path / "t.h5"
    assert writer_process(path, 5, "die").wait() == 0
    trajectory = read_trajectory(path)
    assert trajectory.status == UNCLOSED and trajectory.num_probes == 5
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(path, "r")
    with h5py.File(path, "r", swmr=True) as handle:
        assert handle["probes/step"][()].tolist() == [0, 1, 2, 3, 4]
    assert repair_trajectory(path) is True
    assert repair_trajectory(path) is False  # nothing left to do
    with h5py.File(path, "r") as handle:  # plain, with HDF5's file locking
        assert handle["probes/step"][()].tolist() == [0, 1, 2, 3, 4]
    assert read_trajectory(path).status == CLOSED


def test_a_live_writer_is_seen_and_its_file_is_neither_repaired_nor_overwritten(tmp_path):
    path = tmp_path / "t.h5"
    process = writer_process(path, 3, "wait")
    try:
        assert process.stdout.readline().strip() == "ready"
        live = read_trajectory(path)
        assert live.status == WRITING and live.num_probes == 3
        with pytest.raises(TrajectoryError, match="still writing"):
            repair_trajectory(path)
        with pytest.raises(TrajectoryError, match="still writing"):
            TrajectoryWriter(path, overwrite=True)
    finally:
        process.communicate("close\n", timeout=30)
    assert process.returncode == 0
    assert read_trajectory(path).status == CLOSED
    with h5py.File(path, "r") as handle:
        assert "closed_utc" in handle.attrs


def test_a_resumed_run_appends_to_the_file_its_killed_run_left(tmp_path):
    path = tmp_path / "t.h5"
    assert writer_process(path, 6, "die").wait() == 0  # probes at steps 0..5, then killed
    with pytest.raises(TrajectoryError, match="already exists"):
        TrajectoryWriter(path)  # a new run does not take it over
    # Resumed from a checkpoint of step 4: steps 4 and 5 are trained again.
    writer = TrajectoryWriter(path, resume_at_step=4, attributes={"config": {"lr": 9.0}})
    assert writer.appended and writer.dropped_rows == {"probes": 2, "train": 0}
    assert writer.num_probe_rows == 4
    for step in (4, 5, 6):
        writer.append_train({"step": step, "loss": 0.5, "lr": 0.1})
        writer.append_probe(probe_row(step))
    with pytest.raises(TrajectoryError, match="still writing it; not appended to"):
        TrajectoryWriter(path, resume_at_step=5)
    writer.close()
    trajectory = read_trajectory(path)
    assert trajectory.status == CLOSED and trajectory.probes["step"].tolist() == list(range(7))
    assert trajectory.train["step"].tolist() == [4, 5, 6]
    assert trajectory.probes["grad_norm"][3] == 4.0 and trajectory.probes["grad_norm"][4] == 8.0
    assert trajectory.attributes["resumed_at_steps"] == [4]
    assert trajectory.config == {"lr": 9.0}  # the file had none: added
    with TrajectoryWriter(path, resume_at_step=7, attributes={"config": {"lr": 1.0}}):
        pass  # resumed again: the list grows, the file's config stays
    assert read_trajectory(path).attributes["resumed_at_steps"] == [4, 7]
    assert read_trajectory(path).config == {"lr": 9.0}
    # No file yet: a resumed run starts one.
    with TrajectoryWriter(tmp_path / "new.h5", resume_at_step=3) as writer:
        assert not writer.appended


def test_repair_leaves_other_files_alone(tmp_path):
    closed = tmp_path / "closed.h5"
    with TrajectoryWriter(closed) as writer:
        writer.append_probe(probe_row(0))
    before = closed.read_bytes()
    assert repair_trajectory(closed) is False and closed.read_bytes() == before
    old_format = tmp_path / "old.h5"
    h5py.File(old_format, "w").close()  # superblock version 0: no mark to clear
    assert repair_trajectory(old_format) is False
    text = tmp_path / "t.txt"
    text.write_text("hello")
    with pytest.raises(TrajectoryError, match="not an HDF5 file"):
        repair_trajectory(text)
    with pytest.raises(TrajectoryError, match="no such file"):
        repair_trajectory(tmp_path / "missing.h5")


def test_ctrl_c_while_a_row_is_written_waits_for_the_row(tmp_path, monkeypatch):
    writer = TrajectoryWriter(tmp_path / "t.h5")
    writer.append_probe(probe_row(0))
    resize = h5py.Dataset.resize
    sent = []

    def resize_then_interrupt(self, size, axis=None):
        resize(self, size, axis)
        if not sent:  # Ctrl-C after the first column of the row
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(h5py.Dataset, "resize", resize_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        writer.append_probe(probe_row(1))
    monkeypatch.undo()
    writer.close()
    trajectory = read_trajectory(tmp_path / "t.h5")
    assert trajectory.probes["step"].tolist() == [0, 1] and trajectory.incomplete_rows == 0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_attributes_set_during_the_run_are_written_at_close(tmp_path):
    path = tmp_path / "t.h5"
    with TrajectoryWriter(path, attributes={"device": "cpu"}) as writer:
        writer.append_probe(probe_row(0))
        writer.set_attribute("diverged_at_step", 7)
        writer.set_attribute("error", "x.py: loss raised")
    attributes = read_trajectory(path).attributes
    assert attributes["device"] == "cpu" and attributes["diverged_at_step"] == 7
    assert attributes["error"] == "x.py: loss raised" and "closed_utc" in attributes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.h5"]  # no temporaries left


def test_overwrite_replaces_the_file_only_when_the_new_one_is_ready(tmp_path):
    path = tmp_path / "t.h5"
    path.write_bytes(b"earlier run")
    stale = tmp_path / ".t.h5.99999.tmp"  # left by a writer killed while creating the file
    stale.write_bytes(b"half a skeleton")
    writer = TrajectoryWriter(path, overwrite=True)
    assert not stale.exists()
    assert read_trajectory(path).num_probes == 0  # the new, empty file is in place at once
    writer.close()


def test_reading_errors_name_the_file_in_one_line(tmp_path):
    path = tmp_path / "t.h5"
    with TrajectoryWriter(path) as writer:
        for step in range(20):
            writer.append_probe(probe_row(step))
    data = path.read_bytes()
    for size in (10, 48, 300, len(data) // 2):
        cut = tmp_path / f"cut{size}.h5"
        cut.write_bytes(data[:size])
        with pytest.raises(TrajectoryError) as raised:
            read_trajectory(cut)
        assert str(raised.value).startswith(str(cut)) and "\n" not in str(raised.value)


def test_writing_errors_are_trajectory_errors(tmp_path):
    with pytest.raises(TrajectoryError, match="is a directory"):
        TrajectoryWriter(tmp_path)
    with pytest.raises(TrajectoryError, match="cannot create"):
        TrajectoryWriter(tmp_path / "missing" / "t.h5")
    writer = TrajectoryWriter(tmp_path / "t.h5")
    writer.close()
    with pytest.raises(TrajectoryError, match="closed"):
        writer.append_probe(probe_row(0))


def strace_kill_at(n: int | None, path: Path, rows: int) -> subprocess.CompletedProcess:
    """Run a writer of `rows` probe rows under strace, killed at its n-th pwrite64 (or counted)."""
    module = Path(smoothprof.trajectory.__file__)
    inject = ["-e", f"inject=pwrite64:signal=KILL:when={n}"] if n else []
    return subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=pwrite64", *inject, "-o", str(path) + ".strace",
         sys.executable, "-c", DYING_WRITER, str(module), str(path), str(rows), "close"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace for fault injection")
def test_a_writer_killed_at_any_write_leaves_a_readable_file(tmp_path):
    """kill -9 at the n-th write system call of a writer, for many n (every n with
    SMOOTHPROF_EVERY_KILL_POINT=1): the file is absent (killed before it was renamed into place)
    or opens, holds a prefix of the rows, and opens in plain h5py after repair."""
    rows = 4
    counted = strace_kill_at(None, tmp_path / "count.h5", rows)
    if counted.returncode != 0:
        pytest.skip(f"strace cannot trace here: {counted.stderr.strip()[:200]}")
    total = (tmp_path / "count.h5.strace").read_text().count("pwrite64(")
    every = os.environ.get("SMOOTHPROF_EVERY_KILL_POINT") == "1"
    points = range(1, total + 1) if every else sorted({*range(1, total + 1, 9), total})

    def trial(n: int) -> tuple[int, str]:
        directory = tmp_path / f"kill{n}"
        directory.mkdir()
        path = directory / "t.h5"
        killed = strace_kill_at(n, path, rows)
        assert killed.returncode in (-signal.SIGKILL, 0), (n, killed.stderr)
        if not path.exists():
            return n, "absent"
        trajectory = read_trajectory(path)
        steps = trajectory.probes["step"].tolist()
        assert steps == list(range(len(steps))), (n, steps)
        assert trajectory.probes["grad_norm"].tolist() == [s + 1.0 for s in steps]
        repair_trajectory(path)
        with h5py.File(path, "r") as handle:
            assert handle["probes/step"][: len(steps)].tolist() == steps
        return n, trajectory.status

    with ThreadPoolExecutor(2) as pool:
        outcomes = dict(pool.map(trial, points))
    assert outcomes[total] == CLOSED  # the last write was not reached: the run closed the file
    assert UNCLOSED in outcomes.values()
