# Broken: optimizer(parameters) steps tensors of another model than the one being trained.
import torch
from good_minimal import dataloader, model  # noqa: F401


def optimizer(parameters):
    return torch.optim.SGD(model().parameters(), lr=0.1)
