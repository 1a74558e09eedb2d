"""The step-size search: short trial runs from the initialization at step sizes doubling from
the stability threshold that the profile measured there.

Why a search, and why from there. Gradient descent on a quadratic with top Hessian eigenvalue
λ is stable exactly for steps below 2/λ (with heavy-ball momentum β, below (2 + 2β)/λ), so the
profile's first probe, at the initialization, gives the step at which the first steps become
unstable: ``stability_step``. Above it, networks often still train: the loss is not quadratic
along its sharpest directions (cross-entropy flattens as logits grow), a large first step
catapults the iterate to a flatter region (Lewkowycz et al. 2020), and along the run the
sharpness adapts to the step (the edge of stability, Cohen et al. 2021). How far above depends
on the model: on the models of benchmarks/vs_practice.py the best fixed step lay between 0.6
and 8 times 2/λ0. No formula in λ0 predicts it, so the search measures it: trials of
``trial_steps`` optimizer steps at lr = 2/λ0 · 2^k for k = -2, -1, 0, 1, ..., each from the same
initialization and the same batches as the run, until a trial diverges or ends no lower than it
began.

A short trial favours a long step: the step that lowers the loss most in a tenth of the run is
often not the one that ends lowest after all of it (``python benchmarks/lr_grid.py``: on the
MLP on spirals and the residual CNN, the held-out loss after 500 steps at the step chosen by the
training loss after 50 steps was 31% and 7% above that at the step chosen after 125; on the
small transformer the same). So the best short trial is confirmed: trials of a quarter
of the run's steps at half, once and twice its step (``CONFIRM_FACTORS``; the twice because an
early loss spike can be a catapult that a longer trial recovers from, Lewkowycz et al. 2020), and
the recommended step is the confirming trial with the lowest loss on the probe batches at its
end. Runs too short for a confirming trial longer than a short one skip it.

Where the run was unclipped and its probes show no clip that acts (no c = L0/L1 below the
measured gradient norms with the smoothness growing with them), the search also tries clipping
at a threshold it measured: the median gradient norm of the profile's probes
(``measured_clip_threshold``), with three more confirming trials at once, twice and four times
the best unclipped confirming trial's step (``CLIPPED_FACTORS``); the recommended trial is the
lowest of all six. Above the threshold such a step is normalized, its length lr times the
threshold (clipped and normalized GD, Zhang et al. 2020, take long steps where the gradient is
small and short ones where it is large); why the median is measured, not proved: AutoClip
(Seetharaman et al. 2020) clips at a percentile of the norms seen, and on the models of
``benchmarks/vs_practice.py`` the profile's median with these factors lowered the held-out loss
of three of the six models it applies to (the MLP on spirals 0.740 -> 0.586, the char-LSTM
1.627 -> 1.517, the GPT-2 sample 2.498 -> 2.478), raised the small transformer's by 1% and left
the others as they were (docs/practice.md).

The data classes and the choice are pure (``smoothprof fit`` reads them from the trajectory
file without torch); ``search_step_size`` runs the trials.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .train import PreparedRun

FIRST_POWER = -2  # the first trial: a quarter of the starting step
MAX_TRIALS = 30  # a bound only: a search ends where the trials stop training or improving
PAST_SHARE = 0.5  # a trial that keeps less than half the best trial's progress is past the best
MIN_TRIAL_STEPS = 20
TRIAL_SHARE = 0.1  # a trial is a tenth of the run's steps (at least MIN_TRIAL_STEPS)
CONFIRM_SHARE = 0.25  # a confirming trial is a quarter of the run's steps
CONFIRM_FACTORS = (0.5, 1.0, 2.0)  # the confirming trials' steps, times the best short trial's
# The clipped confirming trials' steps, times the best unclipped confirming trial's: clipping
# shortens the steps where the gradient is large, so longer ones may train.
CLIPPED_FACTORS = (1.0, 2.0, 4.0)
MIN_CLIP_POINTS = 3  # probes with a gradient norm needed to measure a clip threshold
ATTRIBUTE = "step_size_search"  # the trajectory file's attribute holding the search


@dataclass(frozen=True)
class Trial:
    """One trial: ``trial_steps`` steps at ``lr`` from the initialization; the loss on the
    probe batches before (``loss_start``) and after (``loss_end``; inf when it diverged).
    ``clip``: a threshold of its own (the clipped confirming trials'); None: the search's."""

    lr: float
    loss_start: float
    loss_end: float
    diverged_at: int | None = None
    clip: float | None = None

    @property
    def stable(self) -> bool:
        """Trained: did not diverge and ended below where it began."""
        return (
            self.diverged_at is None
            and math.isfinite(self.loss_end)
            and (self.loss_end < self.loss_start)
        )


@dataclass(frozen=True)
class StepSizeSearch:
    """The trials of one search and where they started from.

    ``stability_step`` is the step the grid doubles from (its first trial is a quarter of it):
    (2 + 2 momentum)/λ0 for (momentum) SGD with λ0 the Hessian norm of the first probe, or the
    run's own lr (``base`` says which). ``clip``: the threshold every trial clipped at (the run's
    own, or c = L0/L1 of its probes; None: unclipped). ``confirmations``: the trials of
    ``confirm_steps`` steps around the best short trial (none when the run was too short),
    then those clipped at ``measured_clip``, the probes' median gradient norm, where the search
    tried it (an unclipped search only).
    """

    trial_steps: int
    stability_step: float
    base: str  # e.g. "2/λ0 with λ0 = 12.1 at step 0" or "the run's lr"
    trials: tuple[Trial, ...]
    clip: float | None = None
    optimizer: str | None = None
    confirm_steps: int | None = None
    confirmations: tuple[Trial, ...] = ()
    measured_clip: float | None = None

    def clip_of(self, trial: Trial) -> float | None:
        """The threshold ``trial`` clipped at (None: unclipped)."""
        return trial.clip if trial.clip is not None else self.clip

    @property
    def best(self) -> Trial | None:
        """The recommended trial: the stable confirming trial with the lowest loss at its end,
        or, without confirming trials, the stable short trial with the lowest (the smaller lr
        on a tie); None when none trained."""
        return best_trial(self.confirmations if self.confirmations else self.trials)

    @property
    def best_of_short_trials(self) -> Trial | None:
        return best_trial(self.trials)

    @property
    def best_steps(self) -> int:
        """The length of the trials the recommended one is among."""
        return (
            self.confirm_steps if self.confirmations and self.confirm_steps else (self.trial_steps)
        )

    @property
    def first_unstable(self) -> Trial | None:
        unstable = [t for t in self.trials if not t.stable]
        return min(unstable, key=lambda t: t.lr) if unstable else None

    @property
    def total_steps(self) -> int:
        """The optimizer steps the trials took, counting a diverged trial's up to its stop."""

        def steps(trials: Sequence[Trial], length: int | None) -> int:
            return sum(length or 0 if t.diverged_at is None else t.diverged_at + 1 for t in trials)

        return steps(self.trials, self.trial_steps) + steps(self.confirmations, self.confirm_steps)

    def summary(self) -> str:
        """One line for the run's closing summary."""
        if not self.trials:
            return "step-size search: no trials"
        lrs = [t.lr for t in self.trials]
        text = (
            f"step-size search: {len(self.trials)} trials of {self.trial_steps} steps from the "
            f"initialization, lr {min(lrs):.3g} to {max(lrs):.3g} (doubling from a quarter of "
            f"{self.stability_step:.3g}, {self.base})"
        )
        short = self.best_of_short_trials
        if short is None:
            return text + "; none trained: profile at a smaller lr"
        text += f"; best lr {short.lr:.3g} (loss {short.loss_start:.4g} -> {short.loss_end:.4g})"
        if not self.confirmations:
            return text
        tried = ", ".join(f"{t.lr:.3g}" for t in self.confirmations if t.clip is None)
        clipped = ", ".join(f"{t.lr:.3g}" for t in self.confirmations if t.clip is not None)
        if clipped:
            tried += f"; clipped at {self.measured_clip:.3g}, the median gradient norm: {clipped}"
        best = self.best
        if best is None:
            return text + f"; over {self.confirm_steps} steps none of lr {tried} trained"
        ends = f"lr {best.lr:.3g}" + (
            f" clipped at {best.clip:.3g}" if best.clip is not None else ""
        )
        return text + (
            f"; over {self.confirm_steps} steps (lr {tried}) {ends} ends lowest "
            f"({best.loss_start:.4g} -> {best.loss_end:.4g})"
        )

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["trials"] = [asdict(t) for t in self.trials]
        data["confirmations"] = [asdict(t) for t in self.confirmations]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StepSizeSearch:
        """The search as ``as_json`` wrote it; ValueError when it is not one."""

        def trials_of(items: Sequence[Mapping[str, Any]]) -> tuple[Trial, ...]:
            return tuple(
                Trial(
                    lr=float(t["lr"]),
                    loss_start=float(t["loss_start"]),
                    loss_end=float(t["loss_end"]),
                    diverged_at=None if t.get("diverged_at") is None else int(t["diverged_at"]),
                    clip=None if t.get("clip") is None else float(t["clip"]),
                )
                for t in items
            )

        try:
            trials = trials_of(data["trials"])
            clip = data.get("clip")
            confirm_steps = data.get("confirm_steps")
            measured_clip = data.get("measured_clip")
            return cls(
                trial_steps=int(data["trial_steps"]),
                stability_step=float(data["stability_step"]),
                base=str(data["base"]),
                trials=trials,
                clip=None if clip is None else float(clip),
                optimizer=data.get("optimizer"),
                confirm_steps=None if confirm_steps is None else int(confirm_steps),
                confirmations=trials_of(data.get("confirmations", ())),
                measured_clip=None if measured_clip is None else float(measured_clip),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not a step-size search: {error}") from None


def trial_steps_for(num_steps: int) -> int:
    """A trial's length for a run of ``num_steps``: a tenth of it, at least 20 steps."""
    return max(MIN_TRIAL_STEPS, int(num_steps * TRIAL_SHARE))


def confirm_steps_for(num_steps: int) -> int | None:
    """A confirming trial's length for a run of ``num_steps``: a quarter of it; None when that
    is no longer than a short trial (a run of fewer than 80 steps)."""
    steps = int(num_steps * CONFIRM_SHARE)
    return steps if steps > trial_steps_for(num_steps) else None


def confirm_trials(best: Trial, trial: Callable[[float], Trial]) -> list[Trial]:
    """The confirming trials around the best short trial, in the order of their lr."""
    return [trial(best.lr * factor) for factor in CONFIRM_FACTORS]


def clipped_trials(
    best: Trial, threshold: float, trial: Callable[[float, float], Trial]
) -> list[Trial]:
    """The confirming trials clipped at ``threshold`` (``trial(lr, clip)``), at
    ``CLIPPED_FACTORS`` times the best unclipped confirming trial's step."""
    return [trial(best.lr * factor, threshold) for factor in CLIPPED_FACTORS]


def measured_clip_threshold(grad_norms: Sequence[float]) -> float | None:
    """The median of the finite, positive gradient norms the probes measured; None with fewer
    than ``MIN_CLIP_POINTS``.

    >>> measured_clip_threshold([0.2, 0.4, float("nan"), 0.3])
    0.3
    """
    values = [g for g in grad_norms if math.isfinite(g) and g > 0]
    return statistics.median(values) if len(values) >= MIN_CLIP_POINTS else None


def stability_step(
    hessian_norm: float | None, *, optimizer: str, momentum: float = 0.0
) -> float | None:
    """The largest stable step of (momentum) SGD on a quadratic whose top eigenvalue is the
    measured Hessian norm: 2/λ, (2 + 2β)/λ with momentum β; None for other optimizers or
    without a usable measurement.

    >>> stability_step(4.0, optimizer="sgd")
    0.5
    >>> stability_step(4.0, optimizer="momentum", momentum=0.9)
    0.95
    """
    if hessian_norm is None or not (math.isfinite(hessian_norm) and hessian_norm > 0):
        return None
    if optimizer == "sgd":
        return 2.0 / hessian_norm
    if optimizer == "momentum":
        return (2.0 + 2.0 * momentum) / hessian_norm
    return None


def run_trials(
    base_lr: float, trial: Callable[[float], Trial], *, max_trials: int = MAX_TRIALS
) -> list[Trial]:
    """Trials at base_lr · 2^k for k = FIRST_POWER, FIRST_POWER + 1, ..., until one is not
    stable (diverged, or ended no lower than it began), or is past the best step (it kept less
    than ``PAST_SHARE`` of the best trial's progress), or ``max_trials`` ran; then, while the best
    is the smallest step tried, at k = FIRST_POWER - 1, FIRST_POWER - 2, ... Returned in the
    order of their lr."""
    trials: list[Trial] = []
    for k in range(FIRST_POWER, FIRST_POWER + max_trials):
        result = trial(base_lr * 2.0**k)
        trials.append(result)
        if not result.stable:
            break
        best = min(t.loss_end for t in trials if t.stable)
        if result.loss_start - result.loss_end < PAST_SHARE * (result.loss_start - best):
            break
    # The best at the grid's smallest step has not been bracketed: halve below it until a
    # trial ends no lower than the best so far.
    k = FIRST_POWER
    while len(trials) < max_trials and _best_is_smallest(trials):
        k -= 1
        trials.insert(0, trial(base_lr * 2.0**k))
    return trials


def best_trial(trials: Sequence[Trial]) -> Trial | None:
    """The stable trial with the lowest loss at its end (the smaller lr on a tie)."""
    stable = [t for t in trials if t.stable]
    return min(stable, key=lambda t: (t.loss_end, t.lr)) if stable else None


def _best_is_smallest(trials: list[Trial]) -> bool:
    best = best_trial(trials)
    return best is not None and best.lr == min(t.lr for t in trials)


def search_step_size(
    run: PreparedRun,
    *,
    first_hessian_norm: float | None,
    at_step: int | None,
    trained: bool = False,
    clip: float | None = None,
    measured_clip: float | None = None,
) -> StepSizeSearch:
    """Run the search for a prepared run (after its training: it builds its own model, optimizer
    and batches, so the run's own state is untouched). The trials train as the run did: its
    optimizer (the options' or the model file's, every param group's lr scaled alike), scheduler,
    autocast and accumulation, from the same seed, clipped at ``clip`` (the caller passes the
    run's own clip, or the c = L0/L1 that the headline will clip at). An unclipped search
    (``clip`` None) with a ``measured_clip`` (``measured_clip_threshold`` of the probes'
    gradient norms) also confirms clipped there (``clipped_trials``).

    The grid doubles from a quarter of the stability step 2/λ0 (``first_hessian_norm``, measured
    at ``at_step``), or of the run's own lr when the run ``trained`` (finished without
    diverging, its loss lower at the end) at an lr above that step."""
    import dataclasses

    import torch

    from .loading import (
        instantiate_model,
        instantiate_optimizer,
        instantiate_scheduler,
        make_dataloader,
    )
    from .objective import trainable_parameters
    from .probe import unchanged_model_state
    from .train import (
        cycle_batches,
        make_grad_scaler,
        make_optimizer,
        seed_everything,
        training_step,
    )

    config, model_file = run.config, run.model_file
    name = run.optimizer_name
    momentum = config.momentum
    if run.optimizer_from_file and name == "momentum":
        momentum = float(run.optimizer.param_groups[0].get("momentum", 0.0))
    stable = stability_step(first_hessian_norm, optimizer=name, momentum=momentum)
    if stable is not None:
        threshold = "2" if name == "sgd" else f"(2 + 2·{momentum:g})"
        base = f"{threshold}/λ0 with λ0 = {first_hessian_norm:.4g} at step {at_step}"
        if trained and run.initial_lr > stable:  # the run showed a longer step to train
            base = f"the run's lr, which trained; {base} is {stable:.3g}"
            stable = float(run.initial_lr)
    else:
        stable = float(run.initial_lr)
        base = "the run's lr"
    steps = trial_steps_for(config.steps)

    def probe_loss(model: torch.nn.Module) -> float:
        values = []
        with unchanged_model_state(model, run.device), torch.no_grad():
            if config.probe_mode == "eval":
                model.eval()
            for index, batch in enumerate(run.probe_batches):
                torch.manual_seed(config.seed + index)
                values.append(float(model_file.call_loss(model, batch)))
        return math.fsum(values) / len(values)

    def trial(lr: float, length: int = steps, own_clip: float | None = None) -> Trial:
        seed_everything(config.seed)
        model = instantiate_model(model_file).to(run.device)
        model.train()
        parameters = trainable_parameters(model)
        if model_file.make_optimizer is not None:
            optimizer = instantiate_optimizer(model_file, parameters)
            factor = lr / float(optimizer.param_groups[0]["lr"])
            for group in optimizer.param_groups:
                group["lr"] = float(group["lr"]) * factor
        else:
            optimizer = make_optimizer(dataclasses.replace(config, lr=lr), parameters)
        scheduler = None
        if model_file.make_scheduler is not None:
            scheduler = instantiate_scheduler(model_file, optimizer)
        trial_run = dataclasses.replace(
            run,
            model=model,
            train_model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=make_grad_scaler(config, run.device),
            loader=make_dataloader(model_file),
            comm=None,
        )
        start = probe_loss(model)  # leaves the random state as the run had it here
        batches = cycle_batches(model_file, trial_run.loader)
        threshold = own_clip if own_clip is not None else clip
        for step in range(length):
            _, _, _, finite, _ = training_step(trial_run, model, parameters, batches, threshold)
            if not finite:
                return Trial(lr, start, math.inf, diverged_at=step, clip=own_clip)
        end = probe_loss(model)
        return Trial(lr, start, end if math.isfinite(end) else math.inf, clip=own_clip)

    trials = run_trials(stable, trial)
    confirm_steps = confirm_steps_for(config.steps)
    short_best = best_trial(trials)
    confirmations: list[Trial] = []
    clipped_at = None  # the measured clip, where the clipped confirming trials ran
    if confirm_steps is not None and short_best is not None:
        confirmations = confirm_trials(short_best, lambda lr: trial(lr, confirm_steps))
        unclipped_best = best_trial(confirmations)
        if clip is None and measured_clip is not None and unclipped_best is not None:
            clipped_at = measured_clip
            confirmations += clipped_trials(
                unclipped_best, measured_clip, lambda lr, c: trial(lr, confirm_steps, c)
            )
    return StepSizeSearch(
        trial_steps=steps,
        stability_step=stable,
        base=base,
        trials=tuple(trials),
        clip=clip,
        optimizer=name,
        confirm_steps=confirm_steps if confirmations else None,
        confirmations=tuple(confirmations),
        measured_clip=clipped_at,
    )
