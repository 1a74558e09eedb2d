# Broken model file: `model` is an int (3), not a callable.
import torch

model = 3


def dataloader():
    return [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
