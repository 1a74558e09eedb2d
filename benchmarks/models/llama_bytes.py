"""A 2-layer Llama from Hugging Face ``transformers`` (built from a config: RMSNorm, SwiGLU,
rotary positions, grouped-query attention), next-byte prediction on Python's standard-library
source: written for benchmarks/vs_practice.py as a user would write one, to the model-file
contract alone (no ``defaults``, no ``loss``: the model computes its own from ``labels``, and
its attention is transformers' default).
"""

import sysconfig
from pathlib import Path

import torch
import transformers
from torch.utils.data import DataLoader

FILES = ("argparse.py", "dataclasses.py", "enum.py", "gettext.py")  # none the other LMs read
MAX_BYTES, SEQ_LEN, BATCH_SIZE = 150_000, 48, 16


def model():
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ_LEN,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def dataloader():
    root = Path(sysconfig.get_paths()["stdlib"])
    text = b"".join((root / name).read_bytes() for name in FILES if (root / name).exists())
    ids = torch.tensor(list(text[:MAX_BYTES] or bytes(range(256)) * 64), dtype=torch.long)
    windows = ids[: len(ids) // SEQ_LEN * SEQ_LEN].view(-1, SEQ_LEN)
    return DataLoader(
        list(windows), batch_size=BATCH_SIZE, shuffle=True, drop_last=True,
        collate_fn=lambda rows: {"input_ids": torch.stack(rows), "labels": torch.stack(rows)},
    )  # fmt: skip
