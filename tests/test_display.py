"""What `smoothprof fit` and `smoothprof plot` show: plots, tables, and their behaviour in a log.

A synthetic trajectory with known contents (no training) keeps these tests fast and exact.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

import smoothprof
from smoothprof.analysis import training_progress
from smoothprof.cli import app
from smoothprof.display import (
    PROGRESS_THIRDS,
    envelope_plot,
    fit_summary,
    progress_third,
    recommendations_view,
    rolling_share,
    series_plot,
)

L0, L1, NOISE, STEPS = 2.0, 0.5, 10.0, 600  # the headline clip threshold is c = L0/L1 = 4


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """60 probes under L0 + L1·g with gradient noise 10 > c, 600 training rows."""
    path = tmp_path_factory.mktemp("display") / "synthetic.h5"
    rng = np.random.default_rng(0)
    steps = np.arange(0, STEPS, 10)
    g = np.geomspace(1e3, 1e-2, steps.size)
    hessian = (L0 + L1 * g) * rng.uniform(0.5, 1.0, steps.size)
    hessian[::6] = L0 + L1 * g[::6]
    config = {"steps": STEPS, "lr": 0.05, "clip": 1.0, "probe_batches": 4}
    with smoothprof.TrajectoryWriter(path, attributes={"config": config}) as writer:
        for step in range(STEPS):
            writer.append_train(
                {"step": step, "loss": 10.0 / (1 + step), "grad_norm": 1e3 / (1 + step),
                 "lr": 0.05 * 0.5 ** (step // 200), "clipped": step < 150 or step % 7 == 0}
            )  # fmt: skip
            if step % 10 == 0:
                i = step // 10
                writer.append_probe(
                    {"step": step, "loss": 10.0 / (1 + step), "grad_norm": g[i],
                     "grad_noise": NOISE, "smoothness_fd": 0.8 * hessian[i],
                     "hessian_norm": hessian[i], "hessian_eig": hessian[i], "hvp_count": 5,
                     "hessian_converged": True, "seconds": 0.01}
                )  # fmt: skip
    return path


def invoke(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env or {"COLUMNS": "100"})


# --- pure helpers ------------------------------------------------------------------------------


def test_training_progress_and_thirds():
    assert training_progress(np.array([0, 5]), 0).tolist() == [0.0, 0.0]
    assert training_progress(np.array([-3, 200]), 100).tolist() == [0.0, 1.0]
    thirds = progress_third(training_progress(np.arange(300), 299))
    assert np.bincount(thirds).tolist() == [100, 100, 100]


def test_rolling_share_is_the_trailing_mean():
    flags = np.random.default_rng(1).integers(0, 2, 50)
    for window in (1, 7, 50, 80):
        naive = [flags[max(0, i + 1 - window) : i + 1].mean() for i in range(flags.size)]
        np.testing.assert_allclose(rolling_share(flags, window), naive, rtol=1e-12)
    with pytest.raises(ValueError):
        rolling_share(flags, 0)


# --- plots -------------------------------------------------------------------------------------


def plot_area(figure: str) -> str:
    """The rows between the frame's top and bottom lines."""
    lines = figure.splitlines()
    top = next(i for i, line in enumerate(lines) if "┌" in line)
    bottom = next(i for i, line in enumerate(lines) if "└" in line)
    return "\n".join(lines[top + 1 : bottom])


def test_envelope_plot_marks_the_thirds_of_the_run_with_a_legend(synthetic):
    probes = smoothprof.read_trajectory(synthetic).probes
    g, hessian = probes["grad_norm"], probes["hessian_norm"]
    fit = smoothprof.fit_envelope(g, hessian, num_bootstrap=0)
    progress = training_progress(probes["step"], STEPS - 1)
    figure = envelope_plot(g, hessian, fit, progress=progress, width=90)
    area = plot_area(figure)
    assert "envelope L0 + L1 g" in area
    for label, marker, _ in PROGRESS_THIRDS:
        assert f"{marker}{marker} {label}" in area  # legend entry with its marker
        assert area.count(marker) > 2  # and points drawn with it
    assert max(len(line) for line in figure.splitlines()) <= 90
    # Without progress all points are one series.
    plain = envelope_plot(g, hessian, fit, width=90)
    assert "** probes" in plain and "early" not in plain


def y_ticks(figure: str) -> list[float]:
    return [float(line.split("┤")[0]) for line in figure.splitlines() if "┤" in line]


def test_series_plot_draws_every_series(synthetic):
    figure = series_plot(smoothprof.read_trajectory(synthetic), width=100)
    for title in ("loss", "gradient norm", "smoothness", "step size (learning rate)"):
        assert title in [line.strip() for line in figure.splitlines()]
    for legend in ("train loss", "probe loss", "||Hessian|| (Lanczos)", "finite diff."):
        assert legend in figure
    share = np.mean([s < 150 or s % 7 == 0 for s in range(STEPS)])
    assert f"share of clipped steps, % over the last 12 step(s) ({share:.0%} of all 600" in figure
    # The step size spans a factor 4 only: a linear axis whose ticks rise from bottom to top.
    lr_panel = figure.split("step size (learning rate)")[1].split("share of clipped")[0]
    ticks = y_ticks(lr_panel)
    assert ticks == sorted(ticks, reverse=True) and ticks[0] <= 0.06


