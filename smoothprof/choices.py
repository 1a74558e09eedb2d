"""Values that options of ``smoothprof run`` choose from, in a module without torch, so that the
CLI shows them in its help without importing torch."""

from __future__ import annotations

OPTIMIZERS = ("sgd", "momentum", "adam")
