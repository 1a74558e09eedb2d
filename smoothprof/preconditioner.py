"""What the probe reads from the optimizer it observes: Adam's preconditioner and the optimizer's
stability threshold (``stability.py``). Read only: the optimizer's state is never changed.

Adam (and AdamW) update x <- x - lr m_hat / P with the diagonal P = sqrt(v_hat) + eps, where
v_hat = exp_avg_sq / (1 - beta2^step) (``max_exp_avg_sq`` with amsgrad). The sharpness that
governs its stability is the top eigenvalue of P^-1 H (Cohen et al. 2022), which has the
eigenvalues of the symmetric P^-1/2 H P^-1/2: the probe runs Lanczos on that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .stability import stability_threshold

ADAM_TYPES = (torch.optim.Adam, torch.optim.AdamW)


def is_adam(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether ``optimizer`` is exactly ``torch.optim.Adam`` or ``AdamW`` (a subclass may change
    the update rule, so it is not taken for one)."""
    return optimizer is not None and type(optimizer) in ADAM_TYPES


def adam_inverse_sqrt_preconditioner(
    optimizer: torch.optim.Optimizer, parameters: Sequence[torch.Tensor]
) -> torch.Tensor | None:
    """P^-1/2 as one flat tensor over ``parameters`` (in their order, dtype and device), from
    the optimizer's current state: the P of its last update. None before Adam's first update
    (no state yet). A parameter the optimizer does not update (not in it, or without state
    because it never had a gradient) gets 0: the update never moves along it."""
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    pieces = []
    any_state = False
    for parameter in parameters:
        group = groups.get(id(parameter))
        state = optimizer.state.get(parameter) if group is not None else None
        if not state or "exp_avg_sq" not in state or "step" not in state:
            pieces.append(torch.zeros_like(parameter).reshape(-1))
            continue
        any_state = True
        step = float(state["step"])
        beta2 = float(group["betas"][1])
        second = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        second = second.detach().to(dtype=torch.float64)
        p_diag = torch.sqrt(second / (1.0 - beta2**step)) + float(group["eps"])
        pieces.append(p_diag.rsqrt().reshape(-1).to(dtype=parameter.dtype))
    if not any_state:
        return None
    return torch.cat(pieces)


def optimizer_stability(optimizer: torch.optim.Optimizer | None) -> tuple[str | None, float]:
    """(kind, threshold) of the optimizer at its current lr: kind is "sgd", "momentum" or "adam"
    (``stability.KINDS``) and threshold its ``stability.stability_threshold``; (None, NaN) for
    another optimizer, SGD with dampening or Nesterov (no formula in the sources), or param
    groups that differ in lr, momentum or betas (no single threshold)."""
    if optimizer is None or not optimizer.param_groups:
        return None, math.nan
    if type(optimizer) is torch.optim.SGD:
        settings = {
            (float(g["lr"]), g.get("momentum", 0), g.get("dampening", 0), g.get("nesterov", False))
            for g in optimizer.param_groups
        }
        if len(settings) != 1:
            return None, math.nan
        lr, momentum, dampening, nesterov = settings.pop()
        if momentum == 0:
            return "sgd", stability_threshold("sgd", float(lr))
        if dampening != 0 or nesterov:
            return None, math.nan
        return "momentum", stability_threshold("momentum", float(lr), momentum=float(momentum))
    if is_adam(optimizer):
        settings = {(float(g["lr"]), float(g["betas"][0])) for g in optimizer.param_groups}
        if len(settings) != 1:
            return None, math.nan
        lr, beta1 = settings.pop()
        return "adam", stability_threshold("adam", float(lr), beta1=beta1)
    return None, math.nan
