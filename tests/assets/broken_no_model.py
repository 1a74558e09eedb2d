# Broken model file: defines dataloader() but no model.
import torch


def dataloader():
    return [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
