# Good model file: MobileNetV3's activations, nn.Hardswish and nn.Hardsigmoid (in a squeeze-and-
# excitation gate), whose ATen kernels have no double backward. No torchvision needed.
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, 4, 1)
        self.expand = nn.Conv2d(4, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        scale = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.expand(torch.relu(self.reduce(scale))))


def model():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.Hardswish(inplace=True),
        SqueezeExcite(8),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 3),
    )


def dataloader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 6, 6, generator=g)
    y = (x.flatten(1) @ torch.randn(36, 3, generator=g)).argmax(dim=1)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
