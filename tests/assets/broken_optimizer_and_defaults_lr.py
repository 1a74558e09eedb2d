# Broken: optimizer(parameters) chooses the lr, and defaults sets another one.
import torch
from good_minimal import dataloader, model  # noqa: F401

defaults = {"lr": 0.5, "steps": 10}


def optimizer(parameters):
    return torch.optim.SGD(parameters, lr=0.1)
