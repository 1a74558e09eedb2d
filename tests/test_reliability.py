"""Issue 5: bad input gets one line and exit code 1, and nothing measured is ever lost.

Real processes where it matters: `smoothprof run` killed with SIGKILL at several moments and
interrupted with SIGINT, and `fit`/`plot` reading a file that a run in another process is still
writing. Probe rows are deterministic on the CPU, so a killed run's rows are checked against an
uninterrupted run with the same seed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import ASSETS, REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from typer.testing import CliRunner

from smoothprof import cli
from smoothprof.fit import EnvelopeFit, FitError, fit_envelope
from smoothprof.trajectory import (
    CLOSED,
    FORMAT_VERSION,
    UNCLOSED,
    TrajectoryWriter,
    read_trajectory,
    repair_trajectory,
)

pytestmark = pytest.mark.usefixtures("clean_sys_path")
runner = CliRunner()

# Small and fast, and deterministic: the cap on probing time is off and the HVP method is fixed
# (both depend on timings otherwise), so every run with the same seed measures the same rows.
RUN_OPTIONS = [
    "--steps", "150", "--probe-every", "3", "--probe-batches", "1", "--max-hvps", "8",
    "--max-overhead", "inf", "--hvp-method", "retained", "--seed", "3",
]  # fmt: skip
MODEL = ASSETS / "good_minimal.py"
DETERMINISTIC_PROBE_COLUMNS = ["step", "loss", "grad_norm", "smoothness_fd", "hessian_norm"]


def invoke(*args):
    return runner.invoke(cli.app, [str(a) for a in args], env={"COLUMNS": "100"})


def smoothprof_process(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "smoothprof", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "100", "NO_COLOR": "1"},
    )


def assert_one_line_error(result, expected, code=1):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert re.search(expected, lines[-1]), lines[-1]
    assert not [line for line in lines[:-1] if not line.startswith(("smoothprof ", "step "))]


def last_progress_step(stderr: str) -> int:
    """The step count of the last progress line (`step k/N ...`: k steps done), or 0."""
    steps = [int(m) for m in re.findall(r"^step (\d+)/", stderr, flags=re.MULTILINE)]
    return max(steps, default=0)


# --- kill -9 at several moments -----------------------------------------------------------


def run_and_kill(out: Path, progress_lines: int, delay: float) -> tuple[int, str]:
    """Start a run, wait for its header (0) or its k-th progress line, wait `delay`, SIGKILL."""
    process = smoothprof_process("run", MODEL, "-o", out, *RUN_OPTIONS)
    seen = []
    while True:
        line = process.stderr.readline()
        if not line:
            break
        seen.append(line)
        if (progress_lines == 0 and line.startswith("smoothprof ")) or (
            sum(s.startswith("step ") for s in seen) >= progress_lines > 0
        ):
            break
    time.sleep(delay)
    process.kill()
    rest = process.stderr.read()
    process.wait()
    return process.returncode, "".join(seen) + rest


KILL_PLANS = [(0, 0.0), (1, 0.0), (4, 0.05), (8, 0.15)]  # (progress lines seen, then seconds)


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    """(reference trajectory, [(plan, return code, stderr, path)]) for every kill plan."""
    directory = tmp_path_factory.mktemp("killed")
    results: dict[int, tuple[int, str]] = {}

    def kill(index):
        results[index] = run_and_kill(directory / f"k{index}.h5", *KILL_PLANS[index])

    threads = [threading.Thread(target=kill, args=(i,)) for i in range(len(KILL_PLANS))]
    for thread in threads:
        thread.start()
    reference = directory / "reference.h5"
    result = invoke("run", MODEL, "-o", reference, *RUN_OPTIONS)  # meanwhile, in this process
    for thread in threads:
        thread.join()
    assert result.exit_code == 0, result.output
    runs = [(KILL_PLANS[i], *results[i], directory / f"k{i}.h5") for i in range(len(KILL_PLANS))]
    return read_trajectory(reference), runs


def test_kill_9_keeps_every_probe_row_and_the_file_opens(killed_runs):
    reference, runs = killed_runs
    assert reference.num_probes == 50
    killed = [run for run in runs if run[1] == -signal.SIGKILL]
    assert len(killed) >= 3, [(plan, code) for plan, code, *_ in runs]  # really killed
    unclosed = 0
    for plan, _code, stderr, path in runs:
        done = last_progress_step(stderr)  # every probe of the steps before was flushed
        if not path.exists():
            assert done == 0, (plan, stderr)  # killed before the file was created
            continue
        trajectory = read_trajectory(path)
        n, m = trajectory.num_probes, len(trajectory.train["step"])
        assert n >= int(np.sum(reference.probes["step"] < done)), (plan, n, done)
        for column in DETERMINISTIC_PROBE_COLUMNS:  # the same rows as the uninterrupted run
            np.testing.assert_array_equal(
                trajectory.probes[column], reference.probes[column][:n], err_msg=column
            )
        np.testing.assert_array_equal(trajectory.train["loss"], reference.train["loss"][:m])
        assert invoke("fit", path, "--json", "--bootstrap", "0").exit_code in (0, 1)
        assert invoke("plot", path).exit_code in (0, 1)  # 1 only: "holds no rows yet"
        if trajectory.status == UNCLOSED:  # HDF5's "open for writing" mark is still set
            unclosed += 1
            with pytest.raises(OSError, match="already open for write"):
                h5py.File(path, "r")
            with h5py.File(path, "r", swmr=True) as handle:  # how h5py reads it as is
                assert handle["probes/step"].shape[0] >= n
            assert repair_trajectory(path)
        with h5py.File(path, "r") as handle:  # a plain reader, with HDF5's file locking on
            steps = handle["probes/step"][()]
            np.testing.assert_array_equal(steps[:n], reference.probes["step"][:n])
        assert read_trajectory(path).num_probes == n
    assert unclosed >= 2


# --- Ctrl-C, and fit / plot on a file that is still being written ------------------------


def test_fit_and_plot_read_a_live_file_then_ctrl_c_closes_it(tmp_path):
    out = tmp_path / "live.h5"
    options = [*RUN_OPTIONS]
    options[1] = "100000"  # a run that lasts until it is interrupted
    process = smoothprof_process("run", MODEL, "-o", out, *options)
    try:
        live = None
        while live is None or live.num_probes < 3:
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.1)
            live = read_trajectory(out) if out.exists() else None
        assert live.status == "writing"
        with h5py.File(out, "r", swmr=True, locking=False) as handle:  # README's h5py recipe
            assert handle["probes/step"].shape[0] >= 3
        fitted = invoke("fit", out, "--json", "--bootstrap", "0")  # this process reads, the run
        plotted = invoke("plot", out, "--width", "80")  # process writes
        assert fitted.exit_code == 0, fitted.output
        assert json.loads(fitted.stdout)["statistics"]["num_points"] >= 3
        assert plotted.exit_code == 0, plotted.output
        assert process.poll() is None, "the run ended before fit and plot read its file"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    message = stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"interrupted at step \d+: the file is closed; its (\d+) probe rows? and \d+ training "
        rf"rows are in {re.escape(str(out))}",
        message,
    ), message
    reported = int(re.search(r"its (\d+) probe rows?", message).group(1))
    trajectory = read_trajectory(out)
    assert trajectory.status == CLOSED and trajectory.attributes["interrupted"] is True
    assert trajectory.incomplete_rows == 0  # the row being written was finished
    assert trajectory.num_probes == reported >= live.num_probes
    with h5py.File(out, "r") as handle:  # closed: any HDF5 reader opens it
        lengths = {handle["probes"][name].shape[0] for name in handle["probes"]}
        assert lengths == {reported}


# --- errors in the middle of a run -------------------------------------------------------


@pytest.mark.parametrize(
    "asset, expected, failing_step",
    [
        (
            "broken_loss_raises_later.py",
            r"loss\(model, batch\) raised ValueError: sample 9 has no label",
            9,
        ),
        (
            "broken_dataloader_raises_midway.py",
            r"iterating dataloader\(\) raised OSError: lost the connection to the data server",
            6,
        ),
    ],
)
def test_errors_in_the_middle_of_a_run_keep_the_rows(tmp_path, asset, expected, failing_step):
    out = tmp_path / "x.h5"
    options = ["--probe-every", "2", "--steps", "30", "--max-overhead", "inf"]
    result = invoke("run", ASSETS / asset, "-o", out, *options)
    assert_one_line_error(
        result,
        rf"{asset}: {expected}; the run stopped at step {failing_step}; the \d+ probe rows? "
        rf"measured before are in {re.escape(str(out))}$",
    )
    trajectory = read_trajectory(out)
    assert trajectory.status == CLOSED
    assert re.search(expected, trajectory.attributes["error"])
    assert trajectory.train["step"].tolist() == list(range(failing_step))
    assert trajectory.probes["step"].tolist() == list(range(0, failing_step, 2))


def test_a_later_loss_that_is_not_a_tensor(tmp_path):
    model = tmp_path / "later_float.py"
    model.write_text(
        "import torch\n"
        "def model():\n    return torch.nn.Linear(2, 1)\n"
        "def dataloader():\n    return [torch.ones(4, 2), torch.ones(4, 2), torch.zeros(4, 2)]\n"
        "def loss(model, batch):\n"
        "    return 0.5 if batch.sum() == 0 else model(batch).pow(2).mean()\n"
    )
    out = tmp_path / "x.h5"
    result = invoke("run", model, "-o", out, "--probe-every", "0", "--steps", "5")
    assert_one_line_error(
        result,
        r"loss\(model, batch\) returned a float, not a scalar tensor; the run stopped at step 2;",
    )
    assert read_trajectory(out).train["step"].tolist() == [0, 1]


def test_an_unexpected_exception_during_training_is_one_line(tmp_path, monkeypatch):
    def failing_train(prepared, *, on_train_row, **callbacks):
        on_train_row({"step": 0, "loss": 1.0, "grad_norm": 1.0, "lr": 0.1, "clipped": False})
        raise RuntimeError("something inside\nbroke")

    monkeypatch.setattr("smoothprof.train.train", failing_train)  # cli imports it when it runs
    out = tmp_path / "x.h5"
    result = invoke("run", MODEL, "-o", out, "--steps", "3")
    assert_one_line_error(
        result,
        r"good_minimal.py: RuntimeError: something inside broke; the run stopped at step 0; "
        r".*\(--debug shows the traceback\)$",
    )
    assert read_trajectory(out).train["step"].tolist() == [0]
    debug = invoke("run", MODEL, "-o", tmp_path / "y.h5", "--steps", "3", "--debug")
    assert isinstance(debug.exception, RuntimeError)
    assert read_trajectory(tmp_path / "y.h5").attributes["error"].startswith("RuntimeError")


def test_debug_prints_the_traceback(tmp_path):
    out = tmp_path / "x.h5"
    args = ["run", ASSETS / "broken_loss_raises_later.py", "-o", out, "--steps", "12"]
    process = smoothprof_process(*args, "--probe-every", "0", "--debug")
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert "Traceback (most recent call last)" in stderr
    assert "ValueError: sample 9 has no label" in stderr  # the user's own exception
    assert read_trajectory(out).train["step"].tolist() == list(range(9))


# --- model files: every broken asset through `smoothprof run` -----------------------------

BROKEN_MODEL_FILES = {  # asset -> (the line says, the run got far enough to write rows)
    "broken_bad_batch.py": ("the default loss raised TypeError: the default loss needs", False),
    "broken_dataloader_raises_midway.py": (r"iterating dataloader\(\) raised OSError", True),
    "broken_defaults_bad_key.py": ("defaults: unknown option.* learning_rate", False),
    "broken_empty_dataloader.py": (r"dataloader\(\) yields no batches", False),
    "broken_import_raises.py": (r"raised RuntimeError: dataset not found while being imported "
                                r"\(line \d+\)", False),
    "broken_loss_no_grad.py": ("returned a tensor without a gradient", False),
    "broken_loss_nonscalar.py": ("returned a tensor of shape \\(8,\\); it must be a scalar", False),
    "broken_loss_not_tensor.py": ("returned a float, not a scalar tensor", False),
    "broken_loss_raises_later.py": ("raised ValueError: sample 9 has no label", True),
    "broken_meta_device.py": ("on the meta device", False),
    "broken_model_not_callable.py": ("model is an int, not a function", False),
    "broken_model_returns_tensor.py": ("returned a tensor of shape .*, not a torch.nn", False),
    "broken_no_dataloader.py": (r"defines no dataloader\(\)", False),
    "broken_no_model.py": (r"defines no model\(\)", False),
    "broken_no_trainable_params.py": ("no parameters with requires_grad=True", False),
    "broken_one_shot_generator.py": (r"dataloader\(\) returned a one-shot iterator \(a "
                                     r"generator\).* exhausted after 4 batches at step 4", True),
    "broken_optimizer_and_defaults_lr.py": (r"defaults sets lr, which optimizer\(parameters\) "
                                            "decides", False),
    "broken_optimizer_foreign_params.py": ("not the model's trainable parameters", False),
    "broken_optimizer_not_optimizer.py": ("returned a dict, not a torch.optim.Optimizer", False),
    "broken_optimizer_raises.py": (r"optimizer\(parameters\) raised TypeError", False),
    "broken_scheduler_not_scheduler.py": ("returned a float, not an LR scheduler", False),
    "broken_scheduler_other_optimizer.py": ("a scheduler of another optimizer", False),
    "broken_scheduler_raises.py": (r"scheduler\(optimizer\) raised TypeError", False),
    "broken_syntax.py": (r"line \d+: syntax error", False),
    "broken_unknown_output.py": ("the default loss got a Prediction from model", False),
    "not_python.txt": ("not a Python file", False),
    "missing.py": ("no such file", False),
    ".": ("is a directory", False),
}  # fmt: skip


def test_every_broken_asset_has_an_expected_line():
    assets = {p.name for p in ASSETS.glob("broken_*")} | {"not_python.txt"}
    assert assets == set(BROKEN_MODEL_FILES) - {"missing.py", "."}


@pytest.mark.parametrize("name", sorted(BROKEN_MODEL_FILES))
def test_broken_model_files_through_run(tmp_path, name):
    expected, writes_rows = BROKEN_MODEL_FILES[name]
    out = tmp_path / "x.h5"
    result = invoke("run", ASSETS / name, "-o", out, "--steps", "12", "--probe-every", "2")
    shown = str((ASSETS / name).resolve()) if name != "." else str(ASSETS.resolve())
    assert_one_line_error(result, f"^error: {re.escape(shown)}: (.* )?{expected}")
    assert out.exists() == writes_rows


# --- options: usage errors before any work -----------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        ["--steps", "0"],
        ["--steps", "-5"],
        ["--lr", "0"],
        ["--lr", "-0.1"],
        ["--lr", "nan"],
        ["--lr", "inf"],
        ["--clip", "0"],
        ["--clip", "-1"],
        ["--optimizer", "rmsprop"],
        ["--estimators", "magic"],
        ["--estimators", ","],
        ["--fd-points", "2"],
        ["--fd-points", "half"],
        ["--rtol", "0"],
        ["--max-hvps", "0"],
        ["--probe-mode", "test"],
        ["--device", "tpu:9"],
    ],
)
def test_bad_options_are_usage_errors_before_any_work(tmp_path, options):
    # The model file would fail when imported: the usage error must come first.
    out = tmp_path / "x.h5"
    result = invoke("run", ASSETS / "broken_import_raises.py", "-o", out, *options)
    assert result.exit_code == 2, result.output
    assert "dataset not found" not in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    "make_output, expected",
    [
        (lambda d: d, "is a directory"),
        (lambda d: d / "missing" / "x.h5", "no such directory"),
    ],
)
def test_unusable_output_is_refused_before_any_work(tmp_path, make_output, expected):
    result = invoke("run", ASSETS / "broken_import_raises.py", "-o", make_output(tmp_path))
    assert_one_line_error(result, expected)


# --- trajectory files: every kind of bad file, through the commands ----------------------


def write_trajectory(path: Path, grad_norm, hessian_norm) -> Path:
    with TrajectoryWriter(path, attributes={"config": {"steps": 10}}) as writer:
        for step, (g, h) in enumerate(zip(grad_norm, hessian_norm)):
            writer.append_probe(
                {"step": step, "loss": 1.0, "grad_norm": g, "hessian_norm": h, "smoothness_fd": h}
            )
            writer.append_train(
                {"step": step, "loss": 1.0, "grad_norm": g, "lr": 0.1, "clipped": False}
            )
    return path


@pytest.fixture
def good_file(tmp_path):
    g = np.linspace(1.0, 20.0, 40)
    return write_trajectory(tmp_path / "good.h5", g, 2.0 + 3.0 * g)


def truncate(path: Path, size: int) -> Path:
    data = path.read_bytes()
    out = path.with_name(f"cut{size}.h5")
    out.write_bytes(data[:size])
    return out


def text_file(path: Path) -> Path:
    path.write_text("step,loss\n0,1.0\n")
    return path


def foreign_hdf5(path: Path) -> Path:
    with h5py.File(path, "w") as handle:  # e.g. a Keras weights file
        handle.attrs["keras_version"] = "2.15"
        handle.create_dataset("dense/kernel", data=np.ones((4, 3)))
    return path


def edited(source: Path, edit) -> Path:
    out = source.with_name("edited.h5")
    out.write_bytes(source.read_bytes())
    with h5py.File(out, "a") as handle:
        edit(handle)
    return out


def replace_column(name, data):
    def edit(handle):
        del handle[name]
        handle[name] = data

    return edit


BAD_FILES = {
    "missing": (lambda good: good.with_name("nope.h5"), "no such file"),
    "directory": (lambda good: good.parent, "is a directory"),
    "empty": (lambda good: truncate(good, 0), "not an HDF5 file"),
    "text": (lambda good: text_file(good.with_name("notes.h5")), "not an HDF5 file"),
    "truncated superblock": (lambda good: truncate(good, 40), "truncated or damaged"),
    "truncated half": (lambda good: truncate(good, good.stat().st_size // 2),
                       "truncated or damaged"),
    "another program's HDF5": (lambda good: foreign_hdf5(good.with_name("keras.h5")),
                               "not a smoothprof trajectory"),
    "newer format": (
        lambda good: edited(good, lambda h: h.attrs.modify("format_version", FORMAT_VERSION + 1)),
        f"format version {FORMAT_VERSION + 1}; this smoothprof reads version {FORMAT_VERSION}",
    ),
    "format version text": (
        lambda good: edited(good, lambda h: h.attrs.__setitem__("format_version", "one")),
        "invalid format version",
    ),
    "missing dataset": (lambda good: edited(good, lambda h: h.__delitem__("probes/grad_norm")),
                        r"missing dataset\(s\) probes/grad_norm"),
    "missing group": (lambda good: edited(good, lambda h: h.__delitem__("probes")),
                      "no 'probes' group"),
    "text column": (
        lambda good: edited(good, replace_column("probes/step", np.array([b"a", b"b"]))),
        "probes/step are not 1-D numeric columns",
    ),
    "2-D column": (
        lambda good: edited(good, replace_column("probes/loss", np.ones((40, 2)))),
        "probes/loss are not 1-D numeric columns",
    ),
}  # fmt: skip


@pytest.mark.parametrize("command", ["fit", "plot"])
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_trajectory_files_give_one_line(good_file, command, case):
    make, expected = BAD_FILES[case]
    path = make(good_file)
    assert_one_line_error(invoke(command, path), expected)
    debug = invoke(command, path, "--debug")
    assert debug.exit_code != 0 and debug.exception is not None  # the traceback, for a report


def test_every_truncation_is_a_clear_error_or_fewer_rows(good_file):
    size = good_file.stat().st_size
    for cut in sorted({*range(0, 200, 8), *range(200, size, max(1, size // 60)), size - 1}):
        path = truncate(good_file, cut)
        try:
            trajectory = read_trajectory(path)
        except Exception as error:
            assert type(error).__name__ == "TrajectoryError", (cut, error)
            assert "\n" not in str(error)
        else:
            assert trajectory.num_probes <= 40
        path.unlink()


def test_fewer_points_than_a_fit_needs(tmp_path):
    path = write_trajectory(tmp_path / "two.h5", [1.0, 2.0], [3.0, 4.0])
    assert_one_line_error(invoke("fit", path), "need at least 3 points")
    assert invoke("plot", path).exit_code == 0


def test_non_finite_values_are_skipped_with_a_count(tmp_path):
    g = [1.0, 2.0, 3.0, 4.0, np.nan, 5.0, np.inf, 6.0, -1.0]
    h = [2.0, 3.0, 4.0, 5.0, 6.0, -np.inf, 7.0, np.nan, 8.0]
    path = write_trajectory(tmp_path / "nan.h5", g, h)
    result = invoke("fit", path, "--json", "--bootstrap", "0")
    assert result.exit_code == 0, result.output
    statistics = json.loads(result.stdout)["statistics"]
    assert (statistics["num_points"], statistics["num_dropped"]) == (4, 5)
    text = invoke("fit", path, "--no-plot", "--bootstrap", "0")
    assert text.exit_code == 0 and "5 dropped" in text.stdout
    assert invoke("plot", path, "--width", "80").exit_code == 0


def test_existing_output_survives_a_refused_run(tmp_path, good_file):
    before = good_file.read_bytes()
    result = invoke("run", MODEL, "-o", good_file, "--steps", "2")
    assert_one_line_error(result, "already exists")
    assert good_file.read_bytes() == before


# --- property tests: the reader and the fit never crash on arbitrary arrays --------------

DTYPES = [np.int8, np.int64, np.uint8, np.uint64, np.float16, np.float32, np.float64, np.bool_,
          np.complex128, "S4"]  # fmt: skip
any_array = st.sampled_from(DTYPES).flatmap(
    lambda dtype: hnp.arrays(
        dtype, hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=6)
    )
)
# HDF5 stores no string with a NUL in it, and h5py no lone surrogate (not UTF-8): arbitrary
# text, but text a file can hold.
storable_text = st.text(
    st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), max_size=8
)
attribute_values = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.floats(), storable_text, st.just(FORMAT_VERSION),
    hnp.arrays(np.int64, st.integers(0, 3)),
)  # fmt: skip
COLUMN_NAMES = ["step", "loss", "grad_norm", "smoothness_fd", "hessian_norm", "extra"]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    columns=st.dictionaries(st.sampled_from(COLUMN_NAMES), any_array, max_size=6),
    train=st.dictionaries(st.sampled_from(["step", "loss"]), any_array, max_size=2),
    version=attribute_values,
    config=st.one_of(storable_text, st.just('{"steps": 3}'), st.just("[1]")),
)
def test_reader_and_fit_never_crash_on_arbitrary_arrays(
    tmp_path_factory, columns, train, version, config
):
    path = tmp_path_factory.mktemp("arbitrary") / "t.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs["format"] = "smoothprof.trajectory"
        handle.attrs["format_version"] = version
        handle.attrs["config"] = config
        for group, data in (("probes", columns), ("train", train)):
            handle.create_group(group)
            for name, values in data.items():
                handle[group].create_dataset(name, data=values)
    try:
        trajectory = read_trajectory(path)
    except Exception as error:
        assert type(error).__name__ == "TrajectoryError", repr(error)
        return
    lengths = {len(values) for values in trajectory.probes.values()}
    assert len(lengths) == 1  # complete rows only
    assert isinstance(trajectory.config, dict)
    try:
        fit = fit_envelope(
            trajectory.probes["grad_norm"], trajectory.probes["hessian_norm"], num_bootstrap=2
        )
    except FitError:
        return
    assert isinstance(fit, EnvelopeFit) and fit.L0 >= 0 and fit.L1 >= 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(any_array, st.lists(st.one_of(st.none(), st.text(max_size=2), st.floats()))),
    st.one_of(any_array, st.lists(st.floats(), max_size=8)),
)
def test_fit_never_crashes_on_arbitrary_arrays(grad_norm, smoothness):
    try:
        fit = fit_envelope(grad_norm, smoothness, num_bootstrap=2)
    except FitError:
        return
    assert fit.num_points >= 3 and fit.L0 >= 0 and fit.L1 >= 0


# --- security ------------------------------------------------------------------------------


def test_nothing_is_pickled_and_checkpoints_load_weights_only(tmp_path):
    sources = {p: p.read_text() for p in (REPO / "smoothprof").glob("*.py")}
    for path, text in sources.items():
        assert not re.search(r"^\s*(import|from) (pickle|dill|cloudpickle|marshal)\b", text, re.M)
        assert "allow_pickle=True" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
    # --save-model writes a state_dict that loads without unpickling code.
    out = tmp_path / "m.h5"
    result = invoke("run", MODEL, "-o", out, "--steps", "2", "--save-model", tmp_path / "m.pt")
    assert result.exit_code == 0, result.output
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert set(state) == {"weight", "bias"}
    with h5py.File(out, "r") as handle:  # only numbers and text: no object (pickle-able) dtype
        for group in ("probes", "train"):
            for dataset in handle[group].values():
                assert dataset.dtype.kind in "iuf"
        for key in handle.attrs:
            assert isinstance(handle.attrs[key], (str, bytes, np.generic)), key


def test_readme_states_the_contract_kept_here():
    readme = (REPO / "README.md").read_text()
    assert "A model file is code that smoothprof runs" in readme
    codes = re.search(r"Exit codes: (.+?)\n\n", readme, flags=re.S).group(1)
    for code in (0, cli.EXIT_USER_ERROR, 2, cli.EXIT_DIVERGED, cli.EXIT_INTERRUPTED):
        assert re.search(rf"(^|; ){code} ", " ".join(codes.split())), code
    assert "repair_trajectory" in readme and "swmr=True" in readme
