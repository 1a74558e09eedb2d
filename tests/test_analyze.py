"""smoothprof.analyze, the library behind `smoothprof fit`: the same JSON as the command, its
errors, and the commands that only read files never importing torch (nor scipy before a fit)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from typer.testing import CliRunner

import smoothprof
from smoothprof.analysis import Analysis, FitPoints, analyze
from smoothprof.cli import app
from smoothprof.fit import FitError
from smoothprof.trajectory import TrajectoryError, TrajectoryWriter, read_trajectory

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "100"})


def write_profile(path, *, lr, seed, with_fd=True, noise=0.5, train_rows=True):
    """An unclipped SGD profile whose first eight probes hide the correlation (the gradient norm
    falls while the smoothness rises), then smoothness follows 1 + 4 g."""
    rng = np.random.default_rng(seed)
    early_g, early_L = np.geomspace(0.06, 0.03, 8), np.geomspace(3.0, 10.0, 8)
    late_g = np.geomspace(0.5, 0.05, 22)
    late_L = (1.0 + 4.0 * late_g) * rng.uniform(0.7, 1.0, late_g.size)
    g, L = np.concatenate([early_g, late_g]), np.concatenate([early_L, late_L])
    config = {"steps": 300, "lr": lr, "clip": None, "optimizer": "sgd"}
    with TrajectoryWriter(path, attributes={"config": config, "model_file": "model.py"}) as writer:
        for i in range(g.size):
            if train_rows:
                for step in range(10 * i, 10 * i + 10):
                    writer.append_train(
                        {"step": step, "loss": 2.0 - step / 300, "grad_norm": g[i], "lr": lr,
                         "clipped": False}
                    )  # fmt: skip
            writer.append_probe(
                {"step": 10 * i, "loss": 2.0 - i / 30, "grad_norm": g[i], "hessian_norm": L[i],
                 "smoothness_fd": 0.9 * L[i] if with_fd else np.nan, "hessian_eig": L[i],
                 "hvp_count": 5, "hessian_converged": True, "grad_noise": noise}
            )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def profiles(tmp_path_factory):
    folder = tmp_path_factory.mktemp("analyze")
    return (
        write_profile(folder / "a.h5", lr=0.2, seed=1),
        write_profile(folder / "b.h5", lr=0.1, seed=2, noise=0.7, train_rows=False),
    )


@pytest.mark.parametrize(
    "options, keywords",
    [
        ([], {}),
        (["--skip-steps", "80", "--bootstrap", "50"], {"skip_steps": 80, "bootstrap": 50}),
        (["--estimator", "fd", "--quantile", "0.9"], {"estimator": "fd", "quantile": 0.9}),
    ],
)
def test_the_library_gives_the_same_json_as_the_cli(profiles, options, keywords):
    result = invoke("fit", *profiles, "--json", *options)
    assert result.exit_code == 0, result.output
    from_cli = json.loads(result.stdout)
    from_library = json.loads(json.dumps(analyze([str(p) for p in profiles], **keywords).as_json()))
    assert from_cli == from_library
    assert from_cli["files"] == [str(p) for p in profiles]
    if not options:  # the early-steps note is the library's too
        assert any("--skip-steps" in w for w in from_library["warnings"])


def test_analysis_holds_the_fit_its_points_and_what_the_files_say(profiles):
    analysis = analyze(profiles, skip_steps=80, bootstrap=0)
    assert isinstance(analysis, Analysis) and isinstance(analysis.points, FitPoints)
    assert analysis.estimator == "hvp" and analysis.skip_steps == 80
    assert analysis.files == tuple(str(p) for p in profiles)
    assert analysis.points.step.min() >= 80
    assert analysis.fit.num_points == analysis.points.grad_norm.size == 2 * 22
    assert analysis.grad_noise == pytest.approx(0.6)  # the median over both files' probes
    assert analysis.num_steps == 300
    assert analysis.profile.lr == pytest.approx(0.1)  # the smaller lr of the two runs
    assert analysis.profile.optimizer == "sgd" and analysis.profile.clip is None
    assert analysis.recommendations.headline.clip_threshold == pytest.approx(
        analysis.fit.L0 / analysis.fit.L1
    )
    assert np.all((analysis.points.progress >= 0) & (analysis.points.progress <= 1))
    assert [t.path for t in analysis.trajectories] == list(profiles)


def test_analyze_takes_one_path_or_trajectory_objects(profiles):
    one = analyze(profiles[0], bootstrap=20).as_json()
    assert one == analyze([read_trajectory(profiles[0])], bootstrap=20).as_json()
    assert one == smoothprof.analyze(str(profiles[0]), bootstrap=20).as_json()
    assert one["files"] == [str(profiles[0])]


def test_analyze_errors(profiles, tmp_path):
    with pytest.raises(ValueError, match="estimator must be hvp or fd"):
        analyze(profiles, estimator="curvature")
    with pytest.raises(ValueError, match="at least one trajectory"):
        analyze([])
    with pytest.raises(ValueError, match="skip_steps must be >= 0"):
        analyze(profiles, skip_steps=-1)
    with pytest.raises(FitError, match="--skip-steps 1000 leaves 0 probe"):
        analyze(profiles, skip_steps=1000)
    with pytest.raises(TrajectoryError, match="no such file"):
        analyze(tmp_path / "missing.h5")
    no_fd = write_profile(tmp_path / "no_fd.h5", lr=0.1, seed=3, with_fd=False)
    with pytest.raises(FitError, match="no fd measurements"):
        analyze(no_fd, estimator="fd")


def test_fit_json_errors_are_a_json_object_on_stdout(profiles, tmp_path):
    missing = tmp_path / "missing.h5"
    result = invoke("fit", missing, "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {"error": f"{missing}: no such file"}
    assert result.stderr.strip() == f"error: {missing}: no such file"
    too_few = invoke("fit", *profiles, "--json", "--skip-steps", "1000")
    assert too_few.exit_code == 1
    assert "--skip-steps 1000 leaves 0 probe(s)" in json.loads(too_few.stdout)["error"]
    # a usage error is the command line's, before any work: exit 2, nothing on stdout
    usage = invoke("fit", *profiles, "--json", "--estimator", "curvature")
    assert usage.exit_code == 2 and usage.stdout == ""
    # without --json stdout stays empty
    assert invoke("fit", missing).stdout == ""


def test_public_names_resolve_and_are_listed():
    for name in smoothprof.__all__:
        assert getattr(smoothprof, name) is not None
    assert set(smoothprof.__all__) <= set(dir(smoothprof))
    from smoothprof import Probe  # from-imports work
    from smoothprof import analyze as analyze_again

    assert Probe.__module__ == "smoothprof.probe" and analyze_again is analyze
    from smoothprof import errors
    from smoothprof.loading import ModelFileError  # their old homes re-export them
    from smoothprof.train import ConfigError

    assert smoothprof.ModelFileError is ModelFileError is errors.ModelFileError
    assert ConfigError is errors.ConfigError
    assert callable(smoothprof.recommend)  # not its module, though the CLI imported that
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        smoothprof.nothing  # noqa: B018


# Runs one command in a fresh interpreter, then writes which heavy modules it imported.
COMMAND_SCRIPT = """
import json, sys
from smoothprof.cli import app
try:
    app(sys.argv[2:], prog_name="smoothprof")
