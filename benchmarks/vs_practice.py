"""smoothprof's recommendation against what practitioners use, at equal optimizer steps.

For every model file and seed, with one plain training loop (SGD without momentum, the fixed
training batches of the file's ``dataloader()`` cycled in order, the last ``HELD_OUT_SHARE`` of
them held out), it trains:

- ``smoothprof``: the headline (clip, lr) of ``smoothprof fit`` on a profiling run made with
  ``smoothprof run`` at the tool's defaults (on the training batches only, the same seed);
- ``finder``: torch-lr-finder 0.2.2's range test (exponential lr from ``FINDER_START_LR`` to 10
  over 100 iterations, its EMA smoothing and divergence stop) and its steepest-slope suggestion
  (the first 10 and last 5 points dropped, as its ``plot(suggest_lr=True)`` does), unclipped;
- ``finder+autoclip``: the finder's lr, clipped at the 10th percentile of every gradient norm seen
  so far (AutoClip, Seetharaman et al. 2020, with the p of the authors' example);
- ``finder+zclip``: the finder's lr with ZClip's z-score rule at its defaults (EMA alpha 0.97,
  z 2.5, 25 warm-up steps, adaptive scaling), its hard cap ``max_grad_norm`` off: the cap of 1.0
  it ships with is a fixed threshold unrelated to a model's gradient scale, and the comparison is
  with the adaptive rule;
- ``sweep``: fixed steps lr_finder x {1/4, 1/2, 1, 2, 4}, unclipped, the best of which (by held-out
  loss) is the oracle a tuned practitioner would reach: per seed in the table, and below it as
  one multiple for every seed (the multiple with the best median);
- ``finder rerun``: no method, the finder's run again from initial weights scaled by
  ``1 + PERTURBATION``: its change to the held-out loss is the model's rounding noise, what the
  other comparisons of that model are to be read against.

It reports the held-out loss after training, the steps each run took to reach a target (10% above
the best final training loss of the sweep, on a trailing mean of 20 steps), and each method's
cost in training steps spent before the real run (the profiling run with its probes as the time
of training steps, the range test's iterations). The median over seeds decides.

    python benchmarks/vs_practice.py              # every model, seeds 0 1 2
    python benchmarks/vs_practice.py --quick      # two small models, one seed, short runs
    python benchmarks/vs_practice.py --markdown   # the tables as Markdown
    python benchmarks/vs_practice.py --json R.json; ... --summarize R.json  # tables again

Needs torch-lr-finder 0.2.2 (``pip install torch-lr-finder==0.2.2``); transformers for the GPT-2
sample and the Llama (each is skipped without it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smoothprof.analysis import analyze  # noqa: E402
from smoothprof.fit import FitError  # noqa: E402
from smoothprof.loading import (  # noqa: E402
    ModelFile,
    instantiate_model,
    load_model_file,
    make_dataloader,
)
from smoothprof.train import seed_everything  # noqa: E402

SAMPLES = ROOT / "sample_models"
OWN_MODELS = Path(__file__).resolve().parent / "models"
MODELS = {
    "mlp_spirals": SAMPLES / "mlp_spirals.py",
    "linear_rnn": SAMPLES / "linear_rnn.py",
    "char_lstm": SAMPLES / "char_lstm.py",
    "resnet_digits": SAMPLES / "resnet_digits.py",
    "gpt2_bytes": SAMPLES / "gpt2_bytes.py",
    "tiny_transformer_lm": OWN_MODELS / "tiny_transformer_lm.py",
    "tanh_regression": OWN_MODELS / "tanh_regression.py",
    "llama_bytes": OWN_MODELS / "llama_bytes.py",
}
QUICK_MODELS = ("mlp_spirals", "tanh_regression")
HELD_OUT_SHARE = 0.15
MAX_HELD_OUT = 16
FINDER_START_LR = 1e-4
FINDER_ITERATIONS = 100
SWEEP_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
AUTOCLIP_PERCENTILE = 10.0
TARGET_MARGIN = 1.1
# The rounding-noise arm: the finder's run again from initial weights scaled by 1 + 2^-22
# (about two float32 roundings): how far apart two runs lie that differ by rounding alone.
PERTURBATION = 2.0**-22
NOISE_ARM = "finder rerun"
FINDER_ARMS = ("finder", "finder+autoclip", "finder+zclip")
TARGET_WINDOW = 20


@dataclass
class Batches:
    train: list[Any]
    held_out: list[Any]


def split_batches(model_file: ModelFile, seed: int) -> Batches:
    """One epoch of the file's dataloader, drawn with the seed; the last batches held out."""
    seed_everything(seed)
    batches = list(iter(make_dataloader(model_file)))
    held = min(MAX_HELD_OUT, max(1, round(HELD_OUT_SHARE * len(batches))))
    if len(batches) - held < 1:
        raise SystemExit(f"{model_file.path}: too few batches ({len(batches)}) to hold some out")
    return Batches(batches[:-held], batches[-held:])


