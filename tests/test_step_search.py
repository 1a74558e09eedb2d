"""The step-size search: its choice (pure), its trials against a quadratic whose stability
threshold is known, and what `run` and `fit` do with it."""

import json
import math

import numpy as np
import pytest
import torch

from smoothprof.analysis import analyze
from smoothprof.fit import FitError, fit_envelope
from smoothprof.loading import load_model_file
from smoothprof.recommend import ProfilingRun, recommend
from smoothprof.step_search import (
    ATTRIBUTE,
    StepSizeSearch,
    Trial,
    best_trial,
    clipped_trials,
    confirm_steps_for,
    confirm_trials,
    measured_clip_threshold,
    run_trials,
    search_step_size,
    stability_step,
    trial_steps_for,
)
from smoothprof.train import RunConfig, prepare_run, train
from smoothprof.trajectory import read_trajectory
from tests.test_cli import invoke

# Full-batch least squares: f(w) = mean((Xw - y)^2) / 2 has the constant Hessian X'X/n, so
# gradient descent is stable exactly below 2/λ_max(X'X/n).
QUADRATIC = """
import torch
from torch import nn

def model():
    layer = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
    return layer

def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=g) * torch.tensor([3.0, 1.0, 0.3])
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5]])

def dataloader():
    return [_data()]

def loss(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean() / 2
"""


def quadratic_sharpness() -> float:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(32, 3, generator=g) * torch.tensor([3.0, 1.0, 0.3])).double()
    return float(torch.linalg.eigvalsh(x.T @ x / 32).max())


def test_stability_step_is_the_linear_stability_threshold():
    assert stability_step(4.0, optimizer="sgd") == 0.5
    assert stability_step(4.0, optimizer="momentum", momentum=0.5) == pytest.approx(0.75)
    assert stability_step(4.0, optimizer="adam") is None
    assert stability_step(float("nan"), optimizer="sgd") is None
    assert stability_step(0.0, optimizer="sgd") is None
    assert [trial_steps_for(n) for n in (10, 200, 500, 5000)] == [20, 20, 50, 500]


def test_trials_double_until_one_does_not_train_and_the_lowest_end_wins():
    ends = {0.25: 2.0, 0.5: 1.0, 1.0: 0.5, 2.0: 0.7, 4.0: 3.5, 8.0: 0.1}
    seen = []

    def trial(lr):
        seen.append(lr)
        return Trial(lr, 3.0, ends[lr])

    trials = run_trials(1.0, trial)
    assert seen == [0.25, 0.5, 1.0, 2.0, 4.0]  # 4.0 ends above its start: the last one
    search = StepSizeSearch(50, 1.0, "2/λ0", tuple(trials))
    assert search.best.lr == 1.0
    assert search.first_unstable.lr == 4.0
    assert search.total_steps == 250
    diverged = Trial(8.0, 3.0, math.inf, diverged_at=4)
    assert not diverged.stable
    assert StepSizeSearch(50, 1.0, "x", (*trials, diverged)).total_steps == 255
    assert len(run_trials(1.0, lambda lr: Trial(lr, 3.0, 1.0), max_trials=4)) == 4
    # The best at the smallest step: halving below it until a trial is no better.
    lower = {0.125: 0.5, 0.25: 0.4, 0.5: 2.9}
    lrs = [t.lr for t in run_trials(1.0, lambda lr: Trial(lr, 3.0, lower[lr]))]
    assert lrs == [0.125, 0.25, 0.5]
    # Past the best: a trial that keeps less than half the best trial's progress ends it.
    past = {0.25: 2.0, 0.5: 1.0, 1.0: 2.1, 2.0: 0.1}
    assert [t.lr for t in run_trials(1.0, lambda lr: Trial(lr, 3.0, past[lr]))] == [0.25, 0.5, 1.0]


