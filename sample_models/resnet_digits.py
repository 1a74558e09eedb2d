"""A small residual CNN with BatchNorm classifying 8x8 images of handwritten digits.

What it is
----------
The paper's ResNet20 setting (Zhang et al. 2020, Figure 3: ResNet20 on CIFAR-10), made small
enough for a CPU: a 3x3 convolution to ``WIDTH`` channels, then three stages of ``BLOCKS``
basic residual blocks each (conv-BN-ReLU-conv-BN plus the shortcut, then ReLU; ResNet20 has
three per stage, here one), the second and third stage halving the resolution and doubling the
channels, global average pooling and a linear layer to 10 classes. ``BatchNorm2d`` follows every
convolution, as in ResNet20, so the probe measures a model whose loss depends on the batch
statistics (the probe evaluates it in train mode, on fixed batches).

The data is real when scikit-learn is installed (``pip install "smoothprof[science]"``): its
bundled copy of the UCI optical-recognition digits, 1797 grey-scale 8x8 images (pixel values 0 to
16) of the digits 0 to 9, read from the scikit-learn package itself, with no download. Without
scikit-learn the file draws synthetic digits in the same format: each of the ten digits as the
strokes of a seven-segment display in a 5x7 box, stroke widths, brightness, a shear, a shift of
up to one pixel and pixel noise drawn at random (1800 images, a fixed seed), so the task is not
trivial. One line on stderr says which data the run used. Pixels are scaled to [0, 1] and then
standardised with the data set's mean and standard deviation.

Batches are ``(x, y)``: ``x`` of shape (64, 1, 8, 8), float32, and ``y`` the integer labels, so
the default cross-entropy loss is used.

What to expect
--------------
With the defaults below (plain SGD at lr 0.2 without clipping, 600 steps of 64 images) the
training itself takes a few seconds on two CPU cores and the 26 log-spaced probes about ten:
15 to 20 s in all. On the real digits the loss falls from ~2.5 to ~0.002. The probe's gradient
norm falls fifty-fold (~2 to ~0.04) and the Hessian norm with it (~12-16 to ~2): it stays near or
below 2 / lr = 10 for most of the run, SGD's "edge of stability". ``smoothprof fit`` finds a
Spearman log-log correlation of ~0.85 on the Hessian norm (L0 ~ 9, L1 ~ 3.9) and ~0.94 on the
finite difference, the positive correlation of the paper's Figure 3.

How clear the picture is depends on the step size: at lr 0.1 the Spearman correlation on the
Hessian norm is ~0.44, and at lr 0.05 ~0.04 (the Hessian norm grows during the first steps
while the gradient norm falls: progressive sharpening), while the finite difference keeps ~0.7
at both. The synthetic digits are a harder task: the loss ends near 0.03 to 0.09, and the
correlation is weak (~0.26, and the fitted L1 is 0: plain smoothness).

    smoothprof run sample_models/resnet_digits.py -o digits.h5
    smoothprof fit digits.h5
"""

import functools
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

WIDTH = 8  # channels of the first stage; the second and third have 2x and 4x
BLOCKS = 1  # residual blocks per stage (ResNet20 has 3)
NUM_CLASSES = 10
BATCH_SIZE = 64
SYNTHETIC_PER_CLASS = 180
DATA_SEED = 0  # the synthetic data set is fixed; the run's seed sets the init and the shuffling

