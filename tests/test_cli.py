"""Every command through typer's CliRunner: help, the happy path, and the user's mistakes."""

import io
import json
import re

import pytest
from conftest import ASSETS, REPO
from rich.console import Console
from typer.main import get_command
from typer.testing import CliRunner

from smoothprof.cli import app

pytestmark = pytest.mark.usefixtures("clean_sys_path")
runner = CliRunner()
COMMANDS = sorted(get_command(app).commands)


def invoke(*args, env=None):
    """Run the CLI at its own defaults (no time budget: counts do not depend on the machine)."""
    env = {"COLUMNS": "100", **(env or {})}
    return runner.invoke(app, [str(a) for a in args], env=env)


def test_every_command_has_help_and_a_readme_mention():
    readme = (REPO / "README.md").read_text()
    assert COMMANDS == ["compare", "fit", "plot", "repair", "report", "run", "watch"]
    top = invoke("--help")
    assert top.exit_code == 0
    for command in COMMANDS:
        assert command in top.output
        result = invoke(command, "--help")
        assert result.exit_code == 0, result.output
        assert len(get_command(app).commands[command].help or "") > 20
        assert f"smoothprof {command}" in readme


def test_run_help_lists_the_options():
    text = invoke("run", "--help").output
    for option in [
        "--steps",
        "--lr",
        "--optimizer",
        "--clip",
        "--probe-every",
        "--probe-batches",
        "--estimators",
        "--seed",
        "--device",
        "--save-model",
        "--output",
        "--force",
    ]:
        assert option in text


def help_rows(command: str) -> dict[str, str]:
    """The option rows of a command's --help, by the option's first name, one line each."""
    text = invoke(command, "--help", env={"COLUMNS": "400"}).output
    rows = {}
    for line in text.splitlines():
        match = re.match(r"^│\s+(--[\w-]+)\s", line)
        if match:
            rows[match.group(1)] = line
    return rows


def test_help_shows_its_texts_as_written():
    """Help texts reach the screen whole: rich would take `[default: 500]` and `[science]` for
    markup and drop them."""
    assert "Optimizer steps [default: 500]." in help_rows("run")["--steps"]
    assert "One of sgd, momentum, adam [default: sgd]." in help_rows("run")["--optimizer"]
    report_help = " ".join(invoke("report", "--help", env={"COLUMNS": "400"}).output.split())
    assert "Needs matplotlib (smoothprof[science])." in report_help


def test_every_option_shows_its_default():
    """Every option of every command that takes a value, and every on/off pair, says what it
    is when not given (a lone flag such as --force is off unless given)."""
    checked = set()
    for command in COMMANDS:
        rows = help_rows(command)
        for param in get_command(app).commands[command].params:
            if param.param_type_name != "option" or (param.is_flag and not param.secondary_opts):
                continue
            name = next(opt for opt in param.opts if opt.startswith("--"))
            assert "[default: " in rows[name], (command, rows[name])
            checked.add((command, name))
    assert {("run", "--output"), ("run", "--retain-graphs"), ("fit", "--width")} <= checked
    assert {("compare", "--target"), ("report", "--output-dir")} <= checked


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.startswith("smoothprof ")


@pytest.fixture(scope="module")
def minimal_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "minimal.h5"
    result = invoke(
        "run",
        ASSETS / "good_minimal.py",
        "-o",
        out,
        "--steps",
        "40",
        "--probe-every",
        "4",
        "--save-model",
        out.with_suffix(".pt"),
    )
    assert result.exit_code == 0, result.output
    return out, result


