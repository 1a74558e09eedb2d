# Broken: scheduler(optimizer) schedules an optimizer of its own, not the run's.
import torch
from good_minimal import dataloader, model  # noqa: F401


def scheduler(optimizer):
    own = torch.optim.SGD(model().parameters(), lr=0.1)
    return torch.optim.lr_scheduler.StepLR(own, step_size=1)
