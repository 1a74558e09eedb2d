"""The rules of theory.md §4 by hand, degenerate fits, warnings and the PyTorch snippet."""

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smoothprof.fit import EnvelopeFit, FitError, fit_envelope
from smoothprof.recommend import (
    CAVEATS,
    SWEEP_FACTORS,
    ProfilingRun,
    Recommendation,
    Recommendations,
    pytorch_snippet,
    recommend,
)


def make_fit(L0=2.0, L1=0.5, L_max=40.0, G_max=30.0, G_min=0.1, spearman=0.9, num_points=200):
    return EnvelopeFit(
        L0=L0,
        L1=L1,
        quantile=0.95,
        num_points=num_points,
        num_dropped=0,
        share_below=0.95,
        spearman_log=spearman,
        pearson_log=spearman,
        L_max=L_max,
        G_max=G_max,
        L0_interval=None,
        L1_interval=None,
        confidence=0.9,
        G_min=G_min,
    )


def by_rule(recs: Recommendations) -> dict[str, Recommendation]:
    return {r.rule: r for r in recs.rules}


# (clip threshold, step size, step offset) for L0 = 2, L1 = 0.5, L_max = 40, G_max = 30, worked
# out by hand from theory.md §4: eta_c = 1/(10*L0) = 1/20, gamma = min{10*L0, L0/L1} = min{20, 4}.
BY_HAND = {
    "clipped-measured": (4.0, 5 * 0.3, None),  # c = L0/L1, 5 x the profiling lr 0.3
    "clipped-gd-conservative": (4.0, 1 / 20, None),  # Theorem 3
    "clipped-gd-koloskova": (4.0, 1 / 36, None),  # c = 4, 1/(9*(2 + 4*0.5))
    "normalized-gd": (None, 4 / 20, 4.0),  # eta_n = gamma*eta_c = 0.2, beta = gamma = 4
    "fixed-step-gd-theory": (None, 1 / 34, None),  # 1/(2*(30*0.5 + 2))
    "fixed-step-gd-observed": (None, 1 / 40, None),  # 1/L_max
    "clipped-gd-pethick": (4.0, 1 / 4, None),  # 1/(L0 + c*L1) = 1/(2*L0)
    "adaptive-step-vankov": (None, 4 / 3, 8 / 3),  # 1/(2 + 0.75 g) = (4/3)/(g + 8/3)
}
MARKS = {
    "clipped-measured": "[measured]",
    "clipped-gd-conservative": "[paper]",
    "clipped-gd-koloskova": "[lecture]",
    "normalized-gd": "[paper]",
    "fixed-step-gd-theory": "[paper]",
    "fixed-step-gd-observed": "classical",
    "clipped-sgd": "[paper]",
    "clipped-gd-pethick": "[secondary]",
    "adaptive-step-vankov": "[secondary]",
}


def assert_numbers(rec, expected):
    clip, step, offset = expected
    assert rec.clip_threshold == (None if clip is None else pytest.approx(clip, rel=1e-12))
    assert rec.step_size == pytest.approx(step, rel=1e-12)
    assert rec.step_offset == (None if offset is None else pytest.approx(offset, rel=1e-12))


SGD_PROFILE = ProfilingRun(lr=0.3, optimizer="sgd")


def test_rule_table_by_hand():
    recs = recommend(make_fit(), profile=SGD_PROFILE)
    rules = by_rule(recs)
    # The measured headline, then the order of theory.md §4, without the stochastic rule.
    assert list(rules) == list(BY_HAND)
    for name, expected in BY_HAND.items():
        assert_numbers(rules[name], expected)
        assert MARKS[name] in rules[name].source
        assert rules[name].title and rules[name].assumptions
    assert recs.headline is rules["clipped-measured"]
    assert recs.fixed_step_observed == 1 / 40
    assert recs.predicted_speedup == pytest.approx(40 / 2)  # L_max / L0
    assert "worst-case" in recs.explanation and "measured, not proved" in recs.explanation
    assert "This file holds no step-size search" in recs.explanation  # where to get one
    assert recs.sweep_lrs == pytest.approx([0.3, 0.6, 1.5, 3.0, 6.0])
    assert "0.3, 0.6, 1.5, 3, 6" in recs.explanation
    assert recs.warnings == ()
    assert recs.caveats == CAVEATS and len(CAVEATS) == 3


