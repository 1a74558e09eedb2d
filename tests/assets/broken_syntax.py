# Broken model file: a syntax error (the loader must report it, with the line, not crash).
import torch
from torch import nn


def model(:
    return nn.Linear(4, 3)


def dataloader():
    return [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