def test_run_writes_trajectory_and_model(minimal_run):
    out, result = minimal_run
    assert out.exists() and out.with_suffix(".pt").exists()
    assert f"wrote {out}" in result.stdout
    assert "10 probes" in result.stdout
    import torch

    state = torch.load(out.with_suffix(".pt"), weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_fit_json_has_the_documented_keys(minimal_run):
    out, _ = minimal_run
    result = invoke("fit", out, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in [
        "L0",
        "L1",
        "clip_threshold",
        "step_size",
        "recommendations",
        "statistics",
        "headline",
        "estimator",
        "L0_interval",
        "L1_interval",
    ]:
        assert key in data
    assert data["estimator"] == "hvp"
    assert data["statistics"]["num_points"] == 10
    for rec in data["recommendations"]:
        assert {"rule", "clip_threshold", "step_size", "source"} <= set(rec)


def test_fit_text_and_plot(minimal_run):
    out, _ = minimal_run
    result = invoke("fit", out, "--estimator", "fd", "--width", "90")
    assert result.exit_code == 0, result.output
    assert "L0" in result.stdout and "Spearman" in result.stdout
    assert "torch.optim.SGD" in result.stdout
    assert "\x1b[" not in result.stdout  # not a terminal: no colour codes
    ascii_result = invoke("fit", out, "--ascii")
    assert ascii_result.exit_code == 0, ascii_result.output
    assert ascii_result.stdout.isascii()  # tables, plot, symbols such as τ and ·: everything
    assert "torch.optim.SGD" in ascii_result.stdout and "early" in ascii_result.stdout
    plot = invoke("plot", out, "--ascii", "--width", "80")
    assert plot.exit_code == 0, plot.output
    assert "gradient norm" in plot.stdout
    assert all(ord(c) < 128 for c in plot.stdout)


def test_third_party_model_runs_and_fits(tmp_path):
    out = tmp_path / "third.h5"
    result = invoke("run", ASSETS / "third_party.py", "-o", out, "--probe-every", "3")
    assert result.exit_code == 0, result.output
    fitted = invoke("fit", out, "--json")
    assert fitted.exit_code == 0, fitted.output
    data = json.loads(fitted.stdout)
    assert data["statistics"]["num_points"] == 10
    assert data["L0"] >= 0 and data["L1"] >= 0


def assert_one_line_error(result, expected, code=1):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert re.search(expected, lines[0]), lines[0]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("missing.py", "no such file"),
        ("broken_syntax.py", "syntax error"),
        ("broken_import_raises.py", "dataset not found"),
        ("broken_no_model.py", "defines no model"),
        ("broken_model_returns_tensor.py", "not a torch.nn.Module"),
        ("broken_empty_dataloader.py", "no batches"),
        ("broken_loss_nonscalar.py", "scalar"),
        ("broken_no_trainable_params.py", "requires_grad"),
        ("broken_meta_device.py", "on the meta device.*to_empty"),
        ("broken_defaults_bad_key.py", "learning_rate"),
        ("not_python.txt", "not a Python file"),
    ],
)
def test_broken_model_files_give_one_line(tmp_path, name, expected):
    result = invoke("run", ASSETS / name, "-o", tmp_path / "x.h5", "--steps", "2")
    assert_one_line_error(result, expected)
    assert not (tmp_path / "x.h5").exists()


def test_debug_shows_the_traceback(tmp_path):
    result = invoke("run", ASSETS / "broken_no_model.py", "-o", tmp_path / "x.h5", "--debug")
    assert result.exit_code != 0 and result.exception is not None


@pytest.mark.parametrize(
    "options",
    [
        ["--steps", "0"],
        ["--lr", "-1"],
        ["--clip", "0"],
        ["--optimizer", "rmsprop"],
        ["--estimators", "fd,magic"],
        ["--probe-every", "-1"],
        ["--max-basis", "3"],  # estimators.MIN_BASIS is 4
    ],
)
def test_bad_options_are_usage_errors(tmp_path, options):
    result = invoke("run", ASSETS / "good_minimal.py", "-o", tmp_path / "x.h5", *options)
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "x.h5").exists()


def test_existing_output_is_not_overwritten(tmp_path):
    out = tmp_path / "x.h5"
    out.write_bytes(b"earlier run")
    result = invoke("run", ASSETS / "good_minimal.py", "-o", out, "--steps", "2")
    assert_one_line_error(result, "already exists")
    assert out.read_bytes() == b"earlier run"
    forced = invoke("run", ASSETS / "good_minimal.py", "-o", out, "--steps", "2", "--force")
    assert forced.exit_code == 0, forced.output