def test_the_best_short_trial_is_confirmed_over_a_quarter_of_the_run():
    """A short trial favours a long step: the confirming trials, at half, once and twice the
    best short trial's step over a quarter of the run, choose; their steps count in the cost."""
    assert [confirm_steps_for(n) for n in (10, 80, 84, 300, 500)] == [None, None, 21, 75, 125]
    ends = {0.25: 2.0, 0.5: 1.0, 1.0: 0.5, 2.0: 4.0}
    short = tuple(Trial(lr, 3.0, end) for lr, end in ends.items())
    longer = {0.5: 0.2, 1.0: 0.3, 2.0: math.inf}
    seen = []

    def trial(lr):
        seen.append(lr)
        diverged = None if math.isfinite(longer[lr]) else 7
        return Trial(lr, 3.0, longer[lr], diverged_at=diverged)

    confirmations = confirm_trials(best_trial(short), trial)
    assert seen == [0.5, 1.0, 2.0]
    search = StepSizeSearch(50, 1.0, "2/λ0", short, confirm_steps=125,
                            confirmations=tuple(confirmations))  # fmt: skip
    assert search.best_of_short_trials.lr == 1.0
    assert search.best.lr == 0.5 and search.best_steps == 125
    assert search.total_steps == 4 * 50 + 2 * 125 + 8
    assert "over 125 steps (lr 0.5, 1, 2) lr 0.5 ends lowest" in search.summary()
    assert StepSizeSearch.from_json(json.loads(json.dumps(search.as_json()))) == search
    # A file written before the confirming trials reads as a search without them.
    old = {k: v for k, v in search.as_json().items() if k not in ("confirmations", "confirm_steps")}
    assert StepSizeSearch.from_json(old).best.lr == 1.0
    # The headline takes the confirmed step; its sweep includes every step that trained nearby.
    advice = recommend(_fit(*GROWING), profile=ProfilingRun(lr=0.1), search=search)
    assert advice.headline.step_size == 0.5
    assert "the best of 3 confirming trials of 125 steps around the best of 4 trials" in (
        advice.headline.note
    )
    assert advice.sweep_lrs == (0.25, 0.5, 1.0)
    # Short trials that trained, confirming trials that did not: no headline step, and why.
    failed = tuple(Trial(t.lr, 3.0, math.inf, diverged_at=3) for t in confirmations)
    nothing = StepSizeSearch(50, 1.0, "2/λ0", short, confirm_steps=125, confirmations=failed)
    advice = recommend(_fit(*GROWING), profile=ProfilingRun(lr=0.1), search=nothing)
    assert nothing.best is None and advice.headline.rule != "searched-step"
    assert any("none of its confirming trials (lr 0.5, 1, 2) did" in w for w in advice.warnings)


def test_an_unclipped_search_confirms_at_a_measured_clip_too():
    """Without a clip that acts, the search also confirms clipped at the probes' median gradient
    norm, at once, twice and four times the best unclipped confirming trial's step; the lowest
    of all confirming trials is the headline, with its clip, and the sweep keeps to that clip."""
    assert measured_clip_threshold([0.3, float("nan"), 0.1, 0.2, 0.0, 0.5]) == 0.25
    assert measured_clip_threshold([0.3, math.inf, 0.1]) is None  # too few measured
    short = (Trial(0.25, 3.0, 2.0), Trial(0.5, 3.0, 1.0), Trial(1.0, 3.0, 1.5))
    unclipped = (Trial(0.25, 3.0, 0.9), Trial(0.5, 3.0, 0.8), Trial(1.0, 3.0, 0.85))
    seen = []

    def trial(lr, clip):
        seen.append((lr, clip))
        ends = {0.5: 0.7, 1.0: 0.6, 2.0: math.inf}
        return Trial(lr, 3.0, ends[lr], diverged_at=None if lr < 2 else 9, clip=clip)

    clipped = clipped_trials(best_trial(unclipped), 0.2, trial)
    assert seen == [(0.5, 0.2), (1.0, 0.2), (2.0, 0.2)]
    search = StepSizeSearch(50, 1.0, "2/λ0", short, confirm_steps=125,
                            confirmations=(*unclipped, *clipped), measured_clip=0.2)  # fmt: skip
    assert (search.best.lr, search.clip_of(search.best)) == (1.0, 0.2)
    assert search.clip_of(unclipped[0]) is None
    assert search.total_steps == 3 * 50 + 5 * 125 + 10
    assert (
        "over 125 steps (lr 0.25, 0.5, 1; clipped at 0.2, the median gradient norm: 0.5, 1, 2) "
        "lr 1 clipped at 0.2 ends lowest (3 -> 0.6)"
    ) in search.summary()
    assert StepSizeSearch.from_json(json.loads(json.dumps(search.as_json()))) == search
    advice = recommend(_fit(*GROWING), profile=ProfilingRun(lr=0.1), search=search)
    assert (advice.headline.step_size, advice.headline.clip_threshold) == (1.0, 0.2)
    assert "the median gradient norm of the run's probes" in advice.headline.note
    assert "then clipped at 0.2" in advice.explanation
    unstable = StepSizeSearch(50, 1.0, "2/λ0", (*short, Trial(2.0, 3.0, math.inf, diverged_at=4)),
                              confirm_steps=125, confirmations=(*unclipped, *clipped),
                              measured_clip=0.2)  # fmt: skip
    advice = recommend(_fit(*GROWING), profile=ProfilingRun(lr=0.1), search=unstable)
    assert "lr 2 did not train unclipped (diverged at step 4)" in advice.explanation
    assert advice.sweep_lrs == (0.5, 1.0)  # the clipped trials that trained, not the unclipped
    # Where an unclipped trial ends lowest, the headline stays unclipped.
    worse = tuple(Trial(t.lr, 3.0, 0.95, clip=0.2) for t in clipped)
    search = StepSizeSearch(50, 1.0, "2/λ0", short, confirm_steps=125,
                            confirmations=(*unclipped, *worse), measured_clip=0.2)  # fmt: skip
    advice = recommend(_fit(*GROWING), profile=ProfilingRun(lr=0.1), search=search)
    assert (advice.headline.step_size, advice.headline.clip_threshold) == (0.5, None)
    assert advice.sweep_lrs == (0.25, 0.5, 1.0)


