"""The exceptions for the user's mistakes that live beside torch code, in a module without torch.

The CLI turns them into one line and exit code 1; keeping them here lets it name them without
importing torch (``smoothprof fit`` never needs it). ``loading`` and ``train`` re-export them.
"""

from __future__ import annotations


class ModelFileError(Exception):
    """A model file is missing, broken, or breaks the contract; the message is one line."""


class ConfigError(ValueError):
    """A run option has a value that cannot work; the message is one line."""
