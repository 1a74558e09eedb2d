"""Shared fixtures: small float64 models and an exact dense Hessian to hold estimators against."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

ASSETS = Path(__file__).parent / "assets"
collect_ignore_glob = ["assets/*"]  # model files, good and broken: loaded by tests, not tests
REPO = Path(__file__).resolve().parent.parent


class _CalledWith:
    """Looks like the model to a loss function, but runs it with the given parameters."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor]) -> None:
        self.model, self.params = model, params

    def __call__(self, *args, **kwargs):
        return functional_call(self.model, self.params, args, kwargs)


def benchmark_module(name: str) -> Iterator:
    """benchmarks/NAME.py imported as the module NAME (for a module-scoped fixture to yield),
    removed from sys.modules after."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(name, None)


def dense_hessian(model, loss_fn, batches, *, seed=0):
    """The exact Hessian of f = mean_b loss_fn(model, b) over the trainable parameters.

    Independent of smoothprof's HVP code: torch.autograd.functional.hessian on a function of one
    flat parameter vector, with each batch evaluated after manual_seed(seed + b) like the probe.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p.detach() for n, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.reshape(-1) for p in params]).clone()
    sizes = [p.numel() for p in params]
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def f(vector):
        pieces = [c.view_as(p) for c, p in zip(torch.split(vector, sizes), params)]
        values = dict(zip(names, pieces))
        values.update({n: b.clone() for n, b in buffers.items()})
        total = 0
        for index, batch in enumerate(batches):
            torch.manual_seed(seed + index)
            total = total + loss_fn(_CalledWith(model, values), batch)
        return total / len(batches)

    state = torch.get_rng_state()
    try:
        return torch.autograd.functional.hessian(f, flat)
    finally:
        torch.set_rng_state(state)


def top_eigenvalue(matrix: torch.Tensor) -> float:
    eigenvalues = torch.linalg.eigvalsh(matrix)
    return float(eigenvalues[eigenvalues.abs().argmax()])


def mse_loss(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def cross_entropy_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


class TinyRNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(2, 3, batch_first=True)
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class TinyLSTM(nn.Module):
    """Two layers, bidirectional: every path of the probe's own LSTM."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(2, 3, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def small_models():
    """(name, model, loss_fn, batches): float64, a few dozen parameters each."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    mlp_batches = [
        (torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))) for _ in range(2)
    ]
    cnn = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 2)
    ).double()
    cnn_batches = [(torch.randn(4, 1, 5, 5, dtype=torch.float64), torch.randint(0, 2, (4,)))]
    # Train mode: the probe evaluates batch norm from the batch's statistics, the reference ATen.
    cnn_bn = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 2)
    ).double()
    cnn_bn_batches = [
        (torch.randn(4, 1, 5, 5, dtype=torch.float64), torch.randint(0, 2, (4,))) for _ in range(2)
    ]
    rnn = TinyRNN().double()
    rnn_batches = [
        (torch.randn(4, 5, 2, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64))
        for _ in range(2)
    ]
    lstm = TinyLSTM().double()
    lstm_batches = [
        (torch.randn(3, 4, 2, dtype=torch.float64), torch.randn(3, 1, dtype=torch.float64))
    ]
    return [
        ("mlp-tanh", mlp, cross_entropy_loss, mlp_batches),
        ("cnn", cnn, cross_entropy_loss, cnn_batches),
        ("rnn", rnn, mse_loss, rnn_batches),
        ("cnn-batchnorm", cnn_bn, cross_entropy_loss, cnn_bn_batches),
        ("lstm", lstm, mse_loss, lstm_batches),
    ]


@pytest.fixture
def clean_sys_path():
    """Model files put their directory on sys.path; give each test the path it started with."""
    saved = list(sys.path)
    modules = set(sys.modules)
    yield
    sys.path[:] = saved
    for name in set(sys.modules) - modules:
        if name.startswith("smoothprof_model_"):
            del sys.modules[name]


def solver_storage_bytes(dim: int) -> int:
    """Bytes of the distinct storages of full-size tensors the running Lanczos solver holds
    (its basis blocks, the new vector, the start): read from the solver's frame, for a matvec
    to call."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_name != "_lanczos":
        frame = frame.f_back
    assert frame is not None
    tensors = []
    for value in frame.f_locals.values():
        tensors.extend(getattr(value, "blocks", [value]))  # the basis: a list of blocks
    storages = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.shape[-1:] == (dim,):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
