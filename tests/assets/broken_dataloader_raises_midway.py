# Broken model file: the dataloader fails after six batches, in the middle of the run (the probe
# batches, the first four, were drawn fine).
import torch
from torch import nn


class FlakyLoader:
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for index in range(100):
            if index == 6:
                raise OSError("lost the connection to the data server")
            yield torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)


def model():
    return nn.Linear(4, 3)


def dataloader():
    return FlakyLoader()