# ----------------------------------------------------------------------------- clippers


class AutoClip:
    """Clip at the p-th percentile of every gradient norm seen so far (this one included)."""

    def __init__(self, percentile: float = AUTOCLIP_PERCENTILE) -> None:
        self.percentile = percentile
        self.history: list[float] = []

    def __call__(self, parameters: list[torch.Tensor]) -> None:
        norm = _grad_norm(parameters)
        self.history.append(norm)
        _clip_to(parameters, norm, float(np.percentile(self.history, self.percentile)))


class ZClip:
    """ZClip's z-score rule with adaptive scaling (Kumar et al. 2025), its defaults."""

    def __init__(self, alpha=0.97, z_thresh=2.5, warmup_steps=25, max_grad_norm=None, eps=1e-6):
        self.alpha, self.z_thresh, self.warmup_steps = alpha, z_thresh, warmup_steps
        self.max_grad_norm, self.eps = max_grad_norm, eps
        self.buffer: list[float] = []
        self.mean = self.var = None

    def __call__(self, parameters: list[torch.Tensor]) -> None:
        norm = _grad_norm(parameters)
        if self.mean is None:
            self.buffer.append(norm)
            if len(self.buffer) >= self.warmup_steps:
                self.mean = statistics.fmean(self.buffer)
                self.var = statistics.fmean((x - self.mean) ** 2 for x in self.buffer)
            if self.max_grad_norm is not None:
                _clip_to(parameters, norm, self.max_grad_norm)
            return
        std = self.var**0.5
        z = (norm - self.mean) / (std + self.eps)
        clip = None
        if z > self.z_thresh:
            clip = self.mean + self.z_thresh * std / (z / self.z_thresh)
        effective = norm if clip is None else clip
        if self.max_grad_norm is not None:
            effective = min(effective, self.max_grad_norm)
        _clip_to(parameters, norm, effective)
        value = clip if clip is not None else norm
        self.mean = self.alpha * self.mean + (1 - self.alpha) * value
        self.var = self.alpha * self.var + (1 - self.alpha) * (value - self.mean) ** 2


class FixedClip:
    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def __call__(self, parameters: list[torch.Tensor]) -> None:
        _clip_to(parameters, _grad_norm(parameters), self.threshold)