def test_vankov_offset_form_equals_the_formula():
    vankov = by_rule(recommend(make_fit()))["adaptive-step-vankov"]
    for g in (0.0, 0.3, 7.0, 1e3):
        lr = vankov.step_size / (g + vankov.step_offset)
        assert lr == pytest.approx(1 / (2.0 + 1.5 * 0.5 * g), rel=1e-12)


def test_stochastic_rule_with_noise_and_steps():
    # min{1/(20*L0), 1/(128*L1*tau), 1/sqrt(T)} = min{1/40, 1/192, 1/100}; clip gamma = 4.
    rules = by_rule(recommend(make_fit(), grad_noise=3.0, num_steps=10_000))
    assert list(rules)[6] == "clipped-sgd"
    assert_numbers(rules["clipped-sgd"], (4.0, 1 / 192, None))
    assert MARKS["clipped-sgd"] in rules["clipped-sgd"].source
    # Few steps: the 1/sqrt(T) term binds.
    few = by_rule(recommend(make_fit(), grad_noise=0.01, num_steps=400))["clipped-sgd"]
    assert few.step_size == pytest.approx(1 / 40)  # min{1/40, 1/0.64, 1/20}
    # No noise: the tau term drops out.
    exact = by_rule(recommend(make_fit(), grad_noise=0.0, num_steps=10**8))["clipped-sgd"]
    assert exact.step_size == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "options, names, not_named",
    [
        ({"grad_noise": 3.0}, ["T, the number of training steps", "num_steps="], "τ"),
        ({"num_steps": 100}, ["gradient noise τ", "--probe-batches 2 or more"], "T, the"),
    ],
)
def test_stochastic_rule_names_the_missing_input(options, names, not_named):
    recs = recommend(make_fit(), **options)
    assert "clipped-sgd" not in by_rule(recs)
    [warning] = [w for w in recs.warnings if "Theorem 7" in w]
    assert "is omitted" in warning and not_named not in warning
    assert all(name in warning for name in names), warning


def test_noise_above_clip_threshold_warns():
    noisy = recommend(make_fit(), grad_noise=5.0, num_steps=1000)  # c = 4 < 5
    assert any("bias" in w and "Koloskova" in w for w in noisy.warnings)
    quiet = recommend(make_fit(), grad_noise=3.0, num_steps=1000)  # c = 4 >= 3
    assert not any("bias" in w for w in quiet.warnings)


def test_L1_zero_means_no_clipping():
    recs = recommend(make_fit(L0=5.0, L1=0.0, L_max=8.0))
    rules = by_rule(recs)
    assert recs.headline is rules["fixed-step-gd-observed"]
    assert recs.headline.step_size == 1 / 8
    assert "clipped-measured" not in rules and recs.sweep_lrs == ()
    assert all(r.clip_threshold is None for r in recs.rules)
    assert rules["clipped-gd-koloskova"].step_size == pytest.approx(1 / 45)  # 1/(9*L0)
    assert rules["clipped-gd-conservative"].step_size == pytest.approx(1 / 50)
    assert rules["fixed-step-gd-theory"].step_size == pytest.approx(1 / 10)  # 1/(2*L0)
    assert recs.predicted_speedup == 1.0
    assert any(w.startswith("L1 = 0") for w in recs.warnings)
    assert "clipping is not needed" in recs.explanation
    with_noise = recommend(make_fit(L0=5.0, L1=0.0, L_max=8.0), grad_noise=1.0, num_steps=100)
    assert by_rule(with_noise)["clipped-sgd"].clip_threshold is None
    assert by_rule(with_noise)["clipped-sgd"].step_size == pytest.approx(1 / 100)


def test_L0_zero_uses_the_floor_L1_times_G_min():
    recs = recommend(make_fit(L0=0.0, L1=0.5, G_min=0.1, L_max=40.0))
    floor = 0.5 * 0.1
    rules = by_rule(recs)
    koloskova = rules["clipped-gd-koloskova"]
    assert recs.headline is rules["clipped-measured"]
    assert recs.headline.clip_threshold == pytest.approx(0.1)
    assert koloskova.clip_threshold == pytest.approx(0.1)  # L0'/L1 = G_min
    assert koloskova.step_size == pytest.approx(1 / (18 * floor))
    assert koloskova.clip_threshold * koloskova.step_size == pytest.approx(1 / (18 * 0.5))
    assert "L0'" in koloskova.note
    assert rules["fixed-step-gd-theory"].step_size == pytest.approx(1 / (2 * 30 * 0.5))
    assert recs.predicted_speedup == pytest.approx(40 / floor)
    assert any(w.startswith("L0 = 0") for w in recs.warnings)
    assert_all_finite(recs)


