"""The 2-layer GPT-2 of ``gpt2_bytes.py``, trained as language models are: AdamW and warmup-cosine.

What it is
----------
The same model, data and batches as ``gpt2_bytes.py`` (imported from it: smoothprof puts a model
file's directory first on ``sys.path``, so a file can import its neighbours), with the file's own
``optimizer(parameters)`` and ``scheduler(optimizer)`` instead of ``--optimizer``/``--lr``:

- AdamW at a peak lr of ``PEAK_LR = 3e-3``, betas (0.9, 0.95), weight decay ``WEIGHT_DECAY = 0.1``
  on the matrices and embeddings and none on the biases and LayerNorm gains (every parameter
  with fewer than two dimensions);
- a linear warmup over the first ``WARMUP_STEPS = 30`` steps, then a cosine decay to 10% of the
  peak at step ``TOTAL_STEPS = 300`` (``torch.optim.lr_scheduler.LambdaLR``, stepped once per
  optimizer step), held there if the run goes on.

``train/lr`` in the trajectory records the lr of every step, and the probe's finite difference is
taken along the update AdamW actually made. Adam's preconditioned sharpness (the top eigenvalue
of P^-1/2 H P^-1/2, P = sqrt(v_hat) + eps) is measured beside the Hessian norm, and
``smoothprof fit`` draws it against the stability threshold 38/lr of the lr at each probe.

Requires ``transformers`` (``pip install "smoothprof[models]"``).

What to expect
--------------
With ``defaults`` (300 steps, smoothprof's default 30 probes spread over the run on one batch)
the run took 19 s, measured once on two shared CPU cores, 81% of it in the probes (the time of 42
training steps each). ``train/lr`` rises from 1e-4 at step 0 to 3e-3 at step 29, is 1.65e-3 at
step 165 and 3e-4 at step 299; the probe loss falls from 5.35 to 3.0 by step 34 and 2.36 at step
299. ``smoothprof fit`` finds Spearman log-log 0.30 with L0 ~ 17, L1 ~ 14.

    smoothprof run sample_models/gpt2_bytes_adamw.py -o gpt2_adamw.h5
    smoothprof fit gpt2_adamw.h5
"""

import math

import torch
from gpt2_bytes import dataloader, model

__all__ = ["dataloader", "lr_factor", "model", "optimizer", "scheduler"]

PEAK_LR = 3e-3
WEIGHT_DECAY = 0.1
WARMUP_STEPS = 30
TOTAL_STEPS = 300
FINAL_FRACTION = 0.1  # the cosine ends at this fraction of the peak lr

defaults = {"steps": TOTAL_STEPS}


def optimizer(parameters: list[torch.Tensor]) -> torch.optim.Optimizer:
    decay = [p for p in parameters if p.ndim >= 2]
    no_decay = [p for p in parameters if p.ndim < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": WEIGHT_DECAY},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=PEAK_LR,
        betas=(0.9, 0.95),
    )


def lr_factor(step: int) -> float:
    """The lr of optimizer step ``step`` (from 0) as a fraction of PEAK_LR."""
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    progress = min(1.0, (step - WARMUP_STEPS) / (TOTAL_STEPS - WARMUP_STEPS))
    return FINAL_FRACTION + (1 - FINAL_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
