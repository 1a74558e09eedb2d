"""The edge of stability: the sharpness at which an optimizer's step stops being stable.

On a quadratic with curvature lambda, gradient descent with step size lr diverges once
lambda > 2 / lr; neural networks trained at a fixed lr drive their sharpness up to that threshold
and hover there (Cohen et al. 2021). The threshold depends on the optimizer:

- SGD: the top Hessian eigenvalue against 2 / lr (Cohen et al., ICLR 2021);
- SGD with heavy-ball momentum beta: the top Hessian eigenvalue against (2 + 2 beta) / lr (same);
- Adam / AdamW: the top eigenvalue of P^-1 H against (2 + 2 beta1) / ((1 - beta1) lr) (Cohen et
  al. 2022),

with P = diag(sqrt(v_hat) + eps) from Adam's bias-corrected second moment: 38 / lr for
beta1 = 0.9. Pure arithmetic on numbers a trajectory file holds (numpy only, no torch).

>>> stability_threshold("sgd", 0.1)
20.0
>>> round(stability_threshold("adam", 0.01, beta1=0.9), 6)
3800.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

KINDS = ("sgd", "momentum", "adam")
"""The optimizers with a threshold from the sources: plain SGD, SGD with heavy-ball momentum
(PyTorch's ``SGD(momentum=beta)`` without dampening or Nesterov), Adam and AdamW."""

LATE_SHARE = 0.25
"""``edge_of_stability`` compares the sharpness of the last quarter of the probes (by step)."""


@dataclass(frozen=True)
class StabilityRule:
    """How an optimizer's threshold is computed, and where the formula comes from ([secondary]:
    from a restatement of the paper, not yet checked against its text)."""

    kind: str
    sharpness: str  # the quantity the threshold bounds
    formula: str
    source: str


RULES = {
    "sgd": StabilityRule(
        "sgd",
        "top Hessian eigenvalue",
        "2 / lr",
        "Cohen, Kaur, Li, Kolter, Talwalkar (ICLR 2021), Gradient descent on neural networks "
        "typically occurs at the edge of stability [secondary]",
    ),
    "momentum": StabilityRule(
        "momentum",
        "top Hessian eigenvalue",
        "(2 + 2 momentum) / lr",
        "Cohen, Kaur, Li, Kolter, Talwalkar (ICLR 2021), Gradient descent on neural networks "
        "typically occurs at the edge of stability [secondary]",
    ),
    "adam": StabilityRule(
        "adam",
        "top eigenvalue of P^-1 H, Adam's P = sqrt(v_hat) + eps",
        "(2 + 2 beta1) / ((1 - beta1) lr)",
        "Cohen et al. (2022), Adaptive gradient methods at the edge of stability [secondary]",
    ),
}


def stability_threshold(
    kind: str, lr: float, *, momentum: float = 0.0, beta1: float = 0.9
) -> float:
    """The sharpness above which the optimizer ``kind`` with step size ``lr`` is unstable on a
    quadratic: 2/lr (sgd), (2 + 2 momentum)/lr (momentum), (2 + 2 beta1)/((1 - beta1) lr) (adam).
    NaN for an lr that is not a positive finite number."""
    if kind not in RULES:
        raise ValueError(f"no stability threshold for optimizer {kind!r}; known: {list(KINDS)}")
    if not (math.isfinite(lr) and lr > 0):
        return math.nan
    if kind == "sgd":
        return 2.0 / lr
    if kind == "momentum":
        return (2.0 + 2.0 * momentum) / lr
    if not 0 <= beta1 < 1:
        raise ValueError(f"beta1 must lie in [0, 1), got {beta1}")
    return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)


@dataclass(frozen=True, eq=False)  # arrays: == would be ambiguous
class EdgeOfStability:
    """A run's sharpness against its optimizer's stability threshold, at its probes.

    ``sharpness`` is the column ``column`` (``hessian_norm`` for SGD, ``preconditioned_sharpness``
    for Adam); ``threshold`` the threshold at each probe's step, ``late_threshold`` its median
    over the late probes. ``late_ratio`` is the median of
    sharpness / threshold over the last ``LATE_SHARE`` of the probes with both finite (near 1: the
    run trains at the edge of stability; well below 1: stable; above 1: beyond it); ``late_steps``
    the first and last step it covers.
    """

    kind: str
    column: str
    step: np.ndarray
    sharpness: np.ndarray
    threshold: np.ndarray
    late_ratio: float
    late_steps: tuple[int, int] | None
    late_threshold: float = math.nan

    @property
    def rule(self) -> StabilityRule:
        return RULES[self.kind]


