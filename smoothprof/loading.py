"""Import a user's model file and call what it defines, with one clear error for any mistake.

A model file is plain Python that defines ``model()`` and ``dataloader()``, and optionally
``loss(model, batch)``, ``probe_batches()`` and a ``defaults`` dict (see README.md). Importing it
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

from .errors import ModelFileError
from .wording import plural

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """``cross_entropy(model(x), y)`` for a batch ``(x, y)``: the loss if the file defines none."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            f"the default loss needs batches (x, y), got {_describe(batch)}; "
            "define loss(model, batch) in the model file"
        )
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)


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

    def backward(self, loss: Any) -> None:
        """``loss.backward()`` on what ``loss(model, batch)`` returned during training.

        The first loss is checked before the run by ``check_loss``; this catches a later one that
        is no longer a differentiable scalar, and errors raised inside the backward pass."""
        name = "the default loss" if not self.has_own_loss else "loss(model, batch)"
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise self.error(f"{name} returned {_describe(loss)}, not a scalar tensor")
        try:
            loss.backward()
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
    module_name = f"smoothprof_model_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
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
    return ModelFile(
        path=path,
        sha256=hashlib.sha256(source).hexdigest(),
        module=module,
        make_model=make_model,
        make_dataloader=make_dataloader,
        loss=loss,
        make_probe_batches=optional("probe_batches"),
        defaults=dict(defaults),
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
