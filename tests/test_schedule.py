"""Which steps are probed: every probe asked for, a fit from every default run, never the clock."""

import json
import math

import h5py
import numpy as np
import pytest
from conftest import ASSETS
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from smoothprof.cli import app
from smoothprof.cost import ProbeWork, ProbingCost, first_probe_note, probe_work
from smoothprof.schedule import (
    BUDGET_FLOOR,
    DEFAULT_NUM_PROBES,
    as_schedule,
    budget_floor_steps,
    evenly_chosen,
    planned_probe_steps,
    spread_steps,
)
from smoothprof.train import ConfigError, RunConfig

pytestmark = pytest.mark.usefixtures("clean_sys_path")
runner = CliRunner()
CONTRACT_ONLY = ASSETS / "contract_only_mlp.py"


def invoke(*args):
    """The CLI as a user meets it: no environment that changes a default."""
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "100"})


@given(st.integers(0, 20_000), st.integers(0, 200))
def test_spread_steps_takes_exactly_the_probes_asked_for(num_steps, num_probes):
    steps = spread_steps(num_steps, num_probes)
    assert len(steps) == min(num_steps, num_probes)
    assert list(steps) == sorted(set(steps))
    assert all(0 <= s < num_steps for s in steps)
    if len(steps) >= 2:  # the whole run: its first step and its last
        assert steps[0] == 0 and steps[-1] == num_steps - 1
    if num_probes >= 8 and num_steps >= 4 * num_probes:
        # spread: every quarter of the run holds probes, and the first tenth holds more than
        # its share (log-spaced half: dense early)
        quarters = np.histogram(steps, bins=4, range=(0, num_steps))[0]
        assert (quarters > 0).all()
        assert sum(s < num_steps / 10 for s in steps) > len(steps) / 10


def test_default_schedule_gives_twenty_probes_to_any_run_of_a_hundred_steps():
    for num_steps in (100, 101, 150, 500, 2000, 10**6):
        config = RunConfig.from_options({}, {"steps": num_steps})
        assert config.probe_schedule == "auto" and config.max_overhead is None
        assert len(planned_probe_steps(config)) >= 20


def test_evenly_chosen_and_as_schedule():
    assert evenly_chosen(list(range(0, 101, 10)), 3) == (0, 50, 100)
    assert evenly_chosen([1, 2], 5) == (1, 2)
    due = as_schedule(range(0, 30, 7))
    assert [s for s in range(30) if due(s)] == [0, 7, 14, 21, 28]


@pytest.mark.parametrize(
    ("defaults", "given", "expected"),
    [
        ({}, {}, ("auto", None, DEFAULT_NUM_PROBES)),
        ({}, {"probe_every": 5}, ("every", 5, DEFAULT_NUM_PROBES)),
        ({}, {"probe_schedule": "every"}, ("every", 10, DEFAULT_NUM_PROBES)),
        ({}, {"num_probes": 12}, ("auto", None, 12)),
        ({}, {"probe_every": 0, "probe_schedule": "log"}, ("log", 0, DEFAULT_NUM_PROBES)),
        # the command line's schedule options replace the file's, all of them
        ({"probe_every": 25}, {"num_probes": 40}, ("auto", None, 40)),
        ({"probe_schedule": "log", "probes_per_decade": 4}, {"probe_every": 3}, ("every", 3, 30)),
        ({"probe_every": 25}, {"steps": 90}, ("every", 25, DEFAULT_NUM_PROBES)),
    ],
)
def test_schedule_options_resolve(defaults, given, expected):
    config = RunConfig.from_options(defaults, given)
    assert (config.probe_schedule, config.probe_every, config.num_probes) == expected


@pytest.mark.parametrize(
    "given",
    [
        {"probe_schedule": "log", "probe_every": 5},
        {"probe_schedule": "auto", "probe_every": 5},
        {"probe_every": 5, "num_probes": 20},
        {"probe_schedule": "every", "probes_per_decade": 3},
        {"probe_schedule": "log", "num_probes": 20},
    ],
)
def test_an_option_the_schedule_would_not_use_is_an_error(given):
    with pytest.raises(ConfigError, match="not apply to probe_schedule"):
        RunConfig.from_options({}, given)