def _grad_norm(parameters: list[torch.Tensor]) -> float:
    grads = [p.grad for p in parameters if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0


def _clip_to(parameters: list[torch.Tensor], norm: float, threshold: float) -> None:
    if norm > threshold > 0:
        scale = threshold / (norm + 1e-6)
        for p in parameters:
            if p.grad is not None:
                p.grad.mul_(scale)


# ----------------------------------------------------------------------------- training


@dataclass
class ArmResult:
    arm: str
    lr: float
    clip: str  # "none", a threshold, or the adaptive rule's name
    losses: list[float]
    held_out: float  # inf when the run diverged
    diverged_at: int | None = None


def train_arm(
    model_file: ModelFile,
    batches: Batches,
    *,
    seed: int,
    steps: int,
    lr: float,
    clipper: Any = None,
    arm: str = "",
    clip_text: str = "none",
    perturbation: float = 0.0,
) -> ArmResult:
    """The plain loop every method is judged with: SGD, the training batches in order; the
    initial weights scaled by ``1 + perturbation`` when it is not zero."""
    seed_everything(seed)
    model = instantiate_model(model_file)
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    if perturbation:
        with torch.no_grad():
            for p in parameters:
                p.mul_(1.0 + perturbation)
    optimizer = torch.optim.SGD(parameters, lr=lr)
    losses: list[float] = []
    cycle = itertools.cycle(batches.train)
    for step in range(steps):
        batch = next(cycle)
        optimizer.zero_grad(set_to_none=True)
        loss = model_file.call_loss(model, batch)
        value = float(loss.detach())
        losses.append(value)
        if not math.isfinite(value) or value > 1e6:
            return ArmResult(arm, lr, clip_text, losses, math.inf, diverged_at=step)
        loss.backward()
        if clipper is not None:
            clipper(parameters)
        optimizer.step()
    return ArmResult(arm, lr, clip_text, losses, held_out_loss(model_file, model, batches))


def held_out_loss(model_file: ModelFile, model: torch.nn.Module, batches: Batches) -> float:
    """The mean loss over the held-out batches, in eval mode (no dropout, batch norm from its
    running statistics), as a model is evaluated; the model is left in train mode."""
    model.eval()
    try:
        with torch.no_grad():
            values = [float(model_file.call_loss(model, b)) for b in batches.held_out]
    finally:
        model.train()
    value = statistics.fmean(values)
    return value if math.isfinite(value) else math.inf


# ----------------------------------------------------------------------------- the range test


class _WholeBatch(torch.nn.Module):
    """The model file's loss as a module, so that the finder's criterion passes it through."""

    def __init__(self, model_file: ModelFile, model: torch.nn.Module) -> None:
        super().__init__()
        self.model_file, self.model = model_file, model

    def forward(self, batch: Any) -> torch.Tensor:
        return self.model_file.call_loss(self.model, batch)


def range_test(model_file: ModelFile, batches: Batches, seed: int) -> tuple[float, int]:
    """torch-lr-finder's suggestion and the iterations its range test ran."""
    import torch_lr_finder.lr_finder as finder_module
    from torch_lr_finder import LRFinder
    from torch_lr_finder.lr_finder import TrainDataLoaderIter

    progress = finder_module.tqdm
    finder_module.tqdm = lambda *args, **kwargs: progress(*args, **{**kwargs, "disable": True})

    class Iter(TrainDataLoaderIter):
        def inputs_labels_from_batch(self, batch_data):
            return batch_data, torch.zeros(())

    class Loader:
        def __init__(self, items):
            self.items = items

        def __iter__(self):
            return iter(self.items)

        def __len__(self):
            return len(self.items)

    seed_everything(seed)
    model = instantiate_model(model_file)
    model.train()
    wrapped = _WholeBatch(model_file, model)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=FINDER_START_LR)
    finder = LRFinder(wrapped, optimizer, lambda output, _labels: output, device="cpu")
    # The batches pass through untouched: the move to the device is a no-op on the CPU.
    finder._move_to_device = lambda inputs, labels, non_blocking=True: (inputs, labels)
    finder.range_test(Iter(Loader(batches.train)), end_lr=10, num_iter=FINDER_ITERATIONS)
    lrs, losses = finder.history["lr"], finder.history["loss"]
    iterations = len(lrs)
    skip_start, skip_end = 10, 5
    lrs, losses = lrs[skip_start:-skip_end], losses[skip_start:-skip_end]
    if len(losses) < 2:
        raise RuntimeError(f"the range test stopped after {iterations} iterations")
    return float(lrs[int(np.gradient(np.array(losses)).argmin())]), iterations


# ----------------------------------------------------------------------------- smoothprof


WRAPPER = """\
# The training batches of {path}, for a profiling run at smoothprof's defaults.
import importlib.util
import torch

_spec = importlib.util.spec_from_file_location("_profiled", {path!r})
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
model = _module.model
{loss}
def dataloader():
    return torch.load({batches!r}, weights_only=False)
"""


@dataclass
class Profile:
    clip: float | None
    lr: float
    cost_steps: float  # training steps plus the probes' time as training steps
    rule: str
    warnings: list[str] = field(default_factory=list)
    probes: dict[str, list[float]] = field(default_factory=dict)
    search: dict[str, Any] | None = None  # the run's step-size search, as its file holds it