def optimizer_kind(config: dict) -> str | None:
    """The kind of a run's built-in optimizer from its config (``--optimizer``), or None."""
    name = config.get("optimizer")
    return name if name in KINDS else None


def edge_of_stability(
    probes: dict[str, np.ndarray],
    train: dict[str, np.ndarray],
    config: dict,
) -> EdgeOfStability | None:
    """The sharpness and threshold of a trajectory's probes; None when either is unknown.

    The threshold is the probe's own ``stability_threshold`` column (the probe computes it from
    the optimizer it observes, whatever built it); in files without that column, from the run's
    ``--optimizer``, ``--momentum`` (Adam: torch's default beta1 0.9) and ``train/lr`` at the
    probe's step.
    """
    if "step" not in probes or not len(probes["step"]):
        return None
    steps = np.asarray(probes["step"], dtype=np.int64)
    threshold = _threshold_column(probes, train, config, steps)
    if threshold is None or not np.isfinite(threshold).any():
        return None
    preconditioned = np.asarray(probes.get("preconditioned_sharpness", []), dtype=np.float64)
    if len(preconditioned) == len(steps) and np.isfinite(preconditioned).any():
        kind, column = "adam", "preconditioned_sharpness"
    else:
        kind = _kind_from_columns(probes, config)
        column = "hessian_norm"
        if kind is None or kind == "adam":  # Adam's threshold bounds P^-1 H, not H
            return None
    sharpness = np.asarray(probes[column], dtype=np.float64)
    if not np.isfinite(sharpness).any():
        return None
    ratio, late_steps, late_threshold = _late_ratio(steps, sharpness, threshold)
    return EdgeOfStability(
        kind, column, steps, sharpness, threshold, ratio, late_steps, late_threshold
    )


def _kind_from_columns(probes: dict[str, np.ndarray], config: dict) -> str | None:
    kinds = probes.get("stability_kind")
    if kinds is not None and len(kinds):
        codes = {int(code) for code in np.asarray(kinds) if int(code) >= 0}
        if len(codes) == 1:
            code = codes.pop()
            return KINDS[code] if code < len(KINDS) else None
        return None
    return optimizer_kind(config)


def kind_code(kind: str | None) -> int:
    """The ``probes/stability_kind`` value of an optimizer kind: its index in ``KINDS``, -1 for
    an optimizer without a threshold."""
    return KINDS.index(kind) if kind in KINDS else -1


def _threshold_column(
    probes: dict[str, np.ndarray], train: dict[str, np.ndarray], config: dict, steps: np.ndarray
) -> np.ndarray | None:
    if "stability_threshold" in probes:
        return np.asarray(probes["stability_threshold"], dtype=np.float64)
    kind = optimizer_kind(config)
    if kind is None or "lr" not in train or "step" not in train:
        return None
    lr_by_step = dict(zip(np.asarray(train["step"]).tolist(), np.asarray(train["lr"]).tolist()))
    momentum = float(config.get("momentum", 0.0)) if kind == "momentum" else 0.0
    return np.array(
        [
            stability_threshold(kind, float(lr_by_step.get(int(step), math.nan)), momentum=momentum)
            for step in steps
        ]
    )


def _late_ratio(
    steps: np.ndarray, sharpness: np.ndarray, threshold: np.ndarray
) -> tuple[float, tuple[int, int] | None, float]:
    both = np.isfinite(sharpness) & np.isfinite(threshold) & (threshold > 0)
    if not both.any():
        return math.nan, None, math.nan
    kept_steps = steps[both]
    ratios = sharpness[both] / threshold[both]
    count = max(1, math.ceil(LATE_SHARE * len(ratios)))
    order = np.argsort(kept_steps, kind="stable")[-count:]
    late = kept_steps[order]
    late_threshold = float(np.median(threshold[both][order]))
    return float(np.median(ratios[order])), (int(late.min()), int(late.max())), late_threshold