def test_cli_refuses_options_the_schedule_would_ignore(tmp_path):
    result = invoke(
        "run", CONTRACT_ONLY, "-o", tmp_path / "x.h5", "--probe-every", "5", "--num-probes", "9"
    )
    assert result.exit_code == 2
    assert "--num-probes" in result.output and not (tmp_path / "x.h5").exists()


def test_budget_floor_is_spread_over_the_planned_probes():
    config = RunConfig.from_options({}, {"steps": 1000, "max_overhead": 0.1})
    floor = budget_floor_steps(config)
    planned = planned_probe_steps(config)
    assert len(floor) == BUDGET_FLOOR and set(floor) <= set(planned)
    assert floor[0] == 0 and floor[-1] == 999


def _probe_rows(path):
    with h5py.File(path, "r") as handle:
        return {key: handle["probes"][key][()] for key in handle["probes"]}


def _fit_json(path):
    result = invoke("fit", path, "--json", "--bootstrap", "0")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_contract_only_file_at_the_defaults_gets_every_probe_and_a_fit(tmp_path):
    out = tmp_path / "defaults.h5"
    result = invoke("run", CONTRACT_ONLY, "-o", out)
    assert result.exit_code == 0, result.output
    rows = _probe_rows(out)
    assert list(rows["step"]) == list(spread_steps(500, DEFAULT_NUM_PROBES))
    assert f"{DEFAULT_NUM_PROBES} probes" in result.stdout
    assert "probing took" in result.stdout and "% of the run" in result.stdout
    assert "HVPs on 4 batches" in result.stdout and "training steps" in result.stdout
    fit = _fit_json(out)
    assert fit["statistics"]["num_points"] == DEFAULT_NUM_PROBES
    assert fit["clip_threshold"] > 0 and fit["step_size"] > 0


def test_contract_only_file_gets_the_probes_of_probe_every(tmp_path):
    out = tmp_path / "every.h5"
    result = invoke(
        "run", CONTRACT_ONLY, "-o", out, "--steps", "200", "--probe-every", "10", "--lr", "0.2"
    )
    assert result.exit_code == 0, result.output
    assert list(_probe_rows(out)["step"]) == list(range(0, 200, 10))
    assert "20 probes" in result.stdout and "skipped" not in result.stdout
    assert _fit_json(out)["statistics"]["num_points"] == 20


def test_a_hundred_step_default_run_gets_twenty_probes_and_a_fit(tmp_path):
    out = tmp_path / "short.h5"
    result = invoke("run", CONTRACT_ONLY, "-o", out, "--steps", "100")
    assert result.exit_code == 0, result.output
    steps = _probe_rows(out)["step"]
    assert len(steps) >= 20 and steps[-1] == 99
    assert _fit_json(out)["statistics"]["num_points"] == len(steps)


