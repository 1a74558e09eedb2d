"""Ranks that would decide differently must not fall out of step (run under torchrun, 2 ranks).

Rank 1's loss fails inside a double-backward HVP (so that method fails there only), and rank 1
trains slowly while rank 0 does not (so their clocks disagree on the overhead cap). The probe must
drop the failing method on both ranks and follow rank 0's clock on both; otherwise the ranks wait
for each other's collectives forever. Rank 0 writes what each rank saw to the path in argv[1].
"""

import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import smoothprof

torch.set_num_threads(1)
dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # a deadlock fails
rank = dist.get_rank()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
batches = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(3)]


def in_double_backward_product():
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_local_hvp" and frame.f_locals.get("method") == (
            "double-backward"
        ):
            return True
        frame = frame.f_back
    return False


def loss_fn(m, batch):
    if rank == 1 and in_double_backward_product():
        raise RuntimeError("this rank's loss cannot be differentiated twice")
    return nn.functional.cross_entropy(m(batch[0]), batch[1])


probe = smoothprof.Probe(
    model, loss_fn, batches, every=1, max_overhead=1.0, floor_steps=[0], distributed=True,
    hvp_method="auto",
)
for step in range(6):
    with probe.around_step(step):
        if rank == 1:
            time.sleep(0.3)  # rank 1 alone would find the probes cheap against its training
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.99)
seen = {
    "method": probe.hvp_method,
    "steps": [r.step for r in probe.records],
    "skipped": probe.skipped,
    "hessian_norm": [r.hessian_norm for r in probe.records],
}
everyone = [None, None]
dist.all_gather_object(everyone, seen)
if rank == 0:
    Path(sys.argv[1]).write_text(json.dumps(everyone))
dist.barrier()
dist.destroy_process_group()
