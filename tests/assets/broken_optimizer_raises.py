# Broken: optimizer(parameters) raises (a typo in a keyword argument).
import torch
from good_minimal import dataloader, model  # noqa: F401


def optimizer(parameters):
    return torch.optim.AdamW(parameters, learning_rate=1e-3)
