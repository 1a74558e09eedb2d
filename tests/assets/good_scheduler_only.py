# Good model file with a scheduler() but no optimizer(): the schedule steps the optimizer that
# --optimizer and --lr make.
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def model():
    return nn.Linear(4, 3)


def dataloader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = (x @ torch.randn(4, 3, generator=g)).argmax(dim=1)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)


def scheduler(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
