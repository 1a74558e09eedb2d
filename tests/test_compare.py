"""`smoothprof compare`: the smoothing, the target crossing, the table, the plot and the JSON."""

import json
import math
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from smoothprof.cli import app
from smoothprof.compare import (
    CompareError,
    compare_runs,
    default_target,
    first_step_at_or_below,
    trailing_mean,
)
from smoothprof.trajectory import TrajectoryWriter

runner = CliRunner()


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "100", **(env or {})})


@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=40),
    st.integers(1, 12),
)
def test_trailing_mean_is_the_mean_of_the_last_window_values(values, window):
    got = trailing_mean(np.array(values), window)
    want = [np.mean(values[max(0, i + 1 - window) : i + 1]) for i in range(len(values))]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-6)


def test_trailing_mean_marks_windows_holding_a_non_finite_value():
    got = trailing_mean(np.array([1.0, math.inf, 3.0, 5.0, 7.0]), 2)
    assert got[0] == 1.0 and np.isnan(got[1]) and np.isnan(got[2])
    assert got[3:].tolist() == [4.0, 6.0]  # the inf left the window: later means recover
    with pytest.raises(CompareError):
        trailing_mean(np.array([1.0]), 0)


def test_first_crossing_and_default_target():
    steps = np.array([0, 5, 10, 15])
    assert first_step_at_or_below(steps, np.array([4.0, 2.0, 1.0, 0.5]), 1.0) == 10
    assert first_step_at_or_below(steps, np.array([4.0, np.nan, 3.0, 2.0]), 1.0) is None
    both = default_target([4.0, 3.0], [1.0, 2.0])  # 10% of the way from 2 up to 3
    assert both.value == pytest.approx(2.1) and both.suited == (0, 1) and both.note == ""
    assert default_target([-1.0], [-2.0]).value == pytest.approx(-1.9)
    # A run that ended above where it started, or without a finite loss, does not set the bar.
    worse = default_target([4.6, 4.6, 4.6], [1.5, 19.0, math.nan], ["good", "worse", "nan"])
    assert worse.value == pytest.approx(1.5 + 0.1 * 3.1) and worse.suited == (0,)
    assert worse.note == (
        "no target suits every run: worse never went down; nan has no finite loss at its start "
        "or end; this one suits 1 of the 3 runs"
    )
    none = default_target([4.6, 4.6], [5.0, 19.0])
    assert none.value is None and "no run's smoothed loss went down" in none.rule
    assert "--target" in none.note


def _columns(losses):
    return {"step": np.arange(len(losses)), "loss": np.asarray(losses, dtype=np.float64)}


def test_runs_are_compared_on_the_smoothed_loss():
    fast = np.concatenate([np.linspace(3.0, 1.0, 20), np.full(80, 1.0)])
    slow = np.linspace(3.0, 1.5, 100)
    noisy = fast.copy()
    noisy[5] = 0.1  # one lucky minibatch: the raw loss crosses, the trailing mean does not
    comparison = compare_runs(
        ["fast", "slow", "noisy"],
        [_columns(fast), _columns(slow), _columns(noisy)],
        [
            {"lr": 0.5, "clip": 1.0, "optimizer": "sgd"},
            {"lr": 0.1, "clip": None, "optimizer": "momentum"},
            {},
        ],
        window=4,
        target=1.4,
    )
    fast_run, slow_run, noisy_run = comparison.runs
    assert (fast_run.lr, fast_run.clip, fast_run.optimizer) == (0.5, 1.0, "sgd")
    assert (slow_run.lr, slow_run.clip, slow_run.optimizer) == (0.1, None, "momentum")
    assert (noisy_run.lr, noisy_run.clip, noisy_run.optimizer) == (None, None, None)
    assert fast_run.final_loss == pytest.approx(1.0)
    assert slow_run.final_loss == pytest.approx(np.mean(slow[-5:]))  # the last 5% of 100 rows
    # The trailing mean of 4 crosses 1.4 a few steps after the raw loss does.
    assert first_step_at_or_below(np.arange(100), fast, 1.4) < fast_run.steps_to_target
    assert fast_run.steps_to_target == first_step_at_or_below(
        np.arange(100), trailing_mean(fast, 4), 1.4
    )
    assert noisy_run.steps_to_target == fast_run.steps_to_target  # not step 5
    assert slow_run.steps_to_target is None  # it ends at 1.5
    # The default target is one every run reaches by its end.
    default = compare_runs(["fast", "slow"], [_columns(fast), _columns(slow)], [{}, {}], window=4)
    worst = max(run.final_smoothed_loss for run in default.runs)
    assert default.target == pytest.approx(worst + 0.1 * (3.0 - worst))  # both start at 3
    assert all(run.steps_to_target is not None for run in default.runs)
    assert 0 < default.runs[0].steps_to_target < default.runs[1].steps_to_target
    assert "10% of the way" in default.target_rule and default.target_note == ""


