"""A causal transformer language model of about 25M parameters, in plain PyTorch, on the bytes of
Python's own standard-library source: the large model of the probe's scaling benchmarks
(issue 17; docs/scaling.md).

Eight pre-norm ``nn.TransformerEncoderLayer`` blocks of width 512, 8 heads, feed-forward 2048, a
causal mask, learned position embeddings and an untied byte head: 25.5M parameters, sequences
of 128 bytes in batches of 8. ``build(width, layers)`` makes the same family at other sizes
(width 128 / 2 layers is 0.5M parameters, 256 / 4 is 3.3M, 384 / 6 is 10.8M).
"""

import sysconfig
from pathlib import Path

import torch
from torch import nn

SEQ_LEN, BATCH_SIZE, WIDTH, LAYERS = 128, 8, 512, 8
FILES = ("textwrap.py", "heapq.py", "bisect.py", "colorsys.py", "difflib.py", "argparse.py")
MAX_BYTES = 400_000


class TransformerLM(nn.Module):
    def __init__(self, width: int = WIDTH, layers: int = LAYERS):
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.position = nn.Parameter(torch.zeros(SEQ_LEN, width))
        layer = nn.TransformerEncoderLayer(
            width, max(1, width // 64), 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256)
        mask = torch.triu(torch.full((SEQ_LEN, SEQ_LEN), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask)

    def forward(self, tokens):
        length = tokens.shape[1]
        h = self.embed(tokens) + self.position[:length]
        h = self.blocks(h, mask=self.mask[:length, :length], is_causal=True)
        return self.head(self.norm(h))


def build(width: int = WIDTH, layers: int = LAYERS) -> TransformerLM:
    return TransformerLM(width, layers)


def model():
    return build()


def _text() -> bytes:
    root = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join((root / name).read_bytes() for name in FILES if (root / name).exists())
    return data[:MAX_BYTES] or bytes(range(256)) * 256


def dataloader():
    data = torch.tensor(list(_text()), dtype=torch.long)
    windows = data[: (len(data) - 1) // (SEQ_LEN + 1) * (SEQ_LEN + 1)].view(-1, SEQ_LEN + 1)
    windows = windows[torch.randperm(len(windows))]
    starts = range(0, len(windows) - BATCH_SIZE + 1, BATCH_SIZE)
    return [windows[i : i + BATCH_SIZE] for i in starts]


def loss(model, batch):
    logits = model(batch[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
