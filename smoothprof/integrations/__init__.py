"""Callbacks for the trainers people already train with.

``smoothprof.integrations.lightning.SmoothnessCallback`` (Lightning) and
``smoothprof.integrations.transformers.SmoothnessCallback`` (the Hugging Face ``Trainer``) probe
around the trainer's optimizer step and write the same trajectory file as ``smoothprof run``.
Each module imports its trainer when it is imported itself: ``import smoothprof`` needs neither.
"""
