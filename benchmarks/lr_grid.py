"""What a step-size choice from training loss can reach, on a grid of fixed steps: the ceiling
of any search whose trials read the training loss (as smoothprof's do), against the sweep oracle
of benchmarks/vs_practice.py, which picks each seed's step by the held-out loss it is then judged
on.

For every model and seed, with vs_practice.py's plain loop (SGD, the training batches in order,
the same held-out batches), it trains at lr = 2^k / 64 for k = 0 .. 11 (1/64 to 32) for
``steps`` steps, and records the loss on the first four training batches (what the search's
trials are judged on) after a tenth, a quarter, a half and all of the steps, and the held-out loss
at the end (in eval mode, as vs_practice.py evaluates). It prints, per model, the median over
seeds of the held-out loss reached when the step
is chosen by the training loss at each horizon, and by the held-out loss itself (the oracle).

    python benchmarks/lr_grid.py --models mlp_spirals,resnet_digits
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vs_practice import MODELS, held_out_loss, split_batches

from smoothprof.loading import instantiate_model, load_model_file
from smoothprof.probe import unchanged_model_state
from smoothprof.train import seed_everything

GRID = tuple(2.0**k / 64 for k in range(12))
PROBE_BATCHES = 4
SHARES = (0.1, 0.25, 0.5, 1.0)  # the horizons printed
RECORDED = tuple(k / 20 for k in range(1, 21))  # the horizons kept in --json


def train_on_grid(name: str, seed: int, steps: int) -> list[dict]:
    """One run per lr of the grid: the training-batch loss at each horizon, the held-out loss
    at the end (inf for a run whose loss became non-finite or above 1e6)."""
    model_file = load_model_file(MODELS[name])
    batches = split_batches(model_file, seed)
    probe = batches.train[:PROBE_BATCHES]
    horizons = {max(1, round(share * steps)) for share in SHARES + RECORDED}
    runs = []
    for lr in GRID:
        seed_everything(seed)
        model = instantiate_model(model_file)
        model.train()
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(parameters, lr=lr)
        batch_cycle = itertools.cycle(batches.train)
        training = {h: math.inf for h in horizons}
        start = probe_loss(model_file, model, probe, seed)
        held_out = math.inf
        for step in range(1, steps + 1):
            optimizer.zero_grad(set_to_none=True)
            loss = model_file.call_loss(model, next(batch_cycle))
            value = float(loss.detach())
            if not math.isfinite(value) or value > 1e6:
                break
            loss.backward()
            optimizer.step()
            if step in horizons:
                value = probe_loss(model_file, model, probe, seed)
                training[step] = value if math.isfinite(value) else math.inf
            if step == steps:
                held_out = held_out_loss(model_file, model, batches)
        runs.append({"lr": lr, "start": start, "training": training, "held_out": held_out})
    return runs


def probe_loss(model_file, model: torch.nn.Module, probe: list, seed: int) -> float:
    """The mean loss on the probe batches as the search's trials read it (train mode, a fixed
    dropout mask per batch), leaving the model's buffers and the RNG states as they were, so the
    run trains exactly as vs_practice.py's loop does."""
    values = []
    with unchanged_model_state(model, torch.device("cpu")), torch.no_grad():
        for index, batch in enumerate(probe):
            torch.manual_seed(seed + index)
            values.append(float(model_file.call_loss(model, batch)))
    return statistics.fmean(values)


def summarize(name: str, by_seed: dict[int, list[dict]], steps: int) -> list[str]:
    lines = [f"{name} ({steps} steps, seeds {sorted(by_seed)}): held-out loss at the end by lr"]
    for index, lr in enumerate(GRID):
        values = [runs[index]["held_out"] for runs in by_seed.values()]
        cells = " ".join(f"{v:8.4g}" for v in values)
        lines.append(f"  lr {lr:8.4g}: {cells}   median {statistics.median(values):.4g}")
    horizons = sorted({max(1, round(share * steps)) for share in SHARES})
    for h in horizons:
        chosen = [min(runs, key=lambda r, h=h: r["training"][h]) for runs in by_seed.values()]
        picks = ", ".join(f"{r['lr']:g}: {r['held_out']:.4g}" for r in chosen)
        median = statistics.median(r["held_out"] for r in chosen)
        lines.append(f"  chosen by training loss at step {h:4d}: median {median:.4g}  ({picks})")
    oracle = [min(runs, key=lambda r: r["held_out"]) for runs in by_seed.values()]
    picks = ", ".join(f"{r['lr']:g}: {r['held_out']:.4g}" for r in oracle)
    median = statistics.median(r["held_out"] for r in oracle)
    lines.append(f"  chosen by the held-out loss itself:   median {median:.4g}  ({picks})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp_spirals,resnet_digits")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    everything = {}
    for name in args.models.split(","):
        by_seed = everything[name] = {}
        for seed in (int(s) for s in args.seeds.split(",")):
            print(f"{name} seed {seed} ...", file=sys.stderr, flush=True)
            by_seed[seed] = train_on_grid(name, seed, args.steps)
        print("\n".join(summarize(name, by_seed, args.steps)), flush=True)
        if args.json:
            args.json.write_text(json.dumps(everything))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
