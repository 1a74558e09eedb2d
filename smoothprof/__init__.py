"""smoothprof: measure (L0, L1)-smoothness along a PyTorch training run.

The public API; see README.md ("Use it as a library").
"""

from importlib.metadata import PackageNotFoundError, version

from .estimators import (
    EigenResult,
    finite_difference_smoothness,
    lanczos_top_eigenpair,
    power_iteration_top_eigenpair,
)
from .fit import EnvelopeFit, FitError, fit_envelope
from .loading import ModelFile, ModelFileError, default_loss, load_model_file
from .probe import HessianNorm, Probe, ProbeRecord, every_k_steps, hessian_norm
from .recommend import (
    ProfilingRun,
    Recommendation,
    Recommendations,
    pytorch_snippet,
    recommend,
)
from .trajectory import (
    Trajectory,
    TrajectoryError,
    TrajectoryWriter,
    read_trajectory,
    repair_trajectory,
)

try:
    __version__ = version("smoothprof")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "EigenResult",
    "EnvelopeFit",
    "FitError",
    "HessianNorm",
    "ModelFile",
    "ModelFileError",
    "Probe",
    "ProbeRecord",
    "ProfilingRun",
    "Recommendation",
    "Recommendations",
    "Trajectory",
    "TrajectoryError",
    "TrajectoryWriter",
    "__version__",
    "default_loss",
    "every_k_steps",
    "finite_difference_smoothness",
    "fit_envelope",
    "hessian_norm",
    "lanczos_top_eigenpair",
    "load_model_file",
    "power_iteration_top_eigenpair",
    "pytorch_snippet",
    "read_trajectory",
    "recommend",
    "repair_trajectory",
]
