# Broken model file: model() builds its layers on the meta device, as loading a Hugging Face
# model with empty weights (accelerate's init_empty_weights) does: shapes, but no values.
import torch
from torch import nn


def model():
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


def dataloader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