def test_constant_series_has_rising_ticks(tmp_path):
    # plotext's log axis inverts the ticks of a constant series; the panel is linear instead.
    path = tmp_path / "constant.h5"
    with smoothprof.TrajectoryWriter(path) as writer:
        for step in range(20):
            writer.append_train(
                {"step": step, "loss": 1.0, "grad_norm": 1.0, "lr": 0.03, "clipped": False}
            )
    figure = series_plot(smoothprof.read_trajectory(path), width=80)
    for panel in figure.split("step\n")[:-1]:
        ticks = y_ticks(panel)
        assert ticks == sorted(ticks, reverse=True), panel
    assert "(0% of all 20 steps)" in figure


# --- tables ------------------------------------------------------------------------------------


def test_ascii_tables_are_ascii_at_the_width_asked_for(synthetic):
    probes = smoothprof.read_trajectory(synthetic).probes
    fit = smoothprof.fit_envelope(probes["grad_norm"], probes["hessian_norm"], num_bootstrap=20)
    recs = smoothprof.recommend(fit, grad_noise=NOISE, num_steps=STEPS)
    assert any("τ" in rule.title for rule in recs.rules)  # something to translate
    for width in (50, 80):
        console = Console(width=width, file=io.StringIO(), color_system=None)
        console.print(fit_summary(fit, "hvp", [str(synthetic)], grad_noise=NOISE, ascii_only=True))
        console.print(recommendations_view(recs, ascii_only=True))
        text = console.file.getvalue()
        assert text.isascii()
        assert max(len(line) for line in text.splitlines()) <= width
        assert "gradient noise tau" in text and "clip_grad_norm_" in text


# --- through the CLI ---------------------------------------------------------------------------


def test_fit_reports_the_noise_and_warns_when_the_clip_threshold_is_below_it(synthetic):
    data = json.loads(invoke("fit", synthetic, "--json").stdout)
    assert data["grad_noise"] == NOISE and data["num_steps"] == STEPS
    assert data["clip_threshold"] < NOISE
    assert any(w.startswith("the gradient noise τ = 10 exceeds") for w in data["warnings"])
    sgd = next(r for r in data["recommendations"] if r["rule"] == "clipped-sgd")
    assert "Theorem 7" in sgd["source"] and f"T = {STEPS}" in sgd["note"]
    assert data["predicted_speedup"] > 1 and data["fixed_step_observed"] > 0
    assert len(data["caveats"]) == 3

    text = invoke("fit", synthetic, "--width", "100").stdout
    assert "gradient noise τ" in text
    assert "assumptions of rules" in text and "almost surely; T steps" in text
    assert "warning: the gradient noise τ = 10 exceeds the headline clip" in text
    assert "ratio of worst-case bounds" in " ".join(text.split())  # labelled: not a promise
    assert "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=" in text
    assert "optimizer = torch.optim.SGD(model.parameters(), lr=" in text


def test_the_docs_document_exactly_the_json_keys(synthetic):
    doc = (Path(__file__).resolve().parent.parent / "docs" / "commands.md").read_text()
    section = doc.split("## `smoothprof fit --json`")[1].split("\n## ")[0]
    documented = set()
    for row in section.splitlines():
        if row.startswith("| `"):
            documented |= set(re.findall(r"`(\w+)`", row.split("|")[1]))
    data = json.loads(invoke("fit", synthetic, "--json").stdout)
    assert documented == set(data)
    statistics_row = next(r for r in section.splitlines() if r.startswith("| `statistics`"))
    assert set(re.findall(r"`(\w+)`", statistics_row.split("|")[2])) == set(data["statistics"])


def test_width_comes_from_columns_else_100(synthetic):
    for command in ("fit", "plot"):
        for env, width in [({"COLUMNS": "72"}, 72), ({}, 100), ({"COLUMNS": "wide"}, 100)]:
            os_env = {"COLUMNS": None, **env}  # CliRunner removes a variable set to None
            result = invoke(command, synthetic, env=os_env)
            assert result.exit_code == 0, result.output
            lines = result.stdout.splitlines()
            laid_out = [line for line in lines if not line.startswith("  smoothprof")]
            assert max(len(line) for line in laid_out) == width, (command, env)
            assert all(line == line.rstrip() for line in lines)


def test_no_escape_code_in_a_log_even_when_rich_is_told_to_force_colour(synthetic):
    env = {"COLUMNS": "100", "FORCE_COLOR": "1", "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1"}
    for command in ("fit", "plot"):
        result = invoke(command, synthetic, env=env)
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.stdout


