"""A tanh MLP regressing a random teacher network's outputs: a model family the sample models
lack (smooth activations, a squared loss), written for benchmarks/vs_practice.py.

Inputs are 8-dimensional Gaussians; the targets are a fixed random 2-layer tanh teacher's
outputs plus noise of standard deviation 0.1. The student has two hidden layers of 64 and is
trained on mean squared error: 2,000 examples in batches of 50.
"""

import torch
from torch import nn

NUM_EXAMPLES, BATCH_SIZE, DIM = 2000, 50, 8


def model():
    return nn.Sequential(
        nn.Linear(DIM, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
    )


def dataloader():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(NUM_EXAMPLES, DIM, generator=g)
    w1 = torch.randn(DIM, 16, generator=g) / DIM**0.5
    w2 = torch.randn(16, 1, generator=g)
    y = torch.tanh(2 * x @ w1) @ w2 + 0.1 * torch.randn(NUM_EXAMPLES, 1, generator=g)
    order = torch.randperm(NUM_EXAMPLES)
    x, y = x[order], y[order]
    starts = range(0, NUM_EXAMPLES, BATCH_SIZE)
    return [(x[i : i + BATCH_SIZE], y[i : i + BATCH_SIZE]) for i in starts]


def loss(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)