def test_divergence_exit_code(tmp_path):
    model = tmp_path / "exploding.py"
    model.write_text(
        "import torch\n"
        "def model():\n    return torch.nn.Linear(4, 1)\n"
        "def dataloader():\n    x = torch.randn(32, 4)\n    return [(x, x.sum(1, keepdim=True))]\n"
        "def loss(model, batch):\n    x, y = batch\n    return ((model(x) - y) ** 2).mean()\n"
    )
    out = tmp_path / "x.h5"
    result = invoke("run", model, "-o", out, "--lr", "10", "--steps", "300", "--probe-every", "1")
    assert result.exit_code == 3, result.output
    assert "diverged" in result.stderr
    assert invoke("plot", out).exit_code == 0


@pytest.mark.parametrize("command", ["fit", "plot"])
def test_bad_trajectory_files(tmp_path, command):
    assert_one_line_error(invoke(command, tmp_path / "missing.h5"), "no such file")
    (tmp_path / "text.h5").write_text("not hdf5")
    assert_one_line_error(invoke(command, tmp_path / "text.h5"), "not an HDF5 file")


def test_fit_without_probes(tmp_path):
    out = tmp_path / "x.h5"
    assert (
        invoke(
            "run", ASSETS / "good_minimal.py", "-o", out, "--steps", "3", "--probe-every", "0"
        ).exit_code
        == 0
    )
    assert_one_line_error(invoke("fit", out), "no smoothness measurements")