def test_L0_zero_without_G_min_omits_the_rules_dividing_by_L0():
    recs = recommend(make_fit(L0=0.0, L1=0.5, G_min=math.nan))
    assert set(by_rule(recs)) == {"fixed-step-gd-theory", "fixed-step-gd-observed"}
    assert recs.headline.rule == "fixed-step-gd-observed"
    assert math.isnan(recs.predicted_speedup)
    assert_all_finite(recs)


def test_overflowing_rules_are_omitted_with_a_warning():
    recs = recommend(make_fit(L0=5e-324, L1=1.0, G_min=1e-300))
    assert "clipped-gd-koloskova" not in by_rule(recs)
    assert recs.headline.rule == "clipped-measured"  # c = L0/L1 and lr = 1/L_max stay finite
    assert any("overflow" in w for w in recs.warnings)
    assert_all_finite(recs)


def test_headline_is_five_times_an_unclipped_sgd_profiling_lr():
    recs = recommend(make_fit(), profile=ProfilingRun(lr=0.5, optimizer="sgd"))
    assert recs.headline.rule == "clipped-measured"
    assert recs.headline.clip_threshold == pytest.approx(4.0)  # L0/L1
    assert recs.headline.step_size == pytest.approx(2.5)
    assert recs.sweep_lrs == pytest.approx([0.5 * f for f in SWEEP_FACTORS])
    assert "5 x the profiling run's lr 0.5" in recs.headline.note
    unnamed = recommend(make_fit(), profile=ProfilingRun(lr=0.5))
    assert unnamed.headline.step_size == pytest.approx(2.5)
    assert "does not name the optimizer" in unnamed.headline.note


@pytest.mark.parametrize(
    ("profile", "clip", "phrase"),
    [
        (ProfilingRun(lr=0.5, clip=0.25, optimizer="sgd"), 0.25, "clipped at 0.25"),
        (ProfilingRun(lr=0.5, clip=9.0, optimizer="sgd"), 4.0, "clipped at 9"),
        (ProfilingRun(lr=0.5, optimizer="adam"), 4.0, "trained with adam"),
        (ProfilingRun(lr=0.5, optimizer="momentum"), 4.0, "trained with momentum"),
    ],
)
def test_headline_keeps_the_lr_of_other_profiles(profile, clip, phrase):
    # A clipped profile showed steps up to lr·clip to be safe: the clip is never looser.
    recs = recommend(make_fit(), profile=profile)
    assert recs.headline.step_size == pytest.approx(0.5)
    assert recs.headline.clip_threshold == pytest.approx(clip)  # min(c = L0/L1 = 4, its clip)
    assert recs.sweep_lrs == pytest.approx([0.5 * f for f in SWEEP_FACTORS])
    assert any(phrase in w and "keeps its lr" in w for w in recs.warnings)


def test_headline_without_a_recorded_lr_starts_from_one_over_L_max():
    recs = recommend(make_fit())
    assert recs.headline.step_size == pytest.approx(1 / 40)
    assert recs.sweep_lrs == pytest.approx([f / 40 for f in SWEEP_FACTORS])
    assert any("does not record the profiling run's lr" in w for w in recs.warnings)


@pytest.mark.parametrize(
    "profile",
    [
        ProfilingRun(lr=0.0),
        ProfilingRun(lr=math.nan),
        ProfilingRun(lr=math.inf),
        ProfilingRun(lr=True),
        ProfilingRun(lr=0.1, clip=-1.0),
        {"lr": 0.1},
    ],
)
def test_bad_profile_raises_value_error(profile):
    with pytest.raises(ValueError):
        recommend(make_fit(), profile=profile)


def test_weak_correlation_and_few_points_warn():
    recs = recommend(make_fit(spearman=math.nan, num_points=5))
    assert any("Spearman undefined" in w for w in recs.warnings)
    assert any("only 5 points" in w for w in recs.warnings)


@pytest.mark.parametrize(
    ("fit_changes", "options"),
    [
        ({"L0": math.nan}, {}),
        ({"L1": -1.0}, {}),
        ({"L_max": 0.0}, {}),
        ({"G_max": math.inf}, {}),
        ({"L_max": 1e-320}, {}),  # 1/L_max overflows
        ({}, {"grad_noise": -1.0}),
        ({}, {"grad_noise": math.inf}),
        ({}, {"grad_noise": "loud"}),
        ({}, {"num_steps": 0}),
        ({}, {"num_steps": 2.5}),
        ({}, {"num_steps": True}),
    ],
)
def test_bad_input_raises_value_error(fit_changes, options):
    with pytest.raises(ValueError):
        recommend(dataclasses.replace(make_fit(), **fit_changes), **options)