def test_a_search_survives_its_json_with_infinities():
    search = StepSizeSearch(
        20, 0.5, "2/λ0 with λ0 = 4 at step 0",
        (Trial(0.125, 2.0, 1.0), Trial(0.25, 2.0, math.inf, diverged_at=3)), clip=1.5,
        optimizer="sgd",
    )  # fmt: skip
    assert StepSizeSearch.from_json(json.loads(json.dumps(search.as_json()))) == search
    with pytest.raises(ValueError, match="not a step-size search"):
        StepSizeSearch.from_json({"trials": [{"lr": 1}]})


def test_on_a_quadratic_the_search_stops_at_the_stability_threshold(tmp_path):
    path = tmp_path / "quadratic.py"
    path.write_text(QUADRATIC)
    config = RunConfig.from_options({}, {"steps": 200, "lr": 0.01, "num_probes": 3})
    run = prepare_run(load_model_file(path), config)
    result = train(run)
    sharpness = quadratic_sharpness()
    first = result.probes[0]
    assert first.step == 0 and first.hessian_norm == pytest.approx(sharpness, rel=1e-3)
    search = search_step_size(run, first_hessian_norm=first.hessian_norm, at_step=0)
    threshold = 2 / sharpness
    assert search.stability_step == pytest.approx(threshold, rel=1e-3)
    assert search.trial_steps == 20
    lrs = [t.lr for t in search.trials]
    assert lrs == pytest.approx([threshold * 2.0**k for k in range(-2, len(lrs) - 2)], rel=1e-3)
    # Below the threshold every trial trains; at it the sharpest direction stops decaying (the
    # trial keeps less than half the best progress) and above it the loss grows: the search ends
    # there, and its best step is below the threshold.
    assert all(t.stable for t in search.trials if t.lr < 0.99 * threshold)
    assert 0.99 * threshold < search.trials[-1].lr < 2.01 * threshold
    assert search.best.lr < threshold
    # The run's own state is untouched: the model trained by the run keeps its weights.
    weights = run.model.weight.detach().clone()
    search_step_size(run, first_hessian_norm=first.hessian_norm, at_step=0)
    assert torch.equal(run.model.weight, weights)


