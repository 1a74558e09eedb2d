"""The clipped sweep's commands that `fit` and `report` print: whole lines that paste as they
are, repeating the options the profile ran with."""

from __future__ import annotations

import dataclasses
import html
import json
import math
import re
import shlex
import shutil

import numpy as np
import pytest
from conftest import ASSETS
from typer.testing import CliRunner

import smoothprof
from smoothprof.cli import app
from smoothprof.display import SWEEP_SETS, profile_run_options, run_option_words
from smoothprof.train import RunConfig

pytestmark = pytest.mark.usefixtures("clean_sys_path")

# The profile's own options, and how a command line says each (written out by hand).
PROFILE = {
    "steps": (60, ["--steps", "60"]),
    "optimizer": ("momentum", ["--optimizer", "momentum"]),
    "max_overhead": (math.inf, ["--max-overhead", "inf"]),
    "retain_graphs": (False, ["--no-retain-graphs"]),
    "probe_batches": (2, ["--probe-batches", "2"]),
    "estimators": (("fd", "hvp"), ["--estimators", "fd,hvp"]),
    "fd_points": ((0.25, 0.5), ["--fd-points", "0.25,0.5"]),
    "rtol": (1e-4, ["--rtol", "0.0001"]),
    "seed": (3, ["--seed", "3"]),
}
PROFILE_LR = 0.2  # set by the sweep, as are clip and probe_every: never repeated
SWEEP_LRS = ("0.2", "0.4", "1", "2", "4")  # 1, 2, 5, 10, 20 times the profile's lr


def expected_options() -> list[str]:
    """The profile's options that differ from the built-in ones and that a run without probes
    uses, in the order of RunConfig."""
    built_in = RunConfig().as_json()
    profile = dataclasses.replace(RunConfig(), **{k: v for k, (v, _) in PROFILE.items()})
    order = [field.name for field in dataclasses.fields(RunConfig)]
    words = []
    for name in sorted(PROFILE, key=order.index):
        if name not in SWEEP_SETS and profile.as_json()[name] != built_in[name]:
            words += PROFILE[name][1]
    return words


def run_argv(clip: str, lr: str) -> list[str]:
    return [
        "smoothprof", "run", "my model.py", "--clip", clip, "--lr", lr, "--probe-every", "0",
        *expected_options(), "-o", f"clip_lr{lr}.h5",
    ]  # fmt: skip


@pytest.fixture
def profile(tmp_path, monkeypatch):
    """A momentum profile of a model file whose name has a space, with every option in
    PROFILE, and probes whose smoothness grows with the gradient norm (the headline clips)."""
    monkeypatch.chdir(tmp_path)
    model_file = tmp_path / "my model.py"
    shutil.copy(ASSETS / "good_minimal.py", model_file)
    config = RunConfig(lr=PROFILE_LR, **{name: value for name, (value, _) in PROFILE.items()})
    attributes = {
        "config": {
            **config.as_json(), "world_size": 1, "optimizer_source": "options",
            "scheduler": None, "probe_autocast": False, "probe_dtype": "float32",
        },  # fmt: skip  (what `smoothprof run` records, PreparedRun.recorded_config)
        "model_file": str(model_file),
        "world_size": 1,
    }
    g = np.geomspace(0.5, 0.05, 30)
    L = (1.0 + 4.0 * g) * np.random.default_rng(2).uniform(0.7, 1.0, g.size)
    path = tmp_path / "profile.h5"
    with smoothprof.TrajectoryWriter(path, attributes=attributes) as writer:
        for i in range(g.size):
            writer.append_probe(
                {"step": 2 * i, "loss": 1.0, "grad_norm": g[i], "hessian_norm": L[i],
                 "hessian_eig": L[i], "hvp_count": 5, "hessian_converged": True}
            )  # fmt: skip
    return path


def invoke(*args, width=100):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": str(width)})


def clip_threshold(path) -> str:
    data = json.loads(invoke("fit", path, "--json").stdout)
    assert data["headline"]["rule"] == "clipped-measured"
    return f"{data['clip_threshold']:.6g}"


@pytest.mark.parametrize("width", [60, 80, 100, 200])
def test_fit_prints_each_command_whole_with_the_profile_options(profile, width):
    clip = clip_threshold(profile)
    result = invoke("fit", profile, "--width", width)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    runs = [line for line in lines if line.startswith("  smoothprof run")]
    assert [shlex.split(line) for line in runs] == [run_argv(clip, lr) for lr in SWEEP_LRS]
    assert "  smoothprof compare clip_lr*.h5" in lines
    assert len([line for line in lines if "clip_lr" in line]) == len(SWEEP_LRS) + 1
    # Nothing of a command spills onto the next line, which starts something else.
    for line in runs:
        after = lines[lines.index(line) + 1]
        assert after.startswith(("  smoothprof ", "╭")), after


def test_the_report_shows_the_same_commands(profile, tmp_path):
    pytest.importorskip("matplotlib")
    clip = clip_threshold(profile)
    result = invoke("report", profile, "-o", tmp_path / "report")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "report" / "report.html").read_text()
    block = next(b for b in re.findall(r"<pre>(.*?)</pre>", page, re.DOTALL) if "clip_lr" in b)
    lines = html.unescape(block).splitlines()
    assert [shlex.split(line) for line in lines[:-1]] == [run_argv(clip, lr) for lr in SWEEP_LRS]
    assert lines[-1] == "smoothprof compare clip_lr*.h5"


def test_a_printed_command_runs_with_the_profile_options(profile):
    clip = clip_threshold(profile)
    line = next(line for line in invoke("fit", profile).stdout.splitlines() if "clip_lr0.4" in line)
    argv = shlex.split(line)
    assert argv[:2] == ["smoothprof", "run"]
    result = invoke(*argv[1:])
    assert result.exit_code == 0, result.output
    swept = smoothprof.read_trajectory("clip_lr0.4.h5").config
    profiled = smoothprof.read_trajectory(profile).config
    assert (swept["lr"], swept["clip"], swept["probe_every"]) == (0.4, float(clip), 0)
    # what the sweep sets itself (it probes nothing, so no schedule), and the record of how the
    # run chose its probe batches, which the fixture's hand-made profile does not hold
    for name in (*SWEEP_SETS, "probe_batches_by_size"):
        swept.pop(name, None), profiled.pop(name, None)
    assert swept == profiled


def test_option_words_for_every_kind_of_value():
    assert run_option_words("retain_graphs", True) == ["--retain-graphs"]
    assert run_option_words("probes_per_decade", 12.5) == ["--probes-per-decade", "12.5"]
    assert run_option_words("lr", 0.1 + 0.2) == ["--lr", "0.30000000000000004"]  # read back alike
    assert run_option_words("device", "cuda:1") == ["--device", "cuda:1"]
    assert run_option_words("clip", None) is None  # no spelling: left out, not guessed
    assert run_option_words("some_new_option", 7) == ["--some-new-option", "7"]
    built_in = RunConfig().as_json()
    # Files that disagree on an option, or a file without a config: the option is left out.
    assert profile_run_options([{"seed": 1}, {"seed": 2}], built_in) == []
    assert profile_run_options([{"steps": 60}, {}], built_in) == []
    assert profile_run_options([{"steps": 60, "clip": 1.0}] * 2, built_in) == ["--steps", "60"]
