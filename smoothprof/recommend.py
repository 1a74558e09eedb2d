"""Clip thresholds and step sizes from a fitted (L0, L1), each rule naming its source.

Every rule is a row of theory.md §4; the marks say where a formula was read: [paper] Zhang, He,
Sra, Jadbabaie (ICLR 2020), [lecture] the lecture notes on gradient clipping (Koloskova et al.
2023, Theorem 1), [secondary] a restatement still to be checked against its paper, classical.

The headline is not a theorem's. With the run's step-size search (``smoothprof.step_search``:
short trials from the initialization at lr doubling from the stability step 2/λ0 its first probe
measured) it is the best trial's lr, clipped at c = L0/L1 only where that clip acts on the
measured gradient norms and the smoothness grows with them; benchmarks/vs_practice.py measures
it against an LR range test, AutoClip and ZClip (docs/practice.md). Without a search (a file
the library wrote), it is the rule measured before on three sample models (docs/results.md):
clip at c = L0/L1 with five times the lr of an unclipped SGD profiling run, which came within 6%
of the best fixed step of a sweep there, but diverged on models it was not tuned on where the
clip never acted, so the step is then held to 2/L_max. The theorems' step sizes were 8 to 275
times below the best fixed step on the sample models; they follow the headline as safe lower
bounds.

Degenerate fits never produce inf or a division by zero:
- L1 == 0: the points show plain L-smoothness. Clipping is not needed: every rule is given
  without a clip threshold, and the headline is the observed fixed step 1/L_max.
- L0 == 0 (with L1 > 0): c = L0/L1 collapses to 0 and 1/L0 to inf. The rules then use the floor
  L0' = L1·G_min, the envelope's value at the smallest measured gradient norm. L0' + L1·g is
  still an upper envelope of the points (it only grows), so every rule keeps its guarantee, and
  it is at most twice the fitted envelope L1·g over the measured range g >= G_min. With c =
  L0'/L1 = G_min, clipped GD acts as normalized GD with step length 1/(18·L1) there.

numpy-free and torch-free: plain floats in, plain dataclasses out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from smoothprof.fit import EnvelopeFit
from smoothprof.step_search import StepSizeSearch
from smoothprof.wording import plural

__all__ = [
    "CAVEATS",
    "MEASURED_LR_FACTOR",
    "SWEEP_FACTORS",
    "ProfilingRun",
    "Recommendation",
    "Recommendations",
    "acting_clip",
    "pytorch_snippet",
    "recommend",
]

# Below this Spearman correlation of log L with log g the premise of (L0, L1) clipping, smoothness
# growing with the gradient norm (Zhang et al. 2020, Figures 1 to 3), is not visible in the data.
WEAK_CORRELATION = 0.3
# A search whose best trial lowered the loss by less than this share cannot tell steps apart.
SMALL_PROGRESS = 0.1
# Fewer points than this make the envelope and every rule built on it uncertain.
FEW_POINTS = 20

# The measured rule (docs/results.md): clip at c = L0/L1 with this many times the lr of an
# unclipped SGD profiling run. Steps to the target loss with it, against the best fixed step of a
# sweep: char-LSTM (profile lr 1) 300 against 283, residual CNN (lr 0.2) 133 against 133, MLP on
# spirals (lr 0.5) 653 against 878. Ten times was faster on the char-LSTM (221) but never reached
# the target on the MLP, so the headline takes five.
MEASURED_LR_FACTOR = 5.0
# The clipped sweep suggested around the headline, as multiples of the profiling lr: on the
# sample models the best clipped lr lay between 2 and 20 times the profiling lr.
SWEEP_FACTORS: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 20.0)

CAVEATS: tuple[str, ...] = (
    "The constants belong to the probe objective (its batches, mode and parameterization): "
    "rescaling the parameters changes them.",
    "The finite-difference estimate L_fd measures one direction (the update); the Hessian norm "
    "from HVPs bounds every direction, so an envelope of L_fd can understate L0 and L1.",
    "Worst-case bounds are conservative: the theorems' step sizes can be far below what trains "
    "well, and the smoothness a profile measures belongs to the path its step size took.",
)


@dataclass(frozen=True)
class ProfilingRun:
    """How the run whose points were fitted trained, as far as its file records it.

    ``lr`` is its step size (None: not recorded), ``clip`` its clip threshold (None: unclipped),
    ``optimizer`` the name ``smoothprof run`` uses ("sgd", "momentum", "adam", or the model file's
    optimizer class in lower case, e.g. "adamw"; None: not recorded). ``optimizer_from_file``: the
    model file's ``optimizer()`` made it (then ``lr`` is its param group 0's initial lr, and
    ``--lr`` does not reach it).
    """

    lr: float | None = None
    clip: float | None = None
    optimizer: str | None = None
    optimizer_from_file: bool = False

    @property
    def sgd_family(self) -> bool:
        """Whether its lr is a step size of (momentum) SGD, the update the rules speak of."""
        return self.optimizer in (None, "sgd", "momentum")


@dataclass(frozen=True)
class Recommendation:
    """One rule of theory.md §4 evaluated at a fit.

    The update is x <- x - lr·clip(∇f(x), clip_threshold), clip(u, c) = min{1, c/||u||}·u.
    lr is step_size; when step_offset is set the rule is adaptive and lr at gradient norm g is
    step_size / (g + step_offset), so step_size is then the longest step the rule takes.
    """

    rule: str  # stable id, e.g. "clipped-gd-koloskova"
    title: str  # human name, e.g. "clipped GD (Koloskova et al. 2023)"
    clip_threshold: float | None  # max gradient norm after clipping; None: no clipping
    step_size: float | None  # learning rate (see step_offset)
    source: str  # e.g. "Zhang et al. 2020, Theorem 3 [paper]"
    assumptions: str  # one line
    note: str = ""  # e.g. why a value is degenerate
    step_offset: float | None = None  # adaptive rules: lr(g) = step_size / (g + step_offset)


@dataclass(frozen=True)
class Recommendations:
    """All rules the fit supports, the one to try first, and what to beware of."""

    headline: Recommendation  # the measured rule when clipping applies (module docstring)
    rules: tuple[Recommendation, ...]  # the headline, then every rule of theory.md §4 in order
    fixed_step_observed: float  # 1 / L_max
    predicted_speedup: float  # worst-case bound ratio, about L_max / L0; NaN if undefined
    explanation: str  # why this headline; the speedup is a bound ratio, not a promise
    warnings: tuple[str, ...]  # degenerate fits, noise above the clip threshold, weak evidence
    caveats: tuple[str, ...] = CAVEATS  # theory.md §5, true of every fit
    # Step sizes to try with the headline's clip threshold: the search's best trial and its
    # neighbours that trained, or multiples of the profiling lr (SWEEP_FACTORS).
    sweep_lrs: tuple[float, ...] = ()
    # The profiling run's optimizer when it is not SGD (e.g. "adamw"): the headline's lr is its
    # lr, to keep with that optimizer and the clip, not an SGD step size.
    own_optimizer: str | None = None


_SOURCE_THEOREM_3 = "Zhang et al. 2020, Theorem 3 [paper]"
_SOURCE_KOLOSKOVA = "Koloskova et al. 2023, Theorem 1 [lecture]"
_SOURCE_NORMALIZED = "Zhang et al. 2020, Section 3 [paper]"
_SOURCE_THEOREM_6 = "Zhang et al. 2020, Theorem 6 [paper]"
_SOURCE_OBSERVED = "classical: step 1/L for an L-smooth function"
_SOURCE_THEOREM_7 = "Zhang et al. 2020, Theorem 7 [paper]"
_SOURCE_PETHICK = "Pethick et al. 2025, Theorem 4.3 [secondary]"
_SOURCE_VANKOV = "Vankov et al. 2024 [secondary]"
_SOURCE_MEASURED = "measured on smoothprof's sample models, docs/results.md [measured]"
_SOURCE_SEARCH = "measured: smoothprof's step-size search, docs/practice.md [measured]"

_DETERMINISTIC = "(L0, L1)-smooth objective, exact gradients"


def recommend(
    fit: EnvelopeFit,
    *,
    grad_noise: float | None = None,
    num_steps: int | None = None,
    profile: ProfilingRun | None = None,
    search: StepSizeSearch | None = None,
) -> Recommendations:
    """Evaluate every rule of theory.md §4 at `fit` and pick a headline.

    With ``search`` (the run's step-size search, ``smoothprof.step_search``) that found a step
    that trains, the headline is that step, clipped at c = L0/L1 where the clip acts on the
    measured gradient norms and the fit shows smoothness growing with them
    (``_searched_headline``).

    grad_noise is τ, a bound on ||stochastic gradient - ∇f|| (units of g); num_steps is T, the
    number of optimizer steps planned. The stochastic rule (Zhang et al. 2020, Theorem 7) is
    included only when both are given. ``profile`` says how the fitted run trained; the headline's
    step size is ``MEASURED_LR_FACTOR`` times its lr when it was unclipped SGD (module docstring).
    Raises ValueError on a fit with non-finite or negative constants, on bad options, or when
    1/L_max is not a finite float.

    >>> from smoothprof.fit import fit_envelope
    >>> fit = fit_envelope([0.2, 0.5, 1.0, 2.0], [1.2, 1.5, 2.0, 3.0], num_bootstrap=0)
    >>> advice = recommend(fit, profile=ProfilingRun(lr=0.5))
    >>> round(advice.headline.clip_threshold, 6), advice.headline.step_size
    (1.0, 2.5)
    """
    L0, L1, L_max, G_max = _checked_fit(fit)
    tau = _checked_noise(grad_noise)
    T = _checked_num_steps(num_steps)
    profile = _checked_profile(profile)
    fixed_step_observed = 1.0 / L_max
    if not math.isfinite(fixed_step_observed):
        raise ValueError(f"L_max = {L_max!r} is too small for a finite step size 1/L_max")

    warnings: list[str] = []
    candidates: list[Recommendation | None] = []
    observed = Recommendation(
        rule="fixed-step-gd-observed",
        title="fixed-step GD, observed 1/L_max",
        clip_threshold=None,
        step_size=fixed_step_observed,
        source=_SOURCE_OBSERVED,
        assumptions="the largest measured local smoothness L_max bounds the smoothness on the run",
        note="L_max is a measurement along this run, not a bound beyond it.",
    )

    L0_used, floor_note = _effective_L0(fit, L0, L1, warnings)
    if L1 == 0:
        warnings.append(
            "L1 = 0: the points show plain L-smoothness, so clipping is not needed; "
            "the rules are given without clip thresholds."
        )
    if L0_used is None:
        candidates += [None, None, None]
    elif L1 == 0:
        candidates += _smooth_clipped_rules(L0_used)
    else:
        candidates += _clipped_rules(L0_used, L1, floor_note)
    candidates.append(_fixed_step_theory(L0, L1, G_max))
    candidates.append(observed)
    if tau is not None and T is not None:
        if L0_used is not None:
            candidates.append(_clipped_sgd(L0_used, L1, tau, T, floor_note))
    elif tau is not None or T is not None:
        warnings.append(_stochastic_rule_omitted(tau_missing=tau is None))
    if L0_used is not None:
        candidates += _secondary_rules(L0_used, L1, floor_note)

    rules = []
    for rule in candidates:
        if rule is None:
            continue
        if _is_finite_rule(rule):
            rules.append(rule)
        else:
            warnings.append(f"{rule.title}: its values overflow float64 for this fit; omitted.")

    sweep_lrs: tuple[float, ...] = ()
    measured = None
    searched = None
    if search is not None:
        searched = _searched_headline(search, fit, L0_used, profile, warnings)
    if searched is not None:
        measured = searched
        best = searched.step_size  # the best trial and its stable neighbours, to confirm it
        tried = sorted(
            {
                t.lr
                for t in (*search.trials, *search.confirmations)
                if t.stable and search.clip_of(t) == searched.clip_threshold
            }
        )
        sweep_lrs = tuple(lr for lr in tried if best / 2 <= lr <= 2 * best)
    elif L1 > 0 and L0_used is not None:
        measured, anchor = _measured_headline(
            L0_used / L1, profile, fixed_step_observed, warnings, G_max=G_max, L_max=L_max
        )
        sweep_lrs = tuple(factor * anchor for factor in SWEEP_FACTORS)
        if not (_is_finite_rule(measured) and all(math.isfinite(lr) for lr in sweep_lrs)):
            warnings.append(f"{measured.title}: its values overflow float64 for this fit.")
            measured, sweep_lrs = None, ()
    own_optimizer = None
    if measured is not None and profile.lr is not None and not profile.sgd_family:
        own_optimizer = profile.optimizer
    if searched is not None:
        headline = searched
        rules.insert(0, headline)
        speedup = _finite_or_nan(L_max / L0_used) if L0_used else math.nan
        explanation = _searched_explanation(search, headline, own_optimizer, speedup)
    elif measured is not None:
        headline = measured
        rules.insert(0, headline)
        speedup = _finite_or_nan(L_max / L0_used)
        c_fit = L0_used / L1
        if headline.clip_threshold == c_fit:
            where = f"c = L0/L1 = {c_fit:.3g}"
        else:
            where = (
                f"{headline.clip_threshold:.3g}, the profiling run's own threshold (the fitted "
                f"c = L0/L1 = {c_fit:.3g} would allow longer steps than that run took)"
            )
        with_lr = f"lr = {headline.step_size:.3g}"
        if own_optimizer is not None:
            with_lr = (
                f"{own_optimizer} at its lr {headline.step_size:.3g} (the profiling run's "
                f"optimizer and lr, kept: not an SGD step size)"
            )
        where_to_sweep = "at this clip threshold"
        if profile.optimizer_from_file:
            where_to_sweep = "in the model file's optimizer() with --clip at this threshold"
        explanation = (
            f"Headline: clip at {where}, with {with_lr}. The envelope's "
            "two terms are equal at c = L0/L1: above it the smoothness grows with the gradient "
            "norm, and clipping caps the step there. This rule is "
            "measured, not proved: on smoothprof's sample models (docs/results.md) clipping at "
            "the fitted c with 5 times the lr of an unclipped SGD profiling run came within 6% of "
            "the best fixed step of a sweep or beat it (steps to the target loss: char-LSTM 300 "
            "against 283, "
            "residual CNN 133 against 133, MLP 653 against 878; 10 times was faster on the "
            "char-LSTM and failed on the MLP), while the theorems' step sizes were 8 to 275 "
            "times below the best fixed step and trained slowly or not at all in that budget. "
            "The theorems' rules below are worst-case "
            "guarantees: safe lower bounds, not tuned values. Try the clipped sweep lr = "
            f"{', '.join(f'{lr:.3g}' for lr in sweep_lrs)} {where_to_sweep} and keep the "
            "best (smoothprof compare). The predicted speedup of clipped over fixed-step GD, "
            f"{_format(speedup)}, is a ratio of worst-case bounds (about L_max/L0, Zhang et al. "
            "2020, Theorems 3 and 4), not a promise of wall-clock speed. "
            f"{NO_SEARCH_NOTE}"
        )
    else:
        headline = observed
        if L1 == 0:
            speedup = 1.0
            explanation = (
                f"The fitted L1 is 0, so the points show plain L-smoothness: clipping is not "
                f"needed and the headline is the fixed step 1/L_max = {fixed_step_observed:.3g}. "
                "The worst-case bounds of clipped and fixed-step GD then coincide, so no speedup "
                "is predicted (ratio 1); it would be a bound ratio, not a promise, anyway."
            )
        else:
            speedup = _finite_or_nan(L_max / L0_used) if L0_used else math.nan
            explanation = (
                "No clip threshold c = L0/L1 can be evaluated for this fit (see the warnings), "
                f"so the headline is the fixed step 1/L_max = {fixed_step_observed:.3g}. Any "
                "speedup shown is a ratio of worst-case bounds, not a promise of wall-clock speed."
            )
        if L1 > 0:
            warnings.append(
                "no clip threshold can be evaluated for this fit; the headline falls back to "
                "1/L_max."
            )

    if tau is not None and headline.clip_threshold is not None and headline.clip_threshold < tau:
        warnings.append(
            f"the gradient noise τ = {tau:.3g} exceeds the headline clip threshold "
            f"c = {headline.clip_threshold:.3g}: in the stochastic case clipped SGD has a bias "
            "that no step size removes unless c is large compared with the noise "
            "(Koloskova et al. 2023 [lecture]); consider c of at least τ."
        )
    if not fit.spearman_log > WEAK_CORRELATION:
        rho = "undefined" if math.isnan(fit.spearman_log) else f"{fit.spearman_log:.2f}"
        warnings.append(
            f"log L and log g are weakly correlated (Spearman {rho}): the premise of clipping, "
            "smoothness growing with the gradient norm, is not visible in these points."
        )
    if fit.num_points < FEW_POINTS:
        warnings.append(
            f"only {plural(fit.num_points, 'point')}: the envelope and every rule built on it "
            "are uncertain."
        )

    if measured is None and not profile.sgd_family:
        warnings.append(
            f"the profiling run trained with {profile.optimizer}: the headline is a step size "
            f"of plain (S)GD for the measured smoothness, not an lr for {profile.optimizer}."
        )
    return Recommendations(
        headline=headline,
        rules=tuple(rules),
        fixed_step_observed=fixed_step_observed,
        predicted_speedup=speedup,
        explanation=explanation,
        warnings=tuple(warnings),
        sweep_lrs=sweep_lrs,
        own_optimizer=own_optimizer,
    )


# Where the file holds no step-size search, the headline is the rule tuned on the sample models:
# say so, and how to confirm it (not a command that trains another program than the user's).
NO_SEARCH_NOTE = (
    "This file holds no step-size search (a trainer callback, the library, a multi-process run "
    "or --no-lr-search wrote it), so the headline is that rule; on models it was not tuned on, "
    "the search did better against an LR range test and adaptive clipping (docs/practice.md): "
    "confirm the headline with the sweep above before a long run."
)


def _searched_headline(
    search: StepSizeSearch,
    fit: EnvelopeFit,
    L0_used: float | None,
    profile: ProfilingRun,
    warnings: list[str],
) -> Recommendation | None:
    """The step of the search's best trial, clipped at c = L0/L1 where that clip acts (None
    when no trial trained; a warning says what to run)."""
    best = search.best
    short = search.best_of_short_trials
    if best is None and short is not None:  # trained in short trials, not over longer ones
        tried = ", ".join(f"{t.lr:.3g}" for t in search.confirmations)
        warnings.append(
            f"the step-size search's best short trial, lr {short.lr:.3g}, trained in "
            f"{search.trial_steps} steps, but none of its confirming trials (lr {tried}) did "
            f"over {search.confirm_steps} steps: profile again with a smaller --lr."
        )
        return None
    if best is None:
        first = search.trials[0] if search.trials else None
        smallest = f" (the smallest, lr {first.lr:.3g}, did not train either)" if first else ""
        warnings.append(
            f"none of the step-size search's {plural(len(search.trials), 'trial')} trained"
            f"{smallest}: the steps around the stability step {search.stability_step:.3g} "
            f"({search.base}) diverge or do not lower the loss in "
            f"{search.trial_steps} steps; profile again with a smaller --lr."
        )
        return None
    if best.clip is not None:  # a clipped confirming trial ended lowest: its clip and step
        clip = best.clip
        why = (
            f"clip {clip:.3g}, the median gradient norm of the run's probes, at which its trial "
            "ran and ended lower than every unclipped one (measured, not proved: AutoClip, "
            "Seetharaman et al. 2020, clips at a percentile of the norms seen)"
        )
    elif search.clip is not None:  # the trials' clip: the lr belongs to it
        clip = search.clip
        origin = "the run's own" if profile.clip == search.clip else "c = L0/L1 of the run's probes"
        why = f"clip {clip:.3g}, {origin}, which every trial used"
    else:
        clip, why = acting_clip(fit, L0_used)
        if clip is not None:  # a clip the trials did not use would shorten their best step
            clip, why = None, why.replace("clip at", "no clip: the trials ran unclipped;")
    progress = (best.loss_start - best.loss_end) / abs(best.loss_start)
    if progress < SMALL_PROGRESS:
        warnings.append(
            f"the best trial of the step-size search lowered the loss by {progress:.1%} in its "
            f"{search.best_steps} steps: too little to tell the steps apart (a plateau); "
            "profile with more --steps (the trials are a tenth and a quarter of them) or sweep "
            "the lr."
        )
    return Recommendation(
        rule="searched-step",
        title="step size from the step-size search (measured)",
        clip_threshold=clip,
        step_size=best.lr,
        source=_SOURCE_SEARCH,
        assumptions="the best of short trials from the initialization trains best over the run; "
        "an empirical rule, no guarantee",
        note=f"{_chosen_among(search)} (loss {best.loss_start:.4g} -> {best.loss_end:.4g}); {why}.",
    )


def _chosen_among(search: StepSizeSearch) -> str:
    """Which trials the recommended one is the best of, in words."""
    short = f"{plural(len(search.trials), 'trial')} of {search.trial_steps} steps"
    if not search.confirmations:
        return f"the best of {short}"
    return (
        f"the best of {plural(len(search.confirmations), 'confirming trial')} of "
        f"{search.confirm_steps} steps around the best of {short}"
    )


def _confirmed(search: StepSizeSearch) -> str:
    short = search.best_of_short_trials
    if not search.confirmations or short is None:
        return ""
    clipped = ""
    if search.measured_clip is not None:
        clipped = (
            f", then clipped at {search.measured_clip:.3g} (the median gradient norm its probes "
            "measured) at once, twice and four times the best of those"
        )
    return (
        f"; the short trials' best, lr {short.lr:.3g}, was confirmed at half, once and twice its "
        f"step over a quarter of the run, as a short trial favours a long step{clipped}"
    )


def acting_clip(fit: EnvelopeFit, L0: float | None = None) -> tuple[float | None, str]:
    """c = L0/L1 when that clip would act: the smoothness grows with the gradient norm (Spearman
    log-log above ``WEAK_CORRELATION``) and c lies below the largest measured gradient norm;
    else None. With why, in words. ``L0`` replaces the fitted one; by default a zero L0 is
    replaced by its floor L1·G_min."""
    if L0 is None:  # the floor of a zero L0, as the rules use it (module docstring)
        L0 = fit.L0 if fit.L0 > 0 else fit.L1 * fit.G_min
    if not (fit.L1 > 0 and math.isfinite(L0) and L0 > 0):
        return None, "no clip: the envelope has no c = L0/L1"
    c = L0 / fit.L1
    if not fit.spearman_log > WEAK_CORRELATION:
        return None, (
            f"no clip: c = L0/L1 = {c:.3g}, but the smoothness does not grow with the gradient norm"
        )
    if c >= fit.G_max:
        return None, (
            f"no clip: c = L0/L1 = {c:.3g} is above every measured gradient norm (at most "
            f"{fit.G_max:.3g}), so it would never act"
        )
    return c, f"clip at c = L0/L1 = {c:.3g}"


def _searched_explanation(
    search: StepSizeSearch, headline: Recommendation, own_optimizer: str | None, speedup: float
) -> str:
    best = search.best
    assert best is not None
    unstable = search.first_unstable
    above = ""
    if unstable is not None:
        unclipped = " unclipped" if best.clip is not None and search.clip is None else ""
        above = f"; lr {unstable.lr:.3g} did not train{unclipped}"
        if unstable.diverged_at is not None:
            above += f" (diverged at step {unstable.diverged_at})"
    with_lr = f"lr = {best.lr:.3g}"
    if own_optimizer is not None:
        with_lr = f"{own_optimizer} at lr {best.lr:.3g} (not an SGD step size)"
    clip = (
        f"clipped at {headline.clip_threshold:.3g}"
        if headline.clip_threshold is not None
        else "unclipped"
    )
    return (
        f"Headline: {with_lr}, {clip}. The step is measured: {_chosen_among(search)} from the "
        f"initialization, at lr doubling from a quarter of {search.stability_step:.3g} "
        f"({search.base}){above}{_confirmed(search)}. 2/λ0 is the step above which gradient "
        "descent on the initial quadratic model is unstable (linear stability; Cohen et al. "
        "2021 [secondary]); networks often train above it (non-quadratic losses, catapults, "
        "the edge of stability), by how much only trials tell. A clip c = L0/L1 is where the "
        "envelope's two terms are equal: above it the smoothness grows with the gradient norm "
        "and clipping caps the step (Zhang et al. 2020); the trials clip where the headline "
        "does. Against an LR range test and adaptive clipping: docs/practice.md. The theorems' "
        "rules below are worst-case guarantees: safe lower bounds, not tuned values. The "
        f"predicted speedup of clipped over fixed-step GD, {_format(speedup)}, is a ratio of "
        "worst-case bounds (about L_max/L0, Zhang et al. 2020, Theorems 3 and 4), not a promise "
        "of wall-clock speed."
    )


def _measured_headline(
    c: float,
    profile: ProfilingRun,
    fixed_step_observed: float,
    warnings: list[str],
    *,
    G_max: float = math.inf,
    L_max: float = math.nan,
) -> tuple[Recommendation, float]:
    """The measured rule (module docstring) and the lr its sweep multiplies. Where the clip c
    would never act (c >= G_max, the largest measured gradient norm), the longer step is not
    guarded by it: the step is then at most 2/L_max, the stability threshold of the sharpest
    point the profile measured."""
    plain_sgd = profile.optimizer in (None, "sgd")
    if profile.lr is not None and profile.clip is None and plain_sgd:
        anchor, step = profile.lr, MEASURED_LR_FACTOR * profile.lr
        how = f"lr = {MEASURED_LR_FACTOR:g} x the profiling run's lr {profile.lr:.3g}"
        if profile.optimizer is None:
            how += " (the file does not name the optimizer; the factor was measured for SGD)"
        bound = 2.0 / L_max if L_max > 0 else math.inf
        if c >= G_max and step > bound:
            step = bound
            how = (
                f"lr = {step:.3g}: {MEASURED_LR_FACTOR:g} x the profiling lr would exceed "
                f"2/L_max = {bound:.3g}, and the clip c = {c:.3g} is above every measured "
                f"gradient norm (at most {G_max:.3g}), so it would not guard the step"
            )
            warnings.append(
                f"the clip c = L0/L1 = {c:.3g} is above every measured gradient norm (at most "
                f"{G_max:.3g}): it would never act, so the headline's step is held to the "
                f"stability threshold 2/L_max = {bound:.3g} of the profile's sharpest point "
                "instead of 5 times the profiling lr."
            )
    elif profile.lr is not None and profile.clip is not None:
        # The run only showed that steps up to lr·clip were safe: never advise a looser clip.
        anchor = step = profile.lr
        how = f"lr = the profiling run's lr {profile.lr:.3g}"
        if profile.clip < c:
            how += (
                f"; clip = its threshold {profile.clip:.3g}, below c = {c:.3g}: the run showed "
                "steps up to lr·clip to be safe, not longer ones"
            )
            c = profile.clip
        warnings.append(
            f"the profiling run was clipped at {profile.clip:.3g}: the factor "
            f"{MEASURED_LR_FACTOR:g} on its lr was measured for unclipped SGD profiles, so the "
            "headline keeps its lr and a clip no looser than its own; profile with plain SGD "
            "without clipping at a modest lr for the measured rule, or try the sweep."
        )
    elif profile.lr is not None and not profile.sgd_family:
        anchor = step = profile.lr
        how = (
            f"lr = the profiling run's lr {profile.lr:.3g} for {profile.optimizer}, which the "
            f"headline keeps: clip the gradient before {profile.optimizer}'s step"
        )
        warnings.append(
            f"the profiling run trained with {profile.optimizer}: the headline keeps its lr for "
            f"{profile.optimizer}, not as an SGD step size (the rules below are SGD's); the "
            f"factor {MEASURED_LR_FACTOR:g} on its lr was measured for plain SGD; try the sweep."
        )
    elif profile.lr is not None:
        anchor = step = profile.lr
        how = f"lr = the profiling run's lr {profile.lr:.3g}"
        warnings.append(
            f"the profiling run trained with {profile.optimizer}: the factor "
            f"{MEASURED_LR_FACTOR:g} on its lr was measured for plain SGD, so the headline keeps "
            "its lr; try the sweep."
        )
    else:
        anchor = step = fixed_step_observed
        how = f"lr = 1/L_max = {fixed_step_observed:.3g} (the profiling lr is not recorded)"
        warnings.append(
            "the file does not record the profiling run's lr (smoothprof run does; with the "
            "library, pass attributes={'config': {'lr': ...}} to TrajectoryWriter), so the "
            "headline's lr is the observed fixed step 1/L_max, likely far too small: try the sweep."
        )
    headline = Recommendation(
        rule="clipped-measured",
        title="clipped, lr from the profiling run (measured)",
        clip_threshold=c,
        step_size=step,
        source=_SOURCE_MEASURED,
        assumptions="a profiling run whose step size trains; an empirical rule, no guarantee",
        note=f"c = L0/L1; {how}. Sweep lr x {{{', '.join(f'{f:g}' for f in SWEEP_FACTORS)}}} "
        "of it at this clip to tune.",
    )
    return headline, anchor


def _checked_profile(profile: ProfilingRun | None) -> ProfilingRun:
    """The profiling run with a usable lr and clip, or ValueError."""
    if profile is None:
        return ProfilingRun()
    if not isinstance(profile, ProfilingRun):
        raise ValueError(f"profile must be a ProfilingRun, got {profile!r}")
    for name in ("lr", "clip"):
        value = getattr(profile, name)
        ok = value is None or (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value > 0
        )
        if not ok:
            raise ValueError(f"the profiling run's {name} must be positive, got {value!r}")
    return profile


def pytorch_snippet(
    rec: Recommendation, optimizer: str = "SGD", *, own_optimizer: str | None = None
) -> str:
    """Python code applying `rec` in a PyTorch training loop (`model` is the user's module).

    It builds torch.optim.<optimizer> with the rule's learning rate (or, with ``own_optimizer``,
    e.g. ``Recommendations.own_optimizer``, keeps the user's optimizer at that lr) and, inside the
    loop after loss.backward(), clips with torch.nn.utils.clip_grad_norm_ (no clip line when the
    rule has no threshold) and, for adaptive rules, sets the learning rate from the gradient norm.
    """
    if not (isinstance(optimizer, str) and optimizer.isidentifier()):
        raise ValueError(f"optimizer must be the name of a torch.optim class, got {optimizer!r}")
    if rec.step_size is None:
        raise ValueError(f"rule {rec.rule!r} has no step size to write as code")
    lr = _literal(rec.step_size)
    lines = [
        f"# {rec.title}: {rec.source}",
        "import torch",
        "",
        f"optimizer = torch.optim.{optimizer}(model.parameters(), lr={lr})"
        if own_optimizer is None
        else f"# keep your {own_optimizer} optimizer (and its schedule) at lr={lr}",
    ]
    in_loop = "# in the training loop, after loss.backward() and before optimizer.step():"
    max_norm = 'float("inf")' if rec.clip_threshold is None else _literal(rec.clip_threshold)
    if rec.step_offset is None:
        if rec.clip_threshold is not None:
            lines += [
                in_loop,
                f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={max_norm})",
            ]
    else:
        offset = _literal(rec.step_offset)
        lines += [
            in_loop,
            "# clip_grad_norm_ returns the gradient norm before clipping",
            "grad_norm = float(",
            f"    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={max_norm})",
            ")",
            "for group in optimizer.param_groups:",
            f'    group["lr"] = {lr} / (grad_norm + {offset})',
        ]
    return "\n".join(lines) + "\n"


def _checked_fit(fit: EnvelopeFit) -> tuple[float, float, float, float]:
    """(L0, L1, L_max, G_max) of `fit` as floats, or ValueError when they cannot be used."""
    try:
        L0, L1 = float(fit.L0), float(fit.L1)
        L_max, G_max = float(fit.L_max), float(fit.G_max)
    except (AttributeError, TypeError, ValueError) as error:
        raise ValueError(f"not an envelope fit: {error}") from None
    if not (math.isfinite(L0) and math.isfinite(L1) and L0 >= 0 and L1 >= 0):
        raise ValueError(f"L0 and L1 must be finite and >= 0, got L0 = {L0!r}, L1 = {L1!r}")
    if not (math.isfinite(L_max) and L_max > 0 and math.isfinite(G_max) and G_max > 0):
        raise ValueError(f"L_max and G_max must be finite and > 0, got {L_max!r}, {G_max!r}")
    return L0, L1, L_max, G_max


def _checked_noise(grad_noise: float | None) -> float | None:
    if grad_noise is None:
        return None
    try:
        tau = float(grad_noise)
    except (TypeError, ValueError):
        tau = math.nan
    if not (math.isfinite(tau) and tau >= 0):
        raise ValueError(f"grad_noise must be a finite number >= 0, got {grad_noise!r}")
    return tau


def _checked_num_steps(num_steps: int | None) -> int | None:
    if num_steps is None:
        return None
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    return num_steps


def _effective_L0(
    fit: EnvelopeFit, L0: float, L1: float, warnings: list[str]
) -> tuple[float | None, str]:
    """The L0 the rules use and a note when it is the floor L0' = L1·G_min (module docstring)."""
    if L0 > 0:
        return L0, ""
    if L1 == 0:
        warnings.append("L0 = L1 = 0: the envelope is zero; only the observed fixed step is given.")
        return None, ""
    G_min = float(getattr(fit, "G_min", math.nan))
    floor = L1 * G_min
    if not (math.isfinite(floor) and floor > 0):
        warnings.append(
            "L0 = 0 and the smallest gradient norm is unknown: the rules that divide by L0 "
            "are omitted."
        )
        return None, ""
    warnings.append(
        f"L0 = 0: c = L0/L1 would be 0 and 1/L0 infinite; the rules use the floor "
        f"L0' = L1·G_min = {floor:.3g}, the envelope at the smallest measured gradient norm "
        "(still an upper envelope, at most twice the fitted one on the measured range)."
    )
    return floor, f"uses L0' = L1·G_min = {floor:.3g} in place of the fitted L0 = 0."


def _clipped_rules(L0: float, L1: float, floor_note: str) -> list[Recommendation]:
    """Theorem 3, Koloskova et al. and normalized GD for L0 > 0, L1 > 0."""
    eta_c = 1.0 / (10.0 * L0)
    gamma = min(10.0 * L0, L0 / L1)  # = min{1/eta_c, 1/(10·L1·eta_c)}
    c = L0 / L1
    return [
        Recommendation(
            rule="clipped-gd-conservative",
            title="clipped GD, conservative (Zhang et al. 2020)",
            clip_threshold=gamma,
            step_size=eta_c,
            source=_SOURCE_THEOREM_3,
            assumptions=_DETERMINISTIC,
            note=_join(
                "h = min{η_c, γ·η_c/g} with η_c = 1/(10·L0), γ = min{10·L0, L0/L1}.", floor_note
            ),
        ),
        Recommendation(
            rule="clipped-gd-koloskova",
            title="clipped GD (Koloskova et al. 2023)",
            clip_threshold=c,
            step_size=1.0 / (9.0 * (L0 + c * L1)),
            source=_SOURCE_KOLOSKOVA,
            assumptions=_DETERMINISTIC + " (gradient-difference form within 1/L1)",
            note=_join("c = L0/L1 (free in the theorem); lr = 1/(9·(L0 + c·L1)).", floor_note),
        ),
        Recommendation(
            rule="normalized-gd",
            title="normalized GD (Zhang et al. 2020)",
            clip_threshold=None,
            step_size=gamma * eta_c,
            source=_SOURCE_NORMALIZED,
            assumptions=_DETERMINISTIC,
            note=_join(
                "lr = η_n/(g + β) with η_n = γ·η_c, β = γ; within a factor 2 of clipped GD.",
                floor_note,
            ),
            step_offset=gamma,
        ),
    ]


def _smooth_clipped_rules(L0: float) -> list[Recommendation]:
    """The same three rules when L1 = 0: no clipping, the step sizes at L1 = 0."""
    no_clip = "L1 = 0: no clipping needed"
    return [
        Recommendation(
            rule="clipped-gd-conservative",
            title="clipped GD, conservative (Zhang et al. 2020)",
            clip_threshold=None,
            step_size=1.0 / (10.0 * L0),
            source=_SOURCE_THEOREM_3,
            assumptions=_DETERMINISTIC,
            note=f"{no_clip}; γ = min{{10·L0, L0/L1}} = 10·L0 would only cap the step length at 1.",
        ),
        Recommendation(
            rule="clipped-gd-koloskova",
            title="clipped GD (Koloskova et al. 2023)",
            clip_threshold=None,
            step_size=1.0 / (9.0 * L0),
            source=_SOURCE_KOLOSKOVA,
            assumptions=_DETERMINISTIC + " (gradient-difference form within 1/L1)",
            note=f"{no_clip}; lr <= 1/(9·(L0 + c·L1)) = 1/(9·L0) holds for every c.",
        ),
        Recommendation(
            rule="normalized-gd",
            title="normalized GD (Zhang et al. 2020)",
            clip_threshold=None,
            step_size=1.0,
            source=_SOURCE_NORMALIZED,
            assumptions=_DETERMINISTIC,
            note="lr = η_n/(g + β) with η_n = γ·η_c = 1 and β = γ = 10·L0 at L1 = 0.",
            step_offset=10.0 * L0,
        ),
    ]


def _fixed_step_theory(L0: float, L1: float, G_max: float) -> Recommendation | None:
    """Zhang et al. 2020, Theorem 6 with M = G_max; needs no floor since M·L1 + L0 > 0 suffices."""
    denominator = 2.0 * (G_max * L1 + L0)
    if not denominator > 0:
        return None
    return Recommendation(
        rule="fixed-step-gd-theory",
        title="fixed-step GD, theory (Zhang et al. 2020)",
        clip_threshold=None,
        step_size=1.0 / denominator,
        source=_SOURCE_THEOREM_6,
        assumptions=_DETERMINISTIC + "; gradient norm at most M on the sublevel set",
        note="lr = 1/(2·(M·L1 + L0)) with M = G_max, the largest measured gradient norm "
        "(a lower estimate of the sup over the sublevel set).",
    )


def _clipped_sgd(L0: float, L1: float, tau: float, T: int, floor_note: str) -> Recommendation:
    """Zhang et al. 2020, Theorem 7: gradient noise bounded by tau, T steps."""
    terms = [1.0 / (20.0 * L0), 1.0 / math.sqrt(T)]
    noise_term = 128.0 * L1 * tau  # 0 when L1·τ underflows: then the term sets no bound
    if noise_term > 0:
        terms.append(1.0 / noise_term)
    clip = None if L1 == 0 else min(10.0 * L0, L0 / L1)
    return Recommendation(
        rule="clipped-sgd",
        title="clipped SGD, noise bounded by τ (Zhang et al. 2020)",
        clip_threshold=clip,
        step_size=min(terms),
        source=_SOURCE_THEOREM_7,
        assumptions="(L0, L1)-smooth objective; stochastic gradient noise at most τ "
        "almost surely; T steps",
        note=_join(
            f"lr = min{{1/(20·L0), 1/(128·L1·τ), 1/√T}} with τ = {tau:.3g}, T = {T}; "
            "clip γ = min{10·L0, L0/L1}. A measured noise level (smoothprof fit: the median "
            "spread of per-batch gradients) stands in for the theorem's almost-sure bound, which "
            "can be larger. Check the printed h_k of Theorem 7 before relying on it.",
            "L1 = 0: no clipping needed." if clip is None else floor_note,
        ),
    )


def _stochastic_rule_omitted(*, tau_missing: bool) -> str:
    """Why the clipped SGD rule (Theorem 7) is left out: the input that is missing, and how to
    get it (``recommend`` asks for the rule only when one of its two inputs is given)."""
    if tau_missing:
        missing = (
            "the gradient noise τ was not measured: the probe measures it as the spread of the "
            "per-batch gradients, which needs 2 or more probe batches (smoothprof run "
            "--probe-batches 2 or more; in the library, give Probe 2 or more batches, or pass "
            "recommend(grad_noise=...))"
        )
    else:
        missing = (
            "T, the number of training steps, is not known: smoothprof run records it (the "
            "config's steps); in the library, write the training rows "
            "(TrajectoryWriter.append_train) or config {'steps': T}, or pass "
            "recommend(num_steps=...)"
        )
    return f"the clipped SGD rule (Zhang et al. 2020, Theorem 7) is omitted: {missing}."


def _secondary_rules(L0: float, L1: float, floor_note: str) -> list[Recommendation]:
    """Pethick et al. 2025 and Vankov et al. 2024, both [secondary]."""
    if L1 == 0:
        pethick = Recommendation(
            rule="clipped-gd-pethick",
            title="clipped GD, sharper constant (Pethick et al. 2025)",
            clip_threshold=None,
            step_size=1.0 / L0,
            source=_SOURCE_PETHICK,
            assumptions=_DETERMINISTIC,
            note="L1 = 0: no clipping needed; lr = 1/(L0 + c·L1) = 1/L0 for every c.",
        )
        vankov = Recommendation(
            rule="adaptive-step-vankov",
            title="adaptive step (Vankov et al. 2024)",
            clip_threshold=None,
            step_size=1.0 / L0,
            source=_SOURCE_VANKOV,
            assumptions=_DETERMINISTIC,
            note="lr = 1/(L0 + 1.5·L1·g) = 1/L0 at L1 = 0.",
        )
        return [pethick, vankov]
    c = L0 / L1
    return [
        Recommendation(
            rule="clipped-gd-pethick",
            title="clipped GD, sharper constant (Pethick et al. 2025)",
            clip_threshold=c,
            step_size=1.0 / (L0 + c * L1),
            source=_SOURCE_PETHICK,
            assumptions=_DETERMINISTIC,
            note=_join("c = L0/L1; lr = 1/(L0 + c·L1) = 1/(2·L0).", floor_note),
        ),
        Recommendation(
            rule="adaptive-step-vankov",
            title="adaptive step (Vankov et al. 2024)",
            clip_threshold=None,
            step_size=1.0 / (1.5 * L1),
            source=_SOURCE_VANKOV,
            assumptions=_DETERMINISTIC,
            note=_join(
                "lr = 1/(L0 + 1.5·L1·g), written as step_size/(g + step_offset).", floor_note
            ),
            step_offset=L0 / (1.5 * L1),
        ),
    ]


def _is_finite_rule(rule: Recommendation) -> bool:
    """True when every number of the rule is a finite float and the step size is positive."""
    values = (rule.clip_threshold, rule.step_size, rule.step_offset)
    if not all(v is None or math.isfinite(v) for v in values):
        return False
    if rule.clip_threshold is not None and not rule.clip_threshold > 0:
        return False
    return rule.step_size is not None and rule.step_size > 0


def _finite_or_nan(value: float) -> float:
    return value if math.isfinite(value) else math.nan


def _format(speedup: float) -> str:
    return "(undefined)" if math.isnan(speedup) else f"{speedup:.3g}x"


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _literal(value: float) -> str:
    """A Python float literal of `value` with 6 significant digits."""
    if not math.isfinite(value):
        raise ValueError(f"cannot write the non-finite value {value!r} as a step size or threshold")
    return f"{value:.6g}"


# Per-group rules (``smoothprof fit --per-layer``, ``per_layer.py``): measured, not proved.

_SOURCE_GROUP_MEASURED = (
    "the measured rule c = L0/L1 applied to each group's own envelope [measured, not proved]"
)

GROUP_CAVEATS: tuple[str, ...] = (
    "Per-group clip thresholds apply the whole-model rule c = L0/L1 to each group's envelope "
    "(the group's gradient norm against its diagonal Hessian block's norm). No theorem here "
    "covers clipping each group of SGD at its own threshold: they are measured, not proved.",
    "A diagonal block measures how a group's gradient changes when that group alone moves; the "
    "coupling between groups (the off-diagonal blocks) is not measured. By Cauchy interlacing "
    "no block's norm exceeds the whole Hessian's, so the blocks rank where the sharpness sits.",
    "Riabinin et al. 2025 (Gluon, arXiv 2505.13416) analyse a layer-wise (L0, L1)-smoothness, "
    "each layer with its own constants, for LMO-based optimizers (Muon, Scion) [secondary]; "
    "that theory is not a guarantee for per-group clipped SGD.",
)


@dataclass(frozen=True)
class GroupClip:
    """The clip threshold suggested for one parameter group from the group's own fit.

    ``clip_threshold`` is c = L0/L1 of the group's envelope (L0 floored at L1·G_min when the
    fit gives 0, as the whole-model rules do); None when L1 = 0 (the group's points show plain
    smoothness: clipping it is not needed) or the group could not be fitted. ``note`` says which.
    """

    group: str
    clip_threshold: float | None
    source: str
    note: str = ""


def group_clip(
    group: str, fit: EnvelopeFit | None, *, profile_clip: float | None = None
) -> GroupClip:
    """The measured per-group rule (``GROUP_CAVEATS``) for ``group`` fitted as ``fit``.

    ``profile_clip``: the profiling run clipped the whole gradient at this norm, so it only
    showed that group steps up to lr times it were safe; a group's threshold is never looser
    (as the headline keeps a clipped profile's clip when that is tighter).
    """
    clip = _group_threshold(group, fit)
    if (
        profile_clip is not None
        and clip.clip_threshold is not None
        and clip.clip_threshold > profile_clip
    ):
        return GroupClip(
            group,
            profile_clip,
            clip.source,
            f"{clip.note} = {clip.clip_threshold:.3g}, capped at the profiling run's clip "
            f"{profile_clip:.3g}: it showed no looser clip safe",
        )
    return clip


def _group_threshold(group: str, fit: EnvelopeFit | None) -> GroupClip:
    if fit is None:
        return GroupClip(group, None, _SOURCE_GROUP_MEASURED, "not fitted: no clip suggested")
    L0, L1 = fit.L0, fit.L1
    if not (math.isfinite(L0) and math.isfinite(L1)) or L1 <= 0:
        return GroupClip(
            group, None, _SOURCE_GROUP_MEASURED, "L1 = 0: plain smoothness, no clip needed"
        )
    if L0 > 0:
        return GroupClip(group, L0 / L1, _SOURCE_GROUP_MEASURED, "c = L0/L1")
    G_min = float(getattr(fit, "G_min", math.nan))
    if not (math.isfinite(G_min) and G_min > 0):
        return GroupClip(group, None, _SOURCE_GROUP_MEASURED, "L0 = 0 and G_min unknown")
    return GroupClip(
        group, G_min, _SOURCE_GROUP_MEASURED, f"L0 = 0: c = L0'/L1 = G_min = {G_min:.3g}"
    )


def pytorch_group_snippet(
    groups: list[tuple[str, tuple[str, ...], float | None]], *, lr: float | None = None
) -> str:
    """PyTorch code for per-group clipping: ``groups`` are (name, fnmatch patterns over
    ``model.named_parameters()``, clip threshold or None) in the order the run matched them
    (a parameter joins the first group that matches), ``lr`` the step size for every group
    (None: the optimizer line is left to the reader)."""
    lines = [
        "# Per-group clip thresholds from `smoothprof fit --per-layer` (measured, not proved).",
        "import fnmatch",
        "import torch",
        "",
        "GROUPS = {  # name: (patterns over model.named_parameters(), max gradient norm)",
    ]
    for name, patterns, clip in groups:
        threshold = "None" if clip is None else _literal(clip)
        comment = "  # not clipped" if clip is None else ""
        lines.append(f"    {name!r}: ({list(patterns)!r}, {threshold}),{comment}")
    lines += [
        "}",
        "",
        "",
        "def group_of(name):",
        "    for group, (patterns, _) in GROUPS.items():",
        "        if any(fnmatch.fnmatchcase(name, p) for p in patterns):",
        "            return group",
        "    return None",
        "",
        "",
        "params = {group: [] for group in GROUPS}",
        "for name, parameter in model.named_parameters():",
        "    if parameter.requires_grad and group_of(name) is not None:",
        "        params[group_of(name)].append(parameter)",
        "param_groups = [{'params': ps, 'name': g} for g, ps in params.items() if ps]",
    ]
    if lr is not None:
        lines.append(f"optimizer = torch.optim.SGD(param_groups, lr={_literal(lr)})")
    else:
        lines.append("# optimizer = torch.optim.SGD(param_groups, lr=...)  # your step size")
    lines += [
        "",
        "# in the training loop, between loss.backward() and optimizer.step():",
        "for group, (_, max_norm) in GROUPS.items():",
        "    if max_norm is not None and params[group]:",
        "        torch.nn.utils.clip_grad_norm_(params[group], max_norm=max_norm)",
    ]
    return "\n".join(lines)