def profile_run(name: str, path: Path, batches: Batches, seed: int, work: Path) -> Profile:
    """``smoothprof run`` at the tool's defaults, then ``fit``; when fit says to profile again
    at the lr the search found (the run diverged early), that run too, its cost counted."""
    batches_file = work / f"{name}-{seed}-train.pt"
    torch.save(batches.train, batches_file)
    wrapper = work / f"{name}-{seed}-profiled.py"
    model_file = load_model_file(path)
    loss = "loss = _module.loss" if model_file.has_own_loss else ""
    wrapper.write_text(WRAPPER.format(path=str(path), batches=str(batches_file), loss=loss))
    out = work / f"{name}-{seed}.h5"
    cost, options = 0.0, []
    for _attempt in range(2):
        command = [sys.executable, "-m", "smoothprof", "run", str(wrapper), "-o", str(out)]
        command += ["--seed", str(seed), "--force", *options]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        said = done.stdout + done.stderr
        wrote = re.search(r"wrote .*?: (\d+) steps?, (\d+) probes?", said)
        if wrote is None:
            raise RuntimeError(f"smoothprof run failed: {said.strip().splitlines()[-1]}")
        steps, probes = int(wrote.group(1)), int(wrote.group(2))
        per_probe = re.search(r"the time of (\d+) training step", said)
        searched = re.search(r"(\d+) steps? in all", said)
        cost += steps + probes * (int(per_probe.group(1)) if per_probe else 0)
        cost += int(searched.group(1)) if searched else 0
        try:
            analysis = analyze(out)
            break
        except FitError as error:
            again = re.search(r"smoothprof run MODEL.py --lr (\S+)`", str(error))
            if again is None or options:
                raise
            options = ["--lr", again.group(1)]
    headline = analysis.recommendations.headline
    trajectory = analysis.trajectories[0]
    columns = ("step", "loss", "grad_norm", "hessian_norm", "smoothness_fd", "grad_curvature")
    kept = {c: np.asarray(trajectory.probes[c], dtype=float).tolist() for c in columns}
    return Profile(
        clip=headline.clip_threshold,
        lr=float(headline.step_size),
        cost_steps=cost,
        rule=headline.rule + (f" (profiled again with {' '.join(options)})" if options else ""),
        warnings=list(analysis.recommendations.warnings),
        probes=kept,
        search=None if analysis.search is None else analysis.search.as_json(),
    )


# ----------------------------------------------------------------------------- the comparison


def steps_to_target(losses: list[float], target: float) -> int | None:
    values = np.asarray(losses, dtype=float)
    for end in range(1, values.size + 1):
        window = values[max(0, end - TARGET_WINDOW) : end]
        if np.all(np.isfinite(window)) and window.mean() <= target:
            return end
    return None


def smoothed_final(losses: list[float]) -> float:
    window = np.asarray(losses[-TARGET_WINDOW:], dtype=float)
    return float(window.mean()) if np.all(np.isfinite(window)) else math.inf