def test_diverged_and_failed_runs_are_left_out_of_the_default_target():
    good = np.linspace(2.0, 1.0, 50)
    bad = np.concatenate([np.linspace(2.0, 1.8, 9), [math.inf]])
    worse = np.linspace(2.0, 12.0, 50)  # finite, but far above where it started
    comparison = compare_runs(
        ["good", "bad", "worse"],
        [_columns(good), _columns(bad), _columns(worse)],
        [{}, {}, {}],
        diverged_at=[None, 9, None],
    )
    final = comparison.runs[0].final_smoothed_loss
    assert comparison.target == pytest.approx(final + 0.1 * (2.0 - final))
    assert comparison.runs[1].steps_to_target is None
    assert "bad has no finite loss" in comparison.target_note
    assert "worse never went down" in comparison.target_note
    assert comparison.runs[1].diverged_at_step == 9
    assert comparison.runs[2].steps_to_target is None
    with pytest.raises(CompareError, match="no training rows"):
        compare_runs(["empty"], [{}], [{}])


def test_the_default_target_lies_below_every_start_when_the_losses_barely_fall():
    """Cross-entropy over 10 classes falling from 2.30 to 2.20 and 2.25 in a short run: 10% of
    the final loss above it would lie above both starts (steps to target 0 for every run)."""
    steps = np.arange(400)
    fast = 2.2 + 0.1 * np.exp(-steps / 40)
    slow = 2.25 + 0.05 * np.exp(-steps / 80)
    comparison = compare_runs(["fast", "slow"], [_columns(fast), _columns(slow)], [{}, {}])
    assert comparison.target_note == ""
    assert all(run.final_smoothed_loss <= comparison.target for run in comparison.runs)
    assert comparison.target < min(fast[0], slow[0])
    fast_run, slow_run = comparison.runs
    assert 0 < fast_run.steps_to_target < slow_run.steps_to_target


def test_a_run_that_ends_above_where_another_starts_gets_a_note():
    steps = np.arange(200)
    first = 0.5 + 1.5 * np.exp(-steps / 20)  # 2.0 down to 0.5
    second = 0.8 + 1.4 * np.exp(-steps / 30)  # 2.2 down to 0.8
    third = 3.0 + 2.0 * np.exp(-steps / 20)  # 5.0 down to 3.0: above where the others start
    comparison = compare_runs(
        ["a/first.h5", "a/second.h5", "a/third.h5"],
        [_columns(first), _columns(second), _columns(third)],
        [{}, {}, {}],
    )
    final = comparison.runs[1].final_smoothed_loss  # the worst of the two it suits
    assert comparison.target == pytest.approx(final + 0.1 * (2.0 - final))
    assert comparison.target_note == (
        "no target suits every run: third.h5 ends at or above where first.h5 starts; this one "
        "suits 2 of the 3 runs"
    )
    assert "of the 2 runs it suits" in comparison.target_rule
    reached = [run.steps_to_target for run in comparison.runs]
    assert reached[0] > 0 and reached[1] > 0 and reached[2] is None
    # Two runs that no level suits together: the lower one sets the target, the other is noted.
    low, high = 0.5 + 1.5 * np.exp(-steps / 20), 3.0 + 2.0 * np.exp(-steps / 20)
    apart = compare_runs(["low", "high"], [_columns(low), _columns(high)], [{}, {}])
    assert apart.target < 2.0 and apart.runs[1].steps_to_target is None
    assert "high ends at or above where low starts" in apart.target_note
    # A run that starts below where two others end: its 0 steps to target are explained.
    early = compare_runs(
        ["late", "early", "also_late"],
        [_columns(third), _columns(first), _columns(third + 0.1)],
        [{}, {}, {}],
    )
    assert early.target > 3.1 and early.runs[1].steps_to_target == 0
    assert early.target_note == (
        "no target suits every run: early starts at or below where also_late ends; this one "
        "suits 2 of the 3 runs"
    )


