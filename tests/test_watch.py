"""`smoothprof watch`: following a file that another process writes, in a log (a line per new
probe) and in a terminal (the view redrawn), until the run closes the file, stops without
closing it, or Ctrl-C; without importing torch."""

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

import smoothprof.trajectory
from smoothprof import cli
from smoothprof.display import watch_view
from smoothprof.trajectory import TrajectoryWriter, read_trajectory
from smoothprof.watch import follow, probe_line

# A run writing a trajectory as told on stdin: "probe" writes a probe row (and a training row),
# "die" exits without closing the file, "close" closes it. It loads trajectory.py alone (h5py
# and numpy), so it starts fast.
WRITER = """
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("trajectory", sys.argv[1])
trajectory = sys.modules["trajectory"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trajectory)
writer = trajectory.TrajectoryWriter(sys.argv[2], attributes={"trainer": "a test"})
print("ready", flush=True)
step = 0
for command in sys.stdin:
    command = command.strip()
    if command == "probe":
        writer.append_train({"step": step, "loss": 2.0 / (step + 1), "lr": 0.1})
        writer.append_probe({"step": step, "loss": 2.0 / (step + 1), "grad_norm": step + 1.0,
                             "hessian_norm": 2.0 * step + 1.0, "smoothness_fd": 1.5 * step + 1,
                             "hessian_converged": 1})
        step += 1
        print("wrote", step, flush=True)
    elif command == "die":
        os._exit(0)
    elif command == "close":
        writer.close()
        break
"""


def start_writer(path):
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, smoothprof.trajectory.__file__, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "ready"
    return process


def tell(process, command):
    process.stdin.write(command + "\n")
    process.stdin.flush()
    if command == "probe":
        assert process.stdout.readline().startswith("wrote")


def start_watch(path, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "smoothprof", "watch", str(path), "--interval", "0.05", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "100"},
    )


def test_a_line_per_new_probe_until_the_run_closes_the_file(tmp_path):
    path = tmp_path / "run.h5"
    writer = start_writer(path)
    try:
        tell(writer, "probe")
        watch = start_watch(path)
        assert watch.stdout.readline() == f"watching {path}, written by a test (Ctrl-C to stop)\n"
        assert watch.stdout.readline().startswith("step 0  loss 2  |g| 1  |H| 1  L_fd 1\n")
        tell(writer, "probe")  # written while watch follows the file
        assert watch.stdout.readline() == "step 1  loss 1  |g| 2  |H| 3  L_fd 2.5\n"
        tell(writer, "probe")
        assert watch.stdout.readline().startswith("step 2  ")
        tell(writer, "close")
        assert writer.wait(timeout=30) == 0
        out, err = watch.communicate(timeout=60)
    finally:
        writer.kill()
    assert watch.returncode == 0, err
    assert out == f"{path}  closed  step 2  train loss 0.6667  lr 0.1  3 probes\n"


def test_a_file_that_appears_later_is_waited_for(tmp_path):
    path = tmp_path / "later.h5"
    watch = start_watch(path)
    assert watch.stdout.readline() == f"waiting for {path} to appear (Ctrl-C to stop)\n"
    writer = start_writer(path)
    tell(writer, "probe")
    tell(writer, "close")
    out, err = watch.communicate(timeout=60)
    assert watch.returncode == 0, err
    assert out.splitlines()[1].startswith("step 0  ") and out.endswith("1 probe\n")


def test_a_run_that_stops_without_closing_the_file_is_an_error(tmp_path):
    path = tmp_path / "run.h5"
    writer = start_writer(path)
    tell(writer, "probe")
    watch = start_watch(path)
    assert watch.stdout.readline().startswith("watching")
    tell(writer, "die")
    out, err = watch.communicate(timeout=60)
    assert watch.returncode == 1
    assert "stopped without closing the file" in out.splitlines()[-1]
    assert err.strip() == (
        f"error: {path}: its run stopped without closing it (killed?); its 1 probe so far are "
        "readable (smoothprof fit), and smoothprof repair lets other HDF5 tools open it"
    )


