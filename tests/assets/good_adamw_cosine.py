# Good model file with its own optimizer and schedule: AdamW with weight decay (none on biases),
# a linear warmup of 5 steps, then a cosine decay to zero at step 40.
import math

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

WARMUP_STEPS, TOTAL_STEPS = 5, 40


def model():
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))


def dataloader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=g)
    y = (x @ torch.randn(4, 3, generator=g)).argmax(dim=1)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)


def optimizer(parameters):
    decay = [p for p in parameters if p.ndim > 1]
    no_decay = [p for p in parameters if p.ndim <= 1]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=0.01,
    )


def lr_factor(step):
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    progress = min(1.0, (step - WARMUP_STEPS) / (TOTAL_STEPS - WARMUP_STEPS))
    return 0.5 * (1 + math.cos(math.pi * progress))


def scheduler(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
