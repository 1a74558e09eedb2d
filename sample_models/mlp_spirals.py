"""A small tanh MLP (with dropout) classifying three interleaved 2-D spirals.

What it is
----------
A nonlinear counterpart to ``linear_rnn.py``: 900 points on three spiral arms (300 per arm, a
little Gaussian noise), generated here with a fixed seed, and an MLP 2 -> 64 -> 64 -> 3 with tanh
activations and a Dropout layer. There is no ``loss`` function: batches are ``(x, y)`` with integer
labels, so smoothprof uses its default, ``cross_entropy(model(x), y)``.

The Dropout layer is there on purpose: it makes the training loss random even for a fixed batch,
so it exercises the probe's handling of dropout (within one probe, one set of dropout masks, so
the probed objective is one fixed function).

What to expect
--------------
With the defaults below (plain SGD, lr 0.5, no clipping, 1500 steps, about a second of training
on two CPU cores, plus the probes) the minibatch loss falls from ~1.1 (= log 3, chance) to ~0.2
(noisy from batch to batch, 0.1-0.45) and the training accuracy reaches ~96-97% as the network
learns to follow the arms. The smoothness here is of the ordinary kind: the gradient norm stays
below ~3 and the Hessian norm between ~2 and ~5 all along, nothing like the linear RNN's five
orders of magnitude. With lr 0.5 the Hessian norm hovers near 2 / lr = 4 (the "edge of
stability"), which shows up as occasional bumps in the loss.

    smoothprof run sample_models/mlp_spirals.py -o spirals.h5
    smoothprof fit spirals.h5
"""

import math

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NUM_ARMS = 3
POINTS_PER_ARM = 300
NOISE_STD = 0.04
TURNS = 1.0  # how many full turns each arm makes; more turns make the task harder
HIDDEN = 64
DROPOUT = 0.1
BATCH_SIZE = 64
DATA_SEED = 0  # the data set is fixed; the run's seed only sets the init, dropout and shuffling

defaults = {
    "steps": 1500,
    "lr": 0.5,
    "optimizer": "sgd",
    "probe_every": 25,
    "probe_batches": 2,
    # Both batches' double-backward graphs take about 0.2 MiB: keep them for the cheapest HVPs.
    "retain_graphs": True,
}


def _spirals() -> tuple[torch.Tensor, torch.Tensor]:
    """Points (n, 2) in roughly [-1, 1]^2 and their arm index (n,) as int64."""
    g = torch.Generator().manual_seed(DATA_SEED)
    xs, ys = [], []
    for arm in range(NUM_ARMS):
        r = torch.linspace(0.05, 1.0, POINTS_PER_ARM)
        theta = 2 * math.pi * (TURNS * r + arm / NUM_ARMS)
        pts = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=1)
        xs.append(pts + NOISE_STD * torch.randn(pts.shape, generator=g))
        ys.append(torch.full((POINTS_PER_ARM,), arm, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


def model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(2, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.Tanh(),
        nn.Dropout(DROPOUT),
        nn.Linear(HIDDEN, NUM_ARMS),
    )


def dataloader() -> DataLoader:
    x, y = _spirals()
    return DataLoader(TensorDataset(x, y), batch_size=BATCH_SIZE, shuffle=True, drop_last=True)
