"""Lightning: ``SmoothnessCallback`` probes (L0, L1)-smoothness around the optimizer step of a
``lightning.pytorch.Trainer`` and writes the trajectory file of ``smoothprof run``::

    from smoothprof.integrations.lightning import SmoothnessCallback

    trainer = lightning.pytorch.Trainer(max_steps=200, callbacks=[SmoothnessCallback("run.h5")])
    trainer.fit(module, loader)          # then: smoothprof fit run.h5

The probe of step t measures in ``on_before_optimizer_step``, when the gradients of step t are
accumulated (and unscaled under AMP) and the parameters are still x_t; it finishes along the
update in ``on_train_batch_end``. The trainer does everything else as without the callback:
accumulation, clipping, AMP, schedulers, DDP (every rank probes, rank 0 writes), resuming (the
file is appended to). The probe's values go to every logger of the trainer
(``trainer.loggers``), under ``smoothprof/``, at the probe's step; ``self.log`` would keep only
those that fall on a ``log_every_n_steps`` step.

Imports Lightning (the ``lightning`` package); ``import smoothprof`` does not.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

try:
    import lightning
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "smoothprof.integrations.lightning needs Lightning: pip install 'smoothprof[lightning]'"
    ) from error

from ..errors import ConfigError
from ..objective import LossFn, trainable_parameters
from ..probe import ESTIMATORS, ProbeRecord
from .trainer_probe import (
    CallbackOptions,
    TrainerProbe,
    logged_values,
    optimizer_config,
    probe_batches_on,
)

_AMP = {"16-mixed": "fp16", "bf16-mixed": "bf16"}


class SmoothnessCallback(pl.Callback):
    """Probe smoothness along a Lightning training run and write the trajectory to ``output``.

    ``loss_fn(module, batch)`` is the probe objective's loss; by default the module's own
    ``training_step(batch, 0)`` (its loss tensor, or the ``"loss"`` of the dict it returns),
    with ``self.log`` muted while the probe evaluates it. A ``training_step`` that changes other
    state (a torchmetrics metric it updates) needs a ``loss_fn`` without that side effect.

    ``probe_batches``: a count of batches drawn from the training dataset (see
    ``trainer_probe.sample_probe_batches``) or the batches themselves. The schedule: ``every``
    k steps, ``schedule`` (a function of the step or a collection of steps), or by default
    ``num_probes`` (30) spread over ``max_steps``. ``max_basis`` (None: 20, or fewer where the
    probe would not fit the device's memory) and ``probe_memory``: see ``CallbackOptions``. The
    other options are ``smoothprof.Probe``'s.
    A file at ``output`` is an error unless ``overwrite``, or unless the run resumes from a
    checkpoint: then it is appended to (the rows of the steps trained again are replaced).
    ``records`` holds this process's probes.
    """

    def __init__(
        self,
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
        super().__init__()
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
        self.loss_fn = loss_fn
        self.records: list[ProbeRecord] = []
        self._probe: TrainerProbe | None = None
        self._step_row: dict[str, Any] | None = None
        self._losses: list[float] = []
        self._scale: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ConfigError(
                "SmoothnessCallback probes around Lightning's automatic optimization step; "
                "with manual optimization, use smoothprof.Probe around your optimizer.step()"
            )
        if len(trainer.optimizers) != 1:
            raise ConfigError(
                f"SmoothnessCallback needs one optimizer, the module configures "
                f"{len(trainer.optimizers)}"
            )
        batches = probe_batches_on(self.options, trainer.train_dataloader, pl_module.device)
        loss_fn = self.loss_fn if self.loss_fn is not None else _training_step_loss(pl_module)
        num_steps = planned_steps(trainer)
        world_size = trainer.world_size
        self._probe = TrainerProbe(
            self.options,
            model=pl_module,
            loss_fn=loss_fn,
            batches=batches,
            optimizer=trainer.optimizers[0],
            num_steps=num_steps,
            start_step=trainer.global_step,
            writes=trainer.is_global_zero,
            attributes={
                "torch_version": torch.__version__,
                "device": str(pl_module.device),
                "trainer": f"lightning {lightning.__version__}",
                "model_class": type(pl_module).__qualname__,
                "world_size": world_size,
                "config": self._config(trainer, pl_module, num_steps, len(batches)),
            },
            distributed=world_size > 1 and torch.distributed.is_initialized(),
        )
        self._losses, self._step_row = [], None

    def _config(
        self, trainer: pl.Trainer, module: pl.LightningModule, num_steps: int | None, batches: int
    ) -> dict[str, Any]:
        """The run's config in ``smoothprof run``'s names: how the trainer trained, and the
        probe's options."""
        clip_value = trainer.gradient_clip_val
        by_norm = str(trainer.gradient_clip_algorithm or "norm") == "norm"
        schedulers = trainer.lr_scheduler_configs
        return {
            **self.options.as_json(num_steps),
            **optimizer_config(trainer.optimizers[0]),
            "optimizer_source": "trainer",
            "scheduler": type(schedulers[0].scheduler).__name__ if schedulers else None,
            "clip": float(clip_value) if clip_value and by_norm else None,
            "clip_value": float(clip_value) if clip_value and not by_norm else None,
            "amp": _AMP.get(str(trainer.precision)),
            "precision": str(trainer.precision),
            "accumulate": trainer.accumulate_grad_batches,
            "probe_batches": batches,
            "world_size": trainer.world_size,
            "probe_dtype": str(trainable_parameters(module)[0].dtype).removeprefix("torch."),
        }

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._probe is None:
            return
        parameters = trainable_parameters(pl_module)
        grads = [p.grad for p in parameters if p.grad is not None]
        norm = (
            float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
            if grads
            else 0.0
        )
        clip = trainer.gradient_clip_val
        if not clip:
            clipped = False
        elif str(trainer.gradient_clip_algorithm or "norm") == "norm":
            clipped = norm > clip
        else:
            clipped = any(bool((g.abs() > clip).any()) for g in grads)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._scale = float(scaler.get_scale()) if scaler is not None else None
        step = trainer.global_step
        self._step_row = {
            "step": step,
            "grad_norm": norm,
            "lr": float(optimizer.param_groups[0]["lr"]),
            "clipped": clipped,
        }
        self._probe.before_update(step)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._probe is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            self._losses.append(float(loss.detach()))  # divided by the accumulation: a share
        if self._step_row is None:  # accumulating: no optimizer step in this batch
            return
        row, self._step_row = self._step_row, None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        skipped = (
            scaler is not None and self._scale is not None and scaler.get_scale() < self._scale
        )
        record = self._probe.after_update(update_made=not skipped)
        row.update(loss=math.fsum(self._losses) if self._losses else math.nan, skipped=skipped)
        row["clipped"] = row["clipped"] and not skipped
        self._losses = []
        self._probe.append_train(row)
        if record is not None:
            self.records.append(record)
            values = logged_values(record)
            for logger in trainer.loggers:
                logger.log_metrics(values, step=record.step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self._close(interrupted=True)
        else:
            text = " ".join(str(exception).split())
            self._close(
                error=f"{type(exception).__name__}: {text}" if text else type(exception).__name__
            )

    def _close(self, **attributes: Any) -> None:
        if self._probe is not None:
            probe, self._probe = self._probe, None
            probe.close(**attributes)


def planned_steps(trainer: pl.Trainer) -> int | None:
    """The optimizer steps the trainer will take: ``max_steps``, else as it estimates them from
    the epochs and the data (None when it cannot)."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    try:
        estimated = trainer.estimated_stepping_batches
    except Exception:  # an iterable without length: the trainer cannot tell
        return None
    return int(estimated) if math.isfinite(estimated) else None


def _training_step_loss(module: pl.LightningModule) -> LossFn:
    """The module's ``training_step`` as the probe's loss, with its logging muted."""
    takes_index = _positional_count(module.training_step) >= 2

    def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        with _muted_logging(module):
            output = module.training_step(batch, 0) if takes_index else module.training_step(batch)
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ConfigError(
                f"{type(module).__name__}.training_step returned {type(output).__name__}, not a "
                "loss the probe can differentiate; pass SmoothnessCallback(loss_fn=...)"
            )
        return loss

    return loss_fn


def _positional_count(method: Callable[..., Any]) -> int:
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return 2
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return 2
    return sum(
        p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        for p in parameters
    )


@contextlib.contextmanager
def _muted_logging(module: pl.LightningModule) -> Iterator[None]:
    """``self.log`` and ``self.log_dict`` do nothing inside: the probe's evaluations of
    ``training_step`` must not reach the user's metrics."""
    saved = {name: vars(module)[name] for name in ("log", "log_dict") if name in vars(module)}

    def do_not_log(*args: Any, **kwargs: Any) -> None:
        return None

    object.__setattr__(module, "log", do_not_log)
    object.__setattr__(module, "log_dict", do_not_log)
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            if name in saved:
                object.__setattr__(module, name, saved[name])
            else:
                vars(module).pop(name, None)
