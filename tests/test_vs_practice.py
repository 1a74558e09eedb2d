"""The practitioners' clippers of benchmarks/vs_practice.py, against their definitions."""

import statistics

import numpy as np
import pytest
import torch
from conftest import benchmark_module


@pytest.fixture(scope="module")
def vs_practice():
    yield from benchmark_module("vs_practice")


def _gradient(norm):
    parameter = torch.zeros(4, requires_grad=True)
    parameter.grad = torch.tensor([norm, 0.0, 0.0, 0.0])
    return [parameter]


def test_autoclip_clips_at_the_percentile_of_the_norms_seen_so_far(vs_practice):
    clip = vs_practice.AutoClip(percentile=10)
    norms = [5.0, 1.0, 3.0, 10.0, 2.0]
    after = []
    for norm in norms:
        parameters = _gradient(norm)
        clip(parameters)
        after.append(float(parameters[0].grad.norm()))
    for i, norm in enumerate(norms):
        threshold = float(np.percentile(norms[: i + 1], 10))
        assert after[i] == pytest.approx(min(norm, threshold), rel=1e-5)


def test_zclip_waits_its_warmup_then_clips_z_score_outliers(vs_practice):
    clip = vs_practice.ZClip(warmup_steps=5)
    for norm in [1.0, 1.2, 0.8, 1.1, 0.9]:  # the warm-up: no clipping, then the EMA starts
        parameters = _gradient(norm)
        clip(parameters)
        assert float(parameters[0].grad.norm()) == pytest.approx(norm)
    mean = statistics.fmean([1.0, 1.2, 0.8, 1.1, 0.9])
    std = statistics.fmean((x - mean) ** 2 for x in [1.0, 1.2, 0.8, 1.1, 0.9]) ** 0.5
    assert clip.mean == pytest.approx(mean) and clip.var**0.5 == pytest.approx(std)
    parameters = _gradient(1.05)  # within 2.5 standard deviations: untouched
    clip(parameters)
    assert float(parameters[0].grad.norm()) == pytest.approx(1.05)
    mean, std = clip.mean, clip.var**0.5
    parameters = _gradient(10.0)  # a spike: clipped to mean + z_thresh·std / (z / z_thresh)
    clip(parameters)
    z = (10.0 - mean) / (std + 1e-6)
    expected = mean + 2.5 * std / (z / 2.5)
    assert float(parameters[0].grad.norm()) == pytest.approx(expected, rel=1e-4)
    assert clip.mean < 2.0  # the EMA took the clipped value, not the spike


def test_steps_to_target_uses_a_trailing_mean(vs_practice):
    losses = [5.0] * 10 + [1.0] * 30
    assert vs_practice.steps_to_target(losses, 1.0) == 30  # the first full window of 1.0
    assert vs_practice.steps_to_target(losses, 0.5) is None
    assert vs_practice.steps_to_target([float("nan")] * 25, 1.0) is None


def test_the_sweep_is_judged_per_seed_and_as_one_multiple(vs_practice):
    """The per-seed oracle takes each seed's best multiple; one multiple for every seed is the
    multiple with the best median: the knife edge a seed lands on does not count for it."""

    def run(seed, ours, sweeps):
        arms = [{"arm": "smoothprof", "held_out": ours, "steps_to_target": None}]
        arms += [
            {"arm": label, "held_out": 9.0, "steps_to_target": None}
            for label in ("finder", "finder+autoclip", "finder+zclip")
        ]
        arms += [
            {"arm": f"sweep x{factor:g}", "held_out": value, "steps_to_target": None}
            for factor, value in zip((1, 2, 4), sweeps)
        ]
        return {"model": "m", "seed": seed, "steps": 10, "finder_iterations": 5, "arms": arms,
                "finder_lr": 1.0,
                "profile": {"cost_steps": 50, "clip": None, "lr": 1.0, "rule": "r"}}  # fmt: skip

    results = [
        run(0, 1.0, (1.0, 0.1, 50.0)),  # x2 lands on the good side of an edge on this seed
        run(1, 1.0, (1.0, 50.0, 0.2)),  # x4 on this one
        run(2, 1.0, (0.95, 40.0, 45.0)),
    ]
    [row] = vs_practice.summarize(results)
    assert row["sweep best"]["held_out"] == 0.2  # per seed: 0.1, 0.2, 0.95
    assert not row["within_10pct_of_sweep"]
    assert row["sweep one multiple"] == {"arm": "sweep x1", "held_out": 1.0}  # medians 1, 40, 45
    assert row["within_10pct_of_one_multiple"]
    assert "m x1 1 (within 10%)" in vs_practice.lines_below_table([row])


def test_rounding_noise_is_the_median_change_of_the_finders_rerun(vs_practice):
    """The rerun from weights moved by rounding gives the noise a comparison is read against;
    a row behind the finders says by how much, beside it."""

    def run(seed, ours, autoclip, finder, rerun):
        held = {"smoothprof": ours, "finder": finder, "finder+autoclip": autoclip,
                "finder+zclip": 9.0, "sweep x1": finder, vs_practice.NOISE_ARM: rerun}  # fmt: skip
        arms = [{"arm": k, "held_out": v, "steps_to_target": None} for k, v in held.items()]
        return {"model": "m", "seed": seed, "steps": 10, "finder_iterations": 5, "arms": arms,
                "finder_lr": 1.0,
                "profile": {"cost_steps": 50, "clip": None, "lr": 1.0, "rule": "r"}}  # fmt: skip

    results = [run(0, 1.1, 1.0, 2.0, 2.2), run(1, 1.1, 1.0, 1.0, 0.9), run(2, 1.1, 1.0, 4.0, 4.0)]
    [row] = vs_practice.summarize(results)
    assert row["rounding_noise"] == pytest.approx(0.1)  # changes 10%, 10%, 0%
    assert not row["beats_finders"] and row["behind_finders"] == pytest.approx(0.1)
    line = vs_practice.table([row], markdown=True).splitlines()[-1]
    assert "| no (10% behind) | yes | 10.0% |" in line
    assert row["seeds_ahead"] == {"arm": "finder+autoclip", "ahead": 0, "seeds": 3}
    assert "m 0 of 3 (against finder+autoclip)" in " ".join(
        vs_practice.lines_below_table([row]).split()
    )
    # A seed whose rerun diverged has no relative change: the others decide.
    results[1]["arms"][-1]["held_out"] = float("inf")
    [row] = vs_practice.summarize(results)
    assert row["rounding_noise"] == pytest.approx(0.05)  # changes 10%, 0%
    assert vs_practice._percent(0.05) == "5.0%" and vs_practice._percent(1e-5) == "<0.1%"
    # A file written before the rerun arm existed reads as before.
    for r in results:
        r["arms"].pop()
    [row] = vs_practice.summarize(results)
    assert row["rounding_noise"] is None and "| - |" in vs_practice.table([row], True)
