"""A small causal transformer language model in plain PyTorch (no transformers package), on
the bytes of Python's own standard-library source: written for benchmarks/vs_practice.py.

Two pre-norm ``nn.TransformerEncoderLayer`` blocks of width 64 with 4 heads and a causal mask,
learned position embeddings, an untied byte head; sequences of 32 bytes in batches of 16.
"""

import sysconfig
from pathlib import Path

import torch
from torch import nn

SEQ_LEN, BATCH_SIZE, WIDTH, LAYERS, HEADS = 32, 16, 64, 2, 4
FILES = ("textwrap.py", "heapq.py", "bisect.py", "colorsys.py")
MAX_BYTES = 120_000


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(256, WIDTH)
        self.position = nn.Parameter(torch.zeros(SEQ_LEN, WIDTH))
        layer = nn.TransformerEncoderLayer(
            WIDTH, HEADS, 4 * WIDTH, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, 256)
        mask = torch.triu(torch.full((SEQ_LEN, SEQ_LEN), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask)

    def forward(self, tokens):
        h = self.embed(tokens) + self.position[: tokens.shape[1]]
        h = self.blocks(h, mask=self.mask[: tokens.shape[1], : tokens.shape[1]], is_causal=True)
        return self.head(self.norm(h))


def model():
    return TinyLM()


def _text() -> bytes:
    root = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join((root / name).read_bytes() for name in FILES if (root / name).exists())
    return data[:MAX_BYTES] or bytes(range(256)) * 64


def dataloader():
    data = torch.tensor(list(_text()), dtype=torch.long)
    windows = data[: (len(data) - 1) // (SEQ_LEN + 1) * (SEQ_LEN + 1)].view(-1, SEQ_LEN + 1)
    order = torch.randperm(len(windows))
    windows = windows[order]
    starts = range(0, len(windows) - BATCH_SIZE + 1, BATCH_SIZE)
    return [windows[i : i + BATCH_SIZE] for i in starts]


def loss(model, batch):
    logits = model(batch[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
