"""torchvision's MobileNetV3-Small on the handwritten digits of ``resnet_digits.py``, at 32x32.

What it is
----------
``torchvision.models.mobilenet_v3_small(num_classes=10)`` (about 1.5M parameters, no pretrained
weights, nothing is downloaded): inverted residual blocks with squeeze-and-excitation, BatchNorm,
and the Hardswish and Hardsigmoid activations. Those two have no double backward in PyTorch, so
an exact Hessian-vector product through them fails ("derivative for aten::hardsigmoid_backward
is not implemented"); the probe measures such a model through a composite form of both
activations, as it does for batch norm, and training is never affected. The images are those of
``resnet_digits.py`` (imported from it: smoothprof puts a model file's directory first on
``sys.path``), standardised, upscaled to ``SIZE = 32`` pixels (bilinear) and repeated over three
colour channels. Batches are ``(x, y)``; the default loss is the cross-entropy of the logits.
Dropout (p = 0.2 before the classifier) is held fixed within each probe.

Requires ``torchvision`` built for the installed torch (``pip install "smoothprof[vision]"``;
see the note in ``pyproject.toml``: a CUDA torchvision next to the CPU torch fails on import).
Without it the file stops at its first import with smoothprof's one-line error.

What to expect
--------------
Each training step is a forward and backward pass through 1.5M parameters. Measured once on two
CPU cores shared with other work (synthetic digits), with ``--steps 20 --num-probes 3``: at the
``defaults``' lr (momentum SGD at 0.05) the minibatch loss only began to fall (2.31 to 2.05);
the probes at steps 0, 1 and 19 found gradient norms 0.56, 0.58 and 4.3 and Hessian norms 66,
72 and 1,800 (the sharpness grows quickly as training starts), all certified, and took 20 s to
3 min each (99% of the 4-minute run); ``smoothprof fit`` fits them. The tool's full default
run (30 probes over 300 steps on 4 batches) takes tens of minutes here;
``--num-probes 10 --probe-batches 1`` keeps it to a few.

    smoothprof run sample_models/mobilenet_small.py --num-probes 10 --probe-batches 1 -o mb.h5
    smoothprof fit mb.h5
"""

import torchvision
from resnet_digits import UpscaledDigits
from torch import nn

SIZE = 32  # pixels per side after upscaling: MobileNet's five halvings leave 1x1
NUM_CLASSES = 10

defaults = {"steps": 300, "optimizer": "momentum", "lr": 0.05}


def model() -> nn.Module:
    return torchvision.models.mobilenet_v3_small(num_classes=NUM_CLASSES)


def dataloader() -> UpscaledDigits:
    return UpscaledDigits(SIZE)