def test_ctrl_c_stops_watching(tmp_path):
    path = tmp_path / "run.h5"
    writer = start_writer(path)
    try:
        tell(writer, "probe")
        watch = start_watch(path)
        assert watch.stdout.readline().startswith("watching")
        assert watch.stdout.readline().startswith("step 0")
        watch.send_signal(signal.SIGINT)
        _, err = watch.communicate(timeout=60)
        assert watch.returncode == 130 and "Traceback" not in err
    finally:
        tell(writer, "close")
        writer.wait(timeout=30)


def test_watch_imports_neither_torch_nor_scipy_in_a_log(tmp_path):
    path = tmp_path / "run.h5"
    with TrajectoryWriter(path) as writer:
        writer.append_probe({"step": 0, "loss": 1.0, "grad_norm": 1.0, "hessian_norm": 2.0})
    script = (
        "import sys\n"
        "from smoothprof.cli import app\n"
        "try:\n"
        "    app(sys.argv[1:], prog_name='smoothprof')\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        "print(json.dumps([code, [m for m in ('torch', 'scipy') if m in sys.modules]]))\n"
    )
    process = subprocess.run(
        [sys.executable, "-c", "import json\n" + script, "watch", str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert json.loads(process.stdout.splitlines()[-1]) == [0, []], process.stderr


def probe_file(path, count):
    with TrajectoryWriter(path, attributes={"config": {"lr": 0.1}}) as writer:
        for step in range(count):
            writer.append_train({"step": step, "loss": 1.0 / (step + 1), "lr": 0.1})
            writer.append_probe(
                {"step": step, "loss": 1.0 / (step + 1), "grad_norm": 1.0 + step,
                 "hessian_norm": 2.0 + 3.0 * step, "smoothness_fd": 1.0 + step}
            )  # fmt: skip
    return read_trajectory(path)


def test_the_terminal_view_shows_the_latest_probes_the_curves_and_the_envelope(tmp_path, capsys):
    trajectory = probe_file(tmp_path / "run.h5", 8)
    fit = cli._fit_so_far(trajectory)
    assert fit is not None and fit[3] == "hvp"
    console = Console(width=100, file=io.StringIO(), color_system=None)
    console.print(watch_view(trajectory, "header line", fit=fit, width=100, ascii_only=True))
    screen = console.file.getvalue()
    assert screen.startswith("header line\n") and "latest probes (8 so far)" in screen
    rows = [line.split("|") for line in screen.splitlines() if line.startswith("|")]
    assert [row[1].strip() for row in rows if row[1].strip().isdigit()] == ["3", "4", "5", "6", "7"]
    for title in ("loss", "smoothness", "envelope L0 + L1 g"):
        assert title in screen
    # Too few probes for a fit: no envelope yet.
    assert cli._fit_so_far(probe_file(tmp_path / "two.h5", 2)) is None
    # The command's terminal mode draws the same view (here of a closed file, then ends).
    assert cli._watch_live(tmp_path / "run.h5", 0.05, 100, True).num_probes == 8
    assert "latest probes (8 so far)" in capsys.readouterr().out


def test_follow_yields_each_change_and_ends_with_the_closed_file(tmp_path):
    path = tmp_path / "run.h5"
    writer = start_writer(path)
    seen, sleeps = [], []

    def sleep(seconds):  # between two reads: nothing, then a probe; after 3 changes, close
        sleeps.append(seconds)
        if len(sleeps) % 2 == 0:
            return  # the file is unchanged: not yielded again
        tell(writer, "probe" if len(seen) < 3 else "close")
        if len(seen) == 3:
            writer.wait(timeout=30)

    for trajectory in follow(path, interval_seconds=0, sleep=sleep):
        seen.append(trajectory)
    assert [t.num_probes for t in seen] == [0, 1, 2, 2] and len(sleeps) == 5
    assert [t.status for t in seen] == ["writing"] * 3 + ["closed"]
    assert probe_line(seen[-1], 1) == "step 1  loss 1  |g| 2  |H| 3  L_fd 2.5"
    with pytest.raises(smoothprof.trajectory.TrajectoryError, match="no such directory"):
        next(follow(Path(tmp_path / "missing" / "run.h5")))
