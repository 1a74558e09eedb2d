"""A Lightning run under DDP (2 CPU processes, gloo, spawned), with and without the callback:
run by tests/test_integration_lightning.py, prints JSON of what it saw."""

import atexit
import json
import sys

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import nn

from smoothprof.integrations.lightning import SmoothnessCallback


def _leave_process_group():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# Lightning leaves a gloo group alive until the spawned worker's interpreter exits (it destroys
# only nccl groups, at exit), where its teardown sometimes aborts the worker ("terminate called
# without an active exception", SIGABRT; about once in 25 runs here, with or without the
# callback). The workers import this file, so each leaves its group first.
atexit.register(_leave_process_group)


class Regressor(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def fit(callbacks):
    pl.seed_everything(0, verbose=False)
    x = torch.randn(128, 4, generator=torch.Generator().manual_seed(1))
    data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True).sin())
    module = Regressor()
    trainer = pl.Trainer(
        max_steps=6, callbacks=callbacks, accelerator="cpu", devices=2, strategy="ddp_spawn",
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, deterministic=True,
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8, shuffle=True))
    return [p.detach().reshape(-1).tolist() for p in module.parameters()]


if __name__ == "__main__":
    plain = fit([])
    probed = fit([SmoothnessCallback(sys.argv[1], every=2, probe_batches=2)])
    print(json.dumps({"same_weights": plain == probed}))