PTY_SCRIPT = """
import os, sys
from smoothprof.cli import app
os.environ.pop("NO_COLOR", None)
calls = [(["fit"], False), (["fit"], True), (["plot"], False), (["fit", "--ascii"], False)]
for args, no_color in calls:
    if no_color:
        os.environ["NO_COLOR"] = "1"
    else:
        os.environ.pop("NO_COLOR", None)
    app([*args, sys.argv[1], "--bootstrap", "0"] if args[0] == "fit" else [*args, sys.argv[1]],
        standalone_mode=False)
    sys.stdout.flush()
    os.write(1, b"@@END@@")
"""


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_colour_only_on_a_terminal_without_no_color(synthetic):
    import pty

    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "100", "TERM": "xterm-256color"}
    process = subprocess.Popen(
        [sys.executable, "-c", PTY_SCRIPT, str(synthetic)],
        stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 1 << 16)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert process.wait(timeout=60) == 0, process.stderr.read().decode()
    fit_tty, fit_no_color, plot_tty, fit_ascii, rest = b"".join(chunks).split(b"@@END@@")
    assert b"\x1b[" in fit_tty and b"\x1b[" in plot_tty  # a terminal gets colour
    assert b"\x1b[" not in fit_no_color and b"L0" in fit_no_color  # NO_COLOR: none at all
    assert b"\x1b[" not in fit_ascii and fit_ascii.isascii() and b"clip_grad_norm_" in fit_ascii
    assert not rest.strip()


@pytest.fixture(scope="module")
def unclipped_profile(tmp_path_factory):
    """An unclipped SGD profile at lr 0.2 whose first eight probes hide the correlation: the
    gradient norm falls while the smoothness rises, then both fall together."""
    path = tmp_path_factory.mktemp("display") / "profile.h5"
    early_g, early_L = np.geomspace(0.06, 0.03, 8), np.geomspace(3.0, 10.0, 8)
    late_g = np.geomspace(0.5, 0.05, 22)
    late_L = (1.0 + 4.0 * late_g) * np.random.default_rng(2).uniform(0.7, 1.0, late_g.size)
    g, L = np.concatenate([early_g, late_g]), np.concatenate([early_L, late_L])
    config = {"steps": 300, "lr": 0.2, "clip": None, "optimizer": "sgd"}
    attributes = {"config": config, "model_file": "model.py"}
    with smoothprof.TrajectoryWriter(path, attributes=attributes) as writer:
        for i in range(g.size):
            writer.append_probe(
                {"step": 10 * i, "loss": 1.0, "grad_norm": g[i], "hessian_norm": L[i],
                 "hessian_eig": L[i], "hvp_count": 5, "hessian_converged": True}
            )  # fmt: skip
    return path


def test_fit_headlines_the_measured_rule_with_its_sweep(unclipped_profile):
    data = json.loads(invoke("fit", unclipped_profile, "--json", "--skip-steps", 80).stdout)
    assert data["headline"]["rule"] == "clipped-measured"
    assert data["clip_threshold"] == pytest.approx(data["L0"] / data["L1"])
    assert data["step_size"] == pytest.approx(1.0)  # 5 x the profiling lr 0.2
    assert data["sweep_lrs"] == pytest.approx([0.2, 0.4, 1.0, 2.0, 4.0])
    assert data["recommendations"][0] == data["headline"]
    assert "[measured]" in data["headline"]["source"]
    shown = invoke("fit", unclipped_profile, "--width", "200", "--skip-steps", 80).stdout
    text = " ".join(shown.split())
    clip = f"{data['clip_threshold']:.6g}"
    for lr in ("0.2", "0.4", "1", "2", "4"):
        assert f"smoothprof run model.py --clip {clip} --lr {lr} --probe-every 0" in text
    assert "smoothprof compare clip_lr*.h5" in text


def test_fit_says_the_stochastic_rule_misses_the_gradient_noise(unclipped_profile):
    """A profile on one probe batch records no gradient noise; its steps T are known."""
    data = json.loads(invoke("fit", unclipped_profile, "--json").stdout)
    assert data["grad_noise"] is None and data["num_steps"] == 300
    [warning] = [w for w in data["warnings"] if "Theorem 7" in w]
    assert "the gradient noise τ was not measured" in warning
    assert "--probe-batches 2 or more" in warning and "number of training steps" not in warning


def test_fit_points_to_skip_steps_when_only_the_first_steps_hide_the_correlation(
    unclipped_profile,
):
    data = json.loads(invoke("fit", unclipped_profile, "--json").stdout)
    assert data["statistics"]["spearman_log"] <= 0.3
    hint = next(w for w in data["warnings"] if "--skip-steps" in w)
    skip = int(re.search(r"--skip-steps (\d+)", hint).group(1))
    assert 10 <= skip <= 80  # at most the first third of the 30 probes
    later = json.loads(invoke("fit", unclipped_profile, "--json", "--skip-steps", skip).stdout)
    assert later["statistics"]["spearman_log"] > 0.5
    assert not any("--skip-steps" in w for w in later["warnings"])


def test_fit_keeps_the_lr_of_a_clipped_profile(synthetic):
    data = json.loads(invoke("fit", synthetic, "--json").stdout)
    assert data["headline"]["rule"] == "clipped-measured"
    assert data["step_size"] == pytest.approx(0.05)  # the config's lr: that run was clipped
    assert any("clipped at 1" in w and "keeps its lr" in w for w in data["warnings"])
