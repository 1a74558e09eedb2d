"""Import a user's model file and call what it defines, with one clear error for any mistake.

A model file is plain Python that defines ``model()`` and ``dataloader()``, and optionally
``loss(model, batch)``, ``probe_batches()``, ``optimizer(parameters)``, ``scheduler(optimizer)``
and a ``defaults`` dict (see README.md). Importing it
runs its code, as pytest runs a conftest.py. Every problem with the file or with what its
functions return becomes a ``ModelFileError`` whose message is one line naming the file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .choices import FILE_OPTIMIZER_OPTIONS
from .errors import ModelFileError
from .wording import plural

LossFn = Callable[[nn.Module, Any], torch.Tensor]
_MODULE_PREFIX = "smoothprof_model_"  # a model file's module: the prefix and a hash of its path


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The loss if the file defines none.

    A batch ``(x, y)``: ``cross_entropy(logits, y)`` for the logits of ``model(x)``, or the loss
    the model computed itself. A dict batch (e.g. ``input_ids`` and ``labels``): ``model(**batch)``
    must compute its own loss, as a ``transformers`` model does when the batch carries labels.
    ``model_output_loss`` says which outputs are understood."""
    if isinstance(batch, Mapping):
        output = model(**batch)
        loss = _own_loss(output)
        if loss is None:
            raise TypeError(
                f"the default loss called model(**batch) on a dict batch and got "
                f"{_describe_output(output)} without a loss; give the batch its labels (e.g. "
                "'labels') or define loss(model, batch) in the model file"
            )
        return loss
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            f"the default loss needs batches (x, y) or dicts, got {_describe(batch)}; "
            "define loss(model, batch) in the model file"
        )
    inputs, targets = batch
    return model_output_loss(model(inputs), targets)


