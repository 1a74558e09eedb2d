"""A linear RNN on a sequence regression task: the exploding-gradient example of the lecture.

What it is
----------
The recurrence of the lecture notes ("Gradient Clipping", Lecture 10-2), with no nonlinearity and
no biases::

    h_t = W_x x_t + W_h h_{t-1},    h_0 = 0
    y^_t = W_o h_t

with ``x_t`` in R^4, ``h_t`` in R^24 and ``y^_t`` in R^2, over sequences of ``SEQ_LEN = 40`` steps.
The targets come from a *teacher* linear RNN of the same shape whose recurrent matrix is stable
(spectral radius ``TEACHER_RADIUS = 0.9``), plus a little noise; the inputs are standard Gaussian.
The loss is the mean squared error averaged over time, batch and output coordinates,
F = (1/T) sum_t L(y^_t, y_t). The data set (1024 sequences) is generated here with its own fixed
seed, so it is the same task for every run seed; the run's seed sets the student's
initialisation and the shuffling.

What the lecture says
---------------------
The gradient with respect to W_x is

    dF/dW_x = (1/T) sum_t sum_{i<=t} (W_h^T)^(t-i) W_o^T dL/dy^_t x_i^T,

so it contains powers of W_h up to T-1. If the largest |eigenvalue| of W_h is above 1 these
powers grow like radius^t and the gradient explodes; below 1 they shrink and it vanishes. The
curvature grows together with the gradient, which is what (L0, L1)-smoothness,
||Hessian|| <= L0 + L1 ||gradient||, describes, and why clipped gradient descent can use a step
size of order 1/(L0 + c L1) instead of 1/L.

The student's W_h starts as ``SPECTRAL_RADIUS`` times a random orthogonal matrix, so every
eigenvalue has modulus exactly ``SPECTRAL_RADIUS`` and ||W_h^k|| = SPECTRAL_RADIUS^k. With the
default 1.1 and T = 40, the hidden state at the end of a sequence is amplified by up to
1.1^40 ~ 45: the initial loss is ~1e3 and the initial gradient norm ~2e4.

Changing the radius
-------------------
Edit ``SPECTRAL_RADIUS`` below (``SEQ_LEN`` scales the effect the same way: what matters is
roughly SPECTRAL_RADIUS ** SEQ_LEN). Try 0.9 for a tame run (initial loss ~6, gradient norm ~20,
clipping acts only in the first few dozen steps), or 1.2 for a harsher one (1.2^40 ~ 1.5e3:
initial loss ~4e5, gradient norm ~7e6; with clipping it still trains to ~4e-2).

What to expect
--------------
With the defaults below (plain SGD, lr 0.03, clip 1.0, 300 steps: about a second of training on
two CPU cores, while the 30 probes take most of the run's time) the loss falls from ~1e3 to
~3e-2 (the noise floor is 2.5e-3) and W_h's spectral radius shrinks from 1.1 to ~0.92 (the
teacher is at 0.9). Clipping acts on the first ~70-100 steps, while the gradient norm falls by
five orders of magnitude (~2e4 -> ~0.2). The probe shows the Hessian norm falling with it, from
~5e5 to ~65: the (L0, L1) picture of the lecture, which ``smoothprof fit`` turns into L0, L1, a
clip threshold and a step size. Late in the run the Hessian norm settles just below
2 / lr ~ 67: at this step size SGD runs at the "edge of stability", so a smaller lr shows a
somewhat larger late-run Hessian norm (~80 at lr 0.02).

Without clipping (``--no-clip``) the same lr 0.03 reaches inf/nan within a few steps.
Unclipped SGD needs lr <= ~1e-4 to survive the first steps, and then it is slow: after 300 steps
the loss is still ~1.5, fifty times the clipped run's. That contrast is the lecture's point:
clipping both stabilises and accelerates.

    smoothprof run sample_models/linear_rnn.py -o rnn.h5
    smoothprof fit rnn.h5
"""