except SystemExit as exit:
    code = exit.code
with open(sys.argv[1], "w") as out:
    json.dump({"code": code, "loaded": [m for m in ("torch", "scipy") if m in sys.modules]}, out)
"""


def run_command(tmp_path, *args):
    report = tmp_path / "modules.json"
    process = subprocess.run(
        [sys.executable, "-c", COMMAND_SCRIPT, str(report), *map(str, args)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    outcome = json.loads(report.read_text())
    assert outcome["code"] in (0, None), process.stdout + process.stderr
    return outcome["loaded"]


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        *[
            [command, "--help"]
            for command in ("run", "fit", "plot", "compare", "report", "repair", "watch")
        ],
    ],
)
def test_help_and_version_import_neither_torch_nor_scipy(tmp_path, args):
    assert run_command(tmp_path, *args) == []


def test_commands_that_read_files_do_not_import_torch(tmp_path, profiles):
    a, b = profiles
    assert run_command(tmp_path, "plot", a) == []
    assert run_command(tmp_path, "compare", a, a, "--json") == []
    assert run_command(tmp_path, "repair", a) == []
    assert run_command(tmp_path, "fit", a, b, "--json") == ["scipy"]  # the fit solves an LP
    assert run_command(tmp_path, "fit", a, "--width", "80") == ["scipy"]
    pytest.importorskip("matplotlib")
    assert run_command(tmp_path, "report", a, "-o", tmp_path / "report") == ["scipy"]


def test_the_library_analysis_does_not_import_torch(profiles):
    script = (
        "import sys, smoothprof\n"
        f"analysis = smoothprof.analyze({str(profiles[0])!r}, bootstrap=10)\n"
        "assert analysis.fit.num_points == 30\n"
        "assert 'torch' not in sys.modules, 'torch'\n"
        "from smoothprof import Probe\n"
        "assert 'torch' in sys.modules\n"
    )
    process = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert process.returncode == 0, process.stderr