defaults = {
    "steps": 600,
    "lr": 0.2,
    "optimizer": "sgd",
    "probe_schedule": "log",  # dense in the first hundred steps, where the loss falls fastest
    "probes_per_decade": 10,
    "probe_batches": 2,
    # Both batches' double-backward graphs take about 5 MiB: keep them for the cheapest HVPs
    # (rebuilding the graph per product is several times slower here).
    "retain_graphs": True,
}


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut (a 1x1 conv and BN when the shape changes),
    then ReLU: the block of ResNet20 (He et al. 2016)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Three stages of basic blocks on 8x8 inputs: 8x8 -> 4x4 -> 2x2, then pool and classify."""

    def __init__(self, width: int = WIDTH, blocks: int = BLOCKS, classes: int = NUM_CLASSES):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        layers, channels = [], width
        for stage in range(3):
            out_channels = width * 2**stage
            for index in range(blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(BasicBlock(channels, out_channels, stride))
                channels = out_channels
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stages(self.stem(x))
        return self.head(features.mean(dim=(2, 3)))


# Seven-segment strokes in a 5-wide, 7-tall box: (row0, col0, row1, col1), inclusive.
_SEGMENTS = {
    "top": (0, 0, 0, 4),
    "upper_left": (0, 0, 3, 0),
    "upper_right": (0, 4, 3, 4),
    "middle": (3, 0, 3, 4),
    "lower_left": (3, 0, 6, 0),
    "lower_right": (3, 4, 6, 4),
    "bottom": (6, 0, 6, 4),
}
_DIGIT_SEGMENTS = {
    0: ("top", "upper_left", "upper_right", "lower_left", "lower_right", "bottom"),
    1: ("upper_right", "lower_right"),
    2: ("top", "upper_right", "middle", "lower_left", "bottom"),
    3: ("top", "upper_right", "middle", "lower_right", "bottom"),
    4: ("upper_left", "upper_right", "middle", "lower_right"),
    5: ("top", "upper_left", "middle", "lower_right", "bottom"),
    6: ("top", "upper_left", "middle", "lower_left", "lower_right", "bottom"),
    7: ("top", "upper_right", "lower_right"),
    8: tuple(_SEGMENTS),
    9: ("top", "upper_left", "upper_right", "middle", "lower_right", "bottom"),
}


def synthetic_digits(per_class: int = SYNTHETIC_PER_CLASS, seed: int = DATA_SEED):
    """Seven-segment digits on an 8x8 canvas with pixel values 0..16, like scikit-learn's.

    Returns images (n, 8, 8) float32 and labels (n,) int64. Each image: the digit's segments
    with a random brightness each (some faint, as a pen skips), a random shear of the upper half,
    a shift of up to one pixel, a blur that thickens strokes by a random amount, and noise.
    """
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for digit in range(NUM_CLASSES):
        for _ in range(per_class):
            canvas = torch.zeros(8, 8)
            shear = int(torch.randint(-1, 2, (1,), generator=g))
            dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
            for name in _DIGIT_SEGMENTS[digit]:
                r0, c0, r1, c1 = _SEGMENTS[name]
                brightness = 0.5 + 0.5 * float(torch.rand((), generator=g))
                for r in range(r0, r1 + 1):
                    for c in range(c0, c1 + 1):
                        row = min(max(r + dy, 0), 7)
                        col = min(max(c + 1 + dx + (shear if r < 3 else 0), 0), 7)
                        canvas[row, col] = max(float(canvas[row, col]), brightness)
            width = 0.15 + 0.35 * float(torch.rand((), generator=g))
            kernel = torch.tensor([[width / 2, width, width / 2], [width, 1.0, width],
                                   [width / 2, width, width / 2]])  # fmt: skip
            blurred = nn.functional.conv2d(canvas[None, None], kernel[None, None], padding=1)[0, 0]
            noisy = blurred.clamp(max=1.0) + 0.1 * torch.randn(8, 8, generator=g)
            images.append((16.0 * noisy).clamp(0.0, 16.0))
            labels.append(digit)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


@functools.lru_cache(maxsize=1)
def _data() -> tuple[torch.Tensor, torch.Tensor, str]:
    """Standardised images (n, 1, 8, 8), labels (n,) and a note naming the data."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        images, labels = synthetic_digits()
        note = (
            f"synthetic seven-segment digits ({len(labels)} images; scikit-learn is not "
            "installed: pip install 'smoothprof[science]' for the real ones)"
        )
    else:
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32)
        labels = torch.tensor(digits.target, dtype=torch.long)
        note = f"scikit-learn's 8x8 handwritten digits ({len(labels)} images)"
    x = images[:, None] / 16.0
    x = (x - x.mean()) / x.std()
    return x, labels, note


_announced = False


def data_source() -> str:
    """Which data the model trains on, in words."""
    return _data()[2]


def model() -> nn.Module:
    return SmallResNet()


def dataloader() -> DataLoader:
    global _announced
    x, y, note = _data()
    if not _announced:
        print(f"resnet_digits: {note}", file=sys.stderr)
        _announced = True
    return DataLoader(TensorDataset(x, y), batch_size=BATCH_SIZE, shuffle=True, drop_last=True)


class UpscaledDigits:
    """The batches of ``dataloader()`` with their images upscaled to (3, size, size): bilinear,
    the grey copied into three channels, for image networks made for colour (the timm and
    torchvision samples); re-iterable, as ``dataloader()`` is."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.digits = dataloader()

    def __iter__(self):
        for images, labels in self.digits:
            large = nn.functional.interpolate(images, size=(self.size, self.size), mode="bilinear")
            yield large.expand(-1, 3, -1, -1).contiguous(), labels
