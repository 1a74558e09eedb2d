"""smoothprof: measure (L0, L1)-smoothness along a PyTorch training run.

The public API; see README.md ("Use it as a library"). Names are imported from their modules on
first use (PEP 562), so that reading, fitting and analysing a trajectory never import torch:
``smoothprof.analyze`` does not, ``smoothprof.Probe`` does.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

# Imported at once: ``recommend`` is also the name of its module, and importing the module
# later (as the CLI does) would put the module in the function's place. Neither needs torch.
from .recommend import (
    ProfilingRun,
    Recommendation,
    Recommendations,
    pytorch_snippet,
    recommend,
)

try:
    __version__ = version("smoothprof")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

# Every other public name and the module that defines it, imported on first use.
_LAZY = {
    "Analysis": "analysis",
    "FitPoints": "analysis",
    "analyze": "analysis",
    "EigenResult": "estimators",
    "finite_difference_smoothness": "estimators",
    "lanczos_top_eigenpair": "estimators",
    "power_iteration_top_eigenpair": "estimators",
    "EnvelopeFit": "fit",
    "FitError": "fit",
    "fit_envelope": "fit",
    "ModelFile": "loading",
    "ModelFileError": "errors",
    "default_loss": "loading",
    "load_model_file": "loading",
    "GroupMeasurement": "probe",
    "HessianNorm": "probe",
    "hessian_block_norms": "probe",
    "PerLayerAnalysis": "per_layer",
    "analyze_per_layer": "per_layer",
    "Probe": "probe",
    "ProbeRecord": "probe",
    "every_k_steps": "schedule",
    "log_spaced_steps": "schedule",
    "spread_steps": "schedule",
    "hessian_norm": "probe",
    "Trajectory": "trajectory",
    "TrajectoryError": "trajectory",
    "TrajectoryWriter": "trajectory",
    "read_trajectory": "trajectory",
    "repair_trajectory": "trajectory",
}

__all__ = [
    "Analysis",
    "EigenResult",
    "EnvelopeFit",
    "FitError",
    "FitPoints",
    "GroupMeasurement",
    "HessianNorm",
    "ModelFile",
    "ModelFileError",
    "PerLayerAnalysis",
    "Probe",
    "ProbeRecord",
    "ProfilingRun",
    "Recommendation",
    "Recommendations",
    "Trajectory",
    "TrajectoryError",
    "TrajectoryWriter",
    "__version__",
    "analyze",
    "analyze_per_layer",
    "default_loss",
    "every_k_steps",
    "finite_difference_smoothness",
    "fit_envelope",
    "hessian_block_norms",
    "hessian_norm",
    "lanczos_top_eigenpair",
    "load_model_file",
    "log_spaced_steps",
    "power_iteration_top_eigenpair",
    "pytorch_snippet",
    "read_trajectory",
    "recommend",
    "repair_trajectory",
    "spread_steps",
]


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use; then it is an ordinary global."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # type checkers and editors see the same names as eager imports
    from .analysis import Analysis, FitPoints, analyze
    from .errors import ModelFileError
    from .estimators import (
        EigenResult,
        finite_difference_smoothness,
        lanczos_top_eigenpair,
        power_iteration_top_eigenpair,
    )
    from .fit import EnvelopeFit, FitError, fit_envelope
    from .loading import ModelFile, default_loss, load_model_file
    from .per_layer import PerLayerAnalysis, analyze_per_layer
    from .probe import (
        GroupMeasurement,
        HessianNorm,
        Probe,
        ProbeRecord,
        every_k_steps,
        hessian_block_norms,
        hessian_norm,
    )
    from .trajectory import (
        Trajectory,
        TrajectoryError,
        TrajectoryWriter,
        read_trajectory,
        repair_trajectory,
    )