def test_results_are_frozen():
    recs = recommend(make_fit())
    with pytest.raises(dataclasses.FrozenInstanceError):
        recs.headline.step_size = 1.0


def test_snippets_compile_and_say_what_the_rule_says():
    recs = recommend(make_fit(), grad_noise=3.0, num_steps=10_000)
    for rec in recs.rules:
        code = pytorch_snippet(rec)
        compile(code, rec.rule, "exec")
        assert "torch.optim.SGD(model.parameters(), lr=" in code
        has_clip_line = "max_norm=" in code and 'max_norm=float("inf")' not in code
        assert has_clip_line == (rec.clip_threshold is not None)
    koloskova = pytorch_snippet(by_rule(recs)["clipped-gd-koloskova"], optimizer="Adam")
    assert "torch.optim.Adam(model.parameters(), lr=0.0277778)" in koloskova
    assert "clip_grad_norm_(model.parameters(), max_norm=4)" in koloskova
    observed = pytorch_snippet(by_rule(recs)["fixed-step-gd-observed"])
    assert "clip_grad_norm_" not in observed and "lr=0.025)" in observed


@pytest.mark.parametrize("optimizer", ["", "S G D", "SGD; import os", 3])
def test_snippet_rejects_bad_optimizer_names(optimizer):
    with pytest.raises(ValueError):
        pytorch_snippet(recommend(make_fit()).headline, optimizer=optimizer)


def test_snippets_run_one_training_step():
    # The snippet, pasted into a real loop, takes the step the rule describes:
    # ||x_new - x|| = lr * min(||grad||, c).
    torch = pytest.importorskip("torch")
    for rec in recommend(make_fit(), grad_noise=3.0, num_steps=100).rules:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1).double()
        before = [p.detach().clone() for p in model.parameters()]
        model(torch.ones(2, 3, dtype=torch.float64)).pow(2).sum().mul(100.0).backward()
        grad_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
        namespace = {"model": model}
        exec(pytorch_snippet(rec), namespace)
        optimizer = namespace["optimizer"]
        optimizer.step()
        after = [p.detach() for p in model.parameters()]
        step = math.sqrt(
            sum(float((p - q).pow(2).sum()) for p, q in zip(after, before, strict=True))
        )
        lr = optimizer.param_groups[0]["lr"]
        if rec.step_offset is None:
            assert lr == pytest.approx(rec.step_size, rel=1e-5)  # 6 significant digits
        else:
            assert lr == pytest.approx(rec.step_size / (grad_norm + rec.step_offset), rel=1e-5)
        clip = math.inf if rec.clip_threshold is None else rec.clip_threshold
        assert grad_norm > 4.0  # so that the clipping rules do clip
        assert step == pytest.approx(lr * min(grad_norm, clip), rel=1e-5)


def assert_all_finite(recs: Recommendations):
    numbers = [recs.fixed_step_observed]
    for rec in recs.rules:
        values = (rec.clip_threshold, rec.step_size, rec.step_offset)
        numbers += [x for x in values if x is not None]
    assert all(math.isfinite(x) and x >= 0 for x in numbers)
    assert recs.headline in recs.rules
    assert math.isnan(recs.predicted_speedup) or math.isfinite(recs.predicted_speedup)


any_float = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0.0, exclude_min=True, allow_infinity=False),
    st.sampled_from([1.0, 1e-300, 1e300, 5e-324, 1.7976931348623157e308]),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, 50).flatmap(
        lambda n: st.tuples(
            st.lists(any_float, min_size=n, max_size=n), st.lists(any_float, min_size=n, max_size=n)
        )
    ),
    st.one_of(st.none(), any_float, st.floats()),
    st.one_of(st.none(), st.integers(-5, 10**9)),
)
def test_recommend_never_raises_anything_but_value_error(arrays, grad_noise, num_steps):
    g, L = (np.array(a, dtype=float) for a in arrays)
    try:
        recs = recommend(
            fit_envelope(g, L, num_bootstrap=0), grad_noise=grad_noise, num_steps=num_steps
        )
    except (FitError, ValueError):
        return
    assert_all_finite(recs)
    for rec in recs.rules:
        compile(pytorch_snippet(rec), rec.rule, "exec")
