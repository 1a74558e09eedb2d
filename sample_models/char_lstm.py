"""A character-level LSTM language model on the source of Python's standard library.

What it is
----------
The paper's AWD-LSTM setting (Zhang et al. 2020, Figure 1: a word-level LSTM on Penn Treebank,
SGD with clipping at 0.25), made small enough for a CPU: an embedding of ``EMBED_DIM = 32``, one
LSTM layer of ``HIDDEN_DIM = 128`` units and a linear read-out predict the next character. The
loss is the cross-entropy of every next character, averaged over the batch and the sequence
(nats per character; log 97 = 4.57 is chance over the vocabulary).

The text is real and ships with Python itself: the source files of ``STDLIB_FILES`` below, read
from the standard library directory (``sysconfig.get_paths()["stdlib"]``) in that fixed order and
cut at ``MAX_CHARS``, so every machine with the same Python version gets the same text (a few
hundred thousand characters of code, docstrings and comments). A file that is missing is skipped,
with one line on stderr naming it; if none is there (a Python without its source files), the text
is the docstrings of Python's built-in types and functions, which every interpreter carries. The
vocabulary is fixed: the 95 printable ASCII characters, newline, and one id for anything else,
so the model has the same shape whatever the text.

Batches are ``(x, y)`` of shape (``BATCH_SIZE``, ``SEQ_LEN``) = (32, 50) character ids, ``y``
being ``x`` shifted by one character: the text is cut into windows of ``SEQ_LEN + 1`` characters,
shuffled by the run's seed. Each window starts from a zero hidden state (no state is carried
between batches), so the loss of a batch is a function of the parameters and the batch alone, as
the probe needs.

What to expect
--------------
With the defaults below (plain SGD at lr 5 with gradient-norm clipping at 0.25, the AWD-LSTM
threshold, for 600 steps of 32 x 50 characters) the training itself takes 5 to 15 s on two CPU
cores and the 26 log-spaced probes (``probe_schedule``, 2 ``probe_batches``, their graphs
retained) about 15 s: about 20 s in all. The probe loss falls from 4.59 (chance) to
~3.0 by step 20 and ~1.6 by step 500 as the LSTM learns words, indentation and brackets.
Clipping acts on every step for the first ~30 steps and on about one in six after that (a
quarter of all steps).

Along the run the probe's gradient norm falls from ~0.55 to ~0.18 and the smoothness with it:
the Hessian norm from ~1 to 1.4 to ~0.5 (with one spike to ~4 near step 50), the
finite-difference estimate along the update from ~1 to ~0.2. ``smoothprof fit`` finds a
Spearman log-log correlation of ~0.7 on the Hessian norm (L0 ~ 1.05, L1 ~ 0.7) and ~0.8 on the
finite difference (``--estimator fd``): the picture of the paper's Figure 1, over a smaller range
of gradient norms (a factor ~4, not orders of magnitude).

Clipping matters at larger step sizes. Measured here with ``--probe-every 0``, final minibatch
loss after 600 steps: lr 1 without clipping 2.08; lr 5 without clipping 1.61 (with: 1.58); lr 20
without clipping fails (the loss jumps to ~20 and stays near 12), with clipping at 0.25 it
reaches 1.45, the best of these. ``smoothprof compare`` puts such runs side by side.

    smoothprof run sample_models/char_lstm.py -o lstm.h5
    smoothprof fit lstm.h5
"""

import functools
import os
import string
import sys
import sysconfig

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# A fixed set of pure-Python modules, present in CPython 3.10 to 3.14, read in this order.
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
    "fractions.py",
    "statistics.py",
    "difflib.py",
)
MAX_CHARS = 300_000  # the text is cut here, so its size does not grow with new Python versions
VOCAB = string.printable[:95] + "\n"  # printable ASCII without \t\r\x0b\x0c, then newline
UNKNOWN = len(VOCAB)  # the id of every other character
VOCAB_SIZE = len(VOCAB) + 1  # 97 ids: 96 characters and UNKNOWN
EMBED_DIM = 32
HIDDEN_DIM = 128
SEQ_LEN = 50
BATCH_SIZE = 32

defaults = {
    "steps": 600,
    "lr": 5.0,
    "optimizer": "sgd",
    "clip": 0.25,  # AWD-LSTM's threshold
    "probe_schedule": "log",  # dense early, where the loss falls fastest
    "probes_per_decade": 10,
    "probe_batches": 2,
    # Both batches' double-backward graphs take about 80 MiB: keep them for the cheapest HVPs.
    "retain_graphs": True,
}


@functools.lru_cache(maxsize=1)
def _text() -> str:
    """The training text: the chosen standard-library files, else the built-ins' docstrings."""
    stdlib = sysconfig.get_paths()["stdlib"]
    parts, missing = [], []
    for name in STDLIB_FILES:
        try:
            with open(os.path.join(stdlib, name), encoding="utf-8") as handle:
                parts.append(handle.read())
        except OSError:
            missing.append(name)
    if missing:
        print(
            f"char_lstm: {len(missing)} of {len(STDLIB_FILES)} standard-library files not found "
            f"in {stdlib} ({', '.join(missing)}); training on the others",
            file=sys.stderr,
        )
    if not parts:
        print("char_lstm: using the docstrings of Python's built-ins instead", file=sys.stderr)
        import builtins

        parts = [
            getattr(builtins, name).__doc__ or ""
            for name in sorted(dir(builtins))
            if not name.startswith("_")
        ]
    return "\n".join(parts)[:MAX_CHARS]


def encode(text: str) -> torch.Tensor:
    """Character ids (int64): VOCAB's index, or UNKNOWN."""
    index = {char: i for i, char in enumerate(VOCAB)}
    return torch.tensor([index.get(char, UNKNOWN) for char in text], dtype=torch.long)


def decode(ids) -> str:
    return "".join(VOCAB[i] if i < len(VOCAB) else "?" for i in ids)


class CharLSTM(nn.Module):
    """Embedding -> one LSTM layer -> linear read-out; ids (batch, T) -> logits (batch, T, V)."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, batch_first=True)
        self.head = nn.Linear(hidden_dim, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(self.embed(ids))
        return self.head(hidden)


def model() -> nn.Module:
    return CharLSTM(VOCAB_SIZE, EMBED_DIM, HIDDEN_DIM)


def dataloader() -> DataLoader:
    ids = encode(_text())
    count = (len(ids) - 1) // SEQ_LEN
    windows = ids[: count * SEQ_LEN + 1]
    x = windows[:-1].view(count, SEQ_LEN)
    y = windows[1:].view(count, SEQ_LEN)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH_SIZE, shuffle=True, drop_last=True)


def loss(model: nn.Module, batch) -> torch.Tensor:
    """Cross-entropy of every next character, averaged over batch and sequence (a scalar)."""
    x, y = batch
    logits = model(x)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
