# Good model file whose defaults name parameter groups for --per-layer (they do nothing without it).
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.body = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(torch.tanh(self.embed(x)))))


defaults = {"steps": 24, "lr": 0.5, "num_probes": 8, "probe_batches": 2,
            "groups": {"hidden": ["embed.*", "body.*"]}}  # fmt: skip


def model():
    return Net()


def dataloader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = (x @ torch.randn(4, 3, generator=g)).argmax(dim=1)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
