"""Runs docs/distributed.md's data-parallel loop under torchrun (any number of processes, gloo).

``torchrun --standalone --nproc_per_node N ddp_readme_loop.py`` in an empty directory writes
``traj.h5`` (the document's code, on rank 0) and ``result.json`` (Hessian norms at the end, from
rank 0). Whatever N, the global batch of every step and the probe batches are the same, so the
probe values must be the same as with N = 1 up to float32 round-off. The model trains in eval
mode (no dropout draws, so every N trains alike) while the probe evaluates it in train mode, with
the dropout masks it seeds per global probe batch.
"""

import functools
import gc
import json
import re
import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import smoothprof

torch.set_num_threads(1)
DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "distributed.md"
section = DOCUMENT.read_text()
code = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)

torch.manual_seed(0)
x = torch.randn(21 * 32, 5)
y = (x[:, 0] + x[:, 1] ** 2 > 0.5).long()
model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 2))
model.eval()  # training without dropout draws; the probe sets train mode itself
probe_x = torch.randn(3 * 8, 5)
probe_y = (probe_x[:, 0] > 0).long()
probe_batches = [(probe_x[i : i + 8], probe_y[i : i + 8]) for i in range(0, 24, 8)]


def loss_fn(m, batch):
    return nn.functional.cross_entropy(m(batch[0]), batch[1])


class RankShare:
    """This rank's rows of each global batch of 32 (the launch is known once the loop runs)."""

    def __iter__(self):
        rank, size = dist.get_rank(), dist.get_world_size()
        share = 32 // size
        for start in range(0, len(x), 32):
            rows = slice(start + rank * share, start + (rank + 1) * share)
            yield x[rows], y[rows]


# The document's code as written, with two of the probe's options pinned so that both launches
# compute alike: the HVP method (auto would time the methods, and a loaded machine may pick
# another) and a tolerance that round-off keeps Lanczos from certifying, so it runs until the
# Krylov space is exhausted (about 20 HVPs here) instead of stopping at an iteration that
# round-off could move.
pinned = types.SimpleNamespace(
    Probe=functools.partial(smoothprof.Probe, hvp_method="double-backward", rtol=1e-12),
    TrajectoryWriter=smoothprof.TrajectoryWriter,
)
namespace = {
    "smoothprof": pinned,
    "model": model,
    "loss_fn": loss_fn,
    "probe_batches": probe_batches,
    "loader": RankShare(),  # 21 steps: probes at 0, 10, 20
    "optimizer": torch.optim.SGD(model.parameters(), lr=0.5),
}
code = code.replace("dist.destroy_process_group()", "")  # still needed below
exec(compile(code, "docs/distributed.md", "exec"), namespace)

ddp_model = namespace["ddp_model"]
results = {}
for name, batches in (("one_batch", probe_batches[:1]), ("all_batches", probe_batches)):
    result = smoothprof.hessian_norm(
        ddp_model, loss_fn, batches, mode="train", hvp_method="double-backward", rtol=1e-12
    )
    results[name] = [result.value, result.eigenvalue, result.num_hvps, result.converged]
parameters = [p.detach().clone() for p in model.parameters()]
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, parameters)
results["ranks_agree"] = all(
    all(torch.equal(a, b) for a, b in zip(gathered[0], other)) for other in gathered
)
if dist.get_rank() == 0:
    Path(sys.argv[1] if len(sys.argv) > 1 else "result.json").write_text(json.dumps(results))
del ddp_model, namespace  # the DDP wrapper holds the group: freed now, not at interpreter exit
gc.collect()
dist.barrier()
dist.destroy_process_group()