def _trajectory(path, losses, config, probe_steps=(), diverged_at=None):
    with TrajectoryWriter(path, attributes={"config": config}) as writer:
        for step, loss in enumerate(losses):
            writer.append_train(
                {"step": step, "loss": loss, "grad_norm": 1.0, "lr": config.get("lr", 0.1)}
            )
        for step in probe_steps:
            writer.append_probe(
                {"step": step, "loss": losses[step], "grad_norm": 1.0, "hessian_norm": 2.0}
            )
        if diverged_at is not None:
            writer.set_attribute("diverged_at_step", diverged_at)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    steps = np.arange(200)
    clipped = _trajectory(
        folder / "clipped.h5",
        (3.0 * np.exp(-steps / 20) + 1.0).tolist(),
        {"lr": 0.5, "clip": 0.25, "optimizer": "sgd"},
        probe_steps=(0, 100, 199),
    )
    plain = _trajectory(
        folder / "plain.h5",
        (3.0 * np.exp(-steps / 60) + 1.0).tolist(),
        {"lr": 0.1, "clip": None, "optimizer": "sgd"},
    )
    diverged = _trajectory(
        folder / "diverged.h5",
        [4.0, 3.9, 3.8, math.inf],
        {"lr": 10.0, "clip": None, "optimizer": "sgd"},
        diverged_at=3,
    )
    return clipped, plain, diverged


def test_compare_table_and_plot(runs):
    clipped, plain, diverged = runs
    result = invoke("compare", clipped, plain, diverged, "--width", 90)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "\x1b[" not in out  # not a terminal: no escape codes
    assert max(len(line) for line in out.splitlines()) <= 90
    assert "training loss, trailing mean over 4 step(s)" in out
    assert "not reached" in out and "(diverged" in out
    cells = [line.split("│") for line in out.splitlines()]
    rows = {c[2].strip(): "│".join(c) for c in cells if len(c) == 10}  # the table's rows
    assert "0.25" in rows["clipped.h5"] and "0.5" in rows["clipped.h5"]  # clip, lr
    assert "none" in rows["plain.h5"] and "inf" in rows["diverged.h5"]
    assert "1 clipped.h5" in out and "3 diverged.h5" in out  # the plot's legend
    assert invoke("compare", clipped, plain, diverged, "--width", 90).stdout == out


def test_compare_json_and_target(runs):
    clipped, plain, _ = runs
    result = invoke("compare", clipped, plain, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"target", "target_rule", "target_note", "smoothing_window", "runs"}
    assert data["target_note"] == ""  # both runs start above it and reach it
    first, second = data["runs"]
    assert first["file"] == str(clipped) and first["clip"] == 0.25 and second["clip"] is None
    assert first["steps_to_target"] < second["steps_to_target"]  # faster decay: earlier
    assert first["last_probe_step"] == 199 and second["last_probe_loss"] is None
    low = json.loads(invoke("compare", clipped, plain, "--json", "--target", "1.01").stdout)
    assert low["target"] == 1.01 and low["target_rule"] == "given (--target)"
    assert low["runs"][1]["steps_to_target"] is None
    table = invoke("compare", clipped, plain, "--target", "1.01", "--no-plot").stdout
    assert "not reached" in table and "trailing 4 step(s)" in table
    assert "┌" not in table  # --no-plot: the table only


def test_compare_notes_the_runs_the_default_target_does_not_suit(tmp_path, runs):
    clipped, plain, _ = runs
    steps = np.arange(200)
    high = _trajectory(
        tmp_path / "high.h5", (6.0 + 2.0 * np.exp(-steps / 20)).tolist(), {"lr": 0.01}
    )
    result = invoke("compare", clipped, plain, high, "--no-plot", "--width", 120)
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert (
        "note: no target suits every run: high.h5 ends at or above where clipped.h5 starts; "
        "this one suits 2 of the 3 runs"
    ) in text
    data = json.loads(invoke("compare", clipped, plain, high, "--json").stdout)
    assert data["target_note"].startswith("no target suits every run: high.h5")
    assert [run["steps_to_target"] is None for run in data["runs"]] == [False, False, True]
    help_text = " ".join(invoke("compare", "--help").stdout.replace("│", " ").split())
    assert "every run starts above and reaches by its end" in help_text


def test_compare_ascii_and_width(runs):
    clipped, plain, _ = runs
    result = invoke("compare", clipped, plain, "--ascii", "--width", 60)
    assert result.exit_code == 0, result.output
    assert result.stdout.isascii()
    assert max(len(line) for line in result.stdout.splitlines()) <= 60


def test_compare_errors(runs, tmp_path):
    clipped, *_ = runs
    missing = invoke("compare", clipped, tmp_path / "missing.h5")
    assert missing.exit_code == 1 and "no such file" in missing.stderr
    assert len([line for line in missing.stderr.splitlines() if line.strip()]) == 1
    empty = _trajectory(tmp_path / "empty.h5", [], {})
    no_rows = invoke("compare", empty)
    assert no_rows.exit_code == 1 and re.search("no training rows", no_rows.stderr)
    assert invoke("compare", clipped, "--target", "nan").exit_code == 2
    assert invoke("compare", clipped, "--window", "0").exit_code == 2