def compare_one(name: str, path: Path, seed: int, steps: int, work: Path) -> dict[str, Any]:
    model_file = load_model_file(path)
    batches = split_batches(model_file, seed)
    finder_lr, finder_iterations = range_test(model_file, batches, seed)
    profile = profile_run(name, path, batches, seed, work)

    def arm(label, lr, clipper=None, clip_text="none", perturbation=0.0):
        return train_arm(
            model_file, batches, seed=seed, steps=steps, lr=lr, clipper=clipper, arm=label,
            clip_text=clip_text, perturbation=perturbation,
        )  # fmt: skip

    arms = [
        arm(
            "smoothprof",
            profile.lr,
            None if profile.clip is None else FixedClip(profile.clip),
            "none" if profile.clip is None else f"{profile.clip:.3g}",
        ),
        arm("finder", finder_lr),
        arm("finder+autoclip", finder_lr, AutoClip(), f"AutoClip p{AUTOCLIP_PERCENTILE:g}"),
        arm("finder+zclip", finder_lr, ZClip(), "ZClip z2.5"),
    ]
    arms += [arm(f"sweep x{factor:g}", finder_lr * factor) for factor in SWEEP_FACTORS]
    arms.append(arm(NOISE_ARM, finder_lr, perturbation=PERTURBATION))
    sweep = [a for a in arms if a.arm.startswith("sweep")]
    target = TARGET_MARGIN * min(smoothed_final(a.losses) for a in sweep)
    return {
        "model": name,
        "seed": seed,
        "steps": steps,
        "finder_lr": finder_lr,
        "finder_iterations": finder_iterations,
        "profile": asdict(profile),
        "target": target,
        "arms": [
            {
                "arm": a.arm,
                "lr": a.lr,
                "clip": a.clip,
                "held_out": a.held_out,
                "steps_to_target": steps_to_target(a.losses, target),
                "diverged_at": a.diverged_at,
            }
            for a in arms
        ],
    }


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model: the median over seeds of each method's held-out loss and steps to target."""
    rows = []
    for name in dict.fromkeys(r["model"] for r in results):
        runs = [r for r in results if r["model"] == name]

        def median_of(label, key, runs=runs):
            values = []
            for r in runs:
                if label == "sweep best":
                    best = min(
                        (a for a in r["arms"] if a["arm"].startswith("sweep")),
                        key=lambda a: a["held_out"],
                    )
                    values.append(best[key])
                else:
                    values.append(next(a[key] for a in r["arms"] if a["arm"] == label))
            values = [math.inf if v is None else v for v in values]
            return statistics.median(values)

        row = {"model": name, "seeds": len(runs)}
        for label in ("smoothprof", "finder", "finder+autoclip", "finder+zclip", "sweep best"):
            row[label] = {
                "held_out": median_of(label, "held_out"),
                "steps_to_target": median_of(label, "steps_to_target"),
            }
        ours = row["smoothprof"]["held_out"]
        finders = min(row[k]["held_out"] for k in FINDER_ARMS)
        row["beats_finders"] = ours <= finders
        row["behind_finders"] = ours / finders - 1.0 if math.isfinite(finders) else None
        # Seed by seed against the finder arm with the best median: how often smoothprof ends lower.
        best_arm = min(FINDER_ARMS, key=lambda label: row[label]["held_out"])
        held = [{a["arm"]: a["held_out"] for a in r["arms"]} for r in runs]
        row["seeds_ahead"] = {
            "arm": best_arm,
            "ahead": sum(h["smoothprof"] < h[best_arm] for h in held),
            "seeds": len(held),
        }
        row["rounding_noise"] = rounding_noise(runs)
        row["within_10pct_of_sweep"] = ours <= 1.1 * row["sweep best"]["held_out"]
        # The sweep as a practitioner without a held-out set per seed would use it: one
        # multiple of the finder's lr for every seed, the multiple with the best median.
        multiples = [a["arm"] for a in runs[0]["arms"] if a["arm"].startswith("sweep")]
        one = min(multiples, key=lambda label: median_of(label, "held_out"))
        row["sweep one multiple"] = {"arm": one, "held_out": median_of(one, "held_out")}
        row["within_10pct_of_one_multiple"] = ours <= 1.1 * row["sweep one multiple"]["held_out"]
        row["profile_cost_steps"] = statistics.median(r["profile"]["cost_steps"] for r in runs)
        row["finder_cost_steps"] = statistics.median(r["finder_iterations"] for r in runs)
        row["headline"] = [
            (r["profile"]["clip"], r["profile"]["lr"], r["profile"]["rule"]) for r in runs
        ]
        row["finder_lr"] = [r["finder_lr"] for r in runs]
        rows.append(row)
    return rows


def rounding_noise(runs: list[dict[str, Any]]) -> float | None:
    """The median over seeds of how far the finder's run moves, relative to its held-out loss,
    when its initial weights move by ``PERTURBATION``; seeds where either run diverged do not
    count (None: no seed counts, or the file has no rerun)."""
    changes = []
    for r in runs:
        held = {a["arm"]: a["held_out"] for a in r["arms"]}
        base, again = held["finder"], held.get(NOISE_ARM, math.nan)
        if math.isfinite(base) and math.isfinite(again) and base > 0:
            changes.append(abs(again - base) / base)
    return statistics.median(changes) if changes else None


def _number(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isinf(value)):
        return "diverged" if value is not None else "-"
    return f"{value:.4g}"


