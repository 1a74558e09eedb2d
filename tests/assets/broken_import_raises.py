# Broken model file: raises RuntimeError("dataset not found") while being imported.
from pathlib import Path

import torch
from torch import nn

DATA_DIR = Path("/nonexistent/smoothprof-test-data")
if not DATA_DIR.exists():
    raise RuntimeError("dataset not found")


def model():
    return nn.Linear(4, 3)


def dataloader():
    return [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
