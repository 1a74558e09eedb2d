# Broken model file: `defaults` has an unknown key "learning_rate" (the option is "lr").
import torch
from torch import nn

defaults = {"steps": 10, "learning_rate": 0.1}


def model():
    return nn.Linear(4, 3)


def dataloader():
    return [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