import math

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SPECTRAL_RADIUS = 1.1  # initial max |eigenvalue| of the student's W_h; > 1 makes gradients explode
SEQ_LEN = 40  # T, the sequence length: the powers of W_h in the gradient go up to T - 1
TEACHER_RADIUS = 0.9  # spectral radius of the teacher's W_h (a stable, learnable target)
INPUT_DIM = 4
HIDDEN_DIM = 24
OUTPUT_DIM = 2
NUM_SEQUENCES = 1024
BATCH_SIZE = 64
NOISE_STD = 0.05  # target noise, relative to targets normalised to unit standard deviation
DATA_SEED = 1234  # the data set is fixed; the run's seed only sets the init and the shuffling

defaults = {
    "steps": 300,
    "lr": 0.03,
    "optimizer": "sgd",
    "clip": 1.0,
    "probe_schedule": "log",  # dense while the gradient falls by five orders of magnitude
    "probes_per_decade": 10,
    "probe_batches": 2,
    # Both batches' double-backward graphs take about 1 MiB: keep them for the cheapest HVPs.
    "retain_graphs": True,
}


def _orthogonal(n: int, radius: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``radius`` times a random n x n orthogonal matrix: eigenvalues of modulus ``radius``."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator))
    q = q * torch.sign(torch.diagonal(r))  # makes q Haar-distributed
    return radius * q


class LinearRNN(nn.Module):
    """h_t = W_x x_t + W_h h_{t-1}, y^_t = W_o h_t; input (batch, T, d) -> output (batch, T, m)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, radius: float):
        super().__init__()
        self.W_x = nn.Parameter(torch.randn(hidden_dim, input_dim) / math.sqrt(input_dim))
        self.W_h = nn.Parameter(_orthogonal(hidden_dim, radius))
        self.W_o = nn.Parameter(torch.randn(output_dim, hidden_dim) / math.sqrt(hidden_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.W_h.shape[0])
        outputs = []
        for t in range(x.shape[1]):
            h = x[:, t] @ self.W_x.T + h @ self.W_h.T
            outputs.append(h @ self.W_o.T)
        return torch.stack(outputs, dim=1)


def _make_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian input sequences and the teacher RNN's outputs (unit std) plus noise."""
    g = torch.Generator().manual_seed(DATA_SEED)
    w_x = torch.randn(HIDDEN_DIM, INPUT_DIM, generator=g) / math.sqrt(INPUT_DIM)
    w_h = _orthogonal(HIDDEN_DIM, TEACHER_RADIUS, generator=g)
    w_o = torch.randn(OUTPUT_DIM, HIDDEN_DIM, generator=g) / math.sqrt(HIDDEN_DIM)
    x = torch.randn(NUM_SEQUENCES, SEQ_LEN, INPUT_DIM, generator=g)
    h = torch.zeros(NUM_SEQUENCES, HIDDEN_DIM)
    ys = []
    for t in range(SEQ_LEN):
        h = x[:, t] @ w_x.T + h @ w_h.T
        ys.append(h @ w_o.T)
    y = torch.stack(ys, dim=1)
    y = y / y.std()
    y = y + NOISE_STD * torch.randn(y.shape, generator=g)
    return x, y


def model() -> nn.Module:
    return LinearRNN(INPUT_DIM, HIDDEN_DIM, OUTPUT_DIM, SPECTRAL_RADIUS)


def dataloader() -> DataLoader:
    x, y = _make_data()
    return DataLoader(TensorDataset(x, y), batch_size=BATCH_SIZE, shuffle=True, drop_last=True)


def loss(model: nn.Module, batch) -> torch.Tensor:
    """Mean squared error, averaged over time steps, sequences and output coordinates."""
    x, y = batch
    # Written out rather than F.mse_loss: on torch <= 2.15, F.mse_loss(reduction="mean") fails under
    # forward-over-reverse AD (torch.func.jvp of torch.func.grad), pytorch/pytorch#123996.
    return ((model(x) - y) ** 2).mean()
