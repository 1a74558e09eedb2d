"""A 2-layer GPT-2 from Hugging Face ``transformers``, trained on the bytes of Python's own source.

What it is
----------
The model is ``transformers``' ``GPT2LMHeadModel`` built from a ``GPT2Config`` (``N_LAYER = 2``
blocks, ``N_HEAD = 4`` heads, width ``N_EMBD = 64``, a context of ``SEQ_LEN = 32``): nothing is
downloaded, ``from_pretrained`` is never called, and the weights start from GPT-2's own random
initialization (seeded by the run). The vocabulary is the 256 byte values, so no tokenizer is
needed either. Dropout is off (the probe would hold its masks fixed, but a model this small on
this much text does not need it), and attention is the ``"eager"`` implementation: PyTorch's
fused CPU attention kernel has no double backward, so under the default ``"sdpa"`` the probe
would fall back to finite-difference Hessian-vector products.

The text is real and ships with Python: the UTF-8 bytes of the standard-library files in
``STDLIB_FILES``, read from ``sysconfig.get_paths()["stdlib"]`` in that order and cut at
``MAX_BYTES``; a missing file is skipped with one line on stderr, and without any, the built-ins'
docstrings are used. Batches are dicts ``{"input_ids", "labels"}`` of ``BATCH_SIZE`` windows of
``SEQ_LEN`` bytes, shuffled by the run's seed. The file defines no ``loss``: the default loss
calls ``model(**batch)``, and GPT-2 computes the cross-entropy of every next byte itself (it
shifts ``labels`` by one), in nats per byte; log 256 = 5.55 is chance.

Requires ``transformers`` (``pip install "smoothprof[models]"``); without it the file stops at
its first line with smoothprof's one-line error naming the missing module.

What to expect
--------------
The model has 118,528 parameters. The ``defaults`` below train with Adam at lr 3e-3 for 300 steps
of 16 x 32 bytes, with smoothprof's own default schedule: 30 probes spread over the run, on one
probe batch (chosen for the model's size: few parameters, but 17 MiB of double-backward graph per
batch). Measured once on two CPU cores shared with other work: the run took 29 s, of which the
probes 88% (2 gradients and ~22 Hessian-vector products each, the time of 70 training steps;
with four probe batches it took 7.5 minutes). The probe loss falls from 5.35 (chance is log 256 =
5.55) to 3.0 by step 21, where the model has learned the byte frequencies and pauses, then to 2.33
by step 299 as it learns indentation and keywords. The gradient norm falls from 4.6 to ~0.6
within 20 steps and stays there (one spike to 3.2 at step 107); the Hessian norm is 74 at the
initialization, 4 to 126 afterwards and ~7 at the end, all 30 certified. ``smoothprof fit``
finds no relation (Spearman log-log -0.04; L0 ~ 21, L1 ~ 33): with Adam the gradient norm hardly
moves after the first steps. Adam's preconditioned sharpness stays far below Adam's stability
threshold 38/lr = 12,667 (a late median ratio of 0.16): at this lr Adam is not at its edge of
stability.

``gpt2_bytes_adamw.py`` trains the same model on the same data as language models are trained:
AdamW with weight decay 0.1, a linear warmup and a cosine decay.

    smoothprof run sample_models/gpt2_bytes.py -o gpt2.h5
    smoothprof fit gpt2.h5
"""

import functools
import os
import sys
import sysconfig

import torch
import transformers
from torch.utils.data import DataLoader

STDLIB_FILES = (
    "textwrap.py",
    "heapq.py",
    "bisect.py",
    "fnmatch.py",
    "shlex.py",
    "queue.py",
    "contextlib.py",
    "functools.py",
    "random.py",
    "calendar.py",
)
MAX_BYTES = 200_000  # the text is cut here, so its size does not grow with new Python versions
VOCAB_SIZE = 256  # one id per byte value
N_LAYER = 2
N_HEAD = 4
N_EMBD = 64
SEQ_LEN = 32
BATCH_SIZE = 16

defaults = {"steps": 300, "optimizer": "adam", "lr": 3e-3}


def config() -> transformers.GPT2Config:
    """GPT-2's architecture at this size, with a byte vocabulary and no dropout."""
    return transformers.GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=SEQ_LEN,
        n_embd=N_EMBD,
        n_layer=N_LAYER,
        n_head=N_HEAD,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        # Eager attention has a double backward, so the probe's Hessian-vector products are exact.
        attn_implementation="eager",
    )


def model() -> torch.nn.Module:
    gpt2 = transformers.GPT2LMHeadModel(config())
    # The next-token cross-entropy it computes anyway, named so that transformers does not warn
    # that it cannot tell the loss from the class name.
    gpt2.loss_type = "ForCausalLM"
    return gpt2


@functools.lru_cache(maxsize=1)
def text_bytes() -> bytes:
    """The training text: the chosen standard-library files, else the built-ins' docstrings."""
    stdlib = sysconfig.get_paths()["stdlib"]
    parts, missing = [], []
    for name in STDLIB_FILES:
        try:
            with open(os.path.join(stdlib, name), "rb") as handle:
                parts.append(handle.read())
        except OSError:
            missing.append(name)
    if missing:
        print(
            f"gpt2_bytes: {len(missing)} of {len(STDLIB_FILES)} standard-library files not found "
            f"in {stdlib} ({', '.join(missing)}); training on the others",
            file=sys.stderr,
        )
    if not parts:
        print("gpt2_bytes: using the docstrings of Python's built-ins instead", file=sys.stderr)
        import builtins

        parts = [
            (getattr(builtins, name).__doc__ or "").encode()
            for name in sorted(dir(builtins))
            if not name.startswith("_")
        ]
    return b"\n".join(parts)[:MAX_BYTES]


def windows() -> torch.Tensor:
    """The text cut into windows of SEQ_LEN byte ids, shape (count, SEQ_LEN), int64."""
    ids = torch.frombuffer(bytearray(text_bytes()), dtype=torch.uint8).long()
    count = len(ids) // SEQ_LEN
    return ids[: count * SEQ_LEN].view(count, SEQ_LEN)


def as_batch(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Windows -> GPT-2's inputs; the labels are the inputs (the model shifts them by one)."""
    ids = torch.stack(rows)
    return {"input_ids": ids, "labels": ids}


def dataloader() -> DataLoader:
    return DataLoader(
        list(windows()), batch_size=BATCH_SIZE, shuffle=True, drop_last=True, collate_fn=as_batch
    )
