# Broken model file: a corrupt sample reaches the loss at training step 9, long after the checks
# before the run (and the probe's batches 0-3) went fine.
import torch
from torch import nn


def model():
    return nn.Linear(4, 3)


def dataloader():
    g = torch.Generator().manual_seed(0)
    return [
        {
            "x": torch.randn(8, 4, generator=g),
            "y": torch.randint(0, 3, (8,), generator=g),
            "index": torch.tensor(i),
        }
        for i in range(12)
    ]


def loss(model, batch):
    if int(batch["index"]) == 9:
        raise ValueError("sample 9 has no label")
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"])
