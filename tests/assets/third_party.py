# Good model file written as an outside user would, using every optional name of the contract.
"""Toy bar detector: is the bright bar in a noisy 8x8 image horizontal or vertical?"""

import torch
from torch import nn

defaults = {
    "steps": 30,
    "lr": 0.05,
    "optimizer": "momentum",
    "clip": 5.0,
    "probe_every": 10,
    "seed": 7,
}


class BarNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, kernel_size=3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AvgPool2d(2),
        )
        self.head = nn.Linear(4 * 4 * 4, 2)

    def forward(self, images):
        return self.head(self.features(images).flatten(1))


def _make_batch(n, generator):
    target = torch.randint(0, 2, (n,), generator=generator)
    images = 0.3 * torch.randn(n, 1, 8, 8, generator=generator)
    rows = torch.randint(0, 8, (n,), generator=generator)
    for i in range(n):
        if target[i] == 0:
            images[i, 0, rows[i], :] += 1.0
        else:
            images[i, 0, :, rows[i]] += 1.0
    return {"features": images, "target": target}


def model():
    return BarNet()


def dataloader():
    g = torch.Generator().manual_seed(123)
    return [_make_batch(16, g) for _ in range(6)]


def probe_batches():
    g = torch.Generator().manual_seed(456)
    return [_make_batch(16, g) for _ in range(2)]


def loss(model, batch):
    logits = model(batch["features"])
    return nn.functional.cross_entropy(logits, batch["target"], label_smoothing=0.05)