def model_output_loss(output: Any, targets: torch.Tensor) -> torch.Tensor:
    """The default loss of a model's ``output`` for ``targets``.

    A tensor is the logits: ``cross_entropy(output, targets)``; logits of shape (B, T, V) for
    targets (B, T), a sequence model's, are the cross entropy of every position (see
    ``logits_cross_entropy``). An output that carries a loss
    (``output.loss``, ``output["loss"]``, as ``transformers``' ModelOutput when the model was given
    labels) is that loss; one that carries logits (``.logits``, ``["logits"]``), or a tuple or list
    whose first element is a tensor, gives the cross entropy of those logits. Anything else is a
    ``TypeError`` naming what was found.

    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    >>> targets = torch.tensor([0, 1])
    >>> float(model_output_loss((logits, "hidden states"), targets)) == float(
    ...     model_output_loss({"logits": logits}, targets))
    True
    """
    if isinstance(output, torch.Tensor):
        return logits_cross_entropy(output, targets)
    loss = _own_loss(output)
    if loss is not None:
        return loss
    logits = _field(output, "logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0] if isinstance(output[0], torch.Tensor) else None
    if isinstance(logits, torch.Tensor):
        return logits_cross_entropy(logits, targets)
    raise TypeError(
        f"the default loss got {_describe_output(output)} from model(x): not a tensor of logits, "
        "a tuple whose first element is the logits, nor an output with a loss or logits "
        "(.loss, ['loss'], .logits, ['logits']); define loss(model, batch) in the model file"
    )


def logits_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``cross_entropy(logits, targets)``, with the classes last for a sequence model.

    ``F.cross_entropy`` wants the class dimension second ((B, V, T) for targets (B, T)), but a
    language model returns (B, T, V): such logits, with targets of shape (B, T), are flattened to
    (B·T, V) and (B·T,), the mean over every position. When T == V the shapes cannot tell the
    two layouts apart, and PyTorch's (classes second) applies.

    >>> logits = torch.zeros(2, 5, 3)  # batch 2, 5 positions, 3 classes
    >>> round(float(logits_cross_entropy(logits, torch.zeros(2, 5, dtype=torch.long))), 4)  # log 3
    1.0986
    """
    if (
        logits.dim() == 3
        and targets.dim() == 2
        and logits.shape[:2] == targets.shape
        and logits.shape[1] != logits.shape[2]
    ):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return F.cross_entropy(logits, targets)


def _field(output: Any, name: str) -> Any:
    """``output[name]`` of a mapping, else ``output.name``; None when it has neither."""
    if isinstance(output, Mapping):
        return output.get(name)
    if isinstance(output, (torch.Tensor, str, bytes)):
        return None
    return getattr(output, name, None)


def _own_loss(output: Any) -> torch.Tensor | None:
    """The loss a model's output carries (``.loss`` or ``["loss"]``), if it is a tensor."""
    loss = _field(output, "loss")
    return loss if isinstance(loss, torch.Tensor) else None


def _describe_output(output: Any) -> str:
    """What a model returned, named by its type: with its module (``transformers...Output``)
    unless the model file defines it."""
    kind = type(output)
    if isinstance(output, torch.Tensor) or kind.__module__ == "builtins":
        return _describe(output)
    if kind.__module__.startswith(_MODULE_PREFIX):
        return f"a {kind.__qualname__}"
    return f"a {kind.__module__}.{kind.__qualname__}"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    name = type(value).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    if isinstance(value, (tuple, list)):
        return f"{article} {name} of {plural(len(value), 'item')}"
    return f"{article} {name}"


@dataclass(frozen=True)
class ModelFile:
    """What a model file defines, checked for presence and callability."""

    path: Path
    sha256: str
    module: ModuleType = field(repr=False)
    make_model: Callable[[], nn.Module] = field(repr=False)
    make_dataloader: Callable[[], Iterable[Any]] = field(repr=False)
    loss: LossFn = field(repr=False)
    make_probe_batches: Callable[[], Iterable[Any]] | None = field(repr=False)
    defaults: Mapping[str, Any]
    make_optimizer: Callable[[list[torch.Tensor]], Any] | None = field(default=None, repr=False)
    make_scheduler: Callable[[Any], Any] | None = field(default=None, repr=False)

    @property
    def has_own_loss(self) -> bool:
        return self.loss is not default_loss

    def error(self, message: str) -> ModelFileError:
        return ModelFileError(f"{self.path}: {message}")

    def call_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """``loss(model, batch)``, with errors from the user's code turned into a ModelFileError."""
        try:
            return self.loss(model, batch)
        except Exception as error:
            name = "the default loss" if not self.has_own_loss else "loss(model, batch)"
            raise self.error(f"{name} raised {_one_line(error)}") from error

    def backward(
        self, loss: Any, scaled: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> None:
        """``loss.backward()`` on what ``loss(model, batch)`` returned during training, or
        ``scaled(loss).backward()`` (divided by the batches accumulated, scaled for fp16).

        The first loss is checked before the run by ``check_loss``; this catches a later one that
        is no longer a differentiable scalar, and errors raised inside the backward pass."""
        name = "the default loss" if not self.has_own_loss else "loss(model, batch)"
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise self.error(f"{name} returned {_describe(loss)}, not a scalar tensor")
        try:
            (loss if scaled is None else scaled(loss)).backward()
        except Exception as error:
            raise self.error(f"the backward pass of {name} raised {_one_line(error)}") from error

    def batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """Iterate ``loader`` (what ``dataloader()`` returned), turning its errors into ours."""
        try:
            yield from loader
        except Exception as error:
            raise self.error(f"iterating dataloader() raised {_one_line(error)}") from error


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _user_frame_line(error: BaseException, path: Path) -> str:
    frames = [f for f in traceback.extract_tb(error.__traceback__) if Path(f.filename) == path]
    return f" (line {frames[-1].lineno})" if frames else ""


def load_model_file(path: str | Path) -> ModelFile:
    """Import the model file at ``path`` and return what it defines.

    The file's directory goes first on ``sys.path`` so that it can import its neighbours.
    """
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise ModelFileError(f"{path}: no such file")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a directory; expected a Python model file")
    if path.suffix != ".py":
        raise ModelFileError(f"{path}: not a Python file (expected a .py model file)")
    try:
        source = path.read_bytes()
    except OSError as error:
        raise ModelFileError(f"{path}: cannot read: {error.strerror or error}") from None
    try:
        code = compile(source, str(path), "exec")
    except SyntaxError as error:
        raise ModelFileError(f"{path}: line {error.lineno}: syntax error: {error.msg}") from None
    except ValueError as error:
        raise ModelFileError(f"{path}: not Python source: {error}") from None
    module_name = f"{_MODULE_PREFIX}{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    directory = str(path.parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    sys.modules[module_name] = module
    try:
        exec(code, module.__dict__)
    except BaseException as error:
        sys.modules.pop(module_name, None)
        if isinstance(error, KeyboardInterrupt):
            raise
        where = _user_frame_line(error, path)
        raise ModelFileError(
            f"{path}: raised {_one_line(error)} while being imported{where}"
        ) from error

    def required(name: str) -> Callable[..., Any]:
        if not hasattr(module, name):
            raise ModelFileError(f"{path}: defines no {name}(); a model file needs {name}()")
        value = getattr(module, name)
        if not callable(value):
            raise ModelFileError(
                f"{path}: {name} is {_describe(value)}, not a function; define def {name}(): ..."
            )
        return value

    def optional(name: str) -> Callable[..., Any] | None:
        value = getattr(module, name, None)
        if value is not None and not callable(value):
            raise ModelFileError(f"{path}: {name} is {_describe(value)}, not a function")
        return value

    make_model = required("model")
    make_dataloader = required("dataloader")
    loss = optional("loss") or default_loss
    defaults = getattr(module, "defaults", {})
    if not isinstance(defaults, Mapping):
        raise ModelFileError(f"{path}: defaults is {_describe(defaults)}, not a dict")
    decided = [key for key in FILE_OPTIMIZER_OPTIONS if key in defaults]
    if decided and optional("optimizer") is not None:
        raise ModelFileError(
            f"{path}: defaults sets {', '.join(decided)}, which optimizer(parameters) decides; "
            "set it in optimizer() and leave it out of defaults"
        )
    return ModelFile(
        path=path,
        sha256=hashlib.sha256(source).hexdigest(),
        module=module,
        make_model=make_model,
        make_dataloader=make_dataloader,
        loss=loss,
        make_probe_batches=optional("probe_batches"),
        defaults=dict(defaults),
        make_optimizer=optional("optimizer"),
        make_scheduler=optional("scheduler"),
    )


def instantiate_model(model_file: ModelFile) -> nn.Module:
    """Call ``model()`` and check that it returns a module with trainable parameters."""
    try:
        model = model_file.make_model()
    except Exception as error:
        raise model_file.error(f"model() raised {_one_line(error)}") from error
    if not isinstance(model, nn.Module):
        raise model_file.error(f"model() returned {_describe(model)}, not a torch.nn.Module")
    check_no_meta_tensors(model_file, model)
    if not any(p.requires_grad for p in model.parameters()):
        raise model_file.error(
            "model() has no parameters with requires_grad=True; nothing to train"
        )
    return model


def instantiate_optimizer(
    model_file: ModelFile, parameters: list[torch.Tensor]
) -> torch.optim.Optimizer:
    """Call ``optimizer(parameters)`` and check that it returns a ``torch.optim.Optimizer`` over
    some of ``parameters`` (the model's trainable ones) and nothing else."""
    assert model_file.make_optimizer is not None
    try:
        optimizer = model_file.make_optimizer(parameters)
    except Exception as error:
        raise model_file.error(f"optimizer(parameters) raised {_one_line(error)}") from error
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise model_file.error(
            f"optimizer(parameters) returned {_describe(optimizer)}, not a torch.optim.Optimizer"
        )
    given = {id(p) for p in parameters}
    stepped = [p for group in optimizer.param_groups for p in group["params"]]
    if not stepped:
        raise model_file.error("optimizer(parameters) returned an optimizer with no parameters")
    if any(id(p) not in given for p in stepped):
        raise model_file.error(
            "optimizer(parameters) returned an optimizer over tensors that are not the model's "
            "trainable parameters; build it from the parameters it is given"
        )
    return optimizer


def instantiate_scheduler(model_file: ModelFile, optimizer: torch.optim.Optimizer) -> Any:
    """Call ``scheduler(optimizer)`` and check that it returns an LR scheduler of that
    optimizer: an object with a ``step()`` method (``torch.optim.lr_scheduler``'s, or one's own)
    whose ``optimizer``, when it has one, is the one given."""
    assert model_file.make_scheduler is not None
    try:
        scheduler = model_file.make_scheduler(optimizer)
    except Exception as error:
        raise model_file.error(f"scheduler(optimizer) raised {_one_line(error)}") from error
    if not callable(getattr(scheduler, "step", None)):
        raise model_file.error(
            f"scheduler(optimizer) returned {_describe(scheduler)}, not an LR scheduler (an "
            "object with a step() method, e.g. from torch.optim.lr_scheduler)"
        )
    own = getattr(scheduler, "optimizer", optimizer)
    if own is not optimizer:
        raise model_file.error(
            "scheduler(optimizer) returned a scheduler of another optimizer; build it on the "
            "optimizer it is given"
        )
    return scheduler


def step_scheduler(model_file: ModelFile, scheduler: Any, loss: float) -> None:
    """One step of the file's scheduler after an optimizer step; ``ReduceLROnPlateau`` gets the
    step's training loss as its metric."""
    try:
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(loss)
        else:
            scheduler.step()
    except Exception as error:
        raise model_file.error(f"the scheduler's step() raised {_one_line(error)}") from error


def check_no_meta_tensors(model_file: ModelFile, model: nn.Module) -> None:
    """Refuse a model whose parameters or buffers are on the ``meta`` device: they have shapes
    but no values (Hugging Face's empty-weights loading, ``with torch.device("meta")``), so
    nothing can be trained or measured on them."""
    meta = [
        name
        for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers())
        if tensor.is_meta
    ]
    if not meta:
        return
    total = sum(1 for _ in itertools.chain(model.parameters(), model.buffers()))
    tensors = plural(total, "parameter or buffer", "parameters and buffers")
    raise model_file.error(
        f"model() returned a model with {len(meta)} of its {tensors} on the meta device "
        f"(first: {meta[0]!r}): they have shapes but no values, as empty-weights loading or "
        "torch.device('meta') gives; materialize them in model(): load the weights (e.g. "
        "load_state_dict(state, assign=True), or from_pretrained without empty weights), or "
        "allocate them with model.to_empty(device=...) and initialize them (e.g. each "
        "module's reset_parameters())"
    )


def make_dataloader(model_file: ModelFile) -> Iterable[Any]:
    """Call ``dataloader()`` and check that it returns something iterable."""
    try:
        loader = model_file.make_dataloader()
    except Exception as error:
        raise model_file.error(f"dataloader() raised {_one_line(error)}") from error
    try:
        iter(loader)
    except TypeError:
        raise model_file.error(
            f"dataloader() returned {_describe(loader)}, which is not iterable"
        ) from None
    return loader


def first_batches(model_file: ModelFile, count: int) -> list[Any]:
    """The probe batches: ``probe_batches()`` if defined, else the first ``count`` of a fresh
    ``dataloader()``."""
    if model_file.make_probe_batches is not None:
        try:
            batches = list(model_file.make_probe_batches())
        except Exception as error:
            raise model_file.error(f"probe_batches() raised {_one_line(error)}") from error
        if not batches:
            raise model_file.error("probe_batches() returned no batches")
        return batches
    loader = make_dataloader(model_file)
    try:
        batches = list(itertools.islice(iter(loader), count))
    except Exception as error:
        raise model_file.error(f"iterating dataloader() raised {_one_line(error)}") from error
    if not batches:
        raise model_file.error("dataloader() yields no batches")
    return batches


def check_loss(model_file: ModelFile, model: nn.Module, batch: Any) -> float:
    """Evaluate the loss on one batch and check it is a differentiable scalar tensor."""
    loss = model_file.call_loss(model, batch)
    name = "loss(model, batch)" if model_file.has_own_loss else "the default loss"
    if not isinstance(loss, torch.Tensor):
        raise model_file.error(f"{name} returned {_describe(loss)}, not a scalar tensor")
    if loss.numel() != 1:
        raise model_file.error(
            f"{name} returned a tensor of shape {tuple(loss.shape)}; it must be a scalar "
            "(reduce it, e.g. with .mean())"
        )
    if not loss.requires_grad:
        raise model_file.error(
            f"{name} returned a tensor without a gradient (computed under no_grad or detached?)"
        )
    return float(loss.detach())
