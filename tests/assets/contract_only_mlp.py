"""A model file written to the contract alone: model() and dataloader(), no loss, no defaults.

A small tanh MLP classifying points of three Gaussian blobs; batches are (x, y).
"""

import torch
from torch import nn


def model():
    return nn.Sequential(
        nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)
    )


def dataloader():
    generator = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 2.0], [-1.7, -1.0], [1.7, -1.0]])
    y = torch.randint(0, 3, (512,), generator=generator)
    x = centers[y] + 0.8 * torch.randn(512, 2, generator=generator)
    dataset = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True)
