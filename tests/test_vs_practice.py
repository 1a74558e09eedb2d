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