def test_run_writes_the_search_and_fit_recommends_its_best_step(tmp_path):
    path = tmp_path / "quadratic.py"
    path.write_text(QUADRATIC)
    searched, plain = tmp_path / "searched.h5", tmp_path / "plain.h5"
    options = ("--steps", "100", "--lr", "0.01", "--num-probes", "10")
    result = invoke("run", path, "-o", searched, *options)
    assert result.exit_code == 0, result.output
    assert "step-size search: 3 trials of 20 steps from the initialization" in result.stdout
    assert invoke("run", path, "-o", plain, *options, "--no-lr-search").exit_code == 0
    with_search, without = read_trajectory(searched), read_trajectory(plain)
    # The search runs after training: the training rows are the same, bit for bit.
    for column in ("loss", "grad_norm"):
        assert np.array_equal(with_search.train[column], without.train[column])
    assert ATTRIBUTE not in without.attributes
    search = StepSizeSearch.from_json(json.loads(with_search.attributes[ATTRIBUTE]))
    # Unclipped, and no clip acts on a quadratic: the search confirmed at a measured clip too.
    median = measured_clip_threshold(with_search.probes["grad_norm"])
    assert search.clip is None and search.measured_clip == pytest.approx(median)
    assert [t.clip for t in search.confirmations] == [None] * 3 + [search.measured_clip] * 3
    analysis = analyze(searched, bootstrap=0)
    headline = analysis.recommendations.headline
    assert headline.rule == "searched-step" and headline.step_size == search.best.lr
    document = json.loads(json.dumps(analysis.as_json(), allow_nan=False))
    assert len(document["step_size_search"]["trials"]) == len(search.trials)
    assert "holds no step-size search" not in analysis.recommendations.explanation
    assert analyze(plain, bootstrap=0).recommendations.headline.rule != "searched-step"
    fitted = invoke("fit", searched)
    assert fitted.exit_code == 0 and "Headline: lr = " in fitted.stdout


def test_a_clipped_run_searches_at_its_own_clip_only(tmp_path):
    path = tmp_path / "quadratic.py"
    path.write_text(QUADRATIC)
    out = tmp_path / "clipped.h5"
    result = invoke("run", path, "-o", out, "--steps", "100", "--lr", "0.01", "--clip", "5")
    assert result.exit_code == 0, result.output
    search = StepSizeSearch.from_json(json.loads(read_trajectory(out).attributes[ATTRIBUTE]))
    assert search.clip == 5 and search.measured_clip is None
    assert len(search.confirmations) == 3 and all(t.clip is None for t in search.confirmations)


def test_a_run_without_probes_does_not_search(tmp_path):
    path = tmp_path / "quadratic.py"
    path.write_text(QUADRATIC)
    out = tmp_path / "x.h5"
    result = invoke("run", path, "-o", out, "--steps", "5", "--probe-every", "0")
    assert result.exit_code == 0, result.output
    assert "step-size search" not in result.stdout
    assert ATTRIBUTE not in read_trajectory(out).attributes


def test_a_diverged_profile_points_to_the_step_its_search_found(tmp_path):
    path = tmp_path / "quadratic.py"
    path.write_text(QUADRATIC)
    out = tmp_path / "diverged.h5"
    result = invoke("run", path, "-o", out, "--steps", "200", "--lr", "1e12")
    assert result.exit_code == 3, result.output
    with pytest.raises(FitError, match=r"its step-size search found lr .* to train"):
        analyze(out, bootstrap=0)
    fitted = invoke("fit", out)
    assert fitted.exit_code == 1 and "smoothprof run MODEL.py --lr " in fitted.stderr


def _fit(grad_norms, smoothness):
    return fit_envelope(np.array(grad_norms), np.array(smoothness), num_bootstrap=0)


GROWING = ([0.2, 0.5, 1.0, 2.0, 4.0] * 5, [1.2, 1.5, 2.0, 3.0, 5.0] * 5)