def _percent(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1%}" if value >= 1e-3 else "<0.1%"


def _beats(row: dict[str, Any]) -> str:
    behind = row.get("behind_finders")
    if row["beats_finders"] or behind is None:
        return "yes" if row["beats_finders"] else "no"
    return f"no ({behind:.0%} behind)"


def table(rows: list[dict[str, Any]], markdown: bool) -> str:
    header = [
        "model", "smoothprof", "finder", "finder+AutoClip", "finder+ZClip", "sweep best",
        "beats finders", "within 10%", "rounding noise", "cost: profile / range test",
    ]  # fmt: skip
    lines = []
    for row in rows:

        def cell(label, row=row):
            held = row[label]["held_out"]
            reach = row[label]["steps_to_target"]
            reached = "never" if math.isinf(reach) else f"{reach:g}"
            return f"{_number(held)} ({reached})"

        lines.append([
            row["model"], cell("smoothprof"), cell("finder"), cell("finder+autoclip"),
            cell("finder+zclip"), cell("sweep best"), _beats(row),
            "yes" if row["within_10pct_of_sweep"] else "no", _percent(row.get("rounding_noise")),
            f"{row['profile_cost_steps']:.0f} / {row['finder_cost_steps']:.0f}",
        ])  # fmt: skip
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    return "\n".join(
        "  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [header, *lines]
    )


def lines_below_table(rows: list[dict[str, Any]]) -> str:
    """Below the table: the sweep judged as one multiple of the finder's lr for all seeds, and
    the seeds on which smoothprof ends below the finder arm with the best median."""
    cells = [
        f"{row['model']} {row['sweep one multiple']['arm'].removeprefix('sweep ')} "
        f"{_number(row['sweep one multiple']['held_out'])} "
        f"({'within 10%' if row['within_10pct_of_one_multiple'] else 'not within 10%'})"
        for row in rows
    ]
    ahead = [
        f"{row['model']} {row['seeds_ahead']['ahead']} of {row['seeds_ahead']['seeds']} "
        f"(against {row['seeds_ahead']['arm']})"
        for row in rows
    ]
    return "\n\n".join(
        textwrap.fill(text, width=100)
        for text in (
            "The sweep as one multiple of the finder's lr for every seed (the multiple with the "
            "best median; smoothprof's headline within 10% of it or not): "
            + "; ".join(cells)
            + ".",
            "Seeds on which smoothprof's held-out loss is below that of the finder arm with the "
            "best median: " + "; ".join(ahead) + ".",
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small models, one seed")
    parser.add_argument("--models", help="comma-separated names (default: all)")
    parser.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    parser.add_argument(
        "--summarize", type=Path, help="print the tables of a --json file; train nothing"
    )
    args = parser.parse_args(argv)
    if args.summarize:
        results = json.loads(args.summarize.read_text())
        seeds = sorted({r["seed"] for r in results})
        steps = results[0]["steps"] if results else 0
        print_summary(summarize(results), steps, seeds, args.markdown)
        return 0
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    names = args.models.split(",") if args.models else list(QUICK_MODELS if args.quick else MODELS)
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    steps = args.steps or (200 if args.quick else 500)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            path = MODELS[name]
            try:
                load_model_file(path)
            except Exception as error:  # an optional package missing: say so, go on
                print(f"{name}: skipped ({error})", file=sys.stderr)
                continue
            for seed in seeds:
                print(f"{name} seed {seed} ...", file=sys.stderr, flush=True)
                results.append(compare_one(name, path, seed, steps, Path(tmp)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print_summary(summarize(results), steps, seeds, args.markdown)
    return 0


def print_summary(rows: list[dict[str, Any]], steps: int, seeds: list[int], markdown: bool) -> None:
    print(
        textwrap.dedent(
            f"""\
            Held-out loss after {steps} SGD steps, median over seeds {seeds} (in brackets: steps
            to 10% above the sweep's best final training loss); rounding noise: the median
            change of the finder's held-out loss when its initial weights move by 2^-22 of
            themselves; cost in training steps before the real run."""
        )
    )
    print(table(rows, markdown))
    print()
    print(lines_below_table(rows))


if __name__ == "__main__":
    raise SystemExit(main())