def test_readme_transcript_commands_run(tmp_path, monkeypatch):
    """The `$ smoothprof ...` lines of README.md's transcript work as written."""
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^\$ smoothprof (.+)$", readme, flags=re.MULTILINE)
    assert [c.split()[0] for c in commands] == ["run", "fit", "plot"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sample_models").symlink_to(REPO / "sample_models")
    for command in commands:
        result = invoke(*command.split())
        assert result.exit_code == 0, (command, result.output)
    assert "clip_grad_norm_" in invoke(*commands[1].split()).stdout


@pytest.mark.parametrize("width", [60, 100, 140])
def test_output_has_the_width_asked_for_and_is_repeatable(minimal_run, width):
    out, _ = minimal_run
    for command in ("fit", "plot"):
        first = invoke(command, out, "--width", width)
        assert first.exit_code == 0, first.output
        # The clipped sweep's commands stay whole, one per line, past the width if need be.
        lines = [line for line in first.stdout.splitlines() if not line.startswith("  smoothprof")]
        assert max(len(line) for line in lines) <= width
        assert invoke(command, out, "--width", width).stdout == first.stdout


def test_repair_command(tmp_path, minimal_run):
    out, _ = minimal_run
    result = invoke("repair", out)
    assert result.exit_code == 0, result.output
    assert "nothing to repair" in result.stdout
    assert_one_line_error(invoke("repair", tmp_path / "missing.h5"), "no such file")


@pytest.mark.parametrize(
    "defaults, options, exit_code, expected",
    [
        # The file allows the graphs: the option works with it.
        ({"retain_graphs": True, "probe_batches": 2}, ["--hvp-method", "retained"], 0, None),
        # The option conflicts with the file's defaults: usage.
        ({"probe_batches": 2}, ["--hvp-method", "retained"], 2, "retain_graphs"),
        # Probe batches chosen by the tool keep their graphs: the option works.
        ({}, ["--hvp-method", "retained"], 0, None),
        # The file's defaults conflict among themselves: the file's problem.
        ({"hvp_method": "retained", "probe_batches": 2}, [], 1, "defaults: hvp_method retained"),
    ],
)
def test_options_are_judged_together_with_the_files_defaults(
    tmp_path, defaults, options, exit_code, expected
):
    model_file = tmp_path / "model.py"
    model_file.write_text(
        (ASSETS / "good_minimal.py").read_text() + f"\n\ndefaults = {defaults!r}\n"
    )
    out = tmp_path / "x.h5"
    result = invoke("run", model_file, "-o", out, "--steps", "2", *options)
    assert result.exit_code == exit_code, result.output
    if exit_code == 1:
        assert_one_line_error(result, expected)
    elif expected is not None:
        assert expected in result.output
    assert out.exists() == (exit_code == 0)


def test_a_long_probe_says_so_in_a_log(tmp_path, monkeypatch):
    monkeypatch.setattr("smoothprof.cli.PROBE_NOTE_SECONDS", 0.0)
    result = invoke("run", ASSETS / "good_minimal.py", "-o", tmp_path / "x.h5", "--steps", "1")
    assert result.exit_code == 0, result.output
    assert re.search(r"^probing step 0: \d+ HVPs in \d+ s$", result.output, re.MULTILINE)


def test_the_progress_bar_names_a_running_probes_hvps():
    from smoothprof.cli import _progress

    stream = io.StringIO()
    console = Console(file=stream, force_terminal=True, width=120)
    with _progress(console, 10) as (_, report_hvp):
        report_hvp(3, 7)
    assert "probing step 3: 7 HVPs" in stream.getvalue()


def test_a_model_with_hardswish_and_hardsigmoid_is_probed_end_to_end(tmp_path):
    """MobileNetV3's activations have no double backward in ATen: the probe's composites give
    every estimator its value, by an exact method, and the run says nothing of failures."""
    import numpy as np

    from smoothprof.trajectory import read_trajectory

    out = tmp_path / "hard.h5"
    result = invoke(
        "run", ASSETS / "good_hard_activations.py", "-o", out, "--steps", "6",
        "--probe-every", "2", "--probe-batches", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "note:" not in result.stderr
    trajectory = read_trajectory(out)
    assert trajectory.attributes["hvp_method"] == "double-backward"
    for column in ("hessian_norm", "smoothness_fd", "grad_curvature"):
        assert np.all(np.isfinite(trajectory.probes[column])), column


def test_a_failing_probe_estimator_is_one_note_and_the_run_goes_on(tmp_path, monkeypatch):
    import numpy as np

    import smoothprof.probe as probe_module
    from smoothprof.trajectory import read_trajectory

    def fails(*args, **kwargs):
        raise RuntimeError("derivative for aten::something is not implemented")

    monkeypatch.setattr(probe_module, "lanczos_top_eigenpair", fails)
    out = tmp_path / "x.h5"
    result = invoke(
        "run", ASSETS / "good_minimal.py", "-o", out, "--steps", "6", "--probe-every", "2"
    )
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: hvp")]
    assert notes == [
        "note: hvp failed at step 0 (RuntimeError: derivative for aten::something is not "
        "implemented); the run goes on without it"
    ]
    trajectory = read_trajectory(out)
    assert len(trajectory.train["step"]) == 6
    assert np.all(np.isnan(trajectory.probes["hessian_norm"]))
    assert np.all(np.isfinite(trajectory.probes["smoothness_fd"]))


def test_a_run_says_when_its_eigen_solves_restarted(tmp_path):
    from smoothprof.estimators import MIN_BASIS

    assert MIN_BASIS == 4  # the command line's --max-basis minimum
    out = tmp_path / "x.h5"
    # rtol 1e-8 takes more than 4 products at every probe
    options = ["--steps", "4", "--probe-every", "2", "--estimators", "hvp", "--rtol", "1e-8"]
    result = invoke("run", ASSETS / "good_minimal.py", "-o", out, *options, "--max-basis", "4")
    assert result.exit_code == 0, result.output
    assert re.search(r"\b2 eigen-solves filled the Lanczos basis \(--max-basis 4\)", result.output)
    unbounded = invoke("run", ASSETS / "good_minimal.py", "-o", out, *options, "--force")
    assert unbounded.exit_code == 0 and "filled the Lanczos basis" not in unbounded.output
