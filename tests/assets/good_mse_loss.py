# Good model file whose loss is F.mse_loss: jvp-of-grad HVPs fail on it (pytorch/pytorch#123996).
import torch
import torch.nn.functional as F
from torch import nn


def model():
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))


def dataloader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 3, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)]


def loss(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)
