"""Hugging Face: ``SmoothnessCallback`` probes (L0, L1)-smoothness around the optimizer step of
a ``transformers.Trainer`` and writes the trajectory file of ``smoothprof run``::

    from smoothprof.integrations.transformers import SmoothnessCallback

    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.add_callback(SmoothnessCallback(trainer, "run.h5"))
    trainer.train()                      # then: smoothprof fit run.h5

The callback holds its trainer: the probe's loss is ``trainer.compute_loss`` (label smoothing, a
``compute_loss_func`` or a subclass's ``compute_loss`` included), and the probe's values go
through ``trainer.log`` to every integration the Trainer reports to, under ``smoothprof/``, at
the global step after the update (as the Trainer logs its loss). The probe of step t measures in
``on_step_begin``, with the parameters x_t, and finishes along the update in
``on_optimizer_step``. The Trainer does everything else as without the callback: accumulation,
``max_grad_norm``, fp16/bf16, its LR schedule, DDP (every rank probes, the world's process zero
writes), ``resume_from_checkpoint`` (the file is appended to).

Training rows come from the Trainer's own logs, one per logging step (``logging_steps=1``: every
step): its loss (the mean over the steps since the last log), ``grad_norm`` (before clipping),
``learning_rate``.

Imports transformers; ``import smoothprof`` does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import torch

try:
    import transformers
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "smoothprof.integrations.transformers needs transformers and accelerate: "
        "pip install 'smoothprof[transformers]'"
    ) from error

from ..objective import LossFn, trainable_parameters
from ..probe import ESTIMATORS, ProbeRecord
from .trainer_probe import (
    LOGGED_PREFIX,
    CallbackOptions,
    TrainerProbe,
    logged_values,
    optimizer_config,
    probe_batches_on,
)


class SmoothnessCallback(TrainerCallback):
    """Probe smoothness along ``trainer``'s training and write the trajectory to ``output``.

    Add it with ``trainer.add_callback(SmoothnessCallback(trainer, ...))``. ``loss_fn(model,
    batch)``: the probe objective's loss; by default ``trainer.compute_loss(model, batch)``.
    ``probe_batches``: a count of batches drawn from the training dataset (see
    ``trainer_probe.sample_probe_batches``; collated by the Trainer's data collator) or the
    batches themselves. The schedule: ``every`` k steps, ``schedule`` (a function of the step or
    a collection of steps), or by default ``num_probes`` (30) spread over the Trainer's
    ``max_steps``. ``max_basis`` (None: 20, or fewer where the probe would not fit the device's
    memory) and ``probe_memory``: see ``CallbackOptions``. The other options are
    ``smoothprof.Probe``'s. A file at ``output`` is an
    error unless ``overwrite``, or unless the Trainer resumes from a checkpoint: then it is
    appended to. ``records`` holds this process's probes. When training raises, the file is left
    as a killed run's (every row readable); ``close()`` closes it.
    """

    def __init__(
        self,
        trainer: transformers.Trainer,
        output: str | Path = "smoothness.h5",
        *,
        loss_fn: LossFn | None = None,
        probe_batches: int | Sequence[Any] = 4,
        every: int | None = None,
        schedule: Callable[[int], bool] | Collection[int] | None = None,
        num_probes: int | None = None,
        estimators: Sequence[str] = ESTIMATORS,
        rtol: float = 1e-3,
        max_hvps: int = 100,
        max_basis: int | None = None,
        probe_memory: float | None = None,
        fd_points: Sequence[float] = (0.5,),
        mode: str = "train",
        seed: int = 0,
        hvp_method: str = "auto",
        overwrite: bool = False,
    ) -> None:
        self.options = CallbackOptions.from_arguments(
            output,
            probe_batches=probe_batches,
            every=every,
            schedule=schedule,
            num_probes=num_probes,
            estimators=estimators,
            rtol=rtol,
            max_hvps=max_hvps,
            max_basis=max_basis,
            probe_memory=probe_memory,
            fd_points=fd_points,
            mode=mode,
            seed=seed,
            hvp_method=hvp_method,
            overwrite=overwrite,
        )
        self.trainer = trainer
        self.loss_fn = loss_fn
        self.records: list[ProbeRecord] = []
        self._probe: TrainerProbe | None = None
        self._record: ProbeRecord | None = None
        self._skipped = False

    def _compute_loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return self.trainer.compute_loss(model, batch)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.close()  # a train() that raised before: its file is closed now
        loader = kwargs.get("train_dataloader")
        device = trainable_parameters(model)[0].device
        batches = probe_batches_on(self.options, loader, device)
        optimizer = getattr(optimizer, "optimizer", optimizer)  # inside accelerate's wrapper
        wrapped = getattr(self.trainer, "model_wrapped", model)
        distributed = args.world_size > 1 and torch.distributed.is_initialized()
        num_steps = state.max_steps if state.max_steps and state.max_steps > 0 else None
        self._probe = TrainerProbe(
            self.options,
            model=wrapped if distributed else model,
            loss_fn=self.loss_fn if self.loss_fn is not None else self._compute_loss,
            batches=batches,
            optimizer=optimizer,
            num_steps=num_steps,
            start_step=state.global_step,
            writes=state.is_world_process_zero,
            attributes={
                "torch_version": torch.__version__,
                "device": str(device),
                "trainer": f"transformers {transformers.__version__}",
                "model_class": type(model).__qualname__,
                "world_size": args.world_size,
                "config": {
                    **self.options.as_json(num_steps),
                    **optimizer_config(optimizer),
                    "optimizer_source": "trainer",
                    "scheduler": _scheduler_name(kwargs.get("lr_scheduler")),
                    "clip": float(args.max_grad_norm) if args.max_grad_norm else None,
                    "amp": "fp16" if args.fp16 else "bf16" if args.bf16 else None,
                    "accumulate": args.gradient_accumulation_steps,
                    "probe_batches": len(batches),
                    "world_size": args.world_size,
                    "logging_steps": args.logging_steps,
                    "probe_dtype": str(trainable_parameters(model)[0].dtype).removeprefix("torch."),
                },
            },
            distributed=distributed,
        )

    def on_step_begin(self, args, state, control, **kwargs):
        if self._probe is not None:
            self._probe.before_update(state.global_step)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._probe is None:
            return
        self._skipped = bool(getattr(optimizer, "step_was_skipped", False))
        self._record = self._probe.after_update(update_made=not self._skipped)

    def on_step_end(self, args, state, control, **kwargs):
        record, self._record = self._record, None
        if record is not None:
            self.records.append(record)
            # trainer.log consumes the flag that makes the Trainer log its loss at this step.
            should_log = control.should_log
            self.trainer.log(logged_values(record))
            control.should_log = should_log

    def on_log(self, args, state, control, logs=None, **kwargs):
        """The Trainer's training log as a training row of the file."""
        if self._probe is None or not logs or "loss" not in logs:
            return
        if any(key.startswith(LOGGED_PREFIX) for key in logs):
            return
        grad_norm = _number(logs.get("grad_norm"))
        self._probe.append_train(
            {
                "step": state.global_step - 1,  # the update just made
                "loss": _number(logs["loss"]),
                "grad_norm": grad_norm,
                "lr": _number(logs.get("learning_rate")),
                "clipped": bool(args.max_grad_norm)
                and not self._skipped
                and grad_norm > args.max_grad_norm,
                "skipped": self._skipped,
            }
        )

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Close the file (nothing to do when it is closed)."""
        if self._probe is not None:
            probe, self._probe = self._probe, None
            probe.close()


def _number(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        value = value.item()
    return float(value) if isinstance(value, (int, float)) else math.nan


def _scheduler_name(scheduler: Any) -> str | None:
    if scheduler is None:
        return None
    inner = getattr(scheduler, "scheduler", scheduler)  # inside accelerate's wrapper
    return type(inner).__name__


