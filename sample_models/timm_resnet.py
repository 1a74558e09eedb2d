"""timm's ResNet-10-T on the handwritten digits of ``resnet_digits.py``, upscaled to 32x32 colour.

What it is
----------
A network its users did not write: ``timm.create_model("resnet10t", num_classes=10)``, timm's
ResNet-10 with a tiered 3-layer stem and average-pool downsampling (about 4.9M parameters, with
BatchNorm; no pretrained weights, nothing is downloaded). The images are those of
``resnet_digits.py`` (imported from it: smoothprof puts a model file's directory first on
``sys.path``): scikit-learn's 8x8 digits when scikit-learn is installed, else synthetic
seven-segment digits, standardised, upscaled to ``SIZE = 32`` pixels (bilinear) and repeated
over three colour channels, as an ImageNet network expects. Batches are ``(x, y)``; the default
loss is the cross-entropy of the logits.

Requires ``timm`` (``pip install "smoothprof[vision]"``, with a torchvision built for the same
torch: see the note in ``pyproject.toml``); without it the file stops at its first import with
smoothprof's one-line error naming the missing module.

What to expect
--------------
This is the costly sample: each training step is a forward and backward pass through 4.9M
parameters, and each Hessian-vector product of the probe costs about two more. Measured once on
two CPU cores shared with other work (synthetic digits, scikit-learn not installed), with
``--steps 20 --num-probes 3``: the minibatch loss fell from 2.30 to 0.45 at the ``defaults``' lr
(momentum SGD at 0.05); the probes at steps 0, 1 and 19 found gradient norms 5.0, 5.3 and 2.8
and Hessian norms 246, 791 and 43, all certified with 6 to 11 Hessian-vector products, and took
60 to 100 s each (95% of the 4-minute run); ``smoothprof fit`` fits them. The tool's full
default run (30 probes over 300 steps on 4 batches) takes tens of minutes here;
``--num-probes 10 --probe-batches 1`` keeps it to a few.

    smoothprof run sample_models/timm_resnet.py --num-probes 10 --probe-batches 1 -o timm.h5
    smoothprof fit timm.h5
"""

import timm
from resnet_digits import UpscaledDigits
from torch import nn

SIZE = 32  # pixels per side after upscaling: small, so that the 4.9M-parameter net stays cheap
NUM_CLASSES = 10

defaults = {"steps": 300, "optimizer": "momentum", "lr": 0.05}


def model() -> nn.Module:
    return timm.create_model("resnet10t", pretrained=False, num_classes=NUM_CLASSES)


def dataloader() -> UpscaledDigits:
    return UpscaledDigits(SIZE)
