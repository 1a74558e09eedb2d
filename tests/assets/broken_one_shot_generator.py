# Broken model file: dataloader() is a generator function, so it returns a one-shot iterator:
# the first pass over the data gives its 4 batches, the second finds it exhausted.
import torch
from torch import nn


def model():
    return nn.Linear(4, 3)


def dataloader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    for i in range(0, 64, 16):
        yield x[i : i + 16], y[i : i + 16]
