# Broken: scheduler(optimizer) raises (CosineAnnealingLR needs T_max).
import torch
from good_minimal import dataloader, model  # noqa: F401


def scheduler(optimizer):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer)