def test_the_same_command_twice_probes_the_same_steps_with_the_same_values(tmp_path):
    runs = []
    for name in ("first", "second"):
        out = tmp_path / f"{name}.h5"
        result = invoke("run", CONTRACT_ONLY, "-o", out, "--steps", "120", "--num-probes", "12")
        assert result.exit_code == 0, result.output
        runs.append(_probe_rows(out))
    first, second = runs
    assert set(first) == set(second)
    for key in first:
        if key != "seconds":  # timings aside
            np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def test_a_time_budget_keeps_the_floor_and_says_so_before_training(tmp_path, monkeypatch):
    out = tmp_path / "budget.h5"
    # A budget of almost nothing: every probe beyond the floor is over it.
    result = invoke(
        "run", CONTRACT_ONLY, "-o", out, "--steps", "100", "--probe-every", "1",
        "--max-overhead", "1e-9",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    header = result.stderr.splitlines()[1]
    assert "time budget" in header and f"beyond {BUDGET_FLOOR}" in header
    steps = list(_probe_rows(out)["step"])
    config = RunConfig.from_options({}, {"steps": 100, "probe_every": 1, "max_overhead": 1e-9})
    assert steps == list(budget_floor_steps(config))
    assert f"skipped {100 - BUDGET_FLOOR} due probes" in result.stdout
    assert _fit_json(out)["statistics"]["num_points"] == BUDGET_FLOOR


def test_fit_on_too_few_points_says_how_to_get_more(tmp_path):
    out = tmp_path / "two.h5"
    result = invoke("run", CONTRACT_ONLY, "-o", out, "--steps", "20", "--num-probes", "2")
    assert result.exit_code == 0, result.output
    fitted = invoke("fit", out)
    assert fitted.exit_code == 1
    lines = fitted.output.strip().splitlines()
    assert len(lines) == 1 and "got 2" in lines[0] and "--num-probes" in lines[0]


def test_an_expensive_first_probe_gets_a_projection_and_the_options_that_cut_it(
    tmp_path, monkeypatch
):
    import smoothprof.cost

    monkeypatch.setattr(smoothprof.cost, "EXPENSIVE_SECONDS", 0.0)  # any projection counts
    out = tmp_path / "costly.h5"
    result = invoke("run", CONTRACT_ONLY, "-o", out, "--steps", "100", "--num-probes", "40")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: the first")]
    assert len(notes) == 1, result.stderr
    for option in ("--num-probes 13", "--probe-batches 1", "--max-hvps 20", "--estimators fd"):
        assert option in notes[0]
    assert len(_probe_rows(out)["step"]) == 40  # said, not acted on


def test_first_probe_note_only_when_probing_dwarfs_training():
    work = ProbeWork(2.0, 41.0, 4)
    common = {"num_probes": 30, "num_steps": 500, "work": work, "cuts": ["--num-probes 10"]}
    note = first_probe_note(probe_seconds=599.0, step_seconds=0.1, **common)
    assert note is not None
    assert "599 s" not in note and "10 min" in note  # durations in readable units
    assert "5.0 h" in note and "50 s of training" in note and "5,990 training steps" in note
    assert "--num-probes 10" in note
    # cheap against training, or cheap in absolute terms: nothing to say
    assert first_probe_note(probe_seconds=1.0, step_seconds=0.1, **common) is None
    assert first_probe_note(probe_seconds=0.5, step_seconds=0.0001, **common) is None


def test_probing_cost_counts_and_shares():
    work = probe_work([10, 13], num_batches=4, estimators=("fd", "hvp", "curvature"),
                      num_fd_points=2)  # fmt: skip
    assert (work.gradients, work.hvps) == (3.0, 12.5)
    cost = ProbingCost(num_probes=20, probe_seconds=3.0, run_seconds=5.0, steps_done=200,
                       work=work)  # fmt: skip
    assert cost.share == pytest.approx(0.6)
    assert cost.steps_per_probe == pytest.approx((3.0 / 20) / (2.0 / 200))
    text = cost.summary()
    assert "60% of the run" in text and "3 gradients and 12.5 HVPs on 4 batches" in text
    assert "the time of 15 training steps" in text
    single = probe_work([1], num_batches=1, estimators=("hvp",), num_fd_points=1)
    assert single.describe() == "1 gradient and 1 HVP on 1 batch"
    assert math.isnan(ProbingCost(0, 0.0, 1.0, 10, single).steps_per_probe)


def test_probe_chooses_its_hvp_method_by_trying_not_timing(monkeypatch):
    """The HVP method is the first of HVP_METHODS that works: no clock decides it."""
    import torch
    from torch import nn

    import smoothprof.probe
    from smoothprof import Probe

    def timed(*args, **kwargs):
        raise AssertionError("the probe timed the HVP methods")

    monkeypatch.setattr(smoothprof.probe, "fastest_hvp_method", timed)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    batches = [(torch.randn(8, 3), torch.randint(0, 2, (8,))) for _ in range(2)]
    loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    probe = Probe(model, loss_fn, batches, every=1)
    with probe.around_step(0):
        pass
    assert probe.hvp_method == "double-backward"  # two batches: the graph is not retained
    single = Probe(model, loss_fn, batches[:1], every=1)
    with single.around_step(0):
        pass
    assert single.hvp_method == "retained"