def test_the_searched_headline_clips_where_its_trials_did():
    from smoothprof.recommend import acting_clip

    fit = _fit(*GROWING)  # L0 ~ 1, L1 ~ 1: c ~ 1, below G_max = 4
    c, why = acting_clip(fit)
    assert c == pytest.approx(fit.L0 / fit.L1) and why.startswith("clip at c = L0/L1")
    trials = (Trial(0.1, 3, 2), Trial(0.2, 3, 1), Trial(0.4, 3, 4))
    sgd = ProfilingRun(lr=0.1, optimizer="sgd")
    # The run clipped its trials at c, the clip that acts: the headline keeps both.
    advice = recommend(fit, profile=sgd, search=StepSizeSearch(50, 0.4, "2/λ0", trials, clip=c))
    assert advice.headline.rule == "searched-step"
    assert (advice.headline.step_size, advice.headline.clip_threshold) == (0.2, c)
    assert "c = L0/L1 of the run's probes, which every trial used" in advice.headline.note
    assert advice.sweep_lrs == (0.1, 0.2)
    # Unclipped trials: their best step belongs to no clip, whatever the fit says.
    advice = recommend(fit, profile=sgd, search=StepSizeSearch(50, 0.4, "2/λ0", trials))
    assert advice.headline.clip_threshold is None
    assert "the trials ran unclipped" in advice.headline.note
    # c above every measured gradient norm would never act; a flat envelope has no c to trust.
    flat = _fit([0.1, 0.2, 0.3] * 5, [5.0, 5.1, 5.3] * 5)
    assert flat.G_max < flat.L0 / flat.L1
    assert acting_clip(flat)[0] is None and "would never act" in acting_clip(flat)[1]
    noise = _fit([0.1, 0.2, 0.3, 0.4] * 5, [3.0, 1.0, 4.0, 1.5] * 5)
    assert acting_clip(noise)[0] is None
    # A clipped profile's trials were clipped at its threshold: that clip stays.
    clipped = StepSizeSearch(50, 0.4, "2/λ0", trials, clip=0.5)
    advice = recommend(fit, profile=ProfilingRun(lr=0.1, clip=0.5), search=clipped)
    assert advice.headline.clip_threshold == 0.5 and "the run's own" in advice.headline.note


def test_a_search_that_barely_moved_the_loss_says_it_cannot_tell_steps_apart():
    trials = (Trial(0.1, 1.10, 1.05), Trial(0.2, 1.10, 1.02), Trial(0.4, 1.10, 1.08))
    advice = recommend(
        _fit(*GROWING), profile=ProfilingRun(lr=0.1), search=StepSizeSearch(50, 0.4, "x", trials)
    )
    assert any("too little to tell the steps apart" in w for w in advice.warnings)


def test_a_search_where_nothing_trained_says_so_and_falls_back():
    fit = _fit(*GROWING)
    search = StepSizeSearch(50, 0.4, "2/λ0", (Trial(0.1, 3, math.inf, diverged_at=2),))
    advice = recommend(fit, profile=ProfilingRun(lr=0.1, optimizer="sgd"), search=search)
    assert advice.headline.rule != "searched-step"
    assert any("none of the step-size search's 1 trial trained" in w for w in advice.warnings)


def test_without_a_search_a_clip_that_never_acts_does_not_license_a_longer_step():
    """The GPT-2 case: c far above every measured gradient norm, so 5 x the profiling lr would
    run unclipped; the step is held to the stability threshold 2/L_max instead."""
    flat = _fit([0.5, 1.0, 2.0, 3.87] * 5, [60.0, 61.0, 62.0, 63.0] * 5)
    assert flat.G_max < flat.L0 / flat.L1
    advice = recommend(flat, profile=ProfilingRun(lr=0.1, optimizer="sgd"))
    assert advice.headline.step_size == pytest.approx(2 / flat.L_max)
    assert advice.headline.step_size < 0.5
    assert any("would never act" in w for w in advice.warnings)
    # Where the clip acts, the measured rule is unchanged.
    acting = recommend(_fit(*GROWING), profile=ProfilingRun(lr=0.1, optimizer="sgd"))
    assert acting.headline.step_size == pytest.approx(0.5)


def test_an_unclipped_run_searches_at_the_clip_its_probes_show_to_act():
    from types import SimpleNamespace

    from smoothprof.cli import _acting_clip

    def probes(grad_norms, smoothness):
        return [
            SimpleNamespace(grad_norm=g, hessian_norm=h, smoothness_fd=math.nan)
            for g, h in zip(grad_norms, smoothness)
        ]

    c = _acting_clip(probes(*GROWING))
    assert c == pytest.approx(_fit(*GROWING).L0 / _fit(*GROWING).L1)
    assert _acting_clip(probes([0.1, 0.2, 0.3] * 5, [5.0, 5.1, 5.3] * 5)) is None  # never acts
    assert _acting_clip(probes([1.0, 2.0], [1.0, 2.0])) is None  # too few points to fit
