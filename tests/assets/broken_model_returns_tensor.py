# Broken model file: model() returns a tensor instead of a torch.nn.Module.
import torch


def model():
    return torch.zeros(4, 3, requires_grad=True)


def dataloader():
    return [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
