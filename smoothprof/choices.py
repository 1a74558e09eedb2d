"""Values that options of ``smoothprof run`` choose from, in a module without torch, so that the
CLI shows them in its help without importing torch."""

from __future__ import annotations

OPTIMIZERS = ("sgd", "momentum", "adam")

AMP_DTYPES = ("bf16", "fp16")
"""``--amp``: train under autocast in bfloat16, or in float16 with a gradient scaler."""

FILE_OPTIMIZER_OPTIONS = ("optimizer", "lr", "momentum")
"""The run options that a model file's ``optimizer(parameters)`` decides instead."""
